"""Parity of the Gram accumulation kernel (Triton interpreter) against gram_update_reference."""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import DTYPES, TOL, assert_close, dname, gen, gpu_dot_path, randn
from svdcache_kernels import basis_from_gram, gram_update, gram_update_reference
from svdcache_kernels.ops._triton_common import config_override


def gram_triton(G, F):
    return gram_update(G, F, backend="triton")


# fp32 tolerance for every dtype: 16-bit products are exact in fp32, both sides accumulate in fp32.
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("shape", [((2,), 100, 200), ((2, 3), 33, 136), ((), 130, 300), ((), 5, 72)],
                         ids=lambda s: f"b{len(s[0])}-N{s[1]}-D{s[2]}")
def test_gram_streaming(dtype, shape):
    """Two consecutive updates onto a random, non-symmetric G (both triangles must be updated)."""
    bshape, N, D = shape
    g = gen(N + D)
    G0 = randn((D, D), g=g, scale=5.0)
    Gr, Gk = G0.clone(), G0.clone()
    for _ in range(2):
        F = randn((*bshape, N, D), dtype, g=g, scale=2.0)
        gram_update_reference(Gr, F)
        assert gram_triton(Gk, F) is Gk
    assert_close(Gk, Gr, TOL[torch.float32], "G")


def test_gram_small_blocks():
    g = gen(2)
    F = randn((3, 45, 100), torch.bfloat16, g=g)
    G0 = randn((100, 100), g=g)
    with config_override("gram", BLOCK_D=32, BLOCK_R=16):
        Gk = gram_triton(G0.clone(), F)
    assert_close(Gk, gram_update_reference(G0.clone(), F), TOL[torch.float32], "G")


def test_gram_gpu_dot_path_fp16_exact_products():
    g = gen(3)
    F = randn((2, 70, 136), torch.float16, g=g, scale=3.0)
    G0 = torch.zeros(136, 136)
    with gpu_dot_path():
        Gk = gram_triton(G0.clone(), F)
    assert_close(Gk, gram_update_reference(G0.clone(), F), TOL[torch.float32], "G")


def test_gram_empty_rows_is_noop():
    G = randn((64, 64))
    G0 = G.clone()
    gram_triton(G, torch.empty(0, 64))
    assert torch.equal(G, G0)


def test_gram_to_basis_recovers_subspace():
    """End to end: features of rank 5 + small noise; the kernel's Gram gives back their subspace."""
    g = gen(4)
    D, k = 96, 5
    Q, _ = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))
    F = (torch.randn(300, k, generator=g, dtype=torch.float64) * 10) @ Q.T
    F = (F + 0.01 * torch.randn(300, D, generator=g, dtype=torch.float64)).float()
    G = gram_triton(torch.zeros(D, D), F)
    V, sigma, kk = basis_from_gram(G, tau=0.99)
    assert kk == k
    cos = torch.linalg.svdvals(V[:, :k].double().T @ Q)  # principal-angle cosines
    assert cos.min() > 0.999
