"""Command-line misuse: one-line errors, exit 2, never a traceback."""

import subprocess
import sys

import pytest

from archir.cli import main
from tests.conftest import ZOO

SPEC = str(ZOO / "transformer.yaml")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", SPEC, "--steps", "0"], "--steps: must be >= 1, got 0"),
        (["train", SPEC, "--batch-size", "-3"], "--batch-size: must be >= 1, got -3"),
        (["train", SPEC, "--lr", "-1"], "--lr: must be > 0, got -1.0"),
        (["train", SPEC, "--steps", "many"], "expected a whole number, got 'many'"),
        (["show", SPEC, "--seq-len", "0"], "--seq-len: must be >= 1, got 0"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["blocks", "--role", "bogus"], "--role: invalid choice: 'bogus'"),
        (["latency", SPEC, "--seq", "-1"], "--seq: must be >= 1, got -1"),
        (["latency", SPEC, "--threads", "0"], "--threads: must be >= 1, got 0"),
        (["export", SPEC, "--opset", "0"], "--opset: must be >= 1, got 0"),
        (["train", SPEC, "--lr", "nan"], "--lr: must be a finite number, got 'nan'"),
    ],
)
def test_bad_flags_are_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1


def test_unknown_task_option_is_refused(capsys):
    rc = main(["train", SPEC, "--task-option", "foo=1", "--steps", "1", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "text tasks take no option 'foo'" in err


def test_train_option_out_of_range_from_spec_is_located(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ZOO / "transformer.yaml").read_text().replace("lr: 2e-3", "lr: 2e-3, grad_clip: -1")
    )
    rc = main(["validate", str(bad)])
    assert rc == 2
    assert "train.grad_clip" in capsys.readouterr().err


@pytest.mark.heavy
def test_output_piped_into_head_is_not_an_error():
    proc = subprocess.run(
        f"{sys.executable} -m archir.cli schema | head -1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "{"
    assert "Traceback" not in proc.stderr
