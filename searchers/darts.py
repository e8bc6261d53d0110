"""One-shot architecture search: DARTS, GDAS-style Gumbel sampling and SPOS (DESIGN.md §7).

``run_oneshot(spec, run_dir, method=..., relax=...)`` trains one supernet
(:mod:`searchers.supernet`) holding every candidate of the spec's open choices, picks
architectures from it, retrains each from scratch at the search's trial budget, and records
them in the same run folder and Optuna study as every other search (DESIGN.md §9):
``spec.yaml``, ``run.json``, ``study.journal``, ``trials/<n>/{spec.yaml, metrics.json}``,
``pareto.json``/``pareto.png``, ``best/{spec.yaml, model.safetensors, report.json}`` — plus
``arch_weights.json`` (final architecture distribution, history, collapse-guard events).

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
    path per step; then an evolutionary search (``population``, ``generations``, mutation and
    crossover) scores sub-networks by validation loss with inherited weights; candidates
    that break a pre-training constraint (exact cost of their fixed spec) are never kept.

Hardware-aware loss
-------------------
The architecture loss adds, for each constraint of ``search.constraints`` on a cost metric
(``params``, ``flops_per_token``, ``state_bytes``, ``weight_bytes``, ``weight_bits_avg``,
``latency_ms``), ``hw_weight · relu(E[m] / (bound·(1-margin)) - 1)`` (mirrored for ``>=``),
and for each cost *objective* ``obj_weight · E[m] / m_ref``. ``E[m]`` is the expectation under
``softmax(alpha)`` of the exact per-candidate cost rows (registry cost rules through
``archir.cost.node_cost``).

``latency_ms`` (:class:`LatencyModel`) comes from the calibrated latency predictor of
:mod:`exporters.latency` when a calibration matches this machine, the runtime and the
thread count of ``search.latency`` (``latency_calibration`` names a file explicitly): every
block candidate gets its own predicted milliseconds (the predictor's per-node sum of parts on
the candidate's IR node at ``[search.latency.batch, search.latency.seq_len]``), the other
nodes a constant, and the predictor's map from sum of parts to whole-model milliseconds
enters as the affine fit ``a · Σ + b`` over every candidate graph's prediction — so
``E[latency]`` is the predictor's own value at every one-hot distribution when that map is
affine (the per-part predictor's composition stage is). Discrete
architectures (repair, SPOS feasibility) use the predictor's full prediction of their fixed
spec. Without a calibration (or with ``latency_model="flops"``) the fallback is
``E[flops] · (ms per FLOP)``, the ratio measured once on the reference model with the
search's latency settings (measured with :func:`exporters.latency.latency_ms`). Which one
ran is printed and recorded (``arch_weights.json`` → ``latency``). ``search.latency.predict:
true`` requires the predictor, ``false`` forces the FLOPs fallback; the runtime is
``search.latency.runtime`` (``latency_runtime`` overrides it; ``torch`` when the section has
none) — the same runtime the trials' latency uses.

Held decisions
--------------
Decisions outside blocks (``d_model``, a group's ``residual``, ``train.*`` ...) are not
searched by the supernet (:mod:`searchers.supernet`): they are held at the value given in
``held={name: value}`` or else at their default (first option of a choice, low end of an
int range, middle of a float range). The run prints them at the start and records them in
``arch_weights.json`` and ``oneshot.json`` (``held``).

Collapse guard
--------------
DARTS tends to let parameter-free candidates (``identity``) win because they make the
supernet train fastest early on (Zela et al., 2020, "Understanding and Robustifying
Differentiable Architecture Search"; Liang et al., 2019, "DARTS+"). After every architecture
step the guard measures, for each decision with both parameter-free and parametric values,
the probability mass on the parameter-free ones. Above ``guard_threshold`` it triggers:
(1) ``alpha`` is rolled back to the last snapshot in which no decision was dominated;
(2) a penalty ``beta · Σ P(parameter-free)`` joins the architecture loss (``beta`` starts at
``guard_beta`` and doubles at every further trigger); (3) after ``guard_max_triggers``
triggers the architecture weights are frozen at that snapshot (early stopping, as in
DARTS+). Every trigger is recorded in ``arch_weights.json`` (``collapse``). Depth decisions
are not guarded (fewer layers may be the right answer under a size constraint).

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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import torch

from archir.errors import ArchirError, SearchError
from archir.spec.loader import Spec, load_spec
from archir.spec.sections import SearchSection, TrainSection
from searchers.objectives import COST_METRICS, Constraint, Objective, trial_attrs
from searchers.supernet import SuperNet, build_supernet

HW_METRICS = frozenset(COST_METRICS) | {"latency_ms"}


@dataclass
class OneShotConfig:
    """Knobs of a one-shot search (keyword arguments of :func:`run_oneshot`).

    Attributes:
        steps: supernet training steps (default: ``max(10, trials · trial_steps / 2)`` for
            DARTS, twice that for SPOS, i.e. about the CPU of the trial budget).
        trials: the trial budget the supernet is sized to (overrides
            ``search.budget.trials``; only used when ``steps`` is not given). The number of
            architectures retrained is ``n_final``.
        timeout_s: wall-clock budget in seconds (overrides ``search.budget.timeout_s``):
            supernet training and the SPOS evolution stop when it is spent (at least one
            step / the first generation run), and after the first retrained architecture no
            further one starts.
        fidelity: retraining fidelity of the chosen architectures (``cost``, ``proxy``,
            ``full``; overrides ``search.fidelity.kind``).
        trial_steps: retraining steps at proxy fidelity (overrides
            ``search.fidelity.steps``; a ``full`` fidelity becomes ``proxy``).
        storage: an Optuna storage URL (default: ``<run_dir>/study.journal``).
        study: study name (default: the spec's name).
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
        hw_weight, hw_margin, obj_weight: hardware-aware loss (module docstring).
        guard, guard_threshold, guard_beta, guard_max_triggers: collapse guard.
        population, generations, mutate_p, eval_batches: SPOS evolution.
        n_final: architectures retrained (SPOS: the best feasible ones).
        export: write ``best/model.onnx`` (parity-checked) at the end.
        log_every: supernet history interval (steps).
    """

    steps: int | None = None
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
    export: bool = False
    log_every: int = 10
    trials: int | None = None
    timeout_s: float | None = None
    fidelity: str | None = None
    trial_steps: int | None = None
    storage: str | None = None
    study: str | None = None
    held: dict[str, Any] | None = None
    latency_model: str = "auto"
    latency_runtime: str | None = None
    latency_calibration: str | None = None


# -- latency ----------------------------------------------------------------------------------
@dataclass
class LatencyModel:
    """How ``latency_ms`` of relaxed and discrete architectures is estimated (module
    docstring).

    Attributes:
        source: ``"predictor"`` (calibrated predictor) or ``"flops"`` (ms per FLOP).
        info: what to record: calibration file, runtime, threads, or the fallback's reason.
        ms_per_flop: the FLOPs fallback's ratio.
        predictor: the :class:`exporters.latency.LatencyPredictor`.
        batch, seq: input shape of the prediction.
        rows: predicted ms of every candidate of every block row (``SuperNet.block_rows``),
            times the composition slope ``a``.
        const_ms: ``a`` × the predicted ms of the parts outside blocks, plus ``b``.
    """

    source: str
    info: dict[str, Any]
    ms_per_flop: float | None = None
    predictor: Any = None
    batch: int = 1
    seq: int = 1
    rows: list[list[float]] = field(default_factory=list)
    const_ms: float = 0.0

    def expected(
        self, net: SuperNet, costs: dict[str, torch.Tensor], probs: list[torch.Tensor] | None
    ) -> torch.Tensor:
        """``E[latency_ms]`` under the distribution (differentiable in ``alpha``)."""
        if self.source == "predictor":
            return net.expected_sum(self.rows, self.const_ms, probs)
        assert self.ms_per_flop is not None
        return costs["flops_per_token"] * self.ms_per_flop

    def of_spec(self, spec: Spec, flops_per_token: float) -> float:
        """Latency of one concrete spec in milliseconds."""
        if self.source == "predictor":
            from exporters.latency import graph_features

            return float(self.predictor.predict(graph_features(spec, self.batch, self.seq)).ms)
        assert self.ms_per_flop is not None
        return flops_per_token * self.ms_per_flop


def load_predictor(runtime: str, threads: int, calibration: str | None) -> tuple[Any, str]:
    """The calibrated predictor for ``runtime``/``threads`` on this machine (or from the
    ``calibration`` file) and the file's path.

    Raises:
        exporters.latency.CalibrationError: no calibration, or one that does not match.
    """
    from exporters.latency import CalibrationMissingError, load_calibration
    from exporters.latency.calibrate import default_path, find_calibration, predictor_from

    path = Path(calibration) if calibration else find_calibration(runtime, threads)
    if path is None:
        raise CalibrationMissingError(
            f"no latency calibration for runtime '{runtime}' with {threads} thread(s) on this "
            f"machine (looked for {default_path(runtime, threads)})"
        )
    return predictor_from(load_calibration(path, runtime=runtime, threads=threads)), str(path)


def _affine(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``ms = a · sum_of_parts + b`` through ``(sum_of_parts, ms)`` points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 1e-12 * max(1.0, mx * mx):
        return (my / mx if mx > 0 else 1.0), 0.0
    a = sum((x - mx) * (y - my) for x, y in points) / sxx
    return a, my - a * mx


def make_latency_model(
    net: SuperNet, sec: SearchSection, seq_len: int, cfg: OneShotConfig
) -> LatencyModel:
    """The calibrated predictor when a calibration matches, else the FLOPs fallback.

    Per candidate ``c`` of block node ``n``: the predictor's ``per_node_ms[n]`` on the
    candidate's configuration graph. Constant: the reference graph's sum of parts minus its
    block parts (embedding, final norm, head, merges, intercept). The predictor's map from
    sum of parts to whole-model milliseconds is fitted as ``a · Σ + b`` over every
    configuration graph's prediction (exact for an affine composition stage).

    Raises:
        SearchError: ``latency_model`` is ``predictor`` (or ``search.latency.predict`` is
            true) and no calibration can be used.
    """
    ref = net.ref_spec
    lat = sec.latency
    batch = lat.batch
    seq = min(lat.seq_len or seq_len, ref.model.model.max_seq_len)
    runtime = cfg.latency_runtime or getattr(lat, "runtime", None) or "torch"
    threads = lat.threads
    mode = cfg.latency_model
    sec_predict = getattr(lat, "predict", None)  # search.latency.predict (null/true/false)
    if mode == "auto" and sec_predict is True:
        mode = "predictor"
    reason = "latency_model='flops'"
    if mode == "auto" and sec_predict is False:
        mode, reason = "flops", "search.latency.predict is false"
    if mode != "flops":
        from exporters.latency import CalibrationError, graph_features

        try:
            pred, path = load_predictor(runtime, threads, cfg.latency_calibration)
        except CalibrationError as exc:
            reason = str(exc)
            if mode == "predictor":
                raise SearchError(
                    f"latency_model='predictor' but {reason}",
                    hint=f"run `archir latency calibrate --runtime {runtime} --threads "
                    f"{threads}`, or use latency_model='auto'",
                ) from None
        else:
            cache: dict[int, Any] = {}
            extrap = False

            def predict(g: Any) -> Any:
                nonlocal extrap
                if id(g) not in cache:
                    cache[id(g)] = pred.predict(graph_features(g, batch, seq))
                    extrap = extrap or bool(cache[id(g)].extrapolated)
                return cache[id(g)]

            rows = []
            names = []
            for name, graphs in net.block_rows():
                names.append(name)
                rows.append([float(predict(g).per_node_ms[name]) for g in graphs])
            p_ref = predict(ref)
            const = float(p_ref.sum_of_parts_ms) - sum(p_ref.per_node_ms[n] for n in names)
            points = [(float(p.sum_of_parts_ms), float(p.ms)) for p in cache.values()]
            a, b = _affine(points)
            rows = [[a * v for v in r] for r in rows]
            return LatencyModel(
                "predictor",
                {
                    "source": "predictor",
                    "calibration": path,
                    "runtime": runtime,
                    "threads": threads,
                    "batch": batch,
                    "seq": seq,
                    "extrapolated": extrap,
                    "composition": [a, b],
                    "reference_ms": float(p_ref.ms),
                },
                predictor=pred,
                batch=batch,
                seq=seq,
                rows=rows,
                const_ms=a * const + b,
            )
    from archir.cost import analyze
    from exporters.latency import latency_ms

    rec = latency_ms(
        ref,
        runtime,
        predict=False,
        batch=batch,
        seq=seq,
        threads=threads,
        warmup=lat.warmup,
        min_runs=lat.repeats,
        max_runs=max(lat.repeats, 3 * lat.repeats),
    )
    ms = float(rec["ms"])
    flops = max(1.0, analyze(ref).flops_per_token)
    return LatencyModel(
        "flops",
        {
            "source": "flops",
            "reason": reason,
            "reference_ms": ms,
            "ms_per_flop": ms / flops,
            "runtime": runtime,
            "threads": threads,
            "batch": batch,
            "seq": seq,
        },
        ms_per_flop=ms / flops,
        batch=batch,
        seq=seq,
    )


# -- hardware loss ------------------------------------------------------------------------
class HardwareLoss:
    """``E[cost]`` penalties from the constraints and cost objectives (module docstring)."""

    def __init__(
        self,
        net: SuperNet,
        constraints: list[Constraint],
        objectives: list[Objective],
        cfg: OneShotConfig,
        latency: LatencyModel | None = None,
    ) -> None:
        self.net = net
        self.cons = [c for c in constraints if c.metric in HW_METRICS]
        self.objs = [o for o in objectives if o.metric in HW_METRICS]
        self.cfg = cfg
        self.latency = latency
        with torch.no_grad():
            e0 = self.expected()
        self.ref = {k: max(float(v), 1e-9) for k, v in e0.items()}

    def expected(self, probs: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        e = self.net.expected_costs(probs)
        if self.latency is not None:
            e["latency_ms"] = self.latency.expected(self.net, e, probs)
        return e

    def __call__(self, probs: list[torch.Tensor] | None = None) -> torch.Tensor:
        e = self.expected(probs)
        total = torch.zeros(())
        for c in self.cons:
            if c.metric not in e:
                continue
            v = e[c.metric]
            if c.op in ("<=", "<"):
                total = total + self.cfg.hw_weight * torch.relu(
                    v / (c.bound * (1 - self.cfg.hw_margin)) - 1
                )
            elif c.op in (">=", ">"):
                total = total + self.cfg.hw_weight * torch.relu(
                    1 - v / (c.bound * (1 + self.cfg.hw_margin))
                )
        for o in self.objs:
            if o.metric in e:
                sign = 1.0 if o.direction == "minimize" else -1.0
                total = total + sign * self.cfg.obj_weight * e[o.metric] / self.ref[o.metric]
        return total


# -- collapse guard -----------------------------------------------------------------------
@dataclass
class CollapseGuard:
    """Detects parameter-free dominance and applies the remedy (module docstring)."""

    net: SuperNet
    threshold: float = 0.6
    beta0: float = 0.5
    max_triggers: int = 3
    beta: float = 0.0
    frozen: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    snapshot: list[torch.Tensor] | None = None

    def guarded(self) -> list[int]:
        return [
            i
            for i, d in enumerate(self.net.decisions)
            if any(d.param_free) and not all(d.param_free)
        ]

    def free_mass(self, probs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        out = {}
        for i in self.guarded():
            mask = torch.tensor([1.0 if f else 0.0 for f in self.net.decisions[i].param_free])
            out[i] = (probs[i] * mask).sum()
        return out

    def penalty(self, probs: list[torch.Tensor]) -> torch.Tensor:
        if self.beta <= 0:
            return torch.zeros(())
        mass = self.free_mass(probs)
        total = torch.zeros(())
        for v in mass.values():
            total = total + v
        return self.beta * total

    def check(self, step: int) -> dict[str, Any] | None:
        """Call after an architecture step; returns the event when it triggered."""
        with torch.no_grad():
            mass = self.free_mass(self.net.probs())
        dominated = {
            self.net.decisions[i].name: float(v) for i, v in mass.items() if v > self.threshold
        }
        if not dominated:
            self.snapshot = [a.detach().clone() for a in self.net.alphas]
            return None
        restored = self.snapshot is not None
        if self.snapshot is not None:
            with torch.no_grad():
                for a, s in zip(self.net.alphas, self.snapshot):
                    a.copy_(s)
        self.beta = self.beta0 if self.beta <= 0 else self.beta * 2
        ev: dict[str, Any] = {
            "step": step,
            "dominated": dominated,
            "action": "rolled back alpha" if restored else "no healthy snapshot yet",
            "penalty_beta": self.beta,
        }
        if len(self.events) + 1 >= self.max_triggers:
            self.frozen = True
            ev["action"] += "; architecture weights frozen (early stop)"
        self.events.append(ev)
        return ev


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


def evolve(
    net: SuperNet,
    task: Any,
    batches: list[Any],
    constraints: list[Constraint],
    cfg: OneShotConfig,
    seed: int,
    latency: LatencyModel | None,
    deadline: float | None = None,
) -> tuple[list[tuple[float, dict[str, int]]], list[dict[str, Any]]]:
    """SPOS evolutionary search. Returns ``[(score, arch)]`` best first and a log.
    ``deadline`` (``time.perf_counter()``): no generation starts after it."""
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


# -- the entry point ------------------------------------------------------------------------
def run_oneshot(
    spec: Spec | str | Path,
    run_dir: str | Path,
    method: str = "darts",
    relax: str = "softmax",
    seed: int = 0,
    steps: int | None = None,
    *,
    say: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """One-shot search of an open spec; writes the run folder (module docstring).

    Args:
        spec: an open spec (or its path) with a ``search:`` section.
        run_dir: the run folder (created; an existing study of the same name is extended).
        method: ``darts`` (first-order DARTS / GDAS) or ``spos``.
        relax: ``softmax`` (DARTS) or ``gumbel`` (GDAS); ignored by SPOS.
        seed: seeds the supernet, the path sampling and the evolution.
        steps: supernet training steps (see :class:`OneShotConfig`).
        say: progress printer (``str -> None``).
        options: other :class:`OneShotConfig` fields, e.g. ``storage``, ``study``,
            ``trials``, ``timeout_s``, ``fidelity``, ``trial_steps``, ``export``, ``held``,
            ``n_final``, ``latency_model``.

    Returns:
        A summary: ``best`` (trial row), ``trials``, ``arch_weights``, ``collapse``,
        ``held``, ``latency``, ``supernet`` (params, step time, memory), ``cpu_s`` per phase,
        ``run_dir``, ``storage``, ``study``.

    Raises:
        SearchError: unknown method/relax/option, a bad option value, nothing searchable,
            a block with too many configurations, a run folder of another study or not made
            by archir, a study of that name over another space, objectives or training
            budget, or an unreachable storage. SpecError: the spec is invalid. PathError: a
            name that is not one, a ``run_dir`` where no folder can be written. Nothing this
            call did not create is removed: when it fails, what it created is.
    """
    from archir.paths import Created

    created = Created()  # what this call makes: removed again if it fails
    try:
        return _run_oneshot(
            spec, run_dir, method, relax, seed, steps, say=say, created=created, **options
        )
    except ArchirError:
        created.undo()
        raise


def _run_oneshot(
    spec: Spec | str | Path,
    run_dir: str | Path,
    method: str,
    relax: str,
    seed: int,
    steps: int | None,
    *,
    say: Any,
    created: Any,
    **options: Any,
) -> dict[str, Any]:
    """:func:`run_oneshot`; what it creates is recorded in ``created``."""
    from archir.paths import write_text
    from searchers.config import check_option_bounds, fidelity_signature
    from searchers.pareto import finalize
    from searchers.run import (
        Evaluator,
        SearchConfig,
        TrialFailed,
        _objectives,
        _silence,
        check_run_folder,
        check_study,
        create_or_load_study,
        open_storage,
        run_location,
        trial_train_cfg,
        write_run_files,
    )
    from searchers.space import space_hash

    _silence()
    say = say or (lambda s: None)
    if method not in ("darts", "spos"):
        raise SearchError(f"unknown one-shot method '{method}'", hint="darts or spos")
    if relax not in ("softmax", "gumbel"):
        raise SearchError(f"unknown relaxation '{relax}'", hint="softmax or gumbel")
    known = {f.name for f in fields(OneShotConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise SearchError(f"unknown one-shot option '{bad[0]}'", hint=", ".join(sorted(known)))
    options = {k: v for k, v in options.items() if v is not None}
    ocfg = OneShotConfig(**options)
    if steps is not None:
        ocfg.steps = steps
    if ocfg.latency_model not in ("auto", "predictor", "flops"):
        raise SearchError(
            f"unknown latency_model '{ocfg.latency_model}'", hint="auto, predictor or flops"
        )
    if ocfg.held is not None and not isinstance(ocfg.held, dict):
        raise SearchError("held must be a mapping {decision name: value}")
    if isinstance(spec, str | Path):
        spec = load_spec(spec)
    if spec.is_concrete:
        raise SearchError(f"spec '{spec.name}' has no search nodes: nothing to search")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    deadline = None

    # -- configuration, exactly as run_search builds it -----------------------------------
    check_option_bounds(
        trials=ocfg.trials,
        steps=ocfg.trial_steps,
        supernet_steps=ocfg.steps,
        seed=seed,
        timeout_s=ocfg.timeout_s,
    )
    run_dir, study_name = run_location(spec, run_dir, ocfg.study)
    searcher = method if method == "spos" else f"darts-{relax}"
    torch.manual_seed(seed)
    net = build_supernet(spec, held=ocfg.held)
    ref = net.ref_spec
    sec = ref.model.search or SearchSection.model_validate(spec.data.get("search") or {})
    upd: dict[str, Any] = {"pruner": "none", "seed": seed}
    fid = sec.fidelity.model_dump()
    if ocfg.fidelity is not None:
        fid["kind"] = ocfg.fidelity
    if ocfg.trial_steps is not None:
        fid["steps"] = ocfg.trial_steps
        if fid["kind"] == "full":
            fid["kind"] = "proxy"
    upd["fidelity"] = fid
    budget = sec.budget.model_dump()
    if ocfg.trials is not None:
        budget["trials"] = ocfg.trials
    if ocfg.timeout_s is not None:
        budget["timeout_s"] = ocfg.timeout_s
    upd["budget"] = budget
    try:
        sec = SearchSection.model_validate({**sec.model_dump(), **upd})
    except Exception as exc:  # pydantic error on an override
        raise SearchError(f"bad one-shot option: {str(exc).splitlines()[-1]}") from None
    if sec.budget.timeout_s is not None:
        deadline = wall0 + float(sec.budget.timeout_s)
    train_sec = ref.model.train
    shash = space_hash(spec.nodes)
    cfg = SearchConfig(
        spec_path=str(run_dir / "spec.yaml"),
        run_dir=str(run_dir),
        storage_url=ocfg.storage,
        study_name=study_name,
        search=sec.model_dump(),
        train=train_sec.model_dump(),
        space_hash=shash,
        trials=ocfg.n_final,
        timeout_s=sec.budget.timeout_s,
        workers=1,
    )
    objectives, constraints, _ = _objectives(cfg)
    trial_cfg = trial_train_cfg(cfg)
    fid_sig = fidelity_signature(cfg)
    # the run folder and the study are checked (the shared set-up of searchers.run) before
    # anything is written or trained; a failure removes only what this call created
    check_run_folder(run_dir, study_name, shash, ocfg.storage)
    if ocfg.storage is not None or cfg.journal.exists():
        check_study(
            open_storage(ocfg.storage, cfg.journal, say=say), study_name, shash, objectives, fid_sig
        )
    created.mkdir(run_dir)
    if ocfg.storage is None and not cfg.journal.exists():
        created.file(cfg.journal)
    storage = open_storage(ocfg.storage, cfg.journal, say=say)
    held_doc = net.held_doc()
    write_run_files(
        run_dir,
        created,
        spec=spec,
        spec_file=str(spec.file or run_dir / "spec.yaml"),
        spec_text=spec.to_yaml(),
        study=study_name,
        storage=ocfg.storage,
        shash=shash,
        objectives=objectives,
        constraints=constraints,
        section=sec,
        fidelity=fid_sig,
        searcher=searcher,
        held=held_doc,
    )
    study = create_or_load_study(
        storage,
        study_name,
        spec,
        shash,
        objectives,
        constraints,
        fid_sig,
        sampler=optuna.samplers.RandomSampler(seed=seed),
        pruner=optuna.pruners.NopPruner(),
    )
    created.mkdir(run_dir / "trials")
    if held_doc:
        say(
            "held decisions (not searched by the supernet; set with held={name: value}): "
            + ", ".join(
                f"{k} = {v['label']} ({v['source']}; allowed {v['allowed']})"
                for k, v in held_doc.items()
            )
        )
    from archir.tasks.base import get_task

    task = get_task(train_sec.task, train_sec.task_options)
    task.check_model(ref.model.model)
    if trial_cfg.threads:
        torch.set_num_threads(trial_cfg.threads)
    trial_steps = trial_cfg.steps
    n_steps = ocfg.steps or max(10, sec.budget.trials * trial_steps // 2)
    if ocfg.steps is None and method == "spos":
        n_steps *= 2

    # -- latency estimate (calibrated predictor, else FLOPs) ---------------------------------
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
                f"latency: FLOPs x {latency.ms_per_flop:.3g} ms/FLOP measured on the reference "
                f"model (no calibrated predictor: {latency.info['reason']})"
            )

    # -- supernet -----------------------------------------------------------------------------
    hw = HardwareLoss(net, constraints, objectives, ocfg, latency) if method == "darts" else None
    guard = (
        CollapseGuard(net, ocfg.guard_threshold, ocfg.guard_beta, ocfg.guard_max_triggers)
        if method == "darts" and ocfg.guard
        else None
    )
    say(
        f"supernet: {len(net.decisions)} decisions, "
        f"{sum(p.numel() for p in net.weight_parameters())} weights, {n_steps} steps ({method}"
        + (f", {relax}" if method == "darts" else "")
        + ")"
    )
    rss0 = _max_rss_mb()
    cpu_s0 = time.process_time()
    log = train_supernet(
        net, task, trial_cfg, method, relax, n_steps, ocfg, hw, guard, seed, deadline
    )
    if log.get("stopped"):
        say(f"supernet training stopped after {log['steps_run']} steps: {log['stopped']}")
    cpu_supernet = time.process_time() - cpu_s0

    # -- choose architectures --------------------------------------------------------------
    cpu_s0 = time.process_time()
    finals: list[tuple[dict[str, int], dict[str, Any]]] = []
    evo_log: list[dict[str, Any]] = []
    if method == "darts":
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
        ranked, evo_log = evolve(net, task, batches, constraints, ocfg, seed, latency, deadline)
        if not ranked:
            raise SearchError(
                "SPOS evolution found no sub-network meeting the constraints",
                hint="loosen search.constraints",
            )
        for score, arch in ranked[: ocfg.n_final]:
            finals.append((arch, {"how": "evolution", "supernet_val_loss": score}))
    cpu_select = time.process_time() - cpu_s0

    # -- arch weights --------------------------------------------------------------------------
    sdesc = net.describe()
    lat_doc = latency.info if latency is not None else {"source": None, "reason": "not used"}
    doc: dict[str, Any] = {
        "method": method,
        "relax": relax if method == "darts" else None,
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
    write_text(run_dir / "arch_weights.json", json.dumps(doc, indent=2, default=str))

    # -- retrain and record each as a trial --------------------------------------------------
    cpu_s0 = time.process_time()
    evaluator = Evaluator(cfg, spec)
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
                user_attrs={"searcher": searcher, "oneshot": info["how"]},
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
        say(f"timeout: {len(skipped)} chosen architecture(s) not retrained ({', '.join(skipped)})")
    cpu_retrain = time.process_time() - cpu_s0
    result = finalize(cfg, objectives, constraints, export=ocfg.export, say=say)
    best = result.best
    if best is not None and (run_dir / "best").exists():
        rep_path = run_dir / "best" / "report.json"
        rep = json.loads(rep_path.read_text()) if rep_path.exists() else {}
        rep["oneshot"] = {
            "method": method,
            "relax": doc["relax"],
            "arch_weights": {k: v["probs"] for k, v in doc["decisions"].items()},
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
    out = {
        "method": method,
        "relax": doc["relax"],
        "run_dir": str(run_dir),
        "storage": ocfg.storage or str(cfg.journal),
        "study": study_name,
        "best": best,
        "trials": trial_rows,
        "not_retrained": skipped,
        "arch_weights": {k: v["probs"] for k, v in doc["decisions"].items()},
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
        "wall_s": time.perf_counter() - wall0,
    }
    write_text(run_dir / "oneshot.json", json.dumps(out, indent=2, default=str))
    return out
