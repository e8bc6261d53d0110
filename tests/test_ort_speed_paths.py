"""The graphs archir exports for onnxruntime (issue 14, part 6): Mamba's export-shaped scan
stays exact for strong decays, and archir's onnxruntime paths refuse a sequence past
``max_seq_len`` with an error that names it. (Speed itself is measured in
``benchmarks/onnx_vs_torch.py``, not here.)"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import archir
from archir.errors import ExportError

pytest.importorskip("onnxruntime")


from tests.test_blocks_recurrent import _naive_scan  # the step-by-step reference


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("scale", [0.05, 6.0])
def test_mamba_export_scan_is_exact_for_any_decay(
    dtype: torch.dtype, tol: float, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan as exported (sub-chunk recurrences, chunk carry) matches the step-by-step
    recurrence for weak decays and for Δ·A below −50, at lengths around the export chunk
    (padding) — values and gradients (autograd runs through the exported form too)."""
    from archir.blocks import ssm

    monkeypatch.setattr(ssm, "tracing", lambda **_: True)  # eager, on the export path
    assert ssm.tracing(compiling=False)
    g = torch.Generator().manual_seed(5)
    di, N = 8, 4
    A = -torch.exp(torch.rand(di, N, generator=g, dtype=dtype) * 3)
    for T in (1, ssm.EXPORT_CHUNK - 1, ssm.EXPORT_CHUNK + 1, 3 * ssm.EXPORT_CHUNK + 7):
        dt = torch.rand(2, T, di, generator=g, dtype=dtype) * scale
        ux, Bm, Cm = (torch.randn(2, T, k, generator=g, dtype=dtype) for k in (di, N, N))
        if scale > 1 and T > 16:
            assert float((dt[..., None] * A).min()) < -50
        args = [t.clone().requires_grad_(True) for t in (dt, A, ux, Bm, Cm)]
        y, ref = ssm.selective_scan(*args), _naive_scan(*args)
        assert float((y - ref).detach().abs().max() / ref.detach().abs().max()) < tol, T
        gy = torch.autograd.grad(y.square().sum(), args)
        gr = torch.autograd.grad(ref.square().sum(), args)
        for a, b in zip(gy, gr, strict=True):  # (∂Δ is 0 at T = 1: no state decays yet)
            assert float((a - b).abs().max()) <= 10 * tol * float(b.abs().max()), T


@pytest.mark.slow  # ~27 s; test_blocks_recurrent's strong-decay export parity stays default
def test_mamba_with_strong_decays_matches_in_onnxruntime() -> None:
    """A Mamba block whose Δ·A reaches about −60 and beyond, exported with torch.export
    (dynamic batch and sequence): onnxruntime matches PyTorch at lengths other than the
    traced one, across several export chunks."""
    import onnxruntime as ort

    from archir.blocks import ssm

    torch.manual_seed(0)
    m = ssm.Mamba(16, ssm.MambaParams(d_state=8)).eval()
    with torch.no_grad():
        m.A_log.add_(4.0)  # A down to −8·e⁴
        m.dt_proj.bias.fill_(1.0)
    x0 = torch.randn(2, 67, 16)
    with torch.no_grad():
        xi = m.in_proj(x0).chunk(2, dim=-1)[0]
        xc = torch.nn.functional.silu(m.conv(xi.transpose(1, 2))[..., :67].transpose(1, 2))
        log_decay = m._ssm_inputs(xc)[0]
    assert float(log_decay.min()) < -60
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            m,
            (x0,),
            None,
            dynamo=True,
            dynamic_shapes={
                "x": {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=512)}
            },
            verbose=False,
        )
    assert prog is not None
    sess = ort.InferenceSession(
        prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    gen = torch.Generator().manual_seed(1)
    for b, t in ((1, 1), (3, 64), (2, 200)):
        x = torch.randn(b, t, 16, generator=gen)
        with torch.no_grad():
            ref = m(x).numpy()
        (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        assert float(np.abs(out - ref).max()) < 1e-4 * max(1.0, float(np.abs(ref).max())), t


def _tiny(pos: str) -> archir.Spec:
    return archir.spec_from_dict(
        {
            "archir": 1,
            "name": f"tiny-{pos}",
            "model": {
                "task": "causal_lm",
                "vocab_size": 32,
                "d_model": 16,
                "max_seq_len": 24,
                "embed": {"kind": "token_embedding", "pos": pos},
                "layers": [{"repeat": 1, "blocks": [{"kind": "attention", "n_heads": 2}]}],
                "head": {"kind": "lm_head"},
            },
        }
    )


@pytest.mark.parametrize("pos", ["learned", "none"])
def test_onnxruntime_paths_name_max_seq_len(pos: str, tmp_path: Path) -> None:
    """Past max_seq_len, archir's onnxruntime paths (the parity comparison, the task
    evaluator's module, run_session) raise an ExportError naming the input, its length and
    max_seq_len — for a model with a hard limit (learned positions: onnxruntime itself only
    says 'Attempting to broadcast an axis ...') and for one that would run past it."""
    from exporters import export_onnx
    from exporters.parity import OrtModule, compare, make_session, max_seq_len_of, run_session

    spec = _tiny(pos)
    model = archir.compile(spec, seed=0).eval()
    path = tmp_path / "m.onnx"
    export_onnx(spec, path, model=model, task="random")
    sess = make_session(str(path))
    meta = sess.get_modelmeta().custom_metadata_map
    assert max_seq_len_of(meta) == 24 and meta["archir.max_seq_len"] == "24"
    ok = torch.randint(0, 32, (2, 24))
    assert run_session(sess, ok)[0].shape == (2, 24, 32)
    assert compare(sess, model, [ok]).passed
    long = torch.randint(0, 32, (1, 30))
    for call in (
        lambda: run_session(sess, long.numpy()),
        lambda: OrtModule(sess)(long),
        lambda: compare(sess, model, [ok, long]),
    ):
        with pytest.raises(ExportError) as info:
            call()
        msg = str(info.value)
        assert "input 'tokens' has 30 positions" in msg and "max_seq_len 24" in msg, msg
        assert "tiny-" in msg and "hint:" in msg
    from exporters.latency.harness import Runner

    with (
        Runner(spec, "torch", model=model) as r,
        pytest.raises(ExportError, match="max_seq_len 24"),
    ):
        r.call_for(1, 30)  # the latency harness names the limit too


def test_max_seq_len_metadata_key_wins_over_the_description() -> None:
    from exporters.parity import max_seq_len_of

    desc = '{"tokens": "int64 [batch, seq] token ids in [0, 256), seq <= 512 (max_seq_len)"}'
    assert max_seq_len_of({"archir.inputs": desc}) == 512
    assert max_seq_len_of({"archir.inputs": desc, "archir.max_seq_len": "128"}) == 128
    assert max_seq_len_of({}) is None
    assert max_seq_len_of({"archir.inputs": "not json"}) is None
