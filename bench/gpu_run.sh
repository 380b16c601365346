#!/usr/bin/env bash
# The one command to run on a machine with one CUDA GPU and no network: the kernel benchmark
# (bench/gpu_kernels.py), then the end-to-end FLUX-sized run (bench/gpu_e2e.py).
#
#     bash bench/fetch_wheels.sh          # first, where PyPI is reachable: diffusers' wheel into .whl/
#     bash bench/gpu_run.sh [all|kernels|e2e]
#
# From this workplace's device tool: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600).
# The carried wheels are installed into /tmp/site (nothing else is touched); results are written to
# bench/results/gpu_{kernels,e2e}_<card>.md and, when $OUT is set, copied there with the whole log.
# "all" is one command of at most 7 minutes including calibration: the kernel table first (KERNELS_BUDGET_S,
# default 110 s; its own default is 280), then the end-to-end run (E2E_BUDGET_S, default 270 s: uncached,
# calibration with an fp32 eigh, the sync-free rows, a cuda_graphs row, the other SVD-Cache rows,
# TaylorSeer), each script cut short by its budget rather than killed, and the whole run by ALL_LIMIT_S
# (default 415 s). SVD_RANK=k fixes the rank of every feature (the e2e script's --rank), SVD_TAU=t its
# energy threshold. Run "kernels" or "e2e" alone for a full-budget run of one of them. Exit status: 0 if both scripts passed.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
case $MODE in all|kernels|e2e) ;; *) echo "usage: bash bench/gpu_run.sh [all|kernels|e2e]" >&2; exit 2;; esac
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_run.log") 2>&1
fi
STAMP=$(mktemp)
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_run.sh: installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu_run.sh: no .whl/*.whl (bash bench/fetch_wheels.sh, then carry .whl): using the installed packages" >&2
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv || echo "gpu_run.sh: nvidia-smi failed" >&2
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.cuda.is_available())" || { echo "gpu_run.sh: torch/triton do not import" >&2; exit 3; }
"$PY" -c "import diffusers, transformers; from diffusers import FluxTransformer2DModel, TaylorSeerCacheConfig; \
print('diffusers', diffusers.__version__, diffusers.__file__, '| transformers', transformers.__version__)" \
    || echo "gpu_run.sh: diffusers' FLUX model does not import: gpu_e2e.py will fail (gpu_kernels.py needs no diffusers)" >&2

rc=0
T0=$SECONDS
LIMIT=${ALL_LIMIT_S:-415}
if [ "$MODE" = all ] || [ "$MODE" = kernels ]; then
    KB=${KERNELS_BUDGET_S:-$([ "$MODE" = all ] && echo 110 || echo 280)}
    echo "== bench/gpu_kernels.py --budget-s $KB =="
    timeout -k 10 $((KB + 40)) "$PY" bench/gpu_kernels.py --budget-s "$KB" || { echo "gpu_kernels.py: exit $?"; rc=1; }
    if [ -n "${OUT:-}" ]; then find bench/results -maxdepth 1 -name 'gpu_kernels*.md' -newer "$STAMP" -exec cp {} "$OUT"/ \; ; fi
fi
if [ "$MODE" = all ] || [ "$MODE" = e2e ]; then
    EB=${E2E_BUDGET_S:-270}
    if [ "$MODE" = all ]; then  # what is left of the whole run's limit, less the report and copies
        left=$((LIMIT - (SECONDS - T0) - 25))
        [ "$left" -lt "$EB" ] && EB=$left
    fi
    echo "== bench/gpu_e2e.py --budget-s $EB =="
    timeout -k 10 $((EB + 30)) "$PY" bench/gpu_e2e.py --budget-s "$EB" ${OUT:+--copy-dir "$OUT"} \
        ${SVD_RANK:+--rank "$SVD_RANK"} ${SVD_TAU:+--tau "$SVD_TAU"} || { echo "gpu_e2e.py: exit $?"; rc=1; }
fi
echo "gpu_run.sh: $((SECONDS - T0)) s"

if [ -n "${OUT:-}" ]; then
    find bench/results -maxdepth 1 -name 'gpu_*.md' -newer "$STAMP" -exec cp {} "$OUT"/ \;
    ls -l "$OUT"
fi
rm -f "$STAMP"
exit $rc
