"""What a search is configured with and what it leaves behind (shared by the search loop,
the Pareto bookkeeping and the one-shot searchers; imports none of them)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from archir.errors import SearchError
from archir.spec.sections import SearchSection, TrainSection
from searchers.objectives import PRE_TRAINING, Constraint, Objective, parse_objectives


@dataclass
class SearchConfig:
    """Everything a worker needs (plain data, so it crosses process boundaries)."""

    spec_path: str
    run_dir: str
    storage_url: str | None
    study_name: str
    search: dict[str, Any]
    train: dict[str, Any]
    space_hash: str
    trials: int
    timeout_s: float | None
    workers: int
    progress: bool = False
    heartbeat_interval: int = 5
    grace_period: int = 30
    #: the registered searcher (:mod:`searchers.base`) whose run this is: the worker loop
    #: asks it who proposes the next model
    searcher: str = "optuna"

    @property
    def section(self) -> SearchSection:
        return SearchSection.model_validate(self.search)

    @property
    def train_section(self) -> TrainSection:
        return TrainSection.model_validate(self.train)

    @property
    def journal(self) -> Path:
        return Path(self.run_dir) / "study.journal"


@dataclass
class SearchResult:
    """What a finished search left behind (every searcher returns one).

    Attributes:
        run_dir: the run folder. study_name, storage: where the trials are recorded.
        n_trials: trials in the study. states: trials per state (``COMPLETE``, ...).
        front: the Pareto front's rows (``pareto.json``). best: the best trial's row, or None.
        wall_s: seconds the search took. messages: what the front's bookkeeping said.
        extra: what a searcher adds (one-shot: ``arch_weights``, ``collapse``, ``held``,
            ``latency``, ``supernet``, ``cpu_s`` ... as in ``oneshot.json``).
    """

    run_dir: Path
    study_name: str
    storage: str
    n_trials: int
    states: dict[str, int]
    front: list[dict[str, Any]]
    best: dict[str, Any] | None
    wall_s: float
    messages: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _task_info(train: TrainSection) -> tuple[str, str, tuple[str, ...]]:
    from archir.tasks.base import get_task

    task = get_task(train.task, train.task_options)
    metrics = tuple(dict.fromkeys([task.metric, "val_loss"]))
    return task.metric, task.direction, metrics


def _objectives(cfg: SearchConfig) -> tuple[list[Objective], list[Constraint], bool]:
    """The search's objectives, constraints and whether trials train.

    Raises:
        SearchError: see :func:`searchers.objectives.parse_objectives`.
    """
    sec, train = cfg.section, cfg.train_section
    metric, direction, metrics = _task_info(train)
    fid = sec.fidelity.kind
    objs, cons = parse_objectives(
        sec.objectives,
        sec.constraints,
        task_metric=metric,
        task_direction=direction,
        task_metrics=metrics,
        trains=fid != "cost",
    )
    needs_training = any(o.metric not in PRE_TRAINING for o in objs) or any(
        c.metric not in PRE_TRAINING for c in cons
    )
    return objs, cons, needs_training and fid != "cost"


def ladder_rungs(cfg: SearchConfig) -> list[int]:
    """The rungs (optimizer steps) of a ``ladder`` fidelity: as written, else
    ``train.steps`` / 16, / 4 and ``train.steps`` (at least 1, 2, 3 steps)."""
    fid, steps = cfg.section.fidelity, cfg.train_section.steps
    if fid.rungs:
        return list(fid.rungs)
    return sorted({max(1, steps // 16), max(2, steps // 4), max(3, steps)})


#: sequences per evaluation batch on a ladder (evaluating the whole validation split)
LADDER_EVAL_BATCH = 64


def trial_train_cfg(cfg: SearchConfig) -> TrainSection:
    """The ``train:`` section a trial uses at the search's fidelity (on a ladder: the
    ``wsd`` schedule up to the last rung, the whole validation split evaluated)."""
    sec, train = cfg.section, cfg.train_section
    upd: dict[str, Any] = {}
    fid = sec.fidelity
    if fid.kind == "ladder":
        from archir.spec.sections import MAX_REPEATS
        from archir.train import decay_start

        rungs = ladder_rungs(cfg)
        upd.update(
            steps=rungs[-1],
            schedule="wsd",
            eval_every=rungs[-1],
            eval_batches=fid.eval_batches or MAX_REPEATS,
            eval_batch_size=train.eval_batch_size or LADDER_EVAL_BATCH,
            threads=train.threads or 1,
        )
        first = decay_start(rungs[0], train)
        upd["warmup_steps"] = min(train.warmup_steps, first)
        return train.model_copy(update=upd)
    if fid.kind == "proxy":
        if fid.steps is not None:
            upd["steps"] = fid.steps
        if fid.time_budget_s is not None:
            upd["time_budget_s"] = fid.time_budget_s
        if fid.eval_every is None:
            steps = upd.get("steps", train.steps)
            upd["eval_every"] = max(1, steps // 4)
    if fid.eval_every is not None:
        upd["eval_every"] = fid.eval_every
    if fid.eval_batches is not None:
        upd["eval_batches"] = fid.eval_batches
    if train.threads is None:
        upd["threads"] = 1  # small models: one thread per trial, parallelism via workers
    if "steps" in upd:
        upd["warmup_steps"] = min(train.warmup_steps, max(0, upd["steps"] // 10))
    return train.model_copy(update=upd)


def _silence() -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*heartbeat.*")


def fidelity_signature(cfg: SearchConfig) -> dict[str, Any]:
    """What a trial's training budget is: the fidelity kind and, when trials train, the
    ``train:`` section a trial runs with (:func:`trial_train_cfg`, thread count left out).
    Stored with a study when it is created (``archir:fidelity``); a resumed study refuses
    another one, so that a front never compares trials trained at different budgets."""
    kind = cfg.section.fidelity.kind
    if kind == "cost":
        return {"kind": "cost"}
    train = trial_train_cfg(cfg).model_dump(mode="json")
    train.pop("threads", None)
    if kind == "ladder":
        return {
            "kind": kind,
            "train": train,
            "rungs": ladder_rungs(cfg),
            "eta": cfg.section.fidelity.eta,
        }
    return {"kind": kind, "train": train}


def fidelity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two :func:`fidelity_signature` values: ``["train.steps 4 -> 30"]``."""

    def flat(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"fidelity": d.get("kind")}
        for k in ("rungs", "eta"):
            if k in d:
                out[k] = d[k]
        defaults = {
            k: f.get_default(call_default_factory=True)
            for k, f in TrainSection.model_fields.items()
        }
        for k, v in (d.get("train") or {}).items():
            out[f"train.{k}"] = v
        for k, v in defaults.items():  # settings added since the study was made: defaults
            if d.get("train") is not None and k not in d["train"] and k != "threads":
                out[f"train.{k}"] = v
        return out

    if old.get("kind") != new.get("kind") and "cost" in (old.get("kind"), new.get("kind")):
        return [f"fidelity {old.get('kind')!r} -> {new.get('kind')!r}"]
    a, b = flat(old), flat(new)
    return [
        f"{k} {a.get(k, '-')!r} -> {b.get(k, '-')!r}"
        for k in sorted(set(a) | set(b), key=lambda k: (k != "fidelity", k))
        if a.get(k) != b.get(k)
    ]


