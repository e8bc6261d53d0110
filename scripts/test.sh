#!/usr/bin/env bash
# Lint, type-check and run the default (fast) test suite. Assumes scripts/setup.sh ran.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
$V/ruff check archir searchers exporters tests benchmarks
$V/ruff format --check archir searchers exporters tests benchmarks
$V/mypy
$V/python -m pytest -q -n 2 "$@"
