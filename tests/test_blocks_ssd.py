"""Mamba-2 / SSD (kind ``mamba2``, Dao & Gu 2024) beyond the registry-driven tests.

The chunked form against the step-by-step recurrence (fp64 to 1e-12, fp32 to 1e-5, values
and gradients, decays down to Δ·A = −50 and strong and weak decays mixed within a chunk,
eager and graph-capture chunking), against transformers' ``Mamba2Mixer`` with the same
weights, non-default parameters (groups, no biases, width-1 convolution), the FLOPs rule
against torch's counter at lengths that pad, errors, an export with strong decays, and the
latency predictor on a kind its calibration never saw.
"""

from __future__ import annotations

import importlib.util
import io
import math
import random
import warnings
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from archir import registry
from archir.blocks import ssd
from archir.blocks.ssd import CHUNK, chunking, ssd_scan
from archir.registry import BuildContext
from archir.spec import spec_from_dict
from tests.block_util import assert_located_param_error, run_steps

D = 32


def _build(d: int = D, **params: Any) -> tuple[ssd.Mamba2, ssd.Mamba2Params]:
    kind = registry.get("mamba2")
    ctx = BuildContext(d_model=d, vocab_size=64)
    p = kind.params(**params)
    kind.check(p, ctx)
    module = kind.build(p, ctx)
    assert isinstance(module, ssd.Mamba2)
    return module, p


