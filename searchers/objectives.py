"""Objectives and constraints of a search, read from the spec's ``search:`` section.

Metrics a search can optimize or constrain:

=================== ======================================================== =============
metric              meaning (unit)                                           decided
=================== ======================================================== =============
``params``          trainable parameters, tied weights once                  before training
``flops_per_token`` forward FLOPs per token at ``train.seq_len``             before training
``state_bytes``     inference state per sequence (bytes, fp32)               before training
``weight_bytes``    parameters × bits / 8 at each node's bits (bytes)        before training
``weight_bits_avg`` parameter-weighted mean weight bits                      before training
``latency_ms``      measured CPU forward latency, median (ms)                before training
``decode_ms_per_    one generated token with ``search.decode.context``       before training
token``             tokens of state, on the shipped decode model (ms)
``prefill_ms``      feeding a ``context``-token prompt token by token (ms)   before training
quality             the task's metric (``val_bpb``, ``accuracy``) and        after training
                    ``val_loss``; ``quality`` names the task's headline
=================== ======================================================== =============

Constraints are expressions ``"<= 2e6"``, ``"< 8"``, ``">= 0.9"``, ``"== 4"``; numbers may carry
a ``k``/``M``/``G`` suffix (``"<= 2M"``). Those on metrics decided before training are checked
before any CPU time is spent on training.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from archir.errors import SearchError, did_you_mean

COST_METRICS: tuple[str, ...] = (
    "params",
    "flops_per_token",
    "state_bytes",
    "weight_bytes",
    "weight_bits_avg",
)
MEASURED_METRICS: tuple[str, ...] = ("latency_ms", "decode_ms_per_token", "prefill_ms")
#: measured by generating (:func:`exporters.decode.measure_decode`)
DECODE_METRICS: tuple[str, ...] = ("decode_ms_per_token", "prefill_ms")
PRE_TRAINING = frozenset(COST_METRICS + MEASURED_METRICS)

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
}
_SUFFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
_EXPR = re.compile(
    r"^\s*(<=|>=|==|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([kKMG]?)\s*$"
)


@dataclass(frozen=True)
class Objective:
    """One objective: a metric and a direction (``minimize``/``maximize``)."""

    metric: str
    direction: str

    @property
    def pre_training(self) -> bool:
        return self.metric in PRE_TRAINING


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``, e.g. ``params <= 2e6``.

    ``violation(x)`` follows Optuna's convention for ``constraints_func``: ``<= 0`` means
    satisfied, and the size of a positive value says how far off the candidate is.
    """

    metric: str
    op: str
    bound: float
    text: str

    @property
    def pre_training(self) -> bool:
        return self.metric in PRE_TRAINING

    def ok(self, value: float) -> bool:
        return math.isfinite(value) and _OPS[self.op](value, self.bound)

    def violation(self, value: float) -> float:
        if not math.isfinite(value):
            return math.inf
        if self.ok(value):
            return 0.0 if self.op != "==" else 0.0
        if self.op in ("<=", "<"):
            return max(value - self.bound, 1e-12)
        if self.op in (">=", ">"):
            return max(self.bound - value, 1e-12)
        return abs(value - self.bound)

    def relative_violation(self, value: float) -> float:
        """Violation divided by ``|bound|`` (to rank candidates across metrics)."""
        return self.violation(value) / (abs(self.bound) or 1.0)

    def describe(self, value: float | None = None) -> str:
        s = f"{self.metric} {self.op} {self.bound:g}"
        if value is not None:
            s += f" (got {value:.4g})"
        return s


def parse_constraint(metric: str, expr: Any) -> Constraint:
    """Parse ``"<= 2e6"`` for ``metric``.

    Raises:
        SearchError: the expression is not ``OP NUMBER`` with OP in ``<= < >= > ==``.
    """
    text = str(expr)
    m = _EXPR.match(text) if isinstance(expr, str) else None
    if m is None:
        raise SearchError(
            f"malformed constraint for '{metric}': {text!r}",
            hint='write an operator and a number, e.g. "<= 2e6", "< 8", ">= 0.9"',
        )
    op, num, suffix = m.groups()
    return Constraint(metric, op, float(num) * _SUFFIX[suffix], text.strip())


def known_metrics(task_metrics: tuple[str, ...]) -> list[str]:
    return list(COST_METRICS + MEASURED_METRICS) + list(task_metrics) + ["quality"]


def resolve_metric(name: str, task_metric: str, task_metrics: tuple[str, ...], what: str) -> str:
    """Check that a metric is known; ``quality`` becomes the task's headline metric.

    Raises:
        SearchError: unknown metric, with the nearest known name.
    """
    if name == "quality":
        return task_metric
    known = known_metrics(task_metrics)
    if name not in known:
        raise SearchError(
            f"unknown {what} '{name}'",
            hint=(did_you_mean(name, known) or "")
            + f" (metrics: {', '.join(known)}; the task reports {', '.join(task_metrics)})",
        )
    return name


