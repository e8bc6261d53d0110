"""The search loop: an Optuna study over a spec's open choices.

``run_search(spec_path, ...)`` is what ``archir search`` runs::

    runs/<name>/
      spec.yaml        the spec as given           run.json   storage URL, study name, space
      study.journal    Optuna journal storage (unless --storage URL)
      trials/<n>/      spec.yaml (concrete), metrics.json, log, model.safetensors (front only)
      pareto.json      pareto.png      best/  spec.yaml, model.safetensors, model.onnx, report.json

Each trial: fix the spec with the sampler's suggestions (define-by-run), run the cost pass,
measure latency when asked, refuse candidates that break a constraint decidable before
training (recorded as ``infeasible`` with the reason, Optuna state PRUNED), then train at the
chosen fidelity, fake-quantize blocks below 16 bits (:mod:`archir.quant`), evaluate, and
report every objective and constraint value. Single-objective searches prune with the
trainer's intermediate evaluations; multi-objective searches stop diverging trials.

Resume and parallel work come from Optuna's storage: the same command resumes the study; a
trial left RUNNING by a killed process (its heartbeat is stale, or its process is gone on
this host) is marked FAIL and its configuration retried once (``RetryHeartbeatStaleTrialCallback``);
``workers`` processes share one study.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from archir.errors import ArchirError, SearchError
from archir.spec.loader import Spec, load_spec
from archir.spec.sections import SearchSection, TrainSection
from searchers.objectives import (
    COST_METRICS,
    PRE_TRAINING,
    Constraint,
    Objective,
    check_constraints,
    parse_objectives,
)
from searchers.space import random_decider, space_description, space_hash, spec_hash, suggest

HOST = socket.gethostname()
ATTR_HOST = "archir:host"
ATTR_PID = "archir:pid"
ATTR_BEAT = "archir:heartbeat"


# ---------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(t: FrozenTrial) -> bool:
    """A RUNNING trial whose process on this host is gone."""
    host, pid = t.system_attrs.get(ATTR_HOST), t.system_attrs.get(ATTR_PID)
    return host == HOST and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage plus heartbeats (which the journal backend lacks).

    A running trial writes a ``archir:heartbeat`` timestamp every ``heartbeat_interval``
    seconds; a RUNNING trial whose last beat is older than ``grace_period`` seconds — or whose
    process on this host no longer exists — is stale, and Optuna marks it FAIL and calls the
    stale-trial callback (a :class:`RetryHeartbeatStaleTrialCallback` re-enqueues its parameters).
    """

    def __init__(
        self,
        path: str,
        heartbeat_interval: int,
        grace_period: int,
        callback: Callable[[optuna.Study, FrozenTrial], None] | None,
    ) -> None:
        super().__init__(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path, 10)))
        self._hb_interval = heartbeat_interval
        self._grace = grace_period
        self._stale_cb = callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, ATTR_BEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        out = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(ATTR_BEAT)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if _dead_here(t) or (beat is not None and now - float(beat) > self._grace):
                out.append(t._trial_id)
        return out

    def get_heartbeat_interval(self) -> int | None:
        return self._hb_interval

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._stale_cb


