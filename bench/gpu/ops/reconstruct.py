"""reconstruct (the cached step of one feature): F_hat = R + (sum_i w_i T_i) V^T (+ s dR), fused into
``x + gate * F_hat`` in place, as FLUX's blocks add it to their stream.

Variants: the runtime's cached steps at FLUX's image stream (2 terms + int4 dR: the default from
interval 4; 1 term + int4 below; 1 term before the codes exist; 0 terms at a generation's first
cached step), int8 dR, and the paper's reuse form (C V^T + R into a new tensor). Parity: kernel vs
the reference (and vs the reference on the 16-bit-rounded dot operands on a GPU). Timing: through
``ReconstructPlan``; plus the host cost of one plan call at a tiny shape (the per-feature launch floor
of a cached step).
"""
from __future__ import annotations

import time

import torch

from svdcache_kernels import ReconstructPlan, reconstruct, reconstruct_reference

from ..common import BITS, ULP, Case, Ctx, check, dequantize, make_codes, maxabs


def reconstruct_emulated(V, R, *, dot_dtype, terms=(), weights=(), dR=None, dr_scale=0.0, x=None, gate=None,
                         dR_codes=None, dR_scales=None, dR_bits=8):
    """The reference's math with P = sum w_i T_i and V rounded to ``dot_dtype`` (the 16-bit dot's
    operands); the quantized dR is dequantized in fp32 (no rounding to emulate)."""
    if dR_codes is not None:
        dR = dequantize(dR_codes, dR_scales, R.shape[-1], dR_bits)
    fh = R.float()
    if terms:
        P = sum(float(w) * t for w, t in zip(weights, terms))
        rd = (lambda t: t.to(dot_dtype).float()) if dot_dtype is not None else (lambda t: t.float())
        fh = fh + rd(P) @ rd(V).T
    if dR is not None and dr_scale:
        fh = fh + float(dr_scale) * dR.float()
    if x is not None:
        g = 1.0 if gate is None else (gate.float() if gate.dim() == R.dim() else gate.float().unsqueeze(-2))
        fh = x.float() + g * fh
    return fh.to(x.dtype if x is not None else R.dtype)


VARIANTS = (
    # name, terms, bits of dR (0: none), in place on x with gate
    ("cached step: 2 terms + int4 dR + gate, in place (default from N = 4)", 2, 4, True),
    ("cached step: 1 term + int4 dR + gate, in place (default below N = 4)", 1, 4, True),
    ("cached step: 1 term + gate, in place (before the codes exist)", 1, 0, True),
    ("first cached step: x + gate * R, in place", 0, 0, True),
    ("cached step: 2 terms + int8 dR + gate, in place (residual=int8)", 2, 8, True),
    ("reuse: C V^T + R into a new tensor (the paper's form)", 1, 0, False),
)
WEIGHTS = (1.5, 0.75)


def _state(ctx: Ctx, rows: int, k: int, n_terms: int, bits: int, gated: bool, dev_weights: bool = False) -> dict:
    sh, dt = ctx.shapes, ctx.dtype
    B, D = sh.B, sh.D
    st = dict(V=ctx.basis(D, k), R=ctx.rnd(B, rows, D, dtype=dt, scale=2.0),
              terms=[ctx.rnd(B, rows, k, scale=3.0) for _ in range(n_terms)], weights=WEIGHTS[:n_terms],
              codes=None, scales=None, bits=bits or 8, dr_scale=0.0, x=None, gate=None)
    if bits:
        st["codes"], st["scales"] = make_codes(ctx, rows, D, bits, B)
        st["dr_scale"] = 1.25
    if gated:
        st["x"] = ctx.rnd(B, rows, D, dtype=dt, scale=4.0)
        st["gate"] = ctx.gate(B, D)
    if dev_weights:  # as cuda_graphs' deferred sum passes them: read by the kernel when it runs
        st["weights"] = torch.tensor(WEIGHTS[:n_terms], dtype=torch.float32, device=ctx.device)
        if bits:
            st["dr_scale"] = torch.tensor([st["dr_scale"]], dtype=torch.float32, device=ctx.device)
    return st


def _kw(st) -> dict:
    return dict(terms=st["terms"], weights=st["weights"], dr_scale=st["dr_scale"], gate=st["gate"],
                dR_codes=st["codes"], dR_scales=st["scales"], dR_bits=st["bits"])


def _plan(st):
    x = st["x"]
    p = ReconstructPlan(st["V"], st["R"], x=x, out=x, backend="triton", **_kw(st))
    args = (st["V"], st["R"], st["terms"], st["weights"], None, st["dr_scale"], x, st["gate"], x, st["codes"],
            st["scales"])
    return lambda: p(*args)


def _plan_new(st):
    p = ReconstructPlan(st["V"], st["R"], backend="triton", **_kw(st))
    args = (st["V"], st["R"], st["terms"], st["weights"], None, st["dr_scale"], None, None, None, st["codes"],
            st["scales"])
    return lambda: p(*args)


