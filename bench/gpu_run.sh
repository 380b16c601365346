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
# "all" fits a 10-minute command: the kernel script gets KERNELS_BUDGET_S (default 150 s, its own default
# is 280) and the end-to-end one E2E_BUDGET_S (default 330 s, under its 6-minute target); run "kernels" or
# "e2e" alone for a full-budget run of one of them. Exit status: 0 if both scripts passed.
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
if [ "$MODE" = all ] || [ "$MODE" = kernels ]; then
    KB=${KERNELS_BUDGET_S:-$([ "$MODE" = all ] && echo 150 || echo 280)}
    echo "== bench/gpu_kernels.py --budget-s $KB =="
    timeout -k 10 $((KB + 90)) "$PY" bench/gpu_kernels.py --budget-s "$KB" || { echo "gpu_kernels.py: exit $?"; rc=1; }
fi
if [ "$MODE" = all ] || [ "$MODE" = e2e ]; then
    EB=${E2E_BUDGET_S:-330}
    echo "== bench/gpu_e2e.py --budget-s $EB =="
    timeout -k 10 $((EB + 60)) "$PY" bench/gpu_e2e.py --budget-s "$EB" ${OUT:+--copy-dir "$OUT"} \
        || { echo "gpu_e2e.py: exit $?"; rc=1; }
fi

if [ -n "${OUT:-}" ]; then
    find bench/results -maxdepth 1 -name 'gpu_*.md' -newer "$STAMP" -exec cp {} "$OUT"/ \;
    ls -l "$OUT"
fi
rm -f "$STAMP"
exit $rc
