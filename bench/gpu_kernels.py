#!/usr/bin/env python
"""GPU check and benchmark of the SVD-Cache kernels: parity first, then timings at FLUX shapes.

    python bench/gpu_kernels.py               # one CUDA GPU, about 5 minutes, no network
    python bench/gpu_kernels.py --cpu-smoke   # the same code path at tiny shapes, Triton interpreter

1. Parity of every op on the GPU (bf16, fp16, fp32; batch dims; N, D off the block sizes; k from 1 to
   256) against the reference ops. The 16-bit kernels run the tensor-core dot on 16-bit operands
   (V, and C or P, rounded to the activation dtype; fp32 accumulation), so they are compared, at
   rounding-level tolerance, with the reference computed on those same rounded operands ("emulated");
   their deviation from the exact fp32 reference is printed too, checked only against a loose bound.
   residual_codes (the int4 / int8 full step) is checked code for code against its reference.
2. Device-to-device copy bandwidth (the yardstick), and the host cost of one call at a tiny shape
   (Python + launch: the runtime's per-feature reconstruct plan vs one aten op), the floor of a
   cached step's latency (x 114 features on FLUX.1-dev).
3. Per op at FLUX shapes (N = 4096 + 512 tokens, D = 3072, k in {64, 128, 256}, bf16): median time
   (triton.testing.do_bench, L2 flushed between runs), minimal bytes -> GB/s and fraction of copy
   bandwidth, TFLOP/s, speedup over the eager reference and over torch.compile of the reference; for
   the split, the ratio to the time of reading F once and writing R once at copy bandwidth (target
   <= 1.3).
4. A small sweep of launch configs for split and reconstruct (to tune the heuristics).

Everything runs under a time budget (--budget-s): later stages are skipped, not the whole run, when
it runs out. Writes bench/results/gpu_kernels_<card>.md. Exit status 1 if a parity check failed or a
stage raised.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:  # before torch/numpy/triton are imported: the interpreter is read when kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from svdcache_kernels import (  # noqa: E402
    gram_update, gram_update_reference, reconstruct, reconstruct_reference, residual_codes, residual_codes_reference,
    split, split_reference,
)
from svdcache_kernels.ops import _triton_common as tc  # noqa: E402
from svdcache_kernels.ops.reconstruct.reference import code_values, dequantize_codes, gate_rows_shape  # noqa: E402

BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}  # significant bits
ULP = {dt: 2.0 ** (1 - b) for dt, b in BITS.items()}  # ulp(x) <= ULP * |x|


def dn(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------
# Harness: budget, timing, error capture
# ---------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args = args
        self.smoke = args.cpu_smoke
        self.dev = torch.device("cpu" if self.smoke else "cuda")
        self.t0 = time.monotonic()
        self.errors: list[str] = []
        self.parity: list[dict] = []
        self.rows: list[dict] = []
        self.sweep: list[dict] = []
        self.notes: list[str] = []
        self.copy_gbs = float("nan")
        self.launch_us: dict[str, float] = {}
        self._flush = None

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def guard(self, label: str, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # keep going: one broken op must not hide the others' numbers
            self.errors.append(f"{label}: {type(e).__name__}: {e}")
            self.log(f"ERROR in {label}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return None

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        """Median milliseconds of fn()."""
        if self.smoke:
            fn()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            return statistics.median(ts)
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except Exception as e:  # do_bench's signature moved between versions: CUDA events instead
            self.notes.append(f"do_bench unavailable ({type(e).__name__}: {e}); CUDA events used")
            return self._events_ms(fn)

    def _events_ms(self, fn, reps: int = 50) -> float:
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device=self.dev)
        for _ in range(5):
            fn()
        ts = []
        for _ in range(reps):
            self._flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts)


# ---------------------------------------------------------------------------------------------------
# Emulated references: the reference ops' math on the operands the 16-bit tensor-core path rounds
# ---------------------------------------------------------------------------------------------------
def split_emulated(F, V, *, dot_dtype, C=None, D1=None, D2=None, E=None, R=None, dR=None, order=0,
                   h1=1.0, h2=1.0, beta=0.9, ema_init=False, F_prev=None):
    Vf = V.to(dot_dtype).float() if dot_dtype is not None else V.float()
    Cn = F.float() @ Vf
    if order >= 1:
        if F_prev is not None:  # the kernel rounds F - F_prev to the dot dtype before its dot
            dd = F.float() - F_prev.float()
            d1 = (dd.to(dot_dtype).float() if dot_dtype is not None else dd) @ Vf / h1
        else:
            d1 = (Cn - C) / h1
        if order >= 2:
            D2.copy_((d1 - D1) / h2)
        D1.copy_(d1)
    if E is not None:
        E.copy_(Cn if ema_init else beta * E + (1.0 - beta) * Cn)
    if C is not None:
        C.copy_(Cn)
    if R is not None:
        Cd = Cn.to(dot_dtype).float() if dot_dtype is not None else Cn
        Rn = F.float() - Cd @ Vf.T
        if dR is not None:
            dR.copy_((Rn - R.float()) / h1)
        R.copy_(Rn)


def reconstruct_emulated(V, R, *, dot_dtype, terms=(), weights=(), dR=None, dr_scale=0.0, x=None, gate=None, out=None,
                         dR_codes=None, dR_scales=None, dR_bits=8):
    if dR_codes is not None:  # the quantized dR is dequantized in fp32 by the kernel: no rounding to emulate
        dR = dequantize_codes(dR_codes, dR_scales, R.shape[-1], dR_bits)
    fh = R.float()
    if terms:
        P = sum(float(w) * t for w, t in zip(weights, terms))
        Vf = V.to(dot_dtype).float() if dot_dtype is not None else V.float()
        Pd = P.to(dot_dtype).float() if dot_dtype is not None else P
        fh = fh + Pd @ Vf.T
    if dR is not None and dr_scale:
        fh = fh + float(dr_scale) * dR.float()
    if x is not None:
        g = 1.0
        if gate is not None:
            g = gate.float() if gate_rows_shape(R, gate) else gate.float().unsqueeze(-2)
        fh = x.float() + g * fh
    res = fh.to(x.dtype if x is not None else R.dtype)
    if out is not None:
        out.copy_(res)
        return out
    return res


def _maxabs(t) -> float:
    return float(t.float().abs().max()) if t.numel() else 0.0


def _err(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def quantized(r):
    """{bits: (codes, scales)} of a residual difference, as residual="int8"/"int4" stores it: the layout
    of svdcache.residual_cache.quantize_rows (symmetric per-row absmax; 4 bits: value + 8, element 2j in
    the low nibble of byte j, odd D padded), restated here because this script needs no diffusers
    (tests/kernels/test_reconstruct_quantized.py checks that the two agree)."""
    out = {}
    for bits in (8, 4):
        L = 127.0 if bits == 8 else 7.0
        scale = r.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-30) / L
        q = torch.round(r.float() / scale).clamp_(-L, L).to(torch.int8)
        if bits == 4:
            if q.shape[-1] % 2:
                q = torch.nn.functional.pad(q, (0, 1))
            u = (q + 8).to(torch.uint8)
            q = u[..., 0::2] | (u[..., 1::2] << 4)
        out[bits] = (q, scale)
    return out


# ---------------------------------------------------------------------------------------------------
# 1. Parity
# ---------------------------------------------------------------------------------------------------
def parity(run: Run) -> None:
    try:
        _parity(run)
    finally:
        tc.FORCE_DOT_FP32 = None


def _parity(run: Run) -> None:
    dev = run.dev
    g = torch.Generator(device=dev).manual_seed(0)
    if run.smoke:
        B, N, D, ks = (2,), 40, 72, (1, 16, 48)  # bf16 also runs k = 1
    else:
        B, N, D, ks = (2,), 333, 1000, (1, 48, 256)  # bf16 also runs k = 1 (BLOCK_K = 16)

    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale + 0.25).to(dtype)

    def nan(*shape, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype, device=dev)

    def basis(D, k):
        q, _ = torch.linalg.qr(torch.randn(D, k, generator=g, device=dev, dtype=torch.float32))
        return q

    def record(op, dtype, k, name, got, emu, exact, tol_rel, scale, loose_rel):
        err = _err(got, emu)
        allowed = tol_rel * max(scale, 1e-30)
        finite = bool(torch.isfinite(got.float()).all())
        dev_exact = _err(got, exact) / max(scale, 1e-30)
        ok = finite and err <= allowed and (loose_rel is None or dev_exact <= loose_rel)
        run.parity.append(dict(op=op, dtype=dn(dtype), k=k, out=name, err=err, allowed=allowed,
                               exact_rel=dev_exact, ok=ok))
        if not ok:
            run.log(f"PARITY FAIL {op} {dn(dtype)} k={k} {name}: err {err:.3g} allowed {allowed:.3g} "
                    f"finite={finite} rel. deviation from exact {dev_exact:.3g}")

    def record_in_place(label, op, dtype, k, V, R, x, kw, dot_dt, tol_rel, loose_rel, what="out (gated, in place)"):
        """The Triton reconstruct into x in place against the emulated and exact references."""
        xk = x.clone()
        if run.guard(f"parity {label}", lambda: reconstruct(V, R, backend="triton", x=xk, out=xk, **kw)) is not None:
            emu = reconstruct_emulated(V, R, dot_dtype=dot_dt, x=x, **kw)
            record(op, dtype, k, what, xk, emu, reconstruct_reference(V, R, x=x, **kw), tol_rel, _maxabs(emu),
                   loose_rel)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        # Smoke: run fp16 through the 16-bit (GPU) dot code path, so that the emulated-reference
        # checks the GPU run relies on are exercised too (the interpreter's fp16 dot is right).
        tc.FORCE_DOT_FP32 = False if (run.smoke and dtype == torch.float16) else None
        dot_dt = None if tc.dot_fp32(dtype, dev) else dtype
        # vs the emulated reference: fp32 outputs differ by summation order (2e-5 of their scale with
        # D = 1000), 16-bit outputs by an ulp of their dtype (2 ulps: the rounded C/P may flip too).
        # vs the exact reference (16-bit dot path only): a gross-error bound, 32 unit roundoffs.
        t32 = 2e-5
        t16 = 2 * ULP[dtype] if dtype != torch.float32 else t32
        loose = None if dot_dt is None else 32 * 2.0 ** -BITS[dtype]
        for k in ks if dtype == torch.bfloat16 else ks[1:]:
            V = basis(D, k)
            F = rnd(*B, N, D, dtype=dtype, scale=2.0)
            cs, rs = (*B, N, k), (*B, N, D)
            init = dict(C=rnd(*cs), D1=rnd(*cs), D2=nan(*cs), E=rnd(*cs), R=rnd(*rs, dtype=dtype), dR=nan(*rs, dtype=dtype))
            kw = dict(order=2, h1=0.75, h2=2.0, beta=0.9)
            outs = {}
            for name, fn in (("kernel", lambda **s: split(F, V, backend="triton", **s, **kw)),
                             ("emu", lambda **s: split_emulated(F, V, dot_dtype=dot_dt, **s, **kw)),
                             ("exact", lambda **s: split_reference(F, V, **s, **kw))):
                outs[name] = {n: t.clone() for n, t in init.items()}
                run.guard(f"parity split {dn(dtype)} k={k} {name}", fn, **outs[name])
            run.sync()
            fmax = _maxabs(F)
            for n in ("C", "D1", "D2", "E"):
                record("split", dtype, k, n, outs["kernel"][n], outs["emu"][n], outs["exact"][n], t32,
                       _maxabs(outs["emu"][n]), loose)
            for n in ("R", "dR"):
                # R = F - F V V^T cancels: its error scales with |F| (dR: (|F| + |R_prev|) / h1)
                sc = max(_maxabs(outs["emu"][n]), fmax if n == "R" else (fmax + _maxabs(init["R"])) / kw["h1"])
                record("split", dtype, k, n, outs["kernel"][n], outs["emu"][n], outs["exact"][n], t16, sc, loose)

            # the runtime's default full step: D1/D2 from F - F_prev, no coefficients kept
            Fp = rnd(*B, N, D, dtype=dtype, scale=2.0)
            pinit = dict(D1=rnd(*cs), D2=nan(*cs))
            pkw = dict(order=2, h1=0.75, h2=2.0, F_prev=Fp)
            pouts = {}
            for name, fn in (("kernel", lambda **s: split(F, V, backend="triton", **s, **pkw)),
                             ("emu", lambda **s: split_emulated(F, V, dot_dtype=dot_dt, **s, **pkw)),
                             ("exact", lambda **s: split_reference(F, V, **s, **pkw))):
                pouts[name] = {n: t.clone() for n, t in pinit.items()}
                run.guard(f"parity split F_prev {dn(dtype)} k={k} {name}", fn, **pouts[name])
            run.sync()
            for n in ("D1", "D2"):
                record("split F_prev", dtype, k, n, pouts["kernel"][n], pouts["emu"][n], pouts["exact"][n], t32,
                       _maxabs(pouts["emu"][n]), loose)

            # reconstruct: Taylor-2 forecast, damped dR, gated residual add in place on x
            terms = [rnd(*cs, scale=3.0) for _ in range(3)]
            R_, dR_ = rnd(*rs, dtype=dtype), rnd(*rs, dtype=dtype, scale=0.3)
            x = rnd(*rs, dtype=dtype, scale=4.0)
            gate = rnd(*B, 6 * D, dtype=dtype)[..., 2 * D:3 * D].unsqueeze(-2)  # strided chunk, (B, 1, D)
            rkw = dict(terms=terms, weights=(1.0, 1.7, -0.45), dR=dR_, dr_scale=0.6, gate=gate)
            xk = x.clone()
            got = run.guard(f"parity reconstruct {dn(dtype)} k={k}",
                            lambda: reconstruct(V, R_, backend="triton", x=xk, out=xk, **rkw))
            emu = reconstruct_emulated(V, R_, dot_dtype=dot_dt, x=x, **rkw)
            exact = reconstruct_reference(V, R_, x=x, **rkw)
            if got is not None:
                record("reconstruct", dtype, k, "out (gated, in place)", xk, emu, exact, t16, _maxabs(emu), loose)
            # residual="int8"/"int4": 1 term, the quantized dR read by the kernel (codes + per-row scales)
            for bits, (qc, qs) in quantized(rnd(*rs, scale=0.3)).items():
                if bits == 8 and k != ks[-1]:  # int8 once per dtype (its load path has no k dependence)
                    continue
                qkw = dict(terms=terms[:1], weights=(2.0,), dr_scale=2.0, gate=gate, dR_codes=qc, dR_scales=qs, dR_bits=bits)
                record_in_place(f"reconstruct int{bits} dR {dn(dtype)} k={k}", f"reconstruct int{bits} dR", dtype, k,
                                V, R_, x, qkw, dot_dt, t16, loose)
        # one term, no epilogue, flat gate-less path into a new tensor; and the Gram update
        nk = dict(terms=terms[:1], weights=(1.0,))
        got = run.guard(f"parity reconstruct-reuse {dn(dtype)} k={k}", lambda: reconstruct(V, R_, backend="triton", **nk))
        if got is not None:
            exact = reconstruct_reference(V, R_, **nk)
            record("reconstruct", dtype, k, "F_hat (1 term)", got, reconstruct_emulated(V, R_, dot_dtype=dot_dt, **nk),
                   exact, t16, _maxabs(exact), loose)
        # int4 at an odd D (the packed last byte holds one code and the padding), ungated, new tensor
        Do = D - 1
        Vo, Ro = basis(Do, k), rnd(*B, N, Do, dtype=dtype)
        qc, qs = quantized(rnd(*B, N, Do, scale=0.3))[4]
        okw = dict(terms=[rnd(*B, N, k, scale=3.0)], weights=(1.5,), dr_scale=-1.0, x=rnd(*B, N, Do, dtype=dtype),
                   dR_codes=qc, dR_scales=qs, dR_bits=4)
        got = run.guard(f"parity reconstruct int4 dR odd D {dn(dtype)}", lambda: reconstruct(Vo, Ro, backend="triton", **okw))
        if got is not None:
            emu = reconstruct_emulated(Vo, Ro, dot_dtype=dot_dt, **okw)
            record(f"reconstruct int4 dR D={Do}", dtype, k, "out (ungated, new)", got, emu,
                   reconstruct_reference(Vo, Ro, **okw), t16, _maxabs(emu), loose)
        # gram: 16-bit products are exact in fp32 -> fp32 tolerance for every dtype
        F = rnd(*B, N, D, dtype=dtype)
        G0 = rnd(D, D)
        Gk = run.guard(f"parity gram {dn(dtype)}", lambda: gram_update(G0.clone(), F, backend="triton"))
        Gr = gram_update_reference(G0.clone(), F)
        if Gk is not None:
            record("gram", dtype, "-", "G", Gk, Gr, Gr, t32, _maxabs(Gr), None)
        run.sync()
        tc.FORCE_DOT_FP32 = None
        run.log(f"parity {dn(dtype)} done")

    # The runtime's exact variants at the shapes, and so the launch configs, that production selects:
    # FLUX's joint stream (M = 4608 rows) and image stream (M = 4096), bf16, k from one register tile
    # to a k-tiled 1000; split with F_prev (order 1, the default full step), 1-term reconstruct with
    # x and a strided gate in place (the default cached step), and the residual-form split above one
    # k tile (its second kernel). Smoke: small shapes with small k tiles forced (same code paths).
    from svdcache_kernels.ops.reconstruct.kernel import reconstruct_config
    from svdcache_kernels.ops.split.kernel import split_config

    dtype = torch.float16 if run.smoke else torch.bfloat16
    tc.FORCE_DOT_FP32 = False if run.smoke else None
    dot_dt = None if tc.dot_fp32(dtype, dev) else dtype
    t16, loose = 2 * ULP[dtype], 32 * 2.0 ** -BITS[dtype]
    shapes = [((1,), 90, 72, (16, 72))] if run.smoke else [((1,), 4608, 3072, (64, 256, 1000)), ((1,), 4096, 3072, (256,))]
    force = dict(BLOCK_K=32) if run.smoke else {}
    for B2, N2, D2, ks2 in shapes:
        for k in ks2:
            if run.left() < 20:
                run.notes.append("production-shape parity cut short by the time budget")
                break
            M2 = math.prod(B2) * N2
            scfg = split_config(M2, D2, k, dtype, dev, has_r=False)
            rcfg = reconstruct_config(M2, D2, k, 1, dtype, dev)
            run.log(f"parity at M={M2} D={D2} k={k}: split config {scfg}, reconstruct config {rcfg}")
            V = basis(D2, k)
            cs, rs = (*B2, N2, k), (*B2, N2, D2)
            F, Fp = rnd(*rs, dtype=dtype, scale=2.0), rnd(*rs, dtype=dtype, scale=2.0)
            pkw = dict(order=1, h1=5.0, F_prev=Fp)
            outs = {}
            with tc.config_override("split", **force), tc.config_override("reconstruct", **force):
                for name, fn in (("kernel", lambda **s: split(F, V, backend="triton", **s, **pkw)),
                                 ("emu", lambda **s: split_emulated(F, V, dot_dtype=dot_dt, **s, **pkw)),
                                 ("exact", lambda **s: split_reference(F, V, **s, **pkw))):
                    outs[name] = {"D1": nan(*cs)}
                    run.guard(f"parity split F_prev M={M2} k={k} {name}", fn, **outs[name])
                run.sync()
                record(f"split F_prev M={M2}", dtype, k, "D1", outs["kernel"]["D1"], outs["emu"]["D1"],
                       outs["exact"]["D1"], 2e-5, _maxabs(outs["emu"]["D1"]), loose)
                if k > tc.MAX_KERNEL_K or run.smoke:  # residual form above one k tile: two kernels
                    init = dict(C=nan(*cs), R=nan(*rs, dtype=dtype))
                    routs = {}
                    for name, fn in (("kernel", lambda **s: split(F, V, backend="triton", **s)),
                                     ("emu", lambda **s: split_emulated(F, V, dot_dtype=dot_dt, **s)),
                                     ("exact", lambda **s: split_reference(F, V, **s))):
                        routs[name] = {n: t.clone() for n, t in init.items()}
                        run.guard(f"parity split C,R M={M2} k={k} {name}", fn, **routs[name])
                    run.sync()
                    record(f"split C,R M={M2}", dtype, k, "C", routs["kernel"]["C"], routs["emu"]["C"],
                           routs["exact"]["C"], 2e-5, _maxabs(routs["emu"]["C"]), loose)
                    record(f"split C,R M={M2}", dtype, k, "R", routs["kernel"]["R"], routs["emu"]["R"],
                           routs["exact"]["R"], t16, max(_maxabs(routs["emu"]["R"]), _maxabs(F)), loose)
                D1 = rnd(*cs, scale=3.0)
                x = rnd(*rs, dtype=dtype, scale=4.0)
                gate = rnd(*B2, 6 * D2, dtype=dtype)[..., 2 * D2:3 * D2].unsqueeze(-2)
                rkw = dict(terms=[D1], weights=(2.0,), gate=gate)
                record_in_place(f"reconstruct 1 term+gate M={M2} k={k}", f"reconstruct 1 term+gate M={M2}", dtype, k,
                                V, F, x, rkw, dot_dt, t16, loose, what="out (in place)")
                # the cached step with residual="int4": the same plus the 4-bit dR read by the kernel, at
                # order 1 (N < 4) and at order 2 (the default from N = 4: D1 and D2 in one launch)
                qc, qs = quantized(rnd(*rs, scale=0.3))[4]
                qkw = dict(rkw, dr_scale=2.0, dR_codes=qc, dR_scales=qs, dR_bits=4)
                record_in_place(f"reconstruct 1 term+gate+int4 M={M2} k={k}", f"reconstruct 1 term+gate+int4 M={M2}",
                                dtype, k, V, F, x, qkw, dot_dt, t16, loose, what="out (in place)")
                qkw2 = dict(qkw, terms=[D1, rnd(*cs)], weights=(2.0, 3.0))
                record_in_place(f"reconstruct 2 terms+gate+int4 M={M2} k={k}", f"reconstruct 2 terms+gate+int4 M={M2}",
                                dtype, k, V, F, x, qkw2, dot_dt, t16, loose, what="out (in place)")
            del F, Fp, outs
            run.sync()
    tc.FORCE_DOT_FP32 = None
    run.log("production-shape parity done")
    residual_codes_parity(run, g, B, N, D, ks)


def residual_codes_parity(run: Run, g, B, N, D, ks) -> None:
    """The full step of residual="int8"/"int4" (residual_codes): kernel vs reference, at the launch config
    the heuristic selects (one config for every M) and k over several tiles. Both quantize the same r; the
    GEMM D1 V^T sums in another order, so a code may flip by one at a rounding tie: scales within 1e-5
    relative, codes equal but for at most 1e-3 of them, none by more than one."""
    dev = run.dev
    for dtype in (torch.bfloat16, torch.float32):
        for k in (*ks[1:], 300 if not run.smoke else 40):
            F = (torch.randn(*B, N, D, generator=g, device=dev) * 2.0 + 0.25).to(dtype)
            Fp = (F.float() + torch.randn(F.shape, generator=g, device=dev) * 0.1).to(dtype)
            V = torch.linalg.qr(torch.randn(D, k, generator=g, device=dev))[0]
            D1 = torch.randn(*B, N, k, generator=g, device=dev)
            for bits in (4, 8):
                nq = D if bits == 8 else D // 2
                qdt = torch.int8 if bits == 8 else torch.uint8
                outs = {}
                for name, be in (("kernel", "triton"), ("reference", "torch")):
                    q = torch.full((*B, N, nq), 0x5A, dtype=qdt, device=dev)
                    sc = torch.full((*B, N, 1), float("nan"), device=dev)
                    # (an error is logged by guard; its NaN scales then fail the check below)
                    run.guard(f"parity residual_codes {dn(dtype)} k={k} int{bits} {name}", residual_codes, F, Fp, D1,
                              V, h=0.75, bits=bits, codes=q, scales=sc, backend=be)
                    outs[name] = (q, sc)
                run.sync()
                (qk, sk), (qr, sr) = outs["kernel"], outs["reference"]
                finite = bool(torch.isfinite(sk).all())
                srel = float(((sk - sr).abs() / sr).max()) if finite else float("inf")
                vk, vr = (code_values(c, D, bits).float() for c in (qk, qr))
                frac, worst = float((vk != vr).float().mean()), float((vk - vr).abs().max())
                for out, err, allowed, ok in (("scales", srel, 1e-5, finite and srel <= 1e-5),
                                              ("codes (share differing)", frac, 1e-3, frac <= 1e-3 and worst <= 1)):
                    run.parity.append(dict(op=f"residual_codes int{bits}", dtype=dn(dtype), k=k, out=out, err=err,
                                           allowed=allowed, exact_rel=float("nan"), ok=ok))
                    if not ok:
                        run.log(f"PARITY FAIL residual_codes int{bits} {dn(dtype)} k={k} {out}: {err:.3g} "
                                f"(allowed {allowed:g}; largest code difference {worst:g})")
    run.log("residual_codes parity done")


# ---------------------------------------------------------------------------------------------------
# 2. Copy bandwidth, 3. timings, 4. sweep
# ---------------------------------------------------------------------------------------------------
def copy_bandwidth(run: Run) -> None:
    n = (8 << 20) if run.smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=run.dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    ms = run.time_ms(lambda: dst.copy_(src))
    run.copy_gbs = 2 * n / (ms * 1e-3) / 1e9  # bytes read + bytes written
    run.log(f"device-to-device copy: {run.copy_gbs:.0f} GB/s ({n >> 20} MiB, {ms:.3f} ms)")
    del src, dst


def launch_cost(run: Run) -> None:
    """Host microseconds per call at a tiny shape (device work negligible): what a cached step pays per
    feature before any byte moves. 114 features per FLUX.1-dev step x this is the step's launch floor
    (the cached step's budget is 3.5-6.1 ms at N = 8..4)."""
    from svdcache_kernels import ReconstructPlan

    dev, dt = run.dev, (torch.float32 if run.smoke else torch.bfloat16)
    B, N, D, k = 1, 16, 64, 16
    g = torch.Generator().manual_seed(5)
    mk = lambda *sh, dtype=torch.float32: torch.randn(*sh, generator=g).to(dev, dtype)  # noqa: E731
    V, R, x = mk(D, k, dtype=dt), mk(B, N, D, dtype=dt), mk(B, N, D, dtype=dt)
    terms = [mk(B, N, k), mk(B, N, k)]
    gate = mk(B, 1, D, dtype=dt)
    qc, qs = (t.to(dev) for t in quantized(torch.randn(B, N, D, generator=g))[4])
    plan = ReconstructPlan(V, R, terms=terms, weights=(1.0, 0.5), dr_scale=1.0, x=x, gate=gate, out=x,
                           dR_codes=qc, dR_scales=qs, dR_bits=4, backend="triton")
    calls = {
        "torch.add (one aten launch)": lambda: torch.add(R, R),
        "ReconstructPlan, 2 terms + gate + int4, in place (the runtime's per-feature call)":
            lambda: plan(V, R, terms, (1.0, 0.5), None, 1.0, x, gate, x, qc, qs),
    }
    n = 20 if run.smoke else 2000
    for name, fn in calls.items():
        for _ in range(3 if run.smoke else 50):
            fn()
        run.sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t) / n * 1e6
        run.sync()
        run.launch_us[name] = host
        run.log(f"launch cost: {name}: {host:.1f} us per call (host)")


