"""GLA (kind ``gla``, Yang et al. 2024) without a clamp on the forget gate (issue 16, part 1),
beyond the registry-driven tests in ``tests/test_blocks_recurrent.py``.

``forward`` against the paper's recurrence ``S_t = diag(α_t) S_{t−1} + k_t v_tᵀ``,
``o_t = S_tᵀ q_t`` written here one step at a time from the equations (fp64 to 1e-12, fp32 to
1e-5 relative, values and gradients), with per-step log-gates down to −50 mixed with open
gates (the stable form) and with weak gates (the fast form); gate logits of −2000 (log-gates
of −125 per step) stay finite forwards and backwards; ``step`` equals ``forward`` there; the
two within-chunk forms agree where both are exact; and the exported graph at a strongly
closed gate matches torch (``test_blocks_recurrent.py::test_gla_firmly_closed_gate_...``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archir import registry
from archir.blocks import recurrent
from archir.blocks.recurrent import GLA, GLA_CHUNK, _gla_intra_fast, _gla_intra_stable
from archir.registry import BuildContext

D = 32


def _build(**params: object) -> GLA:
    kind = registry.get("gla")
    ctx = BuildContext(d_model=D, vocab_size=64)
    p = kind.params(**params)
    kind.check(p, ctx)
    m = kind.build(p, ctx)
    assert isinstance(m, GLA)
    return m


def _strong(m: GLA, seed: int = 0) -> GLA:
    """Gate logits from about −900 to +20, varying with the input by about ±30 per step:
    per-step log-gates from below −50 to about 0 in every head, strong and weak steps mixed
    within a channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dk = m.gk2.bias.numel()
        m.gk2.bias.copy_(torch.linspace(-900.0, 20.0, dk)[torch.randperm(dk, generator=g)])
        m.gk2.weight.mul_(3000.0)
    return m


def _naive(m: GLA, x: torch.Tensor) -> torch.Tensor:
    """GLA from the paper's equations, one step at a time: ``x [B, T, d] -> [B, T, d]``."""
    B, T, _ = x.shape
    H, hk, hv = m.h, m.hk, m.hv
    q = (x @ m.q.weight.T).view(B, T, H, hk) * hk**-0.5
    k = (x @ m.k.weight.T).view(B, T, H, hk)
    v = (x @ m.v.weight.T).view(B, T, H, hv)
    z = (x @ m.gk1.weight.T) @ m.gk2.weight.T + m.gk2.bias
    alpha = torch.exp(F.logsigmoid(z) / m.norm_gate).view(B, T, H, hk)
    S = torch.zeros(B, H, hk, hv, dtype=x.dtype)
    outs = []
    for t in range(T):
        S = alpha[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append((q[:, t, :, :, None] * S).sum(-2))  # o_t = S_tᵀ q_t  [B, H, hv]
    o = torch.stack(outs, 1)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + m.eps)  # RMSNorm per head
    o = o.reshape(B, T, H * hv) * m.norm_weight
    return (F.silu(x @ m.g.weight.T) * o) @ m.o.weight.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("strong", [False, True])
