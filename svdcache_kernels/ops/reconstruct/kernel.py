"""Cached-step reconstruction, fused Triton kernel: F_hat = P V^T + R (+ s dR), optional out = x + gate F_hat.

One program owns BLOCK_M rows. It forms the forecast P = sum_i w_i terms_i (k dims, fp32, up to 3
terms, weights as scalar arguments) once in registers, then loops over D in BLOCK_D chunks:
``F_hat = P @ V^T[:, d] + R + dr_scale * dR`` and, with ``x``, ``out = x + gate * F_hat`` (the gate
row of the program's batch item is gathered per row: ``b = row // N``, so a gate with any batch
stride, e.g. a chunk of a (B, 6D) modulation tensor, needs no copy).

Every element of ``out`` is written by the program that read the same element of ``x`` (and R, dR)
just before, so ``out`` may be ``x`` (in place) or even ``R``.

Precision on a GPU: bf16/fp16 R takes the tensor-core dot with P rounded to R's dtype and V in R's
dtype (an fp32 basis is converted once and cached on V, see ``basis_for_dot``), fp32 accumulation:
an error of about one rounding of R's dtype relative to |P V^T|, the size of the rounding of the
16-bit result itself. fp32 R and the interpreter use an fp32 ``ieee`` dot.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._triton_common import (
    MAX_KERNEL_K,
    basis_for_dot,
    block_k,
    dot_fp32,
    interp_blocks,
    launch,
    require_launchable,
    resolve_config,
    row_stride,
    rows_block,
    rows_of,
)
from .reference import MAX_TERMS, check_reconstruct_args, gate_rows_shape, reconstruct_reference


@triton.jit
def _reconstruct_kernel(
    V_ptr, R_ptr, T0_ptr, T1_ptr, T2_ptr, dR_ptr, X_ptr, G_ptr, O_ptr,
    M, D, K, N_TOK,
    stride_vd, stride_vk, stride_rm, stride_t0, stride_t1, stride_t2,
    stride_drm, stride_xm, stride_gb, stride_om,
    w0, w1, w2, dr_scale,
    N_TERMS: tl.constexpr, HAS_DR: tl.constexpr, HAS_X: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d0 = tl.arange(0, BLOCK_D)

    if N_TERMS > 0:
        pmask = mask_m[:, None] & mask_k[None, :]
        p = w0 * tl.load(T0_ptr + rows[:, None] * stride_t0 + offs_k[None, :], mask=pmask, other=0.0)
        if N_TERMS > 1:
            p += w1 * tl.load(T1_ptr + rows[:, None] * stride_t1 + offs_k[None, :], mask=pmask, other=0.0)
        if N_TERMS > 2:
            p += w2 * tl.load(T2_ptr + rows[:, None] * stride_t2 + offs_k[None, :], mask=pmask, other=0.0)
        if DOT_FP32:
            p_op = p
        else:
            p_op = p.to(R_ptr.dtype.element_ty)
    if HAS_GATE:
        g_rows = G_ptr + (offs_m // N_TOK).to(tl.int64) * stride_gb

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        mask_d = offs_d < D
        mask = mask_m[:, None] & mask_d[None, :]
        # R, dR, x and out stream through once: evict_first keeps the V tiles (re-read by every
        # program) in L2.
        fh = tl.load(
            R_ptr + rows[:, None] * stride_rm + offs_d[None, :], mask=mask, other=0.0, eviction_policy="evict_first",
        ).to(tl.float32)
        if N_TERMS > 0:
            v = tl.load(
                V_ptr + offs_d[:, None] * stride_vd + offs_k[None, :] * stride_vk,
                mask=mask_d[:, None] & mask_k[None, :], other=0.0,
            )
            if DOT_FP32:
                fh += tl.dot(p_op, tl.trans(v.to(tl.float32)), input_precision="ieee")
            else:
                fh += tl.dot(p_op, tl.trans(v.to(p_op.dtype)))
        if HAS_DR:
            dr = tl.load(
                dR_ptr + rows[:, None] * stride_drm + offs_d[None, :], mask=mask, other=0.0, eviction_policy="evict_first",
            )
            fh += dr_scale * dr.to(tl.float32)
        if HAS_X:
            x = tl.load(
                X_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=mask, other=0.0, eviction_policy="evict_first",
            ).to(tl.float32)
            if HAS_GATE:
                g = tl.load(g_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
                fh = x + g * fh
            else:
                fh = x + fh
        tl.store(
            O_ptr + rows[:, None] * stride_om + offs_d[None, :], fh.to(O_ptr.dtype.element_ty), mask=mask,
            eviction_policy="evict_first",
        )


def reconstruct_config(M: int, D: int, K: int, n_terms: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Launch parameters (before overrides); GPU heuristic as for the split's second loop."""
    if device.type != "cuda":
        return interp_blocks()
    bk = block_k(K) if n_terms else 16
    bm = rows_block(M, device, start=32 if dtype == torch.float32 else 64)  # fp32: FMA dot, registers
    bd = 32 if dtype == torch.float32 else 64
    if not n_terms:
        bd = 128  # a pure streaming add: wide rows, no V tile
    warps = 8 if bm * bk >= 64 * 128 else 4
    stages = 2 if bk >= 256 or dtype == torch.float32 else 3
    return {"BLOCK_M": bm, "BLOCK_D": bd, "num_warps": warps, "num_stages": stages}


