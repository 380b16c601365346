"""Full-step split, fused Triton kernel: C = F V, predictor-state updates and R = F - C V^T in one launch.

One program owns BLOCK_M rows of F (M = prod(leading dims) x N rows of D channels):

1. loop over D in BLOCK_D chunks: ``acc += F[rows, d] @ V[d, :]`` (fp32 accumulate; BLOCK_K = next
   pow2 of k, >= 16, padded columns of V load as 0 so they stay 0 in ``acc``);
2. k-dim state updates from ``acc`` (C, D1, D2, E) - tiny, in registers;
3. only if R is asked for, a second loop over D: ``R = F - acc @ V^T`` (and ``dR = (R - R_prev)/h1``,
   reading R_prev from R before it is overwritten; each program owns its rows, so there is no
   cross-program hazard, and R may even alias F).

The second loop walks the D chunks in reverse, so the chunks of F read last in loop 1 (most likely
still in L2) are re-read first; loop 1 loads F with ``evict_last`` and loop 2 with ``evict_first``.
The paper's eq. 8-9 divide by sigma and multiply it back: the sigmas cancel (F_k = F V V^T), so the
kernel never touches them.

Precision on a GPU: bf16/fp16 F takes the tensor-core dot on 16-bit operands (V in F's dtype: an
fp32 basis is converted once and cached on V, see ``basis_for_dot``) with fp32 accumulation, so C
carries V's rounding; for the second dot the fp32 coefficients are rounded to F's dtype, which
perturbs C V^T by about one rounding of F's dtype relative to |F_k| - the size of the rounding of F
and R themselves. fp32 F and the interpreter use an fp32 ``ieee`` dot (see ``dot_fp32``).
"""
from __future__ import annotations

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
from .reference import check_split_args, split_reference


