"""``archir search SPEC``: search the choices a spec leaves open (Optuna).

Every numeric flag is range-checked before any work (:func:`searchers.config.check_option_bounds`
and the ``search:`` section's schema), every enumerated one has its choices; ``--study`` is a
name and the run folder defaults to ``runs/<study>``. SIGTERM stops a search as Ctrl-C does:
the running trial is recorded as interrupted and retried when the same command runs again.
"""

from __future__ import annotations

import argparse

HELP = "search the open choices of a spec (TPE / NSGA-II / random / GP); resumable"


def add_arguments(p: argparse.ArgumentParser) -> None:
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
        choices=["optuna", "darts", "spos"],
        default="optuna",
        help="optuna: trial by trial (default); darts: one-shot supernet with relaxed "
        "choices (first-order DARTS); spos: single-path one-shot + evolutionary selection",
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


# flags of the Optuna searcher that the one-shot searchers have no use for: refused, not dropped
_OPTUNA_ONLY = {"sampler": "--sampler", "workers": "--workers"}


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen searcher would ignore.

    Raises:
        SearchError: a flag that does not apply to ``--searcher``.
    """
    from archir.errors import SearchError

    if args.searcher == "optuna":
        if args.relax is not None or args.supernet_steps is not None:
            flag = "--relax" if args.relax is not None else "--supernet-steps"
            raise SearchError(
                f"{flag} applies to the one-shot searchers only",
                hint="add --searcher darts (or spos), or drop the flag",
            )
        return
    given = [flag for dest, flag in _OPTUNA_ONLY.items() if getattr(args, dest) is not None]
    if given:
        raise SearchError(
            f"{given[0]} does not apply to --searcher {args.searcher}"
            + (f" (nor {', '.join(given[1:])})" if given[1:] else ""),
            hint="a one-shot search trains one supernet in one process",
        )
    if args.searcher == "spos" and args.relax is not None:
        raise SearchError(
            "--relax applies to --searcher darts only (SPOS samples one path per step)",
            hint="drop --relax",
        )


def _run_oneshot(args: argparse.Namespace) -> int:
    from archir.spec import load_spec
    from searchers.cli_report import print_report
    from searchers.darts import run_oneshot
    from searchers.run import run_location

    spec = load_spec(args.spec)
    run_dir, _ = run_location(spec, args.out, args.study)
    res = run_oneshot(
        spec,
        run_dir,
        method=args.searcher,
        relax=args.relax or "softmax",
        seed=args.seed or 0,
        steps=args.supernet_steps,
        trial_steps=args.steps,
        storage=args.storage,
        study=args.study,
        trials=args.trials,
        timeout_s=args.timeout_s,
        fidelity=args.fidelity,
        export=not args.no_export,
        say=lambda s: print(s, flush=True),
    )
    print_report(run_dir, brief=True)
    best = res.get("best") or {}
    weights = ", ".join(
        f"{name}: " + "/".join(f"{p:.2f}" for p in probs)
        for name, probs in res.get("arch_weights", {}).items()
    )
    print(f"final architecture weights: {weights}")
    collapse = res.get("collapse") or {}
    if collapse.get("triggered"):
        print(f"collapse guard triggered: {collapse.get('events')}")
    print(
        f"{args.searcher} search finished in {res.get('wall_s', 0.0):.1f} s: {run_dir} "
        f"(best trial: {best.get('trial', '-')})"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from searchers.run import sigterm_interrupts

    _check_flags(args)
    with sigterm_interrupts():
        if args.searcher != "optuna":
            return _run_oneshot(args)
        return _run_optuna(args)


def _run_optuna(args: argparse.Namespace) -> int:
    from searchers.cli_report import print_report
    from searchers.run import run_search

    res = run_search(
        args.spec,
        out=args.out,
        storage=args.storage,
        study=args.study,
        sampler=args.sampler,
        trials=args.trials,
        workers=args.workers,
        seed=args.seed,
        fidelity=args.fidelity,
        steps=args.steps,
        timeout_s=args.timeout_s,
        export=not args.no_export,
        say=lambda s: print(s, flush=True),
    )
    print_report(res.run_dir, brief=True)
    print(f"search finished in {res.wall_s:.1f} s: {res.run_dir}")
    exp = (res.best or {}).get("export", {})
    return 1 if isinstance(exp, dict) and "error" in exp else 0
