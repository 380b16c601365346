"""Cached-step reconstruction, fused Triton kernel: F_hat = P V^T + R (+ s dR), optional out = x + gate F_hat.

Grid (row blocks, D splits): a program owns BLOCK_M rows and one contiguous range of D (``D_PER``
channels; D is split across programs when there are few row blocks, so the grid fills the device).
With k <= BLOCK_K it forms the forecast P = sum_i w_i terms_i (k dims, fp32, up to 3 terms, weights
as scalar arguments) once in registers; with more coefficients (any k up to D) it tiles over k,
forming each BLOCK_K slice of P from the terms (L2-resident) for every D chunk, like a GEMM's K loop.
Device weights (a weights tensor, a tensor ``dr_scale``) are loaded by the kernel instead (W_DEV /
DRS_DEV): a CUDA graph that captured the launch replays it with the values then in those tensors.
It then loops over its D range in BLOCK_D chunks: ``F_hat = P @ V^T[:, d] + R + dr_scale * dR`` and,
with ``x``, ``out = x + gate * F_hat`` (the gate row of the program's batch item is gathered per row:
``b = row // N``, so a gate with any batch stride, e.g. a chunk of a (B, 6D) modulation tensor, needs
no copy). The streaming loads of R and x are issued one chunk ahead (register double buffering):
Triton's pipeliner only stages the loads that feed the dot (V), and R and x are most of the bytes.

A quantized dR (``dR_codes`` int8, or 4-bit codes packed two per uint8, plus one fp32 scale per row)
is dequantized in registers: the per-row factor ``dr_scale * scale`` is loaded once per program, the
codes stream one chunk ahead like R and x (1 byte, or half a byte, per element instead of a
full-size fp dR written and read again), and packed bytes are split into their two nibbles and
interleaved back into element order.

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
    basis_for_dot,
    d_splits,
    k_tile,
    dot_fp32,
    interp_blocks,
    launch,
    require_launchable,
    resolve_config,
    row_stride,
    rows_of,
)
from .reference import MAX_TERMS, check_device_weights, check_reconstruct_args, gate_rows_shape


@triton.jit
def _reconstruct_kernel(
    V_ptr, R_ptr, T0_ptr, T1_ptr, T2_ptr, dR_ptr, S_ptr, X_ptr, G_ptr, O_ptr, W_ptr, DRS_ptr,
    M, D, K, N_TOK, D_PER, K_TILES,
    stride_vd, stride_vk, stride_rm, stride_t0, stride_t1, stride_t2,
    stride_drm, stride_sm, stride_xm, stride_gb, stride_om,
    w0, w1, w2, dr_scale,
    N_TERMS: tl.constexpr, HAS_DR: tl.constexpr, DR_BITS: tl.constexpr, HAS_X: tl.constexpr,
    HAS_GATE: tl.constexpr, W_DEV: tl.constexpr, DRS_DEV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K_TILE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    if W_DEV:  # device weights: read when the kernel runs (a CUDA graph replays it with new values)
        w0 = tl.load(W_ptr)
        if N_TERMS > 1:
            w1 = tl.load(W_ptr + 1)
        if N_TERMS > 2:
            w2 = tl.load(W_ptr + 2)
    if DRS_DEV:
        dr_scale = tl.load(DRS_ptr)
    d_lo = tl.program_id(1) * D_PER
    d_hi = tl.minimum(d_lo + D_PER, D)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d0 = tl.arange(0, BLOCK_D)

    if N_TERMS > 0:
        if ONE_K_TILE:  # the whole forecast stays in registers
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
    if DR_BITS > 0:  # (only with HAS_DR) per-row factor of the quantized dR: dr_scale * its row's scale
        q_row = dr_scale * tl.load(S_ptr + rows * stride_sm, mask=mask_m, other=0.0)
        q_ptrs = dR_ptr + rows[:, None] * stride_drm
        if DR_BITS == 4:
            offs_b0 = tl.arange(0, BLOCK_D // 2)  # the packed bytes of one chunk (chunks start at even d)

    # R, x (and dR, out) stream through once: evict_first keeps the V tiles (re-read by every program)
    # in L2. The first chunk's R and x are loaded before the loop, each next one inside it.
    offs_d = d_lo + offs_d0
    mask = mask_m[:, None] & (offs_d < d_hi)[None, :]
    r_nxt = tl.load(R_ptr + rows[:, None] * stride_rm + offs_d[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first")
    if HAS_X:
        x_nxt = tl.load(X_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=mask, other=0.0,
                        eviction_policy="evict_first")
    if DR_BITS > 0:
        if DR_BITS == 8:
            q_nxt = tl.load(q_ptrs + offs_d[None, :], mask=mask, other=0, eviction_policy="evict_first")
        else:
            offs_b = d_lo // 2 + offs_b0
            q_nxt = tl.load(q_ptrs + offs_b[None, :], mask=mask_m[:, None] & (offs_b < (d_hi + 1) // 2)[None, :],
                            other=0, eviction_policy="evict_first")
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + offs_d0
        mask_d = offs_d < d_hi
        mask = mask_m[:, None] & mask_d[None, :]
        fh = r_nxt.to(tl.float32)
        if HAS_X:
            x = x_nxt.to(tl.float32)
        offs_n = offs_d + BLOCK_D
        mask_n = mask_m[:, None] & (offs_n < d_hi)[None, :]
        r_nxt = tl.load(R_ptr + rows[:, None] * stride_rm + offs_n[None, :], mask=mask_n, other=0.0,
                        eviction_policy="evict_first")
        if HAS_X:
            x_nxt = tl.load(X_ptr + rows[:, None] * stride_xm + offs_n[None, :], mask=mask_n, other=0.0,
                            eviction_policy="evict_first")
        if DR_BITS > 0:
            q_cur = q_nxt
            if DR_BITS == 8:
                q_nxt = tl.load(q_ptrs + offs_n[None, :], mask=mask_n, other=0, eviction_policy="evict_first")
            else:
                offs_b = (d0 + BLOCK_D) // 2 + offs_b0
                q_nxt = tl.load(q_ptrs + offs_b[None, :],
                                mask=mask_m[:, None] & (offs_b < (d_hi + 1) // 2)[None, :], other=0,
                                eviction_policy="evict_first")
        if N_TERMS > 0:
            if ONE_K_TILE:
                v = tl.load(
                    V_ptr + offs_d[:, None] * stride_vd + offs_k[None, :] * stride_vk,
                    mask=mask_d[:, None] & mask_k[None, :], other=0.0,
                )
                if DOT_FP32:
                    fh += tl.dot(p_op, tl.trans(v.to(tl.float32)), input_precision="ieee")
                else:
                    fh += tl.dot(p_op, tl.trans(v.to(p_op.dtype)))
            else:
                for kt in range(0, K_TILES):
                    offs_kt = kt * BLOCK_K + offs_k
                    mask_kt = offs_kt < K
                    pmask = mask_m[:, None] & mask_kt[None, :]
                    pt = w0 * tl.load(T0_ptr + rows[:, None] * stride_t0 + offs_kt[None, :], mask=pmask, other=0.0)
                    if N_TERMS > 1:
                        pt += w1 * tl.load(T1_ptr + rows[:, None] * stride_t1 + offs_kt[None, :], mask=pmask, other=0.0)
                    if N_TERMS > 2:
                        pt += w2 * tl.load(T2_ptr + rows[:, None] * stride_t2 + offs_kt[None, :], mask=pmask, other=0.0)
                    v = tl.load(
                        V_ptr + offs_d[:, None] * stride_vd + offs_kt[None, :] * stride_vk,
                        mask=mask_d[:, None] & mask_kt[None, :], other=0.0,
                    )
                    if DOT_FP32:
                        fh += tl.dot(pt, tl.trans(v.to(tl.float32)), input_precision="ieee")
                    else:
                        pt_op = pt.to(R_ptr.dtype.element_ty)
                        fh += tl.dot(pt_op, tl.trans(v.to(pt_op.dtype)))
        if DR_BITS > 0:
            if DR_BITS == 8:
                qv = q_cur.to(tl.float32)
            else:  # byte j holds elements 2j (low nibble) and 2j+1 (high), each stored as value + 8
                b = q_cur.to(tl.int32)
                qv = tl.interleave((b & 15) - 8, (b >> 4) - 8).to(tl.float32)
            fh += q_row[:, None] * qv
        elif HAS_DR:
            dr = tl.load(
                dR_ptr + rows[:, None] * stride_drm + offs_d[None, :], mask=mask, other=0.0, eviction_policy="evict_first",
            )
            fh += dr_scale * dr.to(tl.float32)
        if HAS_X:
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
    """Launch parameters (before overrides).

    16-bit on a GPU: 64-row tiles for every M (the tensor-core path that sm_90 runs as wgmma; fewer
    rows per program would fall back to mma.sync) and D split across programs until the grid holds
    about two programs per SM (FLUX: M = 4608 rows -> 72 row blocks x 4 D ranges on 132 SMs).
    fp32 runs an FMA dot and keeps 32 x 32 tiles. k <= 256 stays in registers; above, k is tiled
    in 128-wide slices.
    """
    if device.type != "cuda":
        cfg = interp_blocks()
        cfg["BLOCK_K"] = k_tile(K)
        cfg["D_SPLITS"] = 1
        return cfg
    bk = k_tile(K) if n_terms else 16
    fp32 = dtype == torch.float32
    bm = 32 if fp32 else 64
    bd = 32 if fp32 else 64
    if not n_terms:
        bd = 128  # a pure streaming add: wide rows, no V tile
    warps = 8 if bm * bk >= 64 * 128 else 4
    stages = 2 if bk >= 256 or fp32 else 3
    return {"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages,
            "D_SPLITS": d_splits(M, D, bm, bd, device)}


def _gate_rows(R: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The gate as (B, D) rows, one per batch item of R (a view when the batch dims flatten)."""
    g = gate.squeeze(-2) if gate_rows_shape(R, gate) else gate
    return g.reshape(-1, R.shape[-1])  # copies only a gate whose batch dims do not flatten (tiny)


