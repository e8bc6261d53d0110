"""``archir schema``: the JSON Schema of spec files, for editors (yaml-language-server)."""

from __future__ import annotations

import argparse
import json

HELP = "print the JSON Schema of the spec format (for editor completion and checking)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--indent", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    from archir.spec.schema import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=args.indent))
    return 0
