"""The ``archir`` command line. The top floor: it may import searchers and exporters (lazily).

Each subcommand lives in its own module of this package (or of ``searchers``/``exporters``) exposing ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; only the module of the command being run is imported. User errors
(:class:`~archir.errors.ArchirError`) print one or two lines and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import NoReturn

from archir.errors import ArchirError

COMMANDS: dict[str, str] = {
    "validate": "archir.cli.validate",
    "show": "archir.cli.show",
    "blocks": "archir.cli.blocks",
    "schema": "archir.cli.schema",
    "train": "archir.cli.train",
    "tasks": "archir.cli.tasks",
    "mad": "archir.cli.mad",
    "import": "archir.cli.import_",
    "extract": "archir.cli.extract",
    "search": "searchers.cli_search",
    "report": "searchers.cli_report",
    "export": "exporters.cli_export",
    "latency": "exporters.cli_latency",
    "generate": "exporters.cli_generate",
}


def _module(name: str):
    try:
        return importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == COMMANDS[name]:
            return None
        raise


# OSError numbers that come from the user's disk or file system, reported as user errors
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EFBIG,
}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (plus a pointer to --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from archir import __version__

    parser = _Parser(
        prog="archir",
        description="Declarative graph compiler and neural-architecture search engine.",
    )
    parser.add_argument("--version", action="version", version=f"archir {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            continue
        mod = _module(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in COMMANDS else None
    if only is not None and _module(only) is None:
        print(f"archir: command '{only}' is not available in this build", file=sys.stderr)
        return 2
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ArchirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into a reader that stopped early (e.g. `| head`): not an error
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        # the disk or the file system refused a write (full, read-only, permissions): the
        # user's environment, not a bug
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"'{exc.filename}': " if exc.filename else ""
        print(f"error: {where}{exc.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
