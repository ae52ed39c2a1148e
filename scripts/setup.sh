#!/usr/bin/env bash
# Creates .venv with the pinned local set: the CPU build of torch 2.13.0 (an unpinned `torch`
# would pull a multi-GB CUDA build) and the package with its dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -r requirements-local.txt
.venv/bin/python -m pip install -q --no-deps -e .
