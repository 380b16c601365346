"""Shared helpers of the kernel parity tests: inputs, poisoning, tolerances.

Tolerances are relative to the scale of the quantity compared (max |reference|), not elementwise:
values near zero would otherwise demand impossible relative accuracy.

- fp32 results (C, D1, D2, E, G and any fp32 output): both sides compute the same fp32 products of the
  same (exactly upcast) operands and differ only in summation order, ~sqrt(D) * 2^-24 relative to
  the scale -> 1e-5.
- 16-bit results: the fp32 values before the final cast differ in their last bits, so a result can
  round to the neighbouring 16-bit value: one ulp, at most 2^-7 |x| for bf16 (8 significant bits)
  and 2^-10 |x| for fp16 (11 bits), and |x| <= scale -> 1e-2 (bf16) and 2e-3 (fp16).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
NAN = float("nan")


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype=torch.float32, g=None, scale=1.0, shift=0.25) -> torch.Tensor:
    """Fresh random values, never zeros (a shift keeps a biased mean, like real features)."""
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)


def basis(D: int, k: int, dtype=torch.float32, g=None) -> torch.Tensor:
    """Orthonormal columns (D, k), like an SVD basis; k <= D."""
    q, _ = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))
    return q.to(dtype)


def poison(shape, dtype) -> torch.Tensor:
    return torch.full(shape, NAN, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "", scale=None) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double(), expected.double()
    assert torch.isfinite(e).all(), f"{name}: reference not finite (test bug)"
    bad = ~torch.isfinite(a)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values (poison left unwritten?)"
    s = float(scale) if scale is not None else float(e.abs().max()) if e.numel() else 1.0
    if e.numel() == 0:
        return
    err = float((a - e).abs().max())
    assert err <= tol * max(s, 1e-30), f"{name}: max |err| {err:.3g} > {tol:g} x scale {s:.3g}"


def split_scales(F: torch.Tensor, ref: dict, R_prev=None, h1: float = 1.0) -> dict:
    """Scales of the split's outputs. R = F - F V V^T cancels (R ~ 0 when k ~ D): its fp32 error is
    relative to |F|, not to |R|; dR = (R - R_prev) / h1 likewise relative to (|F| + |R_prev|) / h1."""
    f = float(F.float().abs().max()) if F.numel() else 1.0
    out = {}
    if "R" in ref:
        out["R"] = max(float(ref["R"].float().abs().max()) if F.numel() else 0.0, f)
    if "dR" in ref and ref["dR"] is not None:
        rp = float(R_prev.float().abs().max()) if R_prev is not None and R_prev.numel() else 0.0
        out["dR"] = max(float(ref["dR"].float().abs().max()) if F.numel() else 0.0, (f + rp) / abs(h1))
    return out


def assert_untouched(t: torch.Tensor, before: torch.Tensor, name: str) -> None:
    # NaN-poisoned buffers: compare bit patterns.
    assert torch.equal(t.view(_int_of(t.dtype)), before.view(_int_of(before.dtype))), f"{name} was written but should not be"


def _int_of(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def clone_states(states: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in states.items()}


@contextlib.contextmanager
def gpu_dot_path():
    """Run the 16-bit tensor-core code path (operands cast to the activation dtype) under the
    interpreter. Only valid with fp16: the interpreter's bf16 dot is broken (shared/REFERENCE.md)."""
    from svdcache_kernels.ops import _triton_common as tc

    old = tc.FORCE_DOT_FP32
    tc.FORCE_DOT_FP32 = False
    try:
        yield
    finally:
        tc.FORCE_DOT_FP32 = old
