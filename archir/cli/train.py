"""``archir train SPEC``: train a concrete spec on a task; write weights + metrics.

The output folder (``--out``, default ``runs/<spec name>/train``) is checked before any
work; everything the command writes lies inside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from archir.cli import args as a

HELP = "train a concrete spec on a task (text:pydoc, text:<file>, digits, mad:<task>)"

#: the MAD presets (``archir.tasks.mad.PRESETS``; listed here so that parsing imports no torch)
PRESETS = ("lite", "full")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="concrete spec file")
    p.add_argument("--task", help="task name (default: the spec's train.task)")
    p.add_argument("--steps", type=a.steps, help=f"optimizer steps (1..{a.MAX_STEPS:_})")
    p.add_argument("--batch-size", type=a.batch_size, help=f"1..{a.MAX_BATCH}")
    p.add_argument("--seq-len", type=a.seq_len, help=f"1..{a.MAX_SEQ}")
    p.add_argument("--lr", type=a.learning_rate, help=f"peak learning rate (0, {a.MAX_LR:g}]")
    p.add_argument("--seed", type=a.seed, help=f"0..{a.MAX_SEED}")
    p.add_argument("--time-budget", type=a.seconds, dest="time_budget_s", help="seconds")
    p.add_argument("--threads", type=a.threads, help="torch intra-op threads")
    p.add_argument("--out", help="output folder (default runs/<name>/train)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        help="task preset (MAD: lite or full) — sets the setting and train budget",
    )
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option, e.g. vocab_size=32 (repeatable)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=a.steps,
        help="write a checkpoint (checkpoint.json + safetensors) every N steps",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.json")


def run(args: argparse.Namespace) -> int:
    """Train; exit 0 (ok or stopped), 1 (training failed: non-finite loss), 2 (user error).

    Raises:
        ArchirError: a bad spec, task, option or ``--out``, or a checkpoint that cannot be
            resumed (a pickle ``checkpoint.pt`` is refused, never loaded).
    """
    from archir.errors import ArchirError, TaskError
    from archir.paths import check_name, check_out_dir

    if args.out is not None:
        check_out_dir(args.out)
    options: dict[str, int | float | str | bool] = {}
    for item in args.task_option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise TaskError(f"--task-option '{item}' is not KEY=VALUE")
        options[key] = value

    from archir.spec import load_spec

    spec = load_spec(args.spec)
    if args.out is not None:
        out = Path(args.out)
    else:
        out = Path("runs") / check_name(spec.name, "spec name") / "train"
        check_out_dir(out)

    from archir.train import refuse_pickle_checkpoint, train

    if args.resume:
        refuse_pickle_checkpoint(out)
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
    from archir.tasks import get_task

    options = {**cfg.task_options, **options}
    if args.preset:
        options["preset"] = args.preset
    task = get_task(updates.get("task", cfg.task), options)
    suggested = dict(task.recommended_train)
    from pydantic import ValidationError

    from archir.errors import describe_validation_error

    try:
        cfg = cfg.model_validate(
            {**cfg.model_dump(), **suggested, **updates, "task_options": options}
        )
    except ValidationError as exc:
        raise ArchirError(
            f"bad training option: {describe_validation_error(exc)}",
            hint="see 'archir train --help'",
        ) from None
    if args.resume and not (out / "checkpoint.json").exists():
        print(f"note: no checkpoint in {out}: training from step 0", file=sys.stderr)
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
