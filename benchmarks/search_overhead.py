"""Framework overhead per search trial, training and evaluation excluded.

Runs a cost-fidelity search (no training, no latency measurement) over the hybrid-lm space:
each trial is Optuna ask/tell through the study's storage, define-by-run fixing of 29
decisions, validation of the concrete spec, the cost pass, and the trial's files (spec.yaml,
metrics.json, log). The same search runs on the journal file (the default storage) and, when
PostgreSQL is at hand, on a real PostgreSQL server, side by side; for each it prints the wall
time per trial in the search loop, the journal ``fsync``s per trial (each journal append is
one ``fsync``; a trial groups its writes) or the SQL statements and commits per trial, and
the PostgreSQL/journal ratio.

    python benchmarks/search_overhead.py [--trials 60] [--repeat 3] [--pg URL | --no-pg]

``--repeat N`` runs the pair N times, alternating which storage goes first, each run a new
study, and prints the median of each figure (a loaded machine makes single runs noisy).

Without ``--pg`` a throw-away server is started on 127.0.0.1 (``tests/pg.py``) when the
server binaries are installed (durable: fsync on commit, PostgreSQL's default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp: Path, trials: int, sampler: str, space: str = "hybrid-lm") -> Path:
    data = yaml.safe_load((ROOT / "specs" / "search" / f"{space}.yaml").read_text())
    data["search"].update(
        objectives={"params": "minimize"},
        constraints={"params": "<= 8e5" if space == "hybrid-lm" else "<= 40000"},
        fidelity="cost",
        budget={"trials": trials},
        sampler=sampler,
    )
    spec = tmp / "overhead.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


class _SqlCounter:
    """Counts SQL statements and commits on every SQLAlchemy engine while on."""

    def __init__(self) -> None:
        self.statements = 0
        self.commits = 0
        self.on = False
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "before_cursor_execute", self._stmt)
        event.listen(Engine, "commit", self._commit)

    def _stmt(self, *a: Any, **k: Any) -> None:
        if self.on:
            self.statements += 1

    def _commit(self, *a: Any, **k: Any) -> None:
        if self.on:
            self.commits += 1


def run_one(
    spec: Path, out: Path, storage: str | None, sql: _SqlCounter | None, study: str | None = None
) -> dict[str, float]:
    from searchers.run import run_search
    from searchers.storage import open_storage

    fsyncs = [0]
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    os.fsync = counting_fsync  # type: ignore[assignment]
    if sql is not None:
        sql.statements = sql.commits = 0
        sql.on = True
    try:
        t0 = time.perf_counter()
        res = run_search(
            spec, out=out, storage=storage, study=study, export=False, say=lambda s: None
        )
        wall = time.perf_counter() - t0
    finally:
        os.fsync = real_fsync  # type: ignore[assignment]
        if sql is not None:
            sql.on = False
    study = optuna.load_study(
        study_name=res.study_name, storage=open_storage(storage, out / "study.journal")
    )
    trials = [t for t in study.trials if t.datetime_complete is not None]
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    steady = (max(ends) - min(starts)).total_seconds() / len(ends)
    inner = []
    for n in range(res.n_trials):
        m = json.loads((out / "trials" / str(n) / "metrics.json").read_text())
        inner.append(m["timing"]["total_s"])
    n = res.n_trials
    row = {
        "trials": n,
        "wall_ms": wall / n * 1e3,
        "loop_ms": steady * 1e3,
        "objective_ms": statistics.median(inner) * 1e3,
        "fsyncs": fsyncs[0] / n,
    }
    if sql is not None:
        row.update(statements=sql.statements / n, commits=sql.commits / n)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument(
        "--space",
        default="hybrid-lm",
        choices=["hybrid-lm", "tiny"],
        help="specs/search/<space>.yaml (hybrid-lm: 29 decisions; tiny: 6, a lighter objective)",
    )
    ap.add_argument("--pg", help="PostgreSQL URL of an empty database (default: start one)")
    ap.add_argument("--no-pg", action="store_true", help="the journal only")
    ap.add_argument(
        "--repeat", type=int, default=1, help="run the pair N times, interleaved; medians"
    )
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"journal": []}
    server = None
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        spec = _spec(tmp, args.trials, args.sampler, args.space)
        pg_url = args.pg
        if pg_url is None and not args.no_pg:
            sys.path.insert(0, str(ROOT))
            from tests.pg import PgServer, find_binaries

            bindir, why = find_binaries()
            if bindir is None:
                print(f"PostgreSQL skipped: {why}")
            else:
                server = PgServer.start(durable=True)
                pg_url = server.create_db("overhead")
        try:
            sql = _SqlCounter() if pg_url is not None else None
            if pg_url is not None:
                runs["postgresql"] = []
            for i in range(max(1, args.repeat)):
                study = f"overhead_r{i}"
                order = ["journal", "postgresql"] if i % 2 == 0 else ["postgresql", "journal"]
                for name in order:
                    if name == "journal":
                        runs[name].append(run_one(spec, tmp / f"j{i}", None, None, study))
                    elif pg_url is not None:
                        runs[name].append(run_one(spec, tmp / f"pg{i}", pg_url, sql, study))
        finally:
            if server is not None:
                server.stop()
    rows = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    reps = len(runs["journal"])
    print(
        f"space {args.space}, sampler {args.sampler}, {args.trials} trials, cost fidelity "
        "(no training)" + (f"; medians of {reps} interleaved runs" if reps > 1 else "")
    )
    if reps > 1:
        for name, rs in runs.items():
            print(
                f"{name:>10}: search loop ms/trial per run: "
                + ", ".join(f"{r['loop_ms']:.1f}" for r in rs)
            )
    for name, r in rows.items():
        io = (
            f"{r['fsyncs']:.1f} journal fsyncs/trial"
            if name == "journal"
            else f"{r['statements']:.0f} SQL statements, {r['commits']:.1f} commits per trial"
        )
        print(
            f"{name:>10}: search loop {r['loop_ms']:6.1f} ms/trial (first start -> last end, "
            f"incl. ask/tell and every storage write); whole search {r['wall_ms']:6.1f} "
            f"ms/trial; inside the objective median {r['objective_ms']:5.1f} ms; {io}"
        )
    if "postgresql" in rows:
        ratio = rows["postgresql"]["loop_ms"] / rows["journal"]["loop_ms"]
        print(
            f"PostgreSQL / journal (search loop): {ratio:.2f}x "
            f"(goal <= 3x: {'met' if ratio <= 3 else 'NOT met'})"
        )
    j = rows["journal"]["loop_ms"]
    print(f"goal < 50 ms/trial on the journal (search loop): {'met' if j < 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
