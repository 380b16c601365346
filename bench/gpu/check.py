#!/usr/bin/env python
"""The staged GPU check of SVD-Cache: one command, a time budget, a table whatever happens.

    python bench/gpu/check.py --budget 300 [--out DIR]       # one CUDA GPU, no network, no weights
    python bench/gpu/check.py --tiny --budget 60 [--out DIR]  # CPU, Triton interpreter, tiny shapes (CI)

Stages, each in its own process (bench/gpu/stages.py) with its own time limit, killed (SIGKILL, its
whole process group) when it runs past it:

  env         versions, device, CUDA capability; on a GPU it refuses to run with TRITON_INTERPRET set
  precompile  every kernel variant the later stages launch, run once in a process pool (Triton's
              on-disk cache keeps the binaries for the later stage processes): the timings include no
              compile; the number of kernels compiled is counted
  parity      each op (split, reconstruct, reconstruct_sum / reconstruct_stacked, residual_codes,
              gram_update) against its reference at FLUX.1-dev shapes in bf16 (bench/gpu/ops/)
  kernels     timings through the plans the runtime uses, with GB/s against the card's spec peak and
              its measured copy bandwidth
  e2e         FLUX.1-dev width (few blocks), random weights: uncached, the default, the default with
              cuda_graphs, TaylorSeer o1; each call's mode read from svdcache.stats (bench/gpu/e2e.py)

Statuses: ok, partial (what ran passed; items left out for lack of time), failed, timed out (killed at
its limit), skipped, interrupted (the driver got SIGTERM / SIGINT). Each stage gets a share of what is
left of the budget (what an early stage does not use goes to the later ones) and checks the time
left between items; every stage appends JSON lines to DIR/gpu_check_<card>.jsonl as it goes. The
table (stage | status | seconds | numbers, then the stages' detail tables) is rendered from that file
at the end, and also when this process gets SIGTERM or SIGINT or exits early:
DIR/gpu_check_<card>.md, printed too (``--render JSONL`` redraws it from the JSON lines alone, e.g.
after a SIGKILL of this process). The whole run, table included, ends within the budget. Exit status
0 if every stage run passed (128 + the signal's number if one stopped it).

This process imports no torch: rendering the table takes milliseconds.
"""
from __future__ import annotations

import time

T0 = time.monotonic()

import argparse  # noqa: E402
import atexit  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STAGES = ("env", "precompile", "parity", "kernels", "e2e")
# Share of the budget left when a stage starts: weight / sum of the weights of the stages still to run;
# at least FLOOR seconds (a stage is skipped if that much is not left for it and for the later stages'
# floors).
# GPU at 300 s: env ~16 s, precompile ~93 s (about 90 variants on 16 processes, 3-23 s a compile with
# Triton 3.6), then parity ~50 s, kernels and e2e what is left (e2e gets about half of it).
WEIGHTS = {"env": 1, "precompile": 6, "parity": 3, "kernels": 3, "e2e": 6}
TINY_WEIGHTS = {"env": 1, "precompile": 6, "parity": 2, "kernels": 2, "e2e": 2}
FLOOR = {"env": 10, "precompile": 15, "parity": 15, "kernels": 15, "e2e": 30}
TINY_FLOOR = {"env": 8, "precompile": 4, "parity": 4, "kernels": 4, "e2e": 5}


class Interrupted(BaseException):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "gpu"


def card_name(tiny: bool) -> str:
    if tiny:
        return "cpu-tiny"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        name = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    except Exception:
        name = ""
    return slug(name) if name else "gpu"


# ---------------------------------------------------------------------------------------------------
# Rendering (from the JSONL alone)
# ---------------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    recs = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass  # a line cut by a kill
    except OSError:
        pass
    return recs


def f(v, p=2, unit=""):
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{p}f}{unit}"
    return f"{v}{unit}"


def g(v, p=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, float)):
        return f"{v:.{p}g}"
    return str(v)


def cell(s) -> str:
    return str(s).replace("|", "/").replace("\n", " ")


