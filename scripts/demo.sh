#!/usr/bin/env bash
# README command 1: set up, then run the demo on the embedded model (arguments go to the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m svdcache demo "$@"
