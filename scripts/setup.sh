#!/usr/bin/env bash
# Set up .venv with everything svdcache needs (idempotent). On a machine without a GPU the CPU build
# of torch is pinned: an unpinned torch would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${SVDCACHE_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[test,bench]"
