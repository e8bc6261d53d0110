"""The block options added for the published model families (Hugging Face interop), checked
against the formulas of their papers and reference code, independently of ``transformers``:

* attention ``rope_interleaved`` (adjacent pairs rotated as complex numbers, Su et al., 2021)
  and the rotate-half default (GPT-NeoX), ``rotary_dim`` (partial rotary), ``rope_scaling``
  (``linear`` position interpolation, Chen et al., 2023; ``llama3``, Meta's
  ``apply_scaling``), ``head_dim`` independent of ``d_model / n_heads``, ``out_bias``;
* MLP ``gelu_tanh`` (Hendrycks & Gimpel, 2016, tanh approximation);
* model ``norm_eps``; RMSNorm computing in fp32 under bf16/fp16;
* refusals of invalid values as located spec errors, decoding with a carried state, and the
  ONNX parity gate.
"""

from __future__ import annotations

import cmath
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from archir import registry
from archir.blocks.attention import (
    Attention,
    RopeScaling,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
)
from archir.blocks.norm import RMSNorm
from archir.compiler import compile as compile_spec
from archir.errors import ArchirError, GraphError, SpecError
from archir.hashing import canonical_hash
from archir.registry import BuildContext
from archir.spec import spec_from_dict

D, VOCAB, MAX_LEN = 32, 64, 48


