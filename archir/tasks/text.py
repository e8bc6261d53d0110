"""Byte-level language modelling on real text.

``text:pydoc`` is the Python reference manual text that ships with CPython
(``pydoc_data.topics``); ``text:<path>`` is any UTF-8 file. Vocabulary: the 256 byte
values. The split is deterministic: the first 90% of bytes train, the last 10% validate.
Metric: bits per byte on validation (``val_bpb`` = cross-entropy in nats / ln 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from archir.errors import TaskError
from archir.tasks.base import Task, register_task


def pydoc_bytes() -> bytes:
    """The CPython reference-manual topics as UTF-8 bytes (about 0.8 MB), sorted by topic."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


class TextTask(Task):
    """Next-byte prediction. Inputs/targets: ``[batch, seq]`` int64 (targets shifted by 1)."""

    metric = "val_bpb"
    direction = "minimize"
    model_task = "causal_lm"

    def __init__(self, name: str, data: bytes, val_fraction: float = 0.1) -> None:
        self.name = name
        arr = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        n_val = max(1, int(len(arr) * val_fraction))
        self.train_data = arr[: len(arr) - n_val]
        self.val_data = arr[len(arr) - n_val :]

    def check_model(self, model_spec: Any) -> None:
        super().check_model(model_spec)
        if model_spec.vocab_size < 256:
            raise TaskError(
                f"task '{self.name}' is byte-level and needs vocab_size >= 256, "
                f"the spec has {model_spec.vocab_size}",
                hint="set model.vocab_size: 256",
            )

    def _need(self, data: torch.Tensor, seq_len: int, split: str) -> None:
        if len(data) < seq_len + 2:
            raise TaskError(
                f"task '{self.name}': the {split} split has {len(data)} bytes, "
                f"too short for seq_len {seq_len}",
                hint="use a longer text or a shorter seq_len",
            )

    def train_batch(self, batch_size: int, seq_len: int, gen: torch.Generator):
        data = self.train_data
        self._need(data, seq_len, "training")
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        window = data[idx]
        return window[:, :-1], window[:, 1:]

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int):
        """Deterministic, evenly spaced validation windows."""
        data = self.val_data
        self._need(data, seq_len, "validation")
        n_windows = min(batch_size * max_batches, (len(data) - 1) // seq_len)
        n_windows = max(n_windows, 1)
        stride = max(1, (len(data) - seq_len - 1) // n_windows)
        starts = torch.arange(n_windows) * stride
        for i in range(0, n_windows, batch_size):
            s = starts[i : i + batch_size]
            idx = s[:, None] + torch.arange(seq_len + 1)[None, :]
            w = data[idx]
            yield w[:, :-1], w[:, 1:]

    def loss(self, model, x, y):
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, batch_size: int, seq_len: int, max_batches: int):
        total, count = 0.0, 0
        for x, y in self.val_batches(batch_size, seq_len, max_batches):
            logits = model(x)
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
        nats = total / max(count, 1)
        return {"val_loss": nats, "val_bpb": nats / math.log(2)}


@register_task(
    "text",
    "byte-level LM on text:pydoc (CPython's reference manual) or "
    "text:<path> (any UTF-8 file); metric val_bpb",
)
def make_text_task(arg: str, options: dict[str, Any]) -> Task:
    unknown = sorted(set(options) - {"val_fraction"})
    if unknown:
        raise TaskError(
            f"text tasks take no option {', '.join(repr(u) for u in unknown)}",
            hint="the only text option is val_fraction (default 0.1)",
        )
    try:
        val_fraction = float(options.get("val_fraction", 0.1))
    except (TypeError, ValueError):
        raise TaskError(f"val_fraction must be a number, got {options['val_fraction']!r}") from None
    if not 0.0 < val_fraction < 1.0:
        raise TaskError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if arg in ("", "pydoc"):
        return TextTask("text:pydoc", pydoc_bytes(), val_fraction)
    p = Path(arg)
    if not p.is_file():
        raise TaskError(f"text file '{arg}' does not exist", hint="give a path to a UTF-8 file")
    raw = p.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"text file '{arg}' is not UTF-8 (byte {exc.start})") from None
    if not raw.strip():
        raise TaskError(f"text file '{arg}' is empty", hint="give a file with some text")
    return TextTask(f"text:{arg}", raw, val_fraction)
