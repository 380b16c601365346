"""Forecast policies: one file each, every one behind the feature-cache interface of :mod:`.base`.

:data:`POLICIES` is the registry: the first policy whose ``applies(cfg, bits)`` is true serves a feature.
A new policy is one file here and one line in that list (plus the config value that selects it).
"""
from __future__ import annotations

from .base import FeatureCache, nbytes_of, newton_weights
from .full_space import FullSpaceCache
from .hermite import HermiteFullSpaceCache, HermiteQuantizedCache, HermiteSubspaceCache
from .quantized import QuantizedResidualCache, plan_for_budget
from .subspace import SubspaceCache

#: in order of precedence
POLICIES: list[type[FeatureCache]] = [
    HermiteFullSpaceCache, HermiteQuantizedCache, HermiteSubspaceCache,  # predictor="hermite" (HiCache's weights)
    FullSpaceCache,  # space="full": FORA / TaylorSeer
    QuantizedResidualCache,  # space="svd", residual int8 / int4 (or residual bits from a memory budget)
    SubspaceCache,  # space="svd", every other predictor / residual form
]


def make_feature_cache(name: str, cfg, V, gain: float | None = None, bits: int | None = None, *,
                       plans: dict | None = None, relative: bool = False) -> FeatureCache:
    """The cache of feature ``name`` under ``cfg``: ``V`` its basis (D, k) (None in full space), ``gain`` its
    fitted gain, ``bits`` its residual bits where a memory budget chose them, ``plans`` the prepared kernel
    calls it shares with the feature's caches of other generations, ``relative``: it holds the difference
    to the conditional branch's feature (svdcache.runtime.guidance)."""
    cfg = cfg.resolve()
    for policy in POLICIES:
        if policy.applies(cfg, bits):
            if policy.needs_basis and V is None:
                raise ValueError(f"feature {name!r} has no basis")
            fc = policy.create(name, cfg, V, gain, bits)
            if plans is not None:
                fc.plans = plans
            fc.relative = relative
            return fc
    raise ValueError(f"no forecast policy serves feature {name!r} under {cfg.label}")


__all__ = ["FeatureCache", "FullSpaceCache", "HermiteFullSpaceCache", "HermiteQuantizedCache", "HermiteSubspaceCache", "POLICIES", "QuantizedResidualCache", "SubspaceCache",
           "make_feature_cache", "nbytes_of", "newton_weights", "plan_for_budget"]
