"""What the architecture step of a one-shot search adds to its loss (DESIGN.md §7): the
hardware-aware terms, with the latency estimate they need, and the collapse guard's penalty.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from archir.errors import SearchError
from archir.spec.loader import Spec
from archir.spec.sections import SearchSection
from searchers.objectives import COST_METRICS, Constraint, Objective
from searchers.supernet import SuperNet


class LatencyKnobs(Protocol):
    """Which latency estimate to use (:class:`searchers.oneshot.OneShotConfig` has them)."""

    latency_model: str
    latency_runtime: str | None
    latency_calibration: str | None


class LossKnobs(Protocol):
    """Weights of the hardware-aware terms (:class:`searchers.oneshot.OneShotConfig` has
    them): ``hw_weight`` per violated constraint, ``hw_margin`` (a fraction of the bound),
    ``obj_weight`` per cost objective."""

    hw_weight: float
    hw_margin: float
    obj_weight: float


#: the metrics the architecture loss can estimate before training (exact cost rows, latency)
HW_METRICS = frozenset(COST_METRICS) | {"latency_ms"}


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
    net: SuperNet, sec: SearchSection, seq_len: int, cfg: LatencyKnobs
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
        cfg: LossKnobs,
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
