"""split (the full step): coefficients C = F V, residual R = F - C V^T, predictor-state updates.

Variants: the runtime's default full step (D1, D2 from F - F_prev: order 2 from interval 4, order 1
below) and the residual form (C and R, order 0: the paper's state). Parity: the Triton kernel against
the reference op on the same inputs; on the 16-bit tensor-core path also against the reference
computed on the operands the kernel rounds to 16 bits ("emulated", rounding-level tolerance), the
exact reference then only within a gross-error bound. Timing: through ``SplitPlan``.
"""
from __future__ import annotations

import torch

from svdcache_kernels import SplitPlan, split, split_reference

from ..common import BITS, ULP, Case, Ctx, check, maxabs, tol32


# Launch configs (BLOCK_M, BLOCK_D, num_warps, num_stages) worth sweeping when the split / reconstruct
# heuristics are retuned on a GPU (the old bench/gpu_kernels.py swept them; the check does not: each is
# a compile). Set one through SVDCACHE_SPLIT_CONFIG / SVDCACHE_RECONSTRUCT_CONFIG="BLOCK_M=..,...".
SWEEP_SPLIT = [
    (16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3), (64, 64, 8, 3),
    (64, 128, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3),
]


def split_emulated(F, V, *, dot_dtype, C=None, D1=None, D2=None, R=None, order=0, h1=1.0, h2=1.0, F_prev=None):
    """The reference's math on the operands the 16-bit dot rounds (V, F - F_prev and C to ``dot_dtype``);
    ``dot_dtype`` None: plain fp32."""
    rd = (lambda t: t.to(dot_dtype).float()) if dot_dtype is not None else (lambda t: t.float())
    Vf = rd(V)
    Cn = F.float() @ Vf
    if order >= 1:
        d1 = (rd(F.float() - F_prev.float()) @ Vf / h1) if F_prev is not None else (Cn - C) / h1
        if order >= 2:
            D2.copy_((d1 - D1) / h2)
        D1.copy_(d1)
    if C is not None:
        C.copy_(Cn)
    if R is not None:
        R.copy_(F.float() - rd(Cn) @ Vf.T)


