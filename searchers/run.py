"""The search loop: an Optuna study over a spec's open choices.

``run_search(spec_path, ...)`` is what ``archir search`` runs::

    runs/<name>/
      spec.yaml        the spec as given           run.json   storage URL, study name, space
      study.journal    Optuna journal storage (unless --storage URL)
      trials/<n>/      spec.yaml (concrete), metrics.json, log, model.safetensors (front only)
      pareto.json      pareto.png      best/  spec.yaml, model.safetensors, model.onnx, report.json

Each trial: fix the spec with the sampler's suggestions (define-by-run), run the cost pass,
measure latency when asked (:mod:`searchers.latency`), refuse candidates that break a
constraint decidable before training, then train at the chosen fidelity, fake-quantize blocks
below 16 bits (:mod:`archir.quant`), evaluate, and report every objective and constraint
value. Single-objective searches prune with the trainer's intermediate evaluations;
multi-objective searches stop diverging trials.

A candidate refused before training is recorded as a COMPLETE trial with status
``infeasible``, its reason, its cost (and latency) values and its constraint violations, so
the samplers learn from it: its violations are the trial's constraint values
(``Trial.set_constraint``; TPE, NSGA-II and GP read them, and TPE and NSGA-II rank
infeasible trials by violation, below every feasible one). An objective it never reached (a quality metric such as
``val_bpb``) is given a **penalty**: the worst value of that objective among the study's
trained trials so far, or ``inf`` (``-inf`` for a maximized metric) before there is one —
the samplers only compare infeasible trials by violation, and Optuna's GP sampler clips
infinities to the worst finite value. The penalty lives only in the Optuna trial's values
(``penalized`` lists the metrics concerned); the ``values`` attribute, ``pareto.json`` and the
plot show measured values only, and infeasible trials are never on the front.

Resume and parallel work come from Optuna's storage: the same command resumes the study; a
trial left RUNNING by a killed process (its heartbeat is stale, or its process is gone on
this host) is marked FAIL and its configuration retried once (``RetryHeartbeatStaleTrialCallback``);
``workers`` processes share one study. A trial's writes are grouped (:mod:`searchers.storage`):
its parameters, host/pid and spec attributes in one journal append before any training, its
results in another, so a trial costs a handful of ``fsync``s, not one per parameter.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import pydantic
from optuna.trial import FrozenTrial, TrialState

from archir.errors import ArchirError, SearchError
from archir.spec.loader import Spec, load_spec
from archir.spec.sections import SearchSection, TrainSection
from searchers.config import (
    SearchConfig,
    SearchResult,
    _objectives,
    _silence,
    _task_info,
    trial_train_cfg,
)
from searchers.objectives import (
    COST_METRICS,
    PRE_TRAINING,
    Constraint,
    Objective,
    check_constraints,
)
from searchers.pareto import feasible, finalize
from searchers.space import random_decider, space_description, space_hash, spec_hash, suggest
from searchers.storage import (
    ATTR_HOST,
    ATTR_PID,
    HOST,
    HeartbeatJournalStorage,
    dead_here,
    fail_dead_trials,
    grouped,
    open_storage,
)

# re-exported: searchers.darts and older callers import these from here
__all__ = [
    "Evaluator",
    "HeartbeatJournalStorage",
    "SearchConfig",
    "SearchResult",
    "TrialFailed",
    "_objectives",
    "_silence",
    "_task_info",
    "fail_dead_trials",
    "finalize",
    "open_storage",
    "run_search",
    "trial_train_cfg",
    "worker",
]


def make_sampler(
    name: str, seed: int, n_objectives: int, trials: int, population: int | None, workers: int
) -> optuna.samplers.BaseSampler:
    """The sampler called ``name`` (``tpe``, ``nsga2``, ``random``, ``gp``), seeded.

    Constraints reach the samplers through each trial's constraint values
    (``Trial.set_constraint``, set by :class:`Evaluator`), not a ``constraints_func``.

    Raises:
        SearchError: unknown sampler name.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=max(3, min(10, trials // 3)),
                constant_liar=workers > 1,
            )
        if name == "nsga2":
            pop = population or max(4, min(50, trials // 4))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=max(3, min(10, trials // 3))
            )
    raise SearchError(f"unknown sampler '{name}'", hint="expected one of: tpe, nsga2, random, gp")


def make_pruner(sec: SearchSection, train: TrainSection) -> optuna.pruners.BasePruner:
    if sec.pruner == "none" or len(sec.objectives) > 1:
        return optuna.pruners.NopPruner()
    if sec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=train.steps)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


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

    def _attrs(self, trial: optuna.Trial, **attrs: Any) -> None:
        """Set a trial's result attributes (and, from ``violations``, its constraint values
        for the samplers: ``Trial.set_constraint``, one per constraint, ``<= 0`` = met); they
        are appended with the trial's final state (one journal append)."""
        with grouped(trial.study._storage, until_state=True):
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            if "violations" in attrs and self.constraints:
                for c, v in zip(self.constraints, attrs["violations"]):
                    trial.set_constraint(c.metric, float(v))

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        tdir = self.run_dir / "trials" / str(trial.number)
        if tdir.exists():  # a folder left by a killed attempt with this number
            shutil.rmtree(tdir)
        tdir.mkdir(parents=True)
        log = _Log(tdir / "log")
        timing: dict[str, float] = {}
        t_start = time.perf_counter()
        metrics: dict[str, Any] = {"trial": trial.number}
        try:
            return self._evaluate(trial, tdir, log, timing, metrics)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            if isinstance(exc, TrialFailed | ArchirError):
                reason = str(exc)
            else:
                import traceback

                reason = f"{type(exc).__name__}: {exc}"
                log("crashed:\n" + traceback.format_exc())
            metrics.update(status="failed", reason=reason)
            self._attrs(trial, status="failed", reason=reason)
            log(f"failed: {reason}")
            if isinstance(exc, TrialFailed):
                raise
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

        storage = trial.study._storage
        t = time.perf_counter()
        # one append: host/pid, every suggested parameter and the spec attributes, written
        # before anything expensive so a killed trial is retried with the same parameters
        with grouped(storage):
            storage.set_trial_system_attr(trial._trial_id, ATTR_HOST, HOST)
            storage.set_trial_system_attr(trial._trial_id, ATTR_PID, os.getpid())
            concrete = self.spec.fix(suggest(trial))
            decisions = dict(concrete.decisions)
            concrete.data["name"] = f"{self.spec.name}-t{trial.number}"
            concrete = Spec(concrete.data)
            h = spec_hash(concrete)
            trial.set_user_attr("spec", f"trials/{trial.number}/spec.yaml")
            trial.set_user_attr("spec_hash", h)
        concrete.save(tdir / "spec.yaml")
        timing["fix_s"] = time.perf_counter() - t
        retried = storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retried is not None:
            metrics["retry_of"] = retried
            log(f"retry of trial {retried}")
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
            copied = {k: v for k, v in dup.user_attrs.items() if k not in ("spec", "spec_hash")}
            self._attrs(trial, **{**copied, "duplicate_of": dup.number})
            metrics.update(status=dup.user_attrs.get("status", "ok"))
            if dup.user_attrs.get("reason"):
                metrics["reason"] = dup.user_attrs["reason"]
            metrics["values"] = dup.user_attrs.get("values", values)
            return tuple(dup.values) if len(dup.values) > 1 else dup.values[0]

        reasons = self._pre_check(values)
        if reasons:
            return self._reject(trial, values, log, metrics, "cost analysis", reasons)
        model = None
        if self.need_latency or self.trains:
            from archir.compiler import compile as compile_spec

            t = time.perf_counter()
            model = compile_spec(concrete, seed=self.train_cfg.seed)
            timing["compile_s"] = time.perf_counter() - t
        if self.need_latency:
            from searchers.latency import trial_latency

            t = time.perf_counter()
            rec = trial_latency(concrete, self.sec.latency, self.train_cfg.seq_len, model)
            values["latency_ms"] = float(rec["ms"])
            metrics["latency"] = rec
            timing["latency_s"] = time.perf_counter() - t
            how = "predicted" if rec.get("predicted") else f"measured ({self.sec.latency.runtime})"
            log(f"latency {values['latency_ms']:.3f} ms, {how}")
            reasons = self._pre_check(values)
            if reasons:
                return self._reject(trial, values, log, metrics, "latency measurement", reasons)
        self.consecutive_rejections = 0

        if self.trains:
            values.update(self._train(trial, concrete, model, tdir, log, timing, metrics))
        metrics["values"] = values
        violations = [c.violation(values[c.metric]) for c in self.constraints] or [0.0]
        ok = all(v <= 0 for v in violations)
        attrs: dict[str, Any] = {
            "values": values,
            "violations": violations,
            "status": "ok" if ok else "infeasible",
        }
        if not ok:
            attrs["reason"] = "; ".join(
                check_constraints(self.constraints, values, pre_training=False)
            )
        self._attrs(trial, **attrs)
        metrics["status"] = attrs["status"]
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

    def _pre_check(self, values: dict[str, float]) -> list[str]:
        return check_constraints(
            [c for c in self.constraints if c.metric in values], values, pre_training=True
        )

    def penalty(self, study: optuna.Study, objective: Objective) -> float:
        """The value recorded for an objective a refused candidate never reached: the worst
        measured value of it in the study so far, else ``inf`` (``-inf`` when maximized)."""
        worst = math.inf if objective.direction == "minimize" else -math.inf
        seen = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            v = t.user_attrs.get("values", {}).get(objective.metric)
            if v is not None and math.isfinite(float(v)):
                seen.append(float(v))
        if not seen:
            return worst
        return max(seen) if objective.direction == "minimize" else min(seen)

    def _reject(
        self,
        trial: optuna.Trial,
        values: dict[str, float],
        log: _Log,
        metrics: dict[str, Any],
        phase: str,
        reasons: list[str],
    ) -> float | tuple[float, ...]:
        """Record a candidate refused before training as a COMPLETE, infeasible trial."""
        self.consecutive_rejections += 1
        reason = f"infeasible before training ({phase}): " + "; ".join(reasons)
        rel = sum(
            c.relative_violation(values[c.metric]) for c in self.constraints if c.metric in values
        )
        violations = [
            c.violation(values[c.metric]) if c.metric in values else 0.0 for c in self.constraints
        ]
        out, penalized = [], []
        for o in self.objectives:
            if o.metric in values:
                out.append(float(values[o.metric]))
            else:
                out.append(self.penalty(trial.study, o))
                penalized.append(o.metric)
        attrs: dict[str, Any] = {
            "status": "infeasible",
            "reason": reason,
            "values": dict(values),
            "rel_violation": rel,
            "violations": violations,
        }
        if penalized:
            attrs["penalized"] = penalized
        self._attrs(trial, **attrs)
        metrics.update(status="infeasible", reason=reason, values=dict(values))
        if penalized:
            metrics["penalized"] = {
                o.metric: v for o, v in zip(self.objectives, out) if o.metric in penalized
            }
        log(reason)
        return tuple(out) if len(out) > 1 else out[0]

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
            self._attrs(trial, status="pruned", reason=m.get("reason", "pruned"))
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
    """Finished trials that count against the budget: COMPLETE (incl. infeasible), PRUNED
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


def worker(
    cfg: SearchConfig,
    worker_id: int = 0,
    say: Callable[[str], None] | None = None,
    ready: Any = None,
) -> None:
    """Run trials on the shared study until the budget is spent.

    ``ready``: a barrier shared by the workers of one command; each waits there after its
    set-up (imports, storage, study) so that no worker spends the budget alone while the
    others are still starting.

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
    if ready is not None:
        try:
            ready.wait(timeout=300)
        except threading.BrokenBarrierError:
            pass  # another worker failed to start: go on alone
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
        running = sum(1 for t in trials if t.state == TrialState.RUNNING and not dead_here(t))
        waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
        if used >= cfg.trials or (used + running >= cfg.trials and not waiting):
            break
        if deadline is not None and time.time() > deadline:
            say("time budget reached")
            break
        study.optimize(
            evaluator, n_trials=1, catch=(TrialFailed,), callbacks=[report], gc_after_trial=False
        )
        if isinstance(storage, HeartbeatJournalStorage):
            storage.flush()  # nothing is normally held here; a safety net
        if evaluator.consecutive_rejections >= sec.max_rejections:
            trials = study.get_trials(deepcopy=False)
            if not any(feasible(t) for t in trials):
                raise SearchError(
                    f"{evaluator.consecutive_rejections} candidates in a row broke the "
                    f"constraints and none has met them yet; closest: {_closest(trials)}",
                    hint="loosen search.constraints or shrink the space toward the closest "
                    "candidates",
                )


def _worker_entry(cfg_dict: dict[str, Any], worker_id: int, q: Any, ready: Any = None) -> None:
    cfg = SearchConfig(**cfg_dict)
    try:
        worker(cfg, worker_id, say=lambda s: print(f"[w{worker_id}] {s}", flush=True), ready=ready)
        q.put((worker_id, None))
    except ArchirError as exc:
        q.put((worker_id, str(exc)))
        if ready is not None:
            ready.abort()  # release workers still waiting to start
    except BaseException as exc:  # noqa: BLE001
        q.put((worker_id, f"worker crashed: {type(exc).__name__}: {exc}"))
        if ready is not None:
            ready.abort()
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


_FLAGS = {
    ("budget", "trials"): "--trials",
    ("budget", "timeout_s"): "--timeout",
    ("workers",): "--workers",
    ("seed",): "--seed",
    ("sampler",): "--sampler",
    ("fidelity", "kind"): "--fidelity",
    ("fidelity", "steps"): "--steps",
}


def _option_error(exc: pydantic.ValidationError) -> SearchError:
    """A one-line error for a search option override that fails validation: the option
    (``--flag`` and ``search.`` path), pydantic's message and the value given."""
    err = exc.errors()[0]
    loc = tuple(str(x) for x in err.get("loc", ()))
    path = "search." + ".".join(loc)
    flag = _FLAGS.get(loc)
    name = f"{flag} ({path})" if flag else path
    got = err.get("input")
    msg = str(err.get("msg", "invalid value"))
    return SearchError(
        f"bad search option {name}: {msg[:1].lower() + msg[1:]} (got {got!r})",
        hint="see 'archir search --help'",
    )


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
    budget = sec.budget.model_dump()
    if trials is not None:
        budget["trials"] = trials
    if timeout_s is not None:
        budget["timeout_s"] = timeout_s
    upd["budget"] = budget
    try:
        sec = SearchSection.model_validate({**sec.model_dump(), **upd})
    except pydantic.ValidationError as exc:
        raise _option_error(exc) from None
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
    if "latency_ms" in {o.metric for o in objectives} | {c.metric for c in constraints}:
        from searchers.latency import check_available

        check_available(sec.latency)
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
            with grouped(st):
                ostudy.set_user_attr("archir:space_hash", shash)
                ostudy.set_user_attr(
                    "archir:objectives", [[o.metric, o.direction] for o in objectives]
                )
                ostudy.set_user_attr(
                    "archir:constraints", [[c.metric, c.text] for c in constraints]
                )
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
            ready = ctx.Barrier(cfg.workers)
            procs = [
                ctx.Process(target=_worker_entry, args=(asdict(cfg), i, q, ready))
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