def make_cases(run: Run):
    """(name, k, kernel_fn, ref_fn(call), bytes, flops, ideal_bytes or None, compile_key)."""
    dev = run.dev
    dt = torch.bfloat16
    if run.smoke:
        Bn, N, D, ks = 1, 48 + 16, 96, (16, 48)
    else:
        Bn, N, D, ks = 1, 4096 + 512, 3072, tuple(int(k) for k in run.args.ks.split(","))
    M, s = Bn * N, 2
    g = torch.Generator(device=dev).manual_seed(1)

    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale + 0.25).to(dtype)

    cases = []
    for k in ks:
        V = torch.linalg.qr(torch.randn(D, k, generator=g, device=dev))[0].to(dt)
        F = rnd(Bn, N, D, dtype=dt, scale=2.0)
        cs, rs = (Bn, N, k), (Bn, N, D)
        st = dict(C=rnd(*cs), D1=rnd(*cs), D2=rnd(*cs), E=rnd(*cs), R=rnd(*rs, dtype=dt), dR=rnd(*rs, dtype=dt))
        vb = D * k * s
        # split, C + R (a first full step, or reuse/Taylor policies on C with the residual reused)
        cr = dict(C=st["C"], R=st["R"])
        cases.append(dict(
            name="split C,R", k=k, args=(F, V), kw=dict(**cr, order=0),
            fn=split, ref=split_reference,
            bytes=M * D * s + vb + M * k * 4 + M * D * s, flops=4 * M * D * k, ideal=2 * M * D * s))
        full = dict(**st, order=2, h1=1.0, h2=2.0, beta=0.9)
        cases.append(dict(
            name="split order2+E+dR", k=k, args=(F, V), kw=full, fn=split, ref=split_reference,
            bytes=M * D * s + vb + 3 * M * k * 4 + 4 * M * k * 4 + M * D * s + 2 * M * D * s,
            flops=4 * M * D * k, ideal=None))
        terms = [rnd(*cs, scale=3.0) for _ in range(3)]
        x = rnd(*rs, dtype=dt, scale=4.0)
        gate = rnd(Bn, 6 * D, dtype=dt)[:, 2 * D:3 * D].unsqueeze(1)  # FLUX: a chunk of the (B, 6D) modulation
        cases.append(dict(
            name="reconstruct taylor2+dR, x+gate in place", k=k, args=(V, st["R"]),
            kw=dict(terms=terms, weights=(1.0, 1.5, 1.125), dR=st["dR"], dr_scale=0.5, x=x, gate=gate, out=x),
            fn=reconstruct, ref=reconstruct_reference,
            bytes=3 * M * k * 4 + vb + 2 * M * D * s + M * D * s + Bn * D * s + M * D * s,
            flops=2 * M * k * D, ideal=None))
        # the cached step with residual="int4": codes (half a byte) + a scale per token instead of a
        # full-size dR; eager = the reference op, which dequantizes with torch ops first. Order 2 (D1, D2)
        # is the default from N = 4, order 1 below
        qc, qs = quantized(rnd(*rs, scale=0.3))[4]
        for nt in (2, 1):
            cases.append(dict(
                name=f"reconstruct taylor{nt}+int4 dR, x+gate in place", k=k, args=(V, st["R"]),
                kw=dict(terms=terms[:nt], weights=(1.5, 0.75)[:nt], dr_scale=1.5, x=x, gate=gate, out=x, dR_codes=qc,
                        dR_scales=qs, dR_bits=4),
                fn=reconstruct, ref=reconstruct_reference,
                bytes=nt * M * k * 4 + vb + M * D * s + M * (D + 1) // 2 + M * 4 + M * D * s + Bn * D * s + M * D * s,
                flops=2 * M * k * D, ideal=None))
        # the full step of residual="int4": r = (F - F_prev) / h - D1 V^T and its codes (two walks over D);
        # eager = the reference op (the torch path: a full-size fp32 r, ~12 passes). Ideal: F and F_prev
        # read once, codes and scales written once
        Fp = rnd(Bn, N, D, dtype=dt, scale=2.0)
        codes4 = torch.empty(Bn, N, D // 2, dtype=torch.uint8, device=dev)
        scales = torch.empty(Bn, N, 1, device=dev)
        cases.append(dict(
            name="residual codes int4 (full step)", k=k, args=(F, Fp, st["D1"], V),
            kw=dict(h=0.5, bits=4, codes=codes4, scales=scales), fn=residual_codes, ref=residual_codes_reference,
            bytes=4 * M * D * s + 2 * M * k * 4 + 2 * vb + M * D // 2 + M * 4, flops=4 * M * D * k,
            ideal=2 * M * D * s + M * D // 2 + M * 4))
        out = torch.empty(rs, dtype=dt, device=dev)
        cases.append(dict(
            name="reconstruct reuse (C V^T + R)", k=k, args=(V, st["R"]), kw=dict(terms=[st["C"]], weights=(1.0,), out=out),
            fn=reconstruct, ref=reconstruct_reference,
            bytes=M * k * 4 + vb + M * D * s + M * D * s, flops=2 * M * k * D, ideal=None))
    Fg = rnd(Bn, N, D, dtype=dt)
    G = torch.zeros(D, D, device=dev)
    cases.append(dict(
        name="gram G += F^T F", k="-", args=(G, Fg), kw={}, fn=gram_update, ref=gram_update_reference,
        bytes=M * D * s + 2 * D * D * 4, flops=2 * M * D * D, ideal=None))
    return cases


def time_cases(run: Run, cases) -> None:
    for c in cases:
        row = dict(op=c["name"], k=c["k"], bytes=c["bytes"], flops=c["flops"], ideal=c["ideal"])
        run.rows.append(row)
        fn, ref, a, kw = c["fn"], c["ref"], c["args"], c["kw"]
        row["ms"] = run.guard(f"time {c['name']} k={c['k']}", run.time_ms, lambda: fn(*a, backend="triton", **kw))
        row["eager_ms"] = run.guard(f"time eager {c['name']} k={c['k']}", run.time_ms, lambda: ref(*a, **kw))
        run.log(f"{c['name']:42s} k={c['k']!s:>4}: kernel {fmt(row['ms'])} ms, eager {fmt(row['eager_ms'])} ms")


def compile_cases(run: Run, cases) -> None:
    if run.args.no_compile:
        run.notes.append("torch.compile comparison skipped (--no-compile)")
        return
    import torch._dynamo as dynamo

    for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo.config, attr):
            setattr(dynamo.config, attr, 256)
    backend = "eager" if run.smoke else "inductor"  # smoke: exercise the path without a C++ toolchain
    compiled = {}
    # k = 128 first: if the budget runs out, the middle of the range is the one measured.
    order = sorted(cases, key=lambda c: (c["k"] != 128, str(c["k"])))
    first = True
    for c in order:
        need = (60 if first else 30) + run.args.sweep_s  # a compile may take that long; keep the sweep's share
        row = next((r for r in run.rows if r["op"] == c["name"] and r["k"] == c["k"]), None)
        if row is None:
            continue
        if run.left() < need + run.args.reserve_s:
            row["compile_ms"] = None
            row["compile_note"] = "budget"
            continue
        ref = c["ref"]
        if ref not in compiled:
            compiled[ref] = torch.compile(ref, backend=backend, dynamic=False)
        cf, a, kw = compiled[ref], c["args"], c["kw"]
        t = time.monotonic()
        ok = run.guard(f"compile {c['name']} k={c['k']}", lambda: (cf(*a, **kw), run.sync(), True)[-1])
        first = False
        if ok:
            row["compile_s"] = time.monotonic() - t
            row["compile_ms"] = run.guard(f"time compiled {c['name']} k={c['k']}", run.time_ms, lambda: cf(*a, **kw))
            run.log(f"{c['name']:42s} k={c['k']!s:>4}: torch.compile {fmt(row['compile_ms'])} ms "
                    f"(compiled in {row['compile_s']:.0f} s)")


SWEEP_SPLIT = [  # BLOCK_M, BLOCK_D, num_warps, num_stages
    (16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3), (64, 64, 8, 3),
    (64, 128, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3),
]


def sweep(run: Run, cases) -> None:
    if run.args.no_sweep:
        return
    configs = SWEEP_SPLIT[:2] if run.smoke else SWEEP_SPLIT
    targets = [c for c in cases if c["name"] in ("split C,R", "reconstruct taylor2+dR, x+gate in place")]
    for c in targets:
        op = "split" if c["name"].startswith("split") else "reconstruct"
        for bm, bd, w, st in configs:
            if run.left() < 8 + run.args.reserve_s:
                run.notes.append("config sweep cut short by the time budget")
                return
            with tc.config_override(op, BLOCK_M=bm, BLOCK_D=bd, num_warps=w, num_stages=st):
                a, kw, fn = c["args"], c["kw"], c["fn"]
                ms = run.guard(f"sweep {op} k={c['k']} {bm},{bd},{w},{st}", run.time_ms, lambda: fn(*a, backend="triton", **kw))
            run.sweep.append(dict(op=c["name"], k=c["k"], cfg=(bm, bd, w, st), ms=ms))


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def fmt(v, p=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{p}f}" if isinstance(v, float) else str(v)


def report(run: Run) -> str:
    dev = run.dev
    card = "CPU (Triton interpreter, smoke run)" if run.smoke else torch.cuda.get_device_name(dev)
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "?"
    L = [f"# SVD-Cache kernels on {card}", ""]
    L.append(f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, triton {tv}, "
             f"CUDA {torch.version.cuda}, Python {platform.python_version()}; `python bench/gpu_kernels.py"
             f"{' --cpu-smoke' if run.smoke else ''}` ({time.monotonic() - run.t0:.0f} s).")
    if run.smoke:
        L.append("")
        L.append("**Smoke run: tiny shapes under the Triton interpreter; the times are not kernel speeds.**")
    L += ["", f"Device-to-device copy bandwidth (read + write): **{fmt(run.copy_gbs, 0)} GB/s**.", ""]
    if run.launch_us:
        L += ["## Host cost per call (tiny shape: launch and Python only)", "",
              "| call | us per call | x 114 features (ms per cached FLUX.1-dev step) |", "|---|---|---|"]
        L += [f"| {n} | {fmt(us, 1)} | {fmt(us * 114e-3, 2)} |" for n, us in run.launch_us.items()]
        L.append("")
    n_ok = sum(p["ok"] for p in run.parity)
    L += [f"## Parity ({n_ok}/{len(run.parity)} pass)", "",
          "16-bit kernels vs the reference on the same rounded dot operands (tolerance: one ulp of a 16-bit "
          "output, 2e-5 of fp32, relative to the output's scale); last column: deviation from the exact fp32 "
          "reference, relative to the same scale.", "",
          "| op | dtype | k | output | max err | allowed | rel. dev. from exact | |",
          "|---|---|---|---|---|---|---|---|"]
    for p in run.parity:
        L.append(f"| {p['op']} | {p['dtype']} | {p['k']} | {p['out']} | {p['err']:.3g} | {p['allowed']:.3g} | "
                 f"{p['exact_rel']:.2e} | {'ok' if p['ok'] else '**FAIL**'} |")
    L += ["", "## Timings (bf16, B=1, median of do_bench, L2 flushed)" if not run.smoke else "## Timings (smoke)", "",
          "GB/s: minimal bytes moved / time. Ideal: reading F once + writing R once at copy bandwidth "
          "(split target: ratio <= 1.3).", "",
          "| op | k | kernel ms | GB/s | % copy BW | TFLOP/s | eager ms | x eager | compile ms | x compile | ideal ms | ratio to ideal |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run.rows:
        ms = r.get("ms")
        gbs = r["bytes"] / (ms * 1e-3) / 1e9 if ms else None
        tfl = r["flops"] / (ms * 1e-3) / 1e12 if ms else None
        frac = 100 * gbs / run.copy_gbs if gbs and run.copy_gbs == run.copy_gbs else None
        eager, comp = r.get("eager_ms"), r.get("compile_ms")
        ideal = r["ideal"] / (run.copy_gbs * 1e9) * 1e3 if r["ideal"] and run.copy_gbs == run.copy_gbs else None
        L.append(
            f"| {r['op']} | {r['k']} | {fmt(ms)} | {fmt(gbs, 0)} | {fmt(frac, 0)} | {fmt(tfl, 1)} | {fmt(eager)} | "
            f"{fmt(eager / ms if eager and ms else None, 2)} | {fmt(comp) if comp else r.get('compile_note', '-')} | "
            f"{fmt(comp / ms if comp and ms else None, 2)} | {fmt(ideal)} | {fmt(ms / ideal if ms and ideal else None, 2)} |")
    if run.sweep:
        L += ["", "## Launch-config sweep (BLOCK_M, BLOCK_D, num_warps, num_stages)", "",
              "| op | k | config | ms | vs heuristic |", "|---|---|---|---|---|"]
        base = {(r["op"], r["k"]): r.get("ms") for r in run.rows}
        for s in run.sweep:
            b = base.get((s["op"], s["k"]))
            L.append(f"| {s['op']} | {s['k']} | {s['cfg']} | {fmt(s['ms'])} | {fmt(b / s['ms'] if b and s['ms'] else None, 2)} |")
        best = {}
        for s in run.sweep:
            key = (s["op"], s["k"])
            if s["ms"] and (key not in best or s["ms"] < best[key]["ms"]):
                best[key] = s
        L += ["", "Best per op and k: " + "; ".join(f"{o} k={k}: {b['cfg']} {fmt(b['ms'])} ms" for (o, k), b in best.items())]
    if run.notes or run.errors:
        L += ["", "## Notes and errors", ""]
        L += [f"- {n}" for n in dict.fromkeys(run.notes)]
        L += [f"- ERROR {e}" for e in run.errors]
    return "\n".join(L) + "\n"


def card_slug(run: Run) -> str:
    if run.smoke:
        return "cpu-smoke"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name(run.dev)).strip("_")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--budget-s", type=float, default=280.0, help="wall-clock budget; later stages are skipped")
    ap.add_argument("--reserve-s", type=float, default=10.0, help="kept free for the report")
    ap.add_argument("--ks", default="64,128,256", help="basis ranks timed at FLUX shapes")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweep")
    ap.add_argument("--sweep-s", type=float, default=45.0, help="budget share kept for the sweep (run last)")
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --cpu-smoke", file=sys.stderr)
        return 2
    run = Run(args)
    if not run.smoke:
        torch.backends.cuda.matmul.allow_tf32 = False  # the references must be true fp32
        torch.backends.cudnn.allow_tf32 = False
    run.log(f"device: {'cpu (interpreter)' if run.smoke else torch.cuda.get_device_name()}; torch {torch.__version__}")
    try:
        run.guard("parity", parity, run)
        run.guard("copy bandwidth", copy_bandwidth, run)
        run.guard("launch cost", launch_cost, run)
        cases = run.guard("inputs", make_cases, run) or []
        run.guard("timings", time_cases, run, cases)
        run.guard("torch.compile", compile_cases, run, cases)
        run.guard("sweep", sweep, run, cases)
    finally:
        text = report(run)
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"gpu_kernels_{card_slug(run)}.md")
        with open(path, "w") as f:
            f.write(text)
        print()
        print(text)
        print(f"written: {path}")
    bad = [p for p in run.parity if not p["ok"]]
    return 1 if bad or run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
