"""`archir search --searcher darts|spos` end to end through the CLI."""

import json
from pathlib import Path

import pytest

import archir
from archir.cli import main
from tests.conftest import ROOT


@pytest.mark.parametrize("searcher", ["darts", "spos"])
def test_oneshot_search_cli_writes_a_concrete_best_spec(tmp_path: Path, searcher, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "search",
            str(ROOT / "specs/search/tiny.yaml"),
            "--searcher",
            searcher,
            "--supernet-steps",
            "6",
            "--steps",
            "3",
            "--out",
            str(out),
            "--no-export",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "final architecture weights" in text
    best = archir.load_spec(out / "best" / "spec.yaml")
    assert best.is_concrete
    model = archir.compile(best)
    assert sum(p.numel() for p in model.parameters()) == archir.analyze(best).params
    report = json.loads((out / "best" / "report.json").read_text())
    assert report["oneshot"]["method"] == searcher
    assert (out / "pareto.json").exists() and (out / "study.journal").exists()


def test_oneshot_result_lands_in_the_given_storage_and_study(tmp_path: Path, capsys):
    import optuna

    out = tmp_path / "run"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    argv = ["search", str(ROOT / "specs/search/tiny.yaml"), "--searcher", "spos"]
    argv += ["--supernet-steps", "4", "--steps", "2", "--out", str(out), "--no-export"]
    rc = main([*argv, "--storage", url, "--study", "shared-study"])
    assert rc == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="shared-study", storage=url)
    assert len(study.trials) >= 1
