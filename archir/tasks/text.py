"""Language modelling on real text, byte-level or with a Hugging Face tokenizer.

``text:pydoc`` is the Python reference manual text that ships with CPython
(``pydoc_data.topics``, 0.8 MB); ``text:stdlib`` is the standard library's own Python
source (about 12 MB; :func:`stdlib_corpus`), for budgets at which the reference manual would
only be re-read; ``text:<path>`` is any UTF-8 file. Vocabulary: the 256 byte
values. The split is deterministic: the first 90% of bytes train, the last 10% validate
(``text:stdlib``: split by file).
Metric: bits per byte on validation (``val_bpb`` = cross-entropy in nats / ln 2).

Option ``tokenizer: PATH`` (a Hugging Face ``tokenizer.json``, or a folder holding one; read
with the optional ``tokenizers`` library, :func:`load_tokenizer`): the text is split as above
(the cut moved to the next character boundary when it falls inside a character), then each
split is encoded once into token ids (:meth:`TextTokenizer.encode`), and windows are
``seq_len`` tokens. The metric stays bits per *byte*: the validation cross-entropy summed
over the predicted tokens, / ln 2, / the UTF-8 bytes those tokens cover (each byte of the text
is counted for exactly one token, found from the encoding's offsets). So ``val_bpb`` of a
32000-token model compares with a byte-level model's on the same text.

Memory: the text is held once, as ``uint8`` (one byte of RAM per byte of text, read with a
single ``readinto``); only each batch is widened to ``int64``. With a tokenizer, the ids are
held as ``int32`` (plus an ``int32`` byte count and an ``int64`` running sum per validation
token) and the bytes are dropped. Files are checked with ``stat`` before they are opened:
devices, fifos, sockets and folders are refused without reading, and so are files over
:data:`MAX_TEXT_BYTES` (tokenizers: :data:`MAX_TOKENIZER_BYTES`).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import math
import os
import stat
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from archir.errors import TaskError
from archir.tasks.base import Task, register_task

#: the largest text file a ``text:<path>`` task reads (it is held in memory once)
MAX_TEXT_BYTES = 4 * 2**30
_CHUNK = 1 << 20
#: the largest ``tokenizer.json`` the ``tokenizer`` option reads (real ones are 1-20 MB)
MAX_TOKENIZER_BYTES = 256 * 2**20
#: pieces of about :data:`_CHUNK` bytes encoded per ``encode_batch`` call
_ENCODE_GROUP = 16


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


class TextTokenizer:
    """A Hugging Face tokenizer (``tokenizer.json``) loaded with the ``tokenizers`` library
    (:func:`load_tokenizer`), with truncation and padding turned off; special tokens (a BOS
    a post-processor would add) are not added: the text is one stream of tokens.

    Attributes:
        path: the ``tokenizer.json`` file that was read.
        sha256: SHA-256 of that file's bytes (which tokenizer, exactly).
        vocab_size: every id it produces is ``< vocab_size`` (added tokens included).
    """

    def __init__(self, tokenizer: Any, path: str, sha256: str) -> None:
        self._tok = tokenizer
        self.path = path
        self.sha256 = sha256
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(ids) + 1)

    def encode(
        self, data: torch.Tensor, count_bytes: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token ids of the UTF-8 text ``data`` (1-D ``uint8``) and the bytes each covers
        (when ``count_bytes``; else None, which saves reading the offsets).

        The text is cut into pieces of about 1 MiB at line ends (at a character boundary
        when a line is longer), which are encoded :data:`_ENCODE_GROUP` at a time with
        ``encode_batch`` (bounded memory, the tokenizer's own threads); a token never spans
        two pieces, so the ids may differ from encoding the whole text at once near the
        (rare) cuts.

        Bytes per token come from the encoding's offsets: a token covers the bytes from the
        furthest end reached by the tokens before it to its own end (so text a pre-tokenizer
        drops, such as whitespace, counts for the next token; a character split over several
        byte-level tokens counts for the first), and bytes after a piece's last token count
        for that token. Every byte is counted once: ``nbytes.sum() == len(data)``.

        Returns:
            ``(ids, nbytes)``: 1-D ``int32`` tensors of the same length (the number of
            tokens); ``nbytes`` is None unless ``count_bytes``.

        Raises:
            TaskError: the text is not UTF-8, or the tokenizer failed on it.
        """
        view = data.reshape(-1).numpy()
        pieces = _text_pieces(view)  # lazily: one group's copy of the text at a time
        id_parts: list[np.ndarray] = []
        len_parts: list[np.ndarray] = []
        carry = 0  # bytes of pieces that gave no token, counted for the next token
        while raws := list(itertools.islice(pieces, _ENCODE_GROUP)):
            try:
                texts = [r.decode("utf-8") for r in raws]
            except UnicodeDecodeError:
                raise TaskError(
                    f"the text is not UTF-8, tokenizer '{self.path}' cannot encode it",
                    hint="convert it to UTF-8 (e.g. iconv -t utf-8)",
                ) from None
            try:
                encs = self._tok.encode_batch(texts, add_special_tokens=False)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # a Rust panic is a BaseException
                raise TaskError(
                    f"tokenizer '{self.path}' failed on the text: {_first_line(exc)}",
                    hint="check the tokenizer with tokenizers.Tokenizer.from_file(...).encode",
                ) from None
            for raw, text, enc in zip(raws, texts, encs):
                ids = np.asarray(enc.ids, dtype=np.int32)
                if len(ids) == 0:
                    carry += len(raw)
                    continue
                id_parts.append(ids)
                if not count_bytes:
                    continue
                # fromiter over the (start, end) tuples: ~4x faster than np.asarray on them
                ends = np.fromiter((o[1] for o in enc.offsets), dtype=np.int64, count=len(ids))
                ends = np.clip(ends, 0, len(text))
                if len(text) != len(raw):  # not ASCII: character offsets -> byte offsets
                    arr = np.frombuffer(raw, dtype=np.uint8)
                    starts = np.flatnonzero((arr & 0xC0) != 0x80)
                    ends = np.append(starts, len(raw))[ends]
                reach = np.maximum.accumulate(ends)
                nbytes = np.diff(reach, prepend=0)
                nbytes[0] += carry
                nbytes[-1] += len(raw) - reach[-1]
                carry = 0
                len_parts.append(nbytes.astype(np.int32))
        if carry and len_parts:
            len_parts[-1][-1] += carry
        ids_t = torch.from_numpy(np.concatenate(id_parts) if id_parts else np.zeros(0, np.int32))
        if not count_bytes:
            return ids_t, None
        lens = np.concatenate(len_parts) if len_parts else np.zeros(0, np.int32)
        return ids_t, torch.from_numpy(lens)

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size}


