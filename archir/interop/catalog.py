"""Registers every Hugging Face family (imported for its side effect).

The families accept disjoint specs on export (Mistral needs a window, Llama none; Qwen2 biases
q/k/v only, Llama all four or none; Mixtral an MoE), so the order only sets listing order.
"""

from archir.interop import gpt2, llama, mamba, mistral, mixtral, qwen2, rwkv  # noqa: F401
