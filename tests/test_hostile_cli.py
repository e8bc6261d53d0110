"""Hostile input at the command line (issue 11): numeric flags out of range, enumerated flags
off their list, planted and torn checkpoints, bad ``--out`` places, exports without weights,
special files as text. Each is refused with exit 2, a one- or two-line message, no traceback,
in under a second and under 200 MB of Python allocations (:mod:`tests.hostile_util`).

Cases run in this process (``run_cli``): torch and onnx are already imported, so the time
measured is archir's own. The cases that could hang or eat memory if they regressed (a fifo,
``/dev/zero``) run in a child with a timeout and an address-space limit
(``run_cli_subprocess``); a child imports torch (about 230 MB resident and 3-7 s on this
machine before archir does anything), so those use ``max_seconds=60`` and ``max_mb=400`` (the child's own
peak resident memory, torch included).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import yaml

from tests.hostile_util import assert_refused, run_cli, run_cli_subprocess

TINY = {
    "archir": 1,
    "name": "tiny",
    "model": {
        "task": "causal_lm",
        "vocab_size": 256,
        "d_model": 16,
        "max_seq_len": 64,
        "embed": {"kind": "token_embedding"},
        "layers": [{"repeat": 1, "blocks": [{"kind": "attention", "n_heads": 2}, {"kind": "mlp"}]}],
        "head": {"kind": "lm_head"},
    },
    "train": {"task": "text:pydoc", "steps": 2, "batch_size": 2, "seq_len": 16},
}


def _case_id(v: object) -> str:
    return " ".join(v)[:60] if isinstance(v, list) else ""


@pytest.fixture(scope="module", autouse=True)
def _imported() -> None:
    """Import what the commands import once (block modules, tasks, exporters), so that the
    first case's time is not the module imports of the test process."""
    import archir.cli.blocks
    import archir.cli.mad
    import archir.cli.train
    import archir.hashing
    import archir.train  # noqa: F401
    from archir.spec import spec_from_dict
    from archir.tasks.base import _load
    from exporters import cli_export, cli_latency  # noqa: F401

    spec_from_dict(TINY).model  # noqa: B018
    _load()


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch folder as the current directory, with ``tiny.yaml`` in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path


# -- flags refused when the command line is read -------------------------------------------

