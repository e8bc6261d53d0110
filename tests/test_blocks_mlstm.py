"""xLSTM's mLSTM (kind ``mlstm``, Beck et al. 2024) beyond the registry-driven tests.

The chunkwise form against the stabilised recurrence written here step by step from the
paper's equations (fp64 to 1e-12, fp32 to 1e-5, values and gradients, lengths that are not a
multiple of the chunk, input-gate pre-activations from −70 to +150 and forget-gate ones down
to −60, eager and graph-capture chunking), the block's step form against its forward, the
parameter count and FLOPs against the real module and torch's counter, a located error for a
bad ``n_heads``, and a dynamic-length ONNX export (one length exported, two others run).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from archir import registry
from archir.blocks import mlstm
from archir.blocks.mlstm import chunking, mlstm_scan
from archir.registry import BuildContext
from tests.block_util import assert_located_param_error, run_steps

D = 32


def _build(d: int = D, **params: Any) -> tuple[mlstm.MLSTM, mlstm.MLSTMParams]:
    kind = registry.get("mlstm")
    ctx = BuildContext(d_model=d, vocab_size=64)
    p = kind.params(**params)
    kind.check(p, ctx)
    module = kind.build(p, ctx)
    assert isinstance(module, mlstm.MLSTM)
    return module, p


def _naive(q, k, v, ig, fg, eps=1e-6):  # type: ignore[no-untyped-def]
    """The paper's stabilised mLSTM one step at a time from ``C = n = m = 0``:
    ``m_t = max(log σ(f̃_t) + m_{t−1}, ĩ_t)``, ``C_t = f' C + i' k vᵀ``, ``n_t = f' n + i' k``
    with ``f' = exp(log σ(f̃_t) + m_{t−1} − m_t)``, ``i' = exp(ĩ_t − m_t)``, ``k`` scaled by
    ``1/√Dh``; ``h_t = C_tᵀ q_t / (max(|n_tᵀ q_t|, exp(−m_t)) + eps)``."""
    Bsz, T, H, Dh = q.shape
    C = torch.zeros(Bsz, H, Dh, Dh, dtype=q.dtype)
    n = torch.zeros(Bsz, H, Dh, dtype=q.dtype)
    m = torch.zeros(Bsz, H, dtype=q.dtype)
    out = []
    for t in range(T):
        lf = F.logsigmoid(fg[:, t])
        m_new = torch.maximum(lf + m, ig[:, t])
        fa, ia = torch.exp(lf + m - m_new), torch.exp(ig[:, t] - m_new)
        kt = k[:, t] / math.sqrt(Dh)
        C = fa[..., None, None] * C + ia[..., None, None] * kt[..., :, None] * v[:, t, :, None, :]
        n = fa[..., None] * n + ia[..., None] * kt
        num = torch.einsum("bhd,bhde->bhe", q[:, t], C)
        den = torch.maximum((q[:, t] * n).sum(-1).abs(), torch.exp(-m_new)) + eps
        out.append(num / den[..., None])
        m = m_new
    return torch.stack(out, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("capture", [False, True], ids=["eager", "capture"])
@pytest.mark.parametrize("gates", ["moderate", "extreme"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_form_equals_the_recurrence(
    dtype: torch.dtype, tol: float, gates: str, capture: bool, monkeypatch: Any
) -> None:
    """Values to ``tol`` relative and gradients of every input to 10·tol, against the naive
    recurrence in fp64, at a length of several chunks plus a remainder (chunk 16). ``extreme``:
    input gates from about −75 to +130 (``exp`` of them overflows fp32 unstabilised) and
    forget gates from below −50 (nothing kept) to above +50, q and k non-negative so ``nᵀq`` does not
    cancel (cancellation there is ill-conditioning, not the form's error: the naive recurrence
    in fp32 is then off by as much). ``capture``: the fixed-chunk form the exporters trace."""
    if capture:
        monkeypatch.setattr(mlstm, "tracing", lambda **_: True)
    g = torch.Generator().manual_seed(0)
    Bsz, T, H, Dh = 2, 3 * 16 + 5, 2, 4

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rand(Bsz, T, H, Dh), rand(Bsz, T, H, Dh), rand(Bsz, T, H, Dh)
    ig, fg = rand(Bsz, T, H), rand(Bsz, T, H)
    if gates == "extreme":
        q, k = q.abs(), k.abs()
        ig, fg = 40 * ig + 30, 30 * fg
        assert (
            float(ig.max()) > 100
            and float(ig.min()) < -60
            and float(fg.min()) < -50 < 50 < float(fg.max())
        )
    ref_args = [t.requires_grad_(True) for t in (q, k, v, ig, fg)]
    ref = _naive(*ref_args)
    w = rand(*ref.shape)
    gref = torch.autograd.grad((ref * w).sum(), ref_args)
    args = [t.detach().to(dtype).requires_grad_(True) for t in ref_args]
    y = mlstm_scan(*args, chunk=16)
    assert y.dtype == dtype and torch.isfinite(y).all() and _rel(y, ref) < tol
    grads = torch.autograd.grad((y * w.to(dtype)).sum(), args)
    for name, a, b in zip(["q", "k", "v", "igate", "fgate"], grads, gref, strict=True):
        assert torch.isfinite(a).all() and _rel(a, b) < 10 * tol, name


def test_closed_gates_give_finite_gradients() -> None:
    """A closed forget gate with a strongly negative input gate (as training can reach) drives
    the stabiliser m below −88, where fp32 exp(−m) is inf: the output was 0 and every gradient
    NaN. Now values and gradients are finite, and step still equals forward."""
    m, _ = _build()
    with torch.no_grad():
        m.igate.bias.fill_(-200.0)
        m.fgate.bias.fill_(-100.0)
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()  # type: ignore[arg-type]
    for name, q in m.named_parameters():
        assert q.grad is not None and torch.isfinite(q.grad).all(), name
    with torch.no_grad():
        torch.testing.assert_close(run_steps(m, x), y, atol=1e-6, rtol=1e-5)


def test_chunking_pads_least_and_capture_uses_fixed_chunks() -> None:
    assert chunking(1, 64) == (1, 1) and chunking(64, 64) == (64, 1)
    assert chunking(72, 64) == (36, 2)  # two chunks of 36, no padding
    for T in range(1, 200):
        Q, nc = chunking(T, 16)
        assert Q <= 16 and 0 <= nc * Q - T < nc
    assert chunking(40, 16, capture=True) == (16, 3)


NON_DEFAULT = {
    "n_heads": 2,
    "expansion": 1.5,
    "multiple_of": 8,
    "conv_kernel": 1,
    "qkv_blocksize": 8,
    "chunk": 8,
    "bias": True,
    "conv_bias": False,
}


@pytest.mark.parametrize("params", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_params_flops_state_and_step(params: dict[str, Any]) -> None:
    """Exact parameter count, FLOPs equal to torch's counter at lengths of one and several
    chunks that pad, state bytes of the real state, and the step form (fp64) equal to
    forward."""
    torch.manual_seed(0)
    m, p = _build(**params)
    kind, ctx = registry.get("mlstm"), BuildContext(d_model=D, vocab_size=64)
    assert sum(q.numel() for q in m.parameters()) == kind.n_params(p, ctx)
    state = m.init_state(1)
    assert [tuple(t.shape) for t in state] == [
        (1, m.di, m.K - 1),
        (1, m.H, m.Dh, m.Dh),
        (1, m.H, m.Dh),
        (1, m.H),
    ]
    assert sum(t.numel() * 4 for t in state) == kind.state_bytes(p, ctx, 7)
    m = m.double()
    with torch.no_grad():  # gates that matter: non-zero weights, a spread of biases
        m.igate.weight.normal_(0.0, 0.5)
        m.fgate.weight.normal_(0.0, 0.5)
    for T in (1, 21, 2 * p.chunk + 3):
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
    m, _ = _build(chunk=8)
    m = m.double()
    with torch.no_grad():
        m.igate.weight.normal_(0.0, 0.3)
        m.fgate.weight.normal_(0.0, 0.3)
    x = torch.randn(2, 8 * 2 + 5, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 8 * 2 + 5, D, dtype=torch.float64)
    params = [x, *m.parameters()]
    got = torch.autograd.grad((m(x) * w).sum(), params)
    want = torch.autograd.grad((run_steps(m, x) * w).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"n_heads": 3}, "n_heads", "n_heads 3 does not divide the inner width"),
        ({"qkv_blocksize": 5}, "qkv_blocksize", "qkv_blocksize 5 does not divide"),
    ],
)
def test_bad_params_are_located_spec_errors(
    params: dict[str, Any], field: str, message: str
) -> None:
    assert_located_param_error("mlstm", params, field, message, D)


_HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_ORT, reason="onnx/onnxruntime not installed")
def test_dynamic_length_onnx_export_matches_onnxruntime() -> None:
    """archir's one export path (``torch.onnx.export``, dynamo) of the block at one length of
    two chunks, with dynamic batch and sequence axes; onnxruntime matches PyTorch at a
    length inside one chunk and one of several chunks with a remainder, with gates that
    exercise the stabiliser. (Slow: the registry's export matrix exports the default
    block through the same path in the default suite.)"""
    import onnxruntime as ort

    from exporters.graph import Axis, export_graph

    torch.manual_seed(3)
    m, _ = _build(d=16, chunk=16)
    with torch.no_grad():
        m.igate.weight.normal_(0.0, 1.0)
        m.fgate.weight.normal_(0.0, 1.0)
    m.eval()
    ex = export_graph(
        m,
        (torch.randn(2, 20, 16),),
        input_names=["x"],
        output_names=["y"],
        input_axes=[{0: Axis("batch"), 1: Axis("seq")}],
        output_axes=[{0: "batch", 1: "seq"}],
        exporter="dynamo",
    )
    assert ex.exporter == "dynamo"
    sess = ort.InferenceSession(ex.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for T in (5, 3 * 16 + 7):
        x = torch.randn(3, T, 16)
        (got,) = sess.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = m(x)
        assert _rel(torch.from_numpy(got), ref) < 1e-5