def render(recs: list[dict], logs: dict | None = None) -> str:
    run = next((r for r in recs if r.get("type") == "run"), {})
    by = {s: [r for r in recs if r.get("stage") == s] for s in STAGES}
    L = [f"# SVD-Cache GPU check: {run.get('card', '?')}", ""]
    fin = next((r for r in reversed(recs) if r.get("type") == "final"), None)
    total = fin["seconds"] if fin else None
    L.append(f"{run.get('date', '?')}; `{run.get('command', 'bench/gpu/check.py')}`; "
             f"budget {f(run.get('budget'), 0)} s, "
             f"run {f(total, 1)} s{'; ' + fin['note'] if fin and fin.get('note') else ''}.")
    if run.get("tiny"):
        L += ["", "**Tiny run: CPU, Triton interpreter, small shapes, a hidden-64 FLUX: it shows that every stage "
              "runs and reports; its times are not GPU speeds.**"]
    L += ["", "| stage | status | seconds | numbers |", "|---|---|---|---|"]
    for s in STAGES:
        end = next((r for r in by[s] if r.get("type") == "end"), None)
        summ = next((r for r in by[s] if r.get("type") == "summary"), None)
        status = end["status"] if end else ("running" if any(r.get("type") == "begin" for r in by[s]) else "not run")
        secs = f(end.get("seconds"), 1) if end else "-"
        if end and end.get("limit"):
            secs += f" (limit {end['limit']:.0f})"
        nums = summ["numbers"] if summ else ""
        reason = end.get("reason") if end else ""
        if reason:
            nums = f"{reason}" + (f"; {nums}" if nums else "")
        if not summ and end and end["status"] not in ("skipped",):
            n = sum(r.get("type") == "row" for r in by[s])
            nums += f"{'; ' if nums else ''}no summary: {n} row{'' if n == 1 else 's'} written before it ended"
        L.append(f"| {s} | {status} | {secs} | {cell(nums)} |")
    L += ["", "Status: ok (ran and passed); partial (what it ran passed, items were left out for lack of time); "
          "failed; timed out (killed at its limit); skipped (not run); interrupted (the driver was stopped). "
          "Detail tables follow, from the stages' JSON lines."]
    L += _env(by["env"]) + _precompile(by["precompile"]) + _parity(by["parity"]) + _kernels(by["kernels"])
    L += _e2e(by["e2e"], tiny=bool(run.get("tiny")))
    bad = [s for s in STAGES for r in by[s]
           if r.get("type") == "end" and r["status"] in ("failed", "timed out", "interrupted")]
    tails = [(s, logs[s]) for s in bad if logs and logs.get(s)]
    if tails:
        L += ["", "## Log tails of the stages that did not pass", ""]
        for s, tail in tails:
            L += [f"`{s}`:", "", "```", *tail, "```", ""]
    return "\n".join(L).rstrip() + "\n"


def _rows(recs):
    return [r for r in recs if r.get("type") == "row"]


def _env(recs):
    rows = _rows(recs)
    if not rows:
        return []
    r = rows[0]
    keys = ("device", "capability", "memory_gib", "sms", "python", "torch", "triton", "diffusers", "diffusers_path",
            "numpy", "cuda",
            "TRITON_INTERPRET", "triton_cache", "cpus")
    return ["", "## env", "", "; ".join(f"{k} {r[k]}" for k in keys if k in r) + "."]


def _precompile(recs):
    rows = [r for r in _rows(recs) if r.get("kind") in ("op", "rt", "probe")]
    if not rows:
        return []
    L = ["", "## precompile", ""]
    plan = next((r for r in _rows(recs) if r.get("kind") == "plan"), None)
    if plan:
        L.append(f"{plan['variants']} variants queued first on {plan['workers']} workers (Triton cache: "
                 f"{plan['triton_cache']}), more after the rank probe; {len(rows)} finished: the op cases at the "
                 f"parity / timing shapes, and the runtime's launches "
                 f"(split orders 1 and 2, reconstruct with 0-2 terms and int4 codes, residual_codes int4) at the e2e "
                 f"streams' rows for ranks of each kernel specialisation.")
    probe = next((r for r in rows if r.get("kind") == "probe"), None)
    if probe:
        res = f"ranks {probe.get('ks')}" if probe.get("ok") else f"failed: {probe.get('error')}"
        L.append(f"e2e rank probe: {res} "
                 f"({f(probe.get('s'), 1)} s).")
    slow = sorted((r for r in rows if r.get("ok")), key=lambda r: -(r.get("s") or 0))[:3]
    if slow:
        L.append("Slowest: " + "; ".join(f"{r.get('variant')} {f(r.get('s'), 1)} s" for r in slow) + ".")
    for r in rows:
        if not r.get("ok"):
            L.append(f"- FAILED {r.get('variant', r.get('module'))}: {r.get('error')}")
    return L


