#!/usr/bin/env python
"""Compile the kernels for a GPU without one: shared memory, registers, spills, MMA kind per launch.

    python bench/aot_kernels.py                  # sm_90a (H100/H200), FLUX shapes, bf16/fp16/fp32
    python bench/aot_kernels.py --arch 80        # A100
    python bench/aot_kernels.py --quick          # a few variants (used by the test suite)

The wrappers run for real on "meta" tensors (argument checks, flattening, config heuristic), with
the @triton.jit kernels replaced by a recorder; each recorded launch is then compiled ahead of time
with ``triton.compile`` for the target (Triton specialises pointer and int arguments the way its
launcher does: 16-byte alignment, ints divisible by 16, ints equal to 1). Register and spill counts
come from ptxas -v on the generated PTX. Needs Triton's NVIDIA backend (bundled ptxas); no GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from svdcache_kernels.ops import _triton_common as tc  # noqa: E402
from svdcache_kernels.ops.gram import kernel as gram_mod  # noqa: E402
from svdcache_kernels.ops.reconstruct import kernel as rec_mod  # noqa: E402
from svdcache_kernels.ops.residual_codes import kernel as codes_mod  # noqa: E402
from svdcache_kernels.ops.split import kernel as split_mod  # noqa: E402

TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64", torch.int8: "i8",
      torch.uint8: "u8"}


class Recorder:
    """Stands in for a JITFunction: records ``kernel[grid](*args, **meta)`` instead of launching."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        def record(*args, num_warps, num_stages, **meta):
            self.calls.append((grid, args, meta, num_warps, num_stages))

        return record


def source_for(fn, args, meta):
    sig, consts, attrs = {}, dict(meta), {}
    names = fn.arg_names
    for name, a in zip(names, args):
        i = names.index(name)
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + TY[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                sig[name] = "constexpr"
                consts[name] = 1
                continue
            sig[name] = "i64" if abs(a) >= 2**31 else "i32"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(a)}")
    for name in meta:
        sig[name] = "constexpr"
    return ASTSource(fn, sig, constexprs=consts, attrs=attrs)


def parse_ptxas(text: str) -> str:
    """Registers, spills and performance advisories from ``ptxas -v`` output.

    Only "Used N registers" lines give the register count: advisories such as "(C7515) Potential
    Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register
    resources ..." also mention registers and are reported by their code instead."""
    regs = spill = "?"
    notes = []
    for line in text.splitlines():
        m = re.search(r"Used (\d+) registers", line)
        if m:
            regs = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = m.group(1)
        m = re.search(r"\((C\d{4})\)", line)
        if m and m.group(1) not in notes:
            notes.append(m.group(1))
    extra = ""
    if notes:
        extra = " [" + ", ".join(n + (": wgmma serialized" if n == "C7515" else "") for n in notes) + "]"
    return f"{regs} regs, {spill} B spilled{extra}"


