"""residual_codes: the full step of ``residual="int8"/"int4"`` (r = (F - F_prev) / h - D1 V^T as per-row
codes and scales in one pass). The Triton kernel (interpreter) against the reference op, both against the
exact quantization of r computed in float64; fresh random inputs, poisoned outputs, every activation dtype,
batch dims, rows / D / k not multiples of the blocks, k over several k tiles, the interpreter's and the
GPU heuristic's launch configs; bad arguments; the runtime's cache on the Triton backend.
"""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import DTYPES, basis, dname, gen, randn
from svdcache_kernels import residual_codes, residual_codes_reference
from svdcache_kernels.ops._triton_common import config_override
from svdcache_kernels.ops.reconstruct.reference import code_values
from svdcache_kernels.ops.residual_codes.kernel import residual_codes_config

BITS = (8, 4)


def make(bshape, N, D, k, dtype, bits, g):
    F = randn((*bshape, N, D), dtype, g=g)
    # a change of F with row scales spread over two decades (real tokens differ that much)
    step = torch.randn(*bshape, N, D, generator=g) * (0.05 + 2.0 * torch.rand(*bshape, N, 1, generator=g))
    F_prev = (F.float() - step).to(dtype)
    V = basis(D, k, g=g)
    h = 0.37
    D1 = ((F.float() - F_prev.float()).reshape(-1, D) @ V / h).view(*bshape, N, k)
    D1 += 0.1 * torch.randn(D1.shape, generator=g)  # not exactly the projection: r then also holds a k-dim part
    return F, F_prev, D1, V, h


def poisoned_out(bshape, N, D, bits):
    nq = D if bits == 8 else D // 2
    codes = torch.full((*bshape, N, nq), 0x5A, dtype=torch.int8 if bits == 8 else torch.uint8)
    return codes, torch.full((*bshape, N, 1), float("nan"))


def exact(F, F_prev, D1, V, h, bits):
    """r in float64 and its scales (absmax / L)."""
    D = F.shape[-1]
    r = (F.double() - F_prev.double()) / h - (D1.double().reshape(-1, V.shape[1]) @ V.double().T).view(F.shape)
    L = 127.0 if bits == 8 else 7.0
    return r, r.abs().amax(-1, keepdim=True).clamp_min(1e-30) / L


def check_codes(codes, scales, r64, s64, bits, name):
    """Scales within fp32 rounding of the exact ones; every decoded value within half a code step (plus
    rounding) of r: the codes are a nearest-code quantization of r."""
    assert torch.isfinite(scales).all(), f"{name}: scales left unwritten"
    rel = float(((scales.double() - s64).abs() / s64).max())
    assert rel <= 1e-5, f"{name}: scales off by {rel:.2g} relative"
    v = code_values(codes, r64.shape[-1], bits).double()
    L = 127 if bits == 8 else 7
    assert float(v.abs().max()) <= L, f"{name}: a code outside [-{L}, {L}]"
    err = (v * scales.double() - r64).abs() / scales.double()
    assert float(err.max()) <= 0.5 + 1e-3, f"{name}: a decoded value {float(err.max()):.3f} steps from r"


def run_both(F, F_prev, D1, V, h, bits):
    bshape, (N, D) = F.shape[:-2], F.shape[-2:]
    out = {}
    for backend in ("torch", "triton"):
        codes, scales = poisoned_out(bshape, N, D, bits)
        residual_codes(F, F_prev, D1, V, h=h, bits=bits, codes=codes, scales=scales, backend=backend)
        out[backend] = codes, scales
    return out


def assert_parity(out, r64, s64, D, bits):
    for name, (c, s) in out.items():
        check_codes(c, s, r64, s64, bits, name)
    (cr, sr), (ck, sk) = out["torch"], out["triton"]
    vr, vk = (code_values(c, D, bits).float() for c in (cr, ck))
    # the two sum D1 V^T in different orders: a code may flip by one where r / scale is within an ulp of a half
    assert float((vr - vk).abs().max()) <= 1
    assert float((vr != vk).float().mean()) <= 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [((), 37, 66, 5), ((2,), 19, 130, 20), ((2, 3), 5, 46, 1)],
                         ids=["rows37-D66-k5", "batch2-D130-k20", "batch2x3-D46-k1"])
def test_kernel_matches_reference_and_exact_quantization(dtype, bits, shape):
    bshape, N, D, k = shape
    g = gen(hash((dname(dtype), bits, shape)) % 10_000)
    F, F_prev, D1, V, h = make(bshape, N, D, k, dtype, bits, g)
    r64, s64 = exact(F, F_prev, D1, V, h, bits)
    assert_parity(run_both(F, F_prev, D1, V, h, bits), r64, s64, D, bits)


