"""``archir tasks``: every task with its settings and metric."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

HELP = "list tasks (text, digits, MAD suite) with their settings, metric and presets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    from archir.tasks import task_names
    from archir.tasks.mad import PRESETS, TASKS, baseline, full_settings

    names = task_names()
    mad = {
        t: {
            "metric": "accuracy (macro, maximize)",
            "baseline": asdict(baseline(t)),
            "full_settings": len(full_settings(t)),
            "lite_settings": [asdict(s) for s in PRESETS["lite"].settings(t)],
        }
        for t in TASKS
    }
    presets = {k: p.doc for k, p in PRESETS.items()}
    if args.json:
        print(json.dumps({"tasks": names, "mad": mad, "mad_presets": presets}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="tasks", show_lines=False)
    t.add_column("name")
    t.add_column("description")
    for k, doc in sorted(names.items()):
        t.add_row(k, doc)
    con.print(t)
    m = Table(title="MAD tasks (mad:<task>; metric: macro accuracy, maximize)")
    for col in ("task", "baseline", "full", "lite settings"):
        m.add_column(col)
    for name in TASKS:
        b = baseline(name)
        m.add_row(
            f"mad:{name}",
            b.label,
            str(len(full_settings(name))),
            "; ".join(s.label for s in PRESETS["lite"].settings(name)),
        )
    con.print(m)
    for k, doc in presets.items():
        con.print(f"[bold]--preset {k}[/bold]: {doc}")
    con.print(
        "options: archir train SPEC --task mad:<task> --preset lite|full "
        "[--task-option vocab_size=32 ...]"
    )
    return 0