def _parity(recs):
    rows = [r for r in _rows(recs) if "op" in r]
    if not rows:
        return []
    n_ok = sum(bool(r.get("ok")) for r in rows)
    L = ["", f"## parity ({n_ok}/{len(rows)} pass)", "",
         "Max |kernel - reference| against the tolerance, relative to the output's scale: 16-bit outputs 2 ulps "
         "(against the reference on the operands the tensor-core dot rounds to 16 bits, on a GPU), fp32 outputs "
         "summation-order bounds; against the exact reference on a GPU a gross-error bound (32 unit roundoffs); "
         "residual codes: scales 1e-5 relative, at most 1e-3 of the codes off by one.", "",
         "| op | case | k | dtype | output | vs | max err | tol | err/tol | |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "ok" if r.get("ok") else "**FAIL**" + (f" {r['error']}" if r.get("error") else "")
        L.append(f"| {r['op']} | {cell(r.get('case'))} | {r.get('k')} | {r.get('dtype')} | {cell(r.get('out'))} | "
                 f"{r.get('against')} | {g(r.get('err'))} | {g(r.get('tol'))} | {f(r.get('ratio'), 2)} | "
                 f"{cell(mark)} |")
    return L


def _kernels(recs):
    rows = _rows(recs)
    yard = next((r for r in rows if r.get("kind") == "yardstick"), None)
    ops = [r for r in rows if "op" in r]
    host = [r for r in rows if r.get("kind") == "host"]
    if not (yard or ops):
        return []
    L = ["", "## kernels", ""]
    if yard:
        L.append(f"{yard.get('device')}: device-to-device copy {f(yard.get('copy_gbs'), 0)} GB/s (read + write); spec "
                 f"peak {f(yard.get('peak_gbs'), 0) + ' GB/s' if yard.get('peak_gbs') else 'unknown'}. Times: median "
                 f"of repeats (GPU: CUDA events, L2 flushed between calls; CPU: perf_counter) through the plan the "
                 f"runtime uses (SplitPlan, ReconstructPlan, ReconstructSumPlan; residual_codes and gram_update as "
                 f"ops). GB/s from the minimal bytes (inputs read once, outputs written once); ideal: the least "
                 f"traffic any implementation moves, at copy bandwidth.")
    L += ["", "| op | case | k | ms | GB/s | % peak | % copy | TFLOP/s | eager ms | x eager | ideal ms | x ideal |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ops:
        ms = f(r.get("ms"), 4) if r.get("ms") else ("ERROR " + r.get("error", "") if r.get("error") else "-")
        L.append(f"| {r['op']} | {cell(r.get('case'))} | {r.get('k')} | {cell(ms)} | {g(r.get('gbs'))} | "
                 f"{f(r.get('pct_peak'), 0)} | {f(r.get('pct_copy'), 0)} | {g(r.get('tflops'))} | "
                 f"{f(r.get('eager_ms'), 4)} | {f(r.get('x_eager'), 2)} | {f(r.get('ideal_ms'), 4)} | "
                 f"{f(r.get('x_ideal'), 2)} |")
    notes = sorted({r["note"] for r in ops if r.get("note")})
    L += [f"- {n}" for n in notes]
    if host:
        L += ["", "Host cost per call (tiny shape: Python and launch only; x 114 features = the floor of a cached "
              "FLUX.1-dev step): " + "; ".join(f"{h['call']}: {f(h.get('host_us'), 1)} us" for h in host) + "."]
    return L


def _e2e(recs, tiny: bool):
    rows = _rows(recs)
    model = next((r for r in rows if r.get("kind") == "model"), None)
    out = [r for r in rows if r.get("kind") == "row"]
    if not (model or out):
        return []
    L = ["", "## e2e", ""]
    if model:
        L.append(f"{model['note']}. Random weights: the few blocks keep every row inside the budget; the counted "
                 "FLOPs ratio includes the non-block work (embedders, final layer), a larger share here than in "
                 "the 57-block model.")
    L.append("Calls full + cached: each call's mode read from `svdcache.stats(model).total` before and after it "
             "(F = full, c = cached, in order); the runtime's own per-generation counts (`last_generation`) in "
             "brackets. Latency: the sum of a generation's call times (CUDA events / perf_counter), median of "
             "the timed generations (count in brackets) after one warm-up generation (zero-setup basis, FLOPs "
             "counting, compiles); wall adds the Euler update and the counter reads. FLOPs ratio: "
             "`stats(model).last_generation.flops_ratio`. Efficiency = speed-up / FLOPs ratio"
             + ("." if tiny else " (target >= 0.95 at N = 4..8)."))
    L += ["", "| row | N | status | calls full + cached (runtime) | modes | full call ms | cached call ms | "
          "latency ms | "
          "speed-up | FLOPs ratio | efficiency | wall ms | ranks | notes |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out:
        if r.get("status") != "ok":
            L.append(f"| {r['method']} | {r.get('N')} | {r.get('status')} | - | - | - | - | - | - | - | - | - | - | "
                     f"{cell(r.get('reason', ''))} |")
            continue
        eff = r.get("efficiency")
        mark = ""
        in_range = isinstance(r.get("N"), int) and 4 <= r["N"] <= 8
        if not tiny and r["method"] != "uncached" and in_range and eff is not None:
            mark = " met" if eff >= 0.95 else " **miss**"
        counts = f"{r.get('n_full')} + {r.get('n_cached')}"
        if r.get("stats_full") is not None:
            counts += f" ({r['stats_full']} + {r['stats_cached']})"
        notes = []
        if r.get("mode_mismatch"):
            notes.append("**per-call modes disagree with the runtime's counts**")
        if r.get("fallbacks"):
            notes.append(f"{r['fallbacks']} fallbacks")
        if r.get("graphs"):
            notes.append(f"graphs: {r['graphs']}")
        if r.get("compiles_timed"):
            notes.append(f"**{r['compiles_timed']} kernels compiled during the timed generations**")
        if r.get("compiles_warmup"):
            notes.append(f"{r['compiles_warmup']} compiled in the warm-up")
        if r.get("rel_err") is not None:
            notes.append(f"latent rel. err {g(r['rel_err'], 2)}")
        if r.get("cache_mib") is not None:
            notes.append(f"cache {g(r['cache_mib'])} MiB")
        if r.get("peak_gib") is not None:
            notes.append(f"peak {f(r['peak_gib'], 2)} GiB")
        if r.get("online_basis_s"):
            notes.append(f"online basis {f(r['online_basis_s'], 2)} s")
        if r.get("finite") is False:
            notes.append("**output not finite**")
        if r.get("config"):
            notes.append(f"`{r['config']}`")
        L.append(f"| {r['method']} | {r.get('N')} | ok | {counts} | {r.get('modes', '')} | {f(r.get('full_ms'), 2)} | "
                 f"{f(r.get('cached_ms'), 2)} | {f(r['latency_s'] * 1e3, 1)} ({r.get('repeats')}) | "
                 f"{f(r.get('speedup'), 2)} | {f(r.get('flops_ratio'), 2)} | {f(eff, 2)}{mark} | "
                 f"{f(r['wall_s'] * 1e3, 1)} | {cell(r.get('ranks', '-'))} | {cell('; '.join(notes))} |")
    return L


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------
class Driver:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.stages = [s for s in STAGES if s in args.only.split(",")] if args.only else list(STAGES)
        self.card = card_name(self.tiny)
        os.makedirs(args.out, exist_ok=True)
        self.base = os.path.join(args.out, f"gpu_check_{self.card}")
        self.jsonl = self.base + ".jsonl"
        self.md = self.base + ".md"
        self.logdir = self.base + "_logs"
        os.makedirs(self.logdir, exist_ok=True)
        self.t_end = T0 + args.budget - (2.0 if self.tiny else 5.0)  # the last stage is killed by then
        self.results: dict[str, dict] = {}
        self.current = None  # (stage, Popen, start, limit)
        self.finished = False
        self.tmp_cache = None
        if args.triton_cache:
            self.cache = args.triton_cache
        else:
            self.cache = self.tmp_cache = tempfile.mkdtemp(prefix="svdcache-gpu-check-triton-")
        with open(self.jsonl, "w"):
            pass  # a fresh file per run
        self.fd = os.open(self.jsonl, os.O_WRONLY | os.O_APPEND)

    def write(self, **rec) -> None:
        os.write(self.fd, (json.dumps(rec) + "\n").encode())

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def log(self, msg: str) -> None:
        print(f"[check {self.elapsed():6.1f}s] {msg}", flush=True)

    def child_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        env["TRITON_CACHE_DIR"] = self.cache
        if self.tiny:
            env["TRITON_INTERPRET"] = "1"
            for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[v] = "1"
        return env

    def params(self) -> dict:
        a = self.args
        return dict(tiny=self.tiny, ks=a.ks, steps=a.steps, intervals=a.intervals, repeats=a.repeats,
                    e2e_layers=a.e2e_layers, seed=a.seed, workers=a.workers, hang=a.inject_hang,
                    stages=",".join(self.stages), no_probe=a.no_probe)

    def limit_for(self, stage: str) -> tuple[float, str | None]:
        w = TINY_WEIGHTS if self.tiny else WEIGHTS
        fl = TINY_FLOOR if self.tiny else FLOOR
        todo = self.stages[self.stages.index(stage):]
        left = self.t_end - time.monotonic()
        later_floor = sum(fl[s] for s in todo[1:])
        share = left * w[stage] / sum(w[s] for s in todo)
        limit = min(max(share, fl[stage]), left - later_floor)  # its share, the later stages' floors kept
        if limit < fl[stage]:  # not enough for every floor: this stage first
            limit = min(fl[stage], left)
        if limit < min(fl[stage], 3.0):
            return 0.0, f"budget: {left:.0f} s left"
        return limit, None

    def run(self) -> int:
        a = self.args
        cmd = "python bench/gpu/check.py " + " ".join(sys.argv[1:])
        self.write(type="run", card=self.card, tiny=self.tiny, budget=a.budget, stages=self.stages, command=cmd.strip(),
                   date=datetime.datetime.now().isoformat(timespec="seconds"), triton_cache=self.cache)
        self.log(f"{self.card}: budget {a.budget:.0f} s, stages {', '.join(self.stages)}; JSONL {self.jsonl}")
        abort = None
        for s in STAGES:
            if s not in self.stages:
                self.end(s, "skipped", 0.0, reason="not selected (--only)")
                continue
            if abort:
                self.end(s, "skipped", 0.0, reason=abort)
                continue
            limit, why = self.limit_for(s)
            if why:
                self.end(s, "skipped", 0.0, reason=why)
                continue
            status = self.run_stage(s, limit)
            if s == "env" and status != "ok":
                abort = "env stage did not pass"
        return self.finish()

    def run_stage(self, stage: str, limit: float) -> str:
        grace = min(3.0 if self.tiny else 8.0, 0.15 * limit)
        deadline = time.time() + limit - grace
        log = os.path.join(self.logdir, f"{stage}.log")
        cmd = [sys.executable, os.path.join(HERE, "stages.py"), stage, "--jsonl", self.jsonl, "--deadline",
               f"{deadline:.3f}", "--params", json.dumps(self.params())]
        start = time.monotonic()
        with open(log, "w") as lf:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.child_env(), stdout=lf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.current = (stage, proc, start, limit)
        self.write(type="begin", stage=stage, pid=proc.pid, limit=round(limit, 1), t=round(self.elapsed(), 2))
        self.log(f"{stage}: started (limit {limit:.0f} s, pid {proc.pid})")
        try:
            rc = proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            self.kill(proc)
            rc, timed_out = proc.returncode, True
        self.kill_group(proc)  # leftovers (a pool's workers)
        self.current = None
        secs = time.monotonic() - start
        summ = next((r for r in read_jsonl(self.jsonl) if r.get("stage") == stage and r.get("type") == "summary"), None)
        if timed_out:
            status, reason = "timed out", f"killed at its {limit:.0f} s limit"
        elif rc == 0 and summ and summ.get("ok") and summ.get("partial"):
            status, reason = "partial", "items left out for lack of time"
        elif rc == 0 and summ and summ.get("ok"):
            status, reason = "ok", None
        else:
            status = "failed"
            reason = f"exit status {rc}" + ("" if summ else ", no summary")
        self.end(stage, status, secs, reason=reason, rc=rc, limit=limit)
        return status

    def kill(self, proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def kill_group(self, proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def end(self, stage, status, secs, reason=None, rc=None, limit=None) -> None:
        self.results[stage] = dict(status=status, seconds=secs)
        rec = dict(type="end", stage=stage, status=status, seconds=round(secs, 2))
        if reason:
            rec["reason"] = reason
        if rc is not None:
            rec["rc"] = rc
        if limit is not None:
            rec["limit"] = round(limit, 1)
        self.write(**rec)
        if status != "skipped" or reason != "not selected (--only)":
            self.log(f"{stage}: {status} ({secs:.1f} s){' - ' + reason if reason else ''}")

    def finish(self, note: str | None = None) -> int:
        """Render and write the table (once), whatever state the run is in."""
        if self.finished:
            return self.exit_code()
        self.finished = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (ValueError, OSError):
                pass
        if self.current is not None:
            stage, proc, start, limit = self.current
            self.kill(proc)
            self.current = None
            self.end(stage, "interrupted", time.monotonic() - start, reason=note or "the driver was stopped",
                     rc=proc.returncode, limit=limit)
        for s in STAGES:
            if s not in self.results:
                self.end(s, "skipped", 0.0, reason="not selected (--only)" if s not in self.stages else
                         (note or "not reached"))
        self.write(type="final", seconds=round(self.elapsed(), 2), note=note)
        logs = {}
        for s in STAGES:
            p = os.path.join(self.logdir, f"{s}.log")
            if os.path.exists(p):
                with open(p, errors="replace") as lf:
                    logs[s] = [ln.rstrip("\n")[:300] for ln in lf.readlines()[-20:]]
        text = render(read_jsonl(self.jsonl), logs)
        tmp = self.md + ".tmp"
        with open(tmp, "w") as mf:
            mf.write(text)
        os.replace(tmp, self.md)
        print("\n" + text, flush=True)
        print(f"written: {self.md} and {self.jsonl} (stage logs: {self.logdir}/)", flush=True)
        if self.tmp_cache:
            shutil.rmtree(self.tmp_cache, ignore_errors=True)
        return self.exit_code()

    def exit_code(self) -> int:
        return 0 if all(self.results.get(s, {}).get("status") == "ok" for s in self.stages) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run, table included")
    ap.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, tiny shapes (CI)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="where the table and JSONL go")
    ap.add_argument("--only", default="", help="comma-separated stages to run (the others are reported skipped)")
    ap.add_argument("--ks", default="", help="basis ranks of the parity / timing cases (default 2,32; tiny 2,16)")
    ap.add_argument("--steps", type=int, default=0, help="e2e: steps per generation (default 50; tiny 12)")
    ap.add_argument("--intervals", default="", help="e2e: intervals N (default 4,6,8; tiny 4)")
    ap.add_argument("--repeats", type=int, default=0, help="e2e: timed generations per row at most (default 3; tiny 2)")
    ap.add_argument("--e2e-layers", default="2,4", help="e2e: double,single blocks (FLUX.1-dev has 19,38)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="precompile processes (default: CPUs, at most 16)")
    ap.add_argument("--triton-cache", default="", help="Triton cache directory to use (default: a fresh one)")
    ap.add_argument("--no-probe", action="store_true", help="precompile: no e2e rank probe")
    ap.add_argument("--render", metavar="JSONL", help="only render the table of an existing JSONL file")
    ap.add_argument("--inject-hang", default="", help=argparse.SUPPRESS)  # tests: this stage hangs
    args = ap.parse_args(argv)
    if args.render:
        print(render(read_jsonl(args.render)), end="")
        return 0
    bad = [s for s in args.only.split(",") if s and s not in STAGES]
    if bad:
        ap.error(f"--only: unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    drv = Driver(args)

    def on_signal(signum, frame):
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    atexit.register(lambda: drv.finish(note="the driver exited early"))
    try:
        return drv.run()
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        drv.finish(note=f"the driver got {name}")
        return 128 + e.signum
    except BaseException as e:
        drv.finish(note=f"the driver failed: {type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