def lm_data(attn: dict[str, Any] | None = None, **model: Any) -> dict[str, Any]:
    """A 2-layer causal LM (attention + MLP) as a spec dict."""
    block = {"kind": "attention", "n_heads": 4, **(attn or {})}
    return {
        "archir": 1,
        "name": "options-probe",
        "model": {
            "task": "causal_lm",
            "vocab_size": VOCAB,
            "d_model": D,
            "max_seq_len": MAX_LEN,
            "embed": {"kind": "token_embedding"},
            "layers": [{"repeat": 2, "blocks": [block, {"kind": "mlp", "expansion": 2}]}],
            "head": {"kind": "lm_head"},
            **model,
        },
    }


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Seeded noise on every parameter (biases start at zero and norms at one otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def attention_module(d: int = D, **params: Any) -> Attention:
    kind = registry.get("attention")
    m = kind.build(kind.params(**params), BuildContext(d_model=d, vocab_size=VOCAB))
    assert isinstance(m, Attention)
    return m


# -- reference rotary embeddings (float64, written from the formulas) ------------------------


def ref_inv_freq(rot_dim: int, base: float) -> list[float]:
    """θ_i = base^(−2i/d), i < d/2."""
    return [base ** (-2.0 * i / rot_dim) for i in range(rot_dim // 2)]


def ref_rope_interleaved(x: torch.Tensor, pos: list[float], freqs: list[float]) -> torch.Tensor:
    """Adjacent pairs as complex numbers ``x₂ᵢ + i·x₂ᵢ₊₁`` times ``e^{i·pos·θᵢ}`` (RoFormer,
    Meta's reference ``apply_rotary_emb``); channels past ``2·len(freqs)`` pass through.
    ``x [..., T, hd]``, any leading axes."""
    out = x.detach().to(torch.float64).clone()
    flat = out.reshape(-1, out.shape[-2], out.shape[-1])
    for row in flat:
        for t, p in enumerate(pos):
            for i, th in enumerate(freqs):
                z = complex(row[t, 2 * i].item(), row[t, 2 * i + 1].item())
                z *= cmath.exp(1j * p * th)
                row[t, 2 * i], row[t, 2 * i + 1] = z.real, z.imag
    return flat.reshape(out.shape)


def ref_rope_half(x: torch.Tensor, pos: list[float], freqs: list[float]) -> torch.Tensor:
    """GPT-NeoX / Hugging Face Llama rotate-half: channel ``i`` pairs with ``i + r/2``
    (``r = 2·len(freqs)``); channels past ``r`` pass through."""
    out = x.detach().to(torch.float64).clone()
    flat = out.reshape(-1, out.shape[-2], out.shape[-1])
    src = flat.clone()
    h = len(freqs)
    for b in range(flat.shape[0]):
        for t, p in enumerate(pos):
            for i, th in enumerate(freqs):
                c, s = math.cos(p * th), math.sin(p * th)
                a, bb = src[b, t, i].item(), src[b, t, i + h].item()
                flat[b, t, i] = a * c - bb * s
                flat[b, t, i + h] = bb * c + a * s
    return flat.reshape(out.shape)


def meta_apply_scaling(
    freqs: list[float], factor: float, low: float, high: float, old_len: int
) -> tuple[list[float], list[str]]:
    """Meta's Llama 3.1 ``apply_scaling`` (llama/model.py), one frequency at a time; also
    which regime each frequency fell in."""
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    out, regimes = [], []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
            regimes.append("high")
        elif wavelen > low_wavelen:
            out.append(f / factor)
            regimes.append("low")
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
            regimes.append("medium")
    return out, regimes


# -- rotary layouts ---------------------------------------------------------------------------


def test_interleaved_rope_is_complex_rotation_of_adjacent_pairs() -> None:
    torch.manual_seed(0)
    B, H, T, hd, base = 2, 3, 7, 8, 10000.0
    x = torch.randn(B, H, T, hd)
    cos, sin = rope_cos_sin(T, hd, base, interleaved=True)
    got = apply_rope(x, cos, sin, interleaved=True)
    want = ref_rope_interleaved(x, list(range(T)), ref_inv_freq(hd, base))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    # position 0 is the identity, and a rotation keeps each pair's norm
    torch.testing.assert_close(got[:, :, 0], x[:, :, 0])
    pair_norm = lambda t: t.unflatten(-1, (hd // 2, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(got), pair_norm(x), rtol=1e-5, atol=1e-6)


def test_rotate_half_default_matches_neox_formula() -> None:
    torch.manual_seed(1)
    B, H, T, hd, base = 2, 2, 9, 16, 500.0
    x = torch.randn(B, H, T, hd)
    cos, sin = rope_cos_sin(T, hd, base)
    got = apply_rope(x, cos, sin)
    want = ref_rope_half(x, list(range(T)), ref_inv_freq(hd, base))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    # the two layouts are different functions (same pairs only up to a permutation)
    ci, si = rope_cos_sin(T, hd, base, interleaved=True)
    assert (apply_rope(x, ci, si, interleaved=True) - got).abs().max() > 1e-2


def test_interleaved_and_rotate_half_are_the_same_rotation_up_to_a_permutation() -> None:
    """Meta's interleaved checkpoints become rotate-half ones by permuting q/k channels
    (the permutation Hugging Face's conversion script applies)."""
    torch.manual_seed(2)
    T, hd = 6, 8
    x = torch.randn(1, 1, T, hd)
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])  # evens, then odds
    ci, si = rope_cos_sin(T, hd, 10000.0, interleaved=True)
    ch, sh = rope_cos_sin(T, hd, 10000.0)
    inter = apply_rope(x, ci, si, interleaved=True)
    half = apply_rope(x[..., perm], ch, sh)
    torch.testing.assert_close(inter[..., perm], half, rtol=0, atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_dim_rotates_only_the_first_channels(interleaved: bool) -> None:
    torch.manual_seed(3)
    T, hd, rd, base = 8, 12, 4, 10000.0
    x = torch.randn(2, 2, T, hd)
    cos, sin = rope_cos_sin(T, rd, base, interleaved=interleaved)
    assert cos.shape == (T, rd)
    got = apply_rope(x, cos, sin, interleaved=interleaved)
    assert torch.equal(got[..., rd:], x[..., rd:])  # untouched, bit for bit
    # the first rd channels rotate exactly as a head of width rd would
    alone = apply_rope(x[..., :rd].contiguous(), cos, sin, interleaved=interleaved)
    torch.testing.assert_close(got[..., :rd], alone, rtol=0, atol=0)
    ref = (ref_rope_interleaved if interleaved else ref_rope_half)(
        x, list(range(T)), ref_inv_freq(rd, base)
    )
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    assert (got[..., :rd] - x[..., :rd]).abs().max() > 1e-2  # and they do rotate


# -- rope scaling -----------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_linear_rope_scaling_is_rope_at_positions_over_factor(interleaved: bool) -> None:
    T, rd, base, factor = 40, 16, 10000.0, 4.0
    sc = RopeScaling(type="linear", factor=factor)
    cos, sin = rope_cos_sin(T, rd, base, scaling=sc, interleaved=interleaved)
    pos = torch.arange(T, dtype=torch.float32) / factor
    cos0, sin0 = rope_cos_sin(pos, rd, base, interleaved=interleaved)
    torch.testing.assert_close(cos, cos0, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin0, rtol=0, atol=1e-6)
    inv = rope_inv_freq(rd, base, sc)
    torch.testing.assert_close(
        inv.double(), torch.tensor(ref_inv_freq(rd, base), dtype=torch.float64) / factor
    )


@pytest.mark.parametrize(
    ("factor", "low", "high", "old_len"),
    [(8.0, 1.0, 4.0, 2048), (32.0, 1.0, 4.0, 8192), (4.0, 2.0, 8.0, 1024)],
)
def test_llama3_rope_scaling_matches_meta_apply_scaling(
    factor: float, low: float, high: float, old_len: int
) -> None:
    rd, base = 128, 500000.0
    sc = RopeScaling(
        type="llama3",
        factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_seq_len=old_len,
    )
    want, regimes = meta_apply_scaling(ref_inv_freq(rd, base), factor, low, high, old_len)
    # the chosen lengths put frequencies in each of the three regimes
    assert {"high", "medium", "low"} <= set(regimes), regimes
    got = rope_inv_freq(rd, base, sc)
    torch.testing.assert_close(
        got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0
    )
    for r in ("high", "medium", "low"):
        idx = [i for i, x in enumerate(regimes) if x == r]
        ref = torch.tensor(ref_inv_freq(rd, base), dtype=torch.float64)[idx]
        if r == "high":  # kept
            torch.testing.assert_close(got[idx].double(), ref, rtol=1e-5, atol=0)
        elif r == "low":  # divided by the factor
            torch.testing.assert_close(got[idx].double(), ref / factor, rtol=1e-5, atol=0)
        else:  # strictly between
            assert bool(((got[idx].double() < ref) & (got[idx].double() > ref / factor)).all())
    # and the tables use these frequencies
    cos, _ = rope_cos_sin(5, rd, base, scaling=sc)
    torch.testing.assert_close(cos[3, : rd // 2], torch.cos(3 * got), rtol=0, atol=1e-6)


# -- head_dim, biases, cost rules -------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"n_heads": 4, "head_dim": 12},
        {"n_heads": 4, "n_kv_heads": 2, "head_dim": 12, "qkv_bias": True},
        {"n_heads": 4, "n_kv_heads": 1, "head_dim": 6, "out_bias": True},
        {"n_heads": 3, "head_dim": 10, "qkv_bias": True, "out_bias": True},  # 3 ∤ 32: fine
        {"n_heads": 4, "qkv_bias": True, "out_bias": True},
    ],
)
def test_head_dim_and_bias_param_counts_and_shapes(params: dict[str, Any]) -> None:
    kind = registry.get("attention")
    p = kind.params(**params)
    ctx = BuildContext(d_model=D, vocab_size=VOCAB)
    kind.check(p, ctx)
    m = kind.build(p, ctx)
    hd = params.get("head_dim", D // params["n_heads"])
    q_dim = params["n_heads"] * hd
    kv_dim = params.get("n_kv_heads", params["n_heads"]) * hd
    assert tuple(m.q.weight.shape) == (q_dim, D)
    assert tuple(m.k.weight.shape) == (kv_dim, D)
    assert tuple(m.v.weight.shape) == (kv_dim, D)
    assert tuple(m.o.weight.shape) == (D, q_dim)
    assert (m.q.bias is not None) == params.get("qkv_bias", False)
    assert (m.k.bias is not None) == params.get("qkv_bias", False)
    assert (m.o.bias is not None) == params.get("out_bias", False)
    if m.o.bias is not None:
        assert tuple(m.o.bias.shape) == (D,)
    real = sum(t.numel() for t in m.parameters())
    assert kind.n_params(p, ctx) == real
    expected = 2 * D * q_dim + 2 * D * kv_dim
    expected += (q_dim + 2 * kv_dim) * params.get("qkv_bias", False)
    expected += D * params.get("out_bias", False)
    assert real == expected
    x = torch.randn(2, 5, D)
    assert m(x).shape == (2, 5, D)


def _math_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Dense attention as plain matmuls (what the FLOPs rule counts; PyTorch's CPU kernel is
    not in the FLOP counter's registry)."""
    T = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    if attn_mask is not None:
        s = s + attn_mask
    return s.softmax(-1) @ v


@pytest.mark.parametrize(
    "params",
    [
        {"n_heads": 4, "head_dim": 12},
        {"n_heads": 4, "n_kv_heads": 2, "head_dim": 6},
        {"n_heads": 4, "head_dim": 12, "window": 4, "qkv_bias": True, "out_bias": True},
    ],
)
def test_attention_flops_rule_counts_q_dim(params: dict[str, Any], monkeypatch) -> None:
    """The FLOPs rule against PyTorch's FLOP counter on the module's forward (projections and
    the dense scores and values; a multiply-add is 2 FLOPs, biases are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    kind = registry.get("attention")
    p = kind.params(**params)
    ctx = BuildContext(d_model=D, vocab_size=VOCAB)
    m = kind.build(p, ctx)
    L = 16
    x = torch.randn(1, L, D)
    with torch.no_grad():
        want = m(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_sdpa)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the same function
    measured_per_token = fc.get_total_flops() / L
    assert kind.flops(p, ctx, L) == pytest.approx(measured_per_token, rel=1e-9)
    # a wider head_dim costs more, at the same d_model and n_heads
    narrow = kind.params(**{**params, "head_dim": 4})
    assert kind.flops(narrow, ctx, L) < kind.flops(p, ctx, L)


def ref_attention(m: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal attention written out from the module's weights, with the float64 reference
    rotary (interleaved or rotate-half, partial, scaled)."""
    B, T, _ = x.shape
    xd = x.double()

    def proj(lin: torch.nn.Linear, n: int) -> torch.Tensor:
        y = xd @ lin.weight.double().t()
        if lin.bias is not None:
            y = y + lin.bias.double()
        return y.view(B, T, n, m.hd).transpose(1, 2)

    q, k, v = proj(m.q, m.n_heads), proj(m.k, m.n_kv), proj(m.v, m.n_kv)
    freqs = [float(f) for f in rope_inv_freq(m.rot, m.base, m.scaling).double()]
    ref = ref_rope_interleaved if m.interleaved else ref_rope_half
    q, k = ref(q, list(range(T)), freqs), ref(k, list(range(T)), freqs)
    rep = m.n_heads // m.n_kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(m.hd)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    y = y @ m.o.weight.double().t()
    return y + m.o.bias.double() if m.o.bias is not None else y


@pytest.mark.parametrize("interleaved", [False, True])
def test_attention_block_with_every_option_matches_written_out_reference(
    interleaved: bool,
) -> None:
    m = attention_module(
        n_heads=4,
        n_kv_heads=2,
        head_dim=12,
        rotary_dim=8,
        rope_interleaved=interleaved,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_seq_len": 32,
        },
        rope_base=100.0,
        qkv_bias=True,
        out_bias=True,
    ).eval()
    perturb(m, seed=4)
    # the rotary frequencies really span the three llama3 regimes at these sizes
    _, regimes = meta_apply_scaling(ref_inv_freq(8, 100.0), 8.0, 1.0, 4.0, 32)
    assert set(regimes) == {"high", "medium", "low"}
    x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = m(x)
    torch.testing.assert_close(got.double(), ref_attention(m, x), rtol=0, atol=1e-5)


# -- decoding with a carried state ------------------------------------------------------------


@pytest.mark.parametrize(
    "attn",
    [
        {
            "n_kv_heads": 2,
            "head_dim": 12,
            "rotary_dim": 6,
            "rope_interleaved": True,
            "rope_scaling": {
                "type": "llama3",
                "factor": 4.0,
                "original_max_seq_len": 16,
            },
            "qkv_bias": True,
            "out_bias": True,
        },
        {
            "head_dim": 10,
            "rotary_dim": 4,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "window": 5,
            "out_bias": True,
        },
    ],
    ids=["interleaved-llama3-gqa", "half-linear-window"],
)
def test_decode_step_agrees_with_forward(attn: dict[str, Any]) -> None:
    spec = spec_from_dict(lm_data(attn, norm_eps=1e-6))
    model = compile_spec(spec, seed=0).eval()
    perturb(model, seed=6, scale=0.05)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(tokens)
        state = model.init_state(tokens.shape[0])
        steps = []
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state)
            steps.append(logits)
    stepped = torch.stack(steps, dim=1)
    scale = max(1.0, full.abs().max().item())
    assert (stepped - full).abs().max().item() <= 1e-4 * scale


# -- gelu_tanh ----------------------------------------------------------------------------------


def test_gelu_tanh_mlp_is_the_tanh_approximation() -> None:
    kind = registry.get("mlp")
    p = kind.params(activation="gelu_tanh", expansion=2, bias=True)
    m = kind.build(p, BuildContext(d_model=D, vocab_size=VOCAB)).eval()
    perturb(m, seed=8)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(9)) * 3
    h = (x.double() @ m.fc1.weight.double().t()) + m.fc1.bias.double()
    act = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    want = act @ m.fc2.weight.double().t() + m.fc2.bias.double()
    with torch.no_grad():
        got = m(x)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # and not the exact (erf) GELU
    exact = F.gelu(h) @ m.fc2.weight.double().t() + m.fc2.bias.double()
    assert (exact - want).abs().max() > 1e-4


# -- norm_eps -----------------------------------------------------------------------------------


def _norm_eps(model: torch.nn.Module) -> list[float]:
    out = []
    for mod in model.modules():
        if isinstance(mod, RMSNorm):
            out.append(mod.eps)
        elif isinstance(mod, torch.nn.LayerNorm):
            out.append(mod.eps)
    return out


def test_norm_eps_reaches_every_block_norm_and_the_final_norm() -> None:
    data = lm_data()
    # one block with its own norm kind: the model's eps applies to it too
    data["model"]["layers"][0]["blocks"][1]["norm"] = "layernorm"
    data["model"]["norm_eps"] = 1e-6
    model = compile_spec(spec_from_dict(data), seed=0)
    eps = _norm_eps(model)
    assert len(eps) == 2 * 2 + 1  # 2 layers × (attention, mlp) + final
    assert eps == [1e-6] * len(eps)
    assert isinstance(model.final_norm, RMSNorm) and model.final_norm.eps == 1e-6
    n_ln = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert n_ln == 2

    data["model"].pop("norm_eps")
    default = compile_spec(spec_from_dict(data), seed=0)
    assert _norm_eps(default) == [1e-5] * len(eps)


def test_norm_eps_changes_the_function() -> None:
    x = torch.full((1, 4, D), 1e-3)
    a, b = RMSNorm(D, 1e-6), RMSNorm(D, 1e-2)
    assert (a(x) - b(x)).abs().max() > 1e-2


def test_norm_eps_in_the_canonical_hash() -> None:
    base = lm_data()
    h_none = canonical_hash(spec_from_dict(base))
    h6 = canonical_hash(spec_from_dict(lm_data(norm_eps=1e-6)))
    h5 = canonical_hash(spec_from_dict(lm_data(norm_eps=1e-5)))
    h4 = canonical_hash(spec_from_dict(lm_data(norm_eps=1e-4)))
    assert len({h6, h5, h4}) == 3
    assert h_none not in (h6, h4)
    # a spec that does not mention norm_eps hashes like the same dict without the key
    d = lm_data(norm_eps=1e-6)
    d["model"].pop("norm_eps")
    assert canonical_hash(spec_from_dict(d)) == h_none


#: canonical hashes of two specs that do not use any new option, computed with the code
#: before the interop options were added (``git archive HEAD archir``, the commit this work
#: starts from). The hash is what searches deduplicate and journals record: a spec that does
#: not use the new options must keep its hash.
_PRE_INTEROP_HASHES = {
    "mlp-only": "fb33d42eb01f9af41d8f4be6917de9cb772a325ad1ec2a0e501d0653647350f1",
    "attention": "a560ca18dd3b14a1e2a9c872fb430e3283ae78140dc77cc148c23b77148484cb",
}


def _hash_probe(blocks: list[dict[str, Any]]) -> str:
    data = {
        "archir": 1,
        "name": "eps-probe",
        "model": {
            "task": "causal_lm",
            "vocab_size": 64,
            "d_model": 32,
            "max_seq_len": 48,
            "embed": {"kind": "token_embedding"},
            "layers": [{"repeat": 2, "blocks": blocks}],
            "head": {"kind": "lm_head"},
        },
    }
    return canonical_hash(spec_from_dict(data))


def test_spec_without_new_options_keeps_its_pre_interop_hash_mlp() -> None:
    blocks = [{"kind": "mlp", "expansion": 2, "norm": "layernorm"}]
    assert _hash_probe(blocks) == _PRE_INTEROP_HASHES["mlp-only"]


def test_spec_without_new_options_keeps_its_pre_interop_hash_attention() -> None:
    # Regression (was a bug in archir/ir.py graph_summary + archir/blocks/attention.py): the new attention fields
    # (out_bias, head_dim, rotary_dim, rope_interleaved, rope_scaling) enter every attention
    # node's model_dump() with their defaults, so the canonical hash of EVERY spec with an
    # attention block changed, although it uses none of them (hashing.py promises, for
    # norm_eps, that "hashes of earlier studies stay the same"). Expected: defaults of the
    # new fields left out of the hashed params, so this pinned hash holds.
    assert _hash_probe([{"kind": "attention", "n_heads": 4}]) == _PRE_INTEROP_HASHES["attention"]


# -- RMSNorm in reduced precision ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_computes_in_fp32_under_half_precision(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(10)
    norm = RMSNorm(256, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(256, generator=g))
    norm = norm.to(dtype)
    # large values with a spread: squaring and averaging in half precision loses digits
    x = (torch.randn(8, 256, generator=g) * 40 + 100).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    want = h.to(dtype) * norm.weight  # Llama's reference: normalize in fp32, cast, gain
    assert torch.equal(got, want)
    # within half-precision rounding of the fp32 computation with fp32 gain
    full = h * norm.weight.float()
    torch.testing.assert_close(got.float(), full, rtol=2e-2, atol=1e-2)
    # and closer to it than computing the normalization in half precision
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert (got.float() - full).abs().mean() <= (naive.float() - full).abs().mean()


def test_rmsnorm_fp32_path_unchanged() -> None:
    norm = RMSNorm(D, eps=1e-5)
    x = torch.randn(3, D)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.equal(norm(x), want)


# -- refusals -----------------------------------------------------------------------------------


def _refused(data: dict[str, Any]) -> ArchirError:
    with pytest.raises((SpecError, GraphError)) as info:
        compile_spec(spec_from_dict(data))
    return info.value


@pytest.mark.parametrize(
    ("attn", "model", "field", "words"),
    [
        ({"rotary_dim": 3}, {}, "model.layers.0.blocks.0", "even rotary_dim"),
        ({"rotary_dim": 10}, {}, "model.layers.0.blocks.0.rotary_dim", "at most head_dim 8"),
        ({"head_dim": 6, "rotary_dim": 8}, {}, "rotary_dim", "at most head_dim 6"),
        ({"rotary_dim": 4, "pos": "alibi"}, {}, "model.layers.0.blocks.0.rotary_dim", "rope"),
        ({"rotary_dim": 4, "pos": "none"}, {}, "model.layers.0.blocks.0.rotary_dim", "rope"),
        ({"head_dim": 5}, {}, "model.layers.0.blocks.0", "even head_dim"),
        ({"head_dim": 0}, {}, "model.layers.0.blocks.0.head_dim", ""),
        (
            {"rope_scaling": {"type": "yarn", "factor": 4.0}},
            {},
            "model.layers.0.blocks.0.rope_scaling.type",
            "yarn",
        ),
        ({"rope_scaling": {"type": "linear"}}, {}, "rope_scaling.factor", ""),
        ({"rope_scaling": {"type": "linear", "factor": 0}}, {}, "rope_scaling.factor", ""),
        (
            {"rope_scaling": {"type": "linear", "factor": 2.0, "beta": 1}},
            {},
            "rope_scaling",
            "beta",
        ),
        ({"out_bias": "maybe"}, {}, "model.layers.0.blocks.0.out_bias", ""),
        ({}, {"norm_eps": 0}, "model.norm_eps", ""),
        ({}, {"norm_eps": -1e-6}, "model.norm_eps", ""),
        ({}, {"norm_eps": 1.5}, "model.norm_eps", ""),
    ],
)
def test_invalid_options_are_located_spec_errors(
    attn: dict[str, Any], model: dict[str, Any], field: str, words: str
) -> None:
    err = _refused(lm_data(attn, **model))
    assert err.location is not None and err.location.field is not None
    assert field in err.location.field, (err.location.field, str(err))
    assert words in str(err)


def test_invalid_option_exits_2_from_the_cli(tmp_path, capsys) -> None:
    import yaml

    from archir.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(lm_data({"rope_scaling": {"type": "yarn", "factor": 2.0}})))
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "rope_scaling" in err and str(p) in err


# -- ONNX ---------------------------------------------------------------------------------------


def test_onnx_export_of_the_new_options_passes_the_parity_gate(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from exporters import export_onnx

    spec = spec_from_dict(
        lm_data(
            {
                "n_kv_heads": 2,
                "head_dim": 12,
                "rotary_dim": 8,
                "rope_interleaved": True,
                "rope_scaling": {"type": "llama3", "factor": 4.0, "original_max_seq_len": 16},
                "qkv_bias": True,
                "out_bias": True,
            },
            norm_eps=1e-6,
        )
    )
    model = compile_spec(spec, seed=0).eval()
    perturb(model, seed=11, scale=0.05)
    out = tmp_path / "opts.onnx"
    # Regression (was a bug in archir/blocks/attention.py rope_cos_sin): under the legacy (TorchScript) exporter
    # ``x.shape[1]`` is a 0-dim tensor, not an int, so ``rope_cos_sin(T, ...)`` takes it for a
    # positions tensor and indexes it (``positions[:, None]``): "IndexError: too many indices
    # for tensor of dimension 0". Every RoPE model fails --exporter legacy (and the decode /
    # auto fallback paths that use it); before this change the same spec without the new
    # options exported with legacy in ~2 s. Expected: a traced size is treated like an int.
    report = export_onnx(spec, out, model=model, task="random", exporter="legacy", quality=False)
    assert report.parity is not None and report.parity.passed, str(report)
    assert out.is_file()
