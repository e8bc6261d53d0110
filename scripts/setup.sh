#!/usr/bin/env bash
# Set up archir on a fresh machine: a virtual environment in .venv with everything installed.
# torch is pinned to 2.13.0 (the CPU build; an unpinned torch pulls a multi-GB CUDA build).
# pip keeps no cache (PIP_NO_CACHE_DIR): a cached copy of each downloaded wheel only adds to
# the disk the install needs, and CI once ran out of it (2026-11-29: "No space left on
# device" while installing the dev extras).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_CACHE_DIR=1
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
