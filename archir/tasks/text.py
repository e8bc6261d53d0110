"""Byte-level language modelling on real text.

``text:pydoc`` is the Python reference manual text that ships with CPython
(``pydoc_data.topics``); ``text:<path>`` is any UTF-8 file. Vocabulary: the 256 byte
values. The split is deterministic: the first 90% of bytes train, the last 10% validate.
Metric: bits per byte on validation (``val_bpb`` = cross-entropy in nats / ln 2).

Memory: the text is held once, as ``uint8`` (one byte of RAM per byte of text, read with a
single ``readinto``); only each batch is widened to ``int64``. Files are checked with
``stat`` before they are opened: devices, fifos, sockets and folders are refused without
reading, and so are files over :data:`MAX_TEXT_BYTES`.
"""

from __future__ import annotations

import codecs
import math
import os
import stat
from typing import Any

import torch
import torch.nn.functional as F

from archir.errors import TaskError
from archir.tasks.base import Task, register_task

#: the largest text file a ``text:<path>`` task reads (it is held in memory once)
MAX_TEXT_BYTES = 4 * 2**30
_CHUNK = 1 << 20


def pydoc_bytes() -> bytes:
    """The CPython reference-manual topics as UTF-8 bytes (about 0.8 MB), sorted by topic."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


class TextTask(Task):
    """Next-byte prediction. Inputs/targets: ``[batch, seq]`` int64 (targets shifted by 1).

    Raises (from the batch methods):
        TaskError: a split is too short for ``seq_len``.
    """

    metric = "val_bpb"
    direction = "minimize"
    model_task = "causal_lm"

    def __init__(self, name: str, data: bytes | torch.Tensor, val_fraction: float = 0.1) -> None:
        """``data``: the text's bytes, or a 1-D ``uint8`` tensor of them (kept, not copied).
        ``train_data`` / ``val_data`` are ``uint8`` views of it (1 byte per byte)."""
        self.name = name
        if isinstance(data, torch.Tensor):
            arr = data.reshape(-1).to(torch.uint8)
        else:
            arr = torch.frombuffer(bytearray(data), dtype=torch.uint8)
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
        window = data[idx].long()
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
            w = data[idx].long()
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
    """``text:pydoc`` (or ``text``) or ``text:<path>``; option ``val_fraction`` in (0, 1).

    Raises:
        TaskError: an unknown or bad option, or a file :func:`read_text_file` refuses.
    """
    unknown = sorted(set(options) - {"val_fraction"})
    if unknown:
        raise TaskError(
            f"text tasks take no option {', '.join(repr(u) for u in unknown)}",
            hint="the only text option is val_fraction (default 0.1)",
        )
    raw = options.get("val_fraction", 0.1)
    try:
        if isinstance(raw, bool):
            raise TypeError
        val_fraction = float(raw)
    except (TypeError, ValueError):
        raise TaskError(f"val_fraction must be a number, got {options['val_fraction']!r}") from None
    if not 0.0 < val_fraction < 1.0:
        raise TaskError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if arg in ("", "pydoc"):
        return TextTask("text:pydoc", pydoc_bytes(), val_fraction)
    return TextTask(f"text:{arg}", read_text_file(arg), val_fraction)


def read_text_file(path: str) -> torch.Tensor:
    """The bytes of the UTF-8 text file ``path`` as a 1-D ``uint8`` tensor, read once.

    The file is ``stat``-ed before it is opened, and opened non-blocking then ``fstat``-ed
    again, so a device, fifo, socket or folder is never read (and a fifo never blocks).
    Peak memory is the file's size plus one 1 MiB chunk being checked.

    Raises:
        TaskError: the file does not exist, is not a regular file, cannot be read, is larger
            than :data:`MAX_TEXT_BYTES`, is empty (only whitespace) or is not UTF-8.
    """
    hint = "give a path to a UTF-8 text file"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TaskError(f"text file '{path}' does not exist", hint=hint) from None
    except OSError as exc:
        raise TaskError(f"text file '{path}' cannot be read: {exc.strerror}", hint=hint) from None
    _check_regular(path, st.st_mode, hint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TaskError(f"text file '{path}' cannot be read: {exc.strerror}", hint=hint) from None
    try:
        st = os.fstat(fd)
        _check_regular(path, st.st_mode, hint)  # replaced between stat and open
        size = st.st_size
        if size > MAX_TEXT_BYTES:
            raise TaskError(
                f"text file '{path}' has {size:,} bytes, over the limit of "
                f"{MAX_TEXT_BYTES:,} (it is held in memory)",
                hint="use a shorter text (a sample of the corpus)",
            )
        try:
            buf = torch.empty(size, dtype=torch.uint8)
        except RuntimeError:  # allocation failed
            raise TaskError(
                f"text file '{path}' ({size:,} bytes) does not fit in memory",
                hint="use a shorter text",
            ) from None
        view = memoryview(buf.numpy()).cast("B")
        got = 0
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except OSError as exc:
        raise TaskError(f"text file '{path}' cannot be read: {exc.strerror}", hint=hint) from None
    finally:
        os.close(fd)
    if got < size:
        buf = buf[:got]  # the file shrank while it was read: use what was there
        view = view[:got]
    _check_text(path, view)
    return buf


def _check_regular(path: str, mode: int, hint: str) -> None:
    if stat.S_ISDIR(mode):
        raise TaskError(f"text file '{path}' is a folder", hint=hint)
    if not stat.S_ISREG(mode):
        raise TaskError(
            f"text file '{path}' is not a regular file (a device, fifo or socket); it was not read",
            hint=hint,
        )


def _check_text(path: str, data: memoryview) -> None:
    """Refuse an empty (whitespace-only) or non-UTF-8 text, checking 1 MiB at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank = True
    n = len(data)
    for start in range(0, max(n, 1), _CHUNK):
        chunk = data[start : start + _CHUNK]
        try:
            decoder.decode(chunk, final=start + _CHUNK >= n)
        except UnicodeDecodeError as exc:
            raise TaskError(
                f"text file '{path}' is not UTF-8 (byte {start + exc.start})",
                hint="convert it to UTF-8 (e.g. iconv -t utf-8)",
            ) from None
        if blank and bytes(chunk).strip():
            blank = False
    if blank:
        raise TaskError(f"text file '{path}' is empty", hint="give a file with some text")
