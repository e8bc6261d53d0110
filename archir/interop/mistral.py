"""Mistral (``MistralForCausalLM``) ⇄ archir: a Llama layout whose attention may have a
sliding window (Jiang et al., 2023, "Mistral 7B").

``sliding_window: W`` becomes the attention's ``window: W``: position ``i`` attends to
``j`` with ``i − W < j ≤ i``, as transformers' Mistral mask does.
"""

from __future__ import annotations

from typing import Any

from archir.interop import llama
from archir.interop.base import Family, HFConfig, Rule, refuse_spec, register
from archir.spec.models import SpecModel


def _to_spec(cfg: HFConfig) -> dict[str, Any]:
    window = cfg.size("sliding_window", None, hi=1 << 20)
    attn: dict[str, Any] = {"window": window} if window is not None else {}
    return llama.decoder_spec(cfg, "mistral", attn, llama.glu(cfg))


def _pairs(spec: SpecModel, export: bool = False) -> list[Any]:
    """The layers; ``export`` also asks for a window (without one the spec is written as
    Llama, the same function; an imported Mistral without a window is still read)."""
    pairs = llama.decoder_layers(spec, "mistral", ("swiglu", "geglu"))
    pa = pairs[0][0]
    if export and pa.window is None:
        raise refuse_spec("mistral", "its attention has no sliding window (that is Llama)")
    if pa.qkv_bias or pa.out_bias:
        raise refuse_spec("mistral", "its attention has biases")
    if any(p.bias for _, p in pairs):
        raise refuse_spec("mistral", "its MLPs have biases")
    return pairs


def _rules(spec: SpecModel, hf_keys: set[str] | None) -> list[Rule]:
    return llama.glu_decoder_rules(spec, _pairs(spec))


def _to_config(spec: SpecModel) -> dict[str, Any]:
    pairs = _pairs(spec, export=True)
    cfg = llama.glu_decoder_config(spec, "mistral", "MistralForCausalLM", pairs, mlp_bias=False)
    cfg.update(sliding_window=pairs[0][0].window)
    return cfg


register(
    Family(
        name="mistral",
        architectures=("MistralForCausalLM",),
        model_type="mistral",
        paper="Jiang et al., 2023, 'Mistral 7B'",
        to_spec=_to_spec,
        rules=_rules,
        to_config=_to_config,
        optional_hf=lambda k: k == "lm_head.weight",
        unused_hf=lambda k: k.endswith("rotary_emb.inv_freq"),
    )
)
