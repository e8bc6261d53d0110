"""The search loop of the trial-based searchers: an Optuna study whose trials are proposed by
a sampler over a spec's open choices (``optuna``) or by graph mutation
(``evolution``, :mod:`searchers.evolution`: a queued trial carries its child's concrete spec).

``run_search(spec_path, searcher=..., ...)`` is what ``archir search`` runs for every
searcher (:mod:`searchers.base`, :mod:`searchers.setup`)::

    runs/<name>/
      spec.yaml        the spec as given           run.json   storage URL, study name, space
      study.journal    Optuna journal storage (unless --storage URL)
      trials/<n>/      spec.yaml (concrete), metrics.json, log, model.safetensors (front only)
      pareto.json      pareto.png      best/  spec.yaml, model.safetensors, model.onnx, report.json

Each trial: fix the spec with the sampler's suggestions (define-by-run), run the cost pass,
measure latency when asked (:mod:`searchers.latency`), refuse candidates that break a
constraint decidable before training, then train at the chosen fidelity, fake-quantize blocks
below 16 bits (:mod:`archir.quant`), evaluate, and report every objective and constraint
value. With a fidelity ladder (``fidelity: {kind: ladder}``) a new trial trains to the first
rung, and a worker promotes models that earned it before it draws a new one: a promotion is
a trial of its own that continues the model from its checkpoint (:mod:`searchers.ladder`). Single-objective searches prune with the trainer's intermediate evaluations;
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
this host) is marked FAIL with its reason and its configuration retried once
(``RetryHeartbeatStaleTrialCallback``); ``workers`` processes (or machines) share one study.
A trial interrupted by Ctrl-C or SIGTERM is marked FAIL with status ``interrupted`` and its
configuration is queued again (``failed_trial`` names it), so the next run retries it. A
trial's writes are grouped (:mod:`searchers.storage`): its parameters, host/pid and model
attributes (the concrete spec's YAML included) in one journal append before any training,
its results in another, so a trial costs a handful of ``fsync``s, not one per parameter.
What archir records about a trial is one user attribute, ``archir:trial`` (model and
result in one dict: one write on an RDB storage, which cannot group), read through
:func:`searchers.objectives.trial_attrs`, which also reads the attribute-per-key layout of
earlier versions; a trial with nothing expensive ahead (cost fidelity, no latency) writes
it once, with its result.

**The trial budget counts distinct models.** ``--trials N`` is reached when N trials count:
COMPLETE (feasible or infeasible), PRUNED and FAIL trials, except a trial that reused the
result of an identical model (``duplicate_of``: same concrete spec hash, nothing trained),
a failed trial whose configuration was retried (killed process), an interrupted one and
one stopped unrun because workers raced for the last model (:data:`OVER_BUDGET`: the
lower-numbered trials keep their places, so several workers never draw more than N).
A space smaller than the budget cannot loop forever: after
:data:`MAX_CONSECUTIVE_DUPLICATES` proposals in a row that were all models already seen, a
worker stops and says how many distinct models the study holds.

**Run folder and resume rules.** The study is ``--study`` or the spec's name; the folder is
``--out`` or ``runs/<study>`` (one folder per study). Names are identifiers
(:func:`archir.paths.check_name`); ``--out`` is checked before any work, and a folder that
holds another study, another search space, another storage or files that archir did not
write is refused. A resumed study must keep its search space, objectives and training
budget (fidelity kind, steps and the ``train:`` section, stored as ``archir:fidelity``
when the study is created): another ``--steps``/``--fidelity``/``train:`` is refused with
the old and new values — start a new study (``--study``) or folder (``--out``) instead.
Nothing outside the run folder is written, and a failing run removes only what it created.

**Many machines.** Everything a process needs to finish comes from the storage: each
trial's concrete spec (``spec_yaml`` in its record), values and host. A process whose
folder lacks the best trial's weights (another machine trained it) writes
``best/spec.yaml`` and ``best/report.json``, names the host holding the weights and skips
the export.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from archir.errors import ArchirError, SearchError
from archir.paths import Created, inside, normal_mode, write_text
from archir.spec.loader import Spec, load_spec
from archir.spec.sections import SearchSection, TrainSection
from searchers.base import RunPlan, Searcher, get_searcher
from searchers.config import (
    SearchConfig,
    SearchResult,
    _objectives,
    _silence,
    _task_info,
    ladder_rungs,
    trial_train_cfg,
)
from searchers.evolution import ATTR_GENOME, ATTR_LINEAGE, ATTR_ORIGINS, genome_data
from searchers.ladder import ATTR_CONTINUE, ATTR_RUNG, continues, promotions, rungs_of
from searchers.objectives import (
    COST_METRICS,
    DECODE_METRICS,
    MODEL_KEYS,
    PRE_TRAINING,
    RESULT_KEYS,
    TRIAL_ATTR,
    Objective,
    check_constraints,
    feasible,
    trial_attrs,
)
from searchers.pareto import finalize
from searchers.setup import open_run, prepare_run
from searchers.space import space_description, spec_hash, suggest
from searchers.storage import (
    ATTR_HOST,
    ATTR_PID,
    HOST,
    HeartbeatJournalStorage,
    dead_here,
    fail_dead_trials,
    fail_stale_trials,
    grouped,
    open_storage,
    started_system_attrs,
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


#: the reason recorded for a trial stopped by Ctrl-C or SIGTERM
INTERRUPTED = (
    "interrupted (Ctrl-C or SIGTERM); its configuration is retried when the search resumes"
)
#: proposals in a row that were all models already seen before a worker stops (the space is
#: exhausted, or the sampler keeps proposing what it has)
MAX_CONSECUTIVE_DUPLICATES = 50
#: the status of a newly drawn trial stopped unrun because lower-numbered trials of other
#: workers had taken the last of the budget (PRUNED; never counted, never retried)
OVER_BUDGET = "over budget"


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.perf_counter()
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(f"[{time.perf_counter() - self.t0:7.2f}s] {msg}")

    def flush(self) -> None:
        self.path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def trial_spec_name(base: str, number: int) -> str:
    """The name of trial ``number``'s concrete spec: ``<base>-t<number>``, the base cut so
    that the whole stays a valid name (at most 64 characters)."""
    suffix = f"-t{number}"
    return base[: 64 - len(suffix)] + suffix


def clear_trial_dir(run_dir: Path, tdir: Path) -> None:
    """Make way for trial folder ``tdir`` (``run_dir/trials/<n>``): a folder left by a killed
    attempt with this number is removed — only when it lies inside ``run_dir`` (a link is
    unlinked, never followed).

    Raises:
        PathError: ``tdir`` resolves outside the run folder (e.g. ``trials`` is a link).
    """
    if tdir.is_symlink():
        tdir.unlink()
    inside(run_dir, tdir)
    if tdir.exists():
        shutil.rmtree(tdir)


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
        self.need_decode = bool(used & set(DECODE_METRICS))
        #: the fidelity ladder's rungs (optimizer steps), or [] without a ladder
        self.rungs = ladder_rungs(cfg) if self.sec.fidelity.kind == "ladder" else []
        self._task: Any = None
        self.consecutive_rejections = 0
        self.consecutive_duplicates = 0
        #: the trial being evaluated (an interrupted one is queued again from it)
        self.current: optuna.Trial | None = None
        #: the study's trials as the worker loop read them just before this trial (used by
        #: the next trial's duplicate check and penalty instead of another read; None: read)
        self.seen: list[FrozenTrial] | None = None
        #: other processes may finish trials meanwhile (several workers, or a storage URL
        #: that other searches join): the duplicate check reads the finished trials again
        #: after this trial was created, so a model finished just before it is not trained twice
        self.shared = (cfg.workers or 1) > 1 or cfg.storage_url is not None
        #: ``seen`` was read after the current trial was created (the budget-race check):
        #: fresh enough for a shared study's duplicate check
        self.seen_after_start = False
        #: the current trial's model attributes (spec, spec_hash, spec_yaml; lineage)
        self._model: dict[str, Any] = {}
        #: the graph-mutation proposer of ``--searcher evolution`` (None otherwise)
        self.evolution: Any = None
        if cfg.searcher == "evolution":
            from searchers.evolution import Evolution

            # a missing section was refused before the run began (EvolutionSearcher.prepare)
            assert self.sec.evolution is not None
            self.evolution = Evolution(
                self.sec.evolution,
                spec,
                self.objectives,
                self.constraints,
                self.sec.population,
                self.sec.seed,
            )
            lat = self.sec.latency
            if any(c.metric == "latency_ms" for c in self.constraints):
                from searchers.latency import has_calibration, trial_latency

                if lat.predict is True or (lat.predict is None and has_calibration(lat)):
                    seq = self.train_cfg.seq_len
                    self.evolution.latency_of = lambda s: float(trial_latency(s, lat, seq)["ms"])
        #: the child evolution proposed for the next trial (the worker loop sets it; a trial
        #: that is a retry or a promotion leaves it unused)
        self.next_child: Any = None

    @property
    def task(self) -> Any:
        if self._task is None:
            from archir.tasks.base import get_task

            self._task = get_task(self.train_cfg.task, self.train_cfg.task_options)
        return self._task

    def _attrs(self, trial: optuna.Trial, **attrs: Any) -> None:
        """Record a trial's result with its model attributes as the one user attribute
        :data:`~searchers.objectives.TRIAL_ATTR` (one storage write; read it back with
        :func:`~searchers.objectives.trial_attrs`), and, from ``violations``, its constraint
        values for the samplers (``Trial.set_constraint``, one per constraint, ``<= 0`` =
        met); appended with the trial's final state (one journal append)."""
        with grouped(trial.study._storage, until_state=True):
            trial.set_user_attr(TRIAL_ATTR, {**self._model, **attrs})
            if "violations" in attrs and self.constraints:
                for c, v in zip(self.constraints, attrs["violations"]):
                    trial.set_constraint(c.metric, float(v))

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        self.current = trial
        self._model = {}
        tdir = self.run_dir / "trials" / str(trial.number)
        clear_trial_dir(self.run_dir, tdir)
        tdir.mkdir(parents=True)
        log = _Log(tdir / "log")
        timing: dict[str, float] = {}
        t_start = time.perf_counter()
        metrics: dict[str, Any] = {"trial": trial.number}
        duplicate = False
        try:
            out = self._evaluate(trial, tdir, log, timing, metrics)
            duplicate = "duplicate_of" in metrics
            return out
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: recorded with the FAIL state Optuna writes next; the worker
            # queues the configuration again (retry_interrupted)
            metrics.update(status="interrupted", reason=INTERRUPTED)
            log("interrupted: " + INTERRUPTED)
            try:
                self._attrs(trial, status="interrupted", reason=INTERRUPTED)
            except Exception:  # noqa: BLE001 - the worker records it then
                pass
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
            self.consecutive_duplicates = self.consecutive_duplicates + 1 if duplicate else 0
            timing["total_s"] = time.perf_counter() - t_start
            metrics["timing"] = timing
            metrics["params_chosen"] = dict(trial.params)
            write_text(tdir / "metrics.json", json.dumps(metrics, indent=2, default=_json))
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
        # one append: host/pid, every suggested parameter and the model attributes (the
        # spec's YAML too: a process on another machine finishes from the storage), written
        # before anything expensive so a killed trial is retried with the same parameters.
        # A trial with nothing expensive ahead (cost fidelity, no latency) records its model
        # with its result instead: one storage write less (RDB storages cannot group)
        started = started_system_attrs(trial)
        ahead = self._budget_taken(trial, started)
        if ahead is not None:
            reason = (
                f"the budget of {self.cfg.trials} models was reached by trials begun before "
                f"this one ({ahead}) while it started: nothing was drawn or trained"
            )
            metrics.update(status=OVER_BUDGET, reason=reason)
            self._attrs(trial, status=OVER_BUDGET, reason=reason)
            log(reason)
            raise optuna.TrialPruned(reason)
        with grouped(storage):
            storage.set_trial_system_attr(trial._trial_id, ATTR_HOST, HOST)
            storage.set_trial_system_attr(trial._trial_id, ATTR_PID, os.getpid())
            child, self.next_child = self.next_child, None
            if child is not None and not {ATTR_GENOME, ATTR_CONTINUE, "failed_trial"} & set(
                started
            ):  # this new trial evaluates evolution's child: recorded before anything runs
                for k, v in self.evolution.system_attrs(child).items():
                    storage.set_trial_system_attr(trial._trial_id, k, v)
                    started[k] = v
            if started.get(ATTR_GENOME) is not None:  # a child evolution proposed
                concrete = Spec(genome_data(started[ATTR_GENOME]))
            else:
                concrete = self.spec.fix(suggest(trial))
            decisions = dict(concrete.decisions)
            concrete.data["name"] = trial_spec_name(self.spec.name, trial.number)
            concrete = Spec(concrete.data)
            h = spec_hash(concrete)
            text = concrete.to_yaml()
            self._model = {
                "spec": f"trials/{trial.number}/spec.yaml",
                "spec_hash": h,
                "spec_yaml": text,
            }
            if self.evolution is not None:
                self._model["lineage"] = started.get(ATTR_LINEAGE) or (
                    self.evolution.seed_lineage()
                )
            if self.trains or self.need_latency:
                trial.set_user_attr(TRIAL_ATTR, dict(self._model))
        write_text(tdir / "spec.yaml", text)
        timing["fix_s"] = time.perf_counter() - t
        retried = started.get("failed_trial")
        if retried is not None:
            metrics["retry_of"] = retried
            log(f"retry of trial {retried}")
        if "lineage" in self._model:
            from searchers.evolution import lineage_text

            log("lineage: " + lineage_text(self._model["lineage"]))
        else:
            log(f"decisions: {json.dumps(decisions, default=str)}")
        if started.get(ATTR_CONTINUE) is not None:
            return self._promoted(trial, concrete, started, tdir, log, timing, metrics)

        t = time.perf_counter()
        cost = analyze(concrete)
        values: dict[str, float] = {k: float(getattr(cost, k)) for k in COST_METRICS}
        timing["cost_s"] = time.perf_counter() - t
        metrics["values"] = values

        # the finished trials, read once per trial (by the worker loop just before it, else
        # here): duplicates and penalties both use it
        seen, self.seen = self.seen, None
        fresh, self.seen_after_start = self.seen_after_start, False
        if seen is None or (self.shared and not fresh):
            seen = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        finished = [t for t in seen if t.state == TrialState.COMPLETE]
        dup = self._duplicate_of(finished, trial.number, h)
        if dup is not None:
            original = int(trial_attrs(dup).get("duplicate_of", dup.number))
            log(f"same model as trial {original}: its results are reused")
            return self._reuse(trial, dup, original, metrics)

        reasons = self._pre_check(values)
        if reasons:
            return self._reject(trial, values, log, metrics, "cost analysis", reasons, finished)
        model = None
        if self.need_latency or self.trains or self.need_decode:
            from archir.compiler import compile as compile_spec

            t = time.perf_counter()
            model = compile_spec(concrete, seed=self.train_cfg.seed)
            timing["compile_s"] = time.perf_counter() - t
            if self.trains and started.get(ATTR_ORIGINS) is not None:
                self._inherit(model, started[ATTR_ORIGINS], log, metrics)
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
                return self._reject(
                    trial, values, log, metrics, "latency measurement", reasons, finished
                )
        if self.need_decode:
            t = time.perf_counter()
            values.update(self._decode_cost(concrete, model, log, metrics))
            timing["decode_s"] = time.perf_counter() - t
            reasons = self._pre_check(values)
            if reasons:
                return self._reject(
                    trial, values, log, metrics, "decode measurement", reasons, finished
                )
        self.consecutive_rejections = 0

        ladder: dict[str, Any] = {}
        if self.trains and self.rungs:
            values.update(
                self._train_ladder(trial, concrete, model, tdir, log, timing, metrics, started)
            )
            ladder = metrics["ladder"]
        elif self.trains:
            values.update(self._train(trial, concrete, model, tdir, log, timing, metrics))
        return self._record(trial, values, log, metrics, ladder)

    def _inherit(self, model: Any, origins: list[Any], log: _Log, metrics: dict[str, Any]) -> None:
        """Start an evolution child from its parents' trained weights (``inherit: true``):
        :func:`searchers.evolution.inherited_source` renamed onto its blocks, loaded by
        :func:`archir.inherit.inherit`. A parent whose weights are not in this run folder
        (another machine's worker trained it) leaves its blocks fresh."""
        from archir.inherit import inherit
        from searchers.evolution import inherited_source

        def weights_of(n: int) -> Path | None:
            p = self.run_dir / "trials" / str(int(n)) / "model.safetensors"
            return p if p.is_file() and not p.is_symlink() else None

        parents = self._model.get("lineage", {}).get("parents", [])
        source, read = inherited_source(self.run_dir, origins, weights_of, parents)
        if not read:
            log("inherits nothing: the parents' weights are not in this run folder")
            return
        rep = inherit(model, source, ", ".join(f"trials/{n}/model.safetensors" for n in read))
        metrics["init"] = rep.to_dict()
        self._model["lineage"] = {**self._model.get("lineage", {}), "inherited_from": read[0]}
        log(
            f"inherits from trial(s) {', '.join(map(str, read))}: {rep.copied} tensors copied, "
            f"{rep.resized} resized, {rep.fresh} fresh ({rep.params_inherited:,} of "
            f"{rep.params_total:,} parameters)"
        )

    def _decode_cost(
        self, concrete: Spec, model: Any, log: _Log, metrics: dict[str, Any]
    ) -> dict[str, float]:
        """``decode_ms_per_token`` and ``prefill_ms`` of the fresh model (timing does not
        depend on the weights) on the graph that ships (``search.decode``): with ``runtime:
        ort`` the decode graph at the trial's ``bits`` (``precision="auto"``, what
        ``best/decode.onnx`` holds), with ``torch`` the float32 step."""
        from archir.errors import DecodeError
        from exporters.decode import measure_decode
        from exporters.quantize import precision_counts

        dec = self.sec.decode
        try:
            rec = measure_decode(
                concrete,
                model,
                runtime=dec.runtime,
                context=dec.context,
                threads=dec.threads,
                precision="auto",
            )
        except DecodeError as exc:
            raise TrialFailed(f"decode cost not measurable: {exc.message}") from None
        metrics["decode"] = rec
        log(
            f"decode at context {dec.context} ({dec.runtime}): "
            f"{rec['decode_ms_per_token']:.3f} ms/token, prefill {rec['prefill_ms']:.1f} ms, "
            f"state {rec['state_bytes']:,} bytes; graph at "
            f"{precision_counts(rec['block_precision']) if dec.runtime == 'ort' else 'fp32'}"
        )
        return {k: float(rec[k]) for k in DECODE_METRICS}

    def _record(
        self,
        trial: optuna.Trial,
        values: dict[str, float],
        log: _Log,
        metrics: dict[str, Any],
        ladder: dict[str, Any],
    ) -> float | tuple[float, ...]:
        """Record a trained (or cost-only) trial's values, constraint status and rungs; the
        objective values for Optuna."""
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
        if not ladder and isinstance(metrics.get("train"), dict) and "steps" in metrics["train"]:
            attrs["steps"] = int(metrics["train"]["steps"])
        if ladder:
            fixed = {k: v for k, v in values.items() if k in PRE_TRAINING}
            for rec in ladder["rungs"]:
                rec["values"] = {**fixed, **rec.get("values", {})}
                if "violations" not in rec:
                    rec["violations"] = [
                        c.violation(rec["values"][c.metric]) if c.metric in rec["values"] else 0.0
                        for c in self.constraints
                    ] or [0.0]
            ladder["rungs"][-1].update(values=dict(values), violations=violations)
            attrs.update(ladder)
            qmetric = self._quality_metric()
            storage = trial.study._storage
            with grouped(storage, until_state=True):
                for rec in ladder["rungs"]:
                    v = rec.get("values", {}).get(qmetric)
                    if v is not None:
                        storage.set_trial_intermediate_value(
                            trial._trial_id, int(rec["steps"]), float(v)
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

    def _reuse(
        self, trial: optuna.Trial, done: FrozenTrial, original: int, metrics: dict[str, Any]
    ) -> float | tuple[float, ...]:
        """Record trial ``done``'s result as this trial's (``duplicate_of`` = ``original``:
        nothing trained; not counted against the budget) and return its objective values."""
        got = trial_attrs(done)
        copied = {k: got[k] for k in RESULT_KEYS if k in got}
        self._attrs(trial, **{**copied, "duplicate_of": original})
        metrics.update(duplicate_of=original, status=got.get("status", "ok"))
        if got.get("reason"):
            metrics["reason"] = got["reason"]
        if "values" in got:
            metrics["values"] = got["values"]
        return tuple(done.values) if len(done.values) > 1 else done.values[0]

    def _quality_metric(self) -> str:
        """The metric a trained trial reports as its intermediate values."""
        return next(
            (o.metric for o in self.objectives if o.metric not in PRE_TRAINING), self.task.metric
        )

    def _promoted(
        self,
        trial: optuna.Trial,
        concrete: Spec,
        started: dict[str, Any],
        tdir: Path,
        log: _Log,
        timing: dict[str, float],
        metrics: dict[str, Any],
    ) -> float | tuple[float, ...]:
        """A promotion (:mod:`searchers.ladder`): the model of trial ``ATTR_CONTINUE``
        continues to rung ``ATTR_RUNG``; its cost and latency are the trial's it continues."""
        from archir.compiler import compile as compile_spec

        source_n, target = int(started[ATTR_CONTINUE]), int(started[ATTR_RUNG])
        seen, self.seen = self.seen, None
        if seen is None:
            seen = trial.study.get_trials(deepcopy=False)
        src = next((t for t in seen if t.number == source_n), None)
        if src is None or src.state != TrialState.COMPLETE or not self.rungs:
            raise TrialFailed(f"promotion of trial {source_n}: it is not a finished ladder trial")
        attempts = set(started.get("retry_history", []))
        twin = next(
            (
                t
                for t in seen
                if continues(t) == source_n
                and t.system_attrs.get(ATTR_RUNG) == target
                and t.number < trial.number
                and t.number not in attempts
                and t.state != TrialState.FAIL
            ),
            None,
        )
        if twin is not None:  # two workers promoted the same model at once: one trains it
            log(f"trial {twin.number} already promotes trial {source_n}: nothing trained")
            return self._reuse(trial, src, source_n, metrics)
        a = trial_attrs(src)
        values = {k: float(v) for k, v in a.get("values", {}).items() if k in PRE_TRAINING}
        metrics["values"] = values
        metrics["continue_of"] = source_n
        log(
            f"promotion: trial {source_n}'s model goes on from rung {target - 1} "
            f"({self.rungs[target - 1]} steps) to rung {target} ({self.rungs[target]} steps)"
        )
        t = time.perf_counter()
        model = compile_spec(concrete, seed=self.train_cfg.seed)
        timing["compile_s"] = time.perf_counter() - t
        values.update(
            self._train_ladder(
                trial,
                concrete,
                model,
                tdir,
                log,
                timing,
                metrics,
                started,
                target=target,
                inherited=rungs_of(src),
                source=source_n,
            )
        )
        return self._record(trial, values, log, metrics, metrics["ladder"])

    def _train_ladder(
        self,
        trial: optuna.Trial,
        concrete: Spec,
        model: Any,
        tdir: Path,
        log: _Log,
        timing: dict[str, float],
        metrics: dict[str, Any],
        started: dict[str, Any],
        *,
        target: int = 0,
        inherited: list[dict[str, Any]] | None = None,
        source: int | None = None,
    ) -> dict[str, float]:
        """Train to rung ``target`` (:func:`archir.train.train_ladder`), continuing from the
        checkpoint of the attempt this trial retries or of the trial it promotes (moved into
        ``tdir/ladder``), else from step 0. Sets ``metrics["ladder"]`` (the rung records)."""
        from archir.errors import TrainingError
        from archir.train import train_ladder

        ck = tdir / "ladder"
        history = started.get("retry_history") or [None]
        for n in (history[-1], source):
            if n is None:
                continue
            prev = self.run_dir / "trials" / str(n) / "ladder"
            if prev.is_dir() and not prev.is_symlink() and not ck.exists():
                os.replace(inside(self.run_dir, prev), ck)
                try:
                    at = json.loads((ck / "checkpoint.json").read_text(encoding="utf-8"))["step"]
                except (OSError, ValueError, KeyError, TypeError):
                    at = "?"  # checked when it is loaded
                log(f"continues from the checkpoint of trial {n} (step {at})")
                break

        def run() -> Any:
            return train_ladder(
                concrete,
                self.task,
                self.train_cfg,
                self.rungs,
                until=target,
                out_dir=ck,
                model=model,
                checkpoint_every=LADDER_CHECKPOINT_EVERY,
                evaluate_last=False,  # evaluated once, by _finish (at the trial's bits)
            )

        t = time.perf_counter()
        try:
            result = run()
        except TrainingError as exc:
            log(f"checkpoint not usable ({exc}); training from step 0")
            shutil.rmtree(inside(self.run_dir, ck))
            result = run()
        raise_if_interrupted()
        timing["train_s"] = time.perf_counter() - t
        m = {k: v for k, v in result.metrics.items() if k not in ("history", "rungs")}
        metrics["train"] = m
        metrics["history"] = result.history
        if result.status == "failed":
            raise TrialFailed(m.get("reason", "training failed"))
        recs = result.metrics["rungs"]
        last = recs[-1]
        out = self._finish(result.model, concrete, tdir, log, timing, metrics, None)
        log(
            f"rung {target} ({last['steps']} steps): "
            + ", ".join(f"{k}={v:.4g}" for k, v in out.items())
        )
        rungs = [dict(r) for r in (inherited or [])][:target]
        if len(rungs) < target:  # retrained from step 0 without the earlier records
            rungs += [_rung_record(r, {}) for r in recs[len(rungs) : target]]
        rungs.append(_rung_record(last, out))
        ladder: dict[str, Any] = {"rungs": rungs, "rung": target, "steps": self.rungs[target]}
        if source is not None:
            ladder["continue_of"] = source
        metrics["ladder"] = ladder
        return out

    def _budget_taken(self, trial: optuna.Trial, started: dict[str, Any]) -> str | None:
        """Whether newly drawn ``trial`` lost a race for the last of the budget: several
        workers (or processes sharing a storage) each saw one model left and each created a
        trial. Trial numbers are given in creation order, so the trials numbered below this
        one keep their places: when the budget-counting finished trials plus the models
        being drawn by lower-numbered running trials already fill ``--trials``, returns
        those running trials' numbers (this trial then stops unrun), else None. Promotions
        and retries are never stopped (they finish work the budget already counted)."""
        if not self.shared or ATTR_CONTINUE in started or "failed_trial" in started:
            return None
        trials = trial.study.get_trials(deepcopy=False)
        # read after this trial was created: the duplicate check uses it, no second read
        self.seen, self.seen_after_start = trials, True
        used = budget_used(trials)
        drawing = [t.number for t in drawing_trials(trials) if t.number < trial.number]
        if used + len(drawing) < self.cfg.trials:
            return None
        return f"{used} finished" + "".join(f", trial {n} running" for n in drawing)

    @staticmethod
    def _duplicate_of(finished: list[FrozenTrial], number: int, h: str) -> FrozenTrial | None:
        """A finished trial of the same model (spec hash ``h``), an original one first."""
        same = []
        for t in finished:
            a = trial_attrs(t)
            if a.get("spec_hash") == h and t.number != number:
                same.append((a.get("duplicate_of") is not None, t.number, t))
        same.sort(key=lambda x: x[:2])
        return same[0][2] if same else None

    def _pre_check(self, values: dict[str, float]) -> list[str]:
        return check_constraints(
            [c for c in self.constraints if c.metric in values], values, pre_training=True
        )

    @staticmethod
    def penalty(finished: list[FrozenTrial], objective: Objective) -> float:
        """The value recorded for an objective a refused candidate never reached: the worst
        measured value of it among the ``finished`` (COMPLETE) trials, else ``inf``
        (``-inf`` when maximized)."""
        worst = math.inf if objective.direction == "minimize" else -math.inf
        seen = []
        for t in finished:
            v = trial_attrs(t).get("values", {}).get(objective.metric)
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
        finished: list[FrozenTrial],
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
                out.append(self.penalty(finished, o))
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
        from archir.train import train

        cfg = self.train_cfg
        task = self.task
        single = len(self.objectives) == 1
        qmetric = next(
            (o.metric for o in self.objectives if o.metric not in PRE_TRAINING), task.metric
        )
        state: dict[str, Any] = {"first": None, "pruned": False, "diverged": None}

        def callback(step: int, ev: dict[str, float]) -> bool:
            raise_if_interrupted()
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
        raise_if_interrupted()
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
        keys = (task.metric, "val_loss", f"{task.metric}_se")
        out: dict[str, float] = {k: float(m[k]) for k in keys if k in m}
        return self._finish(result.model, concrete, tdir, log, timing, metrics, out)

    def _finish(
        self,
        model: Any,
        concrete: Spec,
        tdir: Path,
        log: _Log,
        timing: dict[str, float],
        metrics: dict[str, Any],
        out: dict[str, float] | None,
    ) -> dict[str, float]:
        """Fake-quantize a trained model's blocks below 16 bits and evaluate it again (the
        quality the shipped bits give; full-precision values ``out`` kept as
        ``<metric>_fp``), then save its weights in ``tdir``. With ``out`` None the model is
        evaluated here (once, quantized or not). Returns the values."""
        from archir.quant import needs_quantization, quantize_model

        cfg, task = self.train_cfg, self.task
        quantize = needs_quantization(model)
        if out is None:
            out = {}
            if not quantize:
                model.eval()
                ev = task.evaluate(
                    model,
                    cfg.eval_batch_size or cfg.batch_size,
                    min(cfg.seq_len, concrete.model.model.max_seq_len),
                    cfg.eval_batches,
                )
                out = {k: float(v) for k, v in ev.items()}
                if not all(math.isfinite(v) for v in out.values()):
                    raise TrialFailed("evaluation produced a non-finite metric")
        if quantize:
            t = time.perf_counter()
            q = quantize_model(model)
            model.eval()
            ev = task.evaluate(
                model,
                cfg.eval_batch_size or cfg.batch_size,
                min(cfg.seq_len, concrete.model.model.max_seq_len),
                cfg.eval_batches,
            )
            timing["quant_eval_s"] = time.perf_counter() - t
            for k in list(out):
                out[f"{k}_fp"] = out[k]
            out.update({k: float(v) for k, v in ev.items()})
            metrics["quantized"] = q["quantized"]
            fp = out.get(task.metric + "_fp")
            log(
                f"fake-quantized {len(q['quantized'])} node(s): {task.metric} {out[task.metric]:.4g}"
                + (f" (full precision {fp:.4g})" if fp is not None else "")
            )
            if not all(math.isfinite(v) for v in out.values()):
                raise TrialFailed("evaluation after quantization produced a non-finite metric")
        # how much was evaluated describes the evaluation, not the model
        metrics["eval"] = {k: out.pop(k) for k in ("val_windows", "val_bytes") if k in out}
        from safetensors.torch import save_model

        save_model(model, str(tdir / "model.safetensors"))
        normal_mode(tdir / "model.safetensors")  # safetensors writes 0600
        return out


#: optimizer steps between two checkpoints of a ladder trial (besides one at every rung)
LADDER_CHECKPOINT_EVERY = 200


def _rung_record(rec: dict[str, Any], out: dict[str, float]) -> dict[str, Any]:
    """A rung's record as a trial keeps it: rung, steps, wall seconds, the quality values
    (``out``: after quantization, else the training run's) and their noise estimates."""
    quality = out or {
        k: float(v)
        for k, v in rec.items()
        if k not in ("rung", "steps", "wall_s", "train_loss", "val_windows", "val_bytes")
    }
    src = out or rec
    return {
        "rung": int(rec["rung"]),
        "steps": int(rec["steps"]),
        "wall_s": float(rec["wall_s"]),
        "values": {k: v for k, v in quality.items() if not k.endswith("_se")},
        "se": {k: float(v) for k, v in src.items() if k.endswith("_se")},
    }


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


def consumes_budget(t: FrozenTrial, retried: set[int]) -> bool:
    """Whether a finished trial counts against ``--trials`` (module docstring); a ladder's
    promotion never does (the budget is the number of models drawn)."""
    if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        return False
    if continues(t) is not None:
        return False
    a = trial_attrs(t)
    if a.get("duplicate_of") is not None:
        return False  # the same model as an earlier trial: nothing was trained
    if a.get("status") == OVER_BUDGET:
        return False  # stopped unrun: other workers had taken the last of the budget
    if t.state == TrialState.FAIL:
        return a.get("status") != "interrupted" and t.number not in retried
    return True


def live_running(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The RUNNING trials whose process is not known dead (:func:`dead_here`)."""
    return [t for t in trials if t.state == TrialState.RUNNING and not dead_here(t)]


def drawing_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The live running trials that draw a new model (not a ladder's promotion): each will
    count against the budget unless it ends as a duplicate, interrupted or retried."""
    return [t for t in live_running(trials) if continues(t) is None]


def budget_used(trials: list[FrozenTrial]) -> int:
    """Finished trials that count against the budget: COMPLETE (incl. infeasible), PRUNED
    and FAIL — except trials that reused an identical model's result (``duplicate_of``),
    interrupted ones and failed trials whose configuration was retried (killed processes)."""
    retried = _retried(trials)
    return sum(1 for t in trials if consumes_budget(t, retried))


def distinct_models(trials: list[FrozenTrial]) -> int:
    """How many different models (spec hashes) the finished trials of a study hold."""
    hashes = (trial_attrs(t).get("spec_hash") for t in trials if t.state == TrialState.COMPLETE)
    return len({h for h in hashes if h is not None})


def _closest(trials: list[FrozenTrial], k: int = 3) -> str:
    cand = [(a, t) for t in trials if "rel_violation" in (a := trial_attrs(t))]
    cand.sort(key=lambda x: x[0]["rel_violation"])
    parts = []
    for a, t in cand[:k]:
        reason = str(a.get("reason", "")).split(": ", 1)[-1]
        parts.append(f"trial {t.number} {json.dumps(t.params, default=str)}: {reason}")
    return " | ".join(parts)


# -- interrupted and stale trials ---------------------------------------------------------
#: the signal (Ctrl-C or SIGTERM) that arrived inside :func:`sigterm_interrupts`, if any
_pending_signal: int | None = None


def _raise_interrupt(signum: int, frame: Any) -> None:
    global _pending_signal
    _pending_signal = signum
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise :class:`KeyboardInterrupt` again for a Ctrl-C or SIGTERM that arrived inside
    :func:`sigterm_interrupts` and whose exception was lost. Python ignores an exception
    raised inside a weakref callback or ``__del__``, e.g. the module lock's callback of an
    import that a trial's first training step runs: the search then went on and ended with
    exit 0. The training callback and the end of each trial's training call this, so such
    a signal stops the search at the next evaluation."""
    if _pending_signal is not None:
        raise KeyboardInterrupt


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`KeyboardInterrupt` as Ctrl-C does, so a
    search stopped either way records its running trial as interrupted (retried on
    resume); either signal is also remembered (:func:`raise_if_interrupted`). Ctrl-C keeps
    Python's handling where it was ignored (e.g. a background job). The previous handlers
    are restored afterwards; nothing happens outside the main thread."""
    global _pending_signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _pending_signal = None


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while an interruption is being recorded (a second signal
    would leave the trial half-written); previous handlers restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def retry_interrupted(study: optuna.Study, trial_id: int) -> int | None:
    """Record trial ``trial_id`` as interrupted (FAIL, status ``interrupted``, if it is still
    RUNNING) and queue its configuration again: a WAITING trial with the same parameters
    and ``failed_trial`` naming it, which the next run evaluates first. Interrupted trials
    do not count against the budget (:func:`budget_used`).

    Returns the interrupted trial's number, or None when it had finished otherwise.
    """
    storage = study._storage
    if isinstance(storage, HeartbeatJournalStorage):
        storage.flush()  # writes held for the trial's final state
    t = storage.get_trial(trial_id)
    if t.state == TrialState.RUNNING:
        rec = t.user_attrs.get(TRIAL_ATTR)
        model = {k: v for k, v in rec.items() if k in MODEL_KEYS} if isinstance(rec, dict) else {}
        try:
            storage.set_trial_user_attr(
                trial_id, TRIAL_ATTR, {**model, "status": "interrupted", "reason": INTERRUPTED}
            )
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        t = storage.get_trial(trial_id)
    if t.state != TrialState.FAIL or trial_attrs(t).get("status") != "interrupted":
        return None
    system = {
        k: v
        for k, v in t.system_attrs.items()
        if k not in (ATTR_HOST, ATTR_PID) and not k.startswith("archir:heartbeat")
    }
    system["retry_history"] = [*system.get("retry_history", []), t.number]
    system["failed_trial"] = t.number
    # the retry starts without the interrupted trial's record (its own replaces it)
    user = {k: v for k, v in t.user_attrs.items() if k != TRIAL_ATTR and k not in RESULT_KEYS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=t.params,
                distributions=t.distributions,
                user_attrs=user,
                system_attrs=system,
            )
        )
    return t.number


#: seconds a ladder worker with nothing to do waits before it looks for promotions again
LADDER_POLL_S = 1.0


def enqueue_promotion(study: optuna.Study, src: FrozenTrial, rung: int) -> None:
    """Queue the promotion of trial ``src``'s model to ``rung``: a WAITING trial with its
    parameters and the system attributes :data:`~searchers.ladder.ATTR_CONTINUE` and
    :data:`~searchers.ladder.ATTR_RUNG`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=src.params,
                distributions=src.distributions,
                # an evolution child's genome and lineage go with its model (not its
                # origins: a promotion continues from its own checkpoint)
                system_attrs={
                    ATTR_CONTINUE: src.number,
                    ATTR_RUNG: rung,
                    **{
                        k: src.system_attrs[k]
                        for k in (ATTR_GENOME, ATTR_LINEAGE)
                        if k in src.system_attrs
                    },
                },
            )
        )


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

    Stops early (without an error) after :data:`MAX_CONSECUTIVE_DUPLICATES` proposals in a
    row were models already seen. A Ctrl-C or SIGTERM (:func:`sigterm_interrupts`) records
    the running trial as interrupted and queues it again, then re-raises.

    Raises:
        SearchError: ``max_rejections`` consecutive candidates broke a constraint and no
            candidate has met them all yet.
        KeyboardInterrupt: interrupted.
    """
    _silence()
    say = say or (lambda s: None)
    spec = load_spec(cfg.spec_path)
    sec = cfg.section
    storage = open_storage(
        cfg.storage_url, cfg.journal, cfg.heartbeat_interval, cfg.grace_period, say=say
    )
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
    if evaluator.evolution is not None:  # each worker its own proposals, as its sampler
        evaluator.evolution.rng = random.Random(seed)
    if ready is not None:
        try:
            ready.wait(timeout=300)
        except threading.BrokenBarrierError:
            pass  # another worker failed to start: go on alone
    deadline = time.time() + cfg.timeout_s if cfg.timeout_s else None

    def report(study: optuna.Study, t: FrozenTrial) -> None:
        a = trial_attrs(t)
        status = a.get("status", t.state.name.lower())
        vals = a.get("values", {})
        shown = ", ".join(
            f"{o}={vals[o]:.4g}" for o in sec.objectives if o in vals and vals[o] is not None
        )
        reason = a.get("reason", "")
        dup = a.get("duplicate_of")
        if a.get("rungs") and dup is None:
            shown += f"  [rung {a.get('rung')}: {a.get('steps')} steps" + (
                f", continues trial {a['continue_of']}]"
                if a.get("continue_of") is not None
                else "]"
            )
        say(
            f"trial {t.number:>3} {status:<10} {shown}"
            + (f"  ({reason[:110]})" if reason and status != "ok" else "")
            + (f"  (same model as trial {dup}: not counted)" if dup is not None else "")
            + _lineage_note(a)
        )

    rungs = evaluator.rungs
    while True:
        trials = study.get_trials(deepcopy=False)
        used = budget_used(trials)
        running = live_running(trials)
        waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
        drawing = len(drawing_trials(running))
        if deadline is not None and time.time() > deadline:
            say("time budget reached")
            break
        if running:  # another process's trials: fail those whose heartbeat stopped, with why
            for n in fail_stale_trials(study):
                say(f"trial {n}: its heartbeat stopped (process died or hung): retried once")
        # a ladder promotes before it draws a new model (searchers.ladder)
        due = (
            promotions(
                trials, evaluator.objectives, evaluator.constraints, len(rungs), sec.fidelity.eta
            )
            if rungs and not waiting
            else []
        )
        if due:
            src, rung = due[0]
            enqueue_promotion(study, src, rung)
            say(f"trial {src.number} promoted to rung {rung} ({rungs[rung]} steps)")
            trials = study.get_trials(deepcopy=False)
        # retries waiting (a killed or interrupted trial's configuration) are run even when
        # the budget is reached meanwhile: they finish work the budget already counted
        elif not waiting and used + drawing >= cfg.trials:
            if rungs and running:  # their results may make a promotion due: wait for them
                time.sleep(LADDER_POLL_S)
                continue
            break
        elif evaluator.evolution is not None and not waiting:
            # evolution draws the next model (None: the spec's own first population)
            try:
                child = evaluator.evolution.propose(
                    trials, spec_hash, lambda n: trial_spec_name(spec.name, n)
                )
            except SearchError as exc:  # nothing new within search.evolution: stop here
                say(f"evolution stopped at {used} of {cfg.trials} trials: {exc.message}")
                break
            evaluator.next_child = child  # the next trial evaluates it
        evaluator.current = None
        evaluator.seen = trials  # its duplicate check and penalty read no trials again
        try:
            study.optimize(
                evaluator,
                n_trials=1,
                catch=(TrialFailed,),
                callbacks=[report],
                gc_after_trial=False,
            )
        except KeyboardInterrupt:
            with _signals_held():
                trial = evaluator.current
                stopped = retry_interrupted(study, trial._trial_id) if trial is not None else None
                if stopped is not None:
                    say(f"trial {stopped} interrupted: its configuration is retried on resume")
            raise
        if isinstance(storage, HeartbeatJournalStorage):
            storage.flush()  # nothing is normally held here; a safety net
        if evaluator.consecutive_duplicates >= MAX_CONSECUTIVE_DUPLICATES:
            trials = study.get_trials(deepcopy=False)
            say(
                f"search space exhausted: {distinct_models(trials)} distinct models seen and "
                f"{evaluator.consecutive_duplicates} proposals in a row were models already "
                f"trained; stopping at {budget_used(trials)} of {cfg.trials} trials"
            )
            break
        if evaluator.consecutive_rejections >= sec.max_rejections:
            trials = study.get_trials(deepcopy=False)
            if not any(feasible(t) for t in trials):
                raise SearchError(
                    f"{evaluator.consecutive_rejections} candidates in a row broke the "
                    f"constraints and none has met them yet; closest: {_closest(trials)}",
                    hint="loosen search.constraints or shrink the space toward the closest "
                    "candidates",
                )


def _lineage_note(a: dict[str, Any]) -> str:
    """``  <- mutation of #3: ...`` for an evolution child's first trial, else ``""``."""
    lin = a.get("lineage")
    if not isinstance(lin, dict) or not lin.get("parents") or a.get("continue_of") is not None:
        return ""
    from searchers.evolution import lineage_text

    text = lineage_text(lin)
    why = lin.get("rejected_why") or {}
    redrawn = (
        f"  [{sum(why.values())} redrawn: " + ", ".join(f"{k} {v}" for k, v in why.items()) + "]"
        if why
        else ""
    )
    return "  <- " + (text if len(text) <= 100 else text[:97] + "...") + redrawn


def _worker_entry(cfg_dict: dict[str, Any], worker_id: int, q: Any, ready: Any = None) -> None:
    cfg = SearchConfig(**cfg_dict)
    try:
        with sigterm_interrupts():
            worker(
                cfg, worker_id, say=lambda s: print(f"[w{worker_id}] {s}", flush=True), ready=ready
            )
        q.put((worker_id, None))
    except ArchirError as exc:
        q.put((worker_id, str(exc)))
        if ready is not None:
            ready.abort()  # release workers still waiting to start
    except KeyboardInterrupt:
        q.put((worker_id, "interrupted"))
        if ready is not None:
            ready.abort()
        sys.exit(130)
    except BaseException as exc:  # noqa: BLE001
        q.put((worker_id, f"worker crashed: {type(exc).__name__}: {exc}"))
        if ready is not None:
            ready.abort()
        raise


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------
class OptunaSearcher(Searcher):
    """Trial by trial on Optuna's samplers (TPE, NSGA-II, random, GP): each worker process
    (:func:`worker`) asks the study's sampler for the next configuration, the
    :class:`Evaluator` measures it (cost, latency, training at the search's fidelity, a
    fidelity ladder's promotions), until the budget is spent.

    Options: ``sampler`` (``search.sampler``) and ``workers`` (``search.workers``: processes
    sharing the study). A subclass that proposes models another way (``cfg.searcher`` tells
    the workers whose run it is) reuses the whole loop: it sets :attr:`name` and
    :attr:`options` and overrides :meth:`proposer`.
    """

    name = "optuna"
    family = "trial-based"
    options = frozenset({"sampler", "workers"})

    def section_overrides(self) -> dict[str, Any]:
        return {
            k: v for k, v in self.given.items() if k in ("sampler", "workers") and v is not None
        }

    def proposer(self, run: RunPlan) -> str:
        """Who proposes the models, for the first line of the run (``sampler tpe``)."""
        sec = run.section
        return "sampler " + (sec.sampler or ("tpe" if len(run.objectives) == 1 else "nsga2"))

    def search(
        self,
        run: RunPlan,
        study: optuna.Study,
        *,
        export: bool,
        say: Callable[[str], None],
    ) -> SearchResult:
        """Run the workers on the study (one in this process, or ``cfg.workers`` processes)
        until the budget is spent, then the front (:func:`searchers.pareto.finalize`).

        Raises:
            SearchError: a worker failed (its message), ``max_rejections`` consecutive
                candidates broke a constraint. KeyboardInterrupt: interrupted.
        """
        cfg = run.cfg
        before = budget_used(study.get_trials(deepcopy=False))
        say(
            f"search '{run.study_name}': {len(space_description(run.spec.nodes))} decisions, "
            f"{self.proposer(run)}, fidelity {run.section.fidelity.kind}, {cfg.trials} trials"
            + (f" ({before} done, resuming)" if before else "")
            + f", {cfg.workers} worker(s); storage {run.storage_url or cfg.journal}"
        )
        if cfg.workers == 1:
            worker(cfg, 0, say)
        else:
            _run_workers(cfg)
        return finalize(cfg, run.objectives, run.constraints, export=export, say=say)


class EvolutionSearcher(OptunaSearcher):
    """Graph-mutation evolution (:mod:`searchers.evolution`) through the same worker loop:
    the :class:`Evaluator` and the worker loop ask :class:`searchers.evolution.Evolution`
    for the next model where the sampler would draw one (``cfg.searcher``); what it may
    change is the spec's ``search.evolution`` section."""

    name = "evolution"
    searches_concrete = True

    def prepare(self, spec: Spec, section: SearchSection) -> TrainSection | None:
        """Refuse, before anything is written, a spec without a ``search.evolution`` section
        or one whose kinds and knobs the registry refuses (the field path named)."""
        from searchers.evolution import make_space, seed_data

        if section.evolution is None:
            raise SearchError(
                "--searcher evolution needs a search.evolution section: what evolution may "
                "change in the graph",
                hint="e.g. search: {evolution: {token_mixers: {attention: {n_heads: [2, 4]}, "
                "mamba: {d_state: [8, 16]}}, depth: [2, 6], d_model: [64, 128]}}",
            )
        make_space(section.evolution, seed_data(spec), section.population)
        return None

    def proposer(self, run: RunPlan) -> str:
        return "evolution (search.evolution)"


def run_search(
    spec: Spec | str | Path,
    *,
    searcher: str = "optuna",
    out: str | Path | None = None,
    storage: str | None = None,
    study: str | None = None,
    trials: int | None = None,
    seed: int | None = None,
    fidelity: str | None = None,
    steps: int | None = None,
    timeout_s: float | None = None,
    export: bool = True,
    heartbeat_interval: int = 5,
    grace_period: int = 30,
    say: Callable[[str], None] | None = None,
    **options: Any,
) -> SearchResult:
    """Search the open choices of a spec with a registered searcher; write the run folder
    (DESIGN.md §7, §9). What ``archir search`` runs.

    The searcher (:func:`searchers.base.get_searcher`) is built with ``options``; the shared
    set-up (:func:`searchers.setup.prepare_run`, :func:`searchers.setup.open_run`) checks
    everything, then creates the run folder, storage, ``run.json`` and study; the searcher
    searches (:meth:`searchers.base.Searcher.search`).

    Args:
        spec: an open spec (or its file) with a ``search:`` section.
        searcher: ``optuna`` (default), ``darts``, ``spos`` ... (:func:`searcher_names`).
        out: run folder (default ``runs/<study>``).
        storage: an Optuna storage URL (default: ``<out>/study.journal``).
        study: study name (default: the spec name); a name (letters, digits, ``_``, ``-``).
        trials, seed, fidelity, steps, timeout_s: override the spec's ``search:`` section
            (``steps`` sets a proxy fidelity's step budget).
        export: write ``best/model.onnx`` (parity-checked) at the end.
        heartbeat_interval, grace_period: the storage's heartbeat, seconds.
        options: the searcher's own: ``sampler``, ``workers`` (optuna); ``relax``,
            ``supernet_steps``, ``held``, ``n_final`` ... (darts, spos:
            :class:`searchers.oneshot.OneShotConfig`).

    Returns:
        SearchResult with the Pareto front and the best trial (``extra``: what the searcher
        adds).

    Raises:
        SpecError: the spec is invalid. PathError: a name that is not one, an ``out``
            where no folder can be written. SearchError: an unknown searcher, an option it
            does not take, and everything :func:`searchers.setup.prepare_run` refuses
            (nothing to search, an option out of range, a run folder or study of another
            search ...) or the searcher does. Nothing this call did not create is ever
            removed: when it fails, what it created (the run folder, or the files it added
            to an existing one) is removed.
        KeyboardInterrupt: Ctrl-C (or SIGTERM inside :func:`sigterm_interrupts`); the
            running trial is retried when the same command runs again.
    """
    _silence()
    say = say or print
    t0 = time.time()
    chosen = get_searcher(searcher)(**options)
    # -- everything that can be refused is refused before anything is written -------------
    plan = prepare_run(
        spec,
        chosen,
        out=out,
        storage=storage,
        study=study,
        trials=trials,
        seed=seed,
        fidelity=fidelity,
        steps=steps,
        timeout_s=timeout_s,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        say=say,
    )
    created = Created()  # what this call makes: removed again if it fails
    try:
        ostudy = open_run(plan, created, say=say)
        result = chosen.search(plan, ostudy, export=export, say=say)
    except ArchirError:
        created.undo()
        raise
    except KeyboardInterrupt:
        say(f"interrupted: run the same command again to resume ({plan.run_dir})")
        raise
    result.wall_s = time.time() - t0
    return result


def _run_workers(cfg: SearchConfig) -> None:
    """``cfg.workers`` processes on the study; an interrupt (Ctrl-C reaches them all,
    SIGTERM only this process) stops each one, which records its trial as interrupted.

    Raises:
        SearchError: a worker failed (its message). KeyboardInterrupt: interrupted.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ready = ctx.Barrier(cfg.workers)
    procs = [
        ctx.Process(target=_worker_entry, args=(asdict(cfg), i, q, ready))
        for i in range(cfg.workers)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        with _signals_held():
            end = time.time() + 5  # a Ctrl-C reached them too: let them record it
            for p in procs:
                p.join(max(0.0, end - time.time()))
            for p in procs:
                if p.is_alive():
                    p.terminate()  # SIGTERM: the worker records its trial as interrupted
            for p in procs:
                p.join(60)
        raise
    errors = []
    while not q.empty():
        _, err = q.get()
        if err and err != "interrupted":
            errors.append(err)
    if errors:
        raise SearchError(errors[0])
    if any(p.exitcode == 130 for p in procs):
        raise KeyboardInterrupt


def main_worker() -> None:  # pragma: no cover - used by `python -m searchers.run`
    cfg = SearchConfig(**json.loads(sys.argv[1]))
    worker(cfg, int(sys.argv[2]) if len(sys.argv) > 2 else 0, print)
