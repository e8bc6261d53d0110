"""How well each rung of the fidelity ladder ranks architectures the way its top rung does.

For ``--archs`` architectures drawn (seeded, distinct, within the space's cost constraints)
from a search space, each is trained once per seed with :func:`archir.train.train_ladder` to
the top rung — every rung's quality read at the trial's weight bits, exactly as a laddered
search reads it (the whole validation split; fake-quantized below 16 bits). Printed per
space, side by side:

* Kendall τ and Spearman ρ of every rung's ranking against the top rung's (mean and range
  over seeds), and — the ceiling any proxy can reach — the top rung against itself with
  another training seed;
* top-3 recall of each promotion step with ``eta`` 3: the share of the top rung's true top 3
  still in the ladder after that step, promoting by quality alone (``quality``) and by
  Pareto rank on (quality, latency) as the search does (``pareto``);
* evaluation noise (mean ``val_bpb_se``) against the median gap between two models at that
  rung;
* CPU seconds per rung per model (1 thread).

Spaces: ``main`` — the main job's (``specs/search/hybrid-lm-quick.yaml``, ``text:pydoc``,
its ladder); ``mad`` — the same space on MAD in-context recall (lite setting: vocabulary 16,
64 tokens; batch 16, lr 2e-3; rungs 25 / 100 / 400), metric accuracy; ``mad-copying`` — the
same on MAD selective copying (lite: vocabulary 16, 64 tokens, 8 to copy).

    python benchmarks/rank_fidelity.py [--space main mad mad-copying] [--archs 12] [--seeds 0 1 2] [--jobs 2]

Results go to ``benchmarks/rank_fidelity_results.json`` (``--out``) and the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "specs" / "search" / "hybrid-lm-quick.yaml"
ETA = 3


#: rungs given on the command line (``--rungs``, for a quick try), else the space's own
RUNGS: list[int] | None = None


#: the MAD spaces: the main job's space trained on one MAD task (lite setting)
MAD_TASKS = {"mad": "mad:in-context-recall", "mad-copying": "mad:selective-copying"}
SPACES = ["main", *MAD_TASKS]


def _setup(space: str) -> tuple[Any, Any, list[int], str, str]:
    """(open spec, train section, rungs, metric, direction) of a benchmark space."""
    spec, train, rungs, metric, direction = _space(space)
    return spec, train, (RUNGS or rungs), metric, direction


def _space(space: str) -> tuple[Any, Any, list[int], str, str]:
    from archir.spec.loader import load_spec
    from searchers.config import SearchConfig, ladder_rungs, trial_train_cfg

    spec = load_spec(MAIN)
    cfg = SearchConfig(
        spec_path=str(MAIN),
        run_dir="unused",
        storage_url=None,
        study_name="bench",
        search=spec.data["search"],
        train=spec.data["train"],
        space_hash="",
        trials=1,
        timeout_s=None,
        workers=1,
    )
    train = trial_train_cfg(cfg)
    if space == "main":
        return spec, train, ladder_rungs(cfg), "val_bpb", "minimize"
    train = train.model_copy(
        update={
            "task": MAD_TASKS[space],
            "task_options": {"preset": "lite"},
            "batch_size": 16,
            "lr": 2e-3,
            "weight_decay": 0.0,
            "warmup_steps": 5,
            "min_lr": 1e-6,
        }
    )
    return spec, train, [25, 100, 400], "accuracy", "maximize"


def draw(space: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct architectures of the space (their decisions) meeting its cost
    constraints, drawn uniformly with ``seed``."""
    from archir.cost import analyze
    from searchers.objectives import COST_METRICS, parse_constraint
    from searchers.space import random_decider, spec_hash

    spec, *_ = _setup(space)
    cons = [parse_constraint(m, e) for m, e in spec.data["search"].get("constraints", {}).items()]
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        concrete = spec.fix(random_decider(rng))
        h = spec_hash(concrete)
        cost = analyze(concrete)
        vals = {k: float(getattr(cost, k)) for k in COST_METRICS}
        if h in seen or not all(c.ok(vals[c.metric]) for c in cons if c.metric in vals):
            continue
        seen.add(h)
        out.append(dict(concrete.decisions))
    return out