def open_storage(
    url: str | None, journal: Path, heartbeat_interval: int = 5, grace_period: int = 30
) -> optuna.storages.BaseStorage:
    """The study's storage: a journal file (default) or any Optuna storage URL.

    Raises:
        SearchError: the URL cannot be opened or reached.
    """
    retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    if url is None:
        return HeartbeatJournalStorage(str(journal), heartbeat_interval, grace_period, retry)
    try:
        if url.endswith((".journal", ".log")) and "://" not in url:
            return HeartbeatJournalStorage(url, heartbeat_interval, grace_period, retry)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry,
            )
        storage.get_all_studies()
        return storage
    except Exception as exc:  # noqa: BLE001 - any driver/connection failure is a user error
        raise SearchError(
            f"cannot open storage {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            hint="check the URL, the server and the database driver "
            "(e.g. sqlite:///runs/x.db, postgresql://user@host/db)",
        ) from None


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL (and retry once) RUNNING trials whose process on this host is gone.

    Returns the numbers of the trials failed.
    """
    retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    done = []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _dead_here(t):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "status", "failed")
            storage.set_trial_user_attr(
                t._trial_id, "reason", "its process died (killed); configuration retried once"
            )
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(t._trial_id))
                done.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    return done


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
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


def make_sampler(
    name: str, seed: int, n_objectives: int, trials: int, population: int | None, workers: int
) -> optuna.samplers.BaseSampler:
    """The sampler called ``name`` (``tpe``, ``nsga2``, ``random``, ``gp``), seeded.

    Raises:
        SearchError: unknown sampler name.
    """

    def cons(t: FrozenTrial) -> list[float]:
        return list(t.user_attrs.get("violations", [0.0]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=max(3, min(10, trials // 3)),
                constraints_func=cons,
                constant_liar=workers > 1,
            )
        if name == "nsga2":
            pop = population or max(4, min(50, trials // 4))
            return optuna.samplers.NSGAIISampler(
                seed=seed, population_size=pop, constraints_func=cons
            )
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(
                seed=seed,
                n_startup_trials=max(3, min(10, trials // 3)),
                constraints_func=cons,
            )
    raise SearchError(f"unknown sampler '{name}'", hint="expected one of: tpe, nsga2, random, gp")


def make_pruner(sec: SearchSection, train: TrainSection) -> optuna.pruners.BasePruner:
    if sec.pruner == "none" or len(sec.objectives) > 1:
        return optuna.pruners.NopPruner()
    if sec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=train.steps)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


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


# ---------------------------------------------------------------------------------------
# one trial
# ---------------------------------------------------------------------------------------
class TrialFailed(Exception):
    """A trial that crashed or diverged; recorded FAIL with its reason, the search goes on."""


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.perf_counter()
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(f"[{time.perf_counter() - self.t0:7.2f}s] {msg}")

    def flush(self) -> None:
        self.path.write_text("\n".join(self.lines) + "\n")


class Evaluator:
    """Evaluates one Optuna trial: a concrete spec's costs, latency and quality."""

    def __init__(self, cfg: SearchConfig, spec: Spec) -> None:
        self.cfg = cfg
        self.spec = spec
        self.sec = cfg.section
        self.objectives, self.constraints, self.trains = _objectives(cfg)
        self.train_cfg = trial_train_cfg(cfg)
        self.run_dir = Path(cfg.run_dir)
        used = {o.metric for o in self.objectives} | {c.metric for c in self.constraints}
        self.need_latency = "latency_ms" in used
        self._task: Any = None
        self.consecutive_rejections = 0

    @property
    def task(self) -> Any:
        if self._task is None:
            from archir.tasks.base import get_task

            self._task = get_task(self.train_cfg.task, self.train_cfg.task_options)
        return self._task

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        storage = trial.study._storage
        storage.set_trial_system_attr(trial._trial_id, ATTR_HOST, HOST)
        storage.set_trial_system_attr(trial._trial_id, ATTR_PID, os.getpid())
        tdir = self.run_dir / "trials" / str(trial.number)
        if tdir.exists():  # a folder left by a killed attempt with this number
            shutil.rmtree(tdir)
        tdir.mkdir(parents=True)
        log = _Log(tdir / "log")
        timing: dict[str, float] = {}
        t_start = time.perf_counter()
        metrics: dict[str, Any] = {"trial": trial.number}
        retried = storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        if retried is not None:
            metrics["retry_of"] = retried
            log(f"retry of trial {retried}")
        try:
            return self._evaluate(trial, tdir, log, timing, metrics)
        except optuna.TrialPruned:
            raise
        except TrialFailed as exc:
            metrics.update(status="failed", reason=str(exc))
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", str(exc))
            log(f"failed: {exc}")
            raise
        except ArchirError as exc:
            metrics.update(status="failed", reason=str(exc))
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", str(exc))
            log(f"failed: {exc}")
            raise TrialFailed(str(exc)) from None
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            metrics.update(status="failed", reason=reason)
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", reason)
            import traceback

            log("crashed:\n" + traceback.format_exc())
            raise TrialFailed(reason) from None
        finally:
            timing["total_s"] = time.perf_counter() - t_start
            metrics["timing"] = timing
            metrics["params_chosen"] = dict(trial.params)
            (tdir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json))
            log.flush()

    def _evaluate(
        self,
        trial: optuna.Trial,
        tdir: Path,
        log: _Log,
        timing: dict[str, float],
        metrics: dict[str, Any],
    ) -> float | tuple[float, ...]:
        from archir.cost import analyze

        t = time.perf_counter()
        concrete = self.spec.fix(suggest(trial))
        decisions = dict(concrete.decisions)
        concrete.data["name"] = f"{self.spec.name}-t{trial.number}"
        concrete = Spec(concrete.data)
        concrete.save(tdir / "spec.yaml")
        timing["fix_s"] = time.perf_counter() - t
        trial.set_user_attr("spec", f"trials/{trial.number}/spec.yaml")
        h = spec_hash(concrete.data)
        trial.set_user_attr("spec_hash", h)
        log(f"decisions: {json.dumps(decisions, default=str)}")

        t = time.perf_counter()
        cost = analyze(concrete)
        values: dict[str, float] = {k: float(getattr(cost, k)) for k in COST_METRICS}
        timing["cost_s"] = time.perf_counter() - t
        metrics["values"] = values

        dup = self._duplicate_of(trial, h)
        if dup is not None:
            log(f"same model as trial {dup.number}: its results are reused")
            metrics["duplicate_of"] = dup.number
            for k, v in dup.user_attrs.items():
                if k not in ("spec", "spec_hash"):
                    trial.set_user_attr(k, v)
            trial.set_user_attr("duplicate_of", dup.number)
            metrics.update(status=dup.user_attrs.get("status", "ok"))
            metrics["values"] = dup.user_attrs.get("values", values)
            return tuple(dup.values) if len(dup.values) > 1 else dup.values[0]

        self._check(trial, values, log, metrics, "cost analysis")
        model = None
        if self.need_latency or self.trains:
            from archir.compiler import compile as compile_spec

            t = time.perf_counter()
            model = compile_spec(concrete, seed=self.train_cfg.seed)
            timing["compile_s"] = time.perf_counter() - t
        if self.need_latency:
            from searchers.latency import example_input, measure_latency_ms

            lat = self.sec.latency
            t = time.perf_counter()
            x = example_input(concrete.model, lat.batch, lat.seq_len or self.train_cfg.seq_len)
            values["latency_ms"] = measure_latency_ms(
                model, x, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats
            )
            timing["latency_s"] = time.perf_counter() - t
            log(f"latency {values['latency_ms']:.3f} ms")
            self._check(trial, values, log, metrics, "latency measurement")
        self.consecutive_rejections = 0

        if self.trains:
            values.update(self._train(trial, concrete, model, tdir, log, timing, metrics))
        metrics["values"] = values
        violations = [c.violation(values[c.metric]) for c in self.constraints] or [0.0]
        feasible = all(v <= 0 for v in violations)
        trial.set_user_attr("values", values)
        trial.set_user_attr("violations", violations)
        trial.set_user_attr("status", "ok" if feasible else "infeasible")
        if not feasible:
            trial.set_user_attr(
                "reason",
                "; ".join(check_constraints(self.constraints, values, pre_training=False)),
            )
        metrics["status"] = "ok" if feasible else "infeasible"
        metrics["constraints"] = {
            c.metric: {"expr": c.text, "value": values[c.metric], "ok": c.ok(values[c.metric])}
            for c in self.constraints
        }
        out = tuple(float(values[o.metric]) for o in self.objectives)
        log("values: " + ", ".join(f"{o.metric}={v:.5g}" for o, v in zip(self.objectives, out)))
        return out if len(out) > 1 else out[0]

    def _duplicate_of(self, trial: optuna.Trial, h: str) -> FrozenTrial | None:
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("spec_hash") == h and t.number != trial.number:
                return t
        return None

    def _check(
        self,
        trial: optuna.Trial,
        values: dict[str, float],
        log: _Log,
        metrics: dict[str, Any],
        phase: str,
    ) -> None:
        reasons = check_constraints(
            [c for c in self.constraints if c.metric in values], values, pre_training=True
        )
        if not reasons:
            return
        self.consecutive_rejections += 1
        reason = f"infeasible before training ({phase}): " + "; ".join(reasons)
        rel = sum(
            c.relative_violation(values[c.metric]) for c in self.constraints if c.metric in values
        )
        trial.set_user_attr("status", "infeasible")
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("values", dict(values))
        trial.set_user_attr("rel_violation", rel)
        trial.set_user_attr(
            "violations",
            [
                c.violation(values[c.metric]) if c.metric in values else 0.0
                for c in self.constraints
            ],
        )
        metrics.update(status="infeasible", reason=reason, values=dict(values))
        log(reason)
        raise optuna.TrialPruned(reason)

    def _train(
        self,
        trial: optuna.Trial,
        concrete: Spec,
        model: Any,
        tdir: Path,
        log: _Log,
        timing: dict[str, float],
        metrics: dict[str, Any],
    ) -> dict[str, float]:
        from archir.quant import needs_quantization, quantize_model
        from archir.train import train

        cfg = self.train_cfg
        task = self.task
        single = len(self.objectives) == 1
        qmetric = next(
            (o.metric for o in self.objectives if o.metric not in PRE_TRAINING), task.metric
        )
        state: dict[str, Any] = {"first": None, "pruned": False, "diverged": None}

        def callback(step: int, ev: dict[str, float]) -> bool:
            loss = float(ev.get("train_loss", math.nan))
            log(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items() if k != "step"))
            if state["first"] is None:
                state["first"] = loss
            if not math.isfinite(loss) or loss > 3.0 * max(state["first"], 1e-6):
                state["diverged"] = f"loss diverged to {loss:.4g} at step {step}"
                return True
            if single and self.sec.pruner != "none" and qmetric in ev:
                trial.report(float(ev[qmetric]), step)
                if trial.should_prune():
                    state["pruned"] = True
                    return True
            return False

        t = time.perf_counter()
        result = train(concrete, task, None, cfg, callback=callback, model=model)
        timing["train_s"] = time.perf_counter() - t
        m = {k: v for k, v in result.metrics.items() if k != "history"}
        metrics["train"] = m
        metrics["history"] = result.history
        if state["pruned"]:
            trial.set_user_attr("status", "pruned")
            trial.set_user_attr("reason", m.get("reason", "pruned"))
            metrics.update(status="pruned", reason=m.get("reason"))
            log("pruned by the median rule")
            raise optuna.TrialPruned()
        if state["diverged"]:
            raise TrialFailed(state["diverged"])
        if result.status == "failed":
            raise TrialFailed(m.get("reason", "training failed"))
        out: dict[str, float] = {k: float(m[k]) for k in (task.metric, "val_loss") if k in m}
        model = result.model
        if needs_quantization(model):
            t = time.perf_counter()
            q = quantize_model(model)
            ev = task.evaluate(
                model,
                cfg.batch_size,
                min(cfg.seq_len, concrete.model.model.max_seq_len),
                cfg.eval_batches,
            )
            timing["quant_eval_s"] = time.perf_counter() - t
            for k in list(out):
                out[f"{k}_fp"] = out[k]
            out.update({k: float(v) for k, v in ev.items()})
            metrics["quantized"] = q["quantized"]
            log(
                f"fake-quantized {len(q['quantized'])} node(s): {task.metric} {out[task.metric]:.4g} "
                f"(full precision {out[task.metric + '_fp']:.4g})"
            )
            if not all(math.isfinite(v) for v in out.values()):
                raise TrialFailed("evaluation after quantization produced a non-finite metric")
        from safetensors.torch import save_model

        save_model(model, str(tdir / "model.safetensors"))
        return out


