"""``archir report RUN_DIR``: Pareto table, constraint status, where each trial's files are.

``--lineage`` (runs of ``--searcher evolution``): draws the family tree into
``RUN_DIR/lineage.png`` and prints, for each front member, the mutation path from its seed
(:mod:`searchers.lineage`).
"""

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
    p.add_argument(
        "--lineage",
        action="store_true",
        help="family tree of an evolution search: writes RUN/lineage.png and prints the "
        "mutation path from the seed to each front member (with --all: to every model)",
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


#: a pareto.json larger than this is not one archir wrote for a study it could report
MAX_PARETO_BYTES = 512 * 2**20


def load_pareto(run: Path) -> dict[str, Any]:
    """The run's ``pareto.json``, checked to be one a search wrote.

    Raises:
        SearchError: the folder is missing, not a folder, or not a finished search run; its
            ``pareto.json`` is not a regular file, too large, not JSON or not a search result.
    """
    if not run.exists():
        raise SearchError(
            f"no such run folder: {run}", hint="give a folder made by 'archir search' (runs/<name>)"
        )
    if not run.is_dir():
        raise SearchError(
            f"{run} is not a folder", hint="give a folder made by 'archir search' (runs/<name>)"
        )
    p = run / "pareto.json"
    if not p.is_file():
        hint = (
            "the search has not finished: run the same 'archir search' command to resume"
            if (run / "run.json").is_file()
            else "give a folder made by 'archir search' (runs/<name>)"
        )
        what = "no pareto.json" if not p.exists() else "pareto.json is not a regular file"
        raise SearchError(f"{what} in {run}", hint=hint)
    if p.stat().st_size > MAX_PARETO_BYTES:
        raise SearchError(f"{p} is too large to be a search result ({p.stat().st_size} bytes)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise SearchError(
            f"{p} cannot be read: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}",
            hint="it was not written by 'archir search'; re-run the search to write it again",
        ) from None
    problem = _shape_problem(doc)
    if problem:
        raise SearchError(
            f"{p} is not a search result: {problem}",
            hint="it was not written by 'archir search'; re-run the search to write it again",
        )
    return doc  # type: ignore[no-any-return]


def _shape_problem(doc: Any) -> str | None:
    """What makes ``doc`` not a ``pareto.json`` archir writes, or None."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    kinds: dict[str, type | tuple[type, ...]] = {
        "study": str,
        "objectives": dict,
        "constraints": dict,
        "front": list,
        "trials": list,
        "states": dict,
        "n_trials": int,
    }
    for key, kind in kinds.items():
        if not isinstance(doc.get(key), kind):
            return f"'{key}' missing or of the wrong type"
    for where in ("front", "trials"):
        for i, row in enumerate(doc[where]):
            if not isinstance(row, dict):
                return f"{where}[{i}] is not an object"
            for key, kind in (
                ("trial", int),
                ("status", str),
                ("objectives", dict),
                ("constraints", dict),
            ):
                if not isinstance(row.get(key), kind):
                    return f"{where}[{i}].{key} missing or of the wrong type"
            if not all(isinstance(v, dict) for v in row["constraints"].values()):
                return f"{where}[{i}].constraints holds a value that is not an object"
    if doc.get("best") is not None and not isinstance(doc["best"], int):
        return "'best' is not a trial number"
    return None


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
    has_steps = any(r.get("steps") is not None for r in rows)
    if has_steps:
        table.add_column("steps", justify="right")
    for o in objs:
        table.add_column(f"{o} ({doc['objectives'][o][:3]})", justify="right")
    for c, expr in cons.items():
        table.add_column(f"{c} {expr}", justify="right")
    table.add_column(f"spec (in {run})")
    for r in rows:
        cells = [str(r["trial"]), r["status"]]
        if has_steps:
            cells.append(str(r.get("steps", "-")))
        noise = r.get("noise") if isinstance(r.get("noise"), dict) else {}
        for o in objs:
            se = noise.get(f"{o}_se")
            cells.append(_fmt(r["objectives"].get(o)) + (f" ± {se:.3f}" if se is not None else ""))
        for c in cons:
            st = r["constraints"].get(c, {})
            mark = "ok" if st.get("ok") else "NO"
            cells.append(f"{_fmt(st.get('value'))} {mark}")
        cells.append(str(r.get("spec", "-")))
        table.add_row(*cells)
    console.print(table)
    states = ", ".join(f"{k}: {v}" for k, v in sorted(doc["states"].items()))
    console.print(f"{doc['n_trials']} trials ({states})")
    fid = doc.get("fidelity") if isinstance(doc.get("fidelity"), dict) else {}
    if fid.get("kind") == "ladder" and fid.get("rungs"):
        per = fid.get("models_per_rung") or []
        console.print(
            "fidelity ladder: rungs "
            + " / ".join(str(x) for x in fid["rungs"])
            + f" steps, eta {fid.get('eta')}; models per rung "
            + " / ".join(str(x) for x in per)
            + f"; the front compares models at {fid.get('steps')} steps (± = standard error "
            "of the held-out score)"
        )
    if doc.get("best") is not None:
        console.print(f"best: trial {doc['best']} -> {run / 'best'}")
    if not brief:
        console.print(
            f"files: {run}/trials/<n>/{{spec.yaml, metrics.json, log}}; "
            f"pareto.json, pareto.png; study storage in {run}/run.json"
        )


def print_lineage(run: str | Path, *, show_all: bool = False) -> Path:
    """``archir report RUN --lineage``: write ``RUN/lineage.png`` (the family tree,
    :func:`searchers.lineage.draw_lineage`) and print the mutation path from the seed to each
    front member (``show_all``: to every model), ending with its values in ``pareto.json``.
    Reads the study without writing to it; writes nothing but ``lineage.png``, and replaces
    only a ``lineage.png`` archir wrote.

    Returns:
        The path of the PNG.

    Raises:
        SearchError: not a finished search run, a storage that cannot be read, a study
            without lineage (not searched with ``--searcher evolution``), a ``lineage.png``
            that archir did not write.
    """
    from searchers.lineage import (
        PNG_NAME,
        build_tree,
        check_png_target,
        draw_lineage,
        format_path,
        read_trials,
    )

    run = Path(run)
    doc = load_pareto(run)
    png = check_png_target(run / PNG_NAME)  # before any work: never a file archir did not write
    study, trials = read_trials(run)
    front = [int(r["trial"]) for r in doc["front"]]
    tree = build_tree(trials, front, run_dir=run, study=study)
    draw_lineage(tree, png)
    roots = tree.graph["roots"]
    metrics = list(doc["objectives"]) + [
        c for c in doc["constraints"] if c not in doc["objectives"]
    ]
    gens = 1 + max(int(g) for _, g in tree.nodes(data="generation"))
    members = []
    for r in doc["front"]:
        n = roots.get(int(r["trial"]), int(r["trial"]))
        if n not in {m for m, _ in members}:
            members.append((n, r))
    print(
        f"{study}: {tree.number_of_nodes()} models in {gens} generation(s), "
        f"{len(members)} on the front; family tree in {png}"
    )
    rows = {int(r["trial"]): r for r in doc["trials"]}
    if show_all:
        targets = [(n, rows.get(tree.nodes[n]["trial"])) for n in sorted(tree.nodes)]
    else:
        targets = [(n, r) for n, r in members]
    for n, row in targets:
        print()
        if n not in tree:
            print(f"front member #{n}: not a trial of study {study!r}")
            continue
        a = tree.nodes[n]
        where = f"trial {row['trial']}" if row is not None and row["trial"] != n else ""
        steps = row.get("steps") if row is not None else a.get("steps")
        at = ", ".join(x for x in (where, f"{steps} steps" if steps is not None else "") if x)
        what = "front member" if a["on_front"] else "model"
        title = f"{what} #{n}" + (f" ({at})" if at else "") + f": {a['label']}"
        values = None
        if row is not None:
            values = row["values"] if isinstance(row.get("values"), dict) else row["objectives"]
        print(format_path(tree, n, values=values, metrics=metrics, title=title))
    if not members:
        print("the front is empty: no model met every constraint")
    return png


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if args.lineage:
        if args.json:
            raise SearchError(
                "--lineage and --json cannot be combined",
                hint="--json prints pareto.json; --lineage draws and prints the family tree",
            )
        print_lineage(run_dir, show_all=args.all)
        return 0
    if args.json:
        print(json.dumps(load_pareto(run_dir), indent=2))
        return 0
    print_report(run_dir, show_all=args.all)
    return 0
