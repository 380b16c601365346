"""What the cache did, counted: generations, full / cached calls, FLOPs and cache memory."""
from __future__ import annotations

import torch

from .stats import CacheStats, RunStats


class Accounting:
    """The counts of one cache (all its contexts).

    FLOPs: the model's own FLOPs per kind of call (input signature, full or cached, granularity) are
    measured once with torch's FLOP counter and kept in ``table`` (the model's: a re-enable does not count
    again); a call adds its kind's count plus the cache's own op FLOPs of that call (``st.call_cache_flops``)."""

    def __init__(self, count_flops: bool, granularity: str):
        self.count_flops = count_flops
        self.granularity = granularity
        self.table: dict[tuple, int] = {}  # replaced by the model's own table (bind_model)
        self.total = RunStats()  # finished generations
        self.last = RunStats()  # the last finished generation
        self.cur = RunStats()  # the generation in progress (all contexts)
        self.generations = 0
        self.contexts: set[str] = set()  # contexts that took part in the generation in progress

    def bind_model(self, module: torch.nn.Module) -> None:
        self.table = module.__dict__.setdefault("_svdcache_flop_table", {})

    # -- generations ---------------------------------------------------------------------------------
    def finish_generation(self) -> None:
        if self.cur.calls:
            self.total.add(self.cur)
            self.last = self.cur
            self.generations += 1
        self.cur = RunStats()
        self.contexts = set()

    # -- FLOPs ---------------------------------------------------------------------------------------
    def key(self, st, mode: str | None = None) -> tuple:
        return (st.signature, mode or st.mode, self.granularity)

    @torch.compiler.disable
    def wants_count(self, st) -> bool:
        return self.count_flops and self.key(st) not in self.table

    @torch.compiler.disable
    def store_count(self, st, counted: int, torch_backend: bool) -> None:
        # cache ops that ran as PyTorch ops were seen by torch's counter too: keep only the model's own
        torch_ops = st.call_cache_flops if torch_backend else st.call_torch_flops
        self.table[self.key(st)] = counted - torch_ops

    def account(self, st) -> None:
        model = self.table.get(self.key(st), 0)
        full = self.table.get(self.key(st, "full"), 0)
        cur = self.cur
        cur.flops += model + st.call_cache_flops
        cur.cache_op_flops += st.call_cache_flops
        cur.flops_uncached += full

    # -- memory --------------------------------------------------------------------------------------
    def measure_memory(self, states) -> None:
        """The peak of what the contexts' feature caches hold (and one copy of their features)."""
        cache = feats = 0
        for s in states:
            m = s.mem
            if m is None:
                fcs = [fc for fc in s.features.values() if fc is not None]
                m = (sum(fc.nbytes() for fc in fcs), sum(fc.feature_nbytes for fc in fcs))
                if all(fc.n >= 3 for fc in fcs):  # every state allocated (D2, codes): sizes fixed from here on
                    s.mem = m
            cache += m[0]
            feats += m[1]
        if cache > self.cur.cache_bytes:
            self.cur.cache_bytes, self.cur.feature_bytes = cache, feats

    # -- the summary ---------------------------------------------------------------------------------
    def stats(self, label: str, ranks: dict, online=None, graphs=None) -> CacheStats:
        total = RunStats()
        total.add(self.total)
        total.add(self.cur)
        running = bool(self.cur.calls)
        return CacheStats(
            config=label,
            last_generation=self.cur if running else self.last,
            total=total,
            generations=self.generations + running,
            ranks=dict(ranks),
            online_basis_seconds=online.seconds if online else 0.0,
            online_basis_flops=online.flops if online else 0,
            graphs=graphs.stats.as_dict() if graphs is not None else None,
        )
