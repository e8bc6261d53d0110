"""Gated DeltaNet (kind ``gated_deltanet``, Yang, Kautz & Hatamizadeh 2025) beyond the
registry-driven tests.

The chunked WY form against the per-step recurrence written here from the equations (fp64 to
1e-12, fp32 to 1e-5, values and gradients, lengths that are not a multiple of the chunk,
decays down to −60 per step, nearly parallel keys with no decay), eagerly and in the loopless
form that graph capture traces; the block inverse; exact parameter count, FLOPs equal to
torch's counter, state bytes and the step form; located errors; transformers' Qwen3-Next
``Qwen3NextGatedDeltaNet`` with the same weights; a dynamic-length ONNX export with strong
decays read at lengths of one and of many chunks.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from archir import registry
from archir.blocks import deltanet
from archir.blocks.deltanet import gated_delta_rule, scan_levels, unit_lower_inverse
from archir.registry import BuildContext
from tests.block_util import assert_located_param_error, run_steps

D = 32


def _build(d: int = D, max_seq_len: int = 2048, **params: Any) -> tuple[Any, Any]:
    kind = registry.get("gated_deltanet")
    ctx = BuildContext(d_model=d, vocab_size=64, max_seq_len=max_seq_len)
    p = kind.params(**params)
    kind.check(p, ctx)
    module = kind.build(p, ctx)
    assert isinstance(module, deltanet.GatedDeltaNet)
    return module, p


def _naive(q, k, v, g, beta):  # type: ignore[no-untyped-def]
    """``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t``, one
    step at a time (``S [B, H, d_k, d_v]``)."""
    Bsz, T, H, dk = q.shape
    S = torch.zeros(Bsz, H, dk, v.shape[-1], dtype=q.dtype)
    eye = torch.eye(dk, dtype=q.dtype)
    out = []
    for t in range(T):
        kt = k[:, t]
        b = beta[:, t, :, None, None]
        trans = torch.exp(g[:, t])[..., None, None] * (
            eye - b * kt[..., :, None] * kt[..., None, :]
        )
        S = trans @ S + b * kt[..., :, None] * v[:, t, :, None, :]
        out.append((S * q[:, t, ..., None]).sum(-2))
    return torch.stack(out, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def _inputs(case: str, T: int, g: torch.Generator) -> list[torch.Tensor]:
    Bsz, H, dk, dv = 2, 3, 8, 5
    f64 = torch.float64
    q = torch.randn(Bsz, T, H, dk, generator=g, dtype=f64) * dk**-0.5
    k = torch.randn(Bsz, T, H, dk, generator=g, dtype=f64)
    v = torch.randn(Bsz, T, H, dv, generator=g, dtype=f64)
    beta = torch.rand(Bsz, T, H, generator=g, dtype=f64)
    r = torch.rand(Bsz, T, H, generator=g, dtype=f64)
    if case == "weak":
        logd = -0.05 * r
    elif case == "strong":
        logd = -50 - 10 * r
    elif case == "mixed":  # runs of −50 and −0.01 per step alternate within a chunk
        strong = (torch.arange(T) // 3) % 2 == 0
        logd = torch.where(strong[None, :, None], -50.0, -0.01) * (1 + 0.1 * r)
    else:  # "parallel": nearly one key, writes near 1, no decay
        k = k[:, :1] + 0.05 * k
        beta = 0.9 + 0.1 * beta
        logd = torch.zeros_like(r)
    k = torch.nn.functional.normalize(k, dim=-1)
    return [q, k, v, logd, beta]


@pytest.mark.parametrize("capture", [False, True], ids=["eager", "capture"])
@pytest.mark.parametrize("case", ["weak", "strong", "mixed", "parallel"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_form_matches_the_recurrence(
    dtype: torch.dtype, tol: float, case: str, capture: bool, monkeypatch: Any
) -> None:
    """Values to ``tol`` relative and gradients of every input to 10·tol, at a length of
    several chunks that is not a multiple of the chunk (8). ``capture``: the loopless form
    (fixed chunks, log-depth scan over chunks) that the exporters trace, with too few levels
    for the length (a concrete length gets the levels it needs)."""
    if capture:
        monkeypatch.setattr(deltanet, "tracing", lambda **_: True)
    gen = torch.Generator().manual_seed(0)
    ref_args = [t.requires_grad_(True) for t in _inputs(case, 4 * 8 + 3, gen)]
    ref = _naive(*ref_args)
    gref = torch.autograd.grad(ref.square().sum(), ref_args)
    args = [t.detach().to(dtype).requires_grad_(True) for t in ref_args]
    q, k, v, logd, beta = args
    # levels=1 covers 2 chunks: a concrete length of 5 chunks raises it to 3
    o = gated_delta_rule(q, k, v, logd, beta, chunk=8, levels=1 if capture else None)
    assert o.dtype == dtype and _rel(o, ref) < tol
    grads = torch.autograd.grad(o.square().sum(), args)
    for name, a, b in zip("q k v g beta".split(), grads, gref, strict=True):
        assert _rel(a, b) < 10 * tol, name


def test_block_inverse_and_scan_levels() -> None:
    """The doubling inverse equals a triangular solve at sizes that are and are not powers
    of two; the scan covers max_seq_len with the fewest levels."""
    gen = torch.Generator().manual_seed(1)
    for Q in (1, 5, 8, 13):
        M = torch.randn(3, Q, Q, generator=gen, dtype=torch.float64).tril(-1)
        M = M + torch.eye(Q, dtype=torch.float64)
        want = torch.linalg.solve_triangular(M, torch.eye(Q, dtype=M.dtype), upper=False)
        torch.testing.assert_close(unit_lower_inverse(M), want, atol=1e-12, rtol=0)
    assert [scan_levels(n, 32) for n in (1, 32, 33, 64, 65, 512)] == [0, 0, 1, 1, 2, 4]


NON_DEFAULT = {
    "n_heads": 3,
    "head_dim": 6,
    "expand_v": 1.5,
    "d_conv": 1,
    "use_gate": False,
    "allow_neg_eigval": True,
    "chunk": 8,
    "bias": True,
    "conv_bias": True,
}


@pytest.mark.parametrize("params", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_params_flops_state_and_step(params: dict[str, Any]) -> None:
    """Exact parameter count, FLOPs equal to torch's counter (one chunk, several, padded),
    state bytes of the real state, and the step form equal to forward (fp64)."""
    torch.manual_seed(0)
    m, p = _build(**params)
    kind, ctx = registry.get("gated_deltanet"), BuildContext(d_model=D, vocab_size=64)
    assert sum(q.numel() for q in m.parameters()) == kind.n_params(p, ctx)
    assert sum(t.numel() * 4 for t in m.init_state(1)) == kind.state_bytes(p, ctx, 7)
    m = m.double()
    with torch.no_grad():
        m.A_log.add_(2.0)  # strong decays too
    for T in (1, 21, 2 * m.chunk + 3):
        x = torch.randn(2, T, D, dtype=torch.float64)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            y = m(x)
        assert kind.flops(p, ctx, T) == counter.get_total_flops() / (2 * T)
        torch.testing.assert_close(run_steps(m, x), y, atol=1e-12, rtol=0)


def test_gradients_match_the_step_form() -> None:
    """Autograd through the block equals autograd through its step form (fp64, several
    chunks, every parameter)."""
    torch.manual_seed(1)
    m, _ = _build(chunk=8)
    m = m.double()
    x = torch.randn(2, 19, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 19, D, dtype=torch.float64)
    params = [x, *m.parameters()]
    got = torch.autograd.grad((m(x) * w).sum(), params)
    want = torch.autograd.grad((run_steps(m, x) * w).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def _qwen3_next_layer(H: int, dk: int, dv: int) -> Any:
    import transformers
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = transformers.Qwen3NextConfig(
        hidden_size=D,
        linear_num_value_heads=H,
        linear_num_key_heads=H,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        vocab_size=64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen3NextGatedDeltaNet(cfg, layer_idx=0).eval()


_HAS_QWEN3_NEXT = importlib.util.find_spec("transformers") is not None and (
    importlib.util.find_spec("transformers.models.qwen3_next") is not None
)


@pytest.mark.skipif(not _HAS_QWEN3_NEXT, reason="transformers without Qwen3-Next")
def test_matches_transformers_qwen3_next_gated_deltanet() -> None:
    """The same weights in transformers' ``Qwen3NextGatedDeltaNet`` (its PyTorch chunked
    path, chunk 64, built from a config, nothing downloaded) give the same output at a
    length of several of its chunks. Its ``in_proj_qkvz`` holds ``[q, k, v, z]`` per head
    and ``in_proj_ba`` ``[b, a]`` per head; archir's ``in_proj`` holds ``[q | k | v | z | b
    | a]``, each head-major."""
    torch.manual_seed(2)
    H, dk, dv = 2, 16, 32
    hf = _qwen3_next_layer(H, dk, dv)
    with torch.no_grad():
        for t in hf.parameters():
            t.normal_(0.0, 0.3)
        hf.A_log.copy_(torch.rand(H) * 3)
    m, _ = _build(n_heads=H, head_dim=dk, expand_v=dv / dk)
    qkvz = hf.in_proj_qkvz.weight.view(H, 2 * dk + 2 * dv, D)
    q, k, v, z = torch.split(qkvz, [dk, dk, dv, dv], dim=1)
    ba = hf.in_proj_ba.weight.view(H, 2, D)
    rows = [t.reshape(-1, D) for t in (q, k, v, z, ba[:, 0], ba[:, 1])]
    m.load_state_dict(
        {
            "in_proj.weight": torch.cat(rows),
            "conv1d.weight": hf.conv1d.weight,
            "dt_bias": hf.dt_bias,
            "A_log": hf.A_log,
            "norm.weight": hf.norm.weight,
            "out_proj.weight": hf.out_proj.weight,
        }
    )
    x = torch.randn(2, 150, D)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf(x)
        got = m.eval()(x)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"n_heads": 3}, "n_heads", "n_heads 3 does not divide d_model 32"),
        ({"expand_v": 0.3}, "expand_v", "expand_v 0.3 times head_dim 8 is not a whole"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min", "dt_min 0.5 is larger than dt_max 0.1"),
    ],
)
def test_bad_params_are_located_spec_errors(
    params: dict[str, Any], field: str, message: str
) -> None:
    assert_located_param_error("gated_deltanet", params, field, message, D)


_HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


@pytest.mark.skipif(not _HAS_ORT, reason="onnx/onnxruntime not installed")
def test_export_with_strong_decays_matches_onnxruntime() -> None:
    """Exported once with a dynamic sequence axis (max_seq_len 96, chunk 8: a scan of 4
    levels over up to 12 chunks), strong decays and nearly closed gates: onnxruntime matches
    PyTorch at lengths of one step and of 12 chunks."""
    import onnxruntime as ort

    torch.manual_seed(3)
    m, _ = _build(d=16, max_seq_len=96, chunk=8)
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
    for T in (1, 96):
        x = torch.randn(3, T, 16)
        (got,) = sess.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = m(x)
        assert _rel(torch.from_numpy(got), ref) < 1e-5


@pytest.mark.slow
def test_torch_compile_across_lengths() -> None:
    """Under ``torch.compile`` (AOT autograd) the rule runs eagerly behind a graph break:
    outputs and input gradients equal eager ones at lengths of one chunk, several, past
    max_seq_len, and one chunk again (the order that broke the compiled backward)."""
    torch.manual_seed(4)
    m, _ = _build(max_seq_len=64, chunk=8)
    compiled = torch.compile(m, backend="aot_eager")
    for T in (5, 40, 77, 17, 130):
        x = torch.randn(2, T, D, requires_grad=True)
        y = compiled(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        x2 = x.detach().requires_grad_(True)
        y2 = m(x2)
        (g2,) = torch.autograd.grad(y2.square().sum(), x2)
        torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, g2, atol=1e-5, rtol=1e-5)