def _json(o: Any) -> Any:
    if isinstance(o, float):
        return o
    return str(o)


# ---------------------------------------------------------------------------------------
# worker loop
# ---------------------------------------------------------------------------------------
def _retried(trials: list[FrozenTrial]) -> set[int]:
    out = set()
    for t in trials:
        n = t.system_attrs.get("failed_trial")
        if n is not None:
            out.add(int(n))
    return out


def budget_used(trials: list[FrozenTrial]) -> int:
    """Finished trials that count against the budget: COMPLETE, PRUNED (incl. infeasible)
    and FAIL — except failed trials whose configuration was retried (killed processes)."""
    retried = _retried(trials)
    n = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and t.number not in retried:
            n += 1
    return n


def _closest(trials: list[FrozenTrial], k: int = 3) -> str:
    cand = [t for t in trials if "rel_violation" in t.user_attrs]
    cand.sort(key=lambda t: t.user_attrs["rel_violation"])
    parts = []
    for t in cand[:k]:
        reason = str(t.user_attrs.get("reason", "")).split(": ", 1)[-1]
        parts.append(f"trial {t.number} {json.dumps(t.params, default=str)}: {reason}")
    return " | ".join(parts)


def _silence() -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*heartbeat.*")


def worker(cfg: SearchConfig, worker_id: int = 0, say: Callable[[str], None] | None = None) -> None:
    """Run trials on the shared study until the budget is spent.

    Raises:
        SearchError: ``max_rejections`` consecutive candidates broke a constraint and no
            candidate has met them all yet.
    """
    _silence()
    say = say or (lambda s: None)
    spec = load_spec(cfg.spec_path)
    sec = cfg.section
    storage = open_storage(cfg.storage_url, cfg.journal, cfg.heartbeat_interval, cfg.grace_period)
    n_obj = len(sec.objectives)
    sampler_name = sec.sampler or ("tpe" if n_obj == 1 else "nsga2")
    existing = optuna.load_study(study_name=cfg.study_name, storage=storage)
    n_before = len(existing.trials)
    seed = sec.seed + 7919 * worker_id + n_before
    sampler = make_sampler(sampler_name, seed, n_obj, cfg.trials, sec.population, cfg.workers)
    study = optuna.load_study(
        study_name=cfg.study_name,
        storage=storage,
        sampler=sampler,
        pruner=make_pruner(sec, cfg.train_section),
    )
    for n in fail_dead_trials(study):
        say(f"trial {n} was left running by a killed process: failed, retried once")
    evaluator = Evaluator(cfg, spec)
    deadline = time.time() + cfg.timeout_s if cfg.timeout_s else None

    def report(study: optuna.Study, t: FrozenTrial) -> None:
        status = t.user_attrs.get("status", t.state.name.lower())
        vals = t.user_attrs.get("values", {})
        shown = ", ".join(
            f"{o}={vals[o]:.4g}" for o in sec.objectives if o in vals and vals[o] is not None
        )
        reason = t.user_attrs.get("reason", "")
        say(
            f"trial {t.number:>3} {status:<10} {shown}"
            + (f"  ({reason[:110]})" if reason and status != "ok" else "")
        )

    while True:
        trials = study.get_trials(deepcopy=False)
        used = budget_used(trials)
        running = sum(1 for t in trials if t.state == TrialState.RUNNING and not _dead_here(t))
        waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
        if used >= cfg.trials or (used + running >= cfg.trials and not waiting):
            break
        if deadline is not None and time.time() > deadline:
            say("time budget reached")
            break
        study.optimize(
            evaluator, n_trials=1, catch=(TrialFailed,), callbacks=[report], gc_after_trial=False
        )
        if evaluator.consecutive_rejections >= sec.max_rejections:
            trials = study.get_trials(deepcopy=False)
            if not any(t.state == TrialState.COMPLETE for t in trials):
                raise SearchError(
                    f"{evaluator.consecutive_rejections} candidates in a row broke the "
                    f"constraints and none has met them yet; closest: {_closest(trials)}",
                    hint="loosen search.constraints or shrink the space toward the closest "
                    "candidates",
                )


