"""Mixtral (``MixtralForCausalLM``) ⇄ archir: a Mistral layout whose channel mixer is a
sparse mixture of SwiGLU experts (Jiang et al., 2024, "Mixtral of Experts").

The router is ``softmax(x·W_g)`` over ``num_local_experts``, the top ``num_experts_per_tok``
renormalized — archir's ``moe`` with ``expert_kind: swiglu``, ``normalize_gates: true`` and
``capacity_factor: null`` (Mixtral never drops a token). Expert ``e``'s ``w1`` (gate),
``w3`` (up) and ``w2`` (down) are archir's ``w_in[e] = [w1ᵀ | w3ᵀ]`` and ``w_out[e] = w2ᵀ``;
transformers 5's fused ``gate_up_proj``/``down_proj`` layout is read too.
``router_jitter_noise`` is training-time noise (inert at inference); ``router_aux_loss_coef``
becomes ``aux_loss_weight`` with ``aux_loss_style: mixtral`` (transformers' balancing loss,
pooled over layers). transformers adds it only with ``output_router_logits: true``;
archir always trains with it (set ``aux_loss_weight: 0`` to train without).
"""

from __future__ import annotations

from typing import Any

import torch

from archir.interop import llama
from archir.interop.base import Family, HFConfig, Rule, copy, refuse_spec, register
from archir.spec.models import SpecModel


def _to_spec(cfg: HFConfig) -> dict[str, Any]:
    window = cfg.size("sliding_window", None, hi=1 << 20)
    act = cfg.get("hidden_act", "silu", str)
    if act not in ("silu", "swish"):
        raise cfg.refuse("hidden_act", f"{act!r} experts have no archir kind (swiglu only)")
    cfg.get("router_jitter_noise", 0.0, float)  # training-time noise
    cfg.get("output_router_logits", False, bool)
    moe = {
        "kind": "moe",
        "n_experts": cfg.size("num_local_experts"),
        "top_k": cfg.size("num_experts_per_tok"),
        "d_ff": cfg.size("intermediate_size"),
        "expert_kind": "swiglu",
        "capacity_factor": None,
        "aux_loss_weight": cfg.get("router_aux_loss_coef", 0.001, float),
        "normalize_gates": True,
        "aux_loss_style": "mixtral",
    }
    attn: dict[str, Any] = {"window": window} if window is not None else {}
    return llama.decoder_spec(cfg, "mixtral", attn, moe)


def _pairs(spec: SpecModel) -> list[Any]:
    pairs = llama.decoder_layers(spec, "mixtral", ("moe",))
    pa = pairs[0][0]
    if pa.qkv_bias or pa.out_bias:
        raise refuse_spec("mixtral", "its attention has biases")
    first = pairs[0][1]
    for _, p in pairs:
        if p.expert_kind != "swiglu" or not p.normalize_gates:
            raise refuse_spec(
                "mixtral",
                "its experts are not renormalized top-k SwiGLU",
            )
        if (p.n_experts, p.top_k, p.d_ff, p.expansion) != (
            first.n_experts,
            first.top_k,
            first.d_ff,
            first.expansion,
        ):
            raise refuse_spec("mixtral", "its MoE layers differ from one another")
    return pairs


def _expert_rules(i: int, a: int, p: Any, fused: bool) -> list[Rule]:
    pre = f"model.layers.{i}"
    rules = [
        copy(f"blocks.{a}.norm.weight", f"{pre}.post_attention_layernorm.weight"),
    ]
    if fused:  # transformers 5 in memory: gate_up_proj [E, 2h, d], down_proj [E, d, h]
        rules += [
            copy(f"blocks.{a}.fn.router.weight", f"{pre}.mlp.gate.weight"),
            Rule(
                (f"blocks.{a}.fn.w_in",),
                (f"{pre}.mlp.experts.gate_up_proj",),
                lambda ts: [ts[0].transpose(1, 2).contiguous()],
                lambda ts: [ts[0].transpose(1, 2).contiguous()],
            ),
            Rule(
                (f"blocks.{a}.fn.w_out",),
                (f"{pre}.mlp.experts.down_proj",),
                lambda ts: [ts[0].transpose(1, 2).contiguous()],
                lambda ts: [ts[0].transpose(1, 2).contiguous()],
            ),
        ]
        return rules
    E = p.n_experts
    moe = f"{pre}.block_sparse_moe"
    names = [f"{moe}.experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w3")]

    def w_in_to_archir(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack([torch.cat([ts[2 * e].t(), ts[2 * e + 1].t()], 1) for e in range(E)])]

    def w_in_to_hf(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        w = ts[0]  # [E, d, 2h]
        h = w.shape[-1] // 2
        out = []
        for e in range(E):
            out += [w[e, :, :h].t().contiguous(), w[e, :, h:].t().contiguous()]
        return out

    downs = [f"{moe}.experts.{e}.w2.weight" for e in range(E)]
    rules += [
        copy(f"blocks.{a}.fn.router.weight", f"{moe}.gate.weight"),
        Rule((f"blocks.{a}.fn.w_in",), tuple(names), w_in_to_archir, w_in_to_hf),
        Rule(
            (f"blocks.{a}.fn.w_out",),
            tuple(downs),
            lambda ts: [torch.stack([t.t() for t in ts])],
            lambda ts: [w.t().contiguous() for w in ts[0]],
        ),
    ]
    return rules


def _rules(spec: SpecModel, hf_keys: set[str] | None) -> list[Rule]:
    fused = hf_keys is not None and any(k.endswith("experts.gate_up_proj") for k in hf_keys)
    rules = llama.outer_rules(spec)
    for i, (pa, pm) in enumerate(_pairs(spec)):
        rules += llama.attention_rules(i, 2 * i, pa)
        rules += _expert_rules(i, 2 * i + 1, pm, fused)
    return rules


def _to_config(spec: SpecModel) -> dict[str, Any]:
    from archir.blocks.common import hidden_size

    pairs = _pairs(spec)
    pm = pairs[0][1]
    cfg = llama.decoder_config(spec, "mixtral", "MixtralForCausalLM", pairs)
    cfg.update(
        intermediate_size=hidden_size(spec.model.d_model, pm.expansion, pm.d_ff),
        hidden_act="silu",
        num_local_experts=pm.n_experts,
        num_experts_per_tok=pm.top_k,
        router_aux_loss_coef=pm.aux_loss_weight,
        sliding_window=pairs[0][0].window,
    )
    return cfg


register(
    Family(
        name="mixtral",
        architectures=("MixtralForCausalLM",),
        model_type="mixtral",
        paper="Jiang et al., 2024, 'Mixtral of Experts'",
        to_spec=_to_spec,
        rules=_rules,
        to_config=_to_config,
        optional_hf=lambda k: k == "lm_head.weight",
        unused_hf=lambda k: k.endswith("rotary_emb.inv_freq"),
    )
)
