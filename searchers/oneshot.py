"""One-shot architecture search: DARTS, GDAS-style Gumbel sampling and SPOS (DESIGN.md §7).

``archir search SPEC --searcher darts|spos`` (:func:`searchers.run.run_search` with
``searcher="darts"`` or ``"spos"``) trains one supernet (:mod:`searchers.supernet`) holding
every candidate of the spec's open choices, picks architectures from it, retrains each from
scratch at the search's trial budget, and records them in the same run folder and Optuna
study as every other search, set up by the same code (:mod:`searchers.setup`; DESIGN.md
§9): ``spec.yaml``, ``run.json``, ``study.journal``, ``trials/<n>/{spec.yaml,
metrics.json}``, ``pareto.json``/``pareto.png``, ``best/{spec.yaml, model.safetensors,
report.json}`` — plus ``arch_weights.json`` (final architecture distribution, history,
collapse-guard events) and ``oneshot.json`` (the summary, also the result's ``extra``).

Methods
-------
``darts`` / ``relax="softmax"`` — first-order DARTS (Liu et al., 2019, "DARTS: Differentiable
    Architecture Search"): each step alternates an architecture step (Adam on ``alpha``,
    validation batch, every candidate weighted by ``softmax(alpha)``) and a weight step
    (AdamW with the trainer's schedule, training batch, ``alpha`` fixed). The first
    ``warmup_frac`` of the steps trains weights only (uniform mixture).
``darts`` / ``relax="gumbel"`` — GDAS (Dong & Yang, 2019, "Searching for a Robust Neural
    Architecture in Four GPU Hours"): both steps run one path sampled by hard Gumbel-softmax;
    the architecture step back-propagates through the straight-through one-hot weight. The
    temperature decays exponentially from ``tau_max`` to ``tau_min`` over the architecture
    phase.
``spos`` — single-path one-shot (Guo et al., 2020, "Single Path One-Shot Neural
    Architecture Search with Uniform Sampling"): weights are trained on one uniformly sampled
    path per step; then an evolutionary search over the supernet's sub-networks
    (:func:`spos_evolve`: ``population``, ``generations``, mutation and crossover of value
    indices — not the graph mutation of :mod:`searchers.evolution`) scores them by
    validation loss with inherited weights; candidates that break a pre-training constraint
    (exact cost of their fixed spec) are never kept.

DARTS adds the hardware-aware terms and the collapse guard of :mod:`searchers.archloss` to
the architecture loss.

Held decisions
--------------
Decisions outside blocks (``d_model``, a group's ``residual``, ``train.*`` ...) are not
searched by the supernet (:mod:`searchers.supernet`): they are held at the value given in
``held={name: value}`` or else at their default (first option of a choice, low end of an
int range, middle of a float range). The run prints them at the start and records them in
``run.json``, ``arch_weights.json`` and ``oneshot.json`` (``held``).

Discretize and verify
---------------------
DARTS/GDAS take the argmax of every decision; when that architecture breaks a pre-training
constraint on its exact cost, the most probable architecture that meets them is retrained
as well (``repaired``). SPOS retrains the ``n_final`` best feasible sub-networks. Each one is
a normal trial of the study (the search helper's :class:`searchers.run.Evaluator`: exact
cost, latency, training with ``archir.train.train`` at the trial fidelity, quantized
evaluation, constraint check on the discrete model).
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import optuna
import torch

from archir.errors import ArchirError, SearchError
from archir.spec.loader import Spec
from archir.spec.sections import SearchSection, TrainSection
from searchers.archloss import (
    HW_METRICS,
    CollapseGuard,
    HardwareLoss,
    LatencyModel,
    make_latency_model,
)
from searchers.base import RunPlan, Searcher
from searchers.config import SearchResult, check_option_bounds, trial_train_cfg
from searchers.objectives import COST_METRICS, Constraint, trial_attrs
from searchers.supernet import SuperNet, build_supernet


@dataclass
class OneShotConfig:
    """Knobs of a one-shot search (options of ``run_search(..., searcher="darts"|"spos")``;
    the budget, fidelity, seed, storage and study are the common options of every searcher).

    Attributes:
        supernet_steps: supernet training steps (default: ``max(10, trials · trial steps /
            2)`` for DARTS, twice that for SPOS, i.e. about the CPU of the trial budget;
            ``trials`` is ``search.budget.trials``).
        held: values for held decisions, ``{decision name: value}`` (option value, option
            index for non-scalar choices, or a number in range); others keep their defaults.
        latency_model: ``auto`` (predictor when a calibration matches, else FLOPs),
            ``predictor`` (a SearchError without a calibration) or ``flops``.
        latency_runtime: runtime of the calibration (default ``search.latency.runtime``).
        latency_calibration: a calibration file instead of the machine's default one.
        warmup_frac: DARTS: share of the steps that train weights only.
        arch_lr, arch_wd: Adam on ``alpha`` (DARTS paper: 3e-4 / 1e-3; larger here for
            short runs).
        tau_max, tau_min: Gumbel temperature schedule (exponential decay).
        hw_weight, hw_margin, obj_weight: hardware-aware loss (:mod:`searchers.archloss`).
        guard, guard_threshold, guard_beta, guard_max_triggers: collapse guard.
        population, generations, mutate_p, eval_batches: SPOS evolution.
        n_final: architectures retrained (SPOS: the best feasible ones).
        log_every: supernet history interval (steps).

    The budget's ``timeout_s`` stops supernet training and the SPOS evolution when it is
    spent (at least one step / the first generation run), and after the first retrained
    architecture no further one starts.
    """

    supernet_steps: int | None = None
    warmup_frac: float = 0.25
    arch_lr: float = 3e-2
    arch_wd: float = 1e-3
    tau_max: float = 5.0
    tau_min: float = 0.5
    hw_weight: float = 2.0
    hw_margin: float = 0.05
    obj_weight: float = 0.05
    guard: bool = True
    guard_threshold: float = 0.6
    guard_beta: float = 0.5
    guard_max_triggers: int = 3
    population: int = 8
    generations: int = 4
    mutate_p: float = 0.3
    eval_batches: int = 2
    n_final: int = 1
    log_every: int = 10
    held: dict[str, Any] | None = None
    latency_model: str = "auto"
    latency_runtime: str | None = None
    latency_calibration: str | None = None


# -- helpers --------------------------------------------------------------------------------
def _val_stream(task: Any, batch: int, seq_len: int, seed: int):
    """Batches for architecture steps: the task's validation split when it exposes one
    (``val_batches``), else an independent stream of training batches."""
    if hasattr(task, "val_batches"):
        pool = list(task.val_batches(batch, seq_len, 64))
        if pool:
            i = 0
            while True:
                yield pool[i % len(pool)]
                i += 1
    gen = torch.Generator().manual_seed(seed + 7777)
    while True:
        yield task.train_batch(batch, seq_len, gen)


def _lr(step: int, total: int, cfg: TrainSection) -> float:
    from archir.train import lr_at

    return lr_at(step, cfg.model_copy(update={"steps": total}))


def _arch_cost(
    net: SuperNet, arch: dict[str, int], latency: LatencyModel | None
) -> dict[str, float]:
    from archir.cost import analyze

    spec = net.fix(arch)
    rep = analyze(spec)
    vals = {k: float(getattr(rep, k)) for k in COST_METRICS}
    if latency is not None:
        vals["latency_ms"] = latency.of_spec(spec, vals["flops_per_token"])
    return vals


def _feasible(constraints: list[Constraint], vals: dict[str, float]) -> bool:
    return all(c.ok(vals[c.metric]) for c in constraints if c.metric in vals)


def _log_prob(net: SuperNet, arch: dict[str, int]) -> float:
    probs = net.probs()
    return sum(
        math.log(max(float(p.detach()[arch[d.name]]), 1e-12)) for d, p in zip(net.decisions, probs)
    )


def _labels(net: SuperNet, arch: dict[str, int]) -> dict[str, str]:
    """Readable values of the decisions an architecture uses (decisions nested under an
    option it did not choose are left out)."""
    try:
        used = set(net.fix(arch).decisions)
    except ArchirError:  # pragma: no cover - every architecture of the supernet fixes
        used = {d.name for d in net.decisions}
    return {d.name: d.labels[arch[d.name]] for d in net.decisions if d.name in used}


def _weights_doc(net: SuperNet) -> dict[str, Any]:
    probs = [p.detach() for p in net.probs()]
    return {
        d.name: {
            "category": d.category,
            "values": d.labels,
            "alpha": [round(float(x), 5) for x in a.detach()],
            "probs": [round(float(x), 5) for x in p],
            "argmax": d.labels[int(p.argmax())],
            "param_free": d.param_free,
        }
        for d, a, p in zip(net.decisions, net.alphas, probs)
    }


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- supernet training ----------------------------------------------------------------------
def train_supernet(
    net: SuperNet,
    task: Any,
    train_cfg: TrainSection,
    method: str,
    relax: str,
    steps: int,
    cfg: OneShotConfig,
    hw: HardwareLoss | None,
    guard: CollapseGuard | None,
    seed: int,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Train the supernet (weights, and ``alpha`` for DARTS/GDAS). Returns a log dict with
    ``history``, ``steps_run``, ``stopped`` (why it ended early, else None) and timings.
    ``deadline``: a ``time.perf_counter()`` value after which no further step starts."""
    from archir.train import make_optimizer

    torch.manual_seed(seed)
    extra = task.extra_modules(net) if hasattr(task, "extra_modules") else None
    params = net.weight_parameters()
    holder = torch.nn.Module()
    holder.ps = torch.nn.ParameterList(params)
    w_opt = (
        make_optimizer(holder, train_cfg, extra)
        if extra is not None
        else make_optimizer(holder, train_cfg)
    )
    a_opt = torch.optim.Adam(
        list(net.alphas), lr=cfg.arch_lr, betas=(0.5, 0.999), weight_decay=cfg.arch_wd
    )
    gen = torch.Generator().manual_seed(seed + 1)
    pgen = torch.Generator().manual_seed(seed + 2)
    seq_len = min(train_cfg.seq_len, net.spec.model.max_seq_len)
    vstream = _val_stream(task, train_cfg.batch_size, seq_len, seed)
    warm = int(steps * cfg.warmup_frac) if method == "darts" else steps
    arch_steps = max(1, steps - warm)
    history: list[dict[str, Any]] = []
    step_times: list[float] = []
    net.train()
    last_loss = float("nan")
    all_params = params + (list(extra.parameters()) if extra is not None else [])
    stopped = None
    steps_run = 0
    for step in range(steps):
        t0 = time.perf_counter()
        if step > 0 and deadline is not None and t0 > deadline:
            stopped = f"timeout after {step} of {steps} steps"
            break
        steps_run = step + 1
        lr = _lr(step, steps, train_cfg)
        for g in w_opt.param_groups:
            g["lr"] = lr
        tau = 1.0
        arch_on = method == "darts" and step >= warm and not (guard and guard.frozen)
        if relax == "gumbel":
            frac = max(0, step - warm) / arch_steps
            tau = cfg.tau_max * (cfg.tau_min / cfg.tau_max) ** min(1.0, frac)
        # -- architecture step (validation batch) --
        arch_loss = None
        if arch_on:
            xv, yv = next(vstream)
            if relax == "gumbel":
                net.set_path("gumbel", tau=tau, gen=pgen)
            else:
                net.set_path("soft")
            loss_a = task.loss(net, xv, yv)
            probs = net.probs()
            if hw is not None:
                loss_a = loss_a + hw(probs)
            if guard is not None:
                loss_a = loss_a + guard.penalty(probs)
            a_opt.zero_grad(set_to_none=True)
            w_opt.zero_grad(set_to_none=True)
            loss_a.backward()
            a_opt.step()
            arch_loss = float(loss_a.detach())
            if guard is not None:
                guard.check(step)
        # -- weight step (training batch) --
        x, y = task.train_batch(train_cfg.batch_size, seq_len, gen)
        if method == "spos":
            net.set_path("uniform", gen=pgen)
        elif relax == "gumbel":
            net.set_path("gumbel", tau=tau, gen=pgen, grad=False)
        else:
            net.set_path("soft", grad=False)
        loss = task.loss(net, x, y)
        aux = net.aux_loss()
        total = loss + aux if aux is not None else loss
        if not torch.isfinite(total):
            raise SearchError(f"supernet loss became {float(total)} at step {step}")
        w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(all_params, train_cfg.grad_clip)
        w_opt.step()
        last_loss = float(loss.detach())
        step_times.append(time.perf_counter() - t0)
        last = step + 1 == steps or (deadline is not None and time.perf_counter() > deadline)
        if (step + 1) % cfg.log_every == 0 or last:
            row: dict[str, Any] = {"step": step + 1, "train_loss": round(last_loss, 5)}
            if arch_loss is not None:
                row["arch_loss"] = round(arch_loss, 5)
            if relax == "gumbel" and method == "darts":
                row["tau"] = round(tau, 4)
            if method == "darts":
                row["argmax"] = _labels(net, net.argmax())
                if hw is not None:
                    with torch.no_grad():
                        row["expected"] = {k: float(v) for k, v in hw.expected().items()}
            history.append(row)
    return {
        "steps": steps,
        "steps_run": steps_run,
        "stopped": stopped,
        "warmup_steps": warm if method == "darts" else None,
        "final_train_loss": last_loss,
        "step_time_s": sum(step_times) / max(1, len(step_times)),
        "history": history,
    }