def _worker_entry(cfg_dict: dict[str, Any], worker_id: int, q: Any) -> None:
    cfg = SearchConfig(**cfg_dict)
    try:
        worker(cfg, worker_id, say=lambda s: print(f"[w{worker_id}] {s}", flush=True))
        q.put((worker_id, None))
    except ArchirError as exc:
        q.put((worker_id, str(exc)))
    except BaseException as exc:  # noqa: BLE001
        q.put((worker_id, f"worker crashed: {type(exc).__name__}: {exc}"))
        raise


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------
def _preflight(spec: Spec, constraints: list[Constraint], tries: int, seed: int) -> None:
    """Refuse a search whose cost constraints no candidate meets: draw up to ``tries``
    random candidates through the cost pass (no training) and stop at the first feasible one.

    Raises:
        SearchError: none met the cost constraints; the closest three are listed.
    """
    from archir.cost import analyze

    cost_cons = [c for c in constraints if c.metric in COST_METRICS]
    if not cost_cons:
        return
    rng = random.Random(seed)
    seen: list[tuple[float, str]] = []
    for _ in range(tries):
        try:
            concrete = spec.fix(random_decider(rng))
            cost = analyze(concrete)
        except ArchirError:
            continue
        values = {k: float(getattr(cost, k)) for k in COST_METRICS}
        if all(c.ok(values[c.metric]) for c in cost_cons):
            return
        rel = sum(c.relative_violation(values[c.metric]) for c in cost_cons)
        broken = "; ".join(
            c.describe(values[c.metric]) for c in cost_cons if not c.ok(values[c.metric])
        )
        seen.append((rel, f"{json.dumps(concrete.decisions, default=str)}: {broken}"))
    seen.sort(key=lambda x: x[0])
    raise SearchError(
        f"no candidate meets the constraints ({len(seen)} of {tries} random candidates "
        f"checked by cost analysis); closest: " + " | ".join(s for _, s in seen[:3]),
        hint="loosen search.constraints or shrink the space",
    )


