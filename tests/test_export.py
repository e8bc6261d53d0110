"""ONNX export: metadata round trip, the parity gate, quantized variants, the safetensors
bundle and the ``archir export`` / ``archir show x.onnx`` command lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import archir
from archir.cli import main
from archir.errors import ExportError
from archir.spec import spec_from_dict
from exporters import export_onnx, export_safetensors, load_bundle, read_metadata
from exporters import onnx_export as oe
from exporters.parity import make_session


def lm_spec(d: int = 32, layers: int = 2, expansion: float = 4.0, **block: Any) -> Any:
    return spec_from_dict(
        {
            "archir": 1,
            "name": "tiny-lm",
            "model": {
                "task": "causal_lm",
                "vocab_size": 64,
                "d_model": d,
                "max_seq_len": 256,
                "embed": {"kind": "token_embedding"},
                "layers": [
                    {
                        "repeat": layers,
                        "blocks": [
                            {"kind": "attention", "n_heads": 4, **block},
                            {"kind": "mlp", "expansion": expansion},
                        ],
                    }
                ],
                "head": {"kind": "lm_head"},
            },
            "train": {"seq_len": 32},
        }
    )


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Any]:
    spec = lm_spec()
    path = tmp_path_factory.mktemp("exp") / "m.onnx"
    report = export_onnx(spec, path, task="random")
    return spec, path, report


def test_report_and_metadata_round_trip(fp32_file: tuple[Any, Path, Any]) -> None:
    spec, path, report = fp32_file
    assert report.written and report.path == str(path)
    assert report.parity is not None and report.parity.passed
    assert report.parity.max_abs_err <= report.parity.tolerance
    assert report.file_bytes == path.stat().st_size
    assert [str(t) for t in report.inputs] == ["tokens: int64[batch, seq]"]
    assert [str(t) for t in report.outputs] == ["logits: float32[batch, seq, 64]"]
    assert report.opset >= 18
    assert set(report.block_precision.values()) == {"fp32"}
    assert "layers.0.blocks.0" in report.block_precision
    d = report.to_dict()
    json.dumps(d, default=str)
    assert d["parity"]["passed"] is True
    assert "parity fp32: ok" in str(report)

    meta = read_metadata(path)
    assert meta["archir.version"] == archir.__version__
    assert meta["archir.precision"] == "fp32"
    assert "tokens" in json.loads(meta["archir.inputs"])
    # the stored spec is the concrete spec: it loads back and compiles to the same graph
    again = archir.spec_from_text(meta["archir.spec"])
    assert again.model == spec.model
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    # every weight MatMul is tagged with its IR block
    tags = {p.value for n in proto.graph.node for p in n.metadata_props}
    assert {"layers.0.blocks.0", "layers.1.blocks.1", "embed"} <= tags


def test_dynamic_axes_unseen_shapes(fp32_file: tuple[Any, Path, Any]) -> None:
    spec, path, _ = fp32_file
    model = archir.compile(spec, seed=0).eval()
    sess = make_session(str(path))
    for b, t in [(1, 1), (5, 3), (2, 200)]:
        x = torch.randint(0, 64, (b, t))
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {"tokens": x.numpy()})[0]
        assert out.shape == (b, t, 64)
        assert np.abs(out - ref).max() < 1e-4


def test_show_onnx_reads_metadata(fp32_file, capsys) -> None:
    _, path, _ = fp32_file
    assert main(["show", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision"] == "fp32" and info["spec_name"] == "tiny-lm"
    assert info["inputs"][0]["shape"] == ["batch", "seq"]
    assert "name: tiny-lm" in info["spec"]
    assert main(["show", str(path)]) == 0
    text = capsys.readouterr().out
    assert "tokens: int64[batch, seq]" in text and "precision fp32" in text


def test_parity_gate_refuses_a_broken_export(tmp_path: Path, monkeypatch, capsys) -> None:
    spec = lm_spec(layers=1)
    real = oe._torch_export

    def corrupt(model, spec_model, opset, exporter):
        proto, used, failures = real(model, spec_model, opset, exporter)
        # scale one weight matrix: a wrong graph that still loads
        init = max(proto.graph.initializer, key=lambda i: len(i.raw_data))
        arr = onnx.numpy_helper.to_array(init) * 1.5
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return proto, used, failures

    monkeypatch.setattr(oe, "_torch_export", corrupt)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError) as exc:
        export_onnx(spec, out, task="random")
    msg = str(exc.value)
    assert "parity check failed" in msg and "output 'logits'" in msg
    assert "position" in msg and "--force" in msg
    assert not out.exists()
    report = export_onnx(spec, out, task="random", force=True)
    assert out.exists() and report.forced and not report.parity.passed
    assert "--force" in str(report)
    # the CLI maps the refusal to exit 2 with the located message
    spec_file = tmp_path / "s.yaml"
    spec.save(spec_file)
    argv = ["export", str(spec_file), "--random-weights", "--task", "random"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "c.onnx")]) == 2
    assert "parity check failed" in capsys.readouterr().err
    assert not (tmp_path / "c.onnx").exists()


def test_parity_gate_feeds_the_longest_length(tmp_path: Path, monkeypatch) -> None:
    """A graph may switch forms with the length: a Hyena longer than ``DIRECT_MAX_LEN``
    runs its long convolution as a DFT past it. The gate feeds ``max_seq_len`` too, so an
    export whose long form is wrong is refused although every input up to the training
    length (which takes the direct form) matches."""
    import archir.blocks.conv as conv
    from exporters.parity import PARITY_LONG_MAX, parity_inputs

    spec = spec_from_dict(
        {
            "archir": 1,
            "name": "long-hyena",
            "model": {
                "task": "causal_lm",
                "vocab_size": 64,
                "d_model": 16,
                "max_seq_len": conv.DIRECT_MAX_LEN + 72,
                "embed": {"kind": "token_embedding"},
                "layers": [{"blocks": [{"kind": "hyena", "filter_width": 8}]}],
                "head": {"kind": "lm_head"},
            },
            "train": {"seq_len": 64},
        }
    )
    inputs, source = parity_inputs(spec.model, None)
    assert [tuple(x.shape) for x in inputs] == [(1, 1), (3, 17), (2, 64), (1, 200)]
    # the longest input reaches every form (and no further: attention's scores grow as T²)
    assert PARITY_LONG_MAX > max(up_to for up_to, _, _ in conv.DFT_FORMS)
    long = spec.model.model_copy(deep=True)
    long.model.max_seq_len = 100_000
    assert max(x.shape[1] for x in parity_inputs(long, None)[0]) == PARITY_LONG_MAX
    assert source == "random"

    class Short:  # a task whose data is shorter than max_seq_len
        name = "short"

        def train_batch(self, b: int, t: int, gen: torch.Generator) -> tuple[torch.Tensor]:
            if t > 100:
                raise ValueError("too long")
            return (torch.full((b, t), 7),)

    inputs, source = parity_inputs(spec.model, Short())
    assert source == "task:short + random"  # one shape at a time, not all or nothing
    assert [bool((x == 7).all()) for x in inputs] == [True, True, True, False]
    real = conv.causal_conv_dft
    monkeypatch.setattr(conv, "causal_conv_dft", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.raises(ExportError, match="parity check failed") as exc:
        export_onnx(spec, tmp_path / "bad.onnx", task="random")
    assert "[1, 200]" in str(exc.value)
    monkeypatch.setattr(conv, "causal_conv_dft", real)
    assert export_onnx(spec, tmp_path / "ok.onnx", task="random").parity.passed


@pytest.mark.slow  # 29 s; auto precision, MoE banks and static int8 keep quantization covered
def test_quantized_variants_smaller_and_reported(tmp_path: Path) -> None:
    spec = lm_spec(d=128, layers=2, expansion=4.0)  # linear-heavy
    sizes = {}
    for prec in ("fp32", "int8", "int4", "fp16"):
        r = export_onnx(spec, tmp_path / f"{prec}.onnx", precision=prec, task="random")
        sizes[prec] = (tmp_path / f"{prec}.onnx").stat().st_size
        assert read_metadata(tmp_path / f"{prec}.onnx")["archir.precision"] == prec
        if prec != "fp32":
            # quantized files are not refused by the fp32 tolerance; deviation is reported
            assert r.quantized_parity is not None and not r.quantized_parity.gated
            assert r.quantized_parity.max_abs_err < 0.5 * r.quantized_parity.scale
    assert sizes["fp32"] / sizes["int8"] >= 3.0
    assert sizes["fp32"] / sizes["int4"] >= 4.0
    assert sizes["fp32"] / sizes["fp16"] >= 1.8


def test_auto_precision_follows_block_bits(tmp_path: Path) -> None:
    data = lm_spec(d=64, layers=1).data
    blocks = data["model"]["layers"][0]["blocks"]
    blocks[0]["bits"] = 8
    blocks[1]["bits"] = 4
    spec = spec_from_dict(data)
    r = export_onnx(spec, tmp_path / "a.onnx", precision="auto", task="random")
    assert r.block_precision["layers.0.blocks.0"] == "int8"
    assert r.block_precision["layers.0.blocks.1"] == "int4"
    assert r.block_precision["embed"] == "fp32"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node}
    assert "MatMulNBits" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)


def test_int8_static_with_task_calibration_and_quality(tmp_path: Path) -> None:
    data = lm_spec(d=32, layers=1).data
    data["model"]["vocab_size"] = 256
    spec = spec_from_dict(data)
    r = export_onnx(spec, tmp_path / "s.onnx", precision="int8-static")
    assert r.parity is not None and r.parity.source == "task:text:pydoc"
    assert r.quality is not None and r.quality["metric"] == "val_bpb"
    assert abs(r.quality["delta"]) < 0.5
    ops = {n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_safetensors_bundle_round_trip(tmp_path: Path) -> None:
    spec = lm_spec(layers=1)
    model = archir.compile(spec, seed=3).eval()
    info = export_safetensors(spec, tmp_path / "b", model=model)
    assert Path(info["weights"]).is_file() and Path(info["spec"]).is_file()
    # plain core loading: compile + load_state_dict
    from safetensors.torch import load_file

    fresh = archir.compile(archir.load_spec(tmp_path / "b" / "spec.yaml"))
    fresh.load_state_dict(load_file(str(tmp_path / "b" / "model.safetensors")))
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
        assert torch.equal(load_bundle(tmp_path / "b")(x), model(x))
    # the bundle is also a run dir: export it with its weights
    r = export_onnx(
        archir.load_spec(tmp_path / "b" / "spec.yaml"),
        tmp_path / "b.onnx",
        weights=tmp_path / "b" / "model.safetensors",
        task="random",
    )
    sess = make_session(str(tmp_path / "b.onnx"))
    out = sess.run(None, {"tokens": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - model(x).numpy()).max() < 1e-4
    assert r.parity.passed


def test_cli_export_run_dir_check_only_and_errors(tmp_path: Path, capsys) -> None:
    spec = lm_spec(layers=1)
    run_dir = tmp_path / "runs" / "x" / "best"
    export_safetensors(spec, run_dir)
    out = tmp_path / "best.onnx"
    assert main(["export", str(run_dir), "--out", str(out), "--task", "random"]) == 0
    assert out.exists() and "parity fp32: ok" in capsys.readouterr().out
    assert main(["export", str(run_dir), "--check-only", "--task", "random", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["written"] is False and rep["parity"]["passed"] is True
    assert (
        main(["export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "d")]) == 0
    )
    assert (tmp_path / "d" / "model.safetensors").is_file()
    # user errors: exit 2 with a message
    assert main(["export", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert main(["export", str(tmp_path), "--out", str(out)]) == 2  # no spec.yaml
    assert "no spec.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # --weights is checked when the flags are read
        main(["export", str(run_dir), "--weights", str(tmp_path / "w.safetensors"), "-o", str(out)])
    assert exc.value.code == 2 and "w.safetensors" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "missing.onnx")]) == 2


def test_cli_export_run_folder_exports_its_best_and_random_weights_need_a_flag(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = lm_spec(layers=1)
    model = archir.compile(spec, seed=7).eval()
    run = tmp_path / "runs" / "lm"
    (run / "trials").mkdir(parents=True)
    (run / "spec.yaml").write_text("the spec as given: an open spec, not exported\n")
    export_safetensors(spec, run / "best", model=model)
    assert main(["export", "runs/lm", "--out", "lm.onnx", "--task", "random"]) == 0
    out = capsys.readouterr().out
    assert "parity fp32: ok" in out and "weights: random" not in out
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(make_session("lm.onnx").run(None, {"tokens": x.numpy()})[0] - ref).max() < 1e-4
    # a spec file alone: refused without --random-weights, exported (and said so) with it
    spec.save("s.yaml")
    assert main(["export", "s.yaml", "--out", "r.onnx"]) == 2
    assert "has no trained weights" in capsys.readouterr().err and not Path("r.onnx").exists()
    assert main(["export", "s.yaml", "--random-weights", "--out", "r.onnx", "--no-check"]) == 0
    assert "weights: random (untrained, seed 0)" in capsys.readouterr().out
    assert main(["export", "runs/lm", "--random-weights", "--out", "r.onnx"]) == 2
    assert "there are weights" in capsys.readouterr().err
    # a run folder whose best/ is missing
    (run / "best" / "model.safetensors").unlink()
    assert main(["export", "runs/lm", "--out", "x.onnx"]) == 2
    assert "its best/ has no model.safetensors" in capsys.readouterr().err


def test_wrong_weights_are_refused(tmp_path: Path) -> None:
    export_safetensors(lm_spec(d=64, layers=1), tmp_path / "big")
    with pytest.raises(ExportError, match="do not fit") as exc:
        export_onnx(
            lm_spec(layers=1), None, weights=tmp_path / "big" / "model.safetensors", check_only=True
        )
    # the message names the first shape mismatch with both shapes
    msg = str(exc.value)
    assert "shape mismatch" in msg and "[64, 64] in the file, [32, 32] in the spec" in msg
    # missing / unexpected keys: a spec with another block kind
    spec2 = lm_spec(layers=1)
    raw = spec2.to_dict() if hasattr(spec2, "to_dict") else None
    model = archir.compile(lm_spec(layers=2), seed=0)
    with pytest.raises(ExportError, match=r"unexpected key\(s\) \(first: 'blocks\.2\."):
        oe.load_weights(archir.compile(spec2, seed=0), _save(model, tmp_path / "two.st"))
    del raw
    with pytest.raises(ExportError, match=r"missing key\(s\) \(first: 'blocks\.2\."):
        oe.load_weights(model, _save(archir.compile(spec2, seed=0), tmp_path / "one.st"))
    (tmp_path / "junk.st").write_text("junk")
    with pytest.raises(ExportError, match="not a readable safetensors"):
        oe.load_weights(model, tmp_path / "junk.st")


def _save(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_model

    save_model(model, str(path))
    return path


def test_named_task_must_exist_and_bad_opset_is_refused_up_front(tmp_path: Path, capfd) -> None:
    spec = lm_spec(layers=1)
    spec_file = tmp_path / "s.yaml"
    spec.save(spec_file)
    capfd.readouterr()
    assert main(["export", str(spec_file), "--check-only", "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capfd.readouterr().err
    for bad in ("3", "17", "99"):
        assert main(["export", str(spec_file), "--check-only", "--opset", bad]) == 2
        err = capfd.readouterr().err
        assert f"opset {bad} is not supported" in err and "18..25" in err
        assert len(err.splitlines()) <= 2  # no exporter graph dump before the message
    # the legacy exporter accepts older opsets
    with pytest.raises(ExportError, match="opset 5 is not supported by the legacy"):
        export_onnx(spec, None, check_only=True, opset=5, exporter="legacy")


class _DataDependent(torch.nn.Module):
    """A model torch.export cannot export (a Python branch on a tensor's value)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(64, 8)
        self.out = torch.nn.Linear(8, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        if bool(h.sum() > 0):
            h = h * 2.0
        return self.out(h)


def test_fallback_to_legacy_is_quiet_and_says_why(capfd) -> None:
    spec = lm_spec(layers=1)
    model = _DataDependent()
    with torch.no_grad():  # make the branch's outcome the same for every input
        model.emb.weight.abs_()
    capfd.readouterr()
    r = export_onnx(spec, None, model=model, check_only=True, task="random")
    captured = capfd.readouterr()
    assert r.exporter == "legacy" and r.parity is not None and r.parity.passed
    assert captured.err == "" and captured.out == ""  # no FX graph dump
    (note,) = [n for n in r.notes if "legacy" in n]
    assert note.startswith("dynamo exporter failed (") and "\n" not in note
    assert len(note) < 400


def test_mamba_export_path_matches_eager_values_and_gradients(monkeypatch) -> None:
    """The scan's export/compile path (no scratch buffers, no data-dependent branch, plain
    differentiable ops) computes what the eager hand-written-backward path computes."""
    from archir.blocks import ssm

    torch.manual_seed(0)
    m = ssm.Mamba(16, ssm.MambaParams(d_state=4))
    for T in (1, 33, 70):
        x = torch.randn(2, T, 16, requires_grad=True)
        y = m(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        monkeypatch.setattr(ssm, "tracing", lambda **_: True)
        y2 = m(x)
        (g2,) = torch.autograd.grad(y2.square().sum(), x)
        monkeypatch.setattr(ssm, "tracing", lambda **_: False)
        assert torch.allclose(y, y2, atol=1e-5) and torch.allclose(g, g2, atol=1e-4)


@pytest.mark.heavy
def test_moe_expert_banks_are_quantized(tmp_path: Path) -> None:
    spec = spec_from_dict(
        {
            "archir": 1,
            "name": "tiny-moe",
            "model": {
                "task": "causal_lm",
                "vocab_size": 64,
                "d_model": 64,
                "max_seq_len": 128,
                "embed": {"kind": "token_embedding"},
                "layers": [{"repeat": 1, "blocks": [{"kind": "moe", "n_experts": 4}]}],
                "head": {"kind": "lm_head"},
            },
        }
    )
    model = archir.compile(spec, seed=0).eval()
    sizes = {}
    for prec in ("int8", "int4"):
        path = tmp_path / f"{prec}.onnx"
        r = export_onnx(spec, path, model=model, precision=prec, task="random", quality=False)
        assert r.parity is not None and r.parity.passed
        sizes[prec] = r.size_ratio
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        # each expert's two weight matrices are their own quantized MatMuls
        op = "MatMulInteger" if prec == "int8" else "MatMulNBits"
        assert ops.count(op) >= 2 * 4, (prec, ops.count(op))
    # expert banks are 4·2·64·128 of the ~4·64·64 + 4·64·128·2 weights: fp32 banks would
    # cap the ratio near 1.2x
    assert sizes["int8"] > 3.0 and sizes["int4"] > 4.0, sizes


@pytest.mark.slow
@pytest.mark.parametrize("zoo", sorted(Path("specs/zoo").glob("*.yaml")), ids=lambda p: p.stem)
def test_zoo_spec_exports(zoo: Path, tmp_path: Path) -> None:
    spec = archir.load_spec(zoo)
    r = export_onnx(spec, tmp_path / f"{zoo.stem}.onnx")
    assert r.parity is not None and r.parity.passed, r.parity
    model = archir.compile(spec, seed=0).eval()
    sess = make_session(str(tmp_path / f"{zoo.stem}.onnx"))
    from exporters.parity import compare, random_input

    gen = torch.Generator().manual_seed(5)
    m = spec.model.model
    shapes = [(1, 1), (3, 17), (1, min(300, m.max_seq_len))]
    inputs = [random_input(spec.model, b, t, gen) for b, t in shapes]
    rep = compare(sess, model, inputs)
    assert rep.passed, rep.summary()


def test_trained_moe_is_batch_independent_and_exports_with_parity(tmp_path: Path) -> None:
    """Issue 14: a *trained* MoE router is imbalanced, so capacity drops tokens — and which
    ones depends on the other sequences in the batch. Capacity belongs to training: in eval
    mode a sequence's logits are the same alone or batched, and the export (real text, the
    trained weights) passes the parity gate."""
    from archir.tasks import get_task
    from archir.train import train

    spec = lm_spec(d=32, layers=1, expansion=2.0)
    data = spec.data
    data["model"]["vocab_size"] = 256
    data["model"]["layers"][0]["blocks"][1] = {
        "kind": "moe",
        "n_experts": 4,
        "top_k": 2,
        "expansion": 2.0,
        "capacity_factor": 1.0,
    }
    data["train"] = {
        "task": "text:pydoc",
        "steps": 80,
        "batch_size": 8,
        "seq_len": 32,
        "lr": 3e-3,
        "warmup_steps": 5,
        "eval_batches": 1,
    }
    spec = spec_from_dict(data)
    model = train(spec).model
    task = get_task("text:pydoc")
    x, _ = next(iter(task.val_batches(6, 32, 1)))
    with torch.no_grad():
        model.train()  # capacity on: the trained router overflows, the batch matters
        dependent = (model(x[:1]) - model(x)[:1]).abs().max().item()
        model.eval()
        alone, batched = model(x[:1]), model(x)[:1]
    assert dependent > 1e-3, "the check cannot fail: no token was dropped in training mode"
    assert torch.allclose(alone, batched, atol=1e-5), (alone - batched).abs().max()
    report = export_onnx(spec, tmp_path / "moe.onnx", model=model, task=task, quality=False)
    assert report.parity is not None and report.parity.passed, report.parity.summary()
    assert report.parity.source == "task:text:pydoc"


def test_quantizer_import_leaves_logging_alone() -> None:
    """onnxruntime's 4-bit quantizer calls logging.basicConfig(level=INFO) when imported,
    which printed hundreds of "skip to quantize node" lines per int4 export and every later
    INFO record of the process; archir imports it without that side effect."""
    import logging
    import sys

    from exporters.quantize import _import_quantizers

    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    saved_mod = sys.modules.pop(name, None)
    try:
        for h in list(root.handlers):
            root.removeHandler(h)  # as in a plain program: basicConfig acts only then
        root.setLevel(logging.WARNING)
        _import_quantizers()
        assert name in sys.modules  # really imported again
        assert root.handlers == [] and root.level == logging.WARNING
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        if saved_mod is not None:
            sys.modules[name] = saved_mod


def test_rope_attention_captures_non_strict_with_a_symbolic_length() -> None:
    """torch.onnx tries torch.export's non-strict capture first; RoPE attention used to fail
    it ('SymInt' object has no attribute 'dim'), so every attention export paid for a second,
    strict capture."""
    from archir.blocks.attention import Attention, AttentionParams

    m = Attention(32, AttentionParams(n_heads=2, pos="rope"), causal=True).eval()
    x = torch.randn(2, 9, 32)
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes=({1: seq},), strict=False)
    y = torch.randn(2, 23, 32)
    torch.testing.assert_close(ep.module()(y), m(y))


def test_export_report_names_the_blocks_off_the_common_precision() -> None:
    """The report's precision line counts each precision and lists the blocks that differ
    from the most common one."""
    from exporters.onnx_export import ExportReport

    rep = ExportReport(
        path=None,
        opset=20,
        inputs=[],
        outputs=[],
        file_bytes=1,
        parity=None,
        precision="auto",
        block_precision={"b0": "int8", "b1": "fp32", "b2": "int8", "b3": "int4"},
        export_s=0.0,
    )
    assert "  precision per block: fp32 x1, int4 x1, int8 x2 (all int8 but b1=fp32, b3=int4)" in (
        str(rep).splitlines()
    )
    rep.block_precision = {"b0": "fp32"}
    assert "  precision per block: fp32 x1" in str(rep).splitlines()


def test_sort_nodes_puts_a_subgraph_after_what_it_reads() -> None:
    """onnxruntime's quantizers sort nodes by their listed inputs only; an ``If`` whose
    branches read a value of the main graph must still come after that value's producer."""
    from onnx import TensorProto, helper

    from exporters.quantize import sort_nodes

    def branch(name: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2])
        return helper.make_graph(
            [helper.make_node("Identity", ["a"], [f"{name}_y"])], name, [], [out]
        )

    cond = helper.make_node("Identity", ["c"], ["c2"])
    produce_a = helper.make_node("Relu", ["x"], ["a"])
    if_node = helper.make_node(
        "If", ["c2"], ["y"], then_branch=branch("then"), else_branch=branch("else")
    )
    graph = helper.make_graph(
        [cond, if_node, produce_a],  # the If before the node making its branches' input
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    model = sort_nodes(model)
    assert [n.op_type for n in model.graph.node] == ["Identity", "Relu", "If"]
    onnx.checker.check_model(model)
    sess = make_session(model.SerializeToString())
    x = np.array([-1.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x, "c": np.array(True)})[0], [0.0, 2.0])
    # a node that is valid anywhere, placed first: a valid order stays as it is
    model.graph.node.insert(0, onnx.helper.make_node("Neg", ["x"], ["unused"]))
    assert [n.op_type for n in sort_nodes(model).graph.node] == ["Neg", "Identity", "Relu", "If"]


@pytest.mark.parametrize(
    "precision",
    # int8 / int8-static failed the checker before sort_nodes; int4 and fp16 (15 s each) in
    # the heavy pass
    ["int8", "int8-static", *(pytest.param(p, marks=pytest.mark.heavy) for p in ("int4", "fp16"))],
)
def test_hyena_past_the_direct_length_exports_at_every_precision(
    precision: str, tmp_path: Path
) -> None:
    """A Hyena model longer than ``DIRECT_MAX_LEN`` exports its long convolution behind an
    ``If`` (the DFT past that length); every precision's quantizer keeps the file valid and
    runnable on both sides of the switch (int8 failed the checker before ``sort_nodes``)."""
    from archir.blocks.conv import DIRECT_MAX_LEN

    data = lm_spec(d=16, layers=1).data
    data["model"]["max_seq_len"] = DIRECT_MAX_LEN + 64
    data["model"]["layers"][0]["blocks"][0] = {"kind": "hyena", "filter_width": 8}
    spec = spec_from_dict(data)
    model = archir.compile(spec, seed=0).eval()
    path = tmp_path / f"h-{precision}.onnx"
    export_onnx(spec, path, model=model, check=False, task="random", precision=precision)
    _check_switched_file(path, model, precision, (40, DIRECT_MAX_LEN + 30), 64, 0.9)


def _check_switched_file(
    path: Path, model: Any, precision: str, lengths: tuple[int, ...], vocab: int, corr: float
) -> None:
    """``path`` holds an ``If`` and computes ``model``'s function at every length (untrained
    weights at reduced precision: correlation above ``corr``; fp16 close)."""
    assert "If" in [n.op_type for n in onnx.load(str(path)).graph.node]
    sess = make_session(str(path))
    for T in lengths:
        x = torch.randint(0, vocab, (1, T))
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == ref.shape and np.isfinite(got).all()
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > corr, (precision, T)
        if precision == "fp16":
            assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


def test_weight_folding_follows_reads_inside_a_subgraph() -> None:
    """``fold_constant_weights`` renames a folded weight where an ``If`` branch reads it
    (the checker rejected the graph before: the branch read a removed name)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(2, 3)

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "wt"], [f"{name}_y"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 2])],
        )

    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node(
                "If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else")
            ),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert oe.fold_constant_weights(model) == 1
    assert [n.op_type for n in model.graph.node] == ["If"]
    assert {i.name for i in model.graph.initializer} == {"w.T"}  # w: nothing reads it now
    onnx.checker.check_model(model, full_check=True)
    x = np.ones((1, 3), dtype=np.float32)
    got = make_session(model.SerializeToString()).run(None, {"x": x, "c": np.array(False)})[0]
    np.testing.assert_array_equal(got, x @ w.T)


def _branch_ops(node: onnx.NodeProto) -> dict[str, list[str]]:
    return {a.name: [n.op_type for n in a.g.node] for a in node.attribute if a.type == a.GRAPH}


def test_causal_attention_scores_query_chunks_past_the_switch(tmp_path: Path) -> None:
    """A causal attention in a model longer than ``CHUNK_MIN_LEN`` exports one ``If`` per
    layer: every score up to that length, past it query chunks (one softmax each), each
    against only the keys it may see — 8 chunks up to 1,024 positions, 16 up to 2,048 and
    32 past, each ``If`` nested in the one before for a model that long. Plain ONNX (no
    ``archir`` domain left), and the values of eager SDPA on both sides of each switch and
    at lengths no multiple of the chunk count, grouped-query heads and peaked
    (trained-like) scores included."""
    from archir.blocks.attention import CHUNK_FORMS, CHUNK_MIN_LEN

    long_from = CHUNK_FORMS[-1][0]
    L = long_from + 76
    data = lm_spec(d=32, layers=2, n_kv_heads=2).data
    data["model"]["max_seq_len"] = L
    spec = spec_from_dict(data)
    model = archir.compile(spec, seed=0).eval()
    with torch.no_grad():  # peaked attention, as after training: near-one-hot softmax rows
        for name, p in model.named_parameters():
            if name.endswith((".q.weight", ".k.weight")):
                p.mul_(6.0)
    path = tmp_path / "a.onnx"
    export_onnx(spec, path, model=model, task="random")  # the parity gate passes
    proto = onnx.load(str(path))
    assert all(o.domain != "archir" for o in proto.opset_import)
    assert all(n.domain != "archir" for n in proto.graph.node)
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    assert len(ifs) == 2
    # no [T, T] mask outside the branches: the plain scores build theirs, each chunked form
    # one [c, n·c] band its chunks slice
    assert "Trilu" not in [n.op_type for n in proto.graph.node]
    for node in ifs:
        outer = _branch_ops(node)
        assert outer["then_branch"].count("Softmax") == 1
        assert outer["then_branch"].count("Trilu") == 1
        inner = node
        for _, n in CHUNK_FORMS[:-1]:  # each form but the longest: a then-branch
            (inner,) = [a.g.node[-1] for a in inner.attribute if a.name == "else_branch"]
            assert inner.op_type == "If"
            chunks = _branch_ops(inner)
            assert chunks["then_branch"].count("Softmax") == n
            assert chunks["then_branch"].count("Trilu") == 1
        # the longest form: the innermost else-branch
        assert chunks["else_branch"].count("Softmax") == CHUNK_FORMS[-1][1]
        assert chunks["else_branch"].count("Trilu") == 1
    sess = make_session(str(path))
    for B, T in [
        (1, 1),
        (2, 5),
        (1, CHUNK_MIN_LEN),
        (2, CHUNK_MIN_LEN + 1),
        (1, 203),
        (2, 257),
        (1, 1024),
        (1, 1025),
        (1, long_from),
        (1, long_from + 1),
        (2, L),
    ]:
        x = torch.randint(0, 64, (B, T))
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6, (B, T)


def test_masked_causal_attention_scores_chunks_and_short_models_do_not_switch(
    tmp_path: Path,
) -> None:
    """ALiBi and a sliding window score their query chunks too, each against its rows of
    the block's own mask, the window's chunks without the keys before it (the same values
    as eager, on both sides of the switch); a model no longer than ``CHUNK_MIN_LEN`` has no
    ``If`` (the plain scores, one Softmax per layer)."""
    from archir.blocks.attention import CHUNK_MIN_LEN, N_CHUNKS

    L = CHUNK_MIN_LEN + 100
    for block, max_len in [({}, CHUNK_MIN_LEN), ({"window": 24}, L), ({"pos": "alibi"}, L)]:
        data = lm_spec(d=32, layers=1, **block).data
        data["model"]["max_seq_len"] = max_len
        spec = spec_from_dict(data)
        model = archir.compile(spec, seed=0).eval()
        path = tmp_path / f"m{max_len}{len(block)}.onnx"
        export_onnx(spec, path, model=model, task="random")
        nodes = onnx.load(str(path)).graph.node
        ifs = [n for n in nodes if n.op_type == "If"]
        if max_len <= CHUNK_MIN_LEN:
            assert not ifs and [n.op_type for n in nodes].count("Softmax") == 1
            continue
        assert len(ifs) == 1 and _branch_ops(ifs[0])["else_branch"].count("Softmax") == N_CHUNKS
        sess = make_session(str(path))
        for T in (30, CHUNK_MIN_LEN + 1, L):
            x = torch.randint(0, 64, (2, T))
            with torch.no_grad():
                ref = model(x).numpy()
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6, (block, T)


def test_exported_scores_count_the_pairs_the_graph_scores() -> None:
    """The latency features count the query-key pairs the exported attention computes:
    ``seq²`` up to the switch (or when it does not apply), ``c²·n(n+1)/2`` in chunks of
    ``c`` (0.5625·seq² at 8 chunks), the last chunk cut to the sequence, a window's chunks
    without the keys before it."""
    from archir.blocks.attention import AttentionParams, exported_scores
    from archir.registry import BuildContext

    def ctx(max_len: int, causal: bool = True) -> BuildContext:
        return BuildContext(d_model=64, max_seq_len=max_len, causal=causal)

    p = AttentionParams(n_heads=4)
    assert exported_scores(p, ctx(1024), 192) == 192**2
    assert exported_scores(p, ctx(192), 192) == 192**2
    assert exported_scores(p, ctx(1024), 1024) == 128 * 128 * 36 == int(0.5625 * 1024**2)
    # past 1,024 positions 16 chunks: 2,048 = 16 × 128, Σ (i+1) = 136
    assert exported_scores(p, ctx(2048), 2048) == 128 * 128 * 136
    assert exported_scores(p, ctx(2048), 1024) == 128 * 128 * 36  # 8 chunks up to 1,024
    # 193 = 7 chunks of 25 and one of 18 rows; chunk i sees 25·(i+1) keys, the last all 193
    assert exported_scores(p, ctx(1024), 193) == 25 * 25 * 28 + 18 * 193
    assert exported_scores(p, ctx(1024, False), 1024) == 1024**2
    alibi = AttentionParams(n_heads=4, pos="alibi")
    assert exported_scores(alibi, ctx(1024), 1024) == 128 * 128 * 36
    # a window of 64: chunk i > 0 sees keys from 128·i − 63 to 128·(i+1), 191 of them
    window = AttentionParams(n_heads=4, window=64)
    assert exported_scores(window, ctx(1024), 1024) == 128 * 128 + 7 * 128 * 191
    assert exported_scores(AttentionParams(n_heads=4, causal=False), ctx(1024), 1024) == 1024**2


@pytest.mark.parametrize(
    "precision", ["fp16", "int8-static", pytest.param("int4", marks=pytest.mark.heavy)]
)
def test_causal_attention_past_the_switch_exports_at_every_precision(
    precision: str, tmp_path: Path
) -> None:
    """The chunked causal attention's ``If`` survives every precision: fp16 (the converter
    declared rope's fp32 ``Range`` bounds fp16 and the checker rejected every attention
    model before), static int8 (onnxruntime aborted loading the graph: its values ``v``
    reach the branches through reshapes) and int4, on both sides of the switch."""
    from archir.blocks.attention import CHUNK_MIN_LEN

    data = lm_spec(d=32, layers=1).data
    data["model"]["max_seq_len"] = CHUNK_MIN_LEN + 64
    data["model"]["vocab_size"] = 256
    spec = spec_from_dict(data)
    model = archir.compile(spec, seed=0).eval()
    path = tmp_path / f"a-{precision}.onnx"
    export_onnx(spec, path, model=model, precision=precision)
    _check_switched_file(path, model, precision, (40, CHUNK_MIN_LEN + 50), 256, 0.97)


def test_a_plain_torch_onnx_export_of_an_archir_model_still_works() -> None:
    """Outside archir's exporter, ``torch.onnx.export(..., dynamo=True)`` of a model with
    causal attention lowers SDPA itself: the custom operation (which only archir's exporter
    can write) is not used, and onnxruntime reproduces the model past the switch length."""
    from archir.blocks.attention import CHUNK_MIN_LEN

    data = lm_spec(d=32, layers=1).data
    data["model"]["max_seq_len"] = CHUNK_MIN_LEN + 64
    model = archir.compile(spec_from_dict(data), seed=0).eval()
    x = torch.randint(0, 64, (1, CHUNK_MIN_LEN + 10))
    seq = torch.export.Dim("seq", min=2, max=CHUNK_MIN_LEN + 64)
    prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({1: seq},), verbose=False)
    assert prog is not None
    proto = prog.model_proto
    assert all(n.domain != "archir" for n in proto.graph.node)
    sess = make_session(proto.SerializeToString())
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_if_branches_ship_without_torch_metadata_or_local_paths(tmp_path: Path) -> None:
    """The nodes inside ``If`` branches (Hyena's long convolution from ``torch.cond``, the
    chunked attention) lose torch's per-node metadata like the main graph's: a shipped
    file held the stack traces, with this checkout's paths, of every branch node (9 % of a
    Hyena file); they carry their ``If``'s block tag instead."""
    from archir.blocks.conv import DIRECT_MAX_LEN
    from exporters.quantize import BLOCK_KEY, subgraph_nodes

    data = lm_spec(d=16, layers=1).data
    data["model"]["max_seq_len"] = DIRECT_MAX_LEN + 64
    data["model"]["layers"][0]["blocks"][0] = {"kind": "hyena", "filter_width": 8}
    path = tmp_path / "h.onnx"
    export_onnx(spec_from_dict(data), path, task="random")
    proto = onnx.load(str(path))
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    inside = [m for n in ifs for m in subgraph_nodes(n)]
    assert ifs and inside
    for n in ifs:
        block = {p.key: p.value for p in n.metadata_props}[BLOCK_KEY]
        for m in subgraph_nodes(n):
            assert {p.key: p.value for p in m.metadata_props} == {BLOCK_KEY: block}
    root = str(Path(archir.__file__).resolve().parent.parent)
    assert root.encode() not in path.read_bytes()


def test_a_time_limit_stops_the_export_without_the_fallback(monkeypatch) -> None:
    """A :class:`TimeoutError` from the calibration's time limit, raised inside the dynamo
    exporter (which wraps it in its own error), stops ``export_graph``: the legacy exporter
    is not tried (it ran on past the budget and printed its whole TorchScript graph at the
    end of every default calibration)."""
    from exporters.graph import export_graph

    tried: list[object] = []

    def export(*args: object, **kwargs: object) -> None:
        tried.append(kwargs.get("dynamo"))
        try:
            raise TimeoutError("took longer than 60 s")
        except TimeoutError as exc:
            raise RuntimeError("Failed to export the model with torch.export") from exc

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(TimeoutError, match="longer than 60 s"):
        export_graph(
            torch.nn.Linear(4, 4).eval(),
            (torch.randn(2, 4),),
            input_names=["x"],
            output_names=["y"],
            exporter="auto",
        )
    assert tried == [True]
