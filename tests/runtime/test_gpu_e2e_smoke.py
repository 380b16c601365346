"""bench/gpu_e2e.py --tiny: the GPU end-to-end script's whole code path (random-weight FLUX built on the meta
device and materialised, FluxPipeline's scheduler loop, FLOP counting, calibrate, SVD-Cache rows from
svdcache.stats, diffusers' TaylorSeer rows with their cache bytes, report) at a tiny config on CPU, so the
one blind run on a GPU does not die on a Python error."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_e2e_tiny(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    copy = tmp_path / "copy"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "gpu_e2e.py"), "--tiny", "--intervals", "4,7",
         "--out-dir", str(tmp_path), "--copy-dir", str(copy)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    text = (tmp_path / "gpu_e2e_cpu-tiny.md").read_text()
    assert (copy / "gpu_e2e_cpu-tiny.md").read_text() == text
    assert "ERROR" not in text and "not finite" not in text and "skipped" not in text, text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    methods = [r.split("|")[1].strip() for r in rows]
    assert methods == (["uncached"] + ["SVD-Cache sync-free"] * 2 + ["SVD-Cache CUDA graphs"] + ["SVD-Cache"] * 2
                       + ["TaylorSeer (diffusers)"] * 2), methods  # sync-free first: kept if the budget runs out
    # the graph row ran its cached steps through the graph path (CPU stand-in) and computed what eager did
    m = re.search(r"CUDA graphs N=5: CPU stand-in \(ReplayGraph\): (\d+) captures, (\d+) replays", text)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) >= 20, text
    psnr = {(r.split("|")[1].strip(), r.split("|")[2].strip()): float(r.split("|")[13]) for r in rows[1:4]}
    assert abs(psnr[("SVD-Cache CUDA graphs", "5")] - psnr[("SVD-Cache sync-free", "5")]) < 0.05, psnr
    for r in rows[1:]:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        full, cached = (int(x) for x in re.match(r"(\d+) \+ (\d+)", cells[2]).groups())
        assert full + cached == 50 and cached > 0, r
        assert float(cells[5]) > 1.0, r  # FLOPs ratio counted, above 1
        assert cells[11] not in ("-", "0"), r  # cache bytes measured
        assert cells[12] not in ("-", "nan"), r  # latent PSNR vs uncached
    assert "calibrate:" in out and "float32 eigh" in out
    # ranks from svdcache.stats (the runtime's change subspace at its tau), not from the feature subspace
    assert "ranks (svdcache.stats)" in out and "ranks as the runtime uses them" in text
    from svdcache import SVDCacheConfig

    assert f"change subspace, tau = {SVDCacheConfig().tau}" in text and f"Taylor order {SVDCacheConfig().order}" in text
