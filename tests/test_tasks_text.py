"""text:<path> — byte-level, deterministic split, clear errors for bad files."""

from __future__ import annotations

import pytest
import torch

from archir.errors import TaskError
from archir.tasks import get_task


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