def _naive_ssd(x, dt, A, Bm, Cm):  # type: ignore[no-untyped-def]
    """The SSD recurrence one step at a time: ``S_t = exp(Δ_t A) S_{t−1} + Δ_t x_t ⊗ B_t``,
    ``y_t = S_t C_t`` (head ``h`` reads group ``h // (H/G)``)."""
    Bsz, T, H, P = x.shape
    R = H // Bm.shape[2]
    S = torch.zeros(Bsz, H, P, Bm.shape[-1], dtype=x.dtype)
    ys = []
    for t in range(T):
        Bt, Ct = Bm[:, t].repeat_interleave(R, 1), Cm[:, t].repeat_interleave(R, 1)
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        S = decay * S + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        ys.append((S * Ct[:, :, None, :]).sum(-1))
    return torch.stack(ys, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("capture", [False, True], ids=["eager", "capture"])
@pytest.mark.parametrize("decays", ["weak", "strong", "mixed"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_form_is_exact_without_a_clamp(
    dtype: torch.dtype, tol: float, decays: str, capture: bool, monkeypatch: Any
) -> None:
    """Against the step recurrence in fp64: values to ``tol`` relative, gradients of every
    input to 10·tol. ``strong``: Δ·A down to −147; ``mixed``: runs of steps of −50 and of
    −0.01 alternate within a chunk, where a difference of two large prefix sums loses
    digits (transformers' reference chunk scan, which takes one for its chunk end states,
    is off by 6e-6 here in fp32 at chunk 32; this form by 9e-8). ``capture``: the
    fixed-CHUNK form that the exporters trace."""
    if capture:
        monkeypatch.setattr(ssd, "tracing", lambda **_: True)
    g = torch.Generator().manual_seed(5)
    Bsz, T, H, P, G, N = 2, 3 * CHUNK + 5, 4, 3, 2, 5
    x = torch.randn(Bsz, T, H, P, generator=g, dtype=torch.float64)
    A = -torch.exp(torch.rand(H, generator=g, dtype=torch.float64) * 2)
    dt = torch.rand(Bsz, T, H, generator=g, dtype=torch.float64)
    if decays == "weak":
        dt = dt * 0.05
    elif decays == "strong":
        dt = 10 + 10 * dt
        assert float((dt * A).min()) < -50
    else:
        strong = (torch.arange(T) // 5) % 2 == 0
        dt = torch.where(strong[None, :, None], 50.0 / -A, 0.01 / -A) * (1 + 0.1 * dt)
    Bm, Cm = (torch.randn(Bsz, T, G, N, generator=g, dtype=torch.float64) for _ in range(2))
    ref_args = [t.requires_grad_(True) for t in (x, dt, A, Bm, Cm)]
    ref = _naive_ssd(*ref_args)
    gref = torch.autograd.grad(ref.square().sum(), ref_args)
    args = [t.detach().to(dtype).requires_grad_(True) for t in ref_args]
    y = ssd_scan(*args)
    assert y.dtype == dtype and _rel(y, ref) < tol
    grads = torch.autograd.grad(y.square().sum(), args)
    for name, a, b in zip("x dt A B C".split(), grads, gref, strict=True):
        assert _rel(a, b) < 10 * tol, name


def test_chunking_pads_least_and_capture_uses_fixed_chunks() -> None:
    assert chunking(1) == (1, 1) and chunking(CHUNK) == (CHUNK, 1)
    assert chunking(CHUNK + 8) == (CHUNK // 2 + 4, 2)  # two chunks of 20, no padding
    for T in range(1, 5 * CHUNK):
        Q, nc = chunking(T)
        assert Q <= CHUNK and 0 <= nc * Q - T < nc
    assert chunking(40, capture=True) == (CHUNK, 2)


NON_DEFAULT = {
    "n_heads": 4,
    "n_groups": 2,
    "d_state": 6,
    "d_conv": 1,
    "expansion": 1.5,
    "bias": True,
    "conv_bias": False,
}


@pytest.mark.parametrize("params", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_params_flops_state_and_step(params: dict[str, Any]) -> None:
    """Exact parameter count, FLOPs equal to torch's counter at lengths that pad (one and
    several chunks), state bytes of the real state, and the step form (fp64) equal to
    forward."""
    torch.manual_seed(0)
    m, p = _build(**params)
    kind, ctx = registry.get("mamba2"), BuildContext(d_model=D, vocab_size=64)
    assert sum(q.numel() for q in m.parameters()) == kind.n_params(p, ctx)
    state = m.init_state(1)
    assert sum(t.numel() * 4 for t in state) == kind.state_bytes(p, ctx, 7)
    m = m.double()
    for T in (1, 21, 2 * CHUNK + 3):
        x = torch.randn(2, T, D, dtype=torch.float64)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            y = m(x)
        assert kind.flops(p, ctx, T) == counter.get_total_flops() / (2 * T)
        torch.testing.assert_close(run_steps(m, x), y, atol=1e-12, rtol=0)


def test_gradients_match_the_step_form() -> None:
    """Autograd through the chunked form equals autograd through the step form (fp64,
    several chunks, every parameter)."""
    torch.manual_seed(1)
    m, _ = _build(d_state=4, n_groups=2)
    m = m.double()
    with torch.no_grad():
        m.A_log.add_(3.0)  # strong decays too
    x = torch.randn(2, CHUNK + 9, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, CHUNK + 9, D, dtype=torch.float64)
    params = [x, *m.parameters()]
    got = torch.autograd.grad((m(x) * w).sum(), params)
    want = torch.autograd.grad((run_steps(m, x) * w).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="no transformers")
def test_matches_transformers_mamba2_mixer() -> None:
    """The same weights in transformers' ``Mamba2Mixer`` (its PyTorch path, built from a
    config, nothing downloaded) give the same output: the layout maps one to one
    (``in_proj`` as [z, x, B, C, dt], ``conv1d``, ``dt_bias``, ``A_log``, ``D``,
    ``norm.weight`` normalized per group, ``out_proj``)."""
    import transformers
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(2)
    H, N, G = 4, 8, 2
    cfg = transformers.Mamba2Config(
        hidden_size=D,
        num_heads=H,
        head_dim=2 * D // H,
        state_size=N,
        n_groups=G,
        expand=2,
        conv_kernel=4,
        use_conv_bias=True,
        use_bias=False,
        chunk_size=16,
        layer_norm_epsilon=1e-5,
        num_hidden_layers=1,
        vocab_size=64,
        time_step_limit=(0.0, float("inf")),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = Mamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for t in hf.parameters():
            t.normal_(0.0, 0.3)
        hf.A_log.copy_(torch.rand(H) * 3)
    m, _ = _build(n_heads=H, d_state=N, n_groups=G)
    m.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 70, D)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf(x)
        got = m.eval()(x)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"n_heads": 3}, "n_heads", "n_heads 3 does not divide the inner width"),
        ({"n_heads": 4, "n_groups": 3}, "n_groups", "n_groups 3 does not divide n_heads 4"),
        ({"expansion": 0.01}, "expansion", "expansion 0.01 leaves an inner width 0 < n_heads"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min", "dt_min 0.5 is larger than dt_max 0.1"),
    ],
)
def test_bad_params_are_located_spec_errors(
    params: dict[str, Any], field: str, message: str
) -> None:
    assert_located_param_error("mamba2", params, field, message, D)


_HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


@pytest.mark.skipif(not _HAS_ORT, reason="onnx/onnxruntime not installed")
def test_export_with_strong_decays_matches_onnxruntime() -> None:
    """Trained-like decays (Δ·A far below −50) in an exported graph with a dynamic sequence
    axis: onnxruntime matches PyTorch at lengths of one and of several chunks."""
    import onnxruntime as ort

    torch.manual_seed(3)
    m, _ = _build(d=16, d_state=8)
    with torch.no_grad():
        m.A_log.add_(2.0)
        m.dt_bias.fill_(4.0)
    m.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (torch.randn(2, 8, 16),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
        )
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for T in (1, 3 * CHUNK + 7):
        x = torch.randn(3, T, 16)
        (got,) = sess.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = m(x)
        assert _rel(torch.from_numpy(got), ref) < 1e-5


def test_latency_predictor_handles_a_kind_its_calibration_never_saw() -> None:
    """A predictor calibrated on attention and Mamba parts predicts a Mamba-2 spec from the
    token mixers' pooled coefficients, with the band widened (``extrapolated``)."""
    from exporters.latency import LatencyPredictor, graph_features
    from exporters.latency.calibrate import make_spec_data, samples_features

    rng = random.Random(0)
    coef = {"attention": 3.0, "mamba": 6.0, "swiglu": 2.5, "fixed": 2.0}
    cal: dict[str, list[Any]] = {"specs": [], "parts": [], "wholes": []}
    for i in range(8):
        mixer = ("attention", "mamba")[i % 2]
        data = make_spec_data(rng, mixer, "swiglu", rng.choice([64, 128]), 2, 256, 16)
        seq = rng.choice([64, 256])
        cal["specs"].append(data)
        total = 0.0
        for part in graph_features(spec_from_dict(data), 1, seq).parts:
            ms = coef[part.kind] * (part.x[0] + part.x[1]) + 0.01
            total += ms
            cal["parts"].append({"spec": i, "node": part.name, "batch": 1, "seq": seq, "ms": ms})
        cal["wholes"].append({"spec": i, "batch": 1, "seq": seq, "ms": 1.05 * total})
    predictor = LatencyPredictor().fit(*samples_features(cal))
    data = make_spec_data(rng, "mamba2", "swiglu", 64, 2, 256, 16)
    pred = predictor.predict(graph_features(spec_from_dict(data), 1, 128))
    assert pred.extrapolated and math.isfinite(pred.ms) and pred.ms > 0
    assert pred.band_ms[0] <= pred.ms <= pred.band_ms[1]


@pytest.mark.slow
def test_torch_compile_across_lengths() -> None:
    """Under ``torch.compile`` (AOT autograd) the scan runs eagerly behind a graph break:
    outputs and input gradients equal eager ones at lengths of several chunks, then of one
    (the order that broke the compiled backward)."""
    torch.manual_seed(4)
    m, _ = _build(n_groups=2)
    compiled = torch.compile(m, backend="aot_eager")
    for T in (5, 40, 77, 17):
        x = torch.randn(2, T, D, requires_grad=True)
        y = compiled(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        x2 = x.detach().requires_grad_(True)
        y2 = m(x2)
        (g2,) = torch.autograd.grad(y2.square().sum(), x2)
        torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, g2, atol=1e-5, rtol=1e-5)
