"""The kernels compile for a real GPU (sm_90a: wgmma, shared memory, dot shapes) without one.

The interpreter accepts programs a GPU compile rejects (tl.dot dims < 16, layouts, shared memory),
so CI also compiles the FLUX-shape launches ahead of time with Triton's bundled NVIDIA toolchain
(bench/aot_kernels.py --quick). Skipped where that backend is missing."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "aot_kernels.py"), "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "COMPILE ERROR" not in out
    assert out.count("wgmma") >= 4, out[-4000:]  # the 16-bit launches use Hopper tensor cores
