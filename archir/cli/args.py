"""argparse value types shared by the subcommands, and the bounds of the numeric flags.

Every numeric flag is range-checked when the command line is parsed (argparse reports a
bad value in one line and exits 2, before any work); every enumerated flag has ``choices``.
The types here import nothing heavy (no torch), so a refused flag costs no torch import; the
bounds shared with spec fields come from :mod:`archir.spec.sections`.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
from collections.abc import Callable

from archir.spec.sections import (  # one set of bounds for spec fields and flags
    MAX_BATCH,
    MAX_SECONDS,
    MAX_SEED,
    MAX_STEPS,
    MAX_THREADS,
)
from archir.spec.sections import MAX_SEQ_LEN as MAX_SEQ

#: upper bounds of the flags that have no spec field
MAX_LR = 10.0
MAX_WINDOWS = 1000
MAX_OPSET = 99


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: a whole number in ``[lo, hi]`` (``1e3`` and ``true`` are refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:_}, got {value}")
        return value

    parse.__name__ = f"whole number in {lo}..{hi}"
    return parse


def float_range(lo: float, hi: float, *, lo_open: bool = True) -> Callable[[str], float]:
    """argparse type: a finite number in ``(lo, hi]`` (``[lo, hi]`` when not ``lo_open``);
    ``nan`` and ``inf`` are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < lo or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if lo_open else '>='} {lo:g}, got {value}"
            )
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}, got {value}")
        return value

    parse.__name__ = f"number in {lo:g}..{hi:g}"
    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (at most :data:`MAX_STEPS`)."""
    return _positive_int(text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (at most 1e12)."""
    return _positive_float(text)


_positive_int = int_range(1, MAX_STEPS)
_positive_float = float_range(0.0, 1e12)

#: the common flags
steps = int_range(1, MAX_STEPS)
batch_size = int_range(1, MAX_BATCH)
seq_len = int_range(1, MAX_SEQ)
threads = int_range(1, MAX_THREADS)
seed = int_range(0, MAX_SEED)
seconds = float_range(0.0, MAX_SECONDS)
learning_rate = float_range(0.0, MAX_LR)


def regular_file(text: str) -> str:
    """argparse type: the path of an existing regular file, checked with ``stat`` only (a
    device, fifo, socket or folder is refused without being opened).

    Raises:
        argparse.ArgumentTypeError: the path is missing or not a regular file.
    """
    try:
        st = os.stat(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"'{text}': {exc.strerror.lower()}") from None
    if stat.S_ISDIR(st.st_mode):
        raise argparse.ArgumentTypeError(f"'{text}' is a folder, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a regular file (a device, fifo or socket)"
        )
    return text
