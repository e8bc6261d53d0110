"""``archir search SPEC``: search the choices a spec leaves open, with the searcher named by
``--searcher`` (looked up in :mod:`searchers.base`'s registry).

Every numeric flag is range-checked before any work (:func:`searchers.config.check_option_bounds`
and the ``search:`` section's schema), every enumerated one has its choices; ``--study`` is a
name and the run folder defaults to ``runs/<study>``. A searcher's own flags (``--sampler``,
``--relax`` ...) are refused, not dropped, with any other searcher: each searcher declares
the options it takes (:attr:`searchers.base.Searcher.options`). SIGTERM stops a search as
Ctrl-C does: the running trial is recorded as interrupted and retried when the same command
runs again.
"""

from __future__ import annotations

import argparse

HELP = "search the open choices of a spec (Optuna samplers, one-shot supernets ...); resumable"

#: flags that belong to some searchers only (argparse dest -> flag); the searcher decides
SEARCHER_FLAGS = {
    "sampler": "--sampler",
    "workers": "--workers",
    "relax": "--relax",
    "supernet_steps": "--supernet-steps",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from searchers.base import searcher_names, searcher_summaries

    p.add_argument("spec", help="spec file with search nodes and a search: section")
    p.add_argument(
        "--trials",
        type=int,
        help="budget: trials that count (distinct models; repeats of a model, interrupted "
        "and retried trials do not count)",
    )
    p.add_argument("--sampler", choices=["tpe", "nsga2", "random", "gp"])
    p.add_argument("--workers", type=int, help="processes sharing the study (1-256)")
    p.add_argument("--seed", type=int, help="sampler seed, 0 to 2^31-1 (same seed, same proposals)")
    p.add_argument("--fidelity", choices=["cost", "proxy", "full", "ladder"])
    p.add_argument("--steps", type=int, help="training steps per trial (proxy fidelity)")
    p.add_argument("--timeout", type=float, dest="timeout_s", help="search wall-time budget, s")
    p.add_argument("--storage", help="Optuna storage URL (default: <run folder>/study.journal)")
    p.add_argument(
        "--study", help="study name: letters, digits, '_', '-' (default: the spec's name)"
    )
    p.add_argument("--out", help="run folder (default: runs/<study>)")
    p.add_argument("--no-export", action="store_true", help="skip best/model.onnx")
    p.add_argument(
        "--searcher",
        choices=searcher_names(),
        default="optuna",
        help="; ".join(f"{name}: {text}" for name, text in searcher_summaries().items()),
    )
    p.add_argument(
        "--relax",
        choices=["softmax", "gumbel"],
        default=None,
        help="--searcher darts only: softmax mixing (default) or Gumbel-softmax path "
        "sampling (GDAS)",
    )
    p.add_argument(
        "--supernet-steps",
        type=int,
        help="one-shot searchers: supernet training steps (default from the trial budget)",
    )


def searcher_options(args: argparse.Namespace) -> dict[str, object]:
    """The searcher flags given (``--relax gumbel`` -> ``{"relax": "gumbel"}``).

    Raises:
        SearchError: a flag the chosen searcher does not take, naming who takes it
            (:func:`searchers.base.refuse_options`).
    """
    from searchers.base import get_searcher, refuse_options

    given = {dest: flag for dest, flag in SEARCHER_FLAGS.items() if getattr(args, dest) is not None}
    refuse_options(get_searcher(args.searcher), given)
    return {dest: getattr(args, dest) for dest in given}


def run(args: argparse.Namespace) -> int:
    from searchers.base import get_searcher
    from searchers.cli_report import print_report
    from searchers.run import run_search, sigterm_interrupts

    options = searcher_options(args)
    with sigterm_interrupts():
        res = run_search(
            args.spec,
            searcher=args.searcher,
            out=args.out,
            storage=args.storage,
            study=args.study,
            trials=args.trials,
            seed=args.seed,
            fidelity=args.fidelity,
            steps=args.steps,
            timeout_s=args.timeout_s,
            export=not args.no_export,
            say=lambda s: print(s, flush=True),
            **options,
        )
    print_report(res.run_dir, brief=True)
    for line in get_searcher(args.searcher).summary(res):
        print(line)
    exp = (res.best or {}).get("export", {})
    return 1 if isinstance(exp, dict) and "error" in exp else 0