S = "tiny.yaml"
FLAG_CASES = [
    # archir train
    (["train", S, "--steps", "0"], "--steps: must be >= 1"),
    (["train", S, "--steps", "-1"], "--steps: must be >= 1"),
    (["train", S, "--steps", "1e3"], "expected a whole number"),
    (["train", S, "--steps", "100000001"], "must be <= 100_000_000"),
    (["train", S, "--steps", "true"], "expected a whole number"),
    (["train", S, "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["train", S, "--batch-size", "65537"], "--batch-size: must be <= 65_536"),
    (["train", S, "--seq-len", "-5"], "--seq-len: must be >= 1"),
    (["train", S, "--lr", "0"], "--lr: must be > 0"),
    (["train", S, "--lr", "nan"], "--lr: must be a finite number"),
    (["train", S, "--lr", "inf"], "--lr: must be a finite number"),
    (["train", S, "--lr", "11"], "--lr: must be <= 10"),
    (["train", S, "--seed", "-1"], "--seed: must be >= 0"),
    (["train", S, "--seed", str(2**32)], "--seed: must be <="),
    (["train", S, "--time-budget", "0"], "--time-budget: must be > 0"),
    (["train", S, "--time-budget", "inf"], "--time-budget: must be a finite number"),
    (["train", S, "--threads", "0"], "--threads: must be >= 1"),
    (["train", S, "--threads", "1025"], "--threads: must be <= 1_024"),
    (["train", S, "--checkpoint-every", "0"], "--checkpoint-every: must be >= 1"),
    (["train", S, "--preset", "bogus"], "invalid choice: 'bogus'"),
    # archir mad
    (["mad", S, "--seed", "-1"], "--seed: must be >= 0"),
    (["mad", S, "--threads", "0"], "--threads: must be >= 1"),
    (["mad", S, "--preset", "huge"], "invalid choice: 'huge'"),
    (["mad", S, "--tasks", "recal"], "unknown MAD task 'recal'"),
    (["mad", S, "--tasks", ","], "expected task names"),
    (["mad", S, "--tasks", "memorization,memorization"], "named twice"),
    # archir blocks
    (["blocks", "--role", "bogus"], "invalid choice: 'bogus'"),
    # archir latency
    (["latency", S, "--seq", "-1"], "--seq: must be >= 1"),
    (["latency", S, "--seq", "0"], "--seq: must be >= 1"),
    (["latency", S, "--threads", "0"], "--threads: must be >= 1"),
    (["latency", S, "--batch", "0"], "--batch: must be >= 1"),
    (["latency", S, "--batch", "5000"], "--batch: must be <= 4_096"),
    (["latency", S, "--budget-s", "0"], "--budget-s: must be > 0"),
    (["latency", S, "--budget-s", "nan"], "--budget-s: must be a finite number"),
    (["latency", S, "--windows", "0"], "--windows: must be >= 1"),
    (["latency", S, "--cv-threshold", "0"], "--cv-threshold: must be > 0"),
    (["latency", S, "--cv-threshold", "2"], "--cv-threshold: must be <= 1"),
    (["latency", S, "--runtime", "tpu"], "invalid choice: 'tpu'"),
    (["latency", S, "--precision", "magic"], "invalid choice: 'magic'"),
    (["latency", S, "--predict", "--calibration", "/dev/null"], "not a regular file"),
    (["latency", S, "--predict", "--calibration", "."], "is a folder"),
    (["latency", S, "--predict", "--calibration", "nope.json"], "no such file"),
    # archir export
    (["export", S, "--opset", "0"], "--opset: must be >= 1"),
    (["export", S, "--opset", "-1"], "--opset: must be >= 1"),
    (["export", S, "--opset", "100"], "--opset: must be <= 99"),
    (["export", S, "--precision", "int3"], "invalid choice: 'int3'"),
    (["export", S, "--format", "pickle"], "invalid choice: 'pickle'"),
    (["export", S, "--exporter", "magic"], "invalid choice: 'magic'"),
    (["export", S, "--weights", "missing.safetensors"], "no such file"),
    (["export", S, "--weights", "/dev/zero"], "not a regular file"),
]


@pytest.mark.parametrize("argv, needle", FLAG_CASES, ids=_case_id)
def test_bad_flag_is_refused(work: Path, argv: list[str], needle: str) -> None:
    o = run_cli(argv)
    assert_refused(o, contains=needle, max_lines=1)
    assert "archir" in o.lines[0] and "error" in o.lines[0]


# -- refused when the command runs, before any work ----------------------------------------


def _special(work: Path, kind: str) -> str:
    """A path of the given kind inside ``work`` (or a system one)."""
    if kind == "file":
        (work / "taken").write_text("keep me")
        return "taken"
    if kind == "dir":
        (work / "adir").mkdir()
        return "adir"
    if kind == "device":
        return "/dev/null"
    if kind == "under-file":
        (work / "taken").write_text("keep me")
        return "taken/sub/out"
    raise AssertionError(kind)


RUN_CASES = [
    # train: --out problems before training
    (["train", S, "--out", "{file}"], "exists and is not a folder"),
    (["train", S, "--out", "{device}"], "exists and is not a folder"),
    (["train", S, "--out", "{under-file}"], "is not a folder"),
    # train: task data
    (["train", S, "--task", "text:{dir}", "--out", "o"], "is a folder"),
    (["train", S, "--task", "text:missing.txt", "--out", "o"], "does not exist"),
    (["train", S, "--task", "text:empty.txt", "--out", "o"], "is empty"),
    (["train", S, "--task", "text:latin1.txt", "--out", "o"], "is not UTF-8 (byte 3)"),
    (["train", S, "--task", "text:/dev/null", "--out", "o"], "not a regular file"),
    (["train", S, "--task-option", "nokey", "--out", "o"], "is not KEY=VALUE"),
    (["train", S, "--task-option", "=1", "--out", "o"], "is not KEY=VALUE"),
    (
        ["train", S, "--task", "mad:compression", "--task-option", "num_train=99999999"],
        "over the limit",
    ),
    (
        ["train", S, "--task", "mad:compression", "--task-option", "frac_noise=nan"],
        "must be finite",
    ),
    (["train", S, "--task", "mad:memorization", "--task-option", "seed=x"], "seed must be"),
    # mad: --out
    (["mad", S, "--out", "{dir}"], "is a folder"),
    (["mad", S, "--out", "{device}"], "not a regular file"),
    # latency: flags of the other mode, --seq over max_seq_len, calibrate --out
    (["latency", S, "--out", "x.json"], "--out does not apply"),
    (["latency", "calibrate", "--seq", "8"], "--seq does not apply"),
    (["latency", S, "--seq", "65"], "over the spec's max_seq_len 64"),
    (["latency", S, "--calibration", "tiny.yaml"], "applies to --predict only"),
    (["latency", "calibrate", "--out", "{dir}"], "is a folder"),
    # export: no weights, run folders, --out problems, contradictory flags
    (["export", S, "--out", "m.onnx"], "has no trained weights"),
    (["export", "{dir}", "--out", "m.onnx"], "has no spec.yaml"),
    (["export", "run", "--out", "m.onnx"], "has no best/"),
    (["export", S, "--random-weights", "--out", "{dir}"], "is a folder"),
    (["export", S, "--random-weights", "--out", "{device}"], "not a regular file"),
    (["export", S, "--random-weights", "--out", "{under-file}"], "is not a folder"),
    (["export", S, "--check-only", "--out", "m.onnx"], "--check-only writes nothing"),
    (["export", S, "--format", "safetensors", "--out", "{file}"], "exists and is not a folder"),
    (["export", S, "--format", "safetensors", "--precision", "int8", "--out", "d"], "--precision"),
    (["export", S, "--format", "safetensors"], "--out DIR is required"),
]


@pytest.mark.parametrize("argv, needle", RUN_CASES, ids=_case_id)
def test_bad_run_is_refused_before_work(work: Path, argv: list[str], needle: str) -> None:
    (work / "empty.txt").write_text(" \n\t")
    (work / "latin1.txt").write_bytes("abc\xe9t\xe9".encode("latin-1"))
    (work / "run").mkdir()
    (work / "run" / "run.json").write_text("{}")
    (work / "run" / "spec.yaml").write_text(yaml.safe_dump(TINY))
    args = []
    for x in argv:
        for kind in ("file", "dir", "device", "under-file"):
            if "{" + kind + "}" in x:
                x = x.replace("{" + kind + "}", _special(work, kind))
        args.append(x)
    before = sorted(p.name for p in work.iterdir())
    o = run_cli(args)
    assert_refused(o, contains=needle, max_lines=1)
    assert o.lines[0].startswith("error: ")
    assert sorted(p.name for p in work.iterdir()) == before  # nothing created
    if (work / "taken").exists():
        assert (work / "taken").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.parametrize("cmd", ["train", "export", "mad"])
def test_out_in_unwritable_folder(work: Path, cmd: str) -> None:
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        out = "locked/o.onnx" if cmd == "export" else "locked/o"
        extra = ["--random-weights"] if cmd == "export" else []
        o = run_cli([cmd, S, *extra, "--out", out])
        assert_refused(o, contains="permission denied", max_lines=1)
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(os.access("/proc/1", os.W_OK), reason="/proc/1 is writable here")
@pytest.mark.parametrize("cmd", ["train", "export"])
def test_out_in_a_place_nobody_writes(work: Path, cmd: str) -> None:
    extra = ["--random-weights", "--out", "/proc/1/m.onnx"] if cmd == "export" else []
    o = run_cli([cmd, S, *(extra or ["--out", "/proc/1/out"])])
    assert_refused(o, contains="permission denied", max_lines=1)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "x y"])
