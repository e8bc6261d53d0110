"""``archir blocks``: every registered kind with its role, parameters and source paper."""

from __future__ import annotations

import argparse
import json

HELP = "list every registered block kind: role, parameters (type = default), paper"

#: ``archir.registry.ROLES`` (listed here so that parsing the flags imports no torch)
ROLES = ("token_mixer", "channel_mixer", "norm", "embedding", "head")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--role", choices=ROLES, help="only kinds of this role")


def _params(kind) -> list[dict[str, str]]:
    out = []
    for name, f in kind.params.model_fields.items():
        ann = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
        default = f.get_default(call_default_factory=True)
        out.append({"name": name, "type": ann, "default": repr(default)})
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from archir import registry

    kinds = registry.kinds(args.role)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "kind": k.name,
                        "role": k.role,
                        "summary": k.summary,
                        "paper": k.paper,
                        "recurrent": k.recurrent,
                        "state_grows": k.state_grows,
                        "flops_exact": k.flops_exact,
                        "lacks": dict(k.lacks),
                        "params": _params(k),
                    }
                    for k in kinds
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="archir block kinds", show_lines=True)
    for col in ("kind", "role", "parameters (type = default)", "source"):
        table.add_column(col, overflow="fold")
    for k in kinds:
        params = "\n".join(f"{p['name']}: {p['type']} = {p['default']}" for p in _params(k))
        table.add_row(
            k.name,
            k.role,
            escape(params) or "-",
            escape(k.summary) + "\n[dim]" + escape(k.paper) + "[/dim]",
        )
    Console(width=max(Console().width, 120)).print(table)
    return 0
