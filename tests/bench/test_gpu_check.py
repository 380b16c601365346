"""bench/gpu/check.py, the staged GPU check, in its --tiny CPU mode: every stage runs in its own process
and reports; the e2e rows' full / cached calls are the runtime's; a stage that hangs is killed at its
limit and reported "timed out" with the table still written inside the budget; SIGTERM to the driver
mid-run still writes and prints the table (and leaves no stage process behind)."""
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = os.path.join(REPO, "bench", "gpu", "check.py")
STAGES = ("env", "precompile", "parity", "kernels", "e2e")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _records(out_dir):
    with open(os.path.join(out_dir, "gpu_check_cpu-tiny.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _ends(recs):
    return {r["stage"]: r for r in recs if r.get("type") == "end"}


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_tiny_run_every_stage_reports(tmp_path):
    t = time.monotonic()
    proc = subprocess.run([sys.executable, CHECK, "--tiny", "--budget", "60", "--out", str(tmp_path), "--workers", "2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert wall < 65, wall
    md = (tmp_path / "gpu_check_cpu-tiny.md").read_text()
    assert md in proc.stdout  # printed as well as written
    for s in STAGES:
        assert f"| {s} | ok |" in md, (s, md[:3000])
    recs = _records(tmp_path)
    ends = _ends(recs)
    assert [ends[s]["status"] for s in STAGES] == ["ok"] * 5
    summ = {r["stage"]: r for r in recs if r.get("type") == "summary"}
    assert all(summ[s]["ok"] for s in STAGES)

    # precompile: every variant run once in the pool, the e2e rank probe among them
    rows = [r for r in recs if r.get("stage") == "precompile" and r.get("type") == "row" and r.get("kind") != "plan"]
    assert rows and all(r["ok"] for r in rows)
    assert len({r["pid"] for r in rows}) == 2  # two worker processes
    assert any(r["kind"] == "probe" and r["ks"] for r in rows)

    # parity: every op checked, all within tolerance
    par = [r for r in recs if r.get("stage") == "parity" and r.get("type") == "row"]
    assert {r["op"] for r in par} == {"split", "reconstruct", "reconstruct_sum", "reconstruct_stacked",
                                      "residual_codes", "gram_update"}
    assert all(r["ok"] for r in par) and summ["parity"]["checked"] == len(par)
    # the 16-bit tensor-core dot path (forced under the interpreter, fp16) matches its emulated reference
    assert any(r["dtype"] == "float16" and r["against"] == "emulated" for r in par)

    # kernels: a time for every op through its plan, GB/s from the bytes moved
    ker = [r for r in recs if r.get("stage") == "kernels" and r.get("type") == "row" and "op" in r]
    assert {r["op"] for r in ker} >= {"split", "reconstruct", "reconstruct_sum", "residual_codes", "gram_update"}
    assert all(r["ms"] > 0 and r["gbs"] > 0 and "error" not in r for r in ker)

    # e2e: uncached, default, TaylorSeer o1 at N = 4 over 12 steps; cuda_graphs skipped on the CPU
    e2e = {(r["method"], r["N"]): r for r in recs if r.get("stage") == "e2e" and r.get("kind") == "row"}
    assert e2e[("default + cuda_graphs", 4)]["status"] == "skipped"
    assert "CUDA" in e2e[("default + cuda_graphs", 4)]["reason"]
    u = e2e[("uncached", "-")]
    assert u["status"] == "ok" and u["n_full"] == 12 and u["n_cached"] == 0 and u["stats_full"] is None
    # warm-up 1, interval 4: full calls at steps 0, 4, 8 (SVDCacheConfig's uniform schedule)
    want = "".join("F" if i % 4 == 0 else "c" for i in range(12))
    for method in ("default", "TaylorSeer o1"):
        r = e2e[(method, 4)]
        assert r["status"] == "ok", r
        # each call's mode was read from svdcache.stats around it, and agrees with the runtime's own
        # per-generation counts
        assert r["modes"] == want, r
        assert (r["n_full"], r["n_cached"]) == (3, 9) == (r["stats_full"], r["stats_cached"]), r
        assert r["mode_mismatch"] is False
        assert r["flops_ratio"] > 1.5 and r["speedup"] > 0 and r["latency_s"] > 0
        assert r["full_ms"] > 0 and r["cached_ms"] > 0
    assert "| default + cuda_graphs | 4 | skipped |" in md
    assert "| default | 4 | ok | 3 + 9 (3 + 9) | FcccFcccFccc |" in md


def test_hung_stage_is_timed_out_and_table_written_within_budget(tmp_path):
    budget = 24
    t = time.monotonic()
    proc = subprocess.run([sys.executable, CHECK, "--tiny", "--budget", str(budget), "--out", str(tmp_path),
                           "--only", "env,parity,kernels", "--inject-hang", "parity"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=budget + 30)
    wall = time.monotonic() - t
    assert wall < budget + 2, wall  # the table included
    assert proc.returncode == 1
    recs = _records(tmp_path)
    ends = _ends(recs)
    assert ends["env"]["status"] == "ok"
    assert ends["parity"]["status"] == "timed out" and "limit" in ends["parity"]["reason"]
    assert ends["parity"]["seconds"] <= ends["parity"]["limit"] + 1.5
    begin = next(r for r in recs if r.get("type") == "begin" and r.get("stage") == "parity")
    assert _gone(begin["pid"])
    assert any(r.get("type") == "begin" and r.get("stage") == "kernels" for r in recs)  # the run went on
    assert ends["precompile"]["status"] == ends["e2e"]["status"] == "skipped"
    md = (tmp_path / "gpu_check_cpu-tiny.md").read_text()
    assert "| parity | timed out |" in md and "| precompile | skipped |" in md
    assert "hang injected" in (tmp_path / "gpu_check_cpu-tiny.jsonl").read_text()
    assert "| parity | timed out |" in proc.stdout


def test_sigterm_to_the_driver_still_writes_the_table(tmp_path):
    proc = subprocess.Popen([sys.executable, CHECK, "--tiny", "--budget", "60", "--out", str(tmp_path),
                             "--only", "env,kernels", "--inject-hang", "kernels"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jsonl = tmp_path / "gpu_check_cpu-tiny.jsonl"
    t_end = time.monotonic() + 40
    hung = None
    while time.monotonic() < t_end and hung is None:
        time.sleep(0.2)
        if jsonl.exists():
            recs = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip().endswith("}")]
            if any(r.get("stage") == "kernels" and r.get("kind") == "hang" for r in recs):
                hung = next(r for r in recs if r.get("type") == "begin" and r.get("stage") == "kernels")
    assert hung is not None, "the kernels stage never started"
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert time.monotonic() - t < 10
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    md = (tmp_path / "gpu_check_cpu-tiny.md").read_text()
    assert "| env | ok |" in md and "| kernels | interrupted |" in md and "SIGTERM" in md
    assert "| e2e | skipped |" in md
    assert "| kernels | interrupted |" in out
    assert _gone(hung["pid"])  # the stage's process was killed with the driver
