"""Parity of the fused reconstruct kernel (Triton interpreter) against reconstruct_reference."""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import DTYPES, TOL, assert_close, basis, dname, gen, gpu_dot_path, poison, randn
from svdcache_kernels import reconstruct, reconstruct_reference
from svdcache_kernels.ops._triton_common import config_override

KS = (1, 16, 48, 128)
WEIGHTS = (1.0, 1.7, -0.45)  # e.g. Taylor order 2: C + s D1 + s^2/2 D2


def reconstruct_triton(V, R, **kw):
    return reconstruct(V, R, backend="triton", **kw)


def inputs(bshape, N, D, k, dtype, n_terms, g, xdtype=None):
    R = randn((*bshape, N, D), dtype, g=g)
    terms = [randn((*bshape, N, k), g=g, scale=3.0) for _ in range(n_terms)]
    dR = randn((*bshape, N, D), dtype, g=g, scale=0.3)
    x = randn((*bshape, N, D), xdtype or dtype, g=g, scale=4.0)
    V = basis(D, k, g=g)
    return V, R, terms, dR, x


def gate_chunk(bshape, D, dtype, g, rows: bool):
    """A FLUX-style gate: the 3rd of 6 chunks of a (..., 6D) modulation tensor (batch stride 6D)."""
    mod = randn((*bshape, 6 * D), dtype, g=g)
    gate = mod.chunk(6, dim=-1)[2]
    assert gate.stride(-2 if bshape else -1) == 6 * D or not bshape
    return gate.unsqueeze(-2) if rows else gate


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("gate_rows", [True, False], ids=["gate_B1D", "gate_BD"])
def test_reconstruct_gated_in_place(dtype, k, gate_rows):
    """The cached-step hot path: 3 Taylor terms, damped dR, out = x + gate * F_hat in place on x."""
    bshape, N, D = (2,), 100, 200
    g = gen(100 * k + gate_rows)
    V, R, terms, dR, x = inputs(bshape, N, D, k, dtype, 3, g)
    gate = gate_chunk(bshape, D, dtype, g, gate_rows)
    ref = reconstruct_reference(V, R, terms=terms, weights=WEIGHTS, dR=dR, dr_scale=0.6, x=x, gate=gate)
    x_k = x.clone()
    res = reconstruct_triton(V, R, terms=terms, weights=WEIGHTS, dR=dR, dr_scale=0.6, x=x_k, gate=gate, out=x_k)
    assert res is x_k
    assert_close(x_k, ref, TOL[dtype], "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("n_terms", [0, 1, 2, 3])
def test_reconstruct_terms_no_epilogue(dtype, n_terms):
    """F_hat alone (no x): returned as a new tensor, and into a poisoned ``out``."""
    bshape, N, D = (2, 3), 33, 136
    g = gen(7 + n_terms)
    V, R, terms, dR, _ = inputs(bshape, N, D, 48, dtype, n_terms, g)
    kw = dict(terms=terms, weights=WEIGHTS[:n_terms], dR=dR, dr_scale=0.5)
    ref = reconstruct_reference(V, R, **kw)
    new = reconstruct_triton(V, R, **kw)
    assert_close(new, ref, TOL[dtype], "new out")
    out = poison(R.shape, dtype)
    assert reconstruct_triton(V, R, **kw, out=out) is out
    assert_close(out, ref, TOL[dtype], "out=")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_reconstruct_reuse_no_batch_dims(dtype):
    """Plain reuse (P = C, no dR) on a (N, D) feature; ungated add x + F_hat into a new tensor."""
    N, D = 130, 300
    g = gen(3)
    V, R, terms, _, x = inputs((), N, D, 16, dtype, 1, g)
    ref = reconstruct_reference(V, R, terms=terms, weights=(1.0,), x=x)
    out = reconstruct_triton(V, R, terms=terms, weights=(1.0,), x=x)
    assert out is not x
    assert_close(out, ref, TOL[dtype], "out")
    gate = randn((1, D), dtype, g=g)
    ref = reconstruct_reference(V, R, terms=terms, weights=(1.0,), x=x, gate=gate)
    assert_close(reconstruct_triton(V, R, terms=terms, weights=(1.0,), x=x, gate=gate), ref, TOL[dtype], "gated")


def test_reconstruct_dr_scale_zero_does_not_read_dR():
    g = gen(5)
    V, R, terms, _, _ = inputs((2,), 40, 72, 16, torch.float32, 2, g)
    dR = poison(R.shape, torch.float32)
    out = reconstruct_triton(V, R, terms=terms, weights=(1.0, 0.5), dR=dR, dr_scale=0.0)
    ref = reconstruct_reference(V, R, terms=terms, weights=(1.0, 0.5))
    assert_close(out, ref, TOL[torch.float32], "out")


def test_reconstruct_mixed_dtypes_fp32_stream_bf16_cache():
    """bf16 cache (R, dR) added onto an fp32 stream x with an fp32 gate: the result is fp32."""
    g = gen(21)
    V, R, terms, dR, x = inputs((2,), 70, 200, 48, torch.bfloat16, 2, g, xdtype=torch.float32)
    gate = randn((2, 1, 200), g=g)
    kw = dict(terms=terms, weights=(1.0, 2.0), dR=dR, dr_scale=0.25, x=x, gate=gate)
    ref = reconstruct_reference(V, R, **kw)
    out = reconstruct_triton(V, R, **kw, out=poison(x.shape, torch.float32))
    assert out.dtype == torch.float32
    assert_close(out, ref, TOL[torch.float32], "out")


def test_reconstruct_gate_batch_dims_not_flattenable():
    """A gate whose batch dims cannot flatten to one stride (transposed batch): the wrapper copies it."""
    g = gen(22)
    bshape, N, D = (2, 3), 20, 72
    V, R, terms, dR, x = inputs(bshape, N, D, 16, torch.float32, 1, g)
    gate = randn((3, 2, 1, D), g=g).transpose(0, 1)  # (2, 3, 1, D), strides (D, 2D, D, 1)
    with pytest.raises(RuntimeError):
        gate.view(-1, D)
    kw = dict(terms=terms, weights=(1.0,), x=x, gate=gate)
    assert_close(reconstruct_triton(V, R, **kw), reconstruct_reference(V, R, **kw), TOL[torch.float32], "out")


def test_reconstruct_out_aliases_R():
    g = gen(23)
    V, R, terms, dR, _ = inputs((2,), 50, 100, 16, torch.float32, 2, g)
    ref = reconstruct_reference(V, R, terms=terms, weights=(1.0, 0.3), dR=dR, dr_scale=1.0)
    R2 = R.clone()
    reconstruct_triton(V, R2, terms=terms, weights=(1.0, 0.3), dR=dR, dr_scale=1.0, out=R2)
    assert_close(R2, ref, TOL[torch.float32], "R in place")


def test_reconstruct_empty_rows():
    V = basis(64, 8)
    R = torch.empty(2, 0, 64)
    out = reconstruct_triton(V, R, terms=[torch.empty(2, 0, 8)], weights=[1.0])
    assert out.shape == R.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_reconstruct_small_blocks_many_chunks(dtype):
    g = gen(24)
    V, R, terms, dR, x = inputs((3,), 45, 200, 20, dtype, 3, g)
    gate = gate_chunk((3,), 200, dtype, g, rows=False)
    kw = dict(terms=terms, weights=WEIGHTS, dR=dR, dr_scale=0.6, x=x, gate=gate)
    ref = reconstruct_reference(V, R, **kw)
    with config_override("reconstruct", BLOCK_M=16, BLOCK_D=32):
        out = reconstruct_triton(V, R, **kw)
    assert_close(out, ref, TOL[dtype], "out")


def test_reconstruct_large_k_tiled():
    g = gen(25)
    V, R, terms, dR, x = inputs((), 30, 320, 300, torch.float32, 1, g)
    kw = dict(terms=terms, weights=(1.0,), x=x)
    assert_close(reconstruct_triton(V, R, **kw), reconstruct_reference(V, R, **kw), TOL[torch.float32], "out")


@pytest.mark.parametrize("k", (16, 128))
def test_reconstruct_gpu_dot_path_fp16(k):
    """Tensor-core code path: P and V rounded to fp16 for the dot (fp32 accumulate).

    Extra error of (P V^T)_d <= 2 * 2^-11 * sum_j |P_j V_dj| <= 2^-10 * |P_row| * |V_d,:|, times
    |gate|, plus one fp16 ulp of the result."""
    g = gen(26 + k)
    V, R, terms, dR, x = inputs((2,), 70, 200, k, torch.float16, 3, g)
    gate = gate_chunk((2,), 200, torch.float16, g, rows=True)
    kw = dict(terms=terms, weights=WEIGHTS, dR=dR, dr_scale=0.6, x=x, gate=gate)
    ref = reconstruct_reference(V, R, **kw)
    with gpu_dot_path():
        out = reconstruct_triton(V, R, **kw)
    P = sum(w * t for w, t in zip(WEIGHTS, terms))
    bound = 2.0 ** -10 * P.norm(dim=-1).max() * V.float().norm(dim=-1).max() * gate.float().abs().max()
    assert_close(out, ref, 1.0, "out", scale=bound + 2.0 ** -10 * ref.float().abs().max())