def test_forward_and_gradients_match_the_recurrence(
    dtype: torch.dtype, tol: float, strong: bool
) -> None:
    """No clamp: weak gates (the fast form) and per-step log-gates below −50 (the stable form)
    both match the step-by-step recurrence in fp64 (the reference), values and gradients;
    the recurrence was off by 0.29 with the old −4 clamp at closed gates."""
    torch.manual_seed(0)
    m = _build(n_heads=2, gate_rank=16)
    if strong:
        _strong(m)
    ref_m = _build(n_heads=2, gate_rank=16).double()
    ref_m.load_state_dict(m.state_dict())
    m = m.to(dtype)
    x = torch.randn(2, 3 * GLA_CHUNK + 5, D, dtype=torch.float64)
    w = torch.randn(x.shape, dtype=torch.float64)
    la = m._log_gate(x.to(dtype)).detach()
    if strong:  # the range was reached, strong and weak steps within one channel
        assert float(la.min()) < -50 and float(la.max()) > -0.1
        assert float((la.amax(1) - la.amin(1)).max()) > 4.0
    else:
        assert float(la.min()) > -recurrent.GLA_FAST_LOG_DECAY
    y = m(x.to(dtype))
    ref = _naive(ref_m, x)
    assert _rel(y, ref) < tol
    got = torch.autograd.grad((y.double() * w).sum(), list(m.parameters()))
    want = torch.autograd.grad((ref * w).sum(), list(ref_m.parameters()))
    for name, a, b in zip(dict(m.named_parameters()), got, want, strict=True):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 10 * tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shut_gates_stay_finite_and_step_equals_forward(dtype: torch.dtype) -> None:
    """Gate logits of −2000 in half the channels (log-gate −125 per step, a state that
    forgets everything at every step) next to open ones: finite values and gradients, and the
    step form (the recurrence) equals forward."""
    torch.manual_seed(1)
    m = _build()
    with torch.no_grad():
        m.gk2.bias[::2] = -2000.0
    m = m.to(dtype)
    x = torch.randn(2, 2 * GLA_CHUNK + 3, D, dtype=dtype, requires_grad=True)
    assert float(m._log_gate(x).detach().min()) < -120
    y = m(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        state = m.init_state(2, dtype=dtype)
        steps = []
        for t in range(x.shape[1]):
            yt, state = m.step(x[:, t], state)
            steps.append(yt)
        assert _rel(torch.stack(steps, 1), y) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_within_chunk_forms_agree_and_forward_picks_the_fast_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where both are exact (log-gates ≥ −4) the fast and stable within-chunk forms give the
    same scores (fp64); eager ``forward`` takes the fast one then, the stable one as soon as
    one step's log-gate is below −GLA_FAST_LOG_DECAY."""
    g = torch.Generator().manual_seed(2)
    C, hk = GLA_CHUNK, 8
    q, k = (torch.randn(3, 2, C, hk, generator=g, dtype=torch.float64) for _ in range(2))
    la = -4.0 * torch.rand(3, 2, C, hk, generator=g, dtype=torch.float64)
    G = la.cumsum(-2)
    direct = (
        (q[..., :, None, :] * k[..., None, :, :])
        * torch.exp(G[..., :, None, :] - G[..., None, :, :])
    ).sum(-1)
    direct = direct * torch.ones(C, C, dtype=torch.float64).tril()
    torch.testing.assert_close(_gla_intra_stable(q, k, la), direct, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(_gla_intra_fast(q, k, G), direct, rtol=1e-12, atol=1e-13)

    calls: list[str] = []
    stable = recurrent._gla_intra_stable
    monkeypatch.setattr(
        recurrent, "_gla_intra_stable", lambda *a: calls.append("stable") or stable(*a)
    )
    m = _build()
    x = torch.randn(1, 20, D)
    m(x)
    with torch.no_grad():
        m.gk2.bias[0] = -100.0  # one channel: log-gate −6.25
    m(x)
    assert calls == ["stable"]


def test_padding_with_closed_bias_gates_takes_no_part() -> None:
    """A length that is not a multiple of the chunk pads with zero inputs, whose gate logits
    are the bias alone: strongly closed (−900) while every real token's gate is open. The
    padded steps carry no decay, so the fast form runs on the real steps' gates only (it
    rescaled around a padded middle step and gave NaN once), and forward equals step."""
    torch.manual_seed(3)
    m = _build(n_heads=2)
    with torch.no_grad():
        m.gk2.bias.fill_(-900.0)
        m.gk1.weight.zero_()
        m.gk1.weight[0, 0] = 1.0
        m.gk2.weight.zero_()
        m.gk2.weight[:, 0] = 1000.0  # z = 1000·x₀ − 900
    x = torch.randn(2, GLA_CHUNK + 5, D)
    x[..., 0] = 1.0  # real tokens: z = 100, open gates
    assert float(m._log_gate(x).detach().min()) > -1e-6
    assert float(m._log_gate(torch.zeros(D)).detach().min()) < -50  # a padded step's gate
    y = m(x.requires_grad_(True))
    grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        state = m.init_state(2)
        steps = []
        for t in range(x.shape[1]):
            yt, state = m.step(x[:, t], state)
            steps.append(yt)
    assert _rel(torch.stack(steps, 1), y) < 1e-5


@pytest.mark.parametrize("strong", [False, True])
def test_the_graph_capture_form_matches_the_recurrence(
    strong: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under graph capture (export, compile) GLA carries the state between chunks by the
    masked decay matrix of the chunk totals (``_chunk_decay``) instead of eager's loop:
    the same recurrence, in fp64 to 1e-12, with closed gates (chunk totals near −800) and
    open ones, over 8 chunks and a partial one."""
    torch.manual_seed(1)
    m = _build(n_heads=2, gate_rank=16).double()
    if strong:
        _strong(m, seed=1)
    x = torch.randn(2, 8 * GLA_CHUNK + 3, D, dtype=torch.float64)
    ref = _naive(m, x)
    eager = m(x)
    monkeypatch.setattr(recurrent, "tracing", lambda: True)
    captured = m(x)
    assert _rel(captured, ref) < 1e-12 and _rel(eager, ref) < 1e-12
    # the decay itself: exp of the sum of the totals strictly after j up to i, 0 above
    g = torch.tensor([[-1.0, -0.5, -800.0, 0.0]], dtype=torch.float64)
    d = recurrent._chunk_decay(g)[0]
    for i in range(4):
        for j in range(4):
            want = torch.exp(g[0, j + 1 : i + 1].sum().clamp(min=-80.0)) if j <= i else 0.0
            assert float(d[i, j]) == pytest.approx(float(want), rel=1e-12, abs=0), (i, j)
