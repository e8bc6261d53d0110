"""Errors a user can cause.

Every error a spec, a command line or a data file can trigger is an :class:`ArchirError`
carrying a *location* (file, line, column, field path) and a *hint*. The CLI prints
``str(err)`` — one or two lines — and exits with code 2. Tracebacks are reserved for bugs.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """Where in a spec file something is.

    ``field`` is a dotted path such as ``model.layers.0.blocks.1.n_heads``; ``line`` and
    ``column`` are 1-based and ``None`` when unknown (e.g. a spec built in Python).
    """

    file: str | None = None
    line: int | None = None
    column: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        parts: list[str] = []
        if self.file:
            pos = self.file
            if self.line is not None:
                pos += f":{self.line}"
                if self.column is not None:
                    pos += f":{self.column}"
            parts.append(pos)
        if self.field:
            parts.append(self.field)
        return ": ".join(parts)


class ArchirError(Exception):
    """Base class of all user-facing errors.

    Attributes:
        message: what is wrong, and what was expected.
        location: where (file:line:col and field path), may be ``None``.
        hint: what to do about it (e.g. the nearest valid name), may be ``None``.
    """

    exit_code = 2

    def __init__(
        self, message: str, location: Location | None = None, hint: str | None = None
    ) -> None:
        self.message = message
        self.location = location
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        loc = str(self.location) if self.location else ""
        text = f"{loc}: {self.message}" if loc else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class SpecError(ArchirError):
    """A spec file is malformed: bad YAML, unknown field or kind, wrong type, bad value."""


class GraphError(ArchirError):
    """The graph a spec describes is invalid: shape mismatch, cycle, unknown input name."""


class BudgetError(ArchirError):
    """A model or run exceeds a hard limit (e.g. parameter count) and was refused."""


class TaskError(ArchirError):
    """A task or its data cannot be used (missing file, too short, unknown task name)."""


class TrainingError(ArchirError):
    """Training failed in a way that is the input's fault (e.g. loss became NaN)."""


class SearchError(ArchirError):
    """A search cannot start or continue (bad objective, unreachable storage ...)."""


class ExportError(ArchirError):
    """An export was refused (parity failure, unsupported precision ...)."""


class DecodeError(ArchirError):
    """A model cannot decode one token at a time (not a causal language model, a
    bidirectional mixer), or a decode went past what the model supports (``max_seq_len``)."""


class InteropError(ArchirError):
    """A model from another library cannot be brought in or written out: a config field with
    no archir equivalent, missing or misshapen weights, a spec that maps onto no family, or
    logits that do not match the other library's."""


def did_you_mean(name: str, options: Iterable[str]) -> str | None:
    """Return ``"did you mean 'x'?"`` for the closest option, or a list of options."""
    opts = sorted(set(options))
    close = difflib.get_close_matches(str(name), opts, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    if len(opts) <= 12:
        return "expected one of: " + ", ".join(opts)
    return None


def describe_validation_error(exc: Exception, prefix: str = "") -> str:
    """One line from a pydantic ``ValidationError``: ``field: message, got value``."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    first = errors(include_url=False)[0]
    field = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    text = f"{field}: {msg}" if field else msg
    if got is not None and not isinstance(got, dict | list):
        text += f", got {got!r}"
    return text
