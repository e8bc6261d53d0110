"""Pricing the sub-models of one trained MatFormer without training any of them
(Devvrit, Kudugunta et al., 2023, "MatFormer: Nested Transformer for Elastic Inference",
§3.2 Mix'n'Match).

:func:`price_mixes` takes a trained run whose channel mixers are ``matformer`` blocks,
enumerates granularity mixes (one granularity per block; every uniform mix, then every
per-block mix when there are at most ``max_mixes`` in all, else a seeded random sample of
them up to ``max_mixes``), and scores each by

- ``val_bpb`` (the task's headline metric): the nested forward at that mix on the task's
  held-out split — the same numbers the extracted model gives, with no training;
- ``latency_ms``: the extracted concrete spec (plain ``swiglu``/``mlp`` FFNs of the smaller
  width, what ``archir extract`` ships) through :func:`searchers.latency.trial_latency`, the
  function a search trial's latency comes from, under the spec's ``search.latency`` section
  (its defaults when the spec has none);
- ``params``: the extracted spec's exact parameter count (cost pass).

It returns every row and the Pareto front of (metric, latency_ms, params), all minimized.
``archir extract RUN --front`` prints the front.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import torch

#: mixes priced by default (uniform ones included)
DEFAULT_MAX_MIXES = 32


@dataclass
class PricedMix:
    """One sub-model: the granularity of each matformer block and its scores."""

    granularities: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: float = float("nan")
    params: int = 0
    name: str = ""

    def row(self, metric: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "granularities": self.granularities,
            metric: self.metrics.get(metric, float("nan")),
            "latency_ms": self.latency_ms,
            "params": self.params,
        }


def candidate_mixes(
    granularities: list[list[float]], max_mixes: int = DEFAULT_MAX_MIXES, seed: int = 0
) -> list[list[float]]:
    """The mixes to price for blocks with these trained granularities (one list per block,
    the same list for every block after joint training): every uniform mix first, then the
    other per-block mixes — all of them when the total is at most ``max_mixes``, else a
    random sample (``seed``) filling up to ``max_mixes``.

    Raises:
        ValueError: ``max_mixes`` smaller than the number of uniform mixes.
    """
    shared = sorted(set.intersection(*(set(g) for g in granularities)))
    uniform = [[g] * len(granularities) for g in shared]
    if max_mixes < len(uniform):
        raise ValueError(f"max_mixes {max_mixes} is fewer than the {len(uniform)} uniform mixes")
    total = 1
    for g in granularities:
        total *= len(g)
    seen = {tuple(u) for u in uniform}
    out = list(uniform)
    if total <= max_mixes:
        for mix in itertools.product(*granularities):
            if mix not in seen:
                out.append(list(mix))
        return out
    rng = random.Random(seed)
    tries = 0
    while len(out) < max_mixes and tries < 100 * max_mixes:
        tries += 1
        mix = tuple(rng.choice(g) for g in granularities)
        if mix not in seen:
            seen.add(mix)
            out.append(list(mix))
    return out


def price_mixes(
    source: Any,
    *,
    max_mixes: int = DEFAULT_MAX_MIXES,
    seed: int = 0,
    eval_batches: int | None = None,
    latency: Any = None,
) -> tuple[list[PricedMix], list[int], str]:
    """Score sub-models of a trained MatFormer (module docstring) without training.

    Args:
        source: :func:`archir.extract.load_run`'s result.
        max_mixes: how many mixes to price at most (the uniform ones always).
        eval_batches: held-out batches per mix (default: the spec's ``train.eval_batches``).
        latency: a ``search.latency`` section (default: the spec's, or its defaults).

    Returns:
        ``(rows, front, metric)``: every priced mix, the indices of the Pareto front of
        (metric, latency_ms, params), and the metric's name (e.g. ``val_bpb``).

    Raises:
        ExtractError: the run has no matformer blocks; TaskError: the task cannot run it;
        LatencyError: the latency cannot be measured.
    """
    from archir.blocks.mlp import use_granularity
    from archir.cost import analyze
    from archir.extract import _owners, extract, resolve_mix
    from archir.spec.sections import LatencySection
    from archir.tasks import get_task
    from searchers.latency import trial_latency
    from searchers.pareto import pareto_front

    spec, model = source.spec, source.model
    resolve_mix(spec, model, 1.0)  # refuses a run without matformer blocks
    cfg = spec.model.train
    search = spec.model.search
    lat = latency or (search.latency if search is not None else LatencySection.model_validate({}))
    task = get_task(cfg.task, cfg.task_options)
    task.check_model(spec.model.model)
    seq = min(cfg.seq_len, spec.model.model.max_seq_len)
    bs = cfg.eval_batch_size or cfg.batch_size
    nb = eval_batches or cfg.eval_batches
    grans = [list(n.params.granularities) for n in _owners(model)]
    rows: list[PricedMix] = []
    model.eval()
    for mix in candidate_mixes(grans, max_mixes, seed):
        with torch.no_grad(), use_granularity(model, mix):
            ev = task.evaluate(model, bs, seq, nb)
        sub_spec, sub, gs = extract(spec, model, mix)
        rec = trial_latency(sub_spec, lat, cfg.seq_len, model=sub)
        rows.append(
            PricedMix(gs, ev, float(rec["ms"]), int(analyze(sub_spec).params), name=sub_spec.name)
        )
    pts = [(r.metrics[task.metric], r.latency_ms, float(r.params)) for r in rows]
    front = pareto_front(pts, ["minimize"] * 3)
    return rows, front, task.metric
