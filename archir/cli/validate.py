"""``archir validate SPEC...``: typed check of spec files (exit 2 on the first bad one)."""

from __future__ import annotations

import argparse
import sys

from archir.errors import ArchirError

HELP = "validate spec files: types, kinds, shapes (exit 2 with a located message if bad)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", help="spec files (YAML or JSON)")


def run(args: argparse.Namespace) -> int:
    from archir.spec import load_spec

    bad = 0
    for path in args.specs:
        try:
            spec = load_spec(path)  # refuses hostile files before anything heavy is imported
            if spec.is_concrete:
                from archir.cost import check_budget
                from archir.ir import build_graph

                check_budget(build_graph(spec))
                print(f"ok: {path}")
            else:
                print(f"ok: {path} (search space, {len(spec.nodes)} open node(s))")
        except ArchirError as exc:
            print(f"error: {exc}", file=sys.stderr)
            bad += 1
    return 2 if bad else 0
