"""Framework overhead per search trial, training and evaluation excluded.

Runs a cost-fidelity search (no training, no latency measurement) over the hybrid-lm space:
each trial is Optuna ask/tell through the journal file, define-by-run fixing of 29 decisions,
validation of the concrete spec, the cost pass, and the trial's files (spec.yaml,
metrics.json, log). Prints the mean and median wall time per trial and the journal
``fsync``s per trial (each journal append is one ``fsync``; a trial groups its writes).

    python benchmarks/search_overhead.py [--trials 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import optuna
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
        fsyncs = [0]
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            fsyncs[0] += 1
            real_fsync(fd)

        os.fsync = counting_fsync  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            res = run_search(spec, out=Path(tmp) / "run", export=False, say=lambda s: None)
            wall = time.perf_counter() - t0
        finally:
            os.fsync = real_fsync  # type: ignore[assignment]
        inner = []
        from searchers.run import open_storage

        study = optuna.load_study(
            study_name=res.study_name,
            storage=open_storage(None, Path(tmp) / "run" / "study.journal"),
        )
        starts = [t.datetime_start for t in study.trials if t.datetime_start is not None]
        ends = [t.datetime_complete for t in study.trials if t.datetime_complete is not None]
        steady = (max(ends) - min(starts)).total_seconds() / len(ends)
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
    print(f"journal fsyncs: {fsyncs[0]} in all, {fsyncs[0] / res.n_trials:.1f} per trial")
    print(
        f"per trial in the search loop (first trial start -> last trial end, incl. ask/tell "
        f"and every journal write): {steady * 1e3:.1f} ms"
    )
    print(f"goal < 50 ms/trial (search loop): {'met' if steady < 0.050 else 'NOT met'}")


if __name__ == "__main__":
    main()
