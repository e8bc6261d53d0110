"""The fidelity ladder: asynchronous successive halving for constrained, multi-objective
searches, in which a promoted model continues from its checkpoint.

A search with ``fidelity: {kind: ladder, rungs: [50, 200, 800], eta: 3}`` trains every new
candidate to the first rung (50 optimizer steps). Whenever a worker is free it first looks
for a **promotion**: at rung ``k`` (highest rung first) the models that reached it are
ranked — feasible before infeasible; feasible ones by Pareto rank on the search's objectives
at that rung, ties broken by crowding distance (NSGA-II's, so a promotion keeps the front
spread out); infeasible ones by their total relative constraint violation — and each of the
top ``floor(n_k / eta)`` that has not gone further yet is promoted to rung ``k + 1``. This is
ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning") with Pareto
ranking in place of a scalar; when no new candidate is left to draw, the ladder finishes
what synchronous successive halving would (every rung holds the top ``1/eta`` of the one
below).

A promotion is an Optuna trial of its own (same parameters, system attributes
:data:`ATTR_CONTINUE` — the trial it continues — and :data:`ATTR_RUNG` — the rung it trains
to), so every step of the ladder is recorded, retried when killed and shared between
workers and machines like any trial. It moves the checkpoint folder of the trial it
continues (``trials/<n>/ladder``) into its own and trains only the steps between the rungs
plus the new rung's decay (:func:`archir.train.train_ladder`); where that folder is missing
(another machine trained it, or the search was finalized), it retrains from step 0 with the
same seed and gets the same numbers. Promotions and duplicate models do not count against
``--trials``: the budget is the number of distinct models drawn.

Every trial records ``rungs`` — one dict per rung it reached: ``rung``, ``steps``,
``values`` (every objective and constraint value at that rung), ``violations``, ``se``
(noise estimates such as ``val_bpb_se``) and ``wall_s`` — plus ``rung`` and ``steps`` of its
last one, and the quality metric of each rung as an Optuna intermediate value (step = the
rung's optimizer steps), so optuna-dashboard draws learning curves. The reported front only
compares models at one rung: the highest one any feasible model reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from searchers.objectives import Constraint, Objective, feasible, trial_attrs

#: system attribute of a promotion: the number of the trial whose model it continues
ATTR_CONTINUE = "archir:continue_of"
#: system attribute of a promotion: the rung (index) it trains to
ATTR_RUNG = "archir:rung"


def continues(t: FrozenTrial) -> int | None:
    """The trial number ``t`` continues (a promotion), or None for a newly drawn model."""
    n = t.system_attrs.get(ATTR_CONTINUE)
    return int(n) if n is not None else None


def rungs_of(t: FrozenTrial) -> list[dict[str, Any]]:
    """The rung records of a finished trial (empty without a ladder)."""
    r = trial_attrs(t).get("rungs")
    return r if isinstance(r, list) else []


@dataclass
class Entry:
    """One model at one rung: its trial, its objective values there (each oriented so
    smaller is better) and its total relative constraint violation (0 = feasible)."""

    trial: FrozenTrial
    spec_hash: str
    vector: list[float]
    violation: float


def _entry(
    t: FrozenTrial, rec: dict[str, Any], objectives: list[Objective], constraints: list[Constraint]
) -> Entry | None:
    vals = rec.get("values", {})
    vec = []
    for o in objectives:
        v = vals.get(o.metric)
        if v is None or not math.isfinite(float(v)):
            return None
        vec.append(float(v) if o.direction == "minimize" else -float(v))
    viol = sum(c.relative_violation(float(vals[c.metric])) for c in constraints if c.metric in vals)
    return Entry(t, str(trial_attrs(t).get("spec_hash", t.number)), vec, viol)


def cohorts(
    trials: list[FrozenTrial], objectives: list[Objective], constraints: list[Constraint]
) -> dict[int, dict[str, Entry]]:
    """For each rung, the models that reached it (one entry per distinct model, held by
    the finished trial that stopped at that rung when there is one)."""
    out: dict[int, dict[str, Entry]] = {}
    for t in trials:
        if t.state != TrialState.COMPLETE or trial_attrs(t).get("duplicate_of") is not None:
            continue
        recs = rungs_of(t)
        for i, rec in enumerate(recs):
            e = _entry(t, rec, objectives, constraints)
            if e is None:
                continue
            k = int(rec.get("rung", i))
            have = out.setdefault(k, {}).get(e.spec_hash)
            # the holder of a model's rung-k checkpoint is the trial that stopped there
            if have is None or (len(recs) - 1 == k and len(rungs_of(have.trial)) - 1 != k):
                out[k][e.spec_hash] = e
    return out


def pareto_ranks(vectors: list[list[float]]) -> list[int]:
    """Non-dominated sorting (all objectives minimized): rank 0 is the front, rank 1 the
    front of the rest, and so on."""
    n = len(vectors)
    dominated_by = [0] * n
    dominates: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = vectors[i], vectors[j]
            if all(x <= y for x, y in zip(a, b)) and a != b:
                dominates[i].append(j)
                dominated_by[j] += 1
            elif all(y <= x for x, y in zip(a, b)) and a != b:
                dominates[j].append(i)
                dominated_by[i] += 1
    ranks = [0] * n
    layer = [i for i in range(n) if dominated_by[i] == 0]
    r = 0
    while layer:
        nxt = []
        for i in layer:
            ranks[i] = r
            for j in dominates[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        layer, r = nxt, r + 1
    return ranks


def crowding(vectors: list[list[float]]) -> list[float]:
    """NSGA-II crowding distance within one set of points (ends of each objective: inf)."""
    n = len(vectors)
    dist = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for m in range(len(vectors[0])):
        order = sorted(range(n), key=lambda i: vectors[i][m])
        lo, hi = vectors[order[0]][m], vectors[order[-1]][m]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:]):
            dist[i] += (vectors[b][m] - vectors[a][m]) / (hi - lo)
    return dist


def rank(entries: list[Entry]) -> list[Entry]:
    """Best first: feasible by (Pareto rank, larger crowding distance, objective values in
    the order the spec lists them, trial number), then infeasible by total relative
    violation. The objective values break ties of crowding distance, which the two ends of
    a front always have (both infinite): with one place to fill, the end that is best in the
    first-listed objective goes on. (Before, the lower trial number did: on the main job
    that sent the two fastest, smallest models of a front to the top rung, best 2.181
    instead of 1.94–2.11.)"""
    ok = [e for e in entries if e.violation <= 0]
    bad = sorted(
        (e for e in entries if e.violation > 0), key=lambda e: (e.violation, e.trial.number)
    )
    ranks = pareto_ranks([e.vector for e in ok])
    keyed = []
    for r in sorted(set(ranks)):
        layer = [e for e, q in zip(ok, ranks) if q == r]
        dist = crowding([e.vector for e in layer])
        order = sorted(
            range(len(layer)), key=lambda i: (-dist[i], layer[i].vector, layer[i].trial.number)
        )
        keyed += [layer[i] for i in order]
    return keyed + bad


def promotions(
    trials: list[FrozenTrial],
    objectives: list[Objective],
    constraints: list[Constraint],
    n_rungs: int,
    eta: int,
) -> list[tuple[FrozenTrial, int]]:
    """The promotions due now, highest rung first: ``(trial to continue, rung to reach)``.

    Rung ``k + 1`` may hold ``floor(n_k / eta)`` of the ``n_k`` models that reached rung
    ``k``. While it holds fewer (counting models that went on and promotions that exist as
    trials in any state — waiting, running, finished or failed), the best-ranked models of
    rung ``k`` (:func:`rank`) that have not gone on are due, up to that quota. The quota
    keeps successive halving's counts (30 models at rung 0, at most 10 at rung 1, 3 at rung
    2 with ``eta`` 3): without it a two-objective ranking, whose crowding-distance order
    shifts with every new model, would keep promoting whoever is momentarily in the top
    third, and the top rung would fill up.
    """
    started = {
        (continues(t), t.system_attrs.get(ATTR_RUNG)) for t in trials if continues(t) is not None
    }
    by_rung = cohorts(trials, objectives, constraints)
    reached: dict[str, int] = {}
    for k, at_k in by_rung.items():
        for h in at_k:
            reached[h] = max(reached.get(h, -1), k)
    due = []
    for k in sorted(by_rung, reverse=True):
        if k >= n_rungs - 1:
            continue
        members = list(by_rung[k].values())
        went_on = {e.spec_hash for e in members if reached[e.spec_hash] > k}
        went_on |= {e.spec_hash for e in members if (e.trial.number, k + 1) in started}
        quota = len(members) // eta - len(went_on)
        for e in rank(members):
            if quota <= 0:
                break
            if e.spec_hash in went_on:
                continue
            due.append((e.trial, k + 1))
            quota -= 1
    return due


def top_rung_trials(trials: list[FrozenTrial]) -> tuple[list[FrozenTrial], int | None]:
    """The finished trials at the highest rung any feasible one reached, and that rung
    (None without a ladder: then every trial, as before)."""
    laddered = [t for t in trials if rungs_of(t)]
    if not laddered:
        return trials, None
    ok = [t for t in laddered if feasible(t)]
    top = max(len(rungs_of(t)) - 1 for t in (ok or laddered))
    return [t for t in laddered if len(rungs_of(t)) - 1 == top], top
