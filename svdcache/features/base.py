"""The feature-cache interface every forecast policy implements, and what they share.

A feature cache holds one cached feature's state across the full steps of a generation:

- ``update(F, t)``: a full step computed ``F`` at time ``t`` (the step index or the timestep);
- ``forecast(t, x=, gate=, out=)``: the feature at a cached step ``t`` (``x + gate * F_hat`` when ``x`` is
  given, into ``out`` if given);
- ``forecast_terms(t)``: the forecast as terms of the summed form ``F_hat = R + (sum_i w_i T_i) V^T (+ s dRq)``
  (R the anchor) that the fast paths (svdcache.fastpath) add up for many features at once, or None where
  the policy's state is not of that form;
- ``nbytes()`` / ``state_tensors()``: the memory it holds, and the states a forecast reads.

One policy a file (svdcache.features.*), registered in :data:`svdcache.features.POLICIES`.
"""
from __future__ import annotations

import torch

from ..config import POLYNOMIAL, SVDCacheConfig


def newton_weights(s: float, times: list[float], n_hist: int, order: int, gain: float) -> list[float]:
    """Weights of (D1, D2) for a forecast at offset ``s`` past the last full step.

    Newton form through the last full steps t2 > t1 > t0 (divided differences D1 = f[t1,t2],
    D2 = f[t0,t1,t2]): f(t) ~ f(t2) + D1 (t - t2) + D2 (t - t2)(t - t1). Exact for polynomials of
    the order used, whatever the spacing of the full steps.
    """
    w = []
    if order >= 1 and n_hist >= 2:
        w.append(gain * s)
        if order >= 2 and n_hist >= 3:
            w.append(gain * s * (s + (times[-1] - times[-2])))
    return w


class FeatureCache:
    """The interface (see the module docstring) and the common bookkeeping: the times of the full steps
    this feature was updated at."""

    #: it forecasts in a basis (``make_feature_cache`` refuses a feature without one)
    needs_basis = False

    @classmethod
    def applies(cls, cfg: SVDCacheConfig, bits: int | None) -> bool:
        """This policy serves features under ``cfg`` (``bits``: residual bits a memory budget chose)."""
        return False

    @classmethod
    def create(cls, name: str, cfg: SVDCacheConfig, V, gain: float | None, bits: int | None) -> "FeatureCache":
        return cls(name, cfg, gain)

    @property
    def held_dtype(self):
        """The dtype of the features it holds (None before its first update): a feature of another dtype
        starts a new history."""
        return None

    def __init__(self, name: str, cfg: SVDCacheConfig, gain: float | None = None):
        self.name = name
        self.cfg = cfg
        self.gain = cfg.gain if gain is None else gain
        self.times: list[float] = []
        self.shape: tuple | None = None
        self.device = None
        self.feature_nbytes = 0  # one copy of the feature: the unit of cache memory
        self.update_flops = self.forecast_flops = 0  # the cache's own FLOPs of the last update / forecast
        self.plans: dict = {}  # prepared kernel calls by layout; the runtime shares one dict per feature
        self.relative = False  # holds F - F_cond of the step (the unconditional branch, svdcache.guidance)

    @property
    def n(self) -> int:
        return len(self.times)

    def steps_to(self, t: float) -> tuple[float, float]:
        """(t - t_last, t - t_before_last): the step distances of an update at ``t`` (1.0 where unknown)."""
        h1 = t - self.times[-1] if self.n >= 1 else 1.0
        h2 = t - self.times[-2] if self.n >= 2 else 1.0
        if self.n >= 1 and h1 == 0:
            raise RuntimeError(f"feature {self.name!r} updated twice at the same time {t}")
        return h1, h2

    def _push_time(self, F: torch.Tensor, t: float) -> None:
        self.times = (self.times + [t])[-3:]
        self.feature_nbytes = F.numel() * F.element_size()

    @property
    def polynomial(self) -> bool:
        """Its forecast is a polynomial in the divided differences D1 / D2 (Taylor, Hermite)."""
        return self.cfg.predictor in POLYNOMIAL

    def weights(self, s: float) -> list[float]:
        """Weights of (D1, D2) for a forecast ``s`` past the last full step (Taylor: Newton form)."""
        return newton_weights(s, self.times, self.n, self.cfg.order, self.gain)

    def residual_weight(self, s: float) -> float:
        """Weight of a kept residual's first difference (``residual="int8"/"int4"``): the first-order term's."""
        return s * self.gain

    def update(self, F: torch.Tensor, t: float) -> None:
        raise NotImplementedError

    def forecast(self, t: float, *, x=None, gate=None, out=None) -> torch.Tensor:
        raise NotImplementedError

    def forecast_terms(self, t: float):
        """The forecast at ``t`` in the summed form, or None (the default: forecast one by one)."""
        return None

    def nbytes(self) -> int:
        raise NotImplementedError

    def state_tensors(self) -> list:
        """Derived states a forecast reads (checked for finiteness at full steps on a GPU)."""
        return []


def nbytes_of(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)