def run_one(space: str, decisions: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one architecture with one seed through every rung; quality per rung (at its
    bits), CPU seconds per rung, its latency (ms, the search's measurement)."""
    import torch

    from archir.compiler import compile as compile_spec
    from archir.quant import needs_quantization, quantize_model
    from archir.spec.sections import SearchSection
    from archir.tasks.base import get_task
    from archir.train import train_ladder
    from searchers.latency import trial_latency

    torch.set_num_threads(1)
    spec, train, rungs, metric, _ = _setup(space)
    train = train.model_copy(update={"seed": seed})
    concrete = spec.fix(decisions)
    sec = SearchSection.model_validate(spec.data["search"])
    lat = trial_latency(concrete, sec.latency, train.seq_len, compile_spec(concrete, seed=0))
    task = get_task(train.task, train.task_options)
    recs: list[dict[str, Any]] = []
    t0 = [time.process_time()]

    def on_rung(k: int, rec: dict[str, Any]) -> None:
        if needs_quantization(model_box[0]):
            quantize_model(model_box[0])  # the branch's weights; the trunk is restored after
            model_box[0].eval()
            ev = task.evaluate(
                model_box[0],
                train.eval_batch_size or train.batch_size,
                min(train.seq_len, concrete.model.model.max_seq_len),
                train.eval_batches,
            )
            rec = {**rec, **ev}
        recs.append(
            {
                "rung": k,
                "steps": rec["steps"],
                metric: float(rec[metric]),
                "se": float(rec.get(f"{metric}_se", math.nan)),
                "cpu_s": time.process_time() - t0[0],  # trunk, decay and evaluation
            }
        )
        t0[0] = time.process_time()

    model = compile_spec(concrete, seed=seed)
    model_box = [model]
    result = train_ladder(concrete, task, train, rungs, model=model, on_rung=on_rung)
    return {
        "space": space,
        "seed": seed,
        "decisions": decisions,
        "status": result.status,
        "latency_ms": float(lat["ms"]),
        "rungs": recs,
    }


def _init(rungs: list[int] | None) -> None:
    global RUNGS
    RUNGS = rungs


def kendall(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _promote(ids: list[int], score: dict[int, list[float]], keep: int) -> list[int]:
    """The ``keep`` best of ``ids`` (scores oriented: smaller is better) by Pareto rank and
    crowding distance (searchers.ladder.rank); one objective: by the score."""
    from searchers.ladder import Entry, rank

    class _T:
        def __init__(self, n: int) -> None:
            self.number = n

    es = [Entry(_T(i), str(i), score[i], 0.0) for i in ids]  # type: ignore[arg-type]
    return [e.trial.number for e in rank(es)[:keep]]


def analyse(runs: list[dict[str, Any]], metric: str, direction: str) -> dict[str, Any]:
    sign = 1.0 if direction == "minimize" else -1.0
    seeds = sorted({r["seed"] for r in runs})
    n_rungs = max(len(r["rungs"]) for r in runs)
    out: dict[str, Any] = {"seeds": seeds, "rungs": {}, "recall": {}, "noise": {}, "cpu_s": {}}
    per_seed: dict[int, list[dict[str, Any]]] = {
        s: sorted(
            (r for r in runs if r["seed"] == s and r["status"] == "ok"),
            key=lambda r: json.dumps(r["decisions"], sort_keys=True),
        )
        for s in seeds
    }
    for k in range(n_rungs):
        taus, rhos = [], []
        for s in seeds:
            rs = [r for r in per_seed[s] if len(r["rungs"]) == n_rungs]
            a = [r["rungs"][k][metric] for r in rs]
            top = [r["rungs"][-1][metric] for r in rs]
            taus.append(kendall(a, top))
            rhos.append(spearman(a, top))
        out["rungs"][k] = {
            "steps": per_seed[seeds[0]][0]["rungs"][k]["steps"],
            "tau": taus,
            "spearman": rhos,
        }
        vals = [r["rungs"][k] for s in seeds for r in per_seed[s] if len(r["rungs"]) > k]
        gaps = []
        for s in seeds:
            v = sorted(r["rungs"][k][metric] for r in per_seed[s] if len(r["rungs"]) > k)
            gaps += [abs(b - a) for a, b in zip(v, v[1:])]
        out["noise"][k] = {
            "mean_se": statistics.fmean(
                [x["se"] for x in vals if not math.isnan(x["se"])] or [math.nan]
            ),
            "median_gap_neighbours": statistics.median(gaps),
        }
        out["cpu_s"][k] = statistics.fmean(x["cpu_s"] for x in vals)
    # seed-to-seed agreement at the top rung (the ceiling of any proxy)
    ceil = []
    for i, s in enumerate(seeds):
        for s2 in seeds[i + 1 :]:
            x1 = {
                json.dumps(r["decisions"], sort_keys=True): r["rungs"][-1][metric]
                for r in per_seed[s]
            }
            x2 = {
                json.dumps(r["decisions"], sort_keys=True): r["rungs"][-1][metric]
                for r in per_seed[s2]
            }
            keys = sorted(set(x1) & set(x2))
            ceil.append(kendall([x1[x] for x in keys], [x2[x] for x in keys]))
    out["top_vs_top_other_seed_tau"] = ceil
    # top-3 recall of each promotion step
    for how in ("quality", "pareto"):
        rec: dict[int, list[float]] = {k: [] for k in range(n_rungs - 1)}
        for s in seeds:
            rs = per_seed[s]
            ids = list(range(len(rs)))
            true3 = set(sorted(ids, key=lambda i: sign * rs[i]["rungs"][-1][metric])[:3])
            alive = ids
            for k in range(n_rungs - 1):
                score = {
                    i: [sign * rs[i]["rungs"][k][metric]]
                    + ([rs[i]["latency_ms"]] if how == "pareto" else [])
                    for i in alive
                }
                alive = _promote(alive, score, max(1, len(alive) // ETA))
                rec[k].append(len(true3 & set(alive)) / 3)
        out["recall"][how] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", nargs="+", default=["main", "mad"], choices=SPACES)
    ap.add_argument("--archs", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rungs", type=int, nargs="+", help="override the rungs (a quick try)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "rank_fidelity_results.json"))
    args = ap.parse_args()
    global RUNGS
    RUNGS = args.rungs
    results: dict[str, Any] = {}
    path = Path(args.out)
    if path.exists():
        results = json.loads(path.read_text())
    for space in args.space:
        archs = draw(space, args.archs)
        jobs = [(space, d, s) for s in args.seeds for d in archs]
        t0 = time.time()
        with ProcessPoolExecutor(args.jobs, initializer=_init, initargs=(args.rungs,)) as ex:
            runs = list(ex.map(run_one, *zip(*jobs)))
        _, _, rungs, metric, direction = _setup(space)
        res = analyse(runs, metric, direction)
        res.update(wall_s=time.time() - t0, rungs_steps=rungs, archs=len(archs), runs=runs)
        results[space] = res
        path.write_text(json.dumps(results, indent=1))
        report(space, res, metric)


def _mr(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


def report(space: str, res: dict[str, Any], metric: str) -> None:
    print(f"\n== {space}: {res['archs']} architectures x seeds {res['seeds']}, metric {metric}")
    print(
        "rung  steps  tau vs top           spearman vs top      mean se   median gap  CPU s/model"
    )
    for k, r in res["rungs"].items():
        nz = res["noise"][k]
        print(
            f"{k:>4}  {r['steps']:>5}  {_mr(r['tau']):<20} {_mr(r['spearman']):<20} "
            f"{nz['mean_se']:.4f}    {nz['median_gap_neighbours']:.4f}      {res['cpu_s'][k]:.1f}"
        )
    print(f"top rung vs itself with another seed: tau {_mr(res['top_vs_top_other_seed_tau'])}")
    for how, rec in res["recall"].items():
        parts = []
        for k, xs in rec.items():
            full = sum(1 for x in xs if x == 1.0)
            parts.append(
                f"step {k}->{int(k) + 1}: {statistics.fmean(xs):.2f} (all 3 kept in {full}/{len(xs)} seeds)"
            )
        print(f"top-3 recall, promote by {how}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
