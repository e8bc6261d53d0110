"""Llama (``LlamaForCausalLM``) ⇄ archir, and what the Llama-shaped families share
(Mistral, Qwen2, Mixtral reuse :func:`decoder_spec`, :func:`attention_rules` and
:func:`decoder_config`).

Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language Models"; Llama 3
(Grattafiori et al., 2024) for ``rope_scaling: llama3``.

A Llama layer is ``x + attn(rmsnorm(x))`` then ``x + swiglu(rmsnorm(x))``: archir's
``attention`` (RoPE in the rotate-half layout Hugging Face stores, grouped-query heads)
and ``swiglu`` blocks, pre-norm, ``norm_eps = rms_norm_eps``; a final RMSNorm and an LM
head (tied when ``tie_word_embeddings``).
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
from archir.spec.sections import MAX_SEQ_LEN

#: Hugging Face ``hidden_act`` -> archir GLU kind
GLU_KINDS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def rope(cfg: HFConfig) -> dict[str, Any]:
    """``rope_base`` and ``rope_scaling`` of the attention block, from either layout of the
    config (``rope_theta`` + ``rope_scaling`` before transformers 5, ``rope_parameters``
    after).

    Raises:
        InteropError: a scaling type archir does not implement (yarn, dynamic, longrope ...).
    """
    out: dict[str, Any] = {}
    params = cfg.get("rope_parameters", None, dict)
    scaling = cfg.get("rope_scaling", None, dict)
    key = "rope_parameters" if params is not None else "rope_scaling"
    theta = cfg.get("rope_theta", None, float)
    src = dict(params or scaling or {})
    if "rope_theta" in src:
        theta = src.pop("rope_theta")
    out["rope_base"] = float(theta if theta is not None else 10000.0)
    rtype = src.pop("rope_type", src.pop("type", "default"))
    if rtype == "default":
        return out
    if rtype not in ("linear", "llama3"):
        raise cfg.refuse(
            key,
            f"rope type {rtype!r} has no archir equivalent",
            "archir implements default, linear and llama3 rotary scaling",
        )
    sc: dict[str, Any] = {"type": rtype, "factor": float(src.pop("factor", 1.0))}
    if rtype == "llama3":
        sc["low_freq_factor"] = float(src.pop("low_freq_factor", 1.0))
        sc["high_freq_factor"] = float(src.pop("high_freq_factor", 4.0))
        sc["original_max_seq_len"] = int(src.pop("original_max_position_embeddings", 8192))
    if src:
        raise cfg.refuse(key, f"rope fields {sorted(src)} have no archir equivalent")
    out["rope_scaling"] = sc
    return out


def decoder_spec(
    cfg: HFConfig,
    family: str,
    attention: dict[str, Any],
    channel: dict[str, Any],
    norm_eps_key: str = "rms_norm_eps",
) -> dict[str, Any]:
    """The spec of a Llama-shaped decoder: ``num_hidden_layers`` × (attention, channel
    mixer), pre-norm RMSNorm, final RMSNorm, LM head."""
    d = cfg.size("hidden_size")
    n_heads = cfg.size("num_attention_heads")
    n_kv = cfg.size("num_key_value_heads", n_heads)
    head_dim = cfg.size("head_dim", None)
    attn: dict[str, Any] = {"kind": "attention", "n_heads": n_heads, "pos": "rope"}
    if n_kv != n_heads:
        attn["n_kv_heads"] = n_kv
    if head_dim is not None and head_dim * n_heads != d:
        attn["head_dim"] = head_dim
    attn.update(rope(cfg))
    attn.update(attention)
    return lm_spec(
        cfg,
        d_model=d,
        max_seq_len=min(cfg.size("max_position_embeddings", 2048), MAX_SEQ_LEN),
        norm="rmsnorm",
        norm_eps=cfg.get(norm_eps_key, 1e-6, float),
        layers=[{"repeat": cfg.size("num_hidden_layers", hi=4096), "blocks": [attn, channel]}],
        tie=cfg.get("tie_word_embeddings", False, bool),
    )


def glu(cfg: HFConfig, bias: bool = False) -> dict[str, Any]:
    act = cfg.get("hidden_act", "silu", str)
    if act not in GLU_KINDS:
        raise cfg.refuse(
            "hidden_act",
            f"{act!r} gated MLPs have no archir kind",
            "archir has swiglu (silu) and geglu (exact gelu)",
        )
    out = {"kind": GLU_KINDS[act], "d_ff": cfg.size("intermediate_size")}
    if bias:
        out["bias"] = True
    return out


def attention_rules(i: int, a: int, p: Any, prefix: str = "model.layers") -> list[Rule]:
    """Attention block ``blocks.{a}`` = Hugging Face layer ``i``'s ``self_attn`` and
    ``input_layernorm`` (biases where the block has them)."""
    hf = f"{prefix}.{i}.self_attn"
    rules = [copy(f"blocks.{a}.norm.weight", f"{prefix}.{i}.input_layernorm.weight")]
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        rules.append(copy(f"blocks.{a}.fn.{ours}.weight", f"{hf}.{theirs}.weight"))
        has_bias = p.out_bias if ours == "o" else p.qkv_bias
        if has_bias:
            rules.append(copy(f"blocks.{a}.fn.{ours}.bias", f"{hf}.{theirs}.bias"))
    return rules


def glu_rules(i: int, a: int, bias: bool = False, prefix: str = "model.layers") -> list[Rule]:
    rules = [copy(f"blocks.{a}.norm.weight", f"{prefix}.{i}.post_attention_layernorm.weight")]
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        rules.append(copy(f"blocks.{a}.fn.{ours}.weight", f"{prefix}.{i}.mlp.{theirs}.weight"))
        if bias:
            rules.append(copy(f"blocks.{a}.fn.{ours}.bias", f"{prefix}.{i}.mlp.{theirs}.bias"))
    return rules


def outer_rules(spec: SpecModel) -> list[Rule]:
    rules = [
        copy("embed.weight", "model.embed_tokens.weight"),
        copy("final_norm.weight", "model.norm.weight"),
    ]
    if not spec.model.head.params.tie_embeddings:  # type: ignore[attr-defined]
        rules.append(copy("head.weight", "lm_head.weight"))
    return rules


def decoder_layers(spec: SpecModel, family: str, channel_kinds: tuple[str, ...]) -> list[Any]:
    """The (attention, channel mixer) pairs of a Llama-shaped spec, checked.

    Raises:
        InteropError: the spec is not ``n`` × (attention, channel mixer of ``channel_kinds``)
            with RMSNorm and a causal RoPE attention.
    """
    check_plain_spec(spec, family, "rmsnorm")
    blocks = spec_params(spec)
    if len(blocks) % 2:
        raise refuse_spec(family, "its blocks do not pair into (attention, mlp) layers")
    pairs = []
    for i in range(0, len(blocks), 2):
        (ka, pa, ba), (kc, pc, bc) = blocks[i], blocks[i + 1]
        if ka != "attention" or kc not in channel_kinds:
            raise refuse_spec(
                family,
                f"layer {i // 2} is ({ka}, {kc}), not (attention, {'|'.join(channel_kinds)})",
            )
        for b in (ba, bc):
            if b.norm not in (None, "rmsnorm") or not b.residual or b.bits is not None:
                raise refuse_spec(family, f"layer {i // 2} has its own norm, residual or bits")
        if pa.pos != "rope" or pa.causal is False or pa.rope_interleaved or pa.rotary_dim:
            raise refuse_spec(family, f"layer {i // 2}'s attention is not causal full-width RoPE")
        pairs.append((pa, pc))
    first = pairs[0][0]
    for pa, _ in pairs[1:]:
        if pa != first:
            raise refuse_spec(family, "its attention layers differ from one another")
    return pairs


def decoder_config(spec: SpecModel, family: str, arch: str, pairs: list[Any]) -> dict[str, Any]:
    """The config fields a Llama-shaped decoder shares."""
    m = spec.model
    pa = pairs[0][0]
    d = m.d_model
    hd = pa.head_dim or d // pa.n_heads
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": pa.rope_base}
    if pa.rope_scaling is not None:
        sc = pa.rope_scaling
        rope = {"rope_type": sc.type, "rope_theta": pa.rope_base, "factor": sc.factor}
        if sc.type == "llama3":
            rope.update(
                low_freq_factor=sc.low_freq_factor,
                high_freq_factor=sc.high_freq_factor,
                original_max_position_embeddings=sc.original_max_seq_len,
            )
    return {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": d,
        "num_hidden_layers": len(pairs),
        "num_attention_heads": pa.n_heads,
        "num_key_value_heads": pa.n_kv_heads or pa.n_heads,
        "head_dim": hd,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps if m.norm_eps is not None else 1e-5,
        "rope_theta": pa.rope_base,
        "rope_scaling": None if pa.rope_scaling is None else rope,
        "rope_parameters": rope,
        "tie_word_embeddings": bool(m.head.params.tie_embeddings),  # type: ignore[attr-defined]
        "torch_dtype": "float32",
    }


def uniform_glu(spec: SpecModel, family: str, pairs: list[Any]) -> dict[str, Any]:
    """``intermediate_size``, ``hidden_act`` and ``mlp_bias`` of GLU layers that agree.

    Raises:
        InteropError: the layers' GLU kinds, widths or biases differ.
    """
    from archir.blocks.common import hidden_size

    kinds = {k for k, _, _ in spec_params(spec)[1::2]}
    widths = {hidden_size(spec.model.d_model, p.expansion, p.d_ff, p.multiple_of) for _, p in pairs}
    biases = {p.bias for _, p in pairs}
    if len(kinds) != 1 or len(widths) != 1 or len(biases) != 1:
        raise refuse_spec(family, "its MLP layers differ in kind, width or bias")
    return {
        "intermediate_size": widths.pop(),
        "hidden_act": "silu" if kinds == {"swiglu"} else "gelu",
        "mlp_bias": biases.pop(),
    }


def glu_decoder_rules(spec: SpecModel, pairs: list[Any]) -> list[Rule]:
    """The tensor rules of (attention, GLU) layers (Llama, Mistral, Qwen2)."""
    rules = outer_rules(spec)
    for i, (pa, pc) in enumerate(pairs):
        rules += attention_rules(i, 2 * i, pa)
        rules += glu_rules(i, 2 * i + 1, pc.bias)
    return rules


def glu_decoder_config(
    spec: SpecModel, family: str, arch: str, pairs: list[Any], mlp_bias: bool = True
) -> dict[str, Any]:
    """The config of (attention, GLU) layers; ``mlp_bias``: the family has that field."""
    cfg = decoder_config(spec, family, arch, pairs)
    glu_fields = uniform_glu(spec, family, pairs)
    if not mlp_bias:
        del glu_fields["mlp_bias"]
    cfg.update(glu_fields)
    return cfg


# -- Llama ------------------------------------------------------------------------------


def _to_spec(cfg: HFConfig) -> dict[str, Any]:
    bias = cfg.get("attention_bias", False, bool)
    mlp_bias = cfg.get("mlp_bias", False, bool)
    return decoder_spec(cfg, "llama", {"qkv_bias": bias, "out_bias": bias}, glu(cfg, mlp_bias))


def _pairs(spec: SpecModel) -> list[Any]:
    pairs = decoder_layers(spec, "llama", ("swiglu", "geglu"))
    pa = pairs[0][0]
    if pa.window is not None:
        raise refuse_spec("llama", "its attention has a sliding window (that is Mistral)")
    if pa.qkv_bias != pa.out_bias:
        raise refuse_spec("llama", "q/k/v and output biases differ (Llama has both or neither)")
    return pairs


def _rules(spec: SpecModel, hf_keys: set[str] | None) -> list[Rule]:
    return glu_decoder_rules(spec, _pairs(spec))


def _to_config(spec: SpecModel) -> dict[str, Any]:
    pairs = _pairs(spec)
    cfg = glu_decoder_config(spec, "llama", "LlamaForCausalLM", pairs)
    cfg["attention_bias"] = pairs[0][0].qkv_bias
    return cfg


register(
    Family(
        name="llama",
        architectures=("LlamaForCausalLM",),
        model_type="llama",
        paper="Touvron et al., 2023, 'LLaMA'; Grattafiori et al., 2024, 'The Llama 3 Herd of Models'",
        to_spec=_to_spec,
        rules=_rules,
        to_config=_to_config,
        optional_hf=lambda k: k == "lm_head.weight",
        unused_hf=lambda k: k.endswith("rotary_emb.inv_freq"),
    )
)
