"""Full-step split, fused Triton kernel: C = F V, predictor-state updates and R = F - C V^T in one launch.

One program owns BLOCK_M rows of F (M = prod(leading dims) x N rows of D channels) and one BLOCK_K
slice of the k coefficients (grid: k tiles x row blocks; every state update is elementwise in k):

1. loop over D in BLOCK_D chunks: ``acc += F[rows, d] @ V[d, :]`` (fp32 accumulate; BLOCK_K = next
   pow2 of k, >= 16, padded columns of V load as 0 so they stay 0 in ``acc``);
2. k-dim state updates from ``acc`` (C, D1, D2, E) - tiny, in registers;
3. only if R is asked for and all of k fits one tile (k <= 256), a second loop over D:
   ``R = F - acc @ V^T`` (and ``dR = (R - R_prev)/h1``,
   reading R_prev from R before it is overwritten; each program owns its rows, so there is no
   cross-program hazard, and R may even alias F). Above 256 coefficients the split kernel writes C
   (tile by tile) and a second kernel, ``_residual_kernel``, forms R from it (a GEMM over k tiles).

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
    basis_for_dot,
    d_splits,
    dot_fp32,
    k_tile,
    interp_blocks,
    launch,
    require_launchable,
    resolve_config,
    row_stride,
    rows_of,
)
from .. import _triton_common as _tc
from .reference import check_split_args


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
    # grid (k tiles, row blocks): the k tiles of one row block run side by side and share F in L2
    pid = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
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


@triton.jit
def _residual_kernel(
    F_ptr, V_ptr, C_ptr, R_ptr, dR_ptr,
    M, D, K, D_PER, K_TILES,
    stride_fm, stride_vd, stride_vk, stride_cm, stride_rm, stride_drm,
    h1,
    HAS_DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """R = F - C V^T (and dR = (R - R_prev) / h1) for k above one register tile: a GEMM with its
    K loop over BLOCK_K slices of C (written by the split kernel just before) and the residual as
    epilogue. Grid (row blocks, D splits); R may alias F (each element is read, then written, by
    the same program)."""
    pid = tl.program_id(0)
    d_lo = tl.program_id(1) * D_PER
    d_hi = tl.minimum(d_lo + D_PER, D)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_d0 = tl.arange(0, BLOCK_D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + offs_d0
        mask_d = offs_d < d_hi
        fk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for kt in range(0, K_TILES):
            offs_k = kt * BLOCK_K + offs_k0
            mask_k = offs_k < K
            c = tl.load(C_ptr + rows[:, None] * stride_cm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            v = tl.load(V_ptr + offs_d[:, None] * stride_vd + offs_k[None, :] * stride_vk,
                        mask=mask_d[:, None] & mask_k[None, :], other=0.0)
            if DOT_FP32:
                fk += tl.dot(c, tl.trans(v.to(tl.float32)), input_precision="ieee")
            else:
                c_op = c.to(F_ptr.dtype.element_ty)
                fk += tl.dot(c_op, tl.trans(v.to(c_op.dtype)))
        fmask = mask_m[:, None] & mask_d[None, :]
        f = tl.load(F_ptr + rows[:, None] * stride_fm + offs_d[None, :], mask=fmask, other=0.0,
                    eviction_policy="evict_first")
        r = f.to(tl.float32) - fk
        r_ptrs = R_ptr + rows[:, None] * stride_rm + offs_d[None, :]
        if HAS_DR:
            r_prev = tl.load(r_ptrs, mask=fmask, other=0.0).to(tl.float32)
            tl.store(dR_ptr + rows[:, None] * stride_drm + offs_d[None, :],
                     ((r - r_prev) / h1).to(dR_ptr.dtype.element_ty), mask=fmask, eviction_policy="evict_first")
        tl.store(r_ptrs, r.to(R_ptr.dtype.element_ty), mask=fmask, eviction_policy="evict_first")


def split_config(M: int, D: int, K: int, dtype: torch.dtype, device: torch.device, has_r: bool = True) -> dict[str, int]:
    """Launch parameters (before overrides). GPU heuristic, to be refined by bench/gpu/check.py.

    The split is memory-bound on F and R, but every program also re-reads V (D x k) from L2 in each
    of its loops. 16-bit: 64-row tiles for every M (sm_90's wgmma path; 32-row tiles would take
    mma.sync). Without a residual (the runtime's default full step: D1 = (F - F_prev) V / h1) the
    grid also splits k into tiles, down to 64 wide, until it holds a program per SM; the tiles of a
    row block run side by side and re-read F from L2. With a residual all of k stays in one
    register tile up to 256 (loop 2 needs every coefficient); above, k is tiled (128) and the
    residual runs as a second kernel. The accumulator is (BLOCK_M, BLOCK_K) fp32: 8 warps once it
    reaches 64 x 128.
    """
    if device.type != "cuda":
        cfg = interp_blocks()
        cfg["BLOCK_K"] = k_tile(K)
        return cfg
    fp32 = dtype == torch.float32
    bm = 32 if fp32 else 64  # fp32: FMA dot, registers
    bd = 32 if fp32 else 64
    bk = k_tile(K)
    if not has_r and not fp32:
        sms, row_blocks = _tc.num_sms(device), -(-M // bm)
        while bk > 64 and row_blocks * -(-K // bk) < sms:
            bk //= 2
    warps = 8 if bm * bk >= 64 * 128 else 4
    stages = 2 if bk >= 256 or fp32 else 3
    return {"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


def prepare_split(F, V, C, D1, D2, E, R, dR, order, ema_init, F_prev):
    """A launcher for split arguments of this layout (already checked): returns ``run(F, V, C, D1,
    D2, E, R, dR, h1, h2, beta, F_prev)``. Launch configuration, grid and strides computed once."""
    require_launchable(F, "split")
    D, K = F.shape[-1], V.shape[1]
    M = rows_of(F)
    nothing = M == 0 or (C is None and E is None and R is None and F_prev is None)
    fp32_dot = dot_fp32(F.dtype, F.device)
    cfg = resolve_config("split", split_config(M, D, K, F.dtype, F.device, has_r=R is not None))
    bk = cfg.get("BLOCK_K") or k_tile(K)
    k_tiles = triton.cdiv(K, bk)
    two_pass = R is not None and k_tiles > 1  # the residual needs every coefficient: second kernel
    grid = (k_tiles, triton.cdiv(M, cfg["BLOCK_M"]))
    strides = [row_stride(t) if t is not None else 0 for t in (C, D1, D2, E, R, dR)]
    if two_pass and C is None:
        strides[0] = K  # a scratch C, allocated per call
    fprev_stride = row_stride(F_prev) if F_prev is not None else 0
    has_c = C is not None or two_pass
    meta = dict(
        HAS_C=has_c, ORDER=int(order), HAS_E=E is not None, EMA_INIT=bool(ema_init),
        HAS_R=R is not None and not two_pass, HAS_DR=dR is not None and not two_pass,
        HAS_FPREV=F_prev is not None,
        NEED_ACC=has_c or E is not None or R is not None or (order >= 1 and F_prev is None),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=bk, DOT_FP32=fp32_dot,
    )
    if two_pass:
        n_chunks = triton.cdiv(D, cfg["BLOCK_D"])
        splits = max(1, min(d_splits(M, D, cfg["BLOCK_M"], cfg["BLOCK_D"], F.device), n_chunks))
        d_per = triton.cdiv(n_chunks, splits) * cfg["BLOCK_D"]
        rgrid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, d_per))
        rmeta = dict(HAS_DR=dR is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=bk,
                     DOT_FP32=fp32_dot)

    def run(F, V, C, D1, D2, E, R, dR, h1, h2, beta, F_prev):
        if nothing:
            return  # nothing to produce (order >= 1 implies C or F_prev)
        V = basis_for_dot(V, F.dtype, fp32_dot)
        if two_pass and C is None:
            C = torch.empty((*F.shape[:-1], K), dtype=torch.float32, device=F.device)
        dummy = F  # stands in for absent tensors; the constexpr flags keep it untouched
        args = (
            F, V,
            *(t if t is not None else dummy for t in (C, D1, D2, E, R, dR, F_prev)),
            M, D, K,
            row_stride(F), V.stride(0), V.stride(1), fprev_stride,
            *strides,
            float(h1), float(h2), float(beta), 1.0 - float(beta),
        )
        launch(_split_kernel, grid, args, meta, cfg)
        if two_pass:
            rargs = (F, V, C, R, dR if dR is not None else R, M, D, K, d_per, k_tiles,
                     row_stride(F), V.stride(0), V.stride(1), strides[0], strides[4], strides[5], float(h1))
            launch(_residual_kernel, rgrid, rargs, rmeta, cfg)

    return run


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
    """Triton version of :func:`split_reference` (same arguments, same in-place semantics), any k <= D."""
    check_split_args(F, V, C=C, D1=D1, D2=D2, E=E, R=R, dR=dR, order=order, h1=h1, h2=h2, beta=beta, F_prev=F_prev)
    if rows_of(F) == 0:
        return
    prepare_split(F, V, C, D1, D2, E, R, dR, order, ema_init, F_prev)(F, V, C, D1, D2, E, R, dR, h1, h2, beta, F_prev)
