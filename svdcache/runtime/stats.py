"""What the cache did: steps computed vs forecast, FLOPs, memory, ranks."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunStats:
    """Counts over one generation (or, summed, over all of them). FLOPs are of the transformer calls:
    ``flops`` what actually ran (the cache's own matmuls included), ``flops_uncached`` the same calls
    computed in full without the cache."""

    full_steps: int = 0
    cached_steps: int = 0
    fallbacks: int = 0  # cached calls recomputed in full (non-finite forecast, missing state)
    shared_steps: int = 0  # cached unconditional calls at a full step of the conditional branch (guidance)
    flops: int = 0
    flops_uncached: int = 0
    cache_op_flops: int = 0
    cache_bytes: int = 0  # peak bytes held by the cache states (all contexts)
    feature_bytes: int = 0  # bytes of one copy of every cached feature at that peak

    def add(self, other: "RunStats") -> None:
        for k in self.__dataclass_fields__:
            if k in ("cache_bytes", "feature_bytes"):
                if other.cache_bytes > self.cache_bytes:
                    self.cache_bytes, self.feature_bytes = other.cache_bytes, other.feature_bytes
                continue
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def calls(self) -> int:
        return self.full_steps + self.cached_steps

    @property
    def flops_ratio(self) -> float:
        """Uncached / actual FLOPs: the compute speed-up."""
        return self.flops_uncached / self.flops if self.flops else float("nan")

    @property
    def memory_ratio(self) -> float:
        """Cache memory in copies of the cached features (TaylorSeer order 1 holds 2, order 2 holds 3)."""
        return self.cache_bytes / self.feature_bytes if self.feature_bytes else float("nan")


@dataclass
class CacheStats:
    """Returned by :func:`svdcache.stats`."""

    config: str
    last_generation: RunStats
    total: RunStats
    generations: int
    ranks: dict[str, int] = field(default_factory=dict)
    online_basis_seconds: float = 0.0
    online_basis_flops: int = 0
    # cuda_graphs=True on CUDA: cached calls captured / replayed / run eagerly, and why (all generations)
    graphs: dict | None = None
    # the configuration the basis's calibration chose for this interval and what it measured (svdcache.choice)
    choice: str | None = None

    def __str__(self) -> str:
        g, t = self.last_generation, self.total
        ks = list(self.ranks.values())
        if not t.calls:  # nothing ran yet: no ratios to print (they would be nan)
            return f"SVD-Cache stats ({self.config})\n  no steps yet" + (f"\n  {self.choice}" if self.choice else "")
        lines = [
            f"SVD-Cache stats ({self.config})",
            f"  last generation: {g.full_steps} full + {g.cached_steps} cached calls, FLOPs ratio "
            f"{g.flops_ratio:.2f}x ({g.flops / 1e9:.3g} vs {g.flops_uncached / 1e9:.3g} GFLOP), fallbacks {g.fallbacks}",
            f"  all {self.generations} generations: {t.full_steps} full + {t.cached_steps} cached, FLOPs ratio "
            f"{t.flops_ratio:.2f}x",
            f"  cache memory (peak, last generation): {g.cache_bytes / 2**20:.2f} MiB = {g.memory_ratio:.2f} copies "
            "of the cached features",
        ]
        if ks:
            lines.append(f"  rank k per feature: {len(ks)} features, min {min(ks)}, median {sorted(ks)[len(ks) // 2]}, max {max(ks)}")
        if self.choice:
            lines.append(f"  {self.choice}")
        if self.online_basis_seconds:
            lines.append(f"  online basis: {self.online_basis_seconds:.3f} s, {self.online_basis_flops / 1e9:.3g} GFLOP")
        if self.graphs is not None:
            gr = self.graphs
            why = ", ".join(f"{k}: {v}" for k, v in gr["refused"].items())
            lines.append(f"  CUDA graphs: {gr['captures']} captures, {gr['replays']} replays, {gr['eager']} cached "
                         f"calls eager" + (f" ({why})" if why else ""))
        return "\n".join(lines)
