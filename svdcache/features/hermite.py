"""``predictor="hermite"``: HiCache's forecast (scaled Hermite polynomials instead of Taylor's monomials).

The same state as Taylor (the last full feature and the divided differences D1 / D2, in the subspace, with a
kept residual, or in full space), other weights. HiCache forecasts F + sum_k d_k H_k(sigma s) sigma^k / k!
with d_k TaylorSeer's finite-difference derivatives, s the steps since the last full one and sigma its
scale; with H_1(y) = 2y and H_2(y) = 4y^2 - 2 that is

    w1 = 2 sigma^2 s                      (on D1 = d1; Taylor's weight at sigma = 1/sqrt(2))
    w2 = sigma^2 (2 sigma^2 s^2 - 1) * (t2 - t0) / (t2 - t1)   (on the Newton D2: d2 = D2 (t2 - t0) / (t2 - t1))

so at sigma < 1/sqrt(2) the extrapolation is damped, and the second-order term is pulled back by a
constant. One policy for every storage form: mixed into each of them below.
"""
from __future__ import annotations

from .full_space import FullSpaceCache
from .quantized import QuantizedResidualCache
from .subspace import SubspaceCache


def hermite_weights(s: float, times: list[float], n_hist: int, order: int, gain: float, sigma: float) -> list[float]:
    """Weights of (D1, D2) at offset ``s`` past the last full step (see the module docstring)."""
    w = []
    if order >= 1 and n_hist >= 2:
        w.append(gain * 2.0 * sigma * sigma * s)
        if order >= 2 and n_hist >= 3:
            span = (times[-1] - times[-3]) / (times[-1] - times[-2])
            w.append(gain * sigma * sigma * (2.0 * sigma * sigma * s * s - 1.0) * span)
    return w


class _Hermite:
    """The Hermite weights over any storage form's Taylor state."""

    @classmethod
    def applies(cls, cfg, bits) -> bool:
        return cfg.predictor == "hermite" and super().applies(cfg, bits)

    def weights(self, s: float) -> list[float]:
        return hermite_weights(s, self.times, self.n, self.cfg.order, self.gain, self.cfg.hermite_scale)

    def residual_weight(self, s: float) -> float:
        return self.gain * 2.0 * self.cfg.hermite_scale ** 2 * s


class HermiteQuantizedCache(_Hermite, QuantizedResidualCache):
    """Subspace + kept residual difference (int8 / int4), Hermite weights."""


class HermiteSubspaceCache(_Hermite, SubspaceCache):
    """Subspace (residual reused), Hermite weights."""


class HermiteFullSpaceCache(_Hermite, FullSpaceCache):
    """Full space (HiCache as published: on TaylorSeer's state)."""
