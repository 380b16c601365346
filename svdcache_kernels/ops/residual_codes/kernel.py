"""Full-step residual codes, fused Triton kernel: ``r = (F - F_prev) / h - D1 V^T`` and its per-row codes in
one launch, without an fp32 copy of r.

The torch path makes r as a full-size fp32 tensor and quantizes it in ~12 passes (the difference, the GEMM
epilogue, abs, amax, divisions, rounding, packing); on a FLUX.1-dev feature (4096 x 3072) that is ~0.9 GB of
traffic per feature per full step. Here one program owns BLOCK_M rows and walks D twice:

1. r chunk by chunk (F and F_prev loaded, ``D1 V^T`` as an fp32 dot over k tiles), only the rows' absmax
   kept; the scale ``absmax / L`` is stored;
2. r again (F and F_prev re-read, mostly from L2: the second walk starts where the first ended), the codes
   ``round(r / scale)`` stored (4 bits: the even and odd channels of a chunk as two halves, packed
   ``(q0 + 8) | (q1 + 8) << 4``).

Reads 2 x (F + F_prev), writes the codes (D/2 or D bytes per row) and a scale per row. Same arithmetic as the
reference in fp32: the product ``D1 V^T`` is an fp32 dot (on a GPU 3xTF32 on tensor cores, fp32-level error at
a fraction of an FMA loop's time: it is computed twice; under the interpreter ``ieee``), which may sum in another
order than the reference's GEMM (a code can differ by one where r / scale lies within rounding of a half);
divisions correctly rounded (``div_rn``), rounding half to even (``rint``; under the interpreter, which has no
libdevice, the 1.5 * 2^23 trick, exact for |x| < 2^22).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...dispatch import interpreter_on
from .._triton_common import k_tile, launch, require_launchable, resolve_config, row_stride, rows_of
from .reference import check_residual_codes_args


@triton.jit
def _resid(F_ptr, FP_ptr, D1_ptr, V_ptr, rows, mask_m, cols, mask_c, K, stride_fm, stride_fpm, stride_d1m,
           stride_vd, stride_vk, inv_h, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
           PREC: tl.constexpr):
    """r at rows x cols: (F - F_prev) * (1 / h) - D1 V^T, fp32 (0 where masked)."""
    fmask = mask_m[:, None] & mask_c[None, :]
    f = tl.load(F_ptr + rows[:, None] * stride_fm + cols[None, :], mask=fmask, other=0.0)
    fp = tl.load(FP_ptr + rows[:, None] * stride_fpm + cols[None, :], mask=fmask, other=0.0)
    fk = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    offs_k0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        mask_k = offs_k < K
        d1 = tl.load(D1_ptr + rows[:, None] * stride_d1m + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        v = tl.load(V_ptr + cols[:, None] * stride_vd + offs_k[None, :] * stride_vk,
                    mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        fk = tl.dot(d1, tl.trans(v.to(tl.float32)), fk, input_precision=PREC)
    return (f.to(tl.float32) - fp.to(tl.float32)) * inv_h - fk


@triton.jit
def _round(x, RINT: tl.constexpr):
    if RINT:
        return libdevice.rint(x)
    else:
        return (x + 12582912.0) - 12582912.0


@triton.jit
def _residual_codes_kernel(
    F_ptr, FP_ptr, D1_ptr, V_ptr, Q_ptr, S_ptr,
    M, NQ, K,
    stride_fm, stride_fpm, stride_d1m, stride_vd, stride_vk, stride_qm, stride_sm,
    inv_h,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, RINT: tl.constexpr,
    PREC: tl.constexpr,
):
    # NQ: codes per row (D for 8 bits, D / 2 for 4); code j covers channels j (8 bits) or 2j, 2j + 1 (4 bits)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_c0 = tl.arange(0, BLOCK_C)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    STEP: tl.constexpr = 2 if BITS == 4 else 1  # channels per code: r0 at the even ones, r1 at the odd (4 bits)
    n_chunks = tl.cdiv(NQ, BLOCK_C)
    for i in range(0, n_chunks):
        offs_c = i * BLOCK_C + offs_c0
        mask_c = offs_c < NQ
        r0 = _resid(F_ptr, FP_ptr, D1_ptr, V_ptr, rows, mask_m, STEP * offs_c, mask_c, K, stride_fm, stride_fpm,
                    stride_d1m, stride_vd, stride_vk, inv_h, BLOCK_M, BLOCK_C, BLOCK_K, PREC)
        a = tl.abs(r0)
        if BITS == 4:
            r1 = _resid(F_ptr, FP_ptr, D1_ptr, V_ptr, rows, mask_m, 2 * offs_c + 1, mask_c, K, stride_fm,
                        stride_fpm, stride_d1m, stride_vd, stride_vk, inv_h, BLOCK_M, BLOCK_C, BLOCK_K, PREC)
            a = tl.maximum(a, tl.abs(r1))
        amax = tl.maximum(amax, tl.max(a, axis=1))
    L = 7.0 if BITS == 4 else 127.0
    scale = tl.math.div_rn(tl.maximum(amax, 1e-30), L)
    tl.store(S_ptr + rows * stride_sm, scale, mask=mask_m)
    sc = scale[:, None]
    # second walk backwards: the chunks read last are the likeliest still in L2
    for i in range(0, n_chunks):
        offs_c = (n_chunks - 1 - i) * BLOCK_C + offs_c0
        mask_c = offs_c < NQ
        qmask = mask_m[:, None] & mask_c[None, :]
        q_ptrs = Q_ptr + rows[:, None] * stride_qm + offs_c[None, :]
        r0 = _resid(F_ptr, FP_ptr, D1_ptr, V_ptr, rows, mask_m, STEP * offs_c, mask_c, K, stride_fm, stride_fpm,
                    stride_d1m, stride_vd, stride_vk, inv_h, BLOCK_M, BLOCK_C, BLOCK_K, PREC)
        q0 = _round(tl.math.div_rn(r0, sc), RINT)
        if BITS == 4:
            r1 = _resid(F_ptr, FP_ptr, D1_ptr, V_ptr, rows, mask_m, 2 * offs_c + 1, mask_c, K, stride_fm,
                        stride_fpm, stride_d1m, stride_vd, stride_vk, inv_h, BLOCK_M, BLOCK_C, BLOCK_K, PREC)
            q1 = _round(tl.math.div_rn(r1, sc), RINT)
            packed = (q0 + 16.0 * q1) + 136.0  # (q0 + 8) + 16 (q1 + 8), exact in fp32, in [17, 255]
            tl.store(q_ptrs, packed.to(tl.int32).to(tl.uint8), mask=qmask)
        else:
            tl.store(q_ptrs, q0.to(tl.int32).to(tl.int8), mask=qmask)


def _compiled() -> bool:
    """A compiled (GPU) launch, not the interpreter's: libdevice's rint and the 3xTF32 dot exist there."""
    return not interpreter_on()


def residual_codes_config(M: int, NQ: int, K: int, device: torch.device) -> dict[str, int]:
    """Launch parameters (before overrides; op name "residual_codes"). GPU: 32 rows x 64 codes a chunk
    (4 bits: two 32 x 64 halves of r live at once), k in tiles of up to 64 (the D1 and V tiles are
    re-read per chunk from L1/L2), 8 warps: with 4 the 3xTF32 dot's operand splits spill (sm_90a, ptxas:
    255 registers and 312 B spilled; 8 warps: 202, none; bench/aot_kernels.py). Not tuned on a GPU: the
    grid is one program per 32 rows (144 at M = 4608). Interpreter: big blocks (its cost grows with
    programs x iterations)."""
    if device.type != "cuda":
        return {"BLOCK_M": 64, "BLOCK_C": 64, "BLOCK_K": k_tile(K), "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 32, "BLOCK_C": 64, "BLOCK_K": min(k_tile(K), 64), "num_warps": 8, "num_stages": 2}


@torch.no_grad()
def residual_codes_triton(
    F: torch.Tensor,
    F_prev: torch.Tensor,
    D1: torch.Tensor,
    V: torch.Tensor,
    *,
    h: float,
    bits: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Triton version of :func:`residual_codes_reference` (same arguments, same in-place semantics)."""
    check_residual_codes_args(F, F_prev, D1, V, h, bits, codes, scales)
    M = rows_of(F)
    if M == 0:
        return
    require_launchable(F, "residual_codes")
    NQ, K = codes.shape[-1], V.shape[1]
    cfg = resolve_config("residual_codes", residual_codes_config(M, NQ, K, F.device))
    gpu = _compiled()
    meta = dict(BITS=int(bits), BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], RINT=gpu,
                PREC="tf32x3" if gpu else "ieee")
    args = (F, F_prev, D1, V, codes, scales, M, NQ, K,
            row_stride(F), row_stride(F_prev), row_stride(D1), V.stride(0), V.stride(1), row_stride(codes),
            row_stride(scales), float(1.0 / h))
    launch(_residual_codes_kernel, (triton.cdiv(M, cfg["BLOCK_M"]),), args, meta, cfg)
