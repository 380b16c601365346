#!/usr/bin/env bash
# Download, on a machine with network access to PyPI, the wheels that the lent GPU machine lacks, into
# .whl/ (git-ignored) for bench/gpu_run.sh to install there (that machine has no network).
#
#     bash bench/fetch_wheels.sh
#
# The GPU machine's image (/work/.library/device/KINDS.md) has Python 3.12, torch 2.11, triton 3.6 and
# every runtime need of diffusers 0.42.1 (Requires-Dist, printed below) except diffusers itself and
# importlib_metadata: filelock, huggingface-hub 1.33.0 (diffusers asks >=1.32.0,<3.0), numpy, regex,
# requests, safetensors 0.8.0 (asks >=0.8.0) and Pillow are there, as are svdcache's own imports (tqdm,
# safetensors, Pillow). importlib_metadata is not carried: diffusers imports it only on Python < 3.8
# (diffusers/utils/import_utils.py) and the install uses --no-deps. EXTRA="name==version ..." adds wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}

rm -rf .whl
mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "diffusers==${DIFFUSERS_VERSION}" ${EXTRA:-}

echo "diffusers ${DIFFUSERS_VERSION} Requires-Dist (without extras):"
"$PY" - <<'EOF'
import glob, zipfile
whl = glob.glob(".whl/diffusers-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            print("   ", line.split(":", 1)[1].strip())
EOF
echo "wheels in .whl/:"
ls -l .whl
du -sh .whl
