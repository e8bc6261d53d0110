"""text:<path> — byte-level, deterministic split, clear errors for bad files."""

from __future__ import annotations

import pytest
import torch

from archir.errors import TaskError
from archir.tasks import get_task
from archir.tasks.text import pydoc_bytes

# text:pydoc's first batches at seed 0 (batch 2, seq 8), as produced before and after the task
# kept its data as uint8
PYDOC_X = [[115, 32, 105, 110, 32, 97, 10, 115], [111, 119, 105, 110, 103, 32, 112, 114]]
PYDOC_VX = [[32, 32, 32, 114, 101, 116, 117, 114], [32, 40, 102, 111, 114, 32, 116, 104]]


def test_missing_empty_short_and_non_utf8(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        get_task(f"text:{tmp_path / 'nope.txt'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TaskError, match="is empty"):
        get_task(f"text:{empty}")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(TaskError, match="not UTF-8"):
        get_task(f"text:{bad}")
    short = tmp_path / "short.txt"
    short.write_text("hello world, a short file")
    task = get_task(f"text:{short}")
    with pytest.raises(TaskError, match="too short for seq_len 64"):
        task.train_batch(2, 64, torch.Generator().manual_seed(0))


def test_deterministic_split_and_bytes(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("ünïcode text " * 200, encoding="utf-8")
    a, b = get_task(f"text:{p}"), get_task(f"text:{p}")
    assert torch.equal(a.train_data, b.train_data) and torch.equal(a.val_data, b.val_data)
    assert int(a.train_data.max()) < 256 and a.metric == "val_bpb"
    x1, y1 = a.train_batch(4, 16, torch.Generator().manual_seed(1))
    x2, y2 = b.train_batch(4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])


def test_text_is_held_once_as_bytes_and_batches_are_int64(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("some text to learn from. " * 400)
    t = get_task(f"text:{p}")
    assert t.train_data.element_size() == 1 and t.val_data.element_size() == 1
    # the two splits are views of one buffer of the file's size
    assert t.train_data.untyped_storage().nbytes() == p.stat().st_size
    x, y = t.train_batch(2, 8, torch.Generator().manual_seed(0))
    assert x.dtype == y.dtype == torch.int64
    (vx, vy), *_ = t.val_batches(2, 8, 1)
    assert vx.dtype == torch.int64


def test_pydoc_batches_are_unchanged():
    # searches and benchmarks depend on the same batches for the same seed
    t = get_task("text:pydoc")
    x, y = t.train_batch(2, 8, torch.Generator().manual_seed(0))
    (vx, _), *_ = t.val_batches(2, 8, 1)
    assert len(t.train_data) + len(t.val_data) == len(pydoc_bytes())
    assert x.tolist() == PYDOC_X and vx.tolist() == PYDOC_VX and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("kind", ["dir", "fifo", "device", "symlink-to-device"])
def test_special_files_are_refused_without_opening(tmp_path, kind):
    import os
    import signal

    if kind == "dir":
        path = tmp_path
    elif kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
    elif kind == "device":
        path = "/dev/zero"
    else:
        path = tmp_path / "link"
        os.symlink("/dev/zero", path)
    signal.alarm(20)  # a regression that opens a fifo would block: fail instead of hanging
    try:
        with pytest.raises(TaskError, match="is a folder|not a regular file"):
            get_task(f"text:{path}")
    finally:
        signal.alarm(0)


def test_unreadable_file_is_a_task_error(tmp_path, monkeypatch):
    import os

    p = tmp_path / "secret.txt"
    p.write_text("text " * 100)

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(os, "open", denied)
        with pytest.raises(TaskError, match="cannot be read: Permission denied"):
            get_task(f"text:{p}")


def test_peak_memory_is_about_the_file_size(tmp_path):
    """A 40 MB text costs ~40 MB of resident memory (it cost ~10x when it was copied to
    int64): measured in a child, peak RSS after loading minus before."""
    import subprocess
    import sys

    p = tmp_path / "big.txt"
    line = ("the quick brown fox jumps over the lazy dog " * 20 + "\n").encode()
    with open(p, "wb") as f:
        for _ in range(40 * 2**20 // len(line)):
            f.write(line)
    size_mb = p.stat().st_size / 2**20
    code = (
        "import resource, torch\n"
        "from archir.tasks import get_task\n"
        "import archir.tasks.text\n"
        "r = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "before = r()\n"
        f"t = get_task('text:{p}')\n"
        "t.train_batch(8, 64, torch.Generator().manual_seed(0))\n"
        "print(r() - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    grew_mb = float(out.strip().splitlines()[-1])
    assert grew_mb < 1.5 * size_mb + 16, (grew_mb, size_mb)


# -- evaluation noise and text:stdlib (issue 12) ------------------------------------------------
class _Unigram(torch.nn.Module):
    """A model whose logits are fixed per input byte: per-window losses known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(
            torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x):
        return self.table[x]


def test_evaluation_reports_the_standard_error_over_windows():
    import math

    task = get_task("text:pydoc")
    model = _Unigram()
    got = task.evaluate(model, 8, 32, 5)
    per = []
    for x, y in task.val_batches(8, 32, 5):
        nll = torch.nn.functional.cross_entropy(
            model(x).reshape(-1, 256), y.reshape(-1), reduction="none"
        ).reshape(y.shape)
        per += nll.double().mean(1).tolist()
    per_t = torch.tensor(per, dtype=torch.float64)
    assert got["val_windows"] == len(per) == 40
    assert got["val_bpb"] == pytest.approx(float(per_t.mean()) / math.log(2), rel=1e-12)
    want = float(per_t.std()) / math.sqrt(len(per)) / math.log(2)
    assert got["val_bpb_se"] == pytest.approx(want, rel=1e-9)
    # the whole split when asked for more than it holds: every window once, se shrinks
    whole = task.evaluate(model, 64, 32, 10**6)
    assert whole["val_windows"] == (len(task.val_data) - 1) // 32
    assert whole["val_bpb_se"] < got["val_bpb_se"]


def test_stdlib_corpus_is_split_by_file_and_identified():
    import sysconfig
    from pathlib import Path

    from archir.tasks.text import STDLIB_VAL_EVERY, stdlib_files

    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 500
    parts = {part for r in rel for part in r.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    task = get_task("text:stdlib")
    info = task.corpus
    assert info is not None and info["files"] > 500 and info["train_bytes"] > 5_000_000
    assert info["val_bytes"] == len(task.val_data) and info["train_bytes"] == len(task.train_data)
    assert 0.05 < info["val_bytes"] / (info["train_bytes"] + info["val_bytes"]) < 0.2
    # the held-out files are whole files that the training text does not contain
    held = files[STDLIB_VAL_EVERY - 1].read_bytes()
    assert bytes(task.val_data[: len(held)].numpy()) == held
    mid = held[len(held) // 2 : len(held) // 2 + 300]
    assert len(mid) == 300 and mid not in bytes(task.train_data.numpy())
    again = get_task("text:stdlib")
    assert again.corpus == info  # same files, same SHA-256
    with pytest.raises(TaskError, match="split by file"):
        get_task("text:stdlib", {"val_fraction": 0.2})
