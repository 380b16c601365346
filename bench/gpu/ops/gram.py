"""gram_update (calibration): G += F^T F in fp32, F in the activation dtype.

Parity: kernel vs the reference op (16-bit products are exact in fp32: an fp32 tolerance for every
dtype, scaled by the number of rows summed). Timing: the op (calibration calls it directly); it is
compute-bound (2 M D^2 FLOPs): TFLOP/s is its number, GB/s is reported for completeness.
"""
from __future__ import annotations

import torch

from svdcache_kernels import gram_update, gram_update_reference

from ..common import Case, Ctx, check, maxabs, tol32


def cases(ctx: Ctx) -> list[Case]:
    sh, dt = ctx.shapes, ctx.dtype
    B, M, D = sh.B, sh.J, sh.D
    s = torch.empty((), dtype=dt).element_size()

    def build():
        return dict(G=ctx.rnd(D, D), F=ctx.rnd(B, M, D, dtype=dt))

    def checks(st, got, ref):
        return [check("G", got["G"], ref["G"], tol32(B * M), maxabs(ref["G"]), "reference")]

    return [Case(
        op="gram_update", name="G += F^T F (fp32)", k="-", build=build,
        kernel=lambda st: dict(G=gram_update(st["G"], st["F"], backend="triton")),
        reference=lambda st: dict(G=gram_update_reference(st["G"], st["F"])), checks=checks,
        plan=lambda st: lambda: gram_update(st["G"], st["F"], backend="triton"),
        eager=lambda st: lambda: gram_update_reference(st["G"], st["F"]),
        bytes=B * M * D * s + 2 * D * D * 4, flops=2 * B * M * D * D)]


def runtime_variants(ctx: Ctx, rows: int, k: int) -> list[Case]:
    return []  # calibration only: the e2e run uses the zero-setup basis


def parity(ctx: Ctx, need_s: float):
    from ..common import run_parity

    return run_parity(ctx, cases(ctx), need_s)


def timing(ctx: Ctx, timer, need_s: float, peak_bw, copy_bw):
    from ..common import run_timing

    return run_timing(ctx, cases(ctx), timer, need_s, peak_bw, copy_bw)