def prepare_reconstruct(V, R, terms, dR, x, gate, out, dR_codes=None, dR_scales=None, dR_bits=8):
    """A launcher for arguments of this layout (already checked): returns ``run(V, R, terms, weights,
    dR, dr_scale, x, gate, out, dR_codes=None, dR_scales=None) -> out``. Computes the launch
    configuration, grid and strides once. With ``dR_codes`` (a quantized dR of ``dR_bits``) the
    launcher reads codes and scales instead of ``dR``."""
    require_launchable(R, "reconstruct")
    D, K = R.shape[-1], V.shape[1]
    M = rows_of(R)
    n_terms = len(terms)
    fp32_dot = dot_fp32(R.dtype, R.device)
    cfg = resolve_config("reconstruct", reconstruct_config(M, D, K, n_terms, R.dtype, R.device))
    bk = cfg.get("BLOCK_K") or k_tile(K)
    k_tiles = triton.cdiv(K, bk) if n_terms else 1
    n_chunks = triton.cdiv(D, cfg["BLOCK_D"]) if D else 1
    splits = max(1, min(int(cfg.get("D_SPLITS", 1)), n_chunks))
    d_per = triton.cdiv(n_chunks, splits) * cfg["BLOCK_D"]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, d_per) if D else 1)
    # a gate whose batch dims flatten is passed as itself (the (B, D) rows are a view of it)
    g_copy = gate is not None and _gate_rows(R, gate).data_ptr() != gate.data_ptr()
    g_stride = _gate_rows(R, gate).stride(0) if gate is not None else 0
    t_strides = [row_stride(terms[i]) if i < n_terms else 0 for i in range(MAX_TERMS)]
    has_x = x is not None
    quant = dR_codes is not None
    strides = (0, 0, row_stride(R), *t_strides,  # V's strides are read per call: basis_for_dot may copy it
               row_stride(dR_codes if quant else dR) if quant or dR is not None else 0,
               row_stride(dR_scales) if quant else 0, row_stride(x) if has_x else 0, g_stride)
    out_stride = row_stride(out) if out is not None else None
    meta_base = dict(HAS_X=has_x, HAS_GATE=gate is not None, W_DEV=False, DRS_DEV=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
                     BLOCK_K=bk, ONE_K_TILE=k_tiles == 1, N_TERMS=n_terms, DOT_FP32=fp32_dot)
    meta_dr = {**meta_base, "HAS_DR": True, "DR_BITS": dR_bits if quant else 0}
    meta_nodr = {**meta_base, "HAS_DR": False, "DR_BITS": 0}
    out_dtype = x.dtype if has_x else R.dtype
    N_tok = R.shape[-2]

    def run(V, R, terms, weights, dR, dr_scale, x, gate, out, dR_codes=None, dR_scales=None):
        if out is None:
            out = torch.empty(R.shape, dtype=out_dtype, device=R.device)
            o_stride = row_stride(out)
        else:
            o_stride = out_stride
        if M == 0 or D == 0:
            return out
        if n_terms:
            V = basis_for_dot(V, R.dtype, fp32_dot)
        src = dR_codes if quant else dR
        w_dev, s_dev = isinstance(weights, torch.Tensor), isinstance(dr_scale, torch.Tensor)
        has_dr = src is not None and (s_dev or bool(dr_scale))
        g = (_gate_rows(R, gate) if g_copy else gate) if gate is not None else R
        t = list(terms) + [R] * (MAX_TERMS - n_terms)
        w = [0.0] * MAX_TERMS if w_dev else [float(ww) for ww in weights] + [0.0] * (MAX_TERMS - n_terms)
        args = (
            V, R, *t, src if has_dr else R, dR_scales if has_dr and quant else R, x if x is not None else R, g, out,
            weights if w_dev and n_terms else R, dr_scale if s_dev and has_dr else R,
            M, D, K, N_tok, d_per, k_tiles,
            V.stride(0), V.stride(1), *strides[2:6], strides[6] if has_dr else 0, strides[7] if has_dr else 0,
            strides[8], strides[9], o_stride,
            *w, 0.0 if s_dev else float(dr_scale),
        )
        meta = meta_dr if has_dr else meta_nodr
        if w_dev or s_dev:
            meta = {**meta, "W_DEV": w_dev and n_terms > 0, "DRS_DEV": s_dev and has_dr}
        launch(_reconstruct_kernel, grid, args, meta, cfg)
        return out

    return run