@torch.no_grad()
def score_arch(net: SuperNet, task: Any, arch: dict[str, int], batches: list[Any]) -> float:
    """Mean validation loss of one sub-network with inherited weights."""
    net.eval()
    net.set_path("fixed", arch=arch)
    total = 0.0
    for x, y in batches:
        total += float(task.loss(net, x, y))
    net.train()
    return total / max(1, len(batches))


def spos_evolve(
    net: SuperNet,
    task: Any,
    batches: list[Any],
    constraints: list[Constraint],
    cfg: OneShotConfig,
    seed: int,
    latency: LatencyModel | None,
    deadline: float | None = None,
) -> tuple[list[tuple[float, dict[str, int]]], list[dict[str, Any]]]:
    """SPOS's evolutionary search over the supernet's sub-networks (value indices of its
    decisions; Guo et al., 2020): a population scored by validation loss with inherited
    weights (:func:`score_arch`), parents the better half, children by uniform crossover or
    per-decision mutation (``mutate_p``); sub-networks that break a pre-training constraint
    (exact cost, latency estimate) score ``inf`` and are never kept.

    Args:
        deadline: a ``time.perf_counter()`` value after which no generation starts.

    Returns:
        ``[(score, arch)]`` of every feasible sub-network scored, best (lowest) first, and
        a log with one row per generation.
    """
    rng = random.Random(seed)
    cache: dict[tuple[int, ...], float] = {}
    names = [d.name for d in net.decisions]
    sizes = [len(d.values) for d in net.decisions]
    pre = [c for c in constraints if c.metric in HW_METRICS]
    log: list[dict[str, Any]] = []

    def key(a: dict[str, int]) -> tuple[int, ...]:
        return tuple(a[n] for n in names)

    def fitness(a: dict[str, int]) -> float:
        k = key(a)
        if k not in cache:
            if pre and not _feasible(pre, _arch_cost(net, a, latency)):
                cache[k] = math.inf
            else:
                cache[k] = score_arch(net, task, a, batches)
        return cache[k]

    def rand() -> dict[str, int]:
        return {n: rng.randrange(s) for n, s in zip(names, sizes)}

    pop: list[dict[str, int]] = []
    tries = 0
    while len(pop) < cfg.population and tries < cfg.population * 20:
        tries += 1
        a = rand()
        if key(a) in {key(p) for p in pop}:
            if len(cache) >= math.prod(sizes):
                break
            continue
        if math.isfinite(fitness(a)):
            pop.append(a)
    for gen in range(cfg.generations):
        if gen > 0 and deadline is not None and time.perf_counter() > deadline:
            log.append({"generation": gen, "stopped": "timeout"})
            break
        pop.sort(key=fitness)
        parents = pop[: max(2, len(pop) // 2)]
        children: list[dict[str, int]] = []
        tries = 0
        while len(children) < cfg.population - len(parents) and tries < cfg.population * 20:
            tries += 1
            if rng.random() < 0.5 and len(parents) >= 2:
                p1, p2 = rng.sample(parents, 2)
                c = {n: (p1 if rng.random() < 0.5 else p2)[n] for n in names}
            else:
                p = rng.choice(parents)
                c = {
                    n: (rng.randrange(s) if rng.random() < cfg.mutate_p else p[n])
                    for n, s in zip(names, sizes)
                }
            if key(c) in {key(q) for q in parents + children}:
                continue
            if math.isfinite(fitness(c)):
                children.append(c)
        pop = parents + children
        best = min(pop, key=fitness) if pop else None
        log.append(
            {
                "generation": gen,
                "evaluated": len(cache),
                "best_score": fitness(best) if best else None,
                "best": _labels(net, best) if best else None,
            }
        )
    ranked = sorted(
        ((v, dict(zip(names, k))) for k, v in cache.items() if math.isfinite(v)),
        key=lambda t: t[0],
    )
    return ranked, log


def most_probable_feasible(
    net: SuperNet, constraints: list[Constraint], latency: LatencyModel | None, seed: int
) -> dict[str, int] | None:
    """The most probable architecture meeting the pre-training constraints (exhaustive over
    up to 4096 architectures, else over 512 samples of the distribution)."""
    pre = [c for c in constraints if c.metric in HW_METRICS]
    space = math.prod(len(d.values) for d in net.decisions)
    if space <= 4096:
        cands = net.arch_space()
    else:
        g = torch.Generator().manual_seed(seed)
        probs = net.probs()
        cands = []
        for _ in range(512):
            cands.append(
                {
                    d.name: int(torch.multinomial(p.detach(), 1, generator=g))
                    for d, p in zip(net.decisions, probs)
                }
            )
    cands.sort(key=lambda a: -_log_prob(net, a))
    for a in cands[:256]:
        if _feasible(pre, _arch_cost(net, a, latency)):
            return a
    return None


# -- the searchers --------------------------------------------------------------------------
class OneShotSearcher(Searcher):
    """A one-shot search (module docstring): one supernet trained in this process, the
    architectures it picks retrained as trials of the study.

    Options: the fields of :class:`OneShotConfig` (``relax`` too for DARTS).

    Raises:
        SearchError: (constructor) an option it does not take or a bad value:
            ``supernet_steps`` out of range, an unknown ``latency_model``, ``held`` not a
            mapping.
    """

    family = "one-shot"
    options = frozenset(f.name for f in fields(OneShotConfig))
    #: ``darts`` or ``spos`` (how the supernet trains and how architectures are chosen)
    method: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        knobs = {k: v for k, v in options.items() if k != "relax" and v is not None}
        self.config = OneShotConfig(**knobs)
        self.relax = "softmax"
        check_option_bounds(supernet_steps=self.config.supernet_steps)
        if self.config.latency_model not in ("auto", "predictor", "flops"):
            raise SearchError(
                f"unknown latency_model '{self.config.latency_model}'",
                hint="auto, predictor or flops",
            )
        if self.config.held is not None and not isinstance(self.config.held, dict):
            raise SearchError("held must be a mapping {decision name: value}")
        self.net: SuperNet | None = None
        self.task: Any = None

    @property
    def label(self) -> str:
        """What each retrained trial records as its ``searcher`` (``darts-softmax``)."""
        return self.method

    def section_overrides(self) -> dict[str, Any]:
        # one process retrains the picks one by one, in the order chosen: no pruning
        return {"pruner": "none", "workers": 1}

    def prepare(self, spec: Spec, section: SearchSection) -> TrainSection:
        """Build the supernet (seeded with ``search.seed``) and check the task can train its
        reference model, before anything is written.

        Returns:
            the reference spec's ``train:`` section (its search nodes held).

        Raises:
            SearchError: nothing a supernet can search, a block with too many
                configurations, a bad ``held`` entry. TaskError: the task cannot train the
                spec's model.
        """
        from archir.tasks.base import get_task

        torch.manual_seed(section.seed)
        self.net = build_supernet(spec, held=self.config.held)
        ref = self.net.ref_spec
        train = ref.model.train
        self.task = get_task(train.task, train.task_options)
        self.task.check_model(ref.model.model)
        return train

    def record(self) -> dict[str, Any]:
        assert self.net is not None
        return {"held": self.net.held_doc()}

    def search(
        self,
        run: RunPlan,
        study: optuna.Study,
        *,
        export: bool,
        say: Callable[[str], None],
    ) -> SearchResult:
        """Train the supernet, choose architectures, retrain each as a trial of ``study``,
        then the front; writes ``arch_weights.json`` and ``oneshot.json``.

        Returns:
            the front and the best trial; ``extra``: ``method``, ``relax``, ``trials``
            (the retrained ones: ``trial``, ``status``, ``values``, ``how``),
            ``not_retrained``, ``arch_weights`` (final probabilities per decision),
            ``chosen``, ``collapse``, ``held``, ``latency``, ``supernet`` (weights, steps,
            planned_steps, stopped, step_time_s, max_rss_mb, rss_growth_mb) and ``cpu_s``
            per phase (supernet, select, retrain, total).

        Raises:
            SearchError: the supernet's loss diverged, SPOS found no sub-network meeting
                the constraints, ``latency_model='predictor'`` without a calibration.
        """
        from archir.paths import write_text
        from searchers.pareto import finalize
        from searchers.run import Evaluator, TrialFailed

        assert self.net is not None, "prepare() runs first"
        net, task, ocfg, method, relax = self.net, self.task, self.config, self.method, self.relax
        cfg, sec = run.cfg, run.section
        seed = sec.seed
        cpu0, wall0 = time.process_time(), time.perf_counter()
        deadline = None
        if sec.budget.timeout_s is not None:
            deadline = wall0 + float(sec.budget.timeout_s)
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
        study.pruner = optuna.pruners.NopPruner()
        held_doc = net.held_doc()
        if held_doc:
            say(
                "held decisions (not searched by the supernet; set with held={name: value}): "
                + ", ".join(
                    f"{k} = {v['label']} ({v['source']}; allowed {v['allowed']})"
                    for k, v in held_doc.items()
                )
            )
        trial_cfg = trial_train_cfg(cfg)
        if trial_cfg.threads:
            torch.set_num_threads(trial_cfg.threads)
        n_steps = ocfg.supernet_steps or max(10, sec.budget.trials * trial_cfg.steps // 2)
        if ocfg.supernet_steps is None and method == "spos":
            n_steps *= 2
        constraints, objectives = run.constraints, run.objectives

        # -- latency estimate (calibrated predictor, else FLOPs) -----------------------------
        latency: LatencyModel | None = None
        used = {c.metric for c in constraints} | {o.metric for o in objectives}
        if "latency_ms" in used:
            latency = make_latency_model(net, sec, trial_cfg.seq_len, ocfg)
            if latency.source == "predictor":
                say(
                    f"latency: calibrated predictor ({latency.info['calibration']}, "
                    f"{latency.info['runtime']}, {latency.info['threads']} thread(s))"
                )
            else:
                say(
                    f"latency: FLOPs x {latency.ms_per_flop:.3g} ms/FLOP measured on the "
                    f"reference model (no calibrated predictor: {latency.info['reason']})"
                )

        # -- supernet -------------------------------------------------------------------------
        darts = method == "darts"
        hw = HardwareLoss(net, constraints, objectives, ocfg, latency) if darts else None
        guard = (
            CollapseGuard(net, ocfg.guard_threshold, ocfg.guard_beta, ocfg.guard_max_triggers)
            if darts and ocfg.guard
            else None
        )
        say(
            f"supernet: {len(net.decisions)} decisions, "
            f"{sum(p.numel() for p in net.weight_parameters())} weights, {n_steps} steps "
            f"({method}" + (f", {relax}" if darts else "") + ")"
        )
        rss0 = _max_rss_mb()
        cpu_s0 = time.process_time()
        log = train_supernet(
            net, task, trial_cfg, method, relax, n_steps, ocfg, hw, guard, seed, deadline
        )
        if log.get("stopped"):
            say(f"supernet training stopped after {log['steps_run']} steps: {log['stopped']}")
        cpu_supernet = time.process_time() - cpu_s0

        # -- choose architectures ------------------------------------------------------------
        cpu_s0 = time.process_time()
        finals: list[tuple[dict[str, int], dict[str, Any]]] = []
        evo_log: list[dict[str, Any]] = []
        if darts:
            a = net.argmax()
            finals.append((a, {"how": "argmax", "log_prob": _log_prob(net, a)}))
            pre = [c for c in constraints if c.metric in HW_METRICS]
            if pre and not _feasible(pre, _arch_cost(net, a, latency)):
                r = most_probable_feasible(net, constraints, latency, seed)
                if r is not None and r != a:
                    finals.append((r, {"how": "repaired", "log_prob": _log_prob(net, r)}))
        else:
            seq_len = min(trial_cfg.seq_len, net.spec.model.max_seq_len)
            vs = _val_stream(task, trial_cfg.batch_size, seq_len, seed)
            batches = [next(vs) for _ in range(ocfg.eval_batches)]
            ranked, evo_log = spos_evolve(
                net, task, batches, constraints, ocfg, seed, latency, deadline
            )
            if not ranked:
                raise SearchError(
                    "SPOS evolution found no sub-network meeting the constraints",
                    hint="loosen search.constraints",
                )
            for score, arch in ranked[: ocfg.n_final]:
                finals.append((arch, {"how": "evolution", "supernet_val_loss": score}))
        cpu_select = time.process_time() - cpu_s0

        # -- arch weights --------------------------------------------------------------------
        sdesc = net.describe()
        lat_doc = latency.info if latency is not None else {"source": None, "reason": "not used"}
        doc: dict[str, Any] = {
            "method": method,
            "relax": relax if darts else None,
            "decisions": _weights_doc(net),
            "held": held_doc,
            "latency": lat_doc,
            "supernet": sdesc,
            "training": log,
            "collapse": {
                "guard": bool(guard),
                "threshold": ocfg.guard_threshold,
                "triggered": bool(guard and guard.events),
                "events": guard.events if guard else [],
                "frozen": bool(guard and guard.frozen),
            },
            "evolution": evo_log,
            "chosen": [{"arch": _labels(net, a), **info} for a, info in finals],
            "config": asdict(ocfg),
        }
        write_text(run.run_dir / "arch_weights.json", json.dumps(doc, indent=2, default=str))

        # -- retrain and record each as a trial ----------------------------------------------
        cpu_s0 = time.process_time()
        evaluator = Evaluator(cfg, run.spec)
        evaluator._task = task
        numbers = []
        skipped = []
        for k, (arch, info) in enumerate(finals):
            if k > 0 and deadline is not None and time.perf_counter() > deadline:
                skipped.append(info["how"])
                continue
            fixed = net.fix(arch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study.enqueue_trial(
                    dict(fixed.decisions),
                    user_attrs={"searcher": self.label, "oneshot": info["how"]},
                    skip_if_exists=False,
                )
            study.optimize(evaluator, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
            t = study.trials[-1]
            numbers.append(t.number)
            say(
                f"trial {t.number} ({info['how']}): {trial_attrs(t).get('status')} "
                f"{trial_attrs(t).get('values', {})}"
            )
        if skipped:
            say(
                f"timeout: {len(skipped)} chosen architecture(s) not retrained "
                f"({', '.join(skipped)})"
            )
        cpu_retrain = time.process_time() - cpu_s0
        result = finalize(cfg, objectives, constraints, export=export, say=say)
        arch_weights = {k: v["probs"] for k, v in doc["decisions"].items()}
        best = result.best
        if best is not None and (run.run_dir / "best").exists():
            rep_path = run.run_dir / "best" / "report.json"
            rep = json.loads(rep_path.read_text()) if rep_path.exists() else {}
            rep["oneshot"] = {
                "method": method,
                "relax": doc["relax"],
                "arch_weights": arch_weights,
                "collapse": doc["collapse"],
                "held": held_doc,
                "latency": lat_doc,
            }
            write_text(rep_path, json.dumps(rep, indent=2, default=str))
        trial_rows = []
        for n in numbers:
            t = study.trials[n]
            trial_rows.append(
                {
                    "trial": n,
                    "status": trial_attrs(t).get("status", t.state.name.lower()),
                    "values": trial_attrs(t).get("values", {}),
                    "how": trial_attrs(t).get("oneshot"),
                }
            )
        result.extra = {
            "method": method,
            "relax": doc["relax"],
            "trials": trial_rows,
            "not_retrained": skipped,
            "arch_weights": arch_weights,
            "chosen": doc["chosen"],
            "collapse": doc["collapse"],
            "held": held_doc,
            "latency": lat_doc,
            "supernet": {
                "weights": sdesc["params"],
                "steps": log["steps_run"],
                "planned_steps": n_steps,
                "stopped": log.get("stopped"),
                "step_time_s": log["step_time_s"],
                "max_rss_mb": _max_rss_mb(),
                "rss_growth_mb": _max_rss_mb() - rss0,
            },
            "cpu_s": {
                "supernet": cpu_supernet,
                "select": cpu_select,
                "retrain": cpu_retrain,
                "total": time.process_time() - cpu0,
            },
        }
        summary = {
            "run_dir": str(run.run_dir),
            "storage": result.storage,
            "study": run.study_name,
            "best": best,
            **result.extra,
            "wall_s": time.perf_counter() - wall0,
        }
        write_text(run.run_dir / "oneshot.json", json.dumps(summary, indent=2, default=str))
        return result

    @classmethod
    def summary(cls, result: SearchResult) -> list[str]:
        weights = ", ".join(
            f"{name}: " + "/".join(f"{p:.2f}" for p in probs)
            for name, probs in result.extra.get("arch_weights", {}).items()
        )
        lines = [f"final architecture weights: {weights}"]
        collapse = result.extra.get("collapse") or {}
        if collapse.get("triggered"):
            lines.append(f"collapse guard triggered: {collapse.get('events')}")
        best = result.best or {}
        lines.append(
            f"{cls.name} search finished in {result.wall_s:.1f} s: {result.run_dir} "
            f"(best trial: {best.get('trial', '-')})"
        )
        return lines


class DartsSearcher(OneShotSearcher):
    """First-order DARTS (``relax="softmax"``, default) or GDAS (``relax="gumbel"``) with
    the hardware-aware loss and the collapse guard (module docstring).

    Raises:
        SearchError: (constructor) ``relax`` is not ``softmax`` or ``gumbel``; see
            :class:`OneShotSearcher`.
    """

    name = "darts"
    method = "darts"
    options = OneShotSearcher.options | {"relax"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        relax = options.get("relax")
        if relax is not None:
            if relax not in ("softmax", "gumbel"):
                raise SearchError(f"unknown relaxation '{relax}'", hint="softmax or gumbel")
            self.relax = relax

    @property
    def label(self) -> str:
        return f"darts-{self.relax}"

    def record(self) -> dict[str, Any]:
        return {**super().record(), "relax": self.relax}


class SposSearcher(OneShotSearcher):
    """Single-path one-shot: uniform path sampling, then :func:`spos_evolve` over the
    supernet's sub-networks (module docstring)."""

    name = "spos"
    method = "spos"
