"""Byte-level language modelling on real text.

``text:pydoc`` is the Python reference manual text that ships with CPython
(``pydoc_data.topics``, 0.8 MB); ``text:stdlib`` is the standard library's own Python
source (about 12 MB; :func:`stdlib_corpus`), for budgets at which the reference manual would
only be re-read; ``text:<path>`` is any UTF-8 file. Vocabulary: the 256 byte
values. The split is deterministic: the first 90% of bytes train, the last 10% validate
(``text:stdlib``: split by file).
Metric: bits per byte on validation (``val_bpb`` = cross-entropy in nats / ln 2).

Memory: the text is held once, as ``uint8`` (one byte of RAM per byte of text, read with a
single ``readinto``); only each batch is widened to ``int64``. Files are checked with
``stat`` before they are opened: devices, fifos, sockets and folders are refused without
reading, and so are files over :data:`MAX_TEXT_BYTES`.
"""

from __future__ import annotations

import codecs
import hashlib
import math
import os
import stat
import sysconfig
from pathlib import Path
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


#: folders of the standard library left out of ``text:stdlib`` (tests differ between Python
#: builds — Debian ships them in a separate package — and installed packages are not stdlib)
_STDLIB_SKIP = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
#: every this-many-th file of ``text:stdlib`` (in sorted order) is held out for validation
STDLIB_VAL_EVERY = 10


def stdlib_files() -> list[Path]:
    """The ``.py`` files of this Python's standard library, sorted by path relative to it,
    without test folders, installed packages and caches (:data:`_STDLIB_SKIP`)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath) / f
                out.append((p.relative_to(root).as_posix(), p))
    out.sort()
    return [p for _, p in out]


def stdlib_corpus() -> tuple[bytes, bytes, dict[str, Any]]:
    """``text:stdlib``: the standard library's Python source (about 12 MB on CPython 3.11),
    split by file — every :data:`STDLIB_VAL_EVERY`-th file in sorted order validates, the
    rest train — so no validation window shares a file with the training text. Files that
    are not UTF-8 are skipped. Returns ``(train, val, info)``; ``info`` has the file and
    byte counts and the SHA-256 of the corpus (its files' bytes in order), by which two
    machines can tell whether they train on the same text.

    Raises:
        TaskError: no standard library source found (an install without ``.py`` files).
    """
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    digest = hashlib.sha256()
    n = 0
    for i, p in enumerate(stdlib_files()):
        try:
            raw = p.read_bytes()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest.update(raw)
        n += 1
        (val_parts if i % STDLIB_VAL_EVERY == STDLIB_VAL_EVERY - 1 else train_parts).append(raw)
    if not train_parts or not val_parts:
        raise TaskError(
            "text:stdlib found no Python source in this Python's standard library",
            hint="use text:pydoc or text:<path to a UTF-8 file>",
        )
    train, val = b"\n".join(train_parts), b"\n".join(val_parts)
    info = {
        "files": n,
        "train_bytes": len(train),
        "val_bytes": len(val),
        "sha256": digest.hexdigest(),
    }
    return train, val, info


class TextTask(Task):
    """Next-byte prediction. Inputs/targets: ``[batch, seq]`` int64 (targets shifted by 1).

    Raises (from the batch methods):
        TaskError: a split is too short for ``seq_len``.
    """

    metric = "val_bpb"
    direction = "minimize"
    model_task = "causal_lm"
    #: what the text is, when it is a built-in corpus (``text:stdlib``: files, bytes, SHA-256)
    corpus: dict[str, Any] | None = None

    def __init__(
        self,
        name: str,
        data: bytes | torch.Tensor,
        val_fraction: float = 0.1,
        val_data: bytes | None = None,
    ) -> None:
        """``data``: the text's bytes, or a 1-D ``uint8`` tensor of them (kept, not copied).
        ``train_data`` / ``val_data`` are ``uint8`` views of it (1 byte per byte): the last
        ``val_fraction`` validates, unless ``val_data`` (a held-out text) is given."""
        self.name = name
        if isinstance(data, torch.Tensor):
            arr = data.reshape(-1).to(torch.uint8)
        else:
            arr = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if val_data is not None:
            self.train_data = arr
            self.val_data = torch.frombuffer(bytearray(val_data), dtype=torch.uint8)
            return
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
        """Bits per byte on ``min(batch_size * max_batches, all)`` evenly spaced windows of
        ``seq_len`` bytes of the validation split (all of it when ``max_batches`` is large).

        Returns ``val_loss`` (nats per byte), ``val_bpb``, ``val_bpb_se`` — the standard
        error of ``val_bpb`` as an estimate of the expected bits per byte on text like the
        split: the standard deviation of the per-window bits per byte over the square root
        of the number of windows (absent with one window) — and ``val_windows`` /
        ``val_bytes`` evaluated.
        """
        per = []
        for x, y in self.val_batches(batch_size, seq_len, max_batches):
            logits = model(x)
            each = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
            )
            per.append(each.reshape(y.shape).double().mean(dim=1))
        windows = torch.cat(per)
        n = len(windows)
        nats = float(windows.mean())
        out: dict[str, float] = {"val_loss": nats, "val_bpb": nats / math.log(2)}
        if n > 1:
            out["val_bpb_se"] = float(windows.std()) / math.sqrt(n) / math.log(2)
        out.update(val_windows=float(n), val_bytes=float(n * seq_len))
        return out


@register_task(
    "text",
    "byte-level LM on text:pydoc (CPython's reference manual, 0.8 MB), text:stdlib (the "
    "standard library's Python source, ~12 MB, split by file) or text:<path> (any UTF-8 "
    "file); metric val_bpb",
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
    if arg == "stdlib":
        if "val_fraction" in options:
            raise TaskError(
                "text:stdlib is split by file (every 10th file validates): it takes no "
                "val_fraction",
                hint="drop task_options.val_fraction",
            )
        train, val, info = stdlib_corpus()
        task = TextTask("text:stdlib", train, val_data=val)
        task.corpus = info
        return task
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
