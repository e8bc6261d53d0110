"""The MAD synthetic token-manipulation suite (Poli et al., 2024, "Mechanistic Design and
Scaling of Hybrid Architectures"; reference code: athms/mad-lab; reimplemented from the
description in ``reference/mad-tasks.md``).

Six tasks, each a per-position classification over tokens with ignore index ``-100``:

* ``mad:in-context-recall`` — multi-query associative recall: key-value pairs whose mapping
  changes per sequence; predict each value whose key appeared earlier.
* ``mad:fuzzy-in-context-recall`` — keys and values are motifs of 1-3 tokens.
* ``mad:noisy-in-context-recall`` — pair slots replaced by noise tokens with probability
  ``frac_noise``.
* ``mad:selective-copying`` — copy ``n_tokens_to_copy`` content tokens scattered among blanks,
  after a copy marker (no shift).
* ``mad:compression`` — reconstruct the whole sequence from the encoder's last state through
  a small MLP decoder (the task owns the decoder: :meth:`MADTask.extra_modules`).
* ``mad:memorization`` — one fixed key -> value map for the whole dataset (no shift).

Shapes: inputs ``[batch, T]`` int64 tokens, targets ``[batch, T]`` int64 with ``-100`` where
ignored; ``T`` is :attr:`MADSetting.input_len`. Metric ``accuracy``: the reference's macro
accuracy (torchmetrics ``MulticlassAccuracy(average="macro", ignore_index=-100)``) of the
argmax prediction on non-ignored test positions — the mean of per-class recall over every
class that is a target *or is predicted* there, so a class the model predicts but that is
never a target counts 0 (:func:`macro_accuracy`); ``direction = maximize``.

Where the reference defines a task or the metric, archir follows it (checked against
athms/mad-lab's generators and metric). Deliberate differences:

* every sequence comes from archir's seeded stream (the reference's selective copying draws
  blank positions from numpy's unseeded global generator);
* fuzzy recall always shows the probe pair before its final query (the reference skips it in
  ~2% of baseline test sequences, 6% at ``L = 64``, when the drawn probe position falls
  after the last pair, so the final target cannot be known);
* compression's encoder state is taken after the spec's own final norm (the model's
  ``forward_features``; the reference adds the position code to the un-normed state), and
  the decoder's last linear map to logits is the spec's LM head (tied to the embedding if
  the spec ties it) where the reference has an untied one; the decoder itself has the
  reference's layers and width (:class:`CompressionDecoder`).

:data:`DATA_VERSION` names this definition of the data and metric; it is recorded with every
MAD report (:meth:`MADReport.to_dict`) and task description, so numbers made under an older
definition are not mixed with new ones.

Data are generated from one seeded ``numpy.random.Generator`` stream per setting (training
set first, then test set; memorization's global map before both), so the same setting and
seed give byte-identical arrays. When more than 0.1% of test inputs also occur in the
training set a :class:`MADOverlapWarning` is issued (as the reference does).

Presets (:data:`PRESETS`): ``full`` is the reference protocol — 66 settings, 200 epochs,
batch 128, AdamW with cosine decay to 1e-6, learning rate {1e-4, 5e-4, 1e-3} x weight decay
{0, 0.1}, best run per setting, 1,280 test sequences. ``lite`` is a CPU budget — one or two
shortened settings per task, a fixed number of steps, one learning rate — meant to finish in
a few minutes per architecture on two cores (see :data:`LITE_SETTINGS`).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from archir.errors import TaskError, did_you_mean
from archir.tasks.base import Task, register_task

IGNORE = -100

#: Version of the MAD data and metric definition. 1: archir's first reimplementation
#: (macro accuracy over target classes only, uniform selective-copy placement, fuzzy
#: values with repeats, a 2x-wide compression decoder). 2: the reference's metric and
#: generators (see the module docstring).
DATA_VERSION = 2

TASKS: tuple[str, ...] = (
    "in-context-recall",
    "fuzzy-in-context-recall",
    "noisy-in-context-recall",
    "selective-copying",
    "compression",
    "memorization",
)


#: upper bounds of a setting's fields (the reference's largest: vocab 8192, L 1024, n 12,800)
SETTING_LIMITS: dict[str, int] = {
    "vocab_size": 65_536,
    "seq_len": 16_384,
    "num_train": 1_000_000,
    "num_test": 100_000,
    "noise_vocab": 65_536,
    "n_tokens_to_copy": 8_192,
}
#: most tokens a setting may generate, train and test together (the reference: 14.4 M)
MAX_TOKENS = 2**25


class MADOverlapWarning(UserWarning):
    """More than 0.1% of test sequences also occur in the training set."""


@dataclass(frozen=True)
class MADSetting:
    """One difficulty setting of one MAD task.

    Attributes:
        task: one of :data:`TASKS`.
        vocab_size: tokens the task uses (incl. special and noise tokens); the model's
            ``vocab_size`` must be at least this.
        seq_len: the reference's sequence length ``L`` (the model input is
            :attr:`input_len` tokens long).
        num_train / num_test: number of sequences.
        frac_noise: noisy recall only — probability that a pair slot is noise.
        noise_vocab: noisy recall only — number of noise tokens (the last ones).
        n_tokens_to_copy: selective copying only.
    """

    task: str
    vocab_size: int
    seq_len: int
    num_train: int
    num_test: int = 1280
    frac_noise: float = 0.0
    noise_vocab: int = 0
    n_tokens_to_copy: int = 16

    @property
    def input_len(self) -> int:
        """Tokens per model input: ``L - 1`` for (noisy) recall, ``L`` otherwise."""
        if self.task in ("in-context-recall", "noisy-in-context-recall"):
            return self.seq_len - 1
        return self.seq_len

    @property
    def label(self) -> str:
        """Short human name of the setting, e.g. ``v16 L128 n12800``."""
        s = f"v{self.vocab_size} L{self.seq_len} n{self.num_train}"
        if self.task == "noisy-in-context-recall":
            s += f" noise{self.frac_noise:g}"
        if self.task == "selective-copying":
            s += f" copy{self.n_tokens_to_copy}"
        return s

    def check(self) -> None:
        """Raise TaskError when the setting cannot make valid sequences, or is larger than
        :data:`SETTING_LIMITS` (vocabulary, length, counts) or :data:`MAX_TOKENS` in all."""
        t, V, L = self.task, self.vocab_size, self.seq_len
        bad = None
        if t not in TASKS:
            raise TaskError(f"unknown MAD task '{t}'", hint=did_you_mean(t, TASKS))
        for name, hi in SETTING_LIMITS.items():
            if getattr(self, name) > hi:
                raise TaskError(
                    f"MAD setting {t}: {name} {getattr(self, name):,} is over the limit {hi:,}",
                    hint="the reference settings stay far below it",
                )
        if (self.num_train + self.num_test) * L > MAX_TOKENS:
            raise TaskError(
                f"MAD setting {t} {self.label}: (num_train + num_test) x seq_len is over "
                f"{MAX_TOKENS:,} tokens",
                hint="use fewer or shorter sequences",
            )
        if self.num_train < 1 or self.num_test < 1:
            bad = "num_train and num_test must be >= 1"
        elif self.noise_vocab < 0 or self.n_tokens_to_copy < 1:
            bad = "noise_vocab must be >= 0 and n_tokens_to_copy >= 1"
        elif t in ("in-context-recall", "noisy-in-context-recall"):
            if V - self.noise_vocab < 4 or L < 4:
                bad = "recall needs at least 4 real tokens and seq_len >= 4"
            elif not 0.0 <= self.frac_noise < 1.0:
                bad = "frac_noise must be in [0, 1)"
        elif t == "fuzzy-in-context-recall":
            if (V - 1) // 2 < FUZZY_MAX_KEY or L <= 2 * (FUZZY_MAX_KEY + FUZZY_MAX_VALUE):
                bad = "fuzzy recall needs vocab_size >= 7 and seq_len >= 13"
        elif t == "selective-copying":
            if V < 3 or L < 2 * self.n_tokens_to_copy + 1:
                bad = "selective copying needs vocab_size >= 3 and seq_len >= 2*n_tokens_to_copy+1"
        elif t == "compression":
            if V < 2 or L < 2:
                bad = "compression needs vocab_size >= 2 and seq_len >= 2"
        elif t == "memorization" and ((V - 1) // 2 < 1 or L < 2 or L % 2):
            bad = "memorization needs vocab_size >= 3 and an even seq_len"
        if bad:
            raise TaskError(f"MAD setting {t} {self.label}: {bad}")


# --------------------------------------------------------------------------------------
# generators: one sequence -> (input, target) int64 arrays of length input_len
# --------------------------------------------------------------------------------------

Pair = tuple[np.ndarray, np.ndarray]


def _recall(s: MADSetting, rng: np.random.Generator, train: bool) -> Pair:
    """(Noisy) multi-query in-context recall.

    Real tokens ``[0, R)`` with ``R = V - noise_vocab``: keys ``[0, R/2)``, values
    ``[R/2, R)``; noise tokens ``[R, V)``. ``L/2 - 1`` pair slots then a probe pair whose key
    was shown. Train target: next token everywhere; test target: values of repeated keys.
    One slot (among the first ``L/2 - 1``) is always a real pair so the probe has a key.
    """
    V, L = s.vocab_size, s.seq_len
    real = V - s.noise_vocab
    n_keys = real // 2
    n_slots = L // 2 - 1
    kv: dict[int, int] = {}
    seq: list[int] = []
    tgt: list[int] = []
    keep = int(rng.integers(0, n_slots)) if n_slots > 0 else -1
    for i in range(n_slots):
        if s.frac_noise > 0 and i != keep and rng.random() < s.frac_noise:
            seq += [int(t) for t in rng.integers(real, V, size=2)]
            tgt += [IGNORE, IGNORE]
            continue
        k = int(rng.integers(0, n_keys))
        if k in kv:
            v = kv[k]
            tgt += [IGNORE, v]
        else:
            v = int(rng.integers(n_keys, real))
            kv[k] = v
            tgt += [IGNORE, IGNORE]
        seq += [k, v]
    if not kv:  # only possible for tiny L; make the probe pair a first showing
        k = int(rng.integers(0, n_keys))
        kv[k] = int(rng.integers(n_keys, real))
    keys = sorted(kv)
    k = keys[int(rng.integers(0, len(keys)))]
    seq += [k, kv[k]]
    tgt += [IGNORE, kv[k]]
    x = np.asarray(seq[:-1], dtype=np.int64)
    y = np.asarray(seq[1:] if train else tgt[1:], dtype=np.int64)
    return x, y


#: longest key and value motif of fuzzy recall (the reference's ``k_motif_size``,
#: ``v_motif_size``)
FUZZY_MAX_KEY = 3
FUZZY_MAX_VALUE = 3


def _fuzzy_recall(s: MADSetting, rng: np.random.Generator, train: bool) -> Pair:
    """Fuzzy in-context recall: key and value motifs of 1-3 tokens (as the reference).

    Pad ``V-1``; key tokens ``[0, (V-1)//2)``, value tokens ``[(V-1)//2, V-1)``; a motif is
    an ordered tuple with no repeated token (uniform over such tuples), for keys and values
    alike. Training keys have lengths uniform in {1, 2, 3}, test keys length 3; values
    always 1-3. A probe pair is drawn first with a position ``p`` uniform in
    ``[0, L - 2 * probe_len)``; pairs are added while the sequence is shorter than
    ``L - probe_len - 6``, the probe pair taking the first place at or after ``p`` (or the
    last place, when the pairs would end first: a deliberate difference, the reference then
    leaves it out); a key seen before keeps its value, the probe key its probe value. The
    probe is appended again at the end, the sequence left-padded to ``L + 1`` and shifted.
    Train target: the next token everywhere (pads too); test target: the value tokens of
    keys seen before and the final probe value.
    """
    V, L = s.vocab_size, s.seq_len
    pad = V - 1
    nk = (V - 1) // 2
    longest = FUZZY_MAX_KEY + FUZZY_MAX_VALUE

    def motif(lo: int, hi: int, n: int) -> tuple[int, ...]:
        return tuple(lo + int(t) for t in rng.choice(hi - lo, size=n, replace=False))

    def key() -> tuple[int, ...]:
        return motif(0, nk, int(rng.integers(1, FUZZY_MAX_KEY + 1)) if train else FUZZY_MAX_KEY)

    def value() -> tuple[int, ...]:
        return motif(nk, V - 1, int(rng.integers(1, FUZZY_MAX_VALUE + 1)))

    pk, pv = key(), value()
    probe_len = len(pk) + len(pv)
    probe_at = int(rng.integers(0, L - 2 * probe_len))
    limit = L - probe_len - longest
    kv: dict[tuple[int, ...], tuple[int, ...]] = {pk: pv}
    seq: list[int] = []
    tgt: list[int] = []
    seen: set[tuple[int, ...]] = set()
    placed = False
    while len(seq) < limit:
        if not placed and (len(seq) >= probe_at or len(seq) + longest >= limit):
            k = pk
        else:
            k = key()
            if k not in kv:
                kv[k] = value()
        v = kv[k]
        placed = placed or k == pk
        seq += list(k) + list(v)
        tgt += [IGNORE] * len(k) + (list(v) if k in seen else [IGNORE] * len(v))
        seen.add(k)
    seq += list(pk) + list(pv)
    tgt += [IGNORE] * len(pk) + list(pv)
    n_pad = L + 1 - len(seq)
    seq = [pad] * n_pad + seq
    tgt = [IGNORE] * n_pad + tgt
    x = np.asarray(seq[:-1], dtype=np.int64)
    y = np.asarray(seq[1:] if train else tgt[1:], dtype=np.int64)
    return x, y


def _selective_copying(s: MADSetting, rng: np.random.Generator, train: bool) -> Pair:
    """Selective copying: content ``[0, V-2)``, blank ``V-2``, copy marker ``V-1``.

    ``n`` content tokens (with replacement); each of the ``L - 2n - 1`` blanks is inserted
    before one of the content tokens, chosen uniformly and independently (as the reference
    does), so the last content token sits right before the marker and the gaps are
    multinomial (baseline: gap std 3.6 tokens). Then the marker and ``n`` blanks whose
    targets are the content tokens in order. No shift.
    """
    V, L, n = s.vocab_size, s.seq_len, s.n_tokens_to_copy
    blank, marker = V - 2, V - 1
    content = rng.integers(0, V - 2, size=n).astype(np.int64)
    body = L - n - 1
    before = np.bincount(rng.integers(0, n, size=body - n), minlength=n)
    where = np.cumsum(before) + np.arange(n)  # content token i comes after its blanks
    x = np.full(L, blank, dtype=np.int64)
    x[where] = content
    x[body] = marker
    y = np.full(L, IGNORE, dtype=np.int64)
    y[body + 1 :] = content
    return x, y


def _compression(s: MADSetting, rng: np.random.Generator, train: bool) -> Pair:
    """Compression: ``L - 1`` tokens from ``[0, V-1)`` then the token ``V-1``; target = input."""
    V, L = s.vocab_size, s.seq_len
    x = np.empty(L, dtype=np.int64)
    x[:-1] = rng.integers(0, V - 1, size=L - 1)
    x[-1] = V - 1
    return x, x.copy()


def memorization_map(s: MADSetting, rng: np.random.Generator) -> np.ndarray:
    """The global key -> value map: ``values[k]`` for keys ``[0, (V-1)//2)``, one-to-one
    into ``[(V-1)//2, V-1)`` via a shuffled permutation."""
    V = s.vocab_size
    nk = (V - 1) // 2
    perm = rng.permutation(np.arange(nk, V - 1))
    return perm[:nk].astype(np.int64)


def _memorization(
    s: MADSetting, rng: np.random.Generator, train: bool, kv: np.ndarray | None = None
) -> Pair:
    """Memorization: ``L/2`` repetitions of (key, insert ``V-1``); the target at each insert
    is the key's value under the global map; key positions ignored. No shift."""
    assert kv is not None
    V, L = s.vocab_size, s.seq_len
    keys = rng.integers(0, len(kv), size=L // 2)
    x = np.empty(L, dtype=np.int64)
    x[0::2] = keys
    x[1::2] = V - 1
    y = np.full(L, IGNORE, dtype=np.int64)
    y[1::2] = kv[keys]
    return x, y


_GENERATORS: dict[str, Callable[..., Pair]] = {
    "in-context-recall": _recall,
    "noisy-in-context-recall": _recall,
    "fuzzy-in-context-recall": _fuzzy_recall,
    "selective-copying": _selective_copying,
    "compression": _compression,
    "memorization": _memorization,
}


@dataclass
class MADData:
    """A generated dataset: ``[N, input_len]`` int64 arrays and the train/test overlap."""

    setting: MADSetting
    seed: int
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    overlap: float  # fraction of test inputs also in the training set
    kv_map: np.ndarray | None = None


def generate(setting: MADSetting, seed: int = 0) -> MADData:
    """Generate the training and test sets of a setting from one seeded stream.

    Raises:
        TaskError: the setting cannot make valid sequences.
    Warns:
        MADOverlapWarning: more than 0.1% of test inputs occur in the training set.
    """
    setting.check()
    rng = np.random.Generator(np.random.PCG64(seed))
    gen = _GENERATORS[setting.task]
    kw: dict[str, Any] = {}
    kv = None
    if setting.task == "memorization":
        kv = memorization_map(setting, rng)
        kw["kv"] = kv

    def make(n: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*(gen(setting, rng, train, **kw) for _ in range(n)))
        return np.stack(xs), np.stack(ys)

    tx, ty = make(setting.num_train, True)
    vx, vy = make(setting.num_test, False)
    seen = {row.tobytes() for row in tx}
    overlap = sum(row.tobytes() in seen for row in vx) / len(vx)
    if overlap > 0.001 and setting.task != "memorization":
        warnings.warn(
            f"MAD {setting.task} {setting.label}: {overlap:.1%} of test sequences also occur "
            "in the training set",
            MADOverlapWarning,
            stacklevel=2,
        )
    return MADData(setting, seed, tx, ty, vx, vy, overlap, kv)


# --------------------------------------------------------------------------------------
# settings and presets
# --------------------------------------------------------------------------------------


def baseline(task: str) -> MADSetting:
    """The reference protocol's baseline setting of a task."""
    if task == "in-context-recall":
        return MADSetting(task, 16, 128, 12_800)
    if task == "fuzzy-in-context-recall":
        return MADSetting(task, 16, 128, 12_800)
    if task == "noisy-in-context-recall":
        return MADSetting(task, 32, 128, 12_800, frac_noise=0.2, noise_vocab=16)
    if task == "selective-copying":
        return MADSetting(task, 16, 256, 12_800, n_tokens_to_copy=16)
    if task == "compression":
        return MADSetting(task, 16, 32, 12_800)
    if task == "memorization":
        return MADSetting(task, 256, 32, 256)
    raise TaskError(f"unknown MAD task '{task}'", hint=did_you_mean(task, TASKS))


def full_settings(task: str) -> list[MADSetting]:
    """The reference's difficulty settings of a task: the baseline, then one variable
    changed at a time (66 settings over the six tasks)."""
    b = baseline(task)
    trains = [6_400, 3_200, 1_600, 800]
    out = [b]
    if task in ("in-context-recall", "fuzzy-in-context-recall"):
        out += [replace(b, vocab_size=v) for v in (32, 64, 128)]
        out += [replace(b, seq_len=L) for L in (256, 512, 1024)]
        out += [replace(b, num_train=n) for n in trains]
    elif task == "noisy-in-context-recall":
        out += [replace(b, vocab_size=v) for v in (48, 80, 144)]
        out += [replace(b, seq_len=L) for L in (256, 512, 1024)]
        out += [replace(b, num_train=n) for n in trains]
        out += [replace(b, frac_noise=f) for f in (0.4, 0.6, 0.8)]
    elif task == "selective-copying":
        out += [replace(b, vocab_size=v) for v in (32, 64, 128)]
        out += [replace(b, seq_len=L) for L in (512, 1024)]
        out += [replace(b, num_train=n) for n in trains]
        out += [replace(b, n_tokens_to_copy=n) for n in (32, 64, 96)]
    elif task == "compression":
        out += [replace(b, vocab_size=v) for v in (32, 64, 128)]
        out += [replace(b, seq_len=L) for L in (64, 128, 256)]
        out += [replace(b, num_train=n) for n in trains]
    elif task == "memorization":
        out += [replace(b, vocab_size=v) for v in (512, 1024, 2048, 4096, 8192)]
    return out


#: The lite preset's settings: shortened versions of each baseline plus, for recall, one
#: harder vocabulary, so a fixed-state mixer's degradation shows. Train sets are small
#: and sequences short so a 4-layer width-128 model runs each in well under a minute.
#: Caveat: 300 steps rank early training speed; attention's in-context-recall phase change
#: needs ~1,000 steps (see benchmarks/README.md, "MAD lite").
LITE_SETTINGS: dict[str, list[MADSetting]] = {
    "in-context-recall": [
        MADSetting("in-context-recall", 16, 64, 2_000, num_test=256),
        MADSetting("in-context-recall", 32, 64, 2_000, num_test=256),
    ],
    "fuzzy-in-context-recall": [
        MADSetting("fuzzy-in-context-recall", 16, 64, 2_000, num_test=256),
    ],
    "noisy-in-context-recall": [
        MADSetting(
            "noisy-in-context-recall", 32, 64, 2_000, num_test=256, frac_noise=0.2, noise_vocab=16
        ),
    ],
    "selective-copying": [
        MADSetting("selective-copying", 16, 64, 2_000, num_test=256, n_tokens_to_copy=8),
    ],
    "compression": [MADSetting("compression", 16, 16, 2_000, num_test=256)],
    "memorization": [MADSetting("memorization", 256, 32, 256, num_test=256)],
}


@dataclass(frozen=True)
class Protocol:
    """How a preset trains each setting.

    ``epochs`` (full) or ``steps`` (lite) sets the optimizer steps; every ``(lr,
    weight_decay)`` pair of the grid is one run, and the best test accuracy counts.
    """

    name: str
    batch_size: int
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    min_lr: float = 1e-6
    warmup_steps: int = 0
    epochs: int | None = None
    steps: int | None = None
    doc: str = ""

    def settings(self, task: str) -> list[MADSetting]:
        return full_settings(task) if self.name == "full" else list(LITE_SETTINGS[task])

    def n_steps(self, setting: MADSetting) -> int:
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return self.epochs * math.ceil(setting.num_train / self.batch_size)


PRESETS: dict[str, Protocol] = {
    "full": Protocol(
        "full",
        batch_size=128,
        lrs=(1e-4, 5e-4, 1e-3),
        weight_decays=(0.0, 0.1),
        epochs=200,
        doc="reference protocol: 66 settings, 200 epochs, batch 128, lr {1e-4,5e-4,1e-3} x "
        "wd {0,0.1}, best run per setting, 1,280 test sequences",
    ),
    "lite": Protocol(
        "lite",
        batch_size=32,
        lrs=(2e-3,),
        weight_decays=(0.0,),
        warmup_steps=20,
        steps=300,
        doc="CPU budget: 7 shortened settings (L<=64, 2,000 train / 256 test sequences), "
        "300 steps of batch 32, lr 2e-3, wd 0, one run per setting",
    ),
}


def get_preset(name: str) -> Protocol:
    if name not in PRESETS:
        raise TaskError(f"unknown MAD preset '{name}'", hint=did_you_mean(name, PRESETS))
    return PRESETS[name]


# --------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------


def decoder_positions(length: int, d: int) -> torch.Tensor:
    """The compression decoder's sinusoidal position codes ``[length, d]`` (as the
    reference's: ``sin`` then ``cos`` of ``t * 10000^(-i / (d/2 - 1))`` for ``i < d/2``, a zero
    column when ``d`` is odd)."""
    half = d // 2
    step = math.log(10000.0) / max(half - 1, 1)
    freq = torch.exp(-step * torch.arange(half, dtype=torch.float32))
    ang = torch.arange(length, dtype=torch.float32)[:, None] * freq[None, :]
    out = torch.cat([ang.sin(), ang.cos()], dim=-1)
    if d % 2:
        out = torch.cat([out, torch.zeros(length, 1)], dim=-1)
    return out


class CompressionDecoder(nn.Module):
    """The compression task's fixed, non-expanding two-layer MLP decoder (as the reference's).

    ``h_last [batch, d]`` -> ``[batch, L, d]``: for each output position ``t`` the encoder's
    last state plus the sinusoidal code of ``t`` (:func:`decoder_positions`) goes through
    RMSNorm, Linear(d, d), GELU, RMSNorm, Linear(d, d), GELU and a last RMSNorm (the
    reference's unembedding norm); the model's LM head then gives logits. Every layer is
    ``d`` wide (the reference hard-codes a non-expanding decoder); linear weights start
    ``N(0, 0.02)`` with zero biases, as the reference initializes them.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        from archir.blocks.norm import RMSNorm

        self.d = d
        self.norm1 = RMSNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.norm2 = RMSNorm(d)
        self.fc2 = nn.Linear(d, d)
        self.norm_out = RMSNorm(d)
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, h_last: torch.Tensor, length: int) -> torch.Tensor:
        pos = decoder_positions(length, self.d).to(h_last.device, h_last.dtype)
        z = h_last[:, None, :] + pos[None]
        z = F.gelu(self.fc1(self.norm1(z)))
        z = F.gelu(self.fc2(self.norm2(z)))
        return self.norm_out(z)


def macro_accuracy(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """``(macro, micro)`` accuracy of ``pred`` on positions where ``target != -100``.

    ``pred`` and ``target``: int tensors of one shape (argmax tokens and targets). Macro is
    the MAD reference's metric (torchmetrics ``MulticlassAccuracy`` with ``average="macro"``
    and ``ignore_index=-100``): the per-class recall ``hits / target count`` averaged over
    every class that occurs as a target *or as a prediction* on the scored positions; a
    predicted class that is never a target counts 0. So a model that answers 70% of the
    values right and otherwise names key tokens scores about 0.35 at vocabulary 16, not
    0.70. Micro: the fraction of scored positions predicted right. Both are 0.0 when every
    position is ignored.

    Raises:
        ValueError: ``pred`` and ``target`` differ in shape, or a prediction is negative.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    mask = target != IGNORE
    t, p = target[mask].long(), pred[mask].long()
    if t.numel() == 0:
        return 0.0, 0.0
    if int(p.min()) < 0 or int(t.min()) < 0:
        raise ValueError("predictions and (non-ignored) targets must be class indices >= 0")
    n = int(max(int(t.max()), int(p.max()))) + 1
    hit = p == t
    support = torch.bincount(t, minlength=n)
    predicted = torch.bincount(p, minlength=n)
    hits = torch.bincount(t[hit], minlength=n)
    scored = (support > 0) | (predicted > 0)
    recall = hits.to(torch.float64) / support.clamp(min=1).to(torch.float64)
    return float(recall[scored].mean()), float(hit.to(torch.float64).mean())


class MADTask(Task):
    """One MAD setting as a trainable task (see the module docstring).

    ``train_batch`` samples training sequences with replacement using the trainer's
    generator (``seq_len`` is ignored: the setting fixes it); ``evaluate`` runs the whole
    test set and reports ``accuracy`` (macro), ``micro_accuracy`` and ``test_loss``.
    """

    metric = "accuracy"
    direction = "maximize"
    model_task = "causal_lm"

    def __init__(self, setting: MADSetting, seed: int = 0, preset: str | None = None) -> None:
        setting.check()
        self.setting = setting
        self.seed = seed
        self.preset = preset
        self.name = f"mad:{setting.task}"
        self._data: MADData | None = None
        self._decoders: weakref.WeakKeyDictionary[nn.Module, CompressionDecoder] = (
            weakref.WeakKeyDictionary()
        )
        if preset is not None:
            p = get_preset(preset)
            self.recommended_train = {
                "steps": p.n_steps(setting),
                "batch_size": p.batch_size,
                "lr": p.lrs[-1],
                "weight_decay": p.weight_decays[0],
                "min_lr": p.min_lr,
                "warmup_steps": p.warmup_steps,
                "eval_every": max(p.n_steps(setting), 1),
            }

    @property
    def data(self) -> MADData:
        if self._data is None:
            self._data = generate(self.setting, self.seed)
        return self._data

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            {
                "setting": asdict(self.setting),
                "seed": self.seed,
                "preset": self.preset,
                "data_version": DATA_VERSION,
            }
        )
        return d

    def check_model(self, model_spec: Any) -> None:
        super().check_model(model_spec)
        s = self.setting
        if model_spec.vocab_size < s.vocab_size:
            raise TaskError(
                f"task '{self.name}' ({s.label}) uses {s.vocab_size} tokens, the spec's "
                f"model.vocab_size is {model_spec.vocab_size}",
                hint=f"set model.vocab_size: {s.vocab_size} (archir mad does this per setting)",
            )
        if model_spec.max_seq_len < s.input_len:
            raise TaskError(
                f"task '{self.name}' ({s.label}) feeds {s.input_len} tokens, the spec's "
                f"model.max_seq_len is {model_spec.max_seq_len}",
                hint=f"set model.max_seq_len: {s.input_len} or more",
            )

    # -- model plumbing -----------------------------------------------------------------
    def _decoder(self, model: nn.Module) -> CompressionDecoder:
        dec = self._decoders.get(model)
        if dec is None:
            d = model.spec.model.d_model if hasattr(model, "spec") else None
            if d is None:
                raise TaskError("mad:compression needs a compiled archir model")
            dec = CompressionDecoder(int(d))
            self._decoders[model] = dec
        return dec

    def extra_modules(self, model: nn.Module) -> nn.Module | None:
        """Compression: the MLP decoder the trainer must optimize; other tasks: None."""
        if self.setting.task != "compression":
            return None
        return self._decoder(model)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``[batch, T]`` tokens -> ``[batch, T, vocab]`` logits (compression: through the
        encoder's last state and the task's decoder)."""
        if self.setting.task != "compression":
            return model(x)
        h = model.forward_features(x)  # [B, T, d]
        z = self._decoder(model)(h[:, -1], x.shape[1])
        return model.head(z)

    # -- Task interface -----------------------------------------------------------------
    def train_batch(self, batch_size: int, seq_len: int, gen: torch.Generator):
        d = self.data
        idx = torch.randint(0, len(d.train_x), (batch_size,), generator=gen).numpy()
        return torch.from_numpy(d.train_x[idx]), torch.from_numpy(d.train_y[idx])

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        d = self.data
        for i in range(0, len(d.test_x), batch_size):
            yield (
                torch.from_numpy(d.test_x[i : i + batch_size]),
                torch.from_numpy(d.test_y[i : i + batch_size]),
            )

    def loss(self, model, x, y):
        logits = self.logits(model, x)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE
        )

    @torch.no_grad()
    def evaluate(self, model, batch_size: int, seq_len: int, max_batches: int):
        """Whole-test-set metrics (``max_batches`` and ``seq_len`` are ignored: MAD scores
        are defined on the full test set)."""
        preds, targets = [], []
        total, count = 0.0, 0
        for x, y in self.test_batches(max(batch_size, 64)):
            logits = self.logits(model, x)
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                y.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            ).item()
            count += int((y != IGNORE).sum())
            preds.append(logits.argmax(-1))
            targets.append(y)
        macro, micro = macro_accuracy(torch.cat(preds), torch.cat(targets))
        out = {"accuracy": macro, "micro_accuracy": micro, "test_loss": total / max(count, 1)}
        if count > 1:  # binomial standard error over the scored tokens (of the micro average;
            # an approximation for the macro one)
            out["accuracy_se"] = math.sqrt(max(micro * (1 - micro), 0.0) / count)
        return out


_OPTION_KEYS = {
    "vocab_size",
    "seq_len",
    "num_train",
    "num_test",
    "frac_noise",
    "noise_vocab",
    "n_tokens_to_copy",
}


def make_setting(task: str, options: dict[str, Any] | None = None) -> MADSetting:
    """The setting for ``task`` from options: ``preset`` (``lite`` -> the first lite
    setting, otherwise the reference baseline) and any :class:`MADSetting` field (a whole
    number for int fields, a finite number for float fields; booleans are neither).

    Raises:
        TaskError: an unknown task, option or preset, a bad value, or a setting
            :meth:`MADSetting.check` refuses.
    """
    if task not in TASKS:
        raise TaskError(f"unknown MAD task 'mad:{task}'", hint=did_you_mean(task, TASKS))
    opts = dict(options or {})
    preset = opts.pop("preset", None)
    opts.pop("seed", None)
    unknown = set(opts) - _OPTION_KEYS
    if unknown:
        name = sorted(unknown)[0]
        raise TaskError(
            f"unknown option '{name}' for mad:{task}", hint=did_you_mean(name, _OPTION_KEYS)
        )
    if preset is not None:
        get_preset(str(preset))
    base = LITE_SETTINGS[task][0] if preset == "lite" else baseline(task)
    casted: dict[str, Any] = {}
    for k, v in opts.items():
        kind = type(getattr(base, k))
        try:
            if isinstance(v, bool) or (kind is int and isinstance(v, float)):
                raise TypeError
            casted[k] = kind(v)
        except (TypeError, ValueError):
            raise TaskError(
                f"bad option for mad:{task}: {k} must be {'a whole number' if kind is int else 'a number'}, got {v!r}"
            ) from None
        if kind is float and not math.isfinite(casted[k]):
            raise TaskError(f"bad option for mad:{task}: {k} must be finite, got {v!r}")
    s = replace(base, **casted)
    s.check()
    return s


@register_task(
    "mad",
    "MAD synthetic suite: mad:in-context-recall, fuzzy-in-context-recall, "
    "noisy-in-context-recall, selective-copying, compression, memorization; metric accuracy",
)
def make_mad_task(arg: str, options: dict[str, Any]) -> Task:
    """``mad:<task>`` with options ``preset``, ``seed`` and any :class:`MADSetting` field.

    Raises:
        TaskError: no or an unknown task, an unknown option, a value of the wrong type, out
            of range or over the limits, a setting that cannot make valid sequences.
    """
    if not arg:
        raise TaskError("name a MAD task, e.g. mad:in-context-recall", hint=", ".join(TASKS))
    setting = make_setting(arg, options)
    preset = options.get("preset")
    seed = options.get("seed", 0)
    try:
        if isinstance(seed, bool) or isinstance(seed, float):
            raise TypeError
        seed = int(seed)
    except (TypeError, ValueError):
        raise TaskError(
            f"bad option for mad:{arg}: seed must be a whole number, got {seed!r}"
        ) from None
    if not 0 <= seed < 2**32:
        raise TaskError(f"bad option for mad:{arg}: seed must be in 0..{2**32 - 1}, got {seed}")
    return MADTask(setting, seed=seed, preset=preset)


# --------------------------------------------------------------------------------------
# the protocol runner (archir mad, benchmarks/mad_lite.py)
# --------------------------------------------------------------------------------------


@dataclass
class SettingResult:
    task: str
    setting: MADSetting
    accuracy: float
    best_lr: float
    best_weight_decay: float
    runs: list[dict[str, Any]]
    cpu_s: float
    wall_s: float


@dataclass
class MADReport:
    """Per-task MAD scores (mean over settings of the best run) and the overall mean."""

    spec_name: str
    preset: str
    results: list[SettingResult] = field(default_factory=list)

    def task_scores(self) -> dict[str, float]:
        out: dict[str, list[float]] = {}
        for r in self.results:
            out.setdefault(r.task, []).append(r.accuracy)
        return {t: float(np.mean(v)) for t, v in out.items()}

    def task_cpu_s(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.results:
            out[r.task] = out.get(r.task, 0.0) + r.cpu_s
        return out

    @property
    def mean(self) -> float:
        scores = self.task_scores()
        return float(np.mean(list(scores.values()))) if scores else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec_name,
            "preset": self.preset,
            "data_version": DATA_VERSION,
            "scores": self.task_scores(),
            "mean": self.mean,
            "cpu_s": self.task_cpu_s(),
            "settings": [
                {
                    "task": r.task,
                    "setting": asdict(r.setting),
                    "accuracy": r.accuracy,
                    "best_lr": r.best_lr,
                    "best_weight_decay": r.best_weight_decay,
                    "cpu_s": r.cpu_s,
                    "wall_s": r.wall_s,
                    "runs": r.runs,
                }
                for r in self.results
            ],
        }


def adapt_spec(spec: Any, setting: MADSetting) -> Any:
    """A copy of a concrete spec with ``model.vocab_size`` set to the setting's vocabulary
    and ``model.max_seq_len`` raised to its input length when shorter."""
    from archir.spec import spec_from_dict

    data = copy.deepcopy(spec.data)
    m = data["model"]
    m["vocab_size"] = setting.vocab_size
    if int(m.get("max_seq_len", 2048)) < setting.input_len:
        m["max_seq_len"] = setting.input_len
    return spec_from_dict(data)


def run_setting(
    spec: Any,
    setting: MADSetting,
    protocol: Protocol,
    *,
    seed: int = 0,
    threads: int | None = None,
) -> SettingResult:
    """Train ``spec`` (adapted to the setting) for every (lr, wd) of the protocol's grid and
    keep the best test accuracy. A failed run (non-finite loss) scores 0."""
    from archir.train import train

    adapted = adapt_spec(spec, setting)
    task = MADTask(setting, seed=seed)
    _ = task.data  # generate once, outside the timed runs' loops
    base = adapted.model.train
    steps = protocol.n_steps(setting)
    runs: list[dict[str, Any]] = []
    c0, w0 = time.process_time(), time.perf_counter()
    for lr in protocol.lrs:
        for wd in protocol.weight_decays:
            cfg = base.model_validate(
                {
                    **base.model_dump(),
                    "task": task.name,
                    "steps": steps,
                    "batch_size": protocol.batch_size,
                    "lr": lr,
                    "min_lr": protocol.min_lr,
                    "weight_decay": wd,
                    "warmup_steps": min(protocol.warmup_steps, steps - 1),
                    "eval_every": steps,
                    "seed": seed,
                    "time_budget_s": None,
                    "threads": threads,
                }
            )
            res = train(adapted, task, cfg=cfg)
            acc = float(res.metrics.get("accuracy", 0.0)) if res.status != "failed" else 0.0
            runs.append(
                {
                    "lr": lr,
                    "weight_decay": wd,
                    "accuracy": acc,
                    "status": res.status,
                    "steps": res.metrics["steps"],
                    **({"reason": res.metrics["reason"]} if "reason" in res.metrics else {}),
                }
            )
    best = max(runs, key=lambda r: r["accuracy"])
    return SettingResult(
        setting.task,
        setting,
        best["accuracy"],
        best["lr"],
        best["weight_decay"],
        runs,
        time.process_time() - c0,
        time.perf_counter() - w0,
    )


def run_mad(
    spec: Any,
    preset: str = "lite",
    tasks: list[str] | None = None,
    *,
    seed: int = 0,
    threads: int | None = None,
    on_result: Callable[[SettingResult], None] | None = None,
) -> MADReport:
    """Run the MAD protocol ``preset`` on a concrete spec: every setting of every task
    (default: all six), best run per setting; ``on_result`` is called after each setting.

    Raises:
        TaskError: unknown task or preset; SpecError/GraphError: the adapted spec is invalid.
    """
    protocol = get_preset(preset)
    names = list(tasks or TASKS)
    for t in names:
        if t not in TASKS:
            raise TaskError(f"unknown MAD task '{t}'", hint=did_you_mean(t, TASKS))
    report = MADReport(spec.name, preset)
    for t in names:
        for s in protocol.settings(t):
            r = run_setting(spec, s, protocol, seed=seed, threads=threads)
            report.results.append(r)
            if on_result is not None:
                on_result(r)
    return report