@pytest.mark.parametrize("bits", BITS)
def test_k_over_several_tiles(bits):
    """k = 300: above one register tile (k_tile 128: three k tiles, the last one partial)."""
    g = gen(41 + bits)
    F, F_prev, D1, V, h = make((), 21, 310, 300, torch.float32, bits, g)
    r64, s64 = exact(F, F_prev, D1, V, h, bits)
    assert_parity(run_both(F, F_prev, D1, V, h, bits), r64, s64, 310, bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", (8, 100))
def test_gpu_heuristic_config(bits, k):
    """The launch config the heuristic picks on a GPU (32 rows, 64 codes a chunk, k tiles of <= 64), at
    rows, codes and k that are not multiples of it."""
    g = gen(7 * k + bits)
    N, D = 45, 150
    cfg = residual_codes_config(N, D if bits == 8 else D // 2, k, torch.device("cuda"))
    assert (cfg["BLOCK_M"], cfg["BLOCK_C"], cfg["BLOCK_K"]) == (32, 64, min(64, 16 if k <= 16 else 128))
    F, F_prev, D1, V, h = make((), N, D, k, torch.bfloat16, bits, g)
    r64, s64 = exact(F, F_prev, D1, V, h, bits)
    with config_override("residual_codes", BLOCK_M=32, BLOCK_C=64, BLOCK_K=cfg["BLOCK_K"]):
        out = run_both(F, F_prev, D1, V, h, bits)
    assert_parity(out, r64, s64, D, bits)


def test_rows_as_strided_views_and_zero_rows():
    """Rows of a wider buffer (a row stride > D) read and written in place; empty inputs write nothing."""
    g = gen(5)
    N, D, k = 13, 40, 6
    big = randn((N, 3 * D), g=g)
    F, F_prev = big[:, :D], big[:, D:2 * D]
    V = basis(D, k, g=g)
    D1 = randn((N, k), g=g)
    qbuf = torch.full((N, 2 * D), 7, dtype=torch.int8)
    codes = qbuf[:, :D]
    scales = torch.full((N, 1), float("nan"))
    residual_codes(F, F_prev, D1, V, h=0.5, bits=8, codes=codes, scales=scales, backend="triton")
    r64, s64 = exact(F, F_prev, D1, V, 0.5, 8)
    check_codes(codes, scales, r64, s64, 8, "strided")
    assert (qbuf[:, D:] == 7).all(), "wrote outside the codes' view"
    empty = torch.empty(0, D)
    c0, s0 = torch.empty(0, D // 2, dtype=torch.uint8), torch.empty(0, 1)
    residual_codes(empty, empty, torch.empty(0, k), V, h=0.5, bits=4, codes=c0, scales=s0, backend="triton")


@pytest.mark.parametrize("op", [residual_codes_reference, residual_codes], ids=["reference", "dispatch"])
def test_bad_arguments_are_refused_before_any_work(op):
    g = gen(9)
    N, D, k = 6, 10, 3
    F, F_prev, D1, V, h = make((), N, D, k, torch.float32, 4, g)
    codes, scales = poisoned_out((), N, D, 4)
    ok = dict(h=h, bits=4, codes=codes, scales=scales)
    cases = [
        (dict(bits=5), ValueError, "bits must be 4 or 8"),
        (dict(h=0.0), ValueError, "h"),
        (dict(h=float("nan")), ValueError, "h"),
        (dict(codes=codes.to(torch.int8)), TypeError, "codes must be uint8"),
        (dict(scales=scales[:-1]), ValueError, "scales must have shape"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            op(F, F_prev, D1, V, **{**ok, **change})
    with pytest.raises(TypeError, match="F_prev must be float32"):
        op(F, F_prev.half(), D1, V, **ok)
    with pytest.raises(ValueError, match="D must be even"):
        op(F[..., :9], F_prev[..., :9], D1, V[:9], h=h, bits=4, codes=codes[..., :4], scales=scales)
    with pytest.raises(ValueError, match="V has D=9 rows but F has D=10"):
        op(F, F_prev, D1, V[:9], **ok)
    assert torch.isnan(scales).all() and (codes == 0x5A).all(), "an argument error left writes behind"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
def test_runtime_cache_on_the_triton_backend_stores_the_same_codes(bits, dtype):
    """QuantizedResidualCache over several full steps (buffers reused): on the Triton backend its codes
    come from the fused kernel (the split kernel forms no F - F_prev), on the torch backend from the
    reference path; both are a quantization of the same r and agree code for code but for ties."""
    from svdcache.config import SVDCacheConfig
    from svdcache.features import QuantizedResidualCache
    from svdcache_kernels.ops.residual_codes import kernel as rc_kernel

    g = gen(60 + bits)
    B, N, D, k = 2, 11, 34, 4
    V = basis(D, k, g=g)
    caches = {b: QuantizedResidualCache("f", SVDCacheConfig(residual=f"int{bits}", order=2, backend=b), V)
              for b in ("torch", "triton")}
    launches = []
    real = rc_kernel.launch
    rc_kernel.launch = lambda *a, **kw: (launches.append(a[0]), real(*a, **kw))
    try:
        for i, t in enumerate((1.0, 0.9, 0.75, 0.5)):
            F = randn((B, N, D), dtype, g=g, scale=1.0 + i)
            for c in caches.values():
                c.update(F.clone(), t)
            cr, ck = caches["torch"], caches["triton"]
            if i == 0:
                continue
            torch.testing.assert_close(ck.rs, cr.rs, rtol=1e-5, atol=0)
            vr, vk = (code_values(c.rq, D, bits).float() for c in (cr, ck))
            assert float((vr - vk).abs().max()) <= 1 and float((vr != vk).float().mean()) <= 1e-3
    finally:
        rc_kernel.launch = real
    assert len(launches) == 3, "the Triton backend's full steps did not go through the fused kernel"