def cases(ctx: Ctx, rows: int | None = None) -> list[Case]:
    sh, dt = ctx.shapes, ctx.dtype
    B, M, D = sh.B, rows or sh.N, sh.D
    s = torch.empty((), dtype=dt).element_size()
    dot = dt if ctx.dot16() else None
    t16 = 2 * ULP[dt]
    loose = None if dot is None else 32 * 2.0 ** -BITS[dt]
    out = []
    for k in ctx.ks:
        for name, nt, bits, gated in VARIANTS:
            if nt == 0 and k != ctx.ks[0]:  # no coefficient terms: k only sets the basis' shape
                continue

            def build(k=k, nt=nt, bits=bits, gated=gated):
                return _state(ctx, M, k, nt, bits, gated)

            def run_kernel(st):
                if st["x"] is None:
                    return dict(F_hat=reconstruct(st["V"], st["R"], backend="triton", **_kw(st)))
                x = st["x"]
                reconstruct(st["V"], st["R"], backend="triton", x=x, out=x, **_kw(st))
                return dict(out=x)

            def run_ref(st):
                r = reconstruct_reference(st["V"], st["R"], x=st["x"], **_kw(st))
                return dict(out=r) if st["x"] is not None else dict(F_hat=r)

            def checks(st, got, ref):
                emu = reconstruct_emulated(st["V"], st["R"], dot_dtype=dot, x=st["x"], **_kw(st))
                (n, g), = got.items()
                sc = maxabs(emu)
                rows_ = [check(n, g, emu, t16, sc, "emulated" if dot else "reference")]
                if loose is not None:
                    rows_.append(check(n, g, ref[n], loose, sc, "exact (gross bound)"))
                return rows_

            codes_b = 0 if not bits else (M * D // 2 if bits == 4 else M * D) + M * 4
            io = 2 * M * D * s + B * D * s if gated else M * D * s  # x read + written, gate; or F_hat written
            out.append(Case(
                op="reconstruct", name=name, k=k if nt else "-", build=build, kernel=run_kernel, reference=run_ref,
                checks=checks, plan=_plan if gated else _plan_new,
                eager=lambda st: (lambda kw: lambda: reconstruct_reference(st["V"], st["R"], x=st["x"], **kw))(_kw(st)),
                bytes=nt * M * k * 4 + (D * k * s if nt else 0) + M * D * s + codes_b + io,
                flops=2 * M * k * D if nt else 0))
    return out


def runtime_variants(ctx: Ctx, rows: int, k: int) -> list[Case]:
    """The cached-step reconstructs the runtime launches for a feature of ``rows`` rows at rank ``k``
    (0, 1, 2 terms; int4 codes; gated, in place; weights as floats, and as device tensors as the
    cuda_graphs path passes them), for the precompile stage."""
    out = []
    for nt, bits, dev in ((0, 0, False), (1, 0, False), (1, 4, False), (2, 4, False), (1, 0, True), (1, 4, True),
                          (2, 4, True)):
        name = (f"runtime {nt} terms{' + int4' if bits else ''}{' (device weights: cuda_graphs)' if dev else ''} "
                f"M={rows}")
        out.append(Case(op="reconstruct", name=name, k=k,
                        build=lambda nt=nt, bits=bits, dev=dev: _state(ctx, rows, k, nt, bits, True, dev), kernel=None,
                        reference=None, checks=None, plan=_plan, parity=False))
    return out


def host_cost(ctx: Ctx) -> list[dict]:
    """Host microseconds per call at a tiny shape (device work negligible): a cached step pays this
    per feature before any byte moves (FLUX.1-dev: 114 features per step)."""
    dt = ctx.dtype
    B, N, D, k = 1, 16, 64, 16
    st = dict(V=ctx.basis(D, k), R=ctx.rnd(B, N, D, dtype=dt), terms=[ctx.rnd(B, N, k), ctx.rnd(B, N, k)],
              weights=WEIGHTS, bits=4, dr_scale=1.0, x=ctx.rnd(B, N, D, dtype=dt), gate=ctx.gate(B, D))
    st["codes"], st["scales"] = make_codes(ctx, N, D, 4, B)
    call = _plan(st)
    R = st["R"]
    calls = {"torch.add (one aten launch)": lambda: torch.add(R, R),
             "ReconstructPlan: 2 terms + gate + int4, in place (the runtime's per-feature call)": call}
    rows = []
    n = 20 if ctx.device.type != "cuda" else 2000
    for name, fn in calls.items():
        for _ in range(3 if ctx.device.type != "cuda" else 50):
            fn()
        ctx.sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        us = (time.perf_counter() - t) / n * 1e6
        ctx.sync()
        rows.append(dict(call=name, host_us=us, calls=n))
    return rows


def parity(ctx: Ctx, need_s: float):
    from ..common import run_parity

    return run_parity(ctx, cases(ctx), need_s)


def timing(ctx: Ctx, timer, need_s: float, peak_bw, copy_bw):
    from ..common import run_timing

    return run_timing(ctx, cases(ctx), timer, need_s, peak_bw, copy_bw)
