"""GPT-2 (``GPT2LMHeadModel``) ⇄ archir (Radford et al., 2019, "Language Models are
Unsupervised Multitask Learners").

Learned absolute positions (``token_embedding`` with ``pos: learned``, ``max_seq_len =
n_positions``); each layer ``x + attn(ln₁(x))``, ``x + mlp(ln₂(x))`` with LayerNorm
(``norm_eps = layer_norm_epsilon``), attention with biases on q, k, v and the output and no
rotary positions, an MLP of width ``n_inner`` (default ``4·n_embd``) with biases and
``gelu_new`` (tanh-approximated GELU, archir's ``gelu_tanh``); final LayerNorm; tied head.
GPT-2's ``Conv1D`` stores matrices as ``[in, out]``: archir's are the transposes, and the
fused ``c_attn`` is split into q, k, v.
"""

from __future__ import annotations

from typing import Any

import torch

from archir.interop.base import (
    Family,
    HFConfig,
    Rule,
    check_plain_spec,
    copy,
    lm_spec,
    refuse_spec,
    register,
    spec_params,
    transposed,
)
from archir.spec.models import SpecModel

_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _to_spec(cfg: HFConfig) -> dict[str, Any]:
    d = cfg.size("n_embd")
    act = cfg.get("activation_function", "gelu_new", str)
    if act not in _ACTS:
        raise cfg.refuse("activation_function", f"{act!r} has no archir activation")
    cfg.expect("scale_attn_weights", [True], True, "unscaled attention scores")
    cfg.expect("scale_attn_by_inverse_layer_idx", [False], False, "scores scaled by 1/layer index")
    cfg.get("reorder_and_upcast_attn", False, bool)  # fp32 attention: the same in fp32
    n_inner = cfg.size("n_inner", None)
    attn = {
        "kind": "attention",
        "n_heads": cfg.size("n_head"),
        "pos": "none",
        "qkv_bias": True,
        "out_bias": True,
    }
    mlp = {"kind": "mlp", "d_ff": n_inner or 4 * d, "activation": _ACTS[act], "bias": True}
    return lm_spec(
        cfg,
        d_model=d,
        max_seq_len=cfg.size("n_positions", 1024, hi=1 << 20),
        norm="layernorm",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5, float),
        layers=[{"repeat": cfg.size("n_layer", hi=4096), "blocks": [attn, mlp]}],
        tie=cfg.get("tie_word_embeddings", True, bool),
        pos="learned",
    )


