"""Framework overhead per search trial, training and evaluation excluded.

Runs a cost-fidelity search (no training, no latency measurement) over the hybrid-lm space:
each trial is Optuna ask/tell through the journal file, define-by-run fixing of 29 decisions,
validation of the concrete spec, the cost pass, and the trial's files (spec.yaml,
metrics.json, log). Prints the mean and median wall time per trial.

    python benchmarks/search_overhead.py [--trials 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--sampler", default="tpe")
    args = ap.parse_args()
    from searchers.run import run_search

    data = yaml.safe_load((ROOT / "specs/search/hybrid-lm.yaml").read_text())
    data["search"].update(
        objectives={"params": "minimize"},
        constraints={"params": "<= 8e5"},
        fidelity="cost",
        budget={"trials": args.trials},
        sampler=args.sampler,
    )
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "overhead.yaml"
        spec.write_text(yaml.safe_dump(data, sort_keys=False))
        t0 = time.perf_counter()
        res = run_search(spec, out=Path(tmp) / "run", export=False, say=lambda s: None)
        wall = time.perf_counter() - t0
        per = []
        inner = []
        for n in range(res.n_trials):
            m = json.loads((Path(tmp) / "run" / "trials" / str(n) / "metrics.json").read_text())
            inner.append(m["timing"]["total_s"])
        per = wall / res.n_trials
    print(f"sampler {args.sampler}, {res.n_trials} trials, cost fidelity, journal storage")
    print(f"whole search incl. startup and pareto/plot: {wall:.2f} s -> {per * 1e3:.1f} ms/trial")
    print(
        f"inside the objective (fix + validate + cost + files): median "
        f"{statistics.median(inner) * 1e3:.1f} ms, mean {statistics.mean(inner) * 1e3:.1f} ms"
    )
    print(f"goal < 50 ms/trial: {'met' if per < 0.050 else 'NOT met'}")


if __name__ == "__main__":
    main()
