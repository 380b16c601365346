"""The plans' fused reference paths (the CPU fallback the runtime runs) against the reference ops, for
the variants of the Taylor order 2 default: the 2-term gated reconstruct (terms summed in k dims), the
order-2 split with F_prev (which hands back its F - F_prev), and the full step's residual quantizer
into reused buffers. Fresh random inputs, poisoned outputs, D not a multiple of anything, k = D (the
k-wide scratch must not alias the GEMM's output), a zero first weight, batch dims.
"""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import TOL, assert_close, basis, gen, poison, randn
from svdcache_kernels import quantize_rows, quantize_rows_into
from svdcache_kernels import ReconstructPlan, SplitPlan, reconstruct_reference, split_reference
from svdcache_kernels.ops.reconstruct.reference import code_values

F32 = torch.float32


@pytest.mark.parametrize("bits", (0, 8, 4))
@pytest.mark.parametrize("B,N,D,k", [(1, 24, 37, 5), (2, 7, 16, 16), (3, 1, 9, 2)])
def test_two_term_gated_plan_matches_reference(bits, B, N, D, k):
    g = gen(1000 * bits + 10 * D + k)
    V, R = basis(D, k, g=g), randn((B, N, D), g=g)
    gate = randn((B, 6 * D), g=g).chunk(6, dim=-1)[2]  # (B, D) with a batch stride of 6D, as AdaLN gives
    q = {}
    plan = None
    for w in ((0.7, -0.3), (0.0, 0.0), (2.5, 1.25)):  # the weights change per call; a zero first weight
        terms = [randn((B, N, k), g=g, scale=3.0), randn((B, N, k), g=g)]
        if bits:
            codes, scales = quantize_rows(torch.randn(B, N, D, generator=g) * 0.1, bits)
            q = dict(dR_codes=codes, dR_scales=scales, dR_bits=bits)
        x = randn((B, N, D), g=g, scale=4.0)
        ref = reconstruct_reference(V, R, terms=terms, weights=w, dr_scale=0.5 if bits else 0.0, x=x, gate=gate, **q)
        out = x.clone()
        if plan is None:
            plan = ReconstructPlan(V, R, terms=terms, weights=w, dr_scale=0.5, x=out, gate=gate, out=out,
                                   backend="torch", **q)
            assert plan._fast, "the 2-term gated fp32 call should take the fused path"
        got = plan(V, R, terms, w, None, 0.5 if bits else 0.0, out, gate, out, q.get("dR_codes"), q.get("dR_scales"))
        assert got is out
        assert_close(out, ref, TOL[F32], f"bits={bits} w={w}")


@pytest.mark.parametrize("gate_rows", (True, False))
def test_zero_term_gated_plan_is_x_plus_gate_times_anchor(gate_rows):
    """A first cached step (one full step behind it: no derivative yet) forecasts the anchor itself."""
    g = gen(5 + gate_rows)
    B, N, D = 2, 5, 19
    V, R = basis(D, 3, g=g), randn((B, N, D), g=g)
    gate = randn((B, 1, D) if gate_rows else (B, D), g=g)
    plan = None
    for _ in range(2):
        x = randn((B, N, D), g=g)
        ref = reconstruct_reference(V, R, x=x, gate=gate)
        out = x.clone()
        plan = plan or ReconstructPlan(V, R, x=out, gate=gate, out=out, backend="torch")
        assert plan._fast and plan(V, R, (), (), None, 0.0, out, gate, out) is out
        assert_close(out, ref, TOL[F32], "0 terms")


@pytest.mark.parametrize("B,N,D,k", [(1, 24, 37, 5), (2, 3, 12, 12)])
def test_order2_split_plan_matches_reference_and_returns_the_difference(B, N, D, k):
    g = gen(7 * D + k)
    V = basis(D, k, g=g)
    F_prev = randn((B, N, D), g=g)
    D1_0, D2_0 = randn((B, N, k), g=g), randn((B, N, k), g=g)
    plan = None
    for h1, h2 in ((0.25, 0.5), (1.0, 3.0)):
        F = randn((B, N, D), g=g)
        D1r, D2r = D1_0.clone(), poison((B, N, k), F32)
        split_reference(F, V, D1=D1r, D2=D2r, order=2, h1=h1, h2=h2, F_prev=F_prev)
        D1, D2 = D1_0.clone(), poison((B, N, k), F32)
        if plan is None:
            plan = SplitPlan(F, V, D1=D1, D2=D2, order=2, h1=h1, h2=h2, F_prev=F_prev, backend="torch")
            assert plan._fast
        diff = plan(F, V, D1=D1, D2=D2, h1=h1, h2=h2, F_prev=F_prev)
        assert_close(D1, D1r, TOL[F32], "D1")
        assert_close(D2, D2r, TOL[F32], "D2")
        assert torch.equal(diff, (F - F_prev).reshape(-1, D))


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("M,D", [(1, 2), (33, 40), (5, 1000)])
def test_quantize_rows_into_gives_the_same_codes(bits, M, D):
    g = gen(M + D + bits)
    r = torch.randn(M, D, generator=g) * (0.01 + torch.rand(M, 1, generator=g) * 3.0)
    r[0] = 0.0  # an all-zero row: scale clamped, codes of zero
    q_ref, s_ref = quantize_rows(r, bits)
    q = torch.full_like(q_ref, 0x5A)
    s = torch.full_like(s_ref, float("nan"))
    quantize_rows_into(r.clone(), bits, q, s)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("order", (1, 2))
@pytest.mark.parametrize("bits", (8, 4))
def test_quantized_cache_update_stores_the_residual_of_its_state(order, bits):
    """Over several full steps (buffers reused), the stored codes are those of r = (F - F_prev) / h - D1 V^T."""
    from svdcache.config import SVDCacheConfig
    from svdcache.features import QuantizedResidualCache

    g = gen(order * 10 + bits)
    B, N, D, k = 2, 9, 24, 3
    cfg = SVDCacheConfig(residual=f"int{bits}", order=order, backend="torch")
    V = basis(D, k, g=g)
    cache = QuantizedResidualCache("f", cfg, V)
    F_prev = None
    for i, t in enumerate((1.0, 0.9, 0.75, 0.5)):
        F = randn((B, N, D), g=g)
        cache.update(F, t)
        if i >= 1:
            h = cache.times[-1] - cache.times[-2]
            r = ((F - F_prev) / h).reshape(-1, D) - cache.D1.reshape(-1, k) @ V.T
            q_ref, s_ref = quantize_rows(r.view(B, N, D), bits)
            # the residual is formed in another order of fp32 operations: an ulp may flip a code by one
            v, v_ref = (code_values(c, D, bits).float() for c in (cache.rq, q_ref))
            assert (v - v_ref).abs().max() <= 1 and (v != v_ref).float().mean() < 0.02
            assert_close(cache.rs, s_ref, 1e-5, "scales")
        F_prev = F