def ptxas_info(ptx: str, arch: str) -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = "/tmp/_svdcache_aot.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    for exe in ("ptxas-blackwell", "ptxas"):  # the newest one reads the newest PTX version
        p = os.path.join(bindir, exe)
        if not os.path.exists(p):
            continue
        out = subprocess.run([p, "-v", f"--gpu-name=sm_{arch}", path, "-o", "/tmp/_svdcache_aot.cubin"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            return parse_ptxas(out.stdout + out.stderr)
    return "ptxas unavailable"


def variants(quick: bool):
    """(label, module, attr, call) with FLUX shapes on the meta device."""
    m = torch.device("meta")
    B, N, D = 1, 4096 + 512, 3072
    out = []
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    ks = (64, 256) if quick else (16, 64, 128, 256)
    for dt in dtypes:
        for k in ks:
            F = torch.empty(B, N, D, dtype=dt, device=m)
            V = torch.empty(D, k, dtype=dt, device=m)
            c = lambda k=k: torch.empty(B, N, k, device=m)
            R = lambda dt=dt: torch.empty(B, N, D, dtype=dt, device=m)
            out.append((f"split C,R {TY[dt]} k={k}", split_mod, "_split_kernel",
                        lambda F=F, V=V, c=c, R=R: split_mod.split_triton(F, V, C=c(), R=R())))
            if not quick or k == 256:
                out.append((f"split order2+E+dR {TY[dt]} k={k}", split_mod, "_split_kernel",
                            lambda F=F, V=V, c=c, R=R: split_mod.split_triton(
                                F, V, C=c(), D1=c(), D2=c(), E=c(), R=R(), dR=R(), order=2, h1=1.0, h2=2.0)))
            gate = torch.empty(B, 6 * D, dtype=dt, device=m)[:, 2 * D:3 * D].unsqueeze(1)
            if not quick or (k == 256 and dt == torch.bfloat16):
                # the runtime's exact variants: split with F_prev (order 1), 1-term reconstruct with x and gate
                out.append((f"split F_prev {TY[dt]} k={k}", split_mod, "_split_kernel",
                            lambda F=F, V=V, c=c, R=R: split_mod.split_triton(F, V, D1=c(), order=1, h1=5.0,
                                                                               F_prev=R())))
                out.append((f"split F_prev order2 {TY[dt]} k={k}", split_mod, "_split_kernel",
                            lambda F=F, V=V, c=c, R=R: split_mod.split_triton(F, V, D1=c(), D2=c(), order=2, h1=5.0,
                                                                               h2=4.0, F_prev=R())))
                out.append((f"reconstruct 1 term+gate {TY[dt]} k={k}", rec_mod, "_reconstruct_kernel",
                            lambda V=V, R=R, c=c, gate=gate: rec_mod.reconstruct_triton(
                                V, R(), terms=[c()], weights=(2.0,), x=R(), gate=gate)))
            if not quick or (k == 256 and dt == torch.bfloat16):
                # residual="int4"/"int8": the cached step with the quantized dR read by the kernel
                for bits in (4, 8) if not quick else (4,):
                    qc = lambda bits=bits: torch.empty(B, N, D if bits == 8 else (D + 1) // 2,  # noqa: E731
                                                       dtype=torch.int8 if bits == 8 else torch.uint8, device=m)
                    for nt in (1, 2) if bits == 4 else (1,):  # int4 at order 2: the default cached step from N = 4
                        out.append((f"reconstruct {nt} term{'s' * (nt > 1)}+gate+int{bits} dR {TY[dt]} k={k}", rec_mod,
                                    "_reconstruct_kernel",
                                    lambda V=V, R=R, c=c, gate=gate, qc=qc, bits=bits, nt=nt: rec_mod.reconstruct_triton(
                                        V, R(), terms=[c() for _ in range(nt)], weights=(2.0, 1.0)[:nt], x=R(), gate=gate,
                                        dr_scale=2.0, dR_codes=qc(), dR_scales=torch.empty(B, N, 1, device=m),
                                        dR_bits=bits)))
            out.append((f"reconstruct 3 terms+dR+gate {TY[dt]} k={k}", rec_mod, "_reconstruct_kernel",
                        lambda V=V, R=R, c=c, gate=gate: rec_mod.reconstruct_triton(
                            V, R(), terms=[c(), c(), c()], weights=(1.0, 0.5, 0.25), dR=R(), dr_scale=0.5,
                            x=R(), gate=gate)))
            if not quick:
                out.append((f"reconstruct reuse {TY[dt]} k={k}", rec_mod, "_reconstruct_kernel",
                            lambda V=V, R=R, c=c: rec_mod.reconstruct_triton(V, R(), terms=[c()], weights=(1.0,))))
        # k above one register tile (k-tiled kernels; the split's residual as a second kernel)
        kb = 1024
        F = torch.empty(B, N, D, dtype=dt, device=m)
        V = torch.empty(D, kb, dtype=dt, device=m)
        cb = lambda: torch.empty(B, N, kb, device=m)  # noqa: E731
        Rb = lambda dt=dt: torch.empty(B, N, D, dtype=dt, device=m)  # noqa: E731
        if not quick or dt == torch.bfloat16:
            out.append((f"split F_prev {TY[dt]} k={kb}", split_mod, "_split_kernel",
                        lambda F=F, V=V, cb=cb, Rb=Rb: split_mod.split_triton(F, V, D1=cb(), order=1, h1=5.0,
                                                                               F_prev=Rb())))
            out.append((f"split C,R {TY[dt]} k={kb}", split_mod, "_split_kernel|_residual_kernel",
                        lambda F=F, V=V, cb=cb, Rb=Rb: split_mod.split_triton(F, V, C=cb(), R=Rb())))
            gate = torch.empty(B, 6 * D, dtype=dt, device=m)[:, 2 * D:3 * D].unsqueeze(1)
            out.append((f"reconstruct 1 term+gate {TY[dt]} k={kb}", rec_mod, "_reconstruct_kernel",
                        lambda V=V, gate=gate, cb=cb, Rb=Rb: rec_mod.reconstruct_triton(
                            V, Rb(), terms=[cb()], weights=(2.0,), x=Rb(), gate=gate)))
        # the full step of residual="int4"/"int8": r and its codes (fp32 3xTF32 dot, libdevice rint)
        for kk in (64, kb) if not quick or dt == torch.bfloat16 else ():
            for bits in (4, 8) if not quick else (4,):
                out.append((f"residual_codes int{bits} {TY[dt]} k={kk}", codes_mod, "_residual_codes_kernel",
                            lambda dt=dt, kk=kk, bits=bits: codes_mod.residual_codes_triton(
                                torch.empty(B, N, D, dtype=dt, device=m), torch.empty(B, N, D, dtype=dt, device=m),
                                torch.empty(B, N, kk, device=m), torch.empty(D, kk, dtype=dt, device=m), h=0.5,
                                bits=bits, codes=torch.empty(B, N, D if bits == 8 else D // 2,
                                                             dtype=torch.int8 if bits == 8 else torch.uint8, device=m),
                                scales=torch.empty(B, N, 1, device=m))))
        out.append((f"gram {TY[dt]}", gram_mod, "_gram_kernel",
                    lambda F=F: gram_mod.gram_update_triton(torch.empty(D, D, device=m), F)))
    if quick:
        return out
    # the parity shapes of the old GPU kernel script (bench/gpu/ops): D = 1000 (not a multiple of 16), N = 333, k = 1
    B2, N2, D2 = 2, 333, 1000
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for k in (1, 48):
            F = torch.empty(B2, N2, D2, dtype=dt, device=m)
            V = torch.empty(D2, k, device=m)
            c = lambda k=k: torch.empty(B2, N2, k, device=m)
            R = lambda dt=dt: torch.empty(B2, N2, D2, dtype=dt, device=m)
            out.append((f"split odd shape {TY[dt]} k={k}", split_mod, "_split_kernel",
                        lambda F=F, V=V, c=c, R=R: split_mod.split_triton(
                            F, V, C=c(), D1=c(), D2=c(), E=c(), R=R(), dR=R(), order=2, h1=0.75, h2=2.0)))
            gate = torch.empty(B2, 6 * D2, dtype=dt, device=m)[:, 2 * D2:3 * D2].unsqueeze(1)
            out.append((f"reconstruct odd shape {TY[dt]} k={k}", rec_mod, "_reconstruct_kernel",
                        lambda V=V, R=R, c=c, gate=gate: rec_mod.reconstruct_triton(
                            V, R(), terms=[c(), c(), c()], weights=(1.0, 0.5, 0.25), dR=R(), dr_scale=0.5,
                            x=R(), gate=gate)))
            out.append((f"reconstruct odd shape int4 dR {TY[dt]} k={k}", rec_mod, "_reconstruct_kernel",
                        lambda V=V, R=R, c=c, gate=gate: rec_mod.reconstruct_triton(
                            V, R(), terms=[c()], weights=(1.0,), dr_scale=0.5, x=R(), gate=gate,
                            dR_codes=torch.empty(B2, N2, (D2 + 1) // 2, dtype=torch.uint8, device=m),
                            dR_scales=torch.empty(B2, N2, 1, device=m), dR_bits=4)))
        out.append((f"gram odd shape {TY[dt]}", gram_mod, "_gram_kernel",
                    lambda dt=dt: gram_mod.gram_update_triton(torch.empty(D2, D2, device=m),
                                                              torch.empty(B2, N2, D2, dtype=dt, device=m))))
    return out


def sweep_variants():
    """The launch configs bench/gpu/ops/split.py keeps for a sweep (bf16, FLUX shapes)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.gpu.ops.split import SWEEP_SPLIT

    m = torch.device("meta")
    B, N, D = 1, 4096 + 512, 3072
    out = []
    for k in (64, 128, 256):
        for bm, bd, w, st in SWEEP_SPLIT:
            cfg = dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=st)
            F = torch.empty(B, N, D, dtype=torch.bfloat16, device=m)
            V = torch.empty(D, k, dtype=torch.bfloat16, device=m)

            def sp(F=F, V=V, k=k, cfg=cfg):
                with tc.config_override("split", **cfg):
                    split_mod.split_triton(F, V, C=torch.empty(B, N, k, device=m), R=torch.empty_like(F))

            def rc(F=F, V=V, k=k, cfg=cfg):
                gate = torch.empty(B, 6 * D, dtype=torch.bfloat16, device=m)[:, 2 * D:3 * D].unsqueeze(1)
                t = [torch.empty(B, N, k, device=m) for _ in range(3)]
                with tc.config_override("reconstruct", **cfg):
                    rec_mod.reconstruct_triton(V, torch.empty_like(F), terms=t, weights=(1.0, 0.5, 0.25),
                                               dR=torch.empty_like(F), dr_scale=0.5, x=torch.empty_like(F), gate=gate)

            out.append((f"sweep split bf16 k={k}", split_mod, "_split_kernel", sp))
            out.append((f"sweep reconstruct bf16 k={k}", rec_mod, "_reconstruct_kernel", rc))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90a", help="90a (H100/H200), 80 (A100), 89 (L4/L40) ...")
    ap.add_argument("--sms", type=int, default=132, help="SM count the launch heuristics assume")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also the launch configs of bench/gpu/ops/split.py SWEEP_SPLIT")
    ap.add_argument("--dump", help="also write the compile jobs as JSON (to replay under another Triton)")
    args = ap.parse_args(argv)
    jobs = []
    cap = int(args.arch.rstrip("a"))
    target = GPUTarget("cuda", cap, 32)
    # The wrappers' launch checks and heuristics, as on a GPU: accept meta tensors, GPU configs.
    os.environ["TRITON_INTERPRET"] = "1"  # read by require_launchable only; kernels are already real
    tc.num_sms = lambda device: args.sms
    split_mod.interp_blocks = rec_mod.interp_blocks = None
    meta_as_cuda = torch.device("cuda")
    codes_mod._compiled = lambda: True  # what a GPU launch takes (rint, 3xTF32), not the interpreter's
    for mod, name in ((split_mod, "split_config"), (rec_mod, "reconstruct_config"), (gram_mod, "gram_config"),
                      (codes_mod, "residual_codes_config")):
        real = getattr(mod, name)
        setattr(mod, name, lambda *a, _real=real, **kw: _real(*a[:-1], meta_as_cuda, **kw))
    failures = 0
    print(f"target sm_{args.arch}, triton {triton.__version__}, {args.sms} SMs assumed")
    print(f"{'variant':44s} {'BLOCK_M/D/K or D/R':>20s} {'warps':>5s} {'stages':>6s} {'smem':>8s}  mma       registers")
    for label, mod, attr, call in variants(args.quick) + (sweep_variants() if args.sweep else []):
        recs = {name: Recorder(getattr(mod, name)) for name in attr.split("|")}  # a launch may run 2 kernels
        for name, rec in recs.items():
            setattr(mod, name, rec)
        try:
            tc.FORCE_DOT_FP32 = "fp32" in label.split()  # the GPU rule: fp32 ieee, 16-bit tensor cores
            call()
        finally:
            for name, rec in recs.items():
                setattr(mod, name, rec.fn)
            tc.FORCE_DOT_FP32 = None
        calls = [(name, rec, c) for name, rec in recs.items() for c in rec.calls]
        for kname, rec, (grid, a, meta, w, s) in calls:
            lab = label if len(recs) == 1 else f"{label} ({kname.strip('_')})"
            blocks = "/".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_D", "BLOCK_K", "BLOCK_R") if k in meta)
            t = time.time()
            src = source_for(rec.fn, a, meta)
            jobs.append(dict(label=lab, file=os.path.relpath(mod.__file__, REPO), fn=kname, signature=src.signature,
                             constexprs={rec.fn.arg_names[i[0]]: v for i, v in src.constants.items()},
                             attrs=[[i[0], v] for i, v in src.attrs.items()], num_warps=w, num_stages=s))
            try:
                kern = triton.compile(src, target=target, options={"num_warps": w, "num_stages": s})
            except Exception as e:
                failures += 1
                print(f"{lab:44s} {blocks:>20s} {w:5d} {s:6d}  COMPILE ERROR {type(e).__name__}: {str(e)[:300]}")
                continue
            ptx = kern.asm["ptx"]
            mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
            print(f"{lab:44s} {blocks:>20s} {w:5d} {s:6d} {kern.metadata.shared:8d}  {mma:8s}  "
                  f"{ptxas_info(ptx, args.arch)}  ({time.time() - t:.1f} s, grid {grid})", flush=True)
    if args.dump:
        import json

        with open(args.dump, "w") as f:
            json.dump(jobs, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
