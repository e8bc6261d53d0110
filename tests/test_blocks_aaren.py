"""Aaren (kind ``aaren``, Feng et al. 2024, "Attention as an RNN") beyond the registry-driven
tests.

The chunked prefix scan against a naive softmax over every prefix (fp64 to 1e-12, fp32 to
1e-5, values and gradients, one and several chunks, eager and graph-capture chunking), large
scores (±80: nothing overflows), the step form against forward (including an all-zero start
state with very negative scores), parameter count and FLOPs against the real module, a located
error for a bad ``n_heads``, and a dynamo ONNX export (opset 20) run at two lengths.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from archir import registry
from archir.blocks import aaren
from archir.blocks.aaren import CHUNK, aaren_scan
from archir.registry import BuildContext
from tests.block_util import assert_located_param_error

D = 32


def _build(d: int = D, **params: Any) -> tuple[aaren.Aaren, aaren.AarenParams]:
    kind = registry.get("aaren")
    ctx = BuildContext(d_model=d, vocab_size=64)
    p = kind.params(**params)
    kind.check(p, ctx)
    module = kind.build(p, ctx)
    assert isinstance(module, aaren.Aaren)
    return module, p


def _naive(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax over each prefix, one prefix at a time: ``s [B, T, H]``, ``v [B, T, H, P]``."""
    outs = []
    for t in range(s.shape[1]):
        w = torch.softmax(s[:, : t + 1], dim=1)  # [B, t+1, H]
        outs.append((w[..., None] * v[:, : t + 1]).sum(1))
    return torch.stack(outs, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error relative to the largest reference entry (or to 1, below it)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("T", [1, 7, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_scan_matches_softmax_over_prefixes(T: int, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(T)
    s = (torch.randn(2, T, 3, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    v = torch.randn(2, T, 3, 5, dtype=dtype, requires_grad=True)
    s64, v64 = s.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    got, ref = aaren_scan(s, v), _naive(s64, v64)
    assert _rel(got.double(), ref) < tol
    g = torch.randn_like(ref)
    got.backward(g.to(dtype))
    ref.backward(g)
    assert s.grad is not None and v.grad is not None
    assert s64.grad is not None and v64.grad is not None
    assert _rel(s.grad.double(), s64.grad) < tol
    assert _rel(v.grad.double(), v64.grad) < tol


def test_large_scores_do_not_overflow() -> None:
    """Scores of ±80 (exp(80) overflows fp32's exp-sum) and a ramp that keeps raising the
    running maximum across chunks: finite values and gradients, equal to the fp64 softmax."""
    torch.manual_seed(0)
    T = 2 * CHUNK + 9
    s = torch.where(torch.rand(2, T, 2) < 0.5, -80.0, 80.0) + torch.randn(2, T, 2)
    s[1] = torch.linspace(-90, 90, T)[:, None]  # a new maximum at every step
    s.requires_grad_()
    v = torch.randn(2, T, 2, 4)
    o = aaren_scan(s, v)
    o.square().sum().backward()
    assert s.grad is not None
    assert torch.isfinite(o).all() and torch.isfinite(s.grad).all()
    assert _rel(o.double(), _naive(s.detach().double(), v.double())) < 1e-5


def test_graph_capture_chunking_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The capture path (fixed CHUNK steps, padded, the chunk combination even for one
    chunk) equals the naive form."""
    monkeypatch.setattr(aaren, "tracing", lambda **_: True)
    torch.manual_seed(1)
    for T in (3, CHUNK + 2):
        s, v = torch.randn(1, T, 2, dtype=torch.float64) * 5, torch.randn(1, T, 2, 3).double()
        assert _rel(aaren_scan(s, v), _naive(s, v)) < 1e-12


@pytest.mark.parametrize(
    "params", [{}, {"n_heads": 2, "head_dim": 8, "bias": True}, {"n_heads": 1}]
)
def test_params_flops_state_and_step(params: dict[str, Any]) -> None:
    torch.manual_seed(2)
    m, p = _build(**params)
    kind, ctx = registry.get("aaren"), BuildContext(d_model=D, vocab_size=64)
    assert sum(q.numel() for q in m.parameters()) == kind.n_params(p, ctx)
    m = m.double()
    x = torch.randn(2, CHUNK + 11, D, dtype=torch.float64)
    with torch.no_grad():
        m.q.mul_(20.0)  # sharp, very negative and very positive scores
        y = m(x)
        state = m.init_state(2, dtype=torch.float64)
        assert kind.state_bytes(p, ctx, 100) == 4 * sum(t[0].numel() for t in state)
        ys = []
        for t in range(x.shape[1]):
            yt, state = m.step(x[:, t], state)
            ys.append(yt)
    assert _rel(torch.stack(ys, 1), y) < 1e-12
    for T in (5, CHUNK + 3, 2 * CHUNK + 1):  # lengths that pad
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            m(torch.randn(2, T, D, dtype=torch.float64))
        assert kind.flops(p, ctx, T) == counter.get_total_flops() / (2 * T)


@pytest.mark.parametrize(
    "params,field,message",
    [
        ({"n_heads": 5}, "n_heads", "n_heads 5 does not divide d_model 32"),
        ({"n_heads": 0}, "n_heads", "greater than or equal to 1"),
    ],
)
def test_bad_params_are_located_spec_errors(
    params: dict[str, Any], field: str, message: str
) -> None:
    assert_located_param_error("aaren", params, field, message, D)


_HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


@pytest.mark.slow  # one dynamo export (~1 min here); tests/test_export_matrix.py exports aaren too
@pytest.mark.skipif(not _HAS_ORT, reason="onnx/onnxruntime not installed")
def test_dynamo_export_runs_at_other_lengths() -> None:
    """``exporters.graph.export_graph`` with the dynamo exporter at opset 20 and a dynamic
    sequence axis (traced at two chunks: at one, torch.export specializes the chunk count):
    onnxruntime matches PyTorch at a length within one chunk and of several, with large
    scores."""
    import onnxruntime as ort

    from exporters.graph import Axis, export_graph

    torch.manual_seed(3)
    m, _ = _build(d=16, n_heads=2)
    with torch.no_grad():
        m.q.mul_(30.0)
    m.eval()
    ex = export_graph(
        m,
        (torch.randn(2, CHUNK + 3, 16),),
        input_names=["x"],
        output_names=["y"],
        input_axes=[{0: Axis("batch"), 1: Axis("seq", 1, 512)}],
        output_axes=[{0: "batch", 1: "seq"}],
        exporter="dynamo",
        opset=20,
    )
    assert ex.exporter == "dynamo"
    sess = ort.InferenceSession(ex.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for T in (5, 2 * CHUNK + 7):
        x = torch.randn(3, T, 16)
        (got,) = sess.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = m(x)
        assert math.isfinite(_rel(torch.from_numpy(got), ref))
        assert _rel(torch.from_numpy(got), ref) < 1e-5
