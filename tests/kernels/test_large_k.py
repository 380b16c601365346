"""Kernels for every rank k up to D (tiled over k above one 256-wide register tile), under the interpreter.

k > 256 used to leave the kernels for the fp32 reference ops. Here the Triton path runs at D = 320,
k up to D and odd shapes, every dtype, into poisoned outputs; the kernel launches are counted (no
reference op stands in) and the run must be warning-free. Forced small k tiles and D splits exercise
several k tiles, the split's second (residual) kernel and the reconstruct's 2-D grid.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from kernel_testutils import DTYPES, TOL, assert_close, basis, dname, gen, gpu_dot_path, poison, randn
from svdcache_kernels import reconstruct, reconstruct_reference, split
from svdcache_kernels.ops._triton_common import config_override
from svdcache_kernels.ops.reconstruct import kernel as rec_kernel
from svdcache_kernels.ops.split import kernel as split_kernel
from test_split_kernel import both, compare, full_states


@pytest.fixture
def launches(monkeypatch):
    """Kernel launches by name; warnings are errors (the large-k path must be warning-free)."""
    seen = []
    for mod in (rec_kernel, split_kernel):
        real = mod.launch

        def counting(kernel, grid, args, meta, cfg, _real=real):
            seen.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), grid))
            return _real(kernel, grid, args, meta, cfg)

        monkeypatch.setattr(mod, "launch", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield seen


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("k", (300, 320))
def test_split_large_k_all_outputs(dtype, k, launches):
    """Order 2 + EMA + residual + dR at k > 256: split kernel (tiled k) + residual kernel."""
    bshape, N, D = (2,), 37, 320
    g = gen(1000 + k)
    F = randn((*bshape, N, D), dtype, g=g, scale=2.0)
    V = basis(D, k, g=g)
    st = full_states(bshape, N, D, k, dtype, g)
    ref, ker = both(F, V, st, order=2, h1=0.75, h2=2.0, beta=0.8)
    compare(ref, ker, dtype)
    names = [n for n, _ in launches]
    assert names == ["_split_kernel", "_residual_kernel"], names


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_split_large_k_previous_feature_poisoned(dtype, launches):
    """The runtime's default full step, D1 = (F - F_prev) V / h1, at k = 300 into a poisoned D1."""
    bshape, N, D, k = (3,), 21, 320, 300
    g = gen(7)
    F, Fp = randn((*bshape, N, D), dtype, g=g), randn((*bshape, N, D), dtype, g=g)
    V = basis(D, k, g=g)
    st = {"D1": poison((*bshape, N, k), torch.float32)}
    ref, ker = both(F, V, st, order=1, h1=0.5, F_prev=Fp)
    compare(ref, ker, dtype)
    assert [n for n, _ in launches] == ["_split_kernel"]


def test_split_small_k_tiles_and_residual_in_place(launches):
    """Forced 16-wide k tiles at k = 40: 3 tiles, residual written over F itself."""
    g = gen(8)
    F, V = randn((2, 45, 136), g=g), basis(136, 40, g=g)
    C_ref, R_ref = torch.empty(2, 45, 40), torch.empty(2, 45, 136)
    from svdcache_kernels import split_reference

    split_reference(F, V, C=C_ref, R=R_ref)
    C = poison((2, 45, 40), torch.float32)
    F2 = F.clone()
    with config_override("split", BLOCK_K=16, BLOCK_M=16, BLOCK_D=32):
        split(F2, V, C=C, R=F2, backend="triton")
    assert_close(C, C_ref, TOL[torch.float32], "C")
    assert_close(F2, R_ref, TOL[torch.float32], "R (in place)", scale=F.abs().max())
    assert launches[0][1][0] == 3  # k tiles in the grid


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("n_terms", [1, 3])
def test_reconstruct_large_k_gated(dtype, n_terms, launches):
    """The cached step at k = 300 (D = 320): terms, gated add into a poisoned out."""
    bshape, N, D, k = (2,), 29, 320, 300
    g = gen(20 + n_terms)
    V = basis(D, k, g=g)
    R = randn((*bshape, N, D), dtype, g=g)
    terms = [randn((*bshape, N, k), g=g, scale=3.0) for _ in range(n_terms)]
    x = randn((*bshape, N, D), dtype, g=g, scale=4.0)
    gate = randn((*bshape, 6 * D), dtype, g=g).chunk(6, dim=-1)[2]
    w = (1.0, 1.7, -0.45)[:n_terms]
    ref = reconstruct_reference(V, R, terms=terms, weights=w, x=x, gate=gate)
    out = poison(R.shape, dtype)
    res = reconstruct(V, R, terms=terms, weights=w, x=x, gate=gate, out=out, backend="triton")
    assert res is out
    assert_close(out, ref, TOL[dtype], "out")
    assert [n for n, _ in launches] == ["_reconstruct_kernel"]


def test_reconstruct_k_equals_d_split_grid(launches):
    """k = D = 320 with forced 32-wide k tiles and a D split across programs (2-D grid)."""
    g = gen(31)
    N, D = 50, 320
    V = basis(D, D, g=g)
    R = randn((N, D), g=g)
    terms = [randn((N, D), g=g), randn((N, D), g=g)]
    dR = randn((N, D), g=g, scale=0.3)
    kw = dict(terms=terms, weights=(1.0, 0.5), dR=dR, dr_scale=0.5)
    ref = reconstruct_reference(V, R, **kw)
    with config_override("reconstruct", BLOCK_K=32, BLOCK_D=32, BLOCK_M=16, D_SPLITS=3):
        out = reconstruct(V, R, **kw, out=poison(R.shape, torch.float32), backend="triton")
    assert_close(out, ref, TOL[torch.float32], "out")
    _, grid = launches[0]
    assert grid[1] == 3, grid


def test_reconstruct_large_k_gpu_dot_path_fp16(launches):
    """k-tiled tensor-core path (P slices rounded to fp16 per tile): bound as in the k <= 256 test."""
    g = gen(40)
    N, D, k = 40, 320, 300
    V = basis(D, k, g=g)
    R = randn((2, N, D), torch.float16, g=g)
    terms = [randn((2, N, k), g=g, scale=3.0)]
    x = randn((2, N, D), torch.float16, g=g)
    gate = randn((2, 1, D), torch.float16, g=g)
    kw = dict(terms=terms, weights=(0.7,), x=x, gate=gate)
    ref = reconstruct_reference(V, R, **kw)
    with gpu_dot_path():
        out = reconstruct(V, R, **kw, backend="triton")
    P = 0.7 * terms[0]
    bound = 2.0 ** -10 * P.norm(dim=-1).max() * V.float().norm(dim=-1).max() * gate.float().abs().max()
    assert_close(out, ref, 1.0, "out", scale=bound + 2.0 ** -10 * ref.float().abs().max())
