"""xLSTM's sLSTM (kind ``slstm``, Beck et al. 2024) beyond the registry-driven tests.

``forward`` against a naive step-by-step recurrence written here from the paper's equations
(fp64 to 1e-12, values and gradients), the stabiliser against the unstabilised equations and
under extreme gate pre-activations, ``step`` against ``forward``, parameters and FLOPs against
the real module, a located error for a bad ``n_heads``, and the ONNX ``Scan`` export with a
dynamic sequence length against onnxruntime at two lengths.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import archir
from archir import registry
from archir.blocks.slstm import SLSTM, slstm_recurrence
from archir.errors import ArchirError
from archir.registry import BuildContext
from archir.spec import spec_from_dict
from tests.block_util import run_steps

D = 32


def _build(d: int = D, mixing: float = 0.3, **params: Any) -> SLSTM:
    """An ``slstm`` module with random (nonzero) recurrent blocks and biases."""
    kind = registry.get("slstm")
    ctx = BuildContext(d_model=d, vocab_size=64)
    p = kind.params(**params)
    kind.check(p, ctx)
    m = kind.build(p, ctx)
    assert isinstance(m, SLSTM)
    with torch.no_grad():
        m.R.normal_(0.0, mixing)
        m.bias.add_(torch.randn_like(m.bias))
        m.norm_weight.uniform_(0.5, 1.5)
    return m


def naive(m: SLSTM, x: torch.Tensor, stabilised: bool = True) -> torch.Tensor:
    """The paper's equations, one step and one head at a time, from the module's weights:
    ``x [B, T, d] -> [B, T, d]``. ``stabilised=False``: the raw ``c, n`` with
    ``i = exp(ĩ)`` (overflows for large ``ĩ``; fp64 only)."""
    B, T, d = x.shape
    H, P, K = m.H, m.P, m.K
    xc = x
    if K:
        assert m.conv1d is not None and m.conv1d.bias is not None
        w, bias = m.conv1d.weight[:, 0, :], m.conv1d.bias  # [d, K]
        xp = torch.cat([x.new_zeros(B, K - 1, d), x], dim=1)
        xc = torch.stack([(xp[:, t : t + K] * w.T).sum(1) + bias for t in range(T)], dim=1)
        xc = xc * torch.sigmoid(xc)
    h = [x.new_zeros(B, P) for _ in range(H)]
    c = [x.new_zeros(B, P) for _ in range(H)]
    n = [x.new_zeros(B, P) for _ in range(H)]
    mm = [x.new_zeros(B, P) for _ in range(H)]
    out = []
    for t in range(T):
        heads = []
        for k in range(H):
            sl = slice(k * P, (k + 1) * P)
            src = (xc[:, t, sl], xc[:, t, sl], x[:, t, sl], x[:, t, sl])
            pre = [src[g] @ m.W[g, k].T + h[k] @ m.R[k, :, g, :] + m.bias[g, k] for g in range(4)]
            it, ft, zt, ot = pre
            logf = ft if m.exp_forget else -torch.log1p(torch.exp(-ft))
            if not stabilised:
                i_g, f_g = torch.exp(it), torch.exp(logf)
                m_new = mm[k]
            elif t == 0:  # the reference's first step: m = ĩ
                m_new = it
                i_g, f_g = torch.ones_like(it), torch.zeros_like(it)
            else:
                m_new = torch.maximum(logf + mm[k], it)
                i_g, f_g = torch.exp(it - m_new), torch.exp(logf + mm[k] - m_new)
            c[k] = f_g * c[k] + i_g * torch.tanh(zt)
            n[k] = f_g * n[k] + i_g
            mm[k] = m_new
            h[k] = torch.sigmoid(ot) * c[k] / n[k]
            heads.append(F.layer_norm(h[k], (P,), eps=m.eps))
        out.append(torch.cat(heads, -1) * m.norm_weight)
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    "params",
    [{}, {"forget_gate": "exp", "conv_kernel": 0, "n_heads": 2}, {"conv_kernel": 1}],
    ids=["default", "exp-noconv", "k1"],
)
def test_forward_and_gradients_match_the_naive_recurrence(params: dict[str, Any]) -> None:
    torch.manual_seed(0)
    m = _build(**params).double()
    x = torch.randn(2, 11, D, dtype=torch.float64, requires_grad=True)
    y, ref = m(x), naive(m, x)
    assert (y - ref).abs().max() < 1e-12
    g = torch.randn_like(y)
    params_ = [x, *m.parameters()]
    got = torch.autograd.grad(y, params_, g)
    want = torch.autograd.grad(ref, params_, g)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-11 * max(1.0, b.abs().max().item())
    torch.testing.assert_close(run_steps(m, x), y, atol=1e-12, rtol=0)


def test_stabiliser_leaves_the_output_unchanged_and_survives_extreme_gates() -> None:
    torch.manual_seed(1)
    m = _build(forget_gate="exp").double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    # moderate gates: the stabilised form equals the raw equations (c/n is scale-free)
    torch.testing.assert_close(m(x), naive(m, x, stabilised=False), atol=1e-12, rtol=0)
    # input-gate pre-activations of ±300 and forget-gate ones of +300 (exp(300) overflows
    # fp32 and exp(-300) underflows it): fp32 stays finite and matches fp64
    with torch.no_grad():
        m.bias[0] = 300.0 * torch.sign(torch.randn_like(m.bias[0]))
        m.bias[1] = 300.0
    for gate in ("exp", "sigmoid"):
        m.exp_forget = gate == "exp"
        m32 = _build(forget_gate=gate)
        m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        x32 = x.float().requires_grad_(True)
        y = m32(x32)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and x32.grad is not None
        assert torch.isfinite(x32.grad).all()
        assert all(torch.isfinite(q.grad).all() for q in m32.parameters() if q.grad is not None)
        assert (y.double() - m(x)).abs().max() < 1e-4


def test_params_flops_state_and_errors() -> None:
    kind = registry.get("slstm")
    for params in ({}, {"conv_kernel": 0, "n_heads": 8}, {"conv_kernel": 2}):
        p = kind.params(**params)
        ctx = BuildContext(d_model=D)
        m = kind.build(p, ctx)
        assert sum(q.numel() for q in m.parameters()) == kind.n_params(p, ctx)
        assert sum(s.numel() * 4 for s in m.init_state(1)) == kind.state_bytes(p, ctx, 99)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            m(torch.randn(2, 13, D))
        assert counter.get_total_flops() / 26 == kind.flops(p, ctx, 13)
    data = {
        "archir": 1,
        "name": "bad",
        "model": {
            "vocab_size": 64,
            "d_model": D,
            "max_seq_len": 64,
            "embed": {"kind": "token_embedding"},
            "layers": [{"repeat": 1, "blocks": [{"kind": "slstm", "n_heads": 5}]}],
            "head": {"kind": "lm_head"},
        },
    }
    with pytest.raises(ArchirError, match="n_heads 5 does not divide d_model 32") as e:
        archir.compile(spec_from_dict(data))
    assert "model.layers.0.blocks.0.n_heads" in str(e.value)


@pytest.mark.slow  # ~20 s: an eager scan compiles its body
def test_scan_form_equals_the_loop() -> None:
    torch.manual_seed(2)
    wx = torch.randn(7, 2, 3, 4, 5, dtype=torch.float64) * 3
    R = torch.randn(2, 5, 20, dtype=torch.float64) * 0.5
    for exp_forget in (False, True):
        a = slstm_recurrence(wx, R, exp_forget, capture=False)
        b = slstm_recurrence(wx, R, exp_forget, capture=True)
        assert (a - b).abs().max() == 0


_HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


@pytest.mark.skipif(not _HAS_ORT, reason="onnx/onnxruntime not installed")
@pytest.mark.parametrize(
    ("exporter", "op"),
    [
        # ~12 s (torch.export); the default suite exports slstm through torch.export in
        # tests/test_export_matrix.py (a whole model, four lengths) and test_decode.py
        pytest.param("dynamo", "Scan", marks=pytest.mark.slow),
        ("legacy", "Loop"),
    ],
)
def test_export_has_a_dynamic_length_loop_matching_onnxruntime(exporter: str, op: str) -> None:
    """torch.export writes the recurrence as one ONNX ``Scan``, the TorchScript exporter as
    a ``Loop``; both run at lengths other than the example's, with memory mixing (random
    recurrent blocks)."""
    import onnxruntime as ort

    from exporters.graph import Axis, export_graph

    torch.manual_seed(3)
    m = _build(d=16, n_heads=2).eval()
    ex = export_graph(
        m,
        (torch.randn(2, 8, 16),),
        input_names=["x"],
        output_names=["y"],
        input_axes=[{0: Axis("batch"), 1: Axis("seq")}],
        output_axes=[{0: "batch", 1: "seq"}],
        exporter=exporter,
    )
    assert ex.exporter == exporter
    assert op in {n.op_type for n in ex.proto.graph.node}
    sess = ort.InferenceSession(ex.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for B, T in ((3, 1), (1, 45)):
        x = torch.randn(B, T, 16)
        (got,) = sess.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = m(x)
        assert (torch.from_numpy(got) - ref).abs().max() < 1e-5
