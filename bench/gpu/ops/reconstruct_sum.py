"""reconstruct_sum (a whole cached stream): x + sum_f gate_f * F_hat_f[rows_f : rows_f + N], the image
stream of a cached FLUX call (double blocks' image features at rows 0, single blocks' joint features
read from row L, after the text), and reconstruct_stacked, the same for features whose states are
stacked (the runtime's arena path; PyTorch ops on every backend).

Parity: the Triton chain (one reconstruct launch per feature, in place on the stream) against the
reference op; reconstruct_stacked against the reference op on the same features as SumTerms. Timing:
through ``ReconstructSumPlan`` (in place, as the runtime's deferred sum calls it).
"""
from __future__ import annotations

import torch

from svdcache_kernels import (
    ReconstructSumPlan,
    SumTerm,
    reconstruct_stacked,
    reconstruct_sum,
    reconstruct_sum_reference,
)

from ..common import ULP, Case, Ctx, check, make_codes, maxabs

WEIGHTS = (1.5, 0.75)


def n_features(ctx: Ctx) -> int:
    return 4


def _items(ctx: Ctx, k: int, nf: int, joint_share: bool = True) -> tuple[torch.Tensor, list]:
    sh, dt = ctx.shapes, ctx.dtype
    B, N, L, D = sh.B, sh.N, sh.L, sh.D
    x = ctx.rnd(B, N, D, dtype=dt, scale=4.0)
    items = []
    for f in range(nf):
        joint = joint_share and f % 2 == 1  # every second feature from the joint rows, as the single blocks'
        rows = L + N if joint else N
        codes, scales = make_codes(ctx, rows, D, 4, B)
        items.append(SumTerm(V=ctx.basis(D, k), R=ctx.rnd(B, rows, D, dtype=dt, scale=2.0),
                             terms=(ctx.rnd(B, rows, k, scale=3.0), ctx.rnd(B, rows, k, scale=3.0)),
                             weights=WEIGHTS, gate=ctx.gate(B, D), codes=codes, scales=scales, bits=4,
                             dr_scale=1.25, rows=L if joint else 0))
    return x, items


def cases(ctx: Ctx) -> list[Case]:
    sh, dt = ctx.shapes, ctx.dtype
    B, N, D = sh.B, sh.N, sh.D
    s = torch.empty((), dtype=dt).element_size()
    nf = n_features(ctx)
    u = 2.0 ** -8 if dt == torch.bfloat16 else ULP[dt] / 2
    out = []
    for k in ctx.ks:
        def build(k=k):
            x, items = _items(ctx, k, nf)
            return dict(x=x, items=items)

        def run_kernel(st):
            return dict(out=reconstruct_sum(st["x"], st["items"], backend="triton"))

        def run_ref(st):
            return dict(out=reconstruct_sum_reference(st["x"], st["items"]))

        def checks(st, got, ref):
            # the chain rounds the stream to the activation dtype after each feature, and (16-bit dot)
            # rounds each P and V: about one unit roundoff per feature for each, relative to the stream
            tol = 4 * nf * u
            return [check("out", got["out"], ref["out"], tol, maxabs(ref["out"]), "reference")]

        def plan(st):
            x, items = st["x"], st["items"]
            p = ReconstructSumPlan(x, items, out=x, backend="triton")
            return lambda: p(x, items, out=x)

        per_feature = N * D * s + 2 * N * k * 4 + N * D // 2 + N * 4 + D * k * s + D * s
        out.append(Case(
            op="reconstruct_sum", name=f"cached stream: {nf} features (half from joint rows), 2 terms + int4 + gate, "
            "in place", k=k, build=build, kernel=run_kernel, reference=run_ref, checks=checks, plan=plan,
            eager=lambda st: lambda: reconstruct_sum_reference(st["x"], st["items"], out=st["x"]),
            bytes=2 * B * N * D * s + nf * B * per_feature, flops=nf * 2 * B * N * k * D,
            note="bytes: the stream read and written once and the N rows each feature feeds; the chain "
                 "moves more (the stream once per feature, joint features over all their rows)"))

        # reconstruct_stacked: F features' states stacked along a first dim (rows 0), torch ops
        def build_stacked(k=k):
            x, items = _items(ctx, k, nf, joint_share=False)
            st = dict(x=x, items=items)
            st["R"] = torch.stack([it.R for it in items])
            st["T"] = [torch.stack([it.terms[i] for it in items]) for i in range(2)]
            st["G"] = torch.stack([it.gate.contiguous() for it in items])
            st["Vs"] = torch.stack([it.V for it in items])
            st["codes"] = torch.stack([it.codes for it in items])
            st["scales"] = torch.stack([it.scales for it in items])
            return st

        def run_stacked(st):
            return dict(out=reconstruct_stacked(st["x"], st["R"], st["T"], list(WEIGHTS), st["G"], st["Vs"],
                                                st["codes"], st["scales"], 4, 1.25, 0))

        def checks_stacked(st, got, ref):  # both sum in fp32 and round once
            return [check("out", got["out"], ref["out"], 2 * ULP[dt], maxabs(ref["out"]), "reference")]

        out.append(Case(
            op="reconstruct_stacked", name=f"stacked states: {nf} features, 2 terms + int4 + gate (torch ops)", k=k,
            build=build_stacked, kernel=run_stacked, reference=run_ref, checks=checks_stacked,
            plan=lambda st: lambda: run_stacked(st),
            bytes=2 * B * N * D * s + nf * B * per_feature, flops=nf * 2 * B * N * k * D,
            note="PyTorch ops on every backend (no kernel)"))
    return out


def runtime_variants(ctx: Ctx, rows: int, k: int) -> list[Case]:
    return []  # a chain of the reconstruct launches: reconstruct.runtime_variants covers them


def parity(ctx: Ctx, need_s: float):
    from ..common import run_parity

    return run_parity(ctx, cases(ctx), need_s)


def timing(ctx: Ctx, timer, need_s: float, peak_bw, copy_bw):
    from ..common import run_timing

    return run_timing(ctx, cases(ctx), timer, need_s, peak_bw, copy_bw)
