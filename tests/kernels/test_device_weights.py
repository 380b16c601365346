"""Device weights: ``weights`` as one fp32 tensor and ``dr_scale`` as a one-element tensor, read by the
op when it runs (what a CUDA-graph replay of the cached step needs: svdcache.fastpath.graphs). The kernel
(interpreter), the reference op and the plans against the same call with Python floats; then the
same tensors rewritten in place and the launch repeated (a replay's view: the values are not baked
into the launch). Fresh random inputs, poisoned outputs, shapes off the block sizes, every dtype."""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import DTYPES, TOL, assert_close, basis, dname, gen, poison, randn
from svdcache_kernels import quantize_rows
from svdcache_kernels import ReconstructPlan, SumTerm, reconstruct, reconstruct_reference, reconstruct_sum
from svdcache_kernels.ops.reconstruct_sum.reference import reconstruct_stacked


def _case(bshape, N, D, k, dtype, n_terms, bits, g):
    R = randn((*bshape, N, D), dtype, g=g)
    terms = [randn((*bshape, N, k), g=g, scale=3.0) for _ in range(n_terms)]
    r = torch.randn(*bshape, N, D, generator=g) * 0.3
    codes, scales = quantize_rows(r, bits) if bits else (None, None)
    x = randn((*bshape, N, D), dtype, g=g, scale=4.0)
    gate = randn((*bshape, 6 * D), dtype, g=g).chunk(6, dim=-1)[2].unsqueeze(-2)
    return basis(D, k, g=g), R, terms, codes, scales, x, gate


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("n_terms,bits", [(1, 0), (2, 4), (3, 8), (0, 4)])
def test_reconstruct_device_weights_match_floats_and_are_read_per_run(backend, dtype, n_terms, bits):
    bshape, N, D, k = (2,), 19, 45, 7
    g = gen(700 + 10 * n_terms + bits + DTYPES.index(dtype))
    V, R, terms, codes, scales, x, gate = _case(bshape, N, D, k, dtype, n_terms, bits, g)
    q = dict(dR_codes=codes, dR_scales=scales, dR_bits=bits or 8)
    wdev = torch.empty(n_terms, dtype=torch.float32)
    sdev = torch.empty(1, dtype=torch.float32)
    plan = None
    for w, s in (((0.8, -1.3, 0.4), 1.7), ((-0.2, 2.1, 1.1), -0.6)):
        w = w[:n_terms]
        ref = reconstruct_reference(V, R, terms=terms, weights=w, dr_scale=s, x=x, gate=gate, **q)
        wdev.copy_(torch.tensor(w, dtype=torch.float32))
        sdev.fill_(s)
        out = poison(x.shape, x.dtype)
        res = reconstruct(V, R, terms=terms, weights=wdev, dr_scale=sdev, x=x, gate=gate, out=out,
                          backend=backend, **q)
        assert res is out
        assert_close(out, ref, TOL[dtype], f"{backend} device weights")
        # a plan made once, called again after the tensors were rewritten in place
        if plan is None:
            plan = ReconstructPlan(V, R, terms=terms, weights=wdev, dr_scale=sdev, x=x, gate=gate, out=out,
                                   backend=backend, **q)
        o2 = poison(x.shape, x.dtype)
        plan(V, R, terms, wdev, None, sdev, x, gate, o2, codes, scales)
        assert_close(o2, ref, TOL[dtype], f"{backend} plan, device weights")


def test_reconstruct_device_weights_no_batch_dims_in_place():
    g = gen(790)
    V, R, terms, codes, scales, x, gate = _case((), 33, 70, 5, torch.float32, 2, 0, g)
    dR = randn(R.shape, torch.float32, g=g, scale=0.3)
    ref = reconstruct_reference(V, R, terms=terms, weights=(0.5, 0.25), dR=dR, dr_scale=0.9, x=x)
    for backend in ("torch", "triton"):
        xk = x.clone()
        reconstruct(V, R, terms=terms, weights=torch.tensor([0.5, 0.25]), dR=dR, dr_scale=torch.tensor([0.9]),
                    x=xk, out=xk, backend=backend)
        assert_close(xk, ref, TOL[torch.float32], backend)


@pytest.mark.parametrize("bad", ["dtype", "dim", "scale_numel"])
def test_device_weights_bad_layout_is_one_clear_error(bad):
    g = gen(791)
    V, R, terms, *_ = _case((), 8, 16, 4, torch.float32, 2, 0, g)
    w, s = torch.tensor([0.5, 0.25]), 0.0
    if bad == "dtype":
        w = w.double()
    elif bad == "dim":
        w = w.view(1, 2)
    else:
        s = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="tensor must be"):
        reconstruct(V, R, terms=terms, weights=w, dr_scale=s, backend="torch")


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_reconstruct_sum_device_weights(backend, dtype):
    """Features sharing one weights row (a runtime's kind of state) and one with its own, rows offsets."""
    g = gen(800 + DTYPES.index(dtype))
    bshape, N, D, k = (2,), 11, 37, 6
    x = randn((*bshape, N, D), dtype, g=g, scale=2.0)
    W = torch.tensor([[0.7, -0.3, 0.0, 1.2], [1.5, 0.2, 0.0, -0.4]])  # (w0, w1, -, dr_scale) per kind
    host, dev = [], []
    for f in range(4):
        rows = 0 if f % 2 == 0 else 5
        bits = 4 if f < 2 else 0
        V, R, terms, codes, scales, _, gate = _case(bshape, N + rows, D, k, dtype, 2, bits, g)
        gate = gate[..., :D] if gate.shape[-1] != D else gate
        kd = f % 2
        host.append(SumTerm(V, R, terms, tuple(W[kd, :2].tolist()), gate, codes, scales, 4,
                            float(W[kd, 3]) if bits else 0.0, rows))
        dev.append(SumTerm(V, R, terms, W[kd, :2], gate, codes, scales, 4, W[kd, 3:4] if bits else 0.0, rows))
    ref = reconstruct_sum(x, host, backend="torch")
    out = poison(x.shape, x.dtype)
    res = reconstruct_sum(x, dev, out=out, backend=backend)
    assert res is out
    assert_close(out, ref, TOL[dtype] * 4, f"{backend} sum, device weights")


def test_reconstruct_stacked_device_weights():
    g = gen(820)
    Fn, N, D, k = 3, 9, 24, 4
    x = randn((1, N, D), torch.float32, g=g)
    R = randn((Fn, 1, N, D), torch.float32, g=g)
    T = [randn((Fn, 1, N, k), g=g) for _ in range(2)]
    G = randn((Fn, 1, 1, D), torch.float32, g=g)
    V = torch.stack([basis(D, k, g=g) for _ in range(Fn)])
    codes, scales = quantize_rows(torch.randn(Fn, 1, N, D, generator=g) * 0.2, 4)
    ref = reconstruct_stacked(x, R, T, [0.6, -0.8], G, V, codes, scales, 4, 1.3)
    wd = torch.tensor([0.6, -0.8, 1.3])
    res = reconstruct_stacked(x, R, T, [wd[0], wd[1]], G, V, codes, scales, 4, wd[2])
    assert_close(res, ref, 1e-5, "stacked, device weights")