def _text_pieces(view: np.ndarray, size: int | None = None) -> Iterator[bytes]:
    """``view`` (``uint8``) as ``bytes`` pieces of at most ``size`` (default
    :data:`_CHUNK`) bytes, each ending at a line end when there is one in it, else at a
    UTF-8 character boundary."""
    size = size or _CHUNK
    n, s = len(view), 0
    while s < n:
        if n - s <= size:
            yield view[s:n].tobytes()
            return
        raw = view[s : s + size].tobytes()
        cut = raw.rfind(b"\n") + 1
        if cut == 0:  # one long line: cut before a character's first byte
            cut = size
            while cut > 1 and (int(view[s + cut]) & 0xC0) == 0x80:
                cut -= 1
        yield raw[:cut]
        s += cut


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def load_tokenizer(path: str) -> TextTokenizer:
    """The Hugging Face tokenizer at ``path``: a ``tokenizer.json`` file, or a folder holding
    one. Only the ``tokenizers`` library reads it (``Tokenizer.from_str`` on the file's text,
    which is read once, after ``stat`` checks, and bounded): no pickle, no network, no
    ``transformers``.

    Raises:
        TaskError: ``tokenizers`` is not installed; the path does not exist, is a folder
            without ``tokenizer.json``, or not a regular file (device, fifo, socket: never
            read); the file cannot be read, is larger than :data:`MAX_TOKENIZER_BYTES`, is not
            UTF-8, or is not a tokenizer ``tokenizers`` can load; its vocabulary is empty.
    """
    try:
        import tokenizers
    except ImportError:
        raise TaskError(
            "the text task's tokenizer option needs the 'tokenizers' package, "
            "which is not installed",
            hint="pip install 'archir[hf]' (or pip install tokenizers)",
        ) from None
    hint = "give a Hugging Face tokenizer.json, or a folder holding one"
    file = path
    try:
        st = os.stat(file)
        if stat.S_ISDIR(st.st_mode):
            file = os.path.join(path, "tokenizer.json")
            try:
                st = os.stat(file)
            except FileNotFoundError:
                raise TaskError(
                    f"tokenizer folder '{path}' holds no tokenizer.json", hint=hint
                ) from None
    except FileNotFoundError:
        raise TaskError(f"tokenizer '{path}' does not exist", hint=hint) from None
    except OSError as exc:
        raise TaskError(f"tokenizer '{file}' cannot be read: {exc.strerror}", hint=hint) from None
    _check_tokenizer_file(file, st.st_mode, st.st_size, hint)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TaskError(f"tokenizer '{file}' cannot be read: {exc.strerror}", hint=hint) from None
    try:
        st = os.fstat(fd)
        _check_tokenizer_file(file, st.st_mode, st.st_size, hint)  # replaced since stat
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            raw = f.read(MAX_TOKENIZER_BYTES + 1)
    except OSError as exc:
        raise TaskError(f"tokenizer '{file}' cannot be read: {exc.strerror}", hint=hint) from None
    finally:
        os.close(fd)
    _check_tokenizer_file(file, stat.S_IFREG, len(raw), hint)  # grew while read
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TaskError(
            f"tokenizer '{file}' is not a tokenizer.json (not UTF-8)", hint=hint
        ) from None
    try:
        tok = tokenizers.Tokenizer.from_str(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # tokenizers raises Exception, or a Rust panic
        raise TaskError(
            f"tokenizer '{file}' is not a valid tokenizer.json: {_first_line(exc)}", hint=hint
        ) from None
    if tok.get_vocab_size(with_added_tokens=True) == 0:
        raise TaskError(f"tokenizer '{file}' has an empty vocabulary", hint=hint)
    tok.no_truncation()
    tok.no_padding()
    return TextTokenizer(tok, file, hashlib.sha256(raw).hexdigest())


def _check_tokenizer_file(file: str, mode: int, size: int, hint: str) -> None:
    if stat.S_ISDIR(mode):
        raise TaskError(f"tokenizer '{file}' is a folder", hint=hint)
    if not stat.S_ISREG(mode):
        raise TaskError(
            f"tokenizer '{file}' is not a regular file (a device, fifo or socket); it was not read",
            hint=hint,
        )
    if size > MAX_TOKENIZER_BYTES:
        raise TaskError(
            f"tokenizer '{file}' has {size:,} bytes, over the limit of {MAX_TOKENIZER_BYTES:,}",
            hint=hint,
        )


class TextTask(Task):
    """Next-byte (or, with a tokenizer, next-token) prediction. Inputs/targets:
    ``[batch, seq]`` int64 (targets shifted by 1).

    Raises (from the batch methods):
        TaskError: a split is too short for ``seq_len``.
    """

    metric = "val_bpb"
    direction = "minimize"
    model_task = "causal_lm"
    #: what the text is, when it is a built-in corpus (``text:stdlib``: files, bytes, SHA-256)
    corpus: dict[str, Any] | None = None
    #: the tokenizer the text was encoded with (None: byte-level)
    tokenizer: TextTokenizer | None = None
    #: with a tokenizer: the UTF-8 bytes each validation token covers (1-D ``int32``)
    val_token_bytes: torch.Tensor | None = None
    #: what ``train_data`` / ``val_data`` count (in messages)
    unit = "bytes"

    def __init__(
        self,
        name: str,
        data: bytes | torch.Tensor,
        val_fraction: float = 0.1,
        val_data: bytes | None = None,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        """``data``: the text's bytes, or a 1-D ``uint8`` tensor of them (kept, not copied).
        ``train_data`` / ``val_data`` are ``uint8`` views of it (1 byte per byte): the last
        ``val_fraction`` validates, unless ``val_data`` (a held-out text) is given.

        With ``tokenizer``, the cut between the splits moves forward to the next character
        when it falls inside one (at most 3 bytes; a split must be UTF-8 to be encoded), then
        each split is encoded (:meth:`TextTokenizer.encode`):
        ``train_data`` / ``val_data`` become 1-D ``int32`` token ids, ``val_token_bytes``
        the bytes each validation token covers, and the bytes are not kept.

        Raises:
            TaskError: the tokenizer cannot encode the text (see
                :meth:`TextTokenizer.encode`).
        """
        self.name = name
        if isinstance(data, torch.Tensor):
            arr = data.reshape(-1).to(torch.uint8)
        else:
            arr = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if val_data is not None:
            self.train_data = arr
            self.val_data = torch.frombuffer(bytearray(val_data), dtype=torch.uint8)
        else:
            n_val = max(1, int(len(arr) * val_fraction))
            cut = len(arr) - n_val
            if tokenizer is not None:
                # a split must be UTF-8 to be encoded: move the cut past the character it
                # falls in (at most 3 bytes)
                while 0 < cut < len(arr) and (int(arr[cut]) & 0xC0) == 0x80:
                    cut += 1
            self.train_data = arr[:cut]
            self.val_data = arr[cut:]
        if tokenizer is not None:
            del arr, data
            self._encode(tokenizer)

    def _encode(self, tokenizer: TextTokenizer) -> None:
        """Replace the byte splits by their token ids (each split encoded on its own)."""
        self.train_bytes, self.val_bytes = len(self.train_data), len(self.val_data)
        train_ids, _ = tokenizer.encode(self.train_data, count_bytes=False)
        self.train_data = train_ids  # the training bytes can go before val is encoded
        self.val_data, self.val_token_bytes = tokenizer.encode(self.val_data)
        assert self.val_token_bytes is not None
        top = max((int(d.max()) for d in (self.train_data, self.val_data) if len(d)), default=-1)
        if top >= tokenizer.vocab_size:  # a tokenizer that breaks its own vocabulary
            raise TaskError(
                f"tokenizer '{tokenizer.path}' produced token id {top}, outside its "
                f"vocabulary of {tokenizer.vocab_size}",
                hint="check the tokenizer.json",
            )
        cum = torch.zeros(len(self.val_data) + 1, dtype=torch.int64)
        torch.cumsum(self.val_token_bytes, 0, out=cum[1:])
        self._val_cum = cum  # bytes of val tokens [i, j) = cum[j] - cum[i]
        self.tokenizer = tokenizer
        self.unit = "tokens"

    def check_model(self, model_spec: Any) -> None:
        """Raises TaskError: the model's ``vocab_size`` is below 256 (byte-level) or below
        the tokenizer's vocabulary (both numbers named)."""
        super().check_model(model_spec)
        if self.tokenizer is not None:
            if model_spec.vocab_size < self.tokenizer.vocab_size:
                raise TaskError(
                    f"task '{self.name}': tokenizer '{self.tokenizer.path}' has a vocabulary "
                    f"of {self.tokenizer.vocab_size} tokens, more than the spec's "
                    f"model.vocab_size {model_spec.vocab_size}",
                    hint=f"set model.vocab_size: {self.tokenizer.vocab_size}, or use the "
                    "model's own tokenizer",
                )
            return
        if model_spec.vocab_size < 256:
            raise TaskError(
                f"task '{self.name}' is byte-level and needs vocab_size >= 256, "
                f"the spec has {model_spec.vocab_size}",
                hint="set model.vocab_size: 256",
            )

    def describe(self) -> dict[str, Any]:
        """The base description; with a tokenizer also ``tokenizer``: its path, SHA-256,
        vocabulary size, the tokens and bytes of each split and the corpus' bytes per
        token."""
        d = super().describe()
        if self.tokenizer is not None:
            tokens = len(self.train_data) + len(self.val_data)
            nbytes = self.train_bytes + self.val_bytes
            d["tokenizer"] = {
                **self.tokenizer.describe(),
                "train_tokens": len(self.train_data),
                "val_tokens": len(self.val_data),
                "train_bytes": self.train_bytes,
                "val_bytes": self.val_bytes,
                "bytes_per_token": nbytes / tokens if tokens else float("nan"),
            }
        return d

    def _need(self, data: torch.Tensor, seq_len: int, split: str) -> None:
        if len(data) < seq_len + 2:
            raise TaskError(
                f"task '{self.name}': the {split} split has {len(data)} {self.unit}, "
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
        for _, x, y in self._val_windows(batch_size, seq_len, max_batches):
            yield x, y

    def _val_windows(self, batch_size: int, seq_len: int, max_batches: int):
        """``(starts, x, y)`` per batch of :meth:`val_batches` (``starts``: ``[batch]``)."""
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
            yield s, w[:, :-1], w[:, 1:]

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

        With a tokenizer: windows of ``seq_len`` tokens; see :meth:`_evaluate_tokens`.
        """
        if self.tokenizer is not None:
            return self._evaluate_tokens(model, batch_size, seq_len, max_batches)
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

    def _evaluate_tokens(
        self, model: torch.nn.Module, batch_size: int, seq_len: int, max_batches: int
    ) -> dict[str, float]:
        """Bits per byte with a tokenizer, on the windows of :meth:`val_batches` (``seq_len``
        tokens each).

        ``val_bpb`` = (cross-entropy in nats summed over every predicted token ``y`` of every
        window) / ln 2 / (UTF-8 bytes those predicted tokens cover, from
        ``val_token_bytes``; a window's input-only first token is not counted).
        ``val_bpb_se``: the standard error of that ratio over windows (delta method:
        ``sqrt(sum((nats_w - r * bytes_w)^2) / (n (n - 1))) / mean(bytes_w) / ln 2`` with
        ``r`` the nats per byte; it equals the byte-level formula when every window has
        the same bytes); absent with one window. ``val_loss``: nats per token;
        ``val_windows``, ``val_tokens`` (predicted) and ``val_bytes`` (their bytes).
        """
        nats_parts, byte_parts = [], []
        cum = self._val_cum
        for s, x, y in self._val_windows(batch_size, seq_len, max_batches):
            logits = model(x)
            each = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
            )
            nats_parts.append(each.reshape(y.shape).double().sum(dim=1))
            byte_parts.append((cum[s + seq_len + 1] - cum[s + 1]).double())
        nats, nbytes = torch.cat(nats_parts), torch.cat(byte_parts)
        n, total_nats, total_bytes = len(nats), float(nats.sum()), float(nbytes.sum())
        if total_bytes <= 0:
            raise TaskError(
                f"task '{self.name}': the evaluated tokens cover no bytes of text",
                hint="use a longer seq_len",
            )
        ln2 = math.log(2)
        out: dict[str, float] = {
            "val_loss": total_nats / (n * seq_len),
            "val_bpb": total_nats / total_bytes / ln2,
        }
        if n > 1:
            resid = nats - (total_nats / total_bytes) * nbytes
            var = float((resid * resid).sum()) / (n * (n - 1))
            out["val_bpb_se"] = math.sqrt(var) / (total_bytes / n) / ln2
        out.update(val_windows=float(n), val_tokens=float(n * seq_len), val_bytes=total_bytes)
        return out


@register_task(
    "text",
    "byte-level LM on text:pydoc (CPython's reference manual, 0.8 MB), text:stdlib (the "
    "standard library's Python source, ~12 MB, split by file) or text:<path> (any UTF-8 "
    "file); option tokenizer: a Hugging Face tokenizer.json to train on its tokens; "
    "metric val_bpb",
)
def make_text_task(arg: str, options: dict[str, Any]) -> Task:
    """``text:pydoc`` (or ``text``) or ``text:<path>``; option ``val_fraction`` in (0, 1);
    option ``tokenizer``: a path to a Hugging Face ``tokenizer.json`` or a folder holding
    one (:func:`load_tokenizer`; read before the text, so a bad one fails fast).

    Raises:
        TaskError: an unknown or bad option, a file :func:`read_text_file` refuses, or a
            tokenizer :func:`load_tokenizer` refuses.
    """
    unknown = sorted(set(options) - {"val_fraction", "tokenizer"})
    if unknown:
        raise TaskError(
            f"text tasks take no option {', '.join(repr(u) for u in unknown)}",
            hint="the text options are val_fraction (default 0.1) and tokenizer (a path to "
            "a Hugging Face tokenizer.json)",
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
    if arg == "stdlib" and "val_fraction" in options:
        raise TaskError(
            "text:stdlib is split by file (every 10th file validates): it takes no val_fraction",
            hint="drop task_options.val_fraction",
        )
    tokenizer = None
    if "tokenizer" in options:
        path = options["tokenizer"]
        if not isinstance(path, str) or not path.strip():
            raise TaskError(
                f"tokenizer must be a path to a tokenizer.json (or a folder holding one), "
                f"got {path!r}",
                hint="task_options: {tokenizer: path/to/tokenizer.json}",
            )
        tokenizer = load_tokenizer(path)
    if arg in ("", "pydoc"):
        return TextTask("text:pydoc", pydoc_bytes(), val_fraction, tokenizer=tokenizer)
    if arg == "stdlib":
        train, val, info = stdlib_corpus()
        task = TextTask("text:stdlib", train, val_data=val, tokenizer=tokenizer)
        task.corpus = info
        return task
    return TextTask(f"text:{arg}", read_text_file(arg), val_fraction, tokenizer=tokenizer)


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
