"""Zero-setup basis: built at run time from the first full steps of the first generation."""
from __future__ import annotations

import time

import torch

import svdcache_kernels as K

from ..basis import FeatureBasis


class OnlineBasisBuilder:
    """Zero-setup basis: rows of the first ``online_steps`` full steps of each feature, then a
    randomized low-rank SVD (torch.svd_lowrank) of their Gram matrix G = A^T A, whose energy
    fractions are taken against the exact total energy trace(G).

    Through the Gram the basis is a function of a sum over rows, so under context parallelism
    (rows sharded over ranks) one all-reduce of G per feature gives every rank the basis of all
    the rows, the same as one process would build; ``parallel`` (set by ``enable``) returns the
    model's :class:`svdcache.distributed.ParallelInfo` or None."""

    MAX_ROWS_PER_STEP = 2048

    def __init__(self, cfg, warn_once=None):
        self.cfg = cfg
        self.warn_once = warn_once  # (key, message): the store's, once per cache
        self.parallel = lambda: None
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.diffs: dict[str, list[torch.Tensor]] = {}  # change subspace: X_t - X_t-1 per context
        self._last: dict[tuple[str, str], torch.Tensor] = {}
        self.seconds = 0.0
        self.flops = 0
        self.built: set[str] = set()

    @property
    def done(self) -> bool:
        return bool(self.built) and not self.rows

    @torch.no_grad()
    def collect(self, name: str, F: torch.Tensor, ctx: str = "default") -> FeatureBasis | None:
        t0 = time.perf_counter()
        X = F.detach().reshape(-1, F.shape[-1])
        info = self.parallel()
        shards = info.shards if info is not None else 1
        # the row budget is per step of the whole sequence: a shard keeps its share of it
        stride = max(1, -(-X.shape[0] * shards // self.MAX_ROWS_PER_STEP))
        X = X[::stride].float()
        self.rows.setdefault(name, []).append(X)
        change = self.cfg.subspace == "change"
        if change:
            last = self._last.get((ctx, name))
            if last is not None and last.shape == X.shape:
                self.diffs.setdefault(name, []).append(X - last)
            self._last[(ctx, name)] = X
        # at most ``warmup`` steps (config doc): more would force scheduled-cached steps to run in full
        if len(self.rows[name]) < min(self.cfg.online_steps, self.cfg.warmup) or (change and name not in self.diffs) \
                or not self._finite(name, change):
            self.seconds += time.perf_counter() - t0
            return None
        A = torch.cat(self.diffs.pop(name) if change else self.rows[name])
        del self.rows[name]
        G = A.T @ A  # (D, D) fp32, the sum over rows: shards add up
        if info is not None and info.shards > 1:
            from .distributed import all_reduce_

            all_reduce_(G, info)  # the one collective of the zero-setup basis (per feature, once)
        q = max(1, min(self.cfg.online_rank, G.shape[0]))
        with torch.random.fork_rng(devices=[G.device] if G.is_cuda else []):  # leave the user's RNG alone
            torch.manual_seed(0)
            _, S, V = torch.svd_lowrank(G, q=q, niter=2)  # G symmetric PSD: S = sigma^2 of the rows
        total = float(torch.diagonal(G).double().sum())
        rest = max(total - float(S.double().sum()), 0.0)
        sigma = torch.cat([S.double().clamp_min(0).sqrt().float().cpu(), torch.tensor([rest**0.5])])
        V = V.float().cpu()
        k = max(1, min(K.rank_for_energy(sigma, self.cfg.tau) if self.cfg.tau else self.cfg.rank, q))
        D = G.shape[0]
        self.flops += 2 * A.shape[0] * D * D + 2 * D * D * q * 6  # Gram, then about 6 passes over G
        self.built.add(name)
        if A.is_cuda:
            torch.cuda.synchronize(A.device)
        self.seconds += time.perf_counter() - t0
        return FeatureBasis(V=V, sigma=sigma, k=k)

    def forget(self, name: str) -> None:
        """Drop what was collected for ``name`` (a feature no longer produced)."""
        self.rows.pop(name, None)
        self.diffs.pop(name, None)
        for key in [k for k in self._last if k[1] == name]:
            del self._last[key]

    def _finite(self, name: str, change: bool) -> bool:
        """Drop the steps whose rows (or changes) of ``name`` are not finite (a NaN / inf in a generation
        would make the SVD fail, now and in every later generation): one host read per attempt. False
        when too few are left to build from: later full steps (or generations) bring more."""
        groups = [self.rows] + ([self.diffs] if change else [])
        for g in groups:
            chunks = g[name]
            ok = torch.stack([torch.isfinite(c).all() for c in chunks]).tolist()
            if all(ok):
                continue
            if self.warn_once is not None:
                self.warn_once("online_nonfinite", f"svdcache: feature {name!r} held NaN/inf at a full step: those "
                               "steps are left out of the basis built online, which is built from finite ones (warned once)")
            kept = [c for c, good in zip(chunks, ok) if good]
            if kept:
                g[name] = kept
            else:
                del g[name]
        if len(self.rows.get(name, ())) < min(self.cfg.online_steps, self.cfg.warmup):
            return False
        return not change or name in self.diffs
