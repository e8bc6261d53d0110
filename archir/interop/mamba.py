"""Mamba (``MambaForCausalLM``) ⇄ archir (Gu & Dao, 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces").

Each layer is ``x + mixer(rmsnorm(x))`` with no channel mixer: one archir ``mamba`` block
per layer (``d_state = state_size``, ``d_conv = conv_kernel``, ``expansion =
intermediate_size / hidden_size``, ``dt_rank = time_step_rank``, ``conv_bias =
use_conv_bias``), final RMSNorm, LM head (tied by default). The tensors keep their names
and layouts (``in_proj``, ``conv1d`` -> ``conv``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``).

archir's scan is exact for any per-step log-decay ``Δ·A`` (no clamp), so trained
checkpoints, whose ``Δ·A`` reach far below −4, import with parity.
"""

from __future__ import annotations

from typing import Any

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
)
from archir.spec.models import SpecModel


def _to_spec(cfg: HFConfig) -> dict[str, Any]:
    d = cfg.size("hidden_size")
    di = cfg.size("intermediate_size", None) or d * cfg.size("expand", 2)
    cfg.get("expand", None, int)
    expansion = di / d
    if int(round(expansion * d)) != di:  # pragma: no cover - exact for any int ratio
        raise cfg.refuse("intermediate_size", f"{di} is not a multiple archir can express")
    cfg.expect("hidden_act", ["silu"], "silu", "another activation in the mixer")
    if cfg.get("use_bias", False, bool):
        raise cfg.refuse("use_bias", "biases on in_proj/out_proj have no archir mapping")
    rank = cfg.data.get("time_step_rank", "auto")
    cfg.read.add("time_step_rank")
    if rank == "auto":
        rank = -(-d // 16)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise cfg.refuse("time_step_rank", f"{rank!r} is not a positive integer or 'auto'")
    for k in (
        "residual_in_fp32",
        "use_mambapy",
        "use_associative_scan",
        "rescale_prenorm_residual",
    ):
        cfg.get(k, None, bool)  # numerics/implementation switches (fp32 here anyway)
    for k in ("time_step_min", "time_step_max", "time_step_floor", "time_step_scale"):
        cfg.get(k, None, float)  # initialization only
    cfg.get("time_step_init_scheme", None, str)
    block: dict[str, Any] = {
        "kind": "mamba",
        "d_state": cfg.size("state_size", 16),
        "d_conv": cfg.size("conv_kernel", 4, hi=1024),
        "expansion": expansion,
        "dt_rank": rank,
        "conv_bias": cfg.get("use_conv_bias", True, bool),
    }
    return lm_spec(
        cfg,
        d_model=d,
        max_seq_len=1 << 20,
        norm="rmsnorm",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5, float),
        layers=[{"repeat": cfg.size("num_hidden_layers", hi=4096), "blocks": [block]}],
        tie=cfg.get("tie_word_embeddings", True, bool),
    )


def _layers(spec: SpecModel) -> list[Any]:
    check_plain_spec(spec, "mamba", "rmsnorm")
    blocks = spec_params(spec)
    if not blocks or any(k != "mamba" for k, _, _ in blocks):
        raise refuse_spec("mamba", "not every block is a mamba block")
    if any(b.norm not in (None, "rmsnorm") or not b.residual or b.bits for _, _, b in blocks):
        raise refuse_spec("mamba", "a block has its own norm, residual or bits")
    first = blocks[0][1]
    if any(p != first for _, p, _ in blocks):
        raise refuse_spec("mamba", "its mamba blocks differ from one another")
    return [p for _, p, _ in blocks]


_TENSORS = (
    ("A_log", "A_log"),
    ("D", "D"),
    ("in_proj.weight", "in_proj.weight"),
    ("conv.weight", "conv1d.weight"),
    ("x_proj.weight", "x_proj.weight"),
    ("dt_proj.weight", "dt_proj.weight"),
    ("dt_proj.bias", "dt_proj.bias"),
    ("out_proj.weight", "out_proj.weight"),
)


def _rules(spec: SpecModel, hf_keys: set[str] | None) -> list[Rule]:
    layers = _layers(spec)
    rules = [
        copy("embed.weight", "backbone.embeddings.weight"),
        copy("final_norm.weight", "backbone.norm_f.weight"),
    ]
    if not spec.model.head.params.tie_embeddings:  # type: ignore[attr-defined]
        rules.append(copy("head.weight", "lm_head.weight"))
    for i, p in enumerate(layers):
        h = f"backbone.layers.{i}"
        rules.append(copy(f"blocks.{i}.norm.weight", f"{h}.norm.weight"))
        for ours, theirs in _TENSORS:
            rules.append(copy(f"blocks.{i}.fn.{ours}", f"{h}.mixer.{theirs}"))
        if p.conv_bias:
            rules.append(copy(f"blocks.{i}.fn.conv.bias", f"{h}.mixer.conv1d.bias"))
    return rules


def _to_config(spec: SpecModel) -> dict[str, Any]:
    import math

    layers = _layers(spec)
    m = spec.model
    p = layers[0]
    di = int(round(p.expansion * m.d_model))
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": di,
        "expand": max(1, di // m.d_model),
        "state_size": p.d_state,
        "conv_kernel": p.d_conv,
        "time_step_rank": p.dt_rank or math.ceil(m.d_model / 16),
        "num_hidden_layers": len(layers),
        "layer_norm_epsilon": m.norm_eps if m.norm_eps is not None else 1e-5,
        "use_bias": False,
        "use_conv_bias": p.conv_bias,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "tie_word_embeddings": bool(m.head.params.tie_embeddings),  # type: ignore[attr-defined]
        "torch_dtype": "float32",
    }


register(
    Family(
        name="mamba",
        architectures=("MambaForCausalLM",),
        model_type="mamba",
        paper="Gu & Dao, 2023, 'Mamba: Linear-Time Sequence Modeling with Selective State Spaces'",
        to_spec=_to_spec,
        rules=_rules,
        to_config=_to_config,
        optional_hf=lambda k: k == "lm_head.weight",
    )
)
