#!/usr/bin/env bash
# README command 2: set up, then run the test suite (CPU-only; kernels under Triton's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests -q "$@"
