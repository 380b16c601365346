"""Calibration, Triton kernel: G += F^T F in fp32, streaming over the rows of F.

A 2-D grid of (BLOCK_D, BLOCK_D) tiles of G; only the upper-triangular tiles (i <= j) do work (G is
symmetric) and each writes its tile and, off the diagonal, the transposed one. A program streams
all M rows of its two column blocks in BLOCK_R chunks: ``acc += F[r, i]^T @ F[r, j]``, then adds
``acc`` to G once. bf16/fp16 products are exact in fp32, so the 16-bit tensor-core dot with fp32
accumulation is as precise as the reference's fp32 matmul; fp32 F and the interpreter use an fp32
``ieee`` dot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import dot_fp32, launch, require_launchable, resolve_config, row_stride, rows_of
from .reference import check_gram_args


@triton.jit
def _gram_kernel(
    F_ptr, G_ptr, M, D, stride_fm, stride_gm,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i <= pid_j:
        offs_i = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_j = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_i = offs_i < D
        mask_j = offs_j < D
        offs_r0 = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, M, BLOCK_R):
            rows = (r0 + offs_r0).to(tl.int64)
            mask_r = rows < M
            a = tl.load(F_ptr + rows[:, None] * stride_fm + offs_i[None, :], mask=mask_r[:, None] & mask_i[None, :], other=0.0)
            b = tl.load(F_ptr + rows[:, None] * stride_fm + offs_j[None, :], mask=mask_r[:, None] & mask_j[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(a), b, acc)
        gmask = mask_i[:, None] & mask_j[None, :]
        g_ptrs = G_ptr + offs_i[:, None].to(tl.int64) * stride_gm + offs_j[None, :]
        tl.store(g_ptrs, tl.load(g_ptrs, mask=gmask, other=0.0) + acc, mask=gmask)
        if pid_i != pid_j:
            gt_ptrs = G_ptr + offs_j[:, None].to(tl.int64) * stride_gm + offs_i[None, :]
            gtmask = mask_j[:, None] & mask_i[None, :]
            tl.store(gt_ptrs, tl.load(gt_ptrs, mask=gtmask, other=0.0) + tl.trans(acc), mask=gtmask)


def gram_config(M: int, D: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {"BLOCK_D": 128, "BLOCK_R": 128, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_D": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_D": 128, "BLOCK_R": 64, "num_warps": 8, "num_stages": 3}


@torch.no_grad()
def gram_update_triton(G: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`gram_update_reference`: ``G += F^T F`` (fp32) in place. Returns G."""
    check_gram_args(G, F)
    D = F.shape[-1]
    M = rows_of(F)
    if M == 0 or D == 0:
        return G
    require_launchable(F, "gram_update")
    cfg = resolve_config("gram", gram_config(M, D, F.dtype, F.device))
    t = triton.cdiv(D, cfg["BLOCK_D"])
    args = (F, G, M, D, row_stride(F), G.stride(0))
    meta = dict(BLOCK_D=cfg["BLOCK_D"], BLOCK_R=cfg["BLOCK_R"], DOT_FP32=dot_fp32(F.dtype, F.device))
    launch(_gram_kernel, (t, t), args, meta, cfg)
    return G
