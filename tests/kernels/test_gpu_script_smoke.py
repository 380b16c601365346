"""bench/gpu_kernels.py --cpu-smoke: the GPU script's whole code path (parity with emulated 16-bit dot
operands, copy bandwidth, timings, torch.compile with the eager backend, config sweep, report) at tiny
shapes under the interpreter, so the one blind run on a GPU does not die on a Python error."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_script_cpu_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "gpu_kernels.py"), "--cpu-smoke", "--out-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = (tmp_path / "gpu_kernels_cpu-smoke.md").read_text()
    assert "## Parity" in text and "FAIL" not in text and "ERROR" not in text
    for op in ("split C,R", "split order2+E+dR", "reconstruct taylor2+dR", "reconstruct reuse", "gram",
               "residual codes int4 (full step)", "| residual_codes int4 |", "| residual_codes int8 |"):
        assert op in text
    # the runtime's exact variants at the shapes production selects (smoke: small, k tiles forced)
    for op in ("split F_prev M=", "split C,R M=", "reconstruct 1 term+gate M=", "reconstruct 1 term+gate+int4 M=",
               "reconstruct 2 terms+gate+int4 M=", "reconstruct int4 dR", "reconstruct int8 dR",
               "reconstruct taylor1+int4 dR", "reconstruct taylor2+int4 dR"):
        assert op in text, op
    assert "Launch-config sweep" in text
    assert "## Host cost per call" in text and "ReconstructPlan, 2 terms" in text
    assert "| float16 |" in text and "| float32 |" in text