#: upper bounds of the search options (lower bounds: the ``search:`` section's schema)
from archir.spec.sections import MAX_SEARCH_SEED as MAX_SEED  # noqa: E402
from archir.spec.sections import MAX_SECONDS as MAX_TIMEOUT_S  # noqa: E402
from archir.spec.sections import MAX_STEPS, MAX_TRIALS, MAX_WORKERS  # noqa: E402


def check_option_bounds(**given: Any) -> None:
    """Range-check search options — given on the command line, to
    :func:`searchers.run.run_search`, or in the spec's ``search:`` section (``None`` = not set):
    ``trials``, ``workers``, ``steps``, ``supernet_steps``, ``seed``, ``timeout_s``. (The
    lower bounds of the ``search:`` fields are also the section's schema's.)

    Raises:
        SearchError: a value out of range, not a whole number, or not finite; the message
            names the flag, the ``search:`` field and the value.
    """
    bounds: dict[str, tuple[str, float, float]] = {
        "trials": ("--trials (search.budget.trials)", 1, MAX_TRIALS),
        "workers": ("--workers (search.workers)", 1, MAX_WORKERS),
        "steps": ("--steps (search.fidelity.steps)", 1, MAX_STEPS),
        "supernet_steps": ("--supernet-steps", 1, MAX_STEPS),
        "seed": ("--seed (search.seed)", 0, MAX_SEED),
        "timeout_s": ("--timeout (search.budget.timeout_s)", 0, MAX_TIMEOUT_S),
    }
    for key, value in given.items():
        if value is None:
            continue
        flag, lo, hi = bounds[key]
        whole = key != "timeout_s"
        ok_type = (
            isinstance(value, int) if whole else isinstance(value, int | float)
        ) and not isinstance(value, bool)
        if not ok_type:
            what = "a whole number" if whole else "a number"
            raise SearchError(f"bad search option {flag}: expected {what} (got {value!r})")
        if not math.isfinite(value):
            raise SearchError(f"bad search option {flag}: must be finite (got {value!r})")
        if value < lo or (key == "timeout_s" and value <= 0):
            rel = "greater than 0" if key == "timeout_s" else f"at least {int(lo)}"
            raise SearchError(f"bad search option {flag}: must be {rel} (got {value!r})")
        if value > hi:
            raise SearchError(
                f"bad search option {flag}: must be at most {int(hi)} (got {value!r})",
                hint="see 'archir search --help'",
            )
