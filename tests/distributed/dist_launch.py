"""Launch a worker script on N local ranks (gloo on CPU) with a hard timeout.

Each rank is a plain subprocess with the environment torchrun would give it (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port). Unlike torchrun, nothing here kills a rank
when another fails: a test sees whether the surviving rank ends on its own. Only after
``timeout`` seconds are the remaining ranks killed, and the result says so (``killed``)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int | None
    seconds: float  # from launch until this rank ended (or was killed)
    output: str
    killed: bool


def launch(script: str, args: list[str], nprocs: int = 2, timeout: float = 120.0, env: dict | None = None) -> list[RankResult]:
    port = free_port()
    base = dict(os.environ)
    base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nprocs),
                 "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    base.update(env or {})
    logs, procs = [], []
    t0 = time.monotonic()
    for r in range(nprocs):
        e = dict(base, RANK=str(r), LOCAL_RANK=str(r))
        log = open(_log_path(port, r), "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, script, *args], env=e, stdout=log, stderr=subprocess.STDOUT))
    ended = [None] * nprocs
    killed = [False] * nprocs
    while any(t is None for t in ended):
        now = time.monotonic() - t0
        for r, p in enumerate(procs):
            if ended[r] is None and p.poll() is not None:
                ended[r] = now
        if now > timeout:
            for r, p in enumerate(procs):
                if ended[r] is None:
                    p.kill()
                    p.wait()
                    ended[r], killed[r] = now, True
            break
        time.sleep(0.05)
    out = []
    for r, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text = log.read()
        log.close()
        os.unlink(log.name)
        out.append(RankResult(r, p.returncode, ended[r], text, killed[r]))
    return out


def _log_path(port: int, rank: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"svdcache-dist-{os.getpid()}-{port}-{rank}.log")


if __name__ == "__main__":  # python tests/distributed/dist_launch.py <scenario> [modes] [timeout]
    import tempfile

    scenario = sys.argv[1]
    modes = sys.argv[2] if len(sys.argv) > 2 else "ulysses"
    out = tempfile.mkdtemp(prefix=f"svdcache-{scenario}-")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cp_worker.py")
    for r in launch(script, [scenario, modes, out], timeout=float(sys.argv[3]) if len(sys.argv) > 3 else 300):
        tail = [ln for ln in r.output.splitlines() if ln.startswith("rank ")]
        print(f"rank {r.rank}: exit {r.returncode} after {r.seconds:.1f} s{' (killed)' if r.killed else ''}; "
              + " | ".join(tail))
        if r.returncode not in (0, 3):
            print("\n".join(r.output.splitlines()[-25:]))
    print("results in", out)
