"""RetNet (kind ``retnet``, Sun et al. 2023) with ``convention: torchscale`` against
microsoft/torchscale's equations (``MultiScaleRetention`` and ``RetNetRelPos``), written here:
rotary angles ``1/10000^linspace(0, 1, hk/2)`` rotated "every two", the decay matrix divided
by the square root of its row sum, the recurrent form's ``scale`` update, RMSNorm without
weights, swish gate. ``forward`` and ``step`` both equal torchscale's recurrent form (fp64,
1e-10); its parallel form, which also divides score rows by ``clamp(Σ|·|, 1, 5e4)``, differs
only through the RMSNorm's eps; parameter count against the module; the default (``fla``) hash unchanged; a
located error for a bad value; one ONNX export of the torchscale option.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from archir import registry
from archir.blocks.recurrent import RetNet, RetNetParams, torchscale_angles
from archir.registry import BuildContext
from tests.block_util import assert_located_param_error, run_steps

D, H = 16, 2


def _build(d: int = D, **params: Any) -> tuple[RetNet, RetNetParams]:
    kind = registry.get("retnet")
    p = kind.params(**{"n_heads": H, "convention": "torchscale", **params})
    kind.check(p, BuildContext(d_model=d))
    torch.manual_seed(0)
    m = kind.build(p, BuildContext(d_model=d))
    assert isinstance(m, RetNet)
    return m, p


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _heads_qkvg(m: RetNet, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """torchscale's projections, scaling and theta shift: ``qr, kr [B, H, T, hk]``,
    ``v [B, T, dv]``, ``g [B, T, dv]``."""
    B, T, _ = x.shape
    hk = m.hk
    q, k = x @ m.q.weight.T, (x @ m.k.weight.T) * hk**-0.5
    q = q.view(B, T, m.h, hk).transpose(1, 2)
    k = k.view(B, T, m.h, hk).transpose(1, 2)
    angle = m.angle  # RetNetRelPos.angle (checked against the formula below)
    index = torch.arange(T, dtype=x.dtype)
    sin, cos = torch.sin(index[:, None] * angle), torch.cos(index[:, None] * angle)
    qr = q * cos + _rotate_every_two(q) * sin
    kr = k * cos + _rotate_every_two(k) * sin
    return qr, kr, x @ m.v.weight.T, x @ m.g.weight.T


def _finish(m: RetNet, o: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """``o [B, T, H, hv]``: RMSNorm (no weight), swish gate, out_proj."""
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    return (F.silu(g) * o.flatten(-2)) @ m.o.weight.T


def _torchscale_parallel(m: RetNet, x: torch.Tensor, eps: float) -> torch.Tensor:
    B, T, _ = x.shape
    qr, kr, v, g = _heads_qkvg(m, x)
    decay = m.log_gamma.to(x.dtype)  # log(1 - 2^(-5-h))
    index = torch.arange(T, dtype=x.dtype)
    mask = torch.tril(torch.ones(T, T, dtype=x.dtype))
    mask = torch.masked_fill(index[:, None] - index[None, :], ~mask.bool(), float("inf"))
    mask = torch.nan_to_num(torch.exp(mask * decay[:, None, None]))
    mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
    vr = v.view(B, T, m.h, m.hv).transpose(1, 2)
    qk = (qr @ kr.transpose(-1, -2)) * mask
    qk = qk / qk.abs().sum(dim=-1, keepdim=True).clamp(min=1, max=5e4)
    return _finish(m, (qk @ vr).transpose(1, 2), g, eps)


def _torchscale_recurrent(m: RetNet, x: torch.Tensor, eps: float) -> torch.Tensor:
    """torchscale's incremental form: ``scale ← scale·γ + 1``, ``kv ← kv·sqrt(scale_prev)·γ /
    sqrt(scale) + k vᵀ / sqrt(scale)``, ``o = Σ_i qr_i kv_i``."""
    B, T, _ = x.shape
    qr, kr, v, g = _heads_qkvg(m, x)
    gamma = m.log_gamma.to(x.dtype).exp().view(m.h, 1, 1)
    kv = scale = None
    outs = []
    for t in range(T):
        new = kr[:, :, t, :, None] * v[:, t].view(B, m.h, 1, m.hv)
        if kv is None or scale is None:
            kv, scale = new, torch.ones_like(gamma)
        else:
            prev = scale
            scale = prev * gamma + 1
            kv = kv * (prev.sqrt() * gamma / scale.sqrt()) + new / scale.sqrt()
        outs.append((qr[:, :, t, :, None] * kv).sum(2))  # [B, H, hv]
    return _finish(m, torch.stack(outs, 1), g, eps)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _torchscale_model(gain: float, eps: float = 1e-6, **params: Any) -> RetNet:
    m, _ = _build(eps=eps, **params)
    with torch.no_grad():
        for lin in (m.q, m.k, m.v):
            lin.weight.mul_(gain)
    return m.double()


def test_rotary_angles_and_decays_are_torchscale_s() -> None:
    hk = 8
    theta = 1.0 / 10000 ** (torch.arange(hk // 2, dtype=torch.float64) / (hk // 2 - 1))
    torch.testing.assert_close(
        torchscale_angles(hk).double(), theta.repeat_interleave(2), atol=0, rtol=1e-6
    )
    m, _ = _build()
    gammas = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    torch.testing.assert_close(m.log_gamma.double().exp(), gammas, atol=0, rtol=1e-7)
    # fla keeps its rotate-half base^(-2i/hk) frequencies, GroupNorm weight and bias
    fla = registry.get("retnet").build(RetNetParams(n_heads=H), BuildContext(d_model=D))
    assert not hasattr(fla, "angle") and fla.gn_weight.shape == (2 * D,)


@pytest.mark.parametrize("gain,T", [(1.0, 21), (6.0, 21), (6.0, 1)])
def test_forward_and_step_are_torchscale_s_recurrent_form(gain: float, T: int) -> None:
    """Both forms compute torchscale's recurrent form (what it decodes with), so they are one
    function; gain 6: score rows sum past 1 (where torchscale's parallel form would divide)."""
    m = _torchscale_model(gain)
    x = torch.randn(2, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rec = _torchscale_recurrent(m, x, 1e-6)
        assert _rel(m(x), rec) <= 1e-10
        assert _rel(run_steps(m, x), rec) <= 1e-10


def test_torchscale_s_parallel_form_differs_only_through_the_norm_eps() -> None:
    """torchscale's parallel form also divides each score row by clamp(Σ|·|, 1, 5e4): where
    every row's Σ|·| ≤ 1 it is archir's function exactly; beyond it they differ by RMSNorm's
    eps alone (as torchscale's own two forms do): tiny at eps 1e-12, large at 1e-1."""
    x = torch.randn(2, 33, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        small = _torchscale_model(0.05)
        assert _rel(small(x), _torchscale_parallel(small, x, 1e-6)) <= 1e-10
        gaps = {}
        for eps in (1e-12, 1e-1):
            big = _torchscale_model(6.0, eps=eps)
            gaps[eps] = _rel(big(x), _torchscale_parallel(big, x, eps))
    assert gaps[1e-12] <= 1e-8 and gaps[1e-1] > 1e-3, gaps


@pytest.mark.parametrize("params", [{}, {"pos": "none", "expand_v": 1.0, "n_heads": 4}])
def test_param_count_and_state(params: dict[str, Any]) -> None:
    kind = registry.get("retnet")
    m, p = _build(**params)
    ctx = BuildContext(d_model=D)
    assert sum(q.numel() for q in m.parameters()) == kind.n_params(p, ctx)
    S, _ = m.init_state(1)
    assert kind.state_bytes(p, ctx, 64) == 4 * S.numel()
    # torchscale's initialisation: Xavier uniform, gain 2^-2.5 (q, k, v, g) and 2^-1 (out)
    for lin, gain in ((m.q, 2**-2.5), (m.g, 2**-2.5), (m.o, 0.5)):
        bound = gain * math.sqrt(6 / sum(lin.weight.shape))
        assert 0.8 * bound < lin.weight.abs().max() <= bound


def test_hash_of_a_fla_spec_is_unchanged() -> None:
    assert "convention" not in RetNetParams().hash_dump()
    assert RetNetParams(convention="torchscale").hash_dump()["convention"] == "torchscale"


def test_bad_convention_is_a_located_error() -> None:
    assert_located_param_error(
        "retnet",
        {"convention": "fairseq"},
        "convention",
        "must be 'fla' or 'torchscale'",
        d_model=D,
    )


_HAS_ORT = all(importlib.util.find_spec(n) for n in ("onnx", "onnxruntime"))


@pytest.mark.skipif(not _HAS_ORT, reason="onnx/onnxruntime not installed")
@pytest.mark.heavy
def test_torchscale_option_exports_with_a_dynamic_length() -> None:
    """``exporters.graph.export_graph`` (the one export path): onnxruntime matches PyTorch at
    lengths the export never saw, with large scores (q, k weights 6x)."""
    import onnxruntime as ort

    from exporters.graph import Axis, export_graph

    m, _ = _build()
    with torch.no_grad():
        for lin in (m.q, m.k):
            lin.weight.mul_(6.0)
    m.eval()
    ex = export_graph(
        m,
        (torch.randn(2, 9, D),),
        input_names=["x"],
        output_names=["y"],
        input_axes=[{0: Axis("batch"), 1: Axis("seq", 1, 512)}],
        output_axes=[{0: "batch", 1: "seq"}],
    )
    sess = ort.InferenceSession(ex.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for T in (3, 40):
        x = torch.randn(3, T, D)
        (got,) = sess.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = m(x)
        assert _rel(torch.from_numpy(got), ref) < 1e-5


def _torchscale_lm(gain: float) -> Any:
    """A 2-layer causal LM of torchscale RetNet + SwiGLU whose q, k weights are ``gain``× their
    init (a stand-in for trained weights: score rows sum far past 1)."""
    import archir
    from archir.spec import spec_from_dict

    spec = spec_from_dict(
        {
            "archir": 1,
            "name": "retnet-torchscale",
            "model": {
                "task": "causal_lm",
                "vocab_size": 64,
                "d_model": 32,
                "max_seq_len": 64,
                "embed": {"kind": "token_embedding"},
                "layers": [
                    {
                        "repeat": 2,
                        "blocks": [
                            {"kind": "retnet", "n_heads": 2, "convention": "torchscale"},
                            {"kind": "swiglu"},
                        ],
                    }
                ],
                "head": {"kind": "lm_head"},
            },
        }
    )
    model = archir.compile(spec, seed=0).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, RetNet):
                mod.q.weight.mul_(gain)
                mod.k.weight.mul_(gain)
    return spec, model


def test_a_large_weight_torchscale_lm_decodes_like_its_forward() -> None:
    """Token-by-token decoding gives the full forward's logits (what the decode export's
    gate checks) with scores far past where torchscale's parallel form would rescale."""
    spec, model = _torchscale_lm(4.0)
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        state = model.init_state(2)
        steps = []
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state)
            steps.append(logits)
    assert _rel(torch.stack(steps, 1).reshape(full.shape), full) <= 1e-5


@pytest.mark.skipif(not _HAS_ORT, reason="onnx/onnxruntime not installed")
@pytest.mark.heavy
def test_a_large_weight_torchscale_lm_passes_the_decode_export_gate(tmp_path: Any) -> None:
    from exporters.decode import export_decode

    spec, model = _torchscale_lm(4.0)
    rep = export_decode(spec, tmp_path / "d.onnx", model=model, task="random")
    assert rep.parity is not None and rep.parity.passed, rep.parity
