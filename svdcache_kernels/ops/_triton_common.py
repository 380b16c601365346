"""Shared launch helpers for the Triton kernels: dot precision, block configs and their overrides.

Kept free of ``@triton.jit`` so that importing it never freezes the interpreter switch.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from ..dispatch import interpreter_on

# Coefficient dims the fused kernels keep in registers as one tile (BLOCK_K = next pow2 >= 16). Above
# this the kernels tile over k in K_TILE-wide slices (any k up to D): a (BLOCK_M, > 256) fp32 tile
# would spill.
MAX_KERNEL_K = 256
K_TILE = 128

# Tests set this to False to run the 16-bit tensor-core code path (operands cast to F's dtype,
# fp32 accumulate) under the interpreter with fp16 (the interpreter's fp16 dot is right, its bf16
# dot is not: shared/REFERENCE.md). None = automatic (see :func:`dot_fp32`).
FORCE_DOT_FP32: bool | None = None

# op -> dict of launch parameters that replace the heuristic ones (BLOCK_M, BLOCK_D, BLOCK_R,
# num_warps, num_stages). Set through :func:`config_override` (bench sweeps, tests) or the
# environment variable SVDCACHE_<OP>_CONFIG="BLOCK_M=32,BLOCK_D=64,num_warps=4,num_stages=3".
_OVERRIDES: dict[str, dict[str, int]] = {}


def dot_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """True: cast dot operands to fp32 and use ``input_precision="ieee"``.

    Used under the interpreter (its bf16 ``tl.dot`` multiplies raw bits, triton-lang/triton#11584)
    and for fp32 activations (an exact fp32 product, not TF32). On a GPU, bf16/fp16 activations take
    the tensor-core dot on 16-bit operands with fp32 accumulation.
    """
    if FORCE_DOT_FP32 is not None:
        return FORCE_DOT_FP32
    return interpreter_on() or device.type != "cuda" or dtype == torch.float32


def basis_for_dot(V: torch.Tensor, dtype: torch.dtype, fp32_dot: bool) -> torch.Tensor:
    """V as the kernels' dot reads it: in the activation dtype on the 16-bit tensor-core path.

    An fp32 basis would otherwise be read at twice the bytes by every program (V re-reads from L2
    are the split's second-largest traffic) and cast in registers. The cast is cached on V itself,
    keyed by V's version counter, so a basis is converted once, not per call, and the copy lives
    exactly as long as V. Same rounding as the in-kernel cast (round to nearest even).
    """
    if fp32_dot or V.dtype == dtype:
        return V
    cached = getattr(V, "_svdcache_dot_cast", None)
    if cached is not None and cached[0] == V._version and cached[1] == dtype:
        return cached[2]
    Vc = V.to(dtype).contiguous()
    try:
        V._svdcache_dot_cast = (V._version, dtype, Vc)
    except Exception:  # pragma: no cover - tensors without a __dict__
        pass
    return Vc


def block_k(k: int) -> int:
    """Register width of the coefficient dim: next power of two, at least 16 (GPU tl.dot minimum)."""
    return max(16, triton_next_pow2(k))


def k_tile(k: int) -> int:
    """BLOCK_K of the kernels: all of k in one register tile up to MAX_KERNEL_K, else K_TILE slices."""
    bk = block_k(k)
    return bk if bk <= MAX_KERNEL_K else K_TILE


def d_splits(M: int, D: int, block_m: int, block_d: int, device: torch.device) -> int:
    """Programs per row block along D, so that the grid holds about two programs per SM when rows are
    few (each split keeps at least two D chunks, so the loads one chunk ahead still overlap)."""
    row_blocks = -(-M // block_m)
    chunks = -(-D // block_d)
    want = -(-2 * num_sms(device) // max(row_blocks, 1))
    return max(1, min(want, chunks // 2 if chunks >= 2 else 1))


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def rows_of(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-1])


def row_stride(t: torch.Tensor) -> int:
    """Stride between rows of (..., D) viewed as (M, D); check_rows guarantees the view exists, so
    the innermost leading dim of size > 1 carries it (no view built: this runs per launch)."""
    shape, strides = t.shape, t.stride()
    for i in range(t.dim() - 2, -1, -1):
        if shape[i] > 1:
            return strides[i]
    return max(shape[-1], 1)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_properties(device).multi_processor_count
        except Exception:  # pragma: no cover
            return 108
    return 1


def require_launchable(t: torch.Tensor, op: str) -> None:
    if not t.is_cuda and not interpreter_on():
        raise RuntimeError(
            f"{op}: the Triton kernel got a {t.device} tensor without Triton's interpreter; set "
            "TRITON_INTERPRET=1 before importing svdcache_kernels, or use backend='torch'"
        )


def _env_override(op: str) -> dict[str, int]:
    raw = os.environ.get(f"SVDCACHE_{op.upper()}_CONFIG", "").strip()
    if not raw:
        return {}
    out = {}
    for item in raw.split(","):
        key, _, val = item.partition("=")
        if not val:
            raise ValueError(f"SVDCACHE_{op.upper()}_CONFIG: expected KEY=INT items, got {raw!r}")
        out[key.strip()] = int(val)
    return out


def resolve_config(op: str, heuristic: dict[str, int]) -> dict[str, int]:
    cfg = dict(heuristic)
    cfg.update(_env_override(op))
    cfg.update(_OVERRIDES.get(op, {}))
    return cfg


@contextlib.contextmanager
def config_override(op: str, **params: int):
    """Force launch parameters of ``op`` ("split", "reconstruct", "gram") inside the block."""
    old = _OVERRIDES.get(op)
    _OVERRIDES[op] = {**(old or {}), **params}
    try:
        yield
    finally:
        if old is None:
            _OVERRIDES.pop(op, None)
        else:
            _OVERRIDES[op] = old


def interp_blocks() -> dict[str, int]:
    """Interpreter launch sizes: its cost grows with programs x loop iterations, so use big blocks."""
    return {"BLOCK_M": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}


def rows_block(M: int, device: torch.device, start: int = 64, floor: int = 16) -> int:
    """Rows per program for the row-block kernels (split, reconstruct).

    Each program re-reads the whole V (D x k) from L2 once per loop over D, so V traffic is about
    (M / BLOCK_M) x D x k x 2 bytes per loop: at k >= 128 and BLOCK_M = 32 it would exceed the
    HBM traffic of F and R. Keep 64 rows while that leaves at least half as many programs as SMs
    (FLUX: M = 4608 -> 72 programs on 132 SMs), halve it for smaller M.
    """
    bm = start
    sms = num_sms(device)
    while bm > floor and -(-M // bm) < sms // 2:
        bm //= 2
    return bm


def launch(kernel, grid, args, meta: dict, cfg: dict) -> None:
    """Launch; if the config asks for more shared memory than this GPU has, retry with fewer stages."""
    stages = cfg["num_stages"]
    dev = args[0].device
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):  # Triton launches on the current device: make it the tensors'
            return launch(kernel, grid, args, meta, cfg)
    while True:
        try:
            kernel[grid](*args, **meta, num_warps=cfg["num_warps"], num_stages=stages)
            return
        except Exception as e:  # triton.runtime.errors.OutOfResources (module path varies by version)
            if type(e).__name__ != "OutOfResources" or stages <= 1:
                raise
            stages -= 1