@triton.jit
def _split_kernel(
    F_ptr, V_ptr, C_ptr, D1_ptr, D2_ptr, E_ptr, R_ptr, dR_ptr, FP_ptr,
    M, D, K,
    stride_fm, stride_vd, stride_vk, stride_fpm,
    stride_cm, stride_d1m, stride_d2m, stride_em, stride_rm, stride_drm,
    h1, h2, beta, one_minus_beta,
    HAS_C: tl.constexpr, ORDER: tl.constexpr, HAS_E: tl.constexpr, EMA_INIT: tl.constexpr,
    HAS_R: tl.constexpr, HAS_DR: tl.constexpr, HAS_FPREV: tl.constexpr, NEED_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d0 = tl.arange(0, BLOCK_D)

    # ---- loop 1: coefficients C = F V (fp32 accumulate); with F_prev, (F - F_prev) V -------------
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        mask_d = offs_d < D
        f = tl.load(
            F_ptr + rows[:, None] * stride_fm + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :], other=0.0, eviction_policy="evict_last",
        )
        v = tl.load(
            V_ptr + offs_d[:, None] * stride_vd + offs_k[None, :] * stride_vk,
            mask=mask_d[:, None] & mask_k[None, :], other=0.0,
        )
        if NEED_ACC:
            if DOT_FP32:
                acc = tl.dot(f.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(f, v.to(f.dtype), acc)
        if HAS_FPREV:
            fp = tl.load(
                FP_ptr + rows[:, None] * stride_fpm + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0, eviction_policy="evict_first",
            )
            diff = f.to(tl.float32) - fp.to(tl.float32)
            if DOT_FP32:
                acc_d = tl.dot(diff, v.to(tl.float32), acc_d, input_precision="ieee")
            else:
                acc_d = tl.dot(diff.to(f.dtype), v.to(f.dtype), acc_d)

    # ---- k-dim state updates (divided differences over the actual step distances, EMA) -----------
    cmask = mask_m[:, None] & mask_k[None, :]
    if ORDER >= 1:
        if HAS_FPREV:
            d1 = acc_d / h1
        else:
            c_prev = tl.load(C_ptr + rows[:, None] * stride_cm + offs_k[None, :], mask=cmask, other=0.0)
            d1 = (acc - c_prev) / h1
        if ORDER >= 2:
            d1_prev = tl.load(D1_ptr + rows[:, None] * stride_d1m + offs_k[None, :], mask=cmask, other=0.0)
            tl.store(D2_ptr + rows[:, None] * stride_d2m + offs_k[None, :], (d1 - d1_prev) / h2, mask=cmask)
        tl.store(D1_ptr + rows[:, None] * stride_d1m + offs_k[None, :], d1, mask=cmask)
    if HAS_E:
        if EMA_INIT:
            e = acc
        else:
            e_prev = tl.load(E_ptr + rows[:, None] * stride_em + offs_k[None, :], mask=cmask, other=0.0)
            e = beta * e_prev + one_minus_beta * acc
        tl.store(E_ptr + rows[:, None] * stride_em + offs_k[None, :], e, mask=cmask)
    if HAS_C:
        tl.store(C_ptr + rows[:, None] * stride_cm + offs_k[None, :], acc, mask=cmask)

    # ---- loop 2: residual R = F - C V^T (and dR), D chunks in reverse for L2 reuse of F ----------
    if HAS_R:
        if DOT_FP32:
            c_op = acc
        else:
            c_op = acc.to(F_ptr.dtype.element_ty)
        n_chunks = tl.cdiv(D, BLOCK_D)
        for i in range(0, n_chunks):
            offs_d = (n_chunks - 1 - i) * BLOCK_D + offs_d0
            mask_d = offs_d < D
            v = tl.load(
                V_ptr + offs_d[:, None] * stride_vd + offs_k[None, :] * stride_vk,
                mask=mask_d[:, None] & mask_k[None, :], other=0.0,
            )
            if DOT_FP32:
                fk = tl.dot(c_op, tl.trans(v.to(tl.float32)), input_precision="ieee")
            else:
                fk = tl.dot(c_op, tl.trans(v.to(c_op.dtype)))
            fmask = mask_m[:, None] & mask_d[None, :]
            f = tl.load(
                F_ptr + rows[:, None] * stride_fm + offs_d[None, :],
                mask=fmask, other=0.0, eviction_policy="evict_first",
            )
            r = f.to(tl.float32) - fk
            r_ptrs = R_ptr + rows[:, None] * stride_rm + offs_d[None, :]
            if HAS_DR:
                r_prev = tl.load(r_ptrs, mask=fmask, other=0.0).to(tl.float32)
                tl.store(
                    dR_ptr + rows[:, None] * stride_drm + offs_d[None, :],
                    ((r - r_prev) / h1).to(dR_ptr.dtype.element_ty), mask=fmask, eviction_policy="evict_first",
                )
            # R is read again only steps later: do not let it push the rest of F out of L2
            tl.store(r_ptrs, r.to(R_ptr.dtype.element_ty), mask=fmask, eviction_policy="evict_first")


def split_config(M: int, D: int, K: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Launch parameters (before overrides). GPU heuristic, to be refined by bench/gpu_kernels.py.

    The split is memory-bound on F and R, but every program also re-reads V (D x k) from L2 in each
    of its two loops, (M / BLOCK_M) x 2 x D x k x 2 bytes in all: larger k wants more rows per
    program (see ``rows_block``). The accumulator is (BLOCK_M, BLOCK_K) fp32 in registers: 8 warps
    once it reaches 64 x 128.
    """
    if device.type != "cuda":
        return interp_blocks()
    bk = block_k(K)
    bm = rows_block(M, device, start=32 if dtype == torch.float32 else 64)  # fp32: FMA dot, registers
    bd = 32 if dtype == torch.float32 else 64
    warps = 8 if bm * bk >= 64 * 128 else 4
    stages = 2 if bk >= 256 or dtype == torch.float32 else 3
    return {"BLOCK_M": bm, "BLOCK_D": bd, "num_warps": warps, "num_stages": stages}


@torch.no_grad()
def split_triton(
    F: torch.Tensor,
    V: torch.Tensor,
    *,
    C: torch.Tensor | None = None,
    D1: torch.Tensor | None = None,
    D2: torch.Tensor | None = None,
    E: torch.Tensor | None = None,
    R: torch.Tensor | None = None,
    dR: torch.Tensor | None = None,
    order: int = 0,
    h1: float = 1.0,
    h2: float = 1.0,
    beta: float = 0.9,
    ema_init: bool = False,
    F_prev: torch.Tensor | None = None,
) -> None:
    """Triton version of :func:`split_reference` (same arguments, same in-place semantics)."""
    check_split_args(F, V, C=C, D1=D1, D2=D2, E=E, R=R, dR=dR, order=order, h1=h1, h2=h2, beta=beta, F_prev=F_prev)
    D, K = F.shape[-1], V.shape[1]
    M = rows_of(F)
    if M == 0 or (C is None and E is None and R is None and F_prev is None):
        return  # nothing to produce (order >= 1 implies C or F_prev)
    if K > MAX_KERNEL_K:
        # A (BLOCK_M, >256) fp32 accumulator does not fit in registers; same semantics, torch path.
        return split_reference(
            F, V, C=C, D1=D1, D2=D2, E=E, R=R, dR=dR, order=order, h1=h1, h2=h2, beta=beta, ema_init=ema_init,
            F_prev=F_prev,
        )
    require_launchable(F, "split")
    fp32_dot = dot_fp32(F.dtype, F.device)
    V = basis_for_dot(V, F.dtype, fp32_dot)
    cfg = resolve_config("split", split_config(M, D, K, F.dtype, F.device))
    dummy = F  # stands in for absent tensors; the constexpr flags keep it untouched
    strides = [row_stride(t) if t is not None else 0 for t in (C, D1, D2, E, R, dR)]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    args = (
        F, V,
        *(t if t is not None else dummy for t in (C, D1, D2, E, R, dR, F_prev)),
        M, D, K,
        row_stride(F), V.stride(0), V.stride(1), row_stride(F_prev) if F_prev is not None else 0,
        *strides,
        float(h1), float(h2), float(beta), 1.0 - float(beta),
    )
    meta = dict(
        HAS_C=C is not None, ORDER=int(order), HAS_E=E is not None, EMA_INIT=bool(ema_init),
        HAS_R=R is not None, HAS_DR=dR is not None, HAS_FPREV=F_prev is not None,
        NEED_ACC=C is not None or E is not None or R is not None or (order >= 1 and F_prev is None),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=block_k(K),
        DOT_FP32=fp32_dot,
    )
    launch(_split_kernel, grid, args, meta, cfg)
