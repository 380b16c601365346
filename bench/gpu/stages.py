#!/usr/bin/env python
"""One stage of the GPU check, in its own process (started by bench/gpu/check.py, which kills it at
its time limit):

    python bench/gpu/stages.py STAGE --jsonl FILE --deadline EPOCH_S [--params JSON]

STAGE: env | precompile | parity | kernels | e2e. Each appends JSON lines to FILE as it goes (rows,
then one summary line with its "numbers" and whether it passed), checks the time left between
items (``--deadline``: wall-clock time by which its summary must be written; items that would not fit
are listed as skipped), and exits 0 if it passed, 1 if not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

STAGES = ("env", "precompile", "parity", "kernels", "e2e")


def op_modules():
    import importlib

    from bench.gpu.ops import MODULES

    return {m: importlib.import_module(f"bench.gpu.ops.{m}") for m in MODULES}


def make_ctx(stage, args, params, sink=None):
    from bench.gpu.common import Ctx, Sink

    import torch

    if not params.get("tiny"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the references are true fp32
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    sink = sink or Sink(args.jsonl, stage)
    return Ctx(stage=stage, tiny=bool(params.get("tiny")), deadline=args.deadline, sink=sink, params=params)


def fmt(v, p=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{p}f}"
    return str(v)


# ---------------------------------------------------------------------------------------------------
def stage_env(args, params):
    """Versions, device, and the interpreter rule: on a GPU, TRITON_INTERPRET must be unset."""
    import platform
    from importlib import metadata

    from bench.gpu.common import Sink

    sink = Sink(args.jsonl, "env")
    info = dict(python=platform.python_version())
    import torch

    info["torch"] = torch.__version__
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"not importable: {type(e).__name__}: {e}"
    for pkg in ("diffusers", "numpy"):
        try:
            info[pkg] = metadata.version(pkg)
        except Exception:
            info[pkg] = "not installed"
    try:  # where it would be imported from (a carried wheel: /tmp/site), without importing it
        import importlib.util

        spec = importlib.util.find_spec("diffusers")
        info["diffusers_path"] = os.path.dirname(spec.origin) if spec and spec.origin else None
    except Exception:
        info["diffusers_path"] = None
    interp = os.environ.get("TRITON_INTERPRET", "")
    info["TRITON_INTERPRET"] = interp or "unset"
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda"] = torch.version.cuda
    info["cpus"] = os.cpu_count()
    problems = []
    tiny = bool(params.get("tiny"))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = f"{p.major}.{p.minor}"
        info["memory_gib"] = round(p.total_memory / 2**30, 1)
        info["sms"] = p.multi_processor_count
    else:
        info["device"] = "CPU"
    if tiny:
        info["mode"] = "tiny: CPU, Triton interpreter, small shapes"
        if interp in ("", "0"):
            problems.append("--tiny runs the kernels under Triton's interpreter: TRITON_INTERPRET=1 is needed")
    else:
        info["mode"] = "GPU"
        if not torch.cuda.is_available():
            problems.append("no CUDA device: run on a GPU machine, or use --tiny")
        elif interp not in ("", "0"):
            problems.append(f"refusing to run on a GPU with TRITON_INTERPRET={interp!r}: the kernels would run in "
                            "the interpreter (unset it)")
    try:
        import svdcache_kernels  # noqa: F401
    except Exception as e:
        problems.append(f"svdcache_kernels does not import: {type(e).__name__}: {e}")
    info["triton_cache"] = os.environ.get("TRITON_CACHE_DIR", "default")
    sink.row(**info)
    numbers = (f"{info['device']}{' sm_' + info['capability'].replace('.', '') if 'capability' in info else ''}; "
               f"python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
               f"diffusers {info['diffusers']}, "
               f"numpy {info['numpy']}; TRITON_INTERPRET {info['TRITON_INTERPRET']}")
    if problems:
        numbers += "; " + "; ".join(problems)
    sink.emit("summary", ok=not problems, numbers=numbers, **({"problems": problems} if problems else {}))
    return not problems


# ---------------------------------------------------------------------------------------------------
# precompile: every variant the later stages launch, run once in a process pool (each compile goes to
# Triton's on-disk cache, which the later stage processes read)
# ---------------------------------------------------------------------------------------------------
_WORKER = {}


def _worker_init(params, deadline):
    from bench.gpu.common import Ctx, NullSink

    import torch

    if params.get("tiny"):
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
    _WORKER["ctx"] = Ctx(stage="precompile", tiny=bool(params.get("tiny")), deadline=deadline, sink=NullSink(),
                         params=params)
    _WORKER["mods"] = op_modules()


def _find_case(spec):
    ctx, mods = _WORKER["ctx"], _WORKER["mods"]
    kind, mod, idx, rows, k = spec
    cases = mods[mod].cases(ctx) if kind == "op" else mods[mod].runtime_variants(ctx, rows, k)
    return cases[idx]


def _job(spec):
    """Run one variant once (the op's path, then the plan's), synchronised. Returns a row."""
    from bench.gpu.common import clone_state

    t = time.monotonic()
    row = dict(kind=spec[0], module=spec[1], rows=spec[3], k=spec[4], pid=os.getpid())
    try:
        if spec[0] == "probe":
            from bench.gpu import e2e

            row.update(variant="e2e rank probe (zero-setup basis, torch backend)", ks=e2e.probe_ranks(_WORKER["ctx"]))
        else:
            c = _find_case(spec)
            row["variant"] = c.label
            st = c.build()
            if c.kernel is not None:
                c.kernel(clone_state(st))
            if c.plan is not None:
                c.plan(st)()
            _WORKER["ctx"].sync()
        row["ok"] = True
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}")
    row["s"] = round(time.monotonic() - t, 3)
    return row


def rank_classes(ks) -> list[int]:
    """One representative rank per kernel specialisation: k == 1, k a multiple of 16, or neither, per
    register width (next power of two >= 16; 128-wide tiles above 256)."""
    reps = {}
    for k in sorted(set(int(k) for k in ks)):
        width = max(16, 1 << (k - 1).bit_length()) if k > 1 else 16
        cls = (k == 1, k % 16 == 0, width if width <= 256 else "k-tiled")
        reps.setdefault(cls, k)
    return sorted(reps.values())


def stage_precompile(args, params):
    import multiprocessing as mp

    # the pool first, its longest job (the rank probe) first: the workers start while this process
    # imports torch and lists the variants
    n_workers = max(1, int(params.get("workers") or 0) or min(16, os.cpu_count() or 1))
    pool = mp.get_context("spawn").Pool(n_workers, initializer=_worker_init, initargs=(params, args.deadline))
    try:
        return _precompile(args, params, pool, n_workers)
    finally:
        pool.terminate()


def _precompile(args, params, pool, n_workers):
    from bench.gpu.common import compiled_kernels

    specs, pending = [], {}
    if not params.get("no_probe") and "e2e" in params.get("stages", "e2e"):
        probe = ("probe", "e2e", 0, None, None)
        specs.append(probe)
        pending[probe] = pool.apply_async(_job, (probe,))
    ctx = make_ctx("precompile", args, params)
    sink = ctx.sink
    mods = op_modules()
    for name, m in mods.items():
        for i, c in enumerate(m.cases(ctx)):
            if c.kernel is not None or c.plan is not None:
                specs.append(("op", name, i, None, None))
    sh = ctx.shapes
    e2e_rows = (sh.N, sh.L, sh.J)

    def runtime_specs(ks):
        out = []
        for k in ks:
            for rows in e2e_rows:
                for name in ("split", "reconstruct", "residual_codes"):
                    for i, _ in enumerate(mods[name].runtime_variants(ctx, rows, k)):
                        out.append(("rt", name, i, rows, k))
        return out

    # k == 1 and 2..15: the classes of small ranks (tiny: one; the probe adds the others it finds)
    base_ks = [2] if ctx.tiny else [1, 2]
    specs += runtime_specs(base_ks)
    cache = os.environ.get("TRITON_CACHE_DIR")
    before = compiled_kernels(cache)
    sink.row(kind="plan", variants=len(specs), workers=n_workers, triton_cache=cache or "default")
    sink.log(f"{len(specs)} variants on {n_workers} workers")
    done, failed, extra_ks = 0, 0, []
    for sp in specs:
        if sp not in pending:
            pending[sp] = pool.apply_async(_job, (sp,))
    while pending:
        if ctx.left() < 1.0:
            ctx.skipped += [f"{sp[0]} {sp[1]} #{sp[2]} rows={sp[3]} k={sp[4]}" for sp in pending]
            break
        ready = [sp for sp, r in pending.items() if r.ready()]
        if not ready:
            time.sleep(0.05)
            continue
        for sp in ready:
            r = pending.pop(sp)
            try:
                row = r.get(0)
            except Exception as e:
                row = dict(kind=sp[0], module=sp[1], ok=False, error=f"{type(e).__name__}: {e}")
            done += 1
            failed += not row.get("ok")
            sink.row(**row)
            if sp[0] == "probe" and row.get("ok"):
                extra_ks = [k for k in rank_classes(row.get("ks") or []) if k not in base_ks]
                for sp2 in runtime_specs(extra_ks):
                    pending[sp2] = pool.apply_async(_job, (sp2,))
                    specs.append(sp2)
    after = compiled_kernels(cache)
    compiled = None if before is None or after is None else after - before
    numbers = (f"{done}/{len(specs)} variants run on {n_workers} workers"
               + (f" ({len(ctx.skipped)} left: budget)" if ctx.skipped else "")
               + (f", {failed} failed" if failed else "")
               + (" (interpreter: nothing compiled)" if ctx.tiny else
                  f", {compiled if compiled is not None else '?'} kernels compiled")
               + (f"; e2e ranks probed: extra rank classes {extra_ks}" if extra_ks else ""))
    ok = failed == 0 and done > 0
    sink.emit("summary", ok=ok, partial=bool(ctx.skipped), numbers=numbers, compiled=compiled, variants=len(specs),
              run=done, failed=failed, skipped=ctx.skipped)
    return ok


# ---------------------------------------------------------------------------------------------------
def stage_parity(args, params):
    from bench.gpu.common import compiled_kernels

    ctx = make_ctx("parity", args, params)
    cache = os.environ.get("TRITON_CACHE_DIR")
    before = compiled_kernels(cache)
    need = 2.0 if ctx.tiny else 8.0  # one case: build, kernel (a compile if precompile missed it), reference
    n_ok = n = 0
    mods = op_modules()
    for name, m in mods.items():
        a, b = m.parity(ctx, need)
        n_ok += a
        n += b
    forced = ""
    if ctx.tiny:  # the 16-bit dot path and its emulated references, under the interpreter with fp16
        import torch

        from bench.gpu.common import forced_dot16

        ctx.dtype = torch.float16
        with forced_dot16():
            for name, m in mods.items():
                a, b = m.parity(ctx, need)
                n_ok += a
                n += b
        ctx.dtype = torch.bfloat16
        forced = "; and float16 through the 16-bit dot path (forced) against the emulated references"
    late = None if before is None else compiled_kernels(cache) - before
    ctx.sink.log(f"parity: {n_ok}/{n} pass")
    numbers = (f"{n_ok}/{n} checks pass ({str(ctx.dtype).replace('torch.', '')}, rows {ctx.shapes.N} / "
               f"{ctx.shapes.J}, D {ctx.shapes.D}, k {','.join(map(str, ctx.ks))}"
               f"{', interpreter: fp32 dot' if ctx.tiny else ''}{forced})"
               + (f"; {len(ctx.skipped)} cases skipped (budget)" if ctx.skipped else "")
               + (f"; {late} kernels compiled here (missed by precompile)" if late else ""))
    ok = n_ok == n and n > 0
    ctx.sink.emit("summary", ok=ok, partial=bool(ctx.skipped), numbers=numbers, passed=n_ok, checked=n,
                  skipped=ctx.skipped, late_compiles=late)
    return ok


# ---------------------------------------------------------------------------------------------------
def stage_kernels(args, params):
    from bench.gpu.common import Timer, compiled_kernels, copy_bandwidth, device_name, peak_bandwidth

    ctx = make_ctx("kernels", args, params)
    cache = os.environ.get("TRITON_CACHE_DIR")
    before = compiled_kernels(cache)
    timer = Timer(ctx)
    name = device_name(ctx)
    peak = None if ctx.tiny else peak_bandwidth(name)
    copy_bw = copy_bandwidth(ctx, timer)
    ctx.sink.row(kind="yardstick", device=name, copy_gbs=copy_bw / 1e9, peak_gbs=peak / 1e9 if peak else None)
    need = 2.0 if ctx.tiny else 6.0
    n = errors = 0
    mods = op_modules()
    for m in mods.values():
        a, b = m.timing(ctx, timer, need, peak, copy_bw)
        n += a
        errors += b
    if ctx.enough(need, "host cost per call"):
        for r in mods["reconstruct"].host_cost(ctx):
            ctx.sink.row(kind="host", **r)
    late = None if before is None else compiled_kernels(cache) - before
    numbers = (f"{n} timings through the runtime's plans; copy {copy_bw / 1e9:.0f} GB/s"
               + (f", spec peak {peak / 1e9:.0f} GB/s" if peak else (", spec peak unknown" if not ctx.tiny else ""))
               + (" (CPU interpreter: times are not kernel speeds)" if ctx.tiny else "")
               + (f"; {errors} raised" if errors else "")
               + (f"; {len(ctx.skipped)} skipped (budget)" if ctx.skipped else "")
               + (f"; {late} kernels compiled here (missed by precompile)" if late else ""))
    ok = n > 0 and not errors
    ctx.sink.emit("summary", ok=ok, partial=bool(ctx.skipped), numbers=numbers, timings=n, skipped=ctx.skipped,
                  late_compiles=late)
    return ok


# ---------------------------------------------------------------------------------------------------
def stage_e2e(args, params):
    from bench.gpu import e2e

    ctx = make_ctx("e2e", args, params)
    return e2e.run(ctx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--deadline", type=float, required=True, help="time.time() by which the summary is written")
    ap.add_argument("--params", default="{}", help="JSON: tiny, ks, steps, intervals, seed, hang, ...")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    if params.get("hang") == args.stage:  # tests: a stage that hangs (the driver must kill it at its limit)
        from bench.gpu.common import Sink

        Sink(args.jsonl, args.stage).row(kind="hang", note="hang injected (--inject-hang)")
        while True:
            time.sleep(3600)
    fn = {"env": stage_env, "precompile": stage_precompile, "parity": stage_parity, "kernels": stage_kernels,
          "e2e": stage_e2e}[args.stage]
    ok = fn(args, params)
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
