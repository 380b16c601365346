"""Forecast gains fitted at calibration."""
import pytest
import torch

import svdcache
from svdcache.basis import FeatureBasis
from svdcache.calibration import fit_gains
from flux_helpers import run_pipe


def _traj(fn, steps=20, rows=6, D=8, k=3):
    g = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0].float()
    A, B, C = (torch.randn(rows, k, generator=g) for _ in range(3))
    traj = {i: fn(float(i), A, B, C) @ V[:, :k].T for i in range(steps)}
    return {("cond", "f"): traj}, {"f": FeatureBasis(V=V, sigma=torch.ones(D), k=k)}


def test_polynomial_trajectories_get_unit_gain_at_their_order():
    # a feature moving linearly in the principal subspace: order-1 extrapolation is exact
    samples, feats = _traj(lambda t, A, B, C: A + B * t)
    g = fit_gains(samples, feats, warmup=2, intervals=[3, 5], orders=(1, 2))["f"]
    assert g["o1_N3_w2"] == pytest.approx(1.0, abs=1e-4) and g["o1_N5_w2"] == pytest.approx(1.0, abs=1e-4)
    # quadratic: order 2 (Newton through the last three full steps; warm-up 3 gives three from the
    # first cached step on) is exact; order 1 lags
    samples, feats = _traj(lambda t, A, B, C: A + B * t + 0.3 * C * t * t)
    g = fit_gains(samples, feats, warmup=3, intervals=[3, 5], orders=(1, 2))["f"]
    assert g["o2_N3_w3"] == pytest.approx(1.0, abs=1e-4) and g["o2_N5_w3"] == pytest.approx(1.0, abs=1e-4)
    assert g["o1_N5_w3"] > 1.05  # extrapolating a convex path linearly falls short: the fit scales it up


def test_oscillation_gets_a_small_gain():
    samples, feats = _traj(lambda t, A, B, C: A + B * (1 if int(t) % 2 else -1))
    g = fit_gains(samples, feats, warmup=2, intervals=[3], orders=(1,))["f"]
    assert g["o1_N3_w2"] < 0.5


def test_calibrate_stores_gains_and_enable_uses_them(tiny_pipe):
    basis = svdcache.calibrate(tiny_pipe, choose=False, prompt="a handwritten digit three", num_inference_steps=12,
                               height=32, width=32, max_sequence_length=16, output_type="pt", progress=False)
    table = basis.meta["gains"]
    assert set(table) == set(basis.features)
    assert all(0.0 <= v <= 2.0 for t in table.values() for v in t.values())
    ref = run_pipe(tiny_pipe, steps=12)
    svdcache.enable(tiny_pipe, basis=basis, interval=4, warmup=3, order=1, subspace="feature")
    plain = run_pipe(tiny_pipe, steps=12)
    svdcache.enable(tiny_pipe, basis=basis, interval=4, warmup=3, order=1, fitted_gains=True, subspace="feature")
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    assert hook.store.gains == {n: table[n]["o1_N4_w3"] for n in basis.features}
    fitted = run_pipe(tiny_pipe, steps=12)
    svdcache.enable(tiny_pipe, basis=basis, interval=4, warmup=3, order=1, fitted_gains=True, subspace="change")
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    assert hook.store.gains == {n: table[n]["change/o1_N4_w3"] for n in basis.features}
    svdcache.disable(tiny_pipe)
    assert not torch.equal(fitted, plain)
    assert float((fitted - ref).norm()) < 1.5 * float((plain - ref).norm())
    with pytest.warns(UserWarning, match="no fitted gains"):
        svdcache.enable(tiny_pipe, basis=basis, interval=4, warmup=1, fitted_gains=True)
    svdcache.disable(tiny_pipe)
