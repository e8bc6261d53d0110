"""RWKV-4 (``RwkvForCausalLM``) ⇄ archir (Peng et al., 2023, "RWKV: Reinventing RNNs for
the Transformer Era").

The embedding goes through one extra LayerNorm (``blocks.0.pre_ln``: an archir ``layernorm``
block without residual or pre-norm), then each layer is ``x + time_mix(ln₁(x))``,
``x + channel_mix(ln₂(x))`` (archir's ``rwkv`` and ``rwkv_cmix``, LayerNorm with
``norm_eps = layer_norm_epsilon``), a final LayerNorm and an untied head. ``time_decay``
is archir's ``decay`` (``w = −exp(decay)``), ``time_first`` its ``bonus``, the
``time_mix_* [1, 1, d]`` its ``mu_* [d]``.

``rescale_every`` is an inference-time rescaling transformers applies (weights ÷ 2 every
``rescale_every`` layers, hidden state ÷ 2): the same function up to LayerNorm's epsilon,
so it is read and not reproduced; the parity gate measures the difference.
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
    reshaped,
    spec_params,
)
from archir.spec.models import SpecModel


def _to_spec(cfg: HFConfig) -> dict[str, Any]:
    d = cfg.size("hidden_size")
    att = cfg.size("attention_hidden_size", d)
    if att != d:
        raise cfg.refuse(
            "attention_hidden_size", f"{att} differs from hidden_size {d}; archir's rwkv is d→d"
        )
    eps = cfg.get("layer_norm_epsilon", 1e-5, float)
    if eps != 1e-5:
        raise cfg.refuse(
            "layer_norm_epsilon",
            f"{eps:g}: transformers' RWKV uses it for pre_ln, ln1 and ln2 but 1e-5 for ln_out; "
            "archir's norm_eps sets every norm alike",
            "only layer_norm_epsilon 1e-5 maps exactly",
        )
    cfg.get("rescale_every", 6, int)
    d_ff = cfg.size("intermediate_size", None) or 4 * d
    return lm_spec(
        cfg,
        d_model=d,
        max_seq_len=cfg.size("context_length", 1024, hi=1 << 20),
        norm="layernorm",
        norm_eps=eps,
        layers=[
            {"blocks": [{"kind": "layernorm", "eps": eps, "norm": "none", "residual": False}]},
            {
                "repeat": cfg.size("num_hidden_layers", hi=4096),
                "blocks": [{"kind": "rwkv"}, {"kind": "rwkv_cmix", "d_ff": d_ff}],
            },
        ],
        tie=cfg.get("tie_word_embeddings", False, bool),
    )


def _layers(spec: SpecModel) -> int:
    check_plain_spec(spec, "rwkv", "layernorm")
    m = spec.model
    blocks = spec_params(spec)
    if (
        not blocks
        or blocks[0][0] != "layernorm"
        or blocks[0][2].residual
        or blocks[0][2].norm != "none"
    ):
        raise refuse_spec("rwkv", "it does not start with RWKV's pre_ln (a bare layernorm block)")
    rest = blocks[1:]
    if not rest or len(rest) % 2:
        raise refuse_spec("rwkv", "its blocks do not pair into (rwkv, rwkv_cmix) layers")
    widths = set()
    for i in range(0, len(rest), 2):
        (kt, _, bt), (kc, pc, bc) = rest[i], rest[i + 1]
        if (kt, kc) != ("rwkv", "rwkv_cmix"):
            raise refuse_spec("rwkv", f"layer {i // 2} is ({kt}, {kc}), not (rwkv, rwkv_cmix)")
        if any(b.norm not in (None, "layernorm") or not b.residual or b.bits for b in (bt, bc)):
            raise refuse_spec("rwkv", f"layer {i // 2} has its own norm, residual or bits")
        widths.add((pc.d_ff, pc.expansion, pc.multiple_of))
    if len(widths) != 1:
        raise refuse_spec("rwkv", "its channel-mix widths differ between layers")
    if m.norm_eps not in (None, 1e-5) or blocks[0][1].eps != 1e-5:
        raise refuse_spec("rwkv", "its norms' eps is not 1e-5 (transformers' ln_out is fixed)")
    return len(rest) // 2


def _rules(spec: SpecModel, hf_keys: set[str] | None) -> list[Rule]:
    n = _layers(spec)
    d = spec.model.d_model
    r = "rwkv"
    rules = [
        copy("embed.weight", f"{r}.embeddings.weight"),
        copy("blocks.0.fn.weight", f"{r}.blocks.0.pre_ln.weight"),
        copy("blocks.0.fn.bias", f"{r}.blocks.0.pre_ln.bias"),
        copy("final_norm.weight", f"{r}.ln_out.weight"),
        copy("final_norm.bias", f"{r}.ln_out.bias"),
    ]
    if not spec.model.head.params.tie_embeddings:  # type: ignore[attr-defined]
        rules.append(copy("head.weight", "head.weight"))
    for i in range(n):
        t, c, h = 1 + 2 * i, 2 + 2 * i, f"{r}.blocks.{i}"
        rules += [
            copy(f"blocks.{t}.norm.weight", f"{h}.ln1.weight"),
            copy(f"blocks.{t}.norm.bias", f"{h}.ln1.bias"),
            copy(f"blocks.{c}.norm.weight", f"{h}.ln2.weight"),
            copy(f"blocks.{c}.norm.bias", f"{h}.ln2.bias"),
            copy(f"blocks.{t}.fn.decay", f"{h}.attention.time_decay"),
            copy(f"blocks.{t}.fn.bonus", f"{h}.attention.time_first"),
            reshaped(f"blocks.{t}.fn.mu_k", f"{h}.attention.time_mix_key", (1, 1, d)),
            reshaped(f"blocks.{t}.fn.mu_v", f"{h}.attention.time_mix_value", (1, 1, d)),
            reshaped(f"blocks.{t}.fn.mu_r", f"{h}.attention.time_mix_receptance", (1, 1, d)),
            reshaped(f"blocks.{c}.fn.mu_k", f"{h}.feed_forward.time_mix_key", (1, 1, d)),
            reshaped(f"blocks.{c}.fn.mu_r", f"{h}.feed_forward.time_mix_receptance", (1, 1, d)),
        ]
        for x in ("key", "value", "receptance", "output"):
            rules.append(copy(f"blocks.{t}.fn.{x}.weight", f"{h}.attention.{x}.weight"))
        for x in ("key", "value", "receptance"):
            rules.append(copy(f"blocks.{c}.fn.{x}.weight", f"{h}.feed_forward.{x}.weight"))
    return rules


def _to_config(spec: SpecModel) -> dict[str, Any]:
    from archir.blocks.common import hidden_size

    n = _layers(spec)
    m = spec.model
    pc = spec_params(spec)[2][1]
    if m.head.params.tie_embeddings:  # type: ignore[attr-defined]
        raise refuse_spec("rwkv", "its head is tied (RWKV-4's is not)")
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "attention_hidden_size": m.d_model,
        "intermediate_size": hidden_size(m.d_model, pc.expansion, pc.d_ff, pc.multiple_of),
        "num_hidden_layers": n,
        "context_length": m.max_seq_len,
        "layer_norm_epsilon": m.norm_eps if m.norm_eps is not None else 1e-5,
        "rescale_every": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


register(
    Family(
        name="rwkv",
        architectures=("RwkvForCausalLM",),
        model_type="rwkv",
        paper="Peng et al., 2023, 'RWKV: Reinventing RNNs for the Transformer Era' (RWKV-4)",
        to_spec=_to_spec,
        rules=_rules,
        to_config=_to_config,
    )
)
