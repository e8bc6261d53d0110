"""``archir mad SPEC --preset lite``: the MAD suite on a concrete spec — a score table per
task (mean over settings of the best run), the mean, and CPU seconds per task."""

from __future__ import annotations

import argparse
import json

from archir.cli import args as a

HELP = "run the six MAD synthetic tasks on a concrete spec and print a score table"

#: ``archir.tasks.mad.PRESETS`` and ``TASKS`` (listed here so that parsing imports no torch)
PRESETS = ("lite", "full")
TASKS = (
    "in-context-recall",
    "fuzzy-in-context-recall",
    "noisy-in-context-recall",
    "selective-copying",
    "compression",
    "memorization",
)


def task_list(text: str) -> list[str]:
    """argparse type: comma-separated MAD task names, each one of :data:`TASKS`, no repeats.

    Raises:
        argparse.ArgumentTypeError: an empty list, an unknown name (with the nearest) or a
            repeated one.
    """
    from archir.errors import did_you_mean

    names = [t.strip() for t in text.split(",")]
    if not any(names):
        raise argparse.ArgumentTypeError("expected task names, e.g. memorization,compression")
    for t in names:
        if t not in TASKS:
            hint = did_you_mean(t, TASKS) or "one of: " + ", ".join(TASKS)
            raise argparse.ArgumentTypeError(f"unknown MAD task {t!r} ({hint})")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a task is named twice in {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="concrete spec file (model.task causal_lm)")
    p.add_argument(
        "--preset", default="lite", choices=PRESETS, help="lite (CPU minutes) or full (reference)"
    )
    p.add_argument(
        "--tasks",
        type=task_list,
        help="comma-separated subset, e.g. in-context-recall,memorization",
    )
    p.add_argument("--seed", type=a.seed, default=0, help="data and model seed")
    p.add_argument("--threads", type=a.threads, help="torch intra-op threads")
    p.add_argument("--out", help="write the report as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the suite; exit 0, or 2 for a user error.

    Raises:
        ArchirError: a bad spec (open, wrong task), a bad ``--out`` (checked before any
            training) or a setting the model cannot run.
    """
    from archir.paths import check_out_file, write_text

    if args.out is not None:
        check_out_file(args.out)
    from rich.console import Console
    from rich.table import Table

    from archir.spec import load_spec
    from archir.tasks.mad import PRESETS, get_preset, run_mad

    spec = load_spec(args.spec)
    spec.model  # noqa: B018 — raises SpecError for an open spec
    protocol = get_preset(args.preset)
    tasks = args.tasks or list(TASKS)
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
        write_text(args.out, json.dumps(data, indent=2))
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