def cases(ctx: Ctx) -> list[Case]:
    sh, dt = ctx.shapes, ctx.dtype
    B, M, D = sh.B, sh.J, sh.D  # the single blocks' joint rows: the largest feature
    s = torch.empty((), dtype=dt).element_size()
    dot = dt if ctx.dot16() else None
    t16 = 2 * ULP[dt] if dt != torch.float32 else tol32(D)
    loose = None if dot is None else 32 * 2.0 ** -BITS[dt]
    out = []
    for k in ctx.ks:
        vb = D * k * s

        def build_fprev(k=k, order=2):
            return dict(F=ctx.rnd(B, M, D, dtype=dt, scale=2.0), Fp=ctx.rnd(B, M, D, dtype=dt, scale=2.0),
                        V=ctx.basis(D, k), D1=ctx.rnd(B, M, k), D2=ctx.nan(B, M, k) if order == 2 else None,
                        order=order, h1=0.75, h2=2.0)

        def kw_fprev(st):
            kw = dict(D1=st["D1"], order=st["order"], h1=st["h1"], F_prev=st["Fp"])
            if st["order"] == 2:
                kw.update(D2=st["D2"], h2=st["h2"])
            return kw

        def run_kernel(st):
            split(st["F"], st["V"], backend="triton", **kw_fprev(st))
            return {n: st[n] for n in ("D1", "D2") if st[n] is not None}

        def run_ref(st):
            split_reference(st["F"], st["V"], **kw_fprev(st))
            return {n: st[n] for n in ("D1", "D2") if st[n] is not None}

        def checks_fprev(st, got, ref):
            rows = []
            emu = {n: st[n].clone() for n in ("D1", "D2") if st[n] is not None}
            kw = kw_fprev(st)
            kw.update(D1=emu["D1"], D2=emu.get("D2"))
            split_emulated(st["F"], st["V"], dot_dtype=dot, **kw)
            for n in got:
                sc = maxabs(emu[n])
                rows.append(check(n, got[n], emu[n], tol32(D), sc, "emulated" if dot else "reference"))
                if loose is not None:
                    rows.append(check(n, got[n], ref[n], loose, sc, "exact (gross bound)"))
            return rows

        def plan_fprev(st):
            kw = kw_fprev(st)
            p = SplitPlan(st["F"], st["V"], backend="triton", **kw)
            kw.pop("order")
            return lambda: p(st["F"], st["V"], **kw)

        def eager_fprev(st):
            kw = kw_fprev(st)
            return lambda: split_reference(st["F"], st["V"], **kw)

        for order in (2, 1):
            out.append(Case(
                op="split", name=f"full step: F_prev, order {order}" + (" (default from N = 4)" if order == 2 else ""),
                k=k, build=lambda k=k, order=order: build_fprev(k, order), kernel=run_kernel, reference=run_ref,
                checks=checks_fprev, plan=plan_fprev, eager=eager_fprev,
                bytes=2 * M * D * s + vb + M * k * 4 * (2 if order == 1 else 3), flops=2 * M * D * k,
                ideal=2 * M * D * s))

        # residual form: C and R (order 0)
        def build_cr(k=k):
            return dict(F=ctx.rnd(B, M, D, dtype=dt, scale=2.0), V=ctx.basis(D, k), C=ctx.nan(B, M, k),
                        R=ctx.nan(B, M, D, dtype=dt))

        def k_cr(st):
            split(st["F"], st["V"], backend="triton", C=st["C"], R=st["R"])
            return dict(C=st["C"], R=st["R"])

        def r_cr(st):
            split_reference(st["F"], st["V"], C=st["C"], R=st["R"])
            return dict(C=st["C"], R=st["R"])

        def checks_cr(st, got, ref):
            emu = dict(C=st["C"].clone(), R=st["R"].clone())
            split_emulated(st["F"], st["V"], dot_dtype=dot, C=emu["C"], R=emu["R"])
            # R = F - C V^T cancels: its error scales with |F|
            scales = dict(C=maxabs(emu["C"]), R=max(maxabs(emu["R"]), maxabs(st["F"])))
            rows = []
            for n, tol in (("C", tol32(D)), ("R", t16)):
                rows.append(check(n, got[n], emu[n], tol, scales[n], "emulated" if dot else "reference"))
                if loose is not None:
                    rows.append(check(n, got[n], ref[n], loose, scales[n], "exact (gross bound)"))
            return rows

        out.append(Case(
            op="split", name="residual form: C, R (order 0)", k=k, build=build_cr, kernel=k_cr, reference=r_cr,
            checks=checks_cr,
            plan=lambda st: (lambda p: lambda: p(st["F"], st["V"], C=st["C"], R=st["R"]))(
                SplitPlan(st["F"], st["V"], C=st["C"], R=st["R"], backend="triton")),
            eager=lambda st: lambda: split_reference(st["F"], st["V"], C=st["C"], R=st["R"]),
            bytes=M * D * s + vb + M * k * 4 + M * D * s, flops=4 * M * D * k, ideal=2 * M * D * s))
    return out


def runtime_variants(ctx: Ctx, rows: int, k: int) -> list[Case]:
    """The full-step splits the runtime launches for a feature of ``rows`` rows at rank ``k`` (orders 1
    and 2 from F_prev), for the precompile stage (plan calls only)."""
    dt, D, B = ctx.dtype, ctx.shapes.D, ctx.shapes.B
    out = []
    for order in (1, 2):
        def build(order=order):
            return dict(F=ctx.rnd(B, rows, D, dtype=dt), Fp=ctx.rnd(B, rows, D, dtype=dt), V=ctx.basis(D, k),
                        D1=ctx.rnd(B, rows, k), D2=ctx.rnd(B, rows, k))

        def plan(st, order=order):
            kw = dict(D1=st["D1"], F_prev=st["Fp"], h1=1.0)
            if order == 2:
                kw.update(D2=st["D2"], h2=1.0)
            p = SplitPlan(st["F"], st["V"], order=order, backend="triton", **kw)
            return lambda: p(st["F"], st["V"], **kw)

        out.append(Case(op="split", name=f"runtime F_prev order {order} M={rows}", k=k, build=build, kernel=None,
                        reference=None, checks=None, plan=plan, parity=False))
    return out


def parity(ctx: Ctx, need_s: float):
    from ..common import run_parity

    return run_parity(ctx, cases(ctx), need_s)


def timing(ctx: Ctx, timer, need_s: float, peak_bw, copy_bw):
    from ..common import run_timing

    return run_timing(ctx, cases(ctx), timer, need_s, peak_bw, copy_bw)
