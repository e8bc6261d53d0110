"""What a search is configured with and what it leaves behind (shared by the search loop,
the Pareto bookkeeping and the one-shot searchers; imports none of them)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

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
    """What a finished search left behind."""

    run_dir: Path
    study_name: str
    storage: str
    n_trials: int
    states: dict[str, int]
    front: list[dict[str, Any]]
    best: dict[str, Any] | None
    wall_s: float
    messages: list[str] = field(default_factory=list)


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


def trial_train_cfg(cfg: SearchConfig) -> TrainSection:
    """The ``train:`` section a trial uses at the search's fidelity."""
    sec, train = cfg.section, cfg.train_section
    upd: dict[str, Any] = {}
    fid = sec.fidelity
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
