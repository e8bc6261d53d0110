"""TPE and NSGA-II against random search at an equal trial budget (3 seeds, one run).

A cheap but non-trivial task, so that many trials fit: the hybrid-lm space at cost fidelity.

* single objective (TPE vs random): minimize ``flops_per_token`` subject to
  ``params >= 3e5`` and ``weight_bytes <= 6e5`` (a model that is big yet small on disk
  and cheap to run: the sampler has to find low bits and cheap mixers at a given size);
* two objectives (NSGA-II vs random): minimize ``weight_bytes`` and ``flops_per_token``
  subject to ``params >= 3e5``; reported as the hypervolume of the feasible front (higher is
  better) against a fixed reference point.

Candidates refused by a cost constraint are COMPLETE trials carrying their violations as
Optuna constraint values, so the samplers rank them below every feasible trial by violation
(see ``searchers.run``). ``max_rejections`` is raised to the budget so a sampler that finds no
feasible candidate is reported as such ("nan") instead of stopping the search.

    python benchmarks/samplers.py [--trials 60] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def search(tmp: Path, tag: str, sampler: str, seed: int, trials: int, objectives, constraints):
    from searchers.run import run_search

    data = yaml.safe_load((ROOT / "specs/search/hybrid-lm.yaml").read_text())
    data["search"] = {
        "objectives": objectives,
        "constraints": constraints,
        "fidelity": "cost",
        "budget": {"trials": trials},
        "sampler": sampler,
        "seed": seed,
        "max_rejections": trials + 1,
    }
    spec = tmp / f"{tag}.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    run_search(spec, out=tmp / tag, export=False, say=lambda s: None)
    return json.loads((tmp / tag / "pareto.json").read_text())


def main() -> None:
    from searchers.pareto import hypervolume_2d

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for seed in args.seeds:
            row = {"seed": seed}
            for s in ("tpe", "random"):
                doc = search(
                    tmp,
                    f"so-{s}-{seed}",
                    s,
                    seed,
                    args.trials,
                    {"flops_per_token": "minimize"},
                    {"params": ">= 3e5", "weight_bytes": "<= 6e5"},
                )
                best = [r["objectives"]["flops_per_token"] for r in doc["front"]]
                row[f"{s}_best_flops"] = min(best) if best else float("nan")
            ref = (2.5e6, 8e6)  # (weight_bytes, flops_per_token)
            for s in ("nsga2", "random"):
                doc = search(
                    tmp,
                    f"mo-{s}-{seed}",
                    s,
                    seed,
                    args.trials,
                    {"weight_bytes": "minimize", "flops_per_token": "minimize"},
                    {"params": ">= 3e5"},
                )
                pts = [
                    (r["objectives"]["weight_bytes"], r["objectives"]["flops_per_token"])
                    for r in doc["front"]
                ]
                row[f"{s}_hv"] = hypervolume_2d(pts, ["minimize", "minimize"], ref) / 1e12
            rows.append(row)
    print(f"{args.trials} trials per search, cost fidelity, hybrid-lm space")
    print("| seed | TPE best FLOPs/token | random best FLOPs/token | NSGA-II HV | random HV |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['tpe_best_flops']:.4g} | {r['random_best_flops']:.4g} | "
            f"{r['nsga2_hv']:.3f} | {r['random_hv']:.3f} |"
        )

    def mean(k):
        vals = [r[k] for r in rows if r[k] == r[k]]  # NaN: no feasible candidate found
        return statistics.mean(vals) if vals else float("nan")

    print(
        f"| mean | {mean('tpe_best_flops'):.4g} | {mean('random_best_flops'):.4g} | "
        f"{mean('nsga2_hv'):.3f} | {mean('random_hv'):.3f} |"
    )
    print("(FLOPs: lower is better; HV = hypervolume in 1e12 byte*FLOP units, higher is better)")


if __name__ == "__main__":
    main()