def _layers(spec: SpecModel) -> list[Any]:
    check_plain_spec(spec, "gpt2", "layernorm", "learned")
    m = spec.model
    blocks = spec_params(spec)
    if len(blocks) % 2 or not blocks:
        raise refuse_spec("gpt2", "its blocks do not pair into (attention, mlp) layers")
    pairs = []
    for i in range(0, len(blocks), 2):
        (ka, pa, ba), (kc, pc, bc) = blocks[i], blocks[i + 1]
        if ka != "attention" or kc != "mlp":
            raise refuse_spec("gpt2", f"layer {i // 2} is ({ka}, {kc}), not (attention, mlp)")
        if any(b.norm not in (None, "layernorm") or not b.residual or b.bits for b in (ba, bc)):
            raise refuse_spec("gpt2", f"layer {i // 2} has its own norm, residual or bits")
        if (
            pa.pos != "none"
            or not (pa.qkv_bias and pa.out_bias)
            or pa.n_kv_heads not in (None, pa.n_heads)
            or pa.head_dim not in (None, m.d_model // pa.n_heads)
            or pa.window is not None
            or pa.causal is False
            or not pc.bias
        ):
            raise refuse_spec("gpt2", f"layer {i // 2} is not GPT-2's biased MHA + biased MLP")
        pairs.append((pa, pc))
    if len({(pa.n_heads, pc.d_ff, pc.expansion, pc.activation) for pa, pc in pairs}) != 1:
        raise refuse_spec("gpt2", "its layers differ from one another")
    if pairs[0][1].activation not in ("gelu_tanh", "gelu", "relu"):
        raise refuse_spec("gpt2", f"its activation {pairs[0][1].activation} has no GPT-2 name")
    return pairs


def _rules(spec: SpecModel, hf_keys: set[str] | None) -> list[Rule]:
    d = spec.model.d_model
    pairs = _layers(spec)
    rules = [
        copy("embed.weight", "transformer.wte.weight"),
        copy("embed.pos_weight", "transformer.wpe.weight"),
        copy("final_norm.weight", "transformer.ln_f.weight"),
        copy("final_norm.bias", "transformer.ln_f.bias"),
    ]
    if not spec.model.head.params.tie_embeddings:  # type: ignore[attr-defined]
        rules.append(copy("head.weight", "lm_head.weight"))

    def w_split(ts: list[torch.Tensor]) -> list[torch.Tensor]:  # [d, 3d] -> 3 × [d, d]ᵀ
        return [w.t().contiguous() for w in ts[0].split(d, dim=1)]

    def w_join(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat([w.t() for w in ts], dim=1).contiguous()]

    def b_split(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [b.contiguous() for b in ts[0].split(d)]

    def b_join(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(ts)]

    for i in range(len(pairs)):
        a, c, h = 2 * i, 2 * i + 1, f"transformer.h.{i}"
        qkv = tuple(f"blocks.{a}.fn.{x}" for x in ("q", "k", "v"))
        rules += [
            copy(f"blocks.{a}.norm.weight", f"{h}.ln_1.weight"),
            copy(f"blocks.{a}.norm.bias", f"{h}.ln_1.bias"),
            Rule(tuple(f"{x}.weight" for x in qkv), (f"{h}.attn.c_attn.weight",), w_split, w_join),
            Rule(tuple(f"{x}.bias" for x in qkv), (f"{h}.attn.c_attn.bias",), b_split, b_join),
            transposed(f"blocks.{a}.fn.o.weight", f"{h}.attn.c_proj.weight"),
            copy(f"blocks.{a}.fn.o.bias", f"{h}.attn.c_proj.bias"),
            copy(f"blocks.{c}.norm.weight", f"{h}.ln_2.weight"),
            copy(f"blocks.{c}.norm.bias", f"{h}.ln_2.bias"),
            transposed(f"blocks.{c}.fn.fc1.weight", f"{h}.mlp.c_fc.weight"),
            copy(f"blocks.{c}.fn.fc1.bias", f"{h}.mlp.c_fc.bias"),
            transposed(f"blocks.{c}.fn.fc2.weight", f"{h}.mlp.c_proj.weight"),
            copy(f"blocks.{c}.fn.fc2.bias", f"{h}.mlp.c_proj.bias"),
        ]
    return rules


def _to_config(spec: SpecModel) -> dict[str, Any]:
    from archir.blocks.common import hidden_size

    pairs = _layers(spec)
    m = spec.model
    pa, pc = pairs[0]
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[pc.activation]
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_embd": m.d_model,
        "n_layer": len(pairs),
        "n_head": pa.n_heads,
        "n_positions": m.max_seq_len,
        "n_inner": hidden_size(m.d_model, pc.expansion, pc.d_ff, pc.multiple_of),
        "activation_function": act,
        "layer_norm_epsilon": m.norm_eps if m.norm_eps is not None else 1e-5,
        "tie_word_embeddings": bool(m.head.params.tie_embeddings),  # type: ignore[attr-defined]
        "scale_attn_weights": True,
        "torch_dtype": "float32",
    }


register(
    Family(
        name="gpt2",
        architectures=("GPT2LMHeadModel",),
        model_type="gpt2",
        paper="Radford et al., 2019, 'Language Models are Unsupervised Multitask Learners'",
        to_spec=_to_spec,
        rules=_rules,
        to_config=_to_config,
        ignored=frozenset(
            {
                "attn_pdrop",
                "embd_pdrop",
                "resid_pdrop",
                "summary_activation",
                "summary_first_dropout",
                "summary_proj_to_labels",
                "summary_type",
                "summary_use_proj",
                "n_ctx",
            }
        ),
        optional_hf=lambda k: k == "lm_head.weight",
        unused_hf=lambda k: k.endswith((".attn.bias", ".attn.masked_bias")),
    )
)
