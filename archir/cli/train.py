"""``archir train SPEC``: train a concrete spec on a task; write checkpoint + metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from archir.cli.args import positive_float, positive_int

HELP = "train a concrete spec on a task (text:pydoc, text:<file>, digits, mad:<task>)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="concrete spec file")
    p.add_argument("--task", help="task name (default: the spec's train.task)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--seed", type=int)
    p.add_argument("--time-budget", type=positive_float, dest="time_budget_s", help="seconds")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads")
    p.add_argument("--out", help="output folder (default runs/<name>/train)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--preset", help="task preset (MAD: lite or full) — sets the setting and train budget"
    )
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option, e.g. vocab_size=32 (repeatable)",
    )
    p.add_argument(
        "--checkpoint-every", type=positive_int, help="write checkpoint.pt every N steps"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def run(args: argparse.Namespace) -> int:
    from archir.spec import load_spec
    from archir.train import train

    spec = load_spec(args.spec)
    cfg = spec.model.train
    updates = {
        k: v
        for k, v in {
            "task": args.task,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "seed": args.seed,
            "time_budget_s": args.time_budget_s,
            "threads": args.threads,
        }.items()
        if v is not None
    }
    from archir.errors import TaskError
    from archir.tasks import get_task

    options = dict(cfg.task_options)
    for item in args.task_option:
        key, eq, value = item.partition("=")
        if not eq:
            raise TaskError(f"--task-option '{item}' is not KEY=VALUE")
        options[key] = value
    if args.preset:
        options["preset"] = args.preset
    task = get_task(updates.get("task", cfg.task), options)
    suggested = dict(task.recommended_train)
    from pydantic import ValidationError

    from archir.errors import ArchirError, describe_validation_error

    try:
        cfg = cfg.model_validate(
            {**cfg.model_dump(), **suggested, **updates, "task_options": options}
        )
    except ValidationError as exc:
        raise ArchirError(
            f"bad training option: {describe_validation_error(exc)}",
            hint="see 'archir train --help'",
        ) from None
    out = Path(args.out) if args.out else Path("runs") / spec.name / "train"
    result = train(
        spec,
        task,
        out_dir=out,
        cfg=cfg,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    m = {k: v for k, v in result.metrics.items() if k != "history"}
    print(json.dumps(m, indent=2, default=float))
    print(f"wrote {out}/model.safetensors, spec.yaml, metrics.json")
    return 0 if result.status != "failed" else 1
