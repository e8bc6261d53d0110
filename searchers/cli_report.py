"""``archir report RUN_DIR``: Pareto table, constraint status, where each trial's files are."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from archir.errors import SearchError

HELP = "summarize a search run: Pareto table, constraint status, trial files"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder, e.g. runs/hybrid-lm")
    p.add_argument("--json", action="store_true", help="print pareto.json")
    p.add_argument("--all", action="store_true", help="list every trial, not only the front")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def load_pareto(run: Path) -> dict[str, Any]:
    """The run's ``pareto.json``.

    Raises:
        SearchError: the folder is not a finished search run.
    """
    p = run / "pareto.json"
    if not p.is_file():
        hint = (
            "the search has not finished: run the same 'archir search' command to resume"
            if (run / "run.json").is_file()
            else "give a folder made by 'archir search' (runs/<name>)"
        )
        raise SearchError(f"no pareto.json in {run}", hint=hint)
    return json.loads(p.read_text())


def print_report(run: str | Path, *, brief: bool = False, show_all: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    run = Path(run)
    doc = load_pareto(run)
    import sys

    console = Console() if sys.stdout.isatty() else Console(width=200)
    objs = list(doc["objectives"])
    cons = doc["constraints"]
    rows = doc["trials"] if show_all else doc["front"]
    table = Table(title=f"{doc['study']}: {'all trials' if show_all else 'Pareto front'}")
    table.add_column("trial", justify="right")
    table.add_column("status")
    for o in objs:
        table.add_column(f"{o} ({doc['objectives'][o][:3]})", justify="right")
    for c, expr in cons.items():
        table.add_column(f"{c} {expr}", justify="right")
    table.add_column(f"spec (in {run})")
    for r in rows:
        cells = [str(r["trial"]), r["status"]]
        cells += [_fmt(r["objectives"].get(o)) for o in objs]
        for c in cons:
            st = r["constraints"].get(c, {})
            mark = "ok" if st.get("ok") else "NO"
            cells.append(f"{_fmt(st.get('value'))} {mark}")
        cells.append(str(r["spec"]))
        table.add_row(*cells)
    console.print(table)
    states = ", ".join(f"{k}: {v}" for k, v in sorted(doc["states"].items()))
    console.print(f"{doc['n_trials']} trials ({states})")
    if doc.get("best") is not None:
        console.print(f"best: trial {doc['best']} -> {run / 'best'}")
    if not brief:
        console.print(
            f"files: {run}/trials/<n>/{{spec.yaml, metrics.json, log}}; "
            f"pareto.json, pareto.png; study storage in {run}/run.json"
        )


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if args.json:
        print(json.dumps(load_pareto(run_dir), indent=2))
        return 0
    print_report(run_dir, show_all=args.all)
    return 0