def _study_matches(storage: optuna.storages.BaseStorage, name: str, shash: str) -> bool | None:
    """None: no such study; True/False: it exists with the same / a different space."""
    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    attrs = storage.get_study_user_attrs(sid)
    return attrs.get("archir:space_hash") == shash


def run_search(
    spec_path: str | Path,
    *,
    out: str | Path | None = None,
    storage: str | None = None,
    study: str | None = None,
    sampler: str | None = None,
    trials: int | None = None,
    workers: int | None = None,
    seed: int | None = None,
    fidelity: str | None = None,
    steps: int | None = None,
    timeout_s: float | None = None,
    export: bool = True,
    heartbeat_interval: int = 5,
    grace_period: int = 30,
    say: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search the open choices of a spec; write the run folder (DESIGN.md §9).

    Args:
        spec_path: an open spec with a ``search:`` section.
        out: run folder (default ``runs/<spec name>``).
        storage: an Optuna storage URL (default: ``<out>/study.journal``).
        study: study name (default: the spec name).
        sampler, trials, workers, seed, fidelity, steps, timeout_s: override the spec's
            ``search:`` section (``steps`` sets a proxy fidelity's step budget).
        export: write ``best/model.onnx`` (parity-checked) at the end.

    Returns:
        SearchResult with the Pareto front and the best trial.

    Raises:
        SpecError: the spec is invalid. SearchError: nothing to search, unknown objective,
            malformed constraint, unreachable storage, a study of that name with a different
            space, or constraints no candidate meets. Nothing is left behind in a run folder
            that this call created when it fails.
    """
    _silence()
    say = say or print
    t0 = time.time()
    spec = load_spec(spec_path)
    if spec.is_concrete:
        raise SearchError(
            f"spec '{spec.name}' has no search nodes: nothing to search",
            hint="write {choice: [...]}, {int: [lo, hi]} or {float: [lo, hi]} where a value may vary",
        )
    data = spec.data
    sec = SearchSection.model_validate(data.get("search") or {})
    train = TrainSection.model_validate(data.get("train") or {})
    upd: dict[str, Any] = {}
    if sampler is not None:
        upd["sampler"] = sampler
    if seed is not None:
        upd["seed"] = seed
    if workers is not None:
        upd["workers"] = workers
    fid = sec.fidelity.model_dump()
    if fidelity is not None:
        fid["kind"] = fidelity
    if steps is not None:
        fid["steps"] = steps
        if fid["kind"] == "full":
            fid["kind"] = "proxy"
    upd["fidelity"] = fid
    budget = sec.budget.model_copy(
        update={k: v for k, v in {"trials": trials, "timeout_s": timeout_s}.items() if v}
    )
    upd["budget"] = budget.model_dump()
    try:
        sec = SearchSection.model_validate({**sec.model_dump(), **upd})
    except Exception as exc:  # pydantic error on an override
        raise SearchError(f"bad search option: {str(exc).splitlines()[-1]}") from None
    run_dir = Path(out) if out else Path("runs") / spec.name
    name = study or spec.name
    shash = space_hash(spec.nodes)
    cfg = SearchConfig(
        spec_path=str(Path(spec_path)),
        run_dir=str(run_dir),
        storage_url=storage,
        study_name=name,
        search=sec.model_dump(),
        train=train.model_dump(),
        space_hash=shash,
        trials=sec.budget.trials,
        timeout_s=sec.budget.timeout_s,
        workers=sec.workers,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
    )
    # -- everything that can be refused is refused before the run folder is touched --------
    objectives, constraints, _ = _objectives(cfg)
    if storage is None and (run_dir / "run.json").exists():
        prev = json.loads((run_dir / "run.json").read_text())
        if prev.get("space_hash") != shash and prev.get("study") == name:
            raise SearchError(
                f"{run_dir} holds study '{name}' of a different search space",
                hint="give another --out or --study, or delete the folder",
            )
    journal_exists = (run_dir / "study.journal").exists()
    st = (
        open_storage(storage, cfg.journal, heartbeat_interval, grace_period)
        if storage is not None or journal_exists
        else None
    )
    if st is not None:
        match = _study_matches(st, name, shash)
        if match is False:
            raise SearchError(
                f"study '{name}' already exists in the storage with a different search space",
                hint="use another --study name (or --out folder)",
            )
        if match is True:
            stored = st.get_study_directions(st.get_study_id_from_name(name))
            if len(stored) != len(objectives):
                raise SearchError(
                    f"study '{name}' exists with {len(stored)} objective(s), the spec has "
                    f"{len(objectives)}",
                    hint="use another --study name",
                )
    _preflight(spec, constraints, max(64, sec.max_rejections), sec.seed)

    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if st is None:
            st = open_storage(storage, cfg.journal, heartbeat_interval, grace_period)
        src = Path(spec_path).read_text(encoding="utf-8")
        (run_dir / "spec.yaml").write_text(src, encoding="utf-8")
        (run_dir / "run.json").write_text(
            json.dumps(
                {
                    "spec": str(spec_path),
                    "study": name,
                    "storage": storage or "study.journal",
                    "space_hash": shash,
                    "space": space_description(spec.nodes),
                    "objectives": {o.metric: o.direction for o in objectives},
                    "constraints": {c.metric: c.text for c in constraints},
                    "search": sec.model_dump(),
                },
                indent=2,
            )
        )
        ostudy = optuna.create_study(
            storage=st,
            study_name=name,
            directions=[
                optuna.study.StudyDirection.MINIMIZE
                if o.direction == "minimize"
                else optuna.study.StudyDirection.MAXIMIZE
                for o in objectives
            ],
            load_if_exists=True,
        )
        if "archir:space_hash" not in ostudy.user_attrs:
            ostudy.set_user_attr("archir:space_hash", shash)
            ostudy.set_user_attr("archir:objectives", [[o.metric, o.direction] for o in objectives])
            ostudy.set_user_attr("archir:constraints", [[c.metric, c.text] for c in constraints])
            ostudy.set_user_attr("archir:spec", spec.to_yaml())
        before = budget_used(ostudy.get_trials(deepcopy=False))
        sampler_name = sec.sampler or ("tpe" if len(objectives) == 1 else "nsga2")
        say(
            f"search '{name}': {len(space_description(spec.nodes))} decisions, sampler "
            f"{sampler_name}, fidelity {sec.fidelity.kind}, {cfg.trials} trials"
            + (f" ({before} done, resuming)" if before else "")
            + f", {cfg.workers} worker(s); storage {storage or cfg.journal}"
        )
        if cfg.workers == 1:
            worker(cfg, 0, say)
        else:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            procs = [
                ctx.Process(target=_worker_entry, args=(asdict(cfg), i, q))
                for i in range(cfg.workers)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            errors = []
            while not q.empty():
                _, err = q.get()
                if err:
                    errors.append(err)
            if errors:
                raise SearchError(errors[0])
        from searchers.pareto import finalize

        result = finalize(cfg, objectives, constraints, export=export, say=say)
    except ArchirError:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        say(f"interrupted: run the same command again to resume ({run_dir})")
        raise
    result.wall_s = time.time() - t0
    return result


def main_worker() -> None:  # pragma: no cover - used by `python -m searchers.run`
    cfg = SearchConfig(**json.loads(sys.argv[1]))
    worker(cfg, int(sys.argv[2]) if len(sys.argv) > 2 else 0, print)