def _gate_rows(R: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The gate as (B, D) rows, one per batch item of R (a view when the batch dims flatten)."""
    g = gate.squeeze(-2) if gate_rows_shape(R, gate) else gate
    return g.reshape(-1, R.shape[-1])  # copies only a gate whose batch dims do not flatten (tiny)


@torch.no_grad()
def reconstruct_triton(
    V: torch.Tensor,
    R: torch.Tensor,
    *,
    terms: Sequence[torch.Tensor] = (),
    weights: Sequence[float] = (),
    dR: torch.Tensor | None = None,
    dr_scale: float = 0.0,
    x: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`reconstruct_reference` (same arguments, same result)."""
    terms, weights = tuple(terms), tuple(weights)
    check_reconstruct_args(V, R, terms=terms, weights=weights, dR=dR, x=x, gate=gate, out=out)
    D, K = R.shape[-1], V.shape[1]
    M = rows_of(R)
    if out is None:
        out = torch.empty(R.shape, dtype=x.dtype if x is not None else R.dtype, device=R.device)
    if M == 0 or D == 0:
        return out
    if terms and K > MAX_KERNEL_K:
        return reconstruct_reference(V, R, terms=terms, weights=weights, dR=dR, dr_scale=dr_scale, x=x, gate=gate, out=out)
    require_launchable(R, "reconstruct")
    fp32_dot = dot_fp32(R.dtype, R.device)
    V = basis_for_dot(V, R.dtype, fp32_dot) if terms else V
    n_terms = len(terms)
    has_dr = dR is not None and bool(dr_scale)
    g_rows = _gate_rows(R, gate) if gate is not None else None
    cfg = resolve_config("reconstruct", reconstruct_config(M, D, K, n_terms, R.dtype, R.device))
    t = list(terms) + [R] * (MAX_TERMS - n_terms)
    t_strides = [row_stride(tt) if i < n_terms else 0 for i, tt in enumerate(t)]
    w = [float(ww) for ww in weights] + [0.0] * (MAX_TERMS - n_terms)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    args = (
        V, R, *t,
        dR if has_dr else R, x if x is not None else R, g_rows if g_rows is not None else R, out,
        M, D, K, R.shape[-2],
        V.stride(0), V.stride(1), row_stride(R), *t_strides,
        row_stride(dR) if has_dr else 0, row_stride(x) if x is not None else 0,
        g_rows.stride(0) if g_rows is not None else 0, row_stride(out),
        *w, float(dr_scale),
    )
    meta = dict(
        N_TERMS=n_terms, HAS_DR=has_dr, HAS_X=x is not None, HAS_GATE=gate is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=block_k(K),
        DOT_FP32=fp32_dot,
    )
    launch(_reconstruct_kernel, grid, args, meta, cfg)
    return out