def parse_objectives(
    objectives: Mapping[str, str],
    constraints: Mapping[str, Any],
    *,
    task_metric: str,
    task_direction: str,
    task_metrics: tuple[str, ...],
    trains: bool,
) -> tuple[list[Objective], list[Constraint]]:
    """Objectives and constraints of a ``search:`` section, checked.

    Args:
        task_metric / task_direction: the task's headline metric (``quality``'s meaning).
        task_metrics: every quality metric the task reports.
        trains: whether trials train (False for ``fidelity: cost``).

    Raises:
        SearchError: unknown metric, malformed expression, no objective, a quality metric
            with ``fidelity: cost``, or a direction that contradicts the task's metric.
    """
    if not objectives:
        raise SearchError("search.objectives is empty", hint="e.g. {val_bpb: minimize}")
    objs: list[Objective] = []
    for name, direction in objectives.items():
        metric = resolve_metric(name, task_metric, task_metrics, "objective")
        if name == "quality":
            direction = task_direction
        if metric not in PRE_TRAINING and not trains:
            raise SearchError(
                f"objective '{metric}' needs training, but search.fidelity is 'cost'",
                hint="use fidelity: proxy, or optimize cost metrics only",
            )
        if any(o.metric == metric for o in objs):
            raise SearchError(f"objective '{metric}' is listed twice")
        objs.append(Objective(metric, direction))
    cons: list[Constraint] = []
    for name, expr in constraints.items():
        metric = resolve_metric(name, task_metric, task_metrics, "constraint metric")
        if metric not in PRE_TRAINING and not trains:
            raise SearchError(
                f"constraint on '{metric}' needs training, but search.fidelity is 'cost'",
                hint="use fidelity: proxy, or constrain cost metrics only",
            )
        cons.append(parse_constraint(metric, expr))
    return objs, cons


def check_constraints(
    constraints: list[Constraint], values: Mapping[str, float], *, pre_training: bool
) -> list[str]:
    """Reasons (one line each) why ``values`` break the constraints of one phase."""
    out = []
    for c in constraints:
        if c.pre_training != pre_training or c.metric not in values:
            continue
        v = float(values[c.metric])
        if not c.ok(v):
            out.append(f"{c.describe(v)}")
    return out


# -- a trial's archir attributes ----------------------------------------------------------
#: the one user attribute holding what archir records about a trial: the concrete model
#: (``spec``, ``spec_hash``, ``spec_yaml``) and, once known, its result (``status``,
#: ``reason``, ``values``, ``violations``, ``penalized``, ``rel_violation``, ``duplicate_of``)
TRIAL_ATTR = "archir:trial"
#: the model keys; earlier archir versions stored each key as a user attribute of its own
MODEL_KEYS = ("spec", "spec_hash", "spec_yaml")
RESULT_KEYS = (
    "status",
    "reason",
    "values",
    "violations",
    "penalized",
    "rel_violation",
    "duplicate_of",
)
#: result statuses archir records for a trial that ended FAIL by itself
_FAILED = ("failed", "interrupted")


def trial_attrs(t: Any) -> dict[str, Any]:
    """What archir recorded about trial ``t`` (a ``FrozenTrial``) as one flat dict —
    ``spec``, ``spec_hash``, ``spec_yaml``, ``status``, ``reason``, ``values`` ... plus any
    other user attribute (``searcher``, ``oneshot``) — whichever layout wrote it: the one
    :data:`TRIAL_ATTR` dict (one storage write), or a user attribute per key (studies
    written by earlier archir versions, and the ``status``/``reason`` that
    :mod:`searchers.storage` records for a killed trial).

    Where the dict holds a result, the separate result keys (copied from a failed original
    to its retry) are ignored — except on a FAIL trial whose dict says it finished: the
    process died after writing it and the separate ``status``/``reason`` say why.
    """
    ua = t.user_attrs
    rec = ua.get(TRIAL_ATTR)
    out = {k: v for k, v in ua.items() if k != TRIAL_ATTR}
    if not isinstance(rec, dict):
        return out
    for k in MODEL_KEYS:
        out.pop(k, None)
    if "status" not in rec:
        out.update(rec)
        return out
    killed = (
        getattr(t.state, "name", None) == "FAIL"
        and "status" in ua
        and rec.get("status") not in _FAILED
    )
    flat = {k: out.pop(k) for k in RESULT_KEYS if k in out}
    out.update(rec)
    if killed:
        out["status"] = flat["status"]
        out["reason"] = flat.get("reason", "")
    return out


def feasible(t: Any) -> bool:
    """Whether trial ``t`` (a ``FrozenTrial``) finished and met every constraint."""
    return getattr(t.state, "name", None) == "COMPLETE" and all(
        v <= 0 for v in trial_attrs(t).get("violations", [0.0])
    )
