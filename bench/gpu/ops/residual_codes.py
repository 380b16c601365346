"""residual_codes (the full step of residual="int4" / "int8"): r = (F - F_prev) / h - D1 V^T as per-row
codes (symmetric absmax, one fp32 scale per row) in one pass.

Parity: kernel vs the reference op; both quantize the same r, but the GEMM D1 V^T sums in another
order, so a code may flip by one at a rounding tie: scales within 1e-5 relative, codes equal but for
at most 1e-3 of them, none by more than one. Timing: the op (the runtime calls it directly); ideal
traffic: F and F_prev read once, codes and scales written once.
"""
from __future__ import annotations

import torch

from svdcache_kernels import residual_codes, residual_codes_reference

from ..common import Case, Ctx, code_values


def _state(ctx: Ctx, rows: int, k: int, bits: int) -> dict:
    sh, dt = ctx.shapes, ctx.dtype
    B, D = sh.B, sh.D
    F = ctx.rnd(B, rows, D, scale=2.0)
    Fp = (F + ctx.rnd(B, rows, D, scale=0.1, shift=0.0)).to(dt)
    return dict(F=F.to(dt), Fp=Fp, D1=ctx.rnd(B, rows, k), V=ctx.basis(D, k), h=0.75, bits=bits,
                codes=torch.full((B, rows, D if bits == 8 else D // 2), 0x5A,
                                 dtype=torch.int8 if bits == 8 else torch.uint8, device=ctx.device),
                scales=ctx.nan(B, rows, 1))


def _kw(st):
    return dict(h=st["h"], bits=st["bits"], codes=st["codes"], scales=st["scales"])


def _checks(st, got, ref) -> list:
    D, bits = st["F"].shape[-1], st["bits"]
    sk, sr = got["scales"], ref["scales"]
    finite = bool(torch.isfinite(sk).all())
    srel = float(((sk - sr).abs() / sr).max()) if finite else float("inf")
    vk, vr = (code_values(c, D, bits).float() for c in (got["codes"], ref["codes"]))
    frac, worst = float((vk != vr).float().mean()), float((vk - vr).abs().max())
    return [dict(out="scales (max rel. diff)", against="reference", err=srel, tol=1e-5, ratio=srel / 1e-5,
                 ok=finite and srel <= 1e-5, finite=finite),
            dict(out=f"codes (share differing; max diff {worst:g})", against="reference", err=frac, tol=1e-3,
                 ratio=frac / 1e-3, ok=frac <= 1e-3 and worst <= 1, finite=True)]


def cases(ctx: Ctx, rows: int | None = None) -> list[Case]:
    sh, dt = ctx.shapes, ctx.dtype
    B, M, D = sh.B, rows or sh.J, sh.D
    s = torch.empty((), dtype=dt).element_size()
    out = []
    for k in ctx.ks:
        for bits in (4, 8):
            def run(st, backend):
                residual_codes(st["F"], st["Fp"], st["D1"], st["V"], backend=backend, **_kw(st))
                return dict(codes=st["codes"], scales=st["scales"])

            qb = M * D // 2 if bits == 4 else M * D
            out.append(Case(
                op="residual_codes", name=f"full step: int{bits} codes of r", k=k,
                build=lambda k=k, bits=bits: _state(ctx, M, k, bits),
                kernel=lambda st: run(st, "triton"), reference=lambda st: run(st, "torch"), checks=_checks,
                plan=lambda st: lambda: residual_codes(st["F"], st["Fp"], st["D1"], st["V"], backend="triton",
                                                       **_kw(st)),
                eager=lambda st: lambda: residual_codes_reference(st["F"], st["Fp"], st["D1"], st["V"], **_kw(st)),
                bytes=2 * B * M * D * s + B * M * k * 4 + D * k * 4 + B * qb + B * M * 4, flops=2 * B * M * D * k,
                ideal=2 * B * M * D * s + B * qb + B * M * 4))
    return out


def runtime_variants(ctx: Ctx, rows: int, k: int) -> list[Case]:
    """The int4 full step the default config launches for a feature of ``rows`` rows at rank ``k``."""
    def plan(st):
        return lambda: residual_codes(st["F"], st["Fp"], st["D1"], st["V"], backend="triton", **_kw(st))

    return [Case(op="residual_codes", name=f"runtime int4 M={rows}", k=k, build=lambda: _state(ctx, rows, k, 4),
                 kernel=None, reference=None, checks=None, plan=plan, parity=False)]


def parity(ctx: Ctx, need_s: float):
    from ..common import run_parity

    return run_parity(ctx, cases(ctx), need_s)


def timing(ctx: Ctx, timer, need_s: float, peak_bw, copy_bw):
    from ..common import run_timing

    return run_timing(ctx, cases(ctx), timer, need_s, peak_bw, copy_bw)
