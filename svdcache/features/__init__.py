"""Forecast policies: one file each, every one behind the feature-cache interface of :mod:`.base`.

:data:`POLICIES` is the registry: the first policy whose ``applies(cfg, bits)`` is true serves a feature.
A new policy is one file here and one line in that list (plus the config value that selects it).
"""
from __future__ import annotations

from .base import FeatureCache, nbytes_of, newton_weights
from .full_space import FullSpaceCache
from .quantized import QuantizedResidualCache, plan_for_budget
from .subspace import SubspaceCache

#: in order of precedence
POLICIES: list[type[FeatureCache]] = [
    FullSpaceCache,  # space="full": FORA / TaylorSeer
    QuantizedResidualCache,  # space="svd", residual int8 / int4 (or residual bits from a memory budget)
    SubspaceCache,  # space="svd", every other predictor / residual form
]


def make_feature_cache(name: str, cfg, V, gain: float | None = None, bits: int | None = None) -> FeatureCache:
    """The cache of feature ``name`` under ``cfg``: ``V`` its basis (D, k) (None in full space), ``gain`` its
    fitted gain, ``bits`` its residual bits where a memory budget chose them."""
    for policy in POLICIES:
        if policy.applies(cfg, bits):
            if policy.needs_basis and V is None:
                raise ValueError(f"feature {name!r} has no basis")
            return policy.create(name, cfg, V, gain, bits)
    raise ValueError(f"no forecast policy serves feature {name!r} under {cfg.label}")


__all__ = ["FeatureCache", "FullSpaceCache", "POLICIES", "QuantizedResidualCache", "SubspaceCache",
           "make_feature_cache", "nbytes_of", "newton_weights", "plan_for_budget"]
