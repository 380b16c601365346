"""Property tests: random shapes, dtypes, batch dims, ranks, options vs the reference ops (500 cases).

Shapes are drawn small (the interpreter's cost grows with programs x loop iterations) but around the
interpreter blocks (64 rows, 128 channels) so tails, single and multiple programs/chunks all occur.
derandomize=True: the same cases on every run (CI stays reproducible); no example database.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_testutils import DTYPES, TOL, assert_close, basis, gen, poison, randn, split_scales
from svdcache_kernels import gram_update, gram_update_reference, reconstruct, reconstruct_reference, split, split_reference

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

batch_st = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
dtype_st = st.sampled_from(DTYPES)


@st.composite
def dims(draw, max_n=140, max_d=260):
    bshape = draw(batch_st)
    N = draw(st.integers(1, max_n // max(1, len(bshape) * 2)))
    D = draw(st.integers(1, max_d))
    k = draw(st.integers(1, min(D, 130)))
    return bshape, N, D, k


@settings(max_examples=200, **SETTINGS)
@given(dims=dims(), dtype=dtype_st, vdtype=dtype_st, order=st.integers(0, 2), outs=st.sets(st.sampled_from("CER")),
       dr=st.booleans(), ema_init=st.booleans(), h1=st.floats(0.25, 4.0), h2=st.floats(0.5, 8.0),
       beta=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_split_matches_reference(dims, dtype, vdtype, order, outs, dr, ema_init, h1, h2, beta, seed):
    bshape, N, D, k = dims
    g = gen(seed)
    F = randn((*bshape, N, D), dtype, g=g, scale=2.0)
    V = basis(D, k, vdtype, g=g)
    cs, rs = (*bshape, N, k), (*bshape, N, D)
    st_ = {}
    if "C" in outs or order >= 1:
        st_["C"] = randn(cs, g=g) if order >= 1 else poison(cs, torch.float32)
    if order >= 1:
        st_["D1"] = randn(cs, g=g) if order >= 2 else poison(cs, torch.float32)
    if order >= 2:
        st_["D2"] = poison(cs, torch.float32)
    if "E" in outs:
        st_["E"] = poison(cs, torch.float32) if ema_init else randn(cs, g=g)
    if "R" in outs:
        st_["R"] = randn(rs, dtype, g=g) if dr else poison(rs, dtype)
        if dr:
            st_["dR"] = poison(rs, dtype)
    kw = dict(order=order, h1=h1, h2=h2, beta=beta, ema_init=ema_init)
    ref = {n: t.clone() for n, t in st_.items()}
    ker = {n: t.clone() for n, t in st_.items()}
    split_reference(F, V, **ref, **kw)
    split(F, V, backend="triton", **ker, **kw)
    scales = split_scales(F, ref, st_.get("R"), h1)
    for n, r in ref.items():
        tol = TOL[torch.float32] if r.dtype == torch.float32 else TOL[dtype]
        assert_close(ker[n], r, tol, n, scale=scales.get(n))


@settings(max_examples=200, **SETTINGS)
@given(dims=dims(), dtype=dtype_st, xdtype=dtype_st, n_terms=st.integers(0, 3), dr_scale=st.sampled_from([0.0, 0.5, -1.25]),
       epilogue=st.sampled_from(["none", "x", "gate_rows", "gate_flat"]), in_place=st.booleans(),
       weights=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_reconstruct_matches_reference(dims, dtype, xdtype, n_terms, dr_scale, epilogue, in_place, weights, seed):
    bshape, N, D, k = dims
    g = gen(seed)
    R = randn((*bshape, N, D), dtype, g=g)
    V = basis(D, k, g=g)
    terms = [randn((*bshape, N, k), g=g, scale=3.0) for _ in range(n_terms)]
    kw = dict(terms=terms, weights=weights[:n_terms])
    if dr_scale:
        kw.update(dR=randn(R.shape, dtype, g=g, scale=0.3), dr_scale=dr_scale)
    if epilogue != "none":
        kw["x"] = randn(R.shape, xdtype, g=g, scale=2.0)
        if epilogue.startswith("gate"):
            mod = randn((*bshape, 3 * D), xdtype, g=g)  # gate = a strided chunk of a modulation tensor
            gate = mod[..., D:2 * D]
            kw["gate"] = gate.unsqueeze(-2) if epilogue == "gate_rows" else gate
    ref = reconstruct_reference(V, R, **kw)
    if in_place and "x" in kw:
        kw["x"] = kw["x"].clone()
        out = reconstruct(V, R, backend="triton", out=kw["x"], **kw)
        assert out is kw["x"]
    else:
        out = reconstruct(V, R, backend="triton", out=poison(R.shape, ref.dtype) if in_place else None, **kw)
    # An fp32 result still sums a 16-bit R (exact in fp32): fp32 tolerance; a 16-bit result: one ulp.
    assert_close(out, ref, TOL[ref.dtype], "out")


@settings(max_examples=100, **SETTINGS)
@given(dims=dims(max_n=200, max_d=200), dtype=dtype_st, seed=st.integers(0, 2**16))
def test_gram_matches_reference(dims, dtype, seed):
    bshape, N, D, _ = dims
    g = gen(seed)
    F = randn((*bshape, N, D), dtype, g=g)
    G0 = randn((D, D), g=g)
    Gk = gram_update(G0.clone(), F, backend="triton")
    assert_close(Gk, gram_update_reference(G0.clone(), F), TOL[torch.float32], "G")
