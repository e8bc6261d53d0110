"""A calibrated latency predictor: per-node sum of parts plus a learned correction.

Two stages, both fitted on the measurements of a calibration file (:mod:`.calibrate`):

1. **Per-node model (sum of parts).** Every IR node (``archir.ir.build_graph``) of a model
   run at ``[batch, seq]`` gets five shape features from the cost pass (``archir.cost``):

   * ``lin``   — sequence-independent FLOPs × tokens (GEMMs: projections, MLPs, heads), GFLOP;
   * ``quad``  — the sequence-dependent rest of the FLOPs × tokens (attention scores, long
     convolutions, scans), GFLOP;
   * ``act``   — activation elements ``batch·seq·d_model`` (norms, residual adds,
     element-wise ops; memory traffic), millions;
   * ``w``     — weights of the node in millions (weight reads; dominate at short ``seq``);
   * ``one``   — one (per-node dispatch overhead).

   A node's latency is a non-negative linear function of those with coefficients **per
   kind** (attention, swiglu, mamba, ...; kinds × shapes: d_model, seq, heads, state,
   expansion enter through the features), and a model's latency is the sum over nodes plus a
   constant. The coefficients are fitted by non-negative least squares on relative error
   (rows divided by the measured latency). Kinds absent from the calibration borrow the mean
   coefficients of their role and the prediction is marked ``extrapolated``.
2. **Learned correction.** A gradient-boosted tree regressor (scikit-learn
   ``GradientBoostingRegressor``, Friedman 2001) on graph features (log sum of parts, log
   FLOPs, log params, depth, width, seq, batch, bits, per-kind shares of the sum of parts)
   predicts ``log(measured / sum_of_parts)``: what the sum misses (fusion, cache effects,
   thread start-up).

**Uncertainty band**: the 5th and 95th percentiles of the out-of-fold (5-fold) ratios
``measured / predicted`` scale the prediction into ``band_ms = (low, high)``; doubled in log
space for extrapolated kinds or shapes.

Related work: nn-Meter (Zhang et al., 2021) predicts per fused kernel and sums; HELP (Lee et
al., 2021) and LitePred (Feng et al., 2024) learn from graph features. This does both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from archir.cost import node_cost
from archir.ir import Graph, build_graph

FEATURES: tuple[str, ...] = ("lin", "quad", "act", "w", "one")
FEATURE_VERSION = 1
ROLES = ("token_mixer", "channel_mixer", "embedding", "head", "norm", "merge")


@dataclass
class NodeFeatures:
    """Shape features of one IR node at ``[batch, seq]`` (units in :data:`FEATURES` docs)."""

    name: str
    kind: str
    role: str
    x: tuple[float, float, float, float, float]


@dataclass
class GraphFeatures:
    """Everything the predictor needs from one (spec, batch, seq)."""

    nodes: list[NodeFeatures]
    batch: int
    seq: int
    d_model: int
    depth: int
    flops: float  # whole-model forward FLOPs (not per token)
    params: int
    bits_avg: float


def _spec_model(spec: Any) -> Any:
    return spec.model if hasattr(spec, "smap") else spec


def graph_features(spec_or_graph: Any, batch: int, seq: int) -> GraphFeatures:
    """Features of a concrete spec (or built :class:`~archir.ir.Graph`) at ``[batch, seq]``.

    Raises:
        SpecError / GraphError: the spec is open or does not build.
    """
    graph: Graph = spec_or_graph if isinstance(spec_or_graph, Graph) else build_graph(spec_or_graph)
    m = graph.spec.model
    tokens = float(batch * seq)
    rows: list[NodeFeatures] = []
    flops = 0.0
    params = 0
    bits_w = 0.0
    depth = 0
    for node in graph:
        cL = node_cost(node, seq)
        c1 = node_cost(node, 1)
        full_params = cL.params
        if node.weights_of is not None:  # shared weights are still read at run time
            full_params = node_cost(graph[node.weights_of], seq).params
        lin = c1.flops_per_token * tokens / 1e9
        quad = max(0.0, cL.flops_per_token - c1.flops_per_token) * tokens / 1e9
        act = tokens * m.d_model / 1e6
        role = cL.role if node.op != "merge" else "merge"
        kind = node.kind or f"merge_{node.merge}"
        rows.append(NodeFeatures(node.name, kind, role, (lin, quad, act, full_params / 1e6, 1.0)))
        flops += cL.flops_per_token * tokens
        params += cL.params
        bits_w += cL.params * cL.bits
        if node.op == "block" and role == "token_mixer":
            depth += 1
    return GraphFeatures(
        nodes=rows,
        batch=batch,
        seq=seq,
        d_model=m.d_model,
        depth=depth,
        flops=flops,
        params=params,
        bits_avg=bits_w / params if params else 16.0,
    )


def flops_of(spec: Any, batch: int, seq: int) -> float:
    """Whole-model forward FLOPs at ``[batch, seq]`` (the FLOPs-only baseline's input)."""
    return graph_features(spec, batch, seq).flops


@dataclass
class Prediction:
    """A predicted latency (milliseconds).

    Attributes:
        ms: the prediction (sum of parts × learned correction).
        band_ms: ``(low, high)`` 90 % band from out-of-fold calibration errors.
        sum_of_parts_ms: stage-1 prediction alone.
        per_node_ms: stage-1 share of each IR node, by node name.
        extrapolated: a kind or shape outside the calibration (band widened).
    """

    ms: float
    band_ms: tuple[float, float]
    sum_of_parts_ms: float
    per_node_ms: dict[str, float] = field(default_factory=dict)
    extrapolated: bool = False


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    x, _ = nnls(A, b, maxiter=50 * A.shape[1])
    return np.asarray(x)


class LatencyPredictor:
    """Fit on calibration samples, predict milliseconds with a band.

    Usage::

        p = LatencyPredictor().fit(features, measured_ms)
        p.predict(graph_features(spec, 1, 256)).ms
    """

    def __init__(self, *, correction: bool = True, random_state: int = 0) -> None:
        self.correction = correction
        self.random_state = random_state
        self.kinds: list[str] = []
        self.kind_role: dict[str, str] = {}
        self.coef: dict[str, np.ndarray] = {}
        self.intercept = 0.0
        self.gbr: Any = None
        self.band_q: tuple[float, float] = (math.log(0.8), math.log(1.25))
        self.seq_range: tuple[int, int] = (0, 0)
        self.batch_range: tuple[int, int] = (1, 1)
        self.n_samples = 0

    # ---- stage 1 -------------------------------------------------------------------
    def _design(self, feats: Sequence[GraphFeatures]) -> np.ndarray:
        nf = len(FEATURES)
        A = np.zeros((len(feats), 1 + nf * len(self.kinds)))
        index = {k: i for i, k in enumerate(self.kinds)}
        for r, g in enumerate(feats):
            A[r, 0] = 1.0
            for n in g.nodes:
                i = index.get(n.kind)
                if i is not None:
                    A[r, 1 + nf * i : 1 + nf * (i + 1)] += n.x
        return A

    def _coef_for(self, kind: str, role: str) -> tuple[np.ndarray, bool]:
        if kind in self.coef:
            return self.coef[kind], False
        same = [self.coef[k] for k in self.kinds if self.kind_role.get(k) == role]
        pool = same or list(self.coef.values())
        return (np.mean(pool, axis=0) if pool else np.zeros(len(FEATURES))), True

    def sum_of_parts(self, g: GraphFeatures) -> tuple[float, dict[str, float], bool]:
        per: dict[str, float] = {}
        extrap = False
        for n in g.nodes:
            c, ex = self._coef_for(n.kind, n.role)
            extrap = extrap or ex
            per[n.name] = float(np.dot(c, n.x))
        total = self.intercept + sum(per.values())
        return max(total, 1e-6), per, extrap

    # ---- stage 2 -------------------------------------------------------------------
    def _gfeat(self, g: GraphFeatures, sop: float, per: dict[str, float]) -> list[float]:
        share = dict.fromkeys(self.kinds, 0.0)
        role_share = dict.fromkeys(ROLES, 0.0)
        for n in g.nodes:
            v = per.get(n.name, 0.0) / sop
            if n.kind in share:
                share[n.kind] += v
            if n.role in role_share:
                role_share[n.role] += v
        return [
            math.log(sop),
            math.log(max(g.flops, 1.0)),
            math.log(g.params + 1.0),
            float(g.depth),
            math.log(g.d_model),
            math.log(g.seq),
            math.log(g.batch),
            g.bits_avg,
            *role_share.values(),
            *share.values(),
        ]

    def _fit_stages(self, feats: Sequence[GraphFeatures], y: np.ndarray) -> None:
        self.kinds = sorted({n.kind for g in feats for n in g.nodes})
        self.kind_role = {n.kind: n.role for g in feats for n in g.nodes}
        A = self._design(feats)
        w = 1.0 / y
        scale = np.maximum(np.abs(A).max(axis=0), 1e-12)
        x = _nnls((A * w[:, None]) / scale, np.ones_like(y)) / scale
        self.intercept = float(x[0])
        nf = len(FEATURES)
        self.coef = {k: x[1 + nf * i : 1 + nf * (i + 1)] for i, k in enumerate(self.kinds)}
        self.gbr = None
        if self.correction and len(feats) >= 30:
            from sklearn.ensemble import GradientBoostingRegressor

            X, base = [], []
            for g in feats:
                sop, per, _ = self.sum_of_parts(g)
                X.append(self._gfeat(g, sop, per))
                base.append(sop)
            target = np.log(y) - np.log(np.asarray(base))
            self.gbr = GradientBoostingRegressor(
                loss="huber",
                n_estimators=300,
                max_depth=3,
                learning_rate=0.05,
                subsample=0.8,
                min_samples_leaf=5,
                random_state=self.random_state,
            ).fit(np.asarray(X), target)

    def fit(self, feats: Sequence[GraphFeatures], measured_ms: Sequence[float]) -> LatencyPredictor:
        """Fit both stages and the band (5-fold out-of-fold errors).

        Args:
            feats: :func:`graph_features` of every calibration sample.
            measured_ms: their measured (median) latencies in milliseconds.

        Raises:
            ValueError: fewer than 3 samples, or a non-positive latency.
        """
        y = np.asarray(measured_ms, dtype=float)
        if len(feats) < 3 or len(feats) != len(y) or (y <= 0).any():
            raise ValueError("need at least 3 samples with positive latencies")
        self.n_samples = len(feats)
        self.seq_range = (min(g.seq for g in feats), max(g.seq for g in feats))
        self.batch_range = (min(g.batch for g in feats), max(g.batch for g in feats))
        if len(feats) >= 10:
            rng = np.random.default_rng(self.random_state)
            folds = rng.permutation(len(feats)) % 5
            oof = np.zeros(len(feats))
            for f in range(5):
                tr, te = folds != f, folds == f
                sub = LatencyPredictor(correction=self.correction, random_state=self.random_state)
                sub._fit_stages([feats[int(i)] for i in np.flatnonzero(tr)], y[tr])
                for i in np.flatnonzero(te):
                    oof[i] = sub._point(feats[int(i)])[0]
            r = np.log(y) - np.log(np.maximum(oof, 1e-9))
            self.band_q = (float(np.quantile(r, 0.05)), float(np.quantile(r, 0.95)))
        self._fit_stages(feats, y)
        return self

    def _point(self, g: GraphFeatures) -> tuple[float, float, dict[str, float], bool]:
        sop, per, extrap = self.sum_of_parts(g)
        ms = sop
        if self.gbr is not None:
            ms = sop * math.exp(float(self.gbr.predict(np.asarray([self._gfeat(g, sop, per)]))[0]))
        return ms, sop, per, extrap

    def predict(self, g: GraphFeatures) -> Prediction:
        """Predicted latency of one sample (see :class:`Prediction`)."""
        ms, sop, per, extrap = self._point(g)
        lo_s, hi_s = self.seq_range
        lo_b, hi_b = self.batch_range
        extrap = extrap or not (lo_s <= g.seq <= hi_s) or not (lo_b <= g.batch <= hi_b)
        lo, hi = self.band_q
        if extrap:
            lo, hi = 2 * lo - 0.1, 2 * hi + 0.1
        return Prediction(
            ms=ms,
            band_ms=(ms * math.exp(min(lo, 0.0)), ms * math.exp(max(hi, 0.0))),
            sum_of_parts_ms=sop,
            per_node_ms=per,
            extrapolated=extrap,
        )
