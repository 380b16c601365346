"""The int8/int4 residual cache's cached step through the fused reconstruct (codes and scales read by
the op): the same forecast as the unfused path it replaced (dequantize_rows -> an fp dR in the
feature's dtype -> reconstruct), on the reference backend (CPU fallback) and the Triton kernel
(interpreter), and on the kernel path one launch per forecast with no full-size tensor formed."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import svdcache_kernels as K
from svdcache.config import SVDCacheConfig
from svdcache.features import make_feature_cache, newton_weights
from svdcache.features import QuantizedResidualCache
from svdcache_kernels import dequantize_codes as dequantize_rows
from svdcache_kernels.ops.reconstruct import kernel as rec_kernel

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _cache(residual, dtype, backend, D=45, k=6, g=None):
    V = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0].to(dtype)
    cfg = SVDCacheConfig(residual=residual, tau=None, rank=k, backend=backend)
    q = make_feature_cache("f", cfg, V)
    assert isinstance(q, QuantizedResidualCache)
    for t in (0.0, 3.0):
        q.update((torch.randn(2, 9, D, generator=g) + t).to(dtype), t)
    assert q.rq is not None
    return q


def _old_forecast(q, t, x=None, gate=None):
    """QuantizedResidualCache.forecast as it was before the fused op."""
    s = t - q.times[-1]
    w = newton_weights(s, q.times, q.n, q.cfg.order, q.gain)
    dR = dequantize_rows(q.rq, q.rs, q.R.shape[-1], q.bits).to(q.R.dtype)
    return K.reconstruct_reference(q.V, q.R, terms=[q.D1, q.D2][: len(w)], weights=w, dR=dR, dr_scale=s * q.gain,
                                   x=x, gate=gate)


def _close(got, want, dtype, q, s):
    assert got.dtype == want.dtype and got.shape == want.shape
    err = float((got.double() - want.double()).abs().max())
    # 16-bit: the old path also rounded dR to the feature's dtype (half an ulp of |dR| <= 127 scale)
    extra = 0.0 if dtype == torch.float32 else abs(s) * 127 * float(q.rs.max()) * 2.0 ** -8
    assert err <= TOL[dtype] * float(want.double().abs().max()) + extra, err


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual", ["int8", "int4"])
def test_forecast_same_as_unfused_path(residual, dtype, backend):
    g = torch.Generator().manual_seed(hash((residual, str(dtype), backend)) % 1000)
    q = _cache(residual, dtype, backend, g=g)
    D = q.R.shape[-1]
    x = (torch.randn(2, 9, D, generator=g) * 3).to(dtype)
    gate = torch.randn(2, 6 * D, generator=g).to(dtype)[:, 2 * D:3 * D]  # a FLUX-style chunk, (B, D)
    for t in (4.0, 6.5):  # two cached steps: the second takes the plan's no-check path
        want = _old_forecast(q, t, x, gate)
        xk = x.clone()
        got = q.forecast(t, x=xk, gate=gate, out=xk)
        assert got is xk
        _close(xk, want, dtype, q, t - 3.0)
    _close(q.forecast(5.0), _old_forecast(q, 5.0), dtype, q, 2.0)  # F_hat alone


def test_kernel_path_one_launch_no_full_size_tensor(monkeypatch):
    """What a GPU runs per cached feature: one reconstruct launch, and no torch op that makes a tensor
    of the feature's size (the old path formed the fp dR with several ops)."""
    g = torch.Generator().manual_seed(5)
    q = _cache("int4", torch.float32, "triton", g=g)
    D = q.R.shape[-1]
    x = torch.randn(2, 9, D, generator=g)
    gate = torch.randn(2, 1, D, generator=g)
    q.forecast(4.0, x=x, gate=gate, out=x)  # first call: builds the plan
    launches = []
    # the launch is recorded, not run: the interpreter itself runs torch ops, a GPU launch does not
    monkeypatch.setattr(rec_kernel, "launch", lambda kernel, grid, args, meta, cfg: launches.append(meta["DR_BITS"]))

    class Ops(TorchDispatchMode):
        big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            r = func(*args, **(kwargs or {}))
            if isinstance(r, torch.Tensor) and r.numel() >= q.R.numel() // 2:
                self.big.append(str(func))
            return r

    with Ops() as ops:
        q.forecast(5.0, x=x, gate=gate, out=x)
    assert launches == [4]
    assert ops.big == []