def test_spec_name_that_is_no_folder_name(work: Path, name: str) -> None:
    (work / "named.yaml").write_text(yaml.safe_dump({**TINY, "name": name}))
    o = run_cli(["train", "named.yaml", "--steps", "1", "--no-progress"])
    assert_refused(o, max_lines=2)
    assert sorted(p.name for p in work.iterdir()) == ["named.yaml", "tiny.yaml"]


# -- checkpoints -----------------------------------------------------------------------


PICKLE_BOMB = b"cos\nsystem\n(S'touch PWNED'\ntR."  # os.system("touch PWNED") when unpickled


def test_planted_pickle_checkpoint_is_refused_not_loaded(work: Path) -> None:
    (work / "o").mkdir()
    (work / "o" / "checkpoint.pt").write_bytes(PICKLE_BOMB)
    o = run_cli(["train", S, "--out", "o", "--resume", "--no-progress"])
    assert_refused(o, contains="archir does not load pickles", max_lines=1)
    assert "hint: delete it" in o.err
    assert not (work / "PWNED").exists()
    assert sorted(p.name for p in (work / "o").iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("truncate-json", "is not valid JSON (torn or corrupt"),
        ("garbage-json", "is not valid JSON"),
        ("other-json", "is not an archir checkpoint manifest"),
        ("truncate-tensors", "does not match checkpoint.json (torn or corrupt"),
        ("missing-tensors", "which is missing"),
        ("escape-name", "names a tensors file '../x.safetensors'"),
        ("json-is-dir", "is not a regular file"),
    ],
)
def test_torn_or_corrupt_checkpoint_is_a_clear_error(work: Path, damage: str, needle: str) -> None:
    base = ["train", S, "--out", "o", "--checkpoint-every", "1", "--no-progress"]
    assert run_cli([*base, "--steps", "2"]).rc == 0
    man, tensors = work / "o" / "checkpoint.json", work / "o" / "checkpoint-2.safetensors"
    text = man.read_text()
    if damage == "truncate-json":
        man.write_text(text[: len(text) // 2])
    elif damage == "garbage-json":
        man.write_bytes(b"\x00\xff" * 10)
    elif damage == "other-json":
        man.write_text("[1, 2]")
    elif damage == "truncate-tensors":
        data = tensors.read_bytes()
        tensors.write_bytes(data[: len(data) - 7])
    elif damage == "missing-tensors":
        tensors.unlink()
    elif damage == "escape-name":
        man.write_text(text.replace("checkpoint-2.safetensors", "../x.safetensors"))
    elif damage == "json-is-dir":
        man.unlink()
        man.mkdir()
    o = run_cli([*base, "--steps", "3", "--resume"])
    assert_refused(o, contains=needle, max_lines=1, max_seconds=3.0)
    assert "hint:" in o.err


# -- hang or memory hazards: in a child with a timeout and a memory limit ------------------


@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "/dev/urandom"])
def test_text_task_on_special_file_is_refused_without_reading(work: Path, what: str) -> None:
    if what == "fifo":
        os.mkfifo(work / "pipe")
        path = str(work / "pipe")
    else:
        path = what
    o = run_cli_subprocess(
        ["train", S, "--task", f"text:{path}", "--out", "o", "--no-progress"],
        cwd=work,
        timeout=120,
        mem_limit_mb=4096,
    )
    # a child imports torch first (~230 MB, seconds): bounds for the whole process
    assert_refused(o, contains="not a regular file", max_lines=1, max_seconds=60, max_mb=400)
    assert not (work / "o").exists()
    if what == "fifo":
        assert stat.S_ISFIFO(os.stat(work / "pipe").st_mode)


@pytest.mark.parametrize(
    "err, needle",
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.EDQUOT, "Disk quota exceeded"),
    ],
)
def test_disk_full_while_writing_is_a_user_error(
    work: Path, monkeypatch: pytest.MonkeyPatch, err: int, needle: str
) -> None:
    import archir.train

    def full(out, *a, **kw):
        raise OSError(err, os.strerror(err), str(out / "model.safetensors"))

    monkeypatch.setattr(archir.train, "save_run", full)
    o = run_cli(["train", S, "--steps", "1", "--out", "o", "--no-progress"])
    # training ran first (seconds): the bound is the run's, not a refusal's
    assert_refused(o, contains=needle, max_lines=1, max_seconds=60)
    assert "o/model.safetensors" in o.err