@torch.no_grad()
def reconstruct_triton(
    V: torch.Tensor,
    R: torch.Tensor,
    *,
    terms: Sequence[torch.Tensor] = (),
    weights: Sequence[float] | torch.Tensor = (),
    dR: torch.Tensor | None = None,
    dr_scale: float | torch.Tensor = 0.0,
    x: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    dR_codes: torch.Tensor | None = None,
    dR_scales: torch.Tensor | None = None,
    dR_bits: int = 8,
) -> torch.Tensor:
    """Triton version of :func:`reconstruct_reference` (same arguments, same result), for every k <= D."""
    terms = tuple(terms)
    weights = weights if isinstance(weights, torch.Tensor) else tuple(weights)
    check_reconstruct_args(V, R, terms=terms, weights=weights, dR=dR, x=x, gate=gate, out=out,
                           dR_codes=dR_codes, dR_scales=dR_scales, dR_bits=dR_bits)
    check_device_weights((), R.device, dr_scale)
    if rows_of(R) == 0 or R.shape[-1] == 0:
        return out if out is not None else torch.empty(R.shape, dtype=x.dtype if x is not None else R.dtype,
                                                       device=R.device)
    run = prepare_reconstruct(V, R, terms, dR, x, gate, out, dR_codes, dR_scales, dR_bits)
    return run(V, R, terms, weights, dR, dr_scale, x, gate, out, dR_codes, dR_scales)
