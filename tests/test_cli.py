"""The CLI: validate, show (table and --json), blocks, schema, train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import archir
from archir import registry
from archir.cli import main
from tests.conftest import ZOO

T = str(ZOO / "transformer.yaml")
ERR = Path(__file__).resolve().parent / "errors"


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", T]) == 0
    assert capsys.readouterr().out == f"ok: {T}\n"


def test_validate_search_space(capsys: pytest.CaptureFixture[str]) -> None:
    space = ZOO.parent / "search" / "tiny.yaml"
    if not space.exists():
        pytest.skip("no search space in specs/search")
    assert main(["validate", str(space)]) == 0
    assert "open node(s)" in capsys.readouterr().out


def test_validate_mixed_reports_every_bad_file(capsys: pytest.CaptureFixture[str]) -> None:
    bad = [str(ERR / "heads_string.yaml"), str(ERR / "unknown_kind.yaml")]
    assert main(["validate", T, *bad]) == 2
    out, err = capsys.readouterr()
    assert out == f"ok: {T}\n"
    assert len(err.splitlines()) == 2


def test_show_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", T]) == 0
    out = capsys.readouterr().out
    for word in ("layers.3.blocks.1", "attention", "swiglu", "token_mixer", "total", "bits"):
        assert word in out
    assert "weight bytes:" in out


def test_show_json_matches_analyze(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", T, "--json", "--seq-len", "64"]) == 0
    data = json.loads(capsys.readouterr().out)
    report = archir.analyze(archir.load_spec(T), seq_len=64)
    assert data["seq_len"] == 64
    for key in ("params", "flops_per_token", "state_bytes", "weight_bytes"):
        assert data[key] == getattr(report, key)
    assert [b["name"] for b in data["blocks"]][:2] == ["embed", "layers.0.blocks.0"]
    row = data["blocks"][1]
    assert set(row) >= {"role", "kind", "shape", "params", "flops_per_token", "state_bytes", "bits"}
    assert row["shape"] == "[batch, seq, 128]"


def test_show_bad_spec_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(ERR / "heads_not_dividing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "n_heads 6 does not divide d_model 64" in err


def test_blocks_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "Vaswani" in out
    assert main(["blocks", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["kind"] for d in data} == set(registry.names())
    att = next(d for d in data if d["kind"] == "attention")
    assert att["role"] == "token_mixer" and "Vaswani" in att["paper"]
    assert {"name": "n_heads", "type": "int", "default": "4"} in att["params"]
    # what the kind declares (registry.BlockKind): a KV cache that grows, no recurrence
    assert (att["recurrent"], att["state_grows"], att["flops_exact"], att["lacks"]) == (
        False,
        True,
        True,
        {},
    )
    assert main(["blocks", "--role", "norm", "--json"]) == 0
    norms = {d["kind"] for d in json.loads(capsys.readouterr().out)}
    assert norms == set(registry.names("norm"))


def test_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "archir spec"
    for name in registry.names():
        assert f"kind_{name}" in schema["$defs"]


def test_train_writes_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "small.yaml"
    spec.write_text(
        (ZOO / "transformer.yaml")
        .read_text()
        .replace("d_model: 128", "d_model: 32")
        .replace("repeat: 4", "repeat: 1")
    )
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            str(spec),
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--seq-len",
            "32",
            "--lr",
            "3e-3",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    assert metrics["steps"] == 30
    assert metrics["val_bpb"] < 8.0
    assert (out / "model.safetensors").is_file()
    assert (out / "spec.yaml").is_file()
    assert archir.load_spec(out / "spec.yaml").is_concrete
    assert "wrote" in capsys.readouterr().out


def test_train_refuses_huge_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", str(ERR / "huge_params.yaml"), "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "over the limit" in capsys.readouterr().err


def test_unknown_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "nope.yaml"]) == 2
    assert capsys.readouterr().err == "error: nope.yaml: no such file (hint: check the path)\n"


def test_cli_lists_match_the_library() -> None:
    """The enumerated flags list their choices without importing torch; they must stay
    equal to the library's."""
    from archir.cli import blocks, mad, train
    from archir.tasks import mad as mad_lib

    assert blocks.ROLES == registry.ROLES
    assert set(train.PRESETS) == set(mad.PRESETS) == set(mad_lib.PRESETS)
    assert mad.TASKS == mad_lib.TASKS


def test_train_default_out_is_runs_name_train(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    spec = (ZOO / "transformer.yaml").read_text()
    Path("s.yaml").write_text(spec.replace("d_model: 128", "d_model: 32"))
    argv = ["train", "s.yaml", "--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    assert main([*argv, "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "s.yaml"]
    assert sorted(p.name for p in (tmp_path / "runs" / "transformer" / "train").iterdir()) == [
        "metrics.json",
        "model.safetensors",
        "spec.yaml",
    ]
    assert "wrote runs/transformer/train/model.safetensors" in capsys.readouterr().out
    # --resume without a checkpoint says it starts from step 0
    assert main([*argv, "--no-progress", "--resume"]) == 0
    assert "no checkpoint in runs/transformer/train" in capsys.readouterr().err
