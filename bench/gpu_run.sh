#!/usr/bin/env bash
# The GPU check in one command, on a machine with one CUDA GPU and no network (bench/gpu/check.py):
#
#     bash bench/fetch_wheels.sh     # first, where PyPI is reachable: diffusers' wheel into .whl/
#     bash bench/gpu_run.sh [check.py arguments]
#
# From this workplace's device tool: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=420).
# Installs the carried wheels (.whl/*.whl) into /tmp/site (nothing else is touched), unsets
# TRITON_INTERPRET (the GPU runs the compiled kernels; Triton 3.6's interpreter also breaks with
# numpy >= 2.4), then runs `python bench/gpu/check.py --budget ${BUDGET:-300} --out ${OUT:-bench/results}`:
# env, precompile, parity, kernels and e2e stages, each in its own process with its own time limit; the
# table is printed and written to $OUT/gpu_check_<card>.md whatever happens, with the stages' JSON lines
# in $OUT/gpu_check_<card>.jsonl and their logs in $OUT/gpu_check_<card>_logs/. The whole check, table
# included, ends within BUDGET seconds (the wheel install comes before, a few seconds). Extra arguments
# go to check.py (e.g. --intervals 4,6,8 --ks 2,32 --e2e-layers 2,4). Exit status: check.py's (0 if
# every stage passed; 3 if the wheels did not install).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
if [ -n "${OUT:-}" ]; then
    exec > >(tee -a "$OUT/gpu_run.log") 2>&1
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_run.sh: installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu_run.sh: no .whl/*.whl (bash bench/fetch_wheels.sh, then carry .whl): using the installed packages" >&2
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

exec "$PY" bench/gpu/check.py --budget "${BUDGET:-300}" --out "$OUT_DIR" "$@"
