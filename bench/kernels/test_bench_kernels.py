"""pytest-benchmark microbenchmarks: reference op vs Triton kernel, per op and shape.

    pytest bench/kernels --benchmark-only                     # add --benchmark-json=out.json to keep them

On a GPU: FLUX shapes (B=1, N = 4096 + 512, D = 3072, bf16, k in {64, 128, 256}); each call is
followed by a synchronize so the timer sees the kernel. On CPU: small shapes, kernel under the
Triton interpreter (its times measure the interpreter, not the kernel).
Timings only: nothing is asserted about speed.
"""
from __future__ import annotations

import pytest
import torch

from svdcache_kernels import gram_update, gram_update_reference, reconstruct, reconstruct_reference, split, split_reference

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DT = torch.bfloat16
if CUDA:
    B, N, D, KS = 1, 4096 + 512, 3072, (64, 128, 256)
else:
    B, N, D, KS = 1, 1024, 512, (16, 64)

IMPLS = {
    "split": {"reference": split_reference, "kernel": lambda *a, **kw: split(*a, backend="triton", **kw)},
    "reconstruct": {"reference": reconstruct_reference, "kernel": lambda *a, **kw: reconstruct(*a, backend="triton", **kw)},
    "gram": {"reference": gram_update_reference, "kernel": lambda *a, **kw: gram_update(*a, backend="triton", **kw)},
}


@pytest.fixture(autouse=True)
def _cpu_threads():
    """CPU: one torch thread (on a busy 2-core machine, intra-op threads only contend)."""
    if CUDA:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rnd(*shape, dtype=torch.float32, g):
    return (torch.randn(*shape, generator=g, device=DEV) + 0.25).to(dtype)


def _run(benchmark, fn, *a, **kw):
    def call():
        fn(*a, **kw)
        if CUDA:
            torch.cuda.synchronize()

    call()  # compile (GPU) / warm up
    if CUDA:
        benchmark.pedantic(call, rounds=50, iterations=1, warmup_rounds=5)
    else:
        benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("variant", ["C,R", "order2+E+dR"])
def test_split(benchmark, impl, k, variant):
    g = torch.Generator(device=DEV).manual_seed(0)
    F = _rnd(B, N, D, dtype=DT, g=g)
    V = torch.linalg.qr(torch.randn(D, k, generator=g, device=DEV))[0].to(DT)
    cs = (B, N, k)
    st = dict(C=_rnd(*cs, g=g), R=_rnd(B, N, D, dtype=DT, g=g))
    kw = dict(order=0)
    if variant != "C,R":
        st.update(D1=_rnd(*cs, g=g), D2=_rnd(*cs, g=g), E=_rnd(*cs, g=g), dR=_rnd(B, N, D, dtype=DT, g=g))
        kw = dict(order=2, h1=1.0, h2=2.0, beta=0.9)
    benchmark.group = f"split {variant} k={k}"
    _run(benchmark, IMPLS["split"][impl], F, V, **st, **kw)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("variant", ["taylor2+dR gated in place", "reuse", "taylor1+int4 dR gated in place"])
def test_reconstruct(benchmark, impl, k, variant):
    g = torch.Generator(device=DEV).manual_seed(1)
    V = torch.linalg.qr(torch.randn(D, k, generator=g, device=DEV))[0].to(DT)
    R = _rnd(B, N, D, dtype=DT, g=g)
    if variant == "reuse":
        kw = dict(terms=[_rnd(B, N, k, g=g)], weights=(1.0,), out=torch.empty_like(R))
    elif "int4" in variant:  # the default cached step: 4-bit codes (two per byte) + one fp32 scale per token
        x = _rnd(B, N, D, dtype=DT, g=g)
        gate = _rnd(B, 6 * D, dtype=DT, g=g)[:, 2 * D:3 * D].unsqueeze(1)
        codes = torch.randint(0, 256, (B, N, (D + 1) // 2), generator=g, device=DEV, dtype=torch.uint8)
        scales = torch.rand(B, N, 1, generator=g, device=DEV) * 0.1
        kw = dict(terms=[_rnd(B, N, k, g=g)], weights=(1.5,), dr_scale=1.5, dR_codes=codes, dR_scales=scales,
                  dR_bits=4, x=x, gate=gate, out=x)
    else:
        x = _rnd(B, N, D, dtype=DT, g=g)
        gate = _rnd(B, 6 * D, dtype=DT, g=g)[:, 2 * D:3 * D].unsqueeze(1)
        kw = dict(terms=[_rnd(B, N, k, g=g) for _ in range(3)], weights=(1.0, 1.5, 1.125),
                  dR=_rnd(B, N, D, dtype=DT, g=g), dr_scale=0.5, x=x, gate=gate, out=x)
    benchmark.group = f"reconstruct {variant} k={k}"
    _run(benchmark, IMPLS["reconstruct"][impl], V, R, **kw)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_gram(benchmark, impl):
    g = torch.Generator(device=DEV).manual_seed(2)
    F = _rnd(B, N, D, dtype=DT, g=g)
    G = torch.zeros(D, D, device=DEV)
    benchmark.group = "gram"
    _run(benchmark, IMPLS["gram"][impl], G, F)
