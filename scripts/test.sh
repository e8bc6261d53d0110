#!/usr/bin/env bash
# Lint (ruff), format check, type-check (mypy) and the default (fast) test suite.
# Assumes scripts/setup.sh ran. Extra arguments go to pytest (e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
dirs=()
for d in archir searchers exporters tests benchmarks; do [ -d "$d" ] && dirs+=("$d"); done
pkgs=()
for d in archir searchers exporters; do [ -f "$d/__init__.py" ] && pkgs+=(-p "$d"); done
$V/ruff check "${dirs[@]}"
$V/ruff format --check "${dirs[@]}"
$V/mypy "${pkgs[@]}"
$V/python -m pytest -q -n 2 --dist worksteal "$@"
