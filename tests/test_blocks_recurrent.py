"""Recurrent and state-space mixers: every kind the registry declares ``recurrent`` with a
fixed-size state (``state_grows`` false) — linear attention, GLA, RetNet, RWKV (time and
channel mixing), Mamba, Mamba-2, S4D and any kind registered since, in whichever file.

For every kind: output shape, exact parameter count (module vs registry formula), step form
vs parallel form, causality, state bytes vs the real state, a spec using it compiles and
trains, and ONNX export with a dynamic sequence axis matches onnxruntime at other lengths.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import pytest
import torch

import archir
from archir import registry
from archir.blocks.ssm import S4DParams
from archir.registry import BuildContext
from tests.conftest import ZOO

D = 32
#: every recurrent mixer with a fixed-size state, from the registry (a long convolution such as
#: hyena is recurrent too, but its state grows: tests/test_blocks_conv_moe.py)
KINDS = [
    k.name
    for k in registry.kinds()
    if k.role in ("token_mixer", "channel_mixer") and k.recurrent and not k.state_grows
]

#: non-default parameters of every kind in :data:`KINDS` (exact parameter count and step form
#: vs parallel form with them), or the reason a kind has no such case here
NON_DEFAULT: dict[str, dict[str, object] | str] = {
    "gla": {"n_heads": 2, "expand_k": 1.0, "expand_v": 2.0, "gate_rank": 4},
    "retnet": {"pos": "none", "expand_v": 1.0},
    "mamba": {"d_state": 4, "d_conv": 2, "expansion": 1.5, "dt_rank": 3, "conv_bias": False},
    "mamba2": "covered by tests/test_blocks_ssd.py::test_params_flops_state_and_step",
    "s4d": {"d_state": 6},
    "rwkv": "RWKV time mixing has no parameters besides d_model",
    "rwkv_cmix": {"d_ff": 50},
    "linear_attention": {"feature_map": "relu", "n_heads": 8},
    "slstm": {"n_heads": 2, "conv_kernel": 0, "forget_gate": "exp", "forget_bias": "linspace"},
    "mlstm": {
        "n_heads": 2,
        "expansion": 1.5,
        "multiple_of": 8,
        "conv_kernel": 2,
        "qkv_blocksize": 2,
        "chunk": 8,
        "bias": True,
    },
    "gated_deltanet": {"n_heads": 2, "expand_v": 1.0, "d_conv": 2, "conv_bias": True},
    "aaren": {"n_heads": 2, "head_dim": 8, "bias": True},
}


def _build(name: str, d: int = D, **params: object) -> tuple[torch.nn.Module, object]:
    kind = registry.get(name)
    ctx = BuildContext(d_model=d, vocab_size=256)
    p = kind.params(**params)
    kind.check(p, ctx)
    return kind.build(p, ctx), p


def _run_steps(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    state = m.init_state(x.shape[0], device=x.device, dtype=x.dtype)  # type: ignore[operator]
    ys = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)  # type: ignore[operator]
        ys.append(y)
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("name", KINDS)
def test_registered_metadata(name: str) -> None:
    kind = registry.get(name)
    assert kind.recurrent and not kind.state_grows
    assert kind.role in ("token_mixer", "channel_mixer")
    assert kind.paper and kind.summary
    cls = type(_build(name)[0])
    assert cls.__doc__ and "[B, T, d]" in cls.__doc__


@pytest.mark.parametrize("name", KINDS)
def test_shape_and_exact_param_count(name: str) -> None:
    torch.manual_seed(0)
    m, p = _build(name)
    ctx = BuildContext(d_model=D, vocab_size=256)
    n = sum(q.numel() for q in m.parameters())
    assert n == registry.get(name).n_params(p, ctx)
    for T in (1, 17, 64):
        assert m(torch.randn(2, T, D)).shape == (2, T, D)


@pytest.mark.parametrize("name", KINDS)
def test_param_count_non_default(name: str) -> None:
    if name not in NON_DEFAULT:
        pytest.fail(
            f"recurrent kind '{name}' has no entry in NON_DEFAULT (tests/test_blocks_recurrent.py): "
            "add a dict of non-default parameters that build at d_model 32, or a string saying "
            "why there is none (e.g. where another test covers them)"
        )
    params = NON_DEFAULT[name]
    if isinstance(params, str):
        pytest.skip(params)
    m, p = _build(name, **params)
    ctx = BuildContext(d_model=D, vocab_size=256)
    assert sum(q.numel() for q in m.parameters()) == registry.get(name).n_params(p, ctx)
    x = torch.randn(1, 19, D, dtype=torch.float64)
    m = m.double()
    torch.testing.assert_close(_run_steps(m, x), m(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", KINDS)
def test_step_matches_parallel(name: str) -> None:
    torch.manual_seed(1)
    m, _ = _build(name)
    m = m.double()
    for T in (1, 17, 40):  # 40 > Mamba's chunk: crosses chunk boundaries
        x = torch.randn(2, T, D, dtype=torch.float64)
        torch.testing.assert_close(_run_steps(m, x), m(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", KINDS)
def test_step_matches_parallel_fp32(name: str) -> None:
    torch.manual_seed(2)
    m, _ = _build(name)
    x = torch.randn(2, 33, D)
    torch.testing.assert_close(_run_steps(m, x), m(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", KINDS)
def test_causal(name: str) -> None:
    torch.manual_seed(3)
    m, _ = _build(name)
    m = m.double()
    x = torch.randn(2, 24, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 11:] = torch.randn(2, 13, D, dtype=torch.float64)
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :11], y2[:, :11], atol=1e-12, rtol=0)
    assert (y[:, 11:] - y2[:, 11:]).abs().max() > 1e-6


@pytest.mark.parametrize("name", KINDS)
def test_state_bytes_fixed_and_equal_to_real_state(name: str) -> None:
    kind = registry.get(name)
    m, p = _build(name)
    ctx = BuildContext(d_model=D, vocab_size=256)
    short, long = kind.state_bytes(p, ctx, 16), kind.state_bytes(p, ctx, 4096)
    assert short == long > 0
    state = m.init_state(1)  # type: ignore[operator]
    real = sum(t.numel() * 4 for t in state if t.is_floating_point())
    assert real == short
    # per-token FLOPs of a chunked or parallel form grow with the length (up to its chunk); a
    # step-by-step recurrence (sLSTM, RWKV's channel mix) costs the same at every length
    assert kind.flops(p, ctx, 256) >= kind.flops(p, ctx, 16) > 0


@pytest.mark.parametrize("strong", [False, True])
def test_mamba_backward_matches_step_form(strong: bool) -> None:
    """Mamba's scan gradients against autograd through the step form (fp64, across chunk
    boundaries): the hand-written backward of the fast form, and (``strong``: many Δ·A
    beyond −FAST_LOG_DECAY) autograd through the stable form."""
    torch.manual_seed(6)
    m, _ = _build("mamba", d_state=4, dt_rank=3)
    m = m.double()
    if strong:
        with torch.no_grad():
            m.A_log.add_(4.0)  # type: ignore[operator]
    x = torch.randn(2, 70, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 70, D, dtype=torch.float64)
    params = [x, *m.parameters()]
    got = torch.autograd.grad((m(x) * w).sum(), params)
    want = torch.autograd.grad((_run_steps(m, x) * w).sum(), params)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7)


def _naive_scan(dt, A, ux, Bm, Cm):  # type: ignore[no-untyped-def]
    """The selective scan one step at a time (Gu & Dao's reference recurrence)."""
    h = torch.zeros(dt.shape[0], dt.shape[2], A.shape[1], dtype=dt.dtype)
    ys = []
    for t in range(dt.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + ux[:, t, :, None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_mamba_scan_is_exact_without_a_clamp(dtype: torch.dtype, tol: float, scale: float) -> None:
    """No clamp on Δ·A: weak decays (the fast form) and decays down to about −60 per step
    (the stable form) both match the step-by-step recurrence — to 1e-12 relative in fp64 and
    1e-5 in fp32, values and gradients (issue 16: the −4 clamp was off by 1.7e-2)."""
    from archir.blocks.ssm import selective_scan

    g = torch.Generator().manual_seed(11)
    B, T, di, N = 2, 100, 8, 4
    dt = torch.rand(B, T, di, generator=g, dtype=dtype) * scale
    A = -torch.exp(torch.rand(di, N, generator=g, dtype=dtype) * 3)
    ux, Bm, Cm = (torch.randn(B, T, k, generator=g, dtype=dtype) for k in (di, N, N))
    if scale > 1:
        assert float((dt[..., None] * A).min()) < -50
    args = [t.requires_grad_(True) for t in (dt, A, ux, Bm, Cm)]
    y, ref = selective_scan(*args), _naive_scan(*args)
    assert float((y - ref).abs().max() / ref.abs().max()) < tol
    with torch.no_grad():  # inference runs the stable form without autograd (as export does)
        y0 = selective_scan(*args)
    assert float((y0 - ref).abs().max() / ref.abs().max()) < tol
    gy = torch.autograd.grad(y.square().sum(), args)
    gr = torch.autograd.grad(ref.square().sum(), args)
    for a, b in zip(gy, gr, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) < 10 * tol


def test_mamba_with_strong_decays_exports_with_parity(tmp_path: Path) -> None:
    """A Mamba whose Δ·A reaches far below −4 (as trained checkpoints do) exports and
    onnxruntime matches PyTorch: the exported graph runs the stable form."""
    from exporters import export_onnx

    spec = archir.spec_from_dict(
        {
            "archir": 1,
            "name": "strong-mamba",
            "model": {
                "vocab_size": 256,
                "d_model": 32,
                "max_seq_len": 128,
                "embed": {"kind": "token_embedding"},
                "layers": [{"repeat": 1, "blocks": [{"kind": "mamba", "d_state": 8}]}],
                "head": {"kind": "lm_head"},
            },
        }
    )
    model = archir.compile(spec, seed=0)
    with torch.no_grad():
        model.blocks[0].fn.A_log.add_(4.0)  # A down to −16·e⁴
        model.blocks[0].fn.dt_proj.bias.fill_(1.0)
    w = tmp_path / "w.safetensors"
    from safetensors.torch import save_model

    save_model(model, str(w))
    rep = export_onnx(spec, tmp_path / "m.onnx", weights=str(w), exporter="legacy")
    assert rep.parity is not None and rep.parity.passed, rep.parity


@pytest.mark.parametrize("strong", [False, True])
def test_mamba_backward_twice_with_retain_graph(strong: bool) -> None:
    """The scan reuses scratch buffers between calls (the fast form's and, ``strong``, the
    stable form's); a retained graph still gives the same gradients on a second backward (or
    autograd refuses it), never silently different ones."""
    torch.manual_seed(7)
    m, _ = _build("mamba")
    if strong:
        with torch.no_grad():
            m.A_log.add_(4.0)  # type: ignore[operator]
    x = torch.randn(2, 40, D)
    loss = m(x).square().sum()
    g1 = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(loss, list(m.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    loss = m(x).square().sum()
    torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
    m(torch.randn(2, 40, D)).square().sum().backward()  # reuses the freed buffers
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, list(m.parameters()))


@pytest.mark.parametrize("name", KINDS)
def test_a_run_under_inference_mode_leaves_later_runs_alone(name: str) -> None:
    """A forward under ``torch.inference_mode`` (how deployment code evaluates) and then an
    ordinary forward and backward on the same thread: the same values, no error. Mamba's
    scan handed the scratch buffer it made under inference mode to the next forward, which
    torch refused to write ("Inplace update to inference tensor outside InferenceMode")."""
    torch.manual_seed(3)
    m, _ = _build(name)
    x = torch.randn(2, 24, D)
    with torch.inference_mode():
        want = m(x)
    got = m(x)
    got.square().sum().backward()
    torch.testing.assert_close(got.detach(), want.clone(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mamba", "gla", "rwkv"])
def test_long_sequence_fp32_is_stable(name: str) -> None:
    torch.manual_seed(4)
    m, _ = _build(name)
    x = torch.randn(1, 1024, D)
    y = m(x)
    ref = m.double()(x.double())
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-4


def test_check_errors() -> None:
    ctx = BuildContext(d_model=30)
    with pytest.raises(ValueError, match="n_heads 4 does not divide d_model 30"):
        registry.get("linear_attention").check(registry.get("linear_attention").params(), ctx)
    with pytest.raises(
        ValueError, match="n_heads 4 does not divide the key width expand_k·d_model = 15"
    ):
        registry.get("gla").check(registry.get("gla").params(), ctx)
    with pytest.raises(ValueError, match="d_state 5 must be even"):
        registry.get("s4d").check(S4DParams.model_validate({"d_state": 5}), ctx)


def _spec(name: str) -> dict[str, object]:
    if registry.get(name).role == "channel_mixer":
        blocks = [{"kind": "rwkv"}, {"kind": name}]
    else:
        blocks = [{"kind": name}, {"kind": "swiglu", "expansion": 2}]
    return {
        "archir": 1,
        "name": f"tiny-{name}",
        "model": {
            "task": "causal_lm",
            "vocab_size": 256,
            "d_model": D,
            "max_seq_len": 64,
            "norm": "rmsnorm",
            "embed": {"kind": "token_embedding"},
            "layers": [{"repeat": 2, "blocks": blocks}],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
        "train": {"steps": 10, "batch_size": 4, "seq_len": 32, "lr": 3e-3},
    }


@pytest.mark.parametrize("name", KINDS)
def test_spec_compiles_and_trains(name: str) -> None:
    spec = archir.spec_from_dict(_spec(name))
    model = archir.compile(spec, seed=0)
    assert archir.analyze(spec).params == sum(p.numel() for p in model.parameters())
    text = b"def f(x):\n    return x + 1\n# the quick brown fox jumps over the lazy dog\n" * 4
    data = torch.tensor(list(text[: 4 * 33]), dtype=torch.long).view(4, 33)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def _recurrent_zoo() -> list[str]:
    """Zoo specs built of these kinds (at least one, and no mixer whose state grows)."""
    out = []
    for path in sorted(ZOO.glob("*.yaml")):
        model = archir.load_spec(path).data["model"]
        used = {b.get("kind") for g in model.get("layers", []) for b in g.get("blocks", [])}
        if used & set(KINDS) and not any(registry.get(k).state_grows for k in used):
            out.append(path.stem)
    return out


@pytest.mark.parametrize("zoo_name", _recurrent_zoo())
def test_zoo_spec(zoo_name: str) -> None:
    spec = archir.load_spec(ZOO / f"{zoo_name}.yaml")
    model = archir.compile(spec, seed=0)
    report = archir.analyze(spec)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.state_bytes == archir.analyze(spec, seq_len=512).state_bytes > 0
    assert model(torch.randint(0, 256, (1, 9))).shape == (1, 9, 256)


_HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


@pytest.mark.skipif(not _HAS_ORT, reason="onnx/onnxruntime not installed")
@pytest.mark.parametrize("name", KINDS)
def test_onnx_export_dynamic_seq(name: str) -> None:
    import onnxruntime as ort

    torch.manual_seed(5)
    m, _ = _build(name, d=16)
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
    for T in (1, 13, 40):
        x = torch.randn(3, T, 16)
        (got,) = sess.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = m(x).numpy()
        assert abs(got - ref).max() < 1e-5


def _wkv_reference(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """RWKV-4 wkv by the step recurrence (running max exponent), ``[B, T, d]``."""
    B, T, d = k.shape
    aa, bb = torch.zeros(B, d, dtype=k.dtype), torch.zeros(B, d, dtype=k.dtype)
    pp = torch.full((B, d), -1e38, dtype=k.dtype)
    out = []
    for t in range(T):
        p = torch.maximum(pp, u + k[:, t])
        e1, e2 = torch.exp(pp - p), torch.exp(u + k[:, t] - p)
        out.append((e1 * aa + e2 * v[:, t]) / (e1 * bb + e2))
        p = torch.maximum(pp + w, k[:, t])
        e1, e2 = torch.exp(pp + w - p), torch.exp(k[:, t] - p)
        aa, bb, pp = e1 * aa + e2 * v[:, t], e1 * bb + e2, p
    return torch.stack(out, 1)


def test_rwkv_wkv_keys_drifting_over_a_wide_range_fp32() -> None:
    # keys spanning ±150 nats over the sequence (a global max-shift underflows to 0/0) but
    # < ~80 within a chunk; fast and slow decays; T not a multiple of the chunk
    from archir.blocks.recurrent import RWKV_CHUNK, rwkv_wkv

    torch.manual_seed(6)
    B, T, d = 2, 7 * RWKV_CHUNK + 5, 8
    w = -torch.exp(-5.0 + 8.0 * torch.linspace(0, 1, d) ** 1.5)
    u = torch.full((d,), -1.2)
    ramp = torch.linspace(-1, 1, T)[None, :, None] * torch.linspace(-150, 150, d)
    k = ramp + 2.0 * torch.randn(B, T, d)
    v = torch.randn(B, T, d)
    ref = _wkv_reference(w.double(), u.double(), k.double(), v.double())
    y = rwkv_wkv(w, u, k, v)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-4)


def test_rwkv_backward_matches_step_form() -> None:
    torch.manual_seed(7)
    m, _ = _build("rwkv")
    m = m.double()
    x = torch.randn(2, 45, D, dtype=torch.float64)  # two chunks, the second padded
    g = torch.randn(2, 45, D, dtype=torch.float64)
    params = list(m.parameters())
    ref = torch.autograd.grad((_run_steps(m, x) * g).sum(), params)
    got = torch.autograd.grad((m(x) * g).sum(), params)
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)


def test_gla_gradients_stay_finite_with_closed_gates_fp32() -> None:
    """Gates nearly closed on every step (log-gate −3.75, just above −GLA_FAST_LOG_DECAY, so
    the fast rescaled form runs) make the log-gate reach −60 within a chunk; that form once
    rescaled keys by exp(+60), whose square overflowed fp32 in the backward pass (NaN
    gradients seen at step 318 of a search's 800-step training). Gradients now match the
    step form's, in fp32. Stronger gates: tests/test_blocks_gla.py."""
    torch.manual_seed(8)
    m, _ = _build("gla")
    with torch.no_grad():
        m.gk2.bias.fill_(-60.0)  # logsigmoid(−60) / 16 = −3.75
        m.gk2.bias[::3] = 0.0  # some channels open, some closed
    x = torch.randn(2, 40, D)
    g = torch.randn(2, 40, D)
    params = [p for p in m.parameters() if p.requires_grad]
    got = torch.autograd.grad((m(x) * g).sum(), params)
    ref = torch.autograd.grad((_run_steps(m, x) * g).sum(), params)
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_gla_firmly_closed_gate_exports_like_torch(tmp_path) -> None:
    """A trained GLA gate can sit at pre-activations below −18, where onnxruntime's Sigmoid
    returns 0: a ``log(sigmoid(z))`` gate became −inf in the exported graph only — the main
    job's best model failed its parity gate by 0.012 on real text. The gate is computed as
    ``min(z, 0) − log1p(exp(−|z|))`` and exports like torch; with no clamp, gates far
    below −4 per step (down to −56 here) export like torch too (the stable form)."""
    from archir.spec import spec_from_dict
    from exporters import export_onnx

    spec = spec_from_dict(
        {
            "archir": 1,
            "name": "gla-closed",
            "model": {
                "task": "causal_lm",
                "vocab_size": 64,
                "d_model": 32,
                "max_seq_len": 64,
                "embed": {"kind": "token_embedding"},
                "layers": [{"blocks": [{"kind": "gla", "n_heads": 2}, {"kind": "mlp"}]}],
                "head": {"kind": "lm_head"},
            },
        }
    )
    model = archir.compile(spec, seed=0).eval()
    gla = model.blocks[0].fn
    with torch.no_grad():
        gla.gk2.bias.fill_(-24.0)  # logsigmoid ≈ −24, /16 = −1.5
        gla.gk2.bias[::2] = -900.0  # firmly closed: log-gate −56 per step
        x = torch.randn(2, 24, 32)
        assert (gla.gk2(gla.gk1(x)) < -18).float().mean() > 0.5
        assert float(gla._log_gate(x).min()) < -50
        torch.testing.assert_close(
            gla._log_gate(x), torch.nn.functional.logsigmoid(gla.gk2(gla.gk1(x))) / 16.0
        )
    report = export_onnx(spec, tmp_path / "g.onnx", model=model, task="random", quality=False)
    assert report.parity is not None and report.parity.passed, report.parity.summary()
