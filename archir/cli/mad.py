"""``archir mad SPEC --preset lite``: the MAD suite on a concrete spec — a score table per
task (mean over settings of the best run), the mean, and CPU seconds per task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "run the six MAD synthetic tasks on a concrete spec and print a score table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="concrete spec file (model.task causal_lm)")
    p.add_argument("--preset", default="lite", help="lite (CPU minutes) or full (reference)")
    p.add_argument("--tasks", help="comma-separated subset, e.g. in-context-recall,memorization")
    p.add_argument("--seed", type=int, default=0, help="data and model seed")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--out", help="write the report as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from archir.spec import load_spec
    from archir.tasks.mad import PRESETS, TASKS, get_preset, run_mad

    spec = load_spec(args.spec)
    spec.model  # noqa: B018 — raises SpecError for an open spec
    protocol = get_preset(args.preset)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else list(TASKS)
    con = Console(stderr=args.json)
    con.print(f"[bold]MAD {args.preset}[/bold] on {spec.name}: {PRESETS[args.preset].doc}")
    con.print(
        "note: model.vocab_size (and max_seq_len when shorter) is overridden per setting "
        f"to the task's vocabulary; d_model and layers come from {args.spec}"
    )

    def on_result(r) -> None:
        runs = ", ".join(
            f"lr {x['lr']:g} wd {x['weight_decay']:g}: {x['accuracy']:.3f}" for x in r.runs
        )
        con.print(
            f"  {r.task:<26} {r.setting.label:<28} acc {r.accuracy:.3f}  "
            f"cpu {r.cpu_s:6.1f}s  ({runs})"
        )

    report = run_mad(
        spec, args.preset, tasks, seed=args.seed, threads=args.threads, on_result=on_result
    )
    data = report.to_dict()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=2))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title=f"MAD {args.preset}: {spec.name}")
    table.add_column("task")
    table.add_column("settings", justify="right")
    table.add_column("score", justify="right")
    table.add_column("CPU s", justify="right")
    scores, cpu = report.task_scores(), report.task_cpu_s()
    n = {t: sum(r.task == t for r in report.results) for t in scores}
    for t in scores:
        table.add_row(t, str(n[t]), f"{scores[t]:.3f}", f"{cpu[t]:.1f}")
    table.add_row(
        "[bold]mean[/bold]",
        str(len(report.results)),
        f"[bold]{report.mean:.3f}",
        f"{sum(cpu.values()):.1f}",
    )
    con.print(table)
    del protocol
    return 0
