"""Qwen2 (``Qwen2ForCausalLM``) ⇄ archir: a Llama layout with biases on q, k and v (none on
the output projection) (Yang et al., 2024, "Qwen2 Technical Report").

Qwen2's optional per-layer sliding windows (``use_sliding_window``) are refused: archir's
layers in one group share their parameters' values.
"""

from __future__ import annotations

from typing import Any

from archir.interop import llama
from archir.interop.base import Family, HFConfig, Rule, refuse_spec, register
from archir.spec.models import SpecModel


def _to_spec(cfg: HFConfig) -> dict[str, Any]:
    if cfg.get("use_sliding_window", False, bool):
        raise cfg.refuse(
            "use_sliding_window",
            "per-layer sliding windows (above max_window_layers) have no archir mapping",
        )
    cfg.get("sliding_window", None, int)  # inert without use_sliding_window
    cfg.get("max_window_layers", None, int)
    types = cfg.get("layer_types", None, list)
    if types is not None and any(t != "full_attention" for t in types):
        raise cfg.refuse("layer_types", "layers other than full_attention are not supported")
    return llama.decoder_spec(cfg, "qwen2", {"qkv_bias": True, "out_bias": False}, llama.glu(cfg))


def _pairs(spec: SpecModel) -> list[Any]:
    pairs = llama.decoder_layers(spec, "qwen2", ("swiglu", "geglu"))
    pa = pairs[0][0]
    if not pa.qkv_bias or pa.out_bias or pa.window is not None:
        raise refuse_spec("qwen2", "its attention is not q/k/v-biased full attention")
    if any(p.bias for _, p in pairs):
        raise refuse_spec("qwen2", "its MLPs have biases")
    return pairs


def _rules(spec: SpecModel, hf_keys: set[str] | None) -> list[Rule]:
    return llama.glu_decoder_rules(spec, _pairs(spec))


def _to_config(spec: SpecModel) -> dict[str, Any]:
    pairs = _pairs(spec)
    cfg = llama.glu_decoder_config(spec, "qwen2", "Qwen2ForCausalLM", pairs, mlp_bias=False)
    cfg.update(use_sliding_window=False)
    return cfg


register(
    Family(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        model_type="qwen2",
        paper="Yang et al., 2024, 'Qwen2 Technical Report'",
        to_spec=_to_spec,
        rules=_rules,
        to_config=_to_config,
        optional_hf=lambda k: k == "lm_head.weight",
        unused_hf=lambda k: k.endswith("rotary_emb.inv_freq"),
    )
)
