"""SVD-Cache under diffusers' context / tensor parallelism: the few collectives the cache needs.

Design (see README "Multi-GPU"):

- The caches stay shard-local. SVD-Cache's projection acts token by token, so under context
  parallelism (the sequence split across ranks) each rank caches its own tokens and nothing is
  exchanged on any step. Under tensor parallelism the cached features (outputs of the row-parallel
  linears) are replicated: each rank holds the whole cache, still with no exchange.
- Every decision is the same on every rank by construction: the schedule is a function of the step
  index; the non-finite check reads the model's *output*, which every diffusers parallel plan
  all-gathers (``proj_out``) before the model returns, so all ranks test the same tensor and fall
  back together (measured: a fallback taken by one rank alone desynchronises diffusers' collectives).
- What depends on data is agreed once, outside the step path: the zero-setup basis is built from
  the all-reduced Gram of the collected rows (one all-reduce per feature, at the step it is built),
  calibration all-reduces its Gram matrices before the eigh and gathers its sampled rows once,
  and ``svdcache.stats(pipe, all_ranks=True)`` all-gathers the statistics when asked.

The process group is the model's own: the mesh of the parallel config diffusers stores on the
model (``model._parallel_config``). A model that is not parallelised, even in an initialised
process group (data parallelism: every rank its own prompts), builds everything locally.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .stats import CacheStats


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@dataclass(frozen=True)
class ParallelInfo:
    """How a model is parallelised: ``kind`` "context" (rows sharded over ``size`` ranks) or "tensor"
    (features replicated), the process group of its mesh and this rank's index in it."""

    kind: str
    group: object
    rank: int
    size: int

    @property
    def shards(self) -> int:
        """Into how many pieces a cached feature's rows are split (1: every rank holds them all)."""
        return self.size if self.kind == "context" else 1


def parallel_info(model) -> ParallelInfo | None:
    """The model's parallel layout, or None (not parallelised, or no process group)."""
    dist = _dist()
    pc = getattr(model, "_parallel_config", None)
    if dist is None or pc is None:
        return None
    cp = getattr(pc, "context_parallel_config", None)
    tp = getattr(pc, "tensor_parallel_config", None)
    if cp is not None and getattr(cp, "_flattened_mesh", None) is not None:
        mesh, kind = cp._flattened_mesh, "context"
    elif tp is not None and getattr(tp, "_mesh", None) is not None:
        mesh, kind = tp._mesh, "tensor"
    else:
        return None
    group = mesh.get_group()
    return ParallelInfo(kind, group, dist.get_rank(group), dist.get_world_size(group))


def check_parallel_model(model) -> None:
    """One-line errors for layouts the cache cannot serve (raised by ``enable`` before any work)."""
    pc = getattr(model, "_parallel_config", None)
    if pc is None:
        return
    cp = getattr(pc, "context_parallel_config", None)
    if cp is not None:
        plan = getattr(model, "_cp_plan", None) or {}
        from diffusers.models._modeling_parallel import ContextParallelOutput

        def gathers(v):
            return isinstance(v, ContextParallelOutput) or (
                isinstance(v, (list, tuple)) and any(isinstance(x, ContextParallelOutput) for x in v))

        if plan and not any(gathers(v) for v in plan.values()):
            raise ValueError(f"svdcache: {type(model).__name__}'s context-parallel plan gathers no output, so ranks "
                             "could take different fallback decisions; use a plan that gathers the output (proj_out)")


def all_reduce_(t: torch.Tensor, info: ParallelInfo | None) -> torch.Tensor:
    """Sum ``t`` in place over the model's ranks (no-op when not parallelised)."""
    if info is not None and info.size > 1:
        _dist().all_reduce(t, group=info.group)
    return t


def all_reduce_dict_(tensors: dict[str, torch.Tensor], info: ParallelInfo | None) -> None:
    """Sum every tensor of a dict in place over the model's ranks (one all-reduce per tensor, in
    sorted key order, so no buffer of all of them at once). The key sets must agree; they are
    checked first (one small all-gather), since a rank with a different set would pair the wrong
    tensors or wait forever."""
    if info is None or info.size <= 1 or not tensors:
        return
    dist = _dist()
    keys = sorted(tensors)
    shapes = [(k, tuple(tensors[k].shape), str(tensors[k].dtype)) for k in keys]
    seen = [None] * info.size
    dist.all_gather_object(seen, shapes, group=info.group)
    if any(s != shapes for s in seen):
        bad = next(r for r, s in enumerate(seen) if s != shapes)
        raise RuntimeError(f"svdcache: rank {bad} recorded different features than rank {info.rank}; "
                           "every rank must run the same generation")
    for k in keys:
        dist.all_reduce(tensors[k], group=info.group)


def all_gather_object(obj, info: ParallelInfo | None) -> list:
    """Every rank's ``obj`` (rank order); [obj] when not parallelised."""
    if info is None or info.size <= 1:
        return [obj]
    out = [None] * info.size
    _dist().all_gather_object(out, obj, group=info.group)
    return out


def merge_samples(per_rank: list[dict]) -> dict:
    """Calibration's sampled rows of every rank, concatenated per (context, feature, step)."""
    merged: dict = {}
    for samples in per_rank:
        for key, traj in samples.items():
            m = merged.setdefault(key, {})
            for step, X in traj.items():
                m.setdefault(step, []).append(X)
    return {key: {s: torch.cat(xs) for s, xs in traj.items() if len(xs) == len(per_rank)}
            for key, traj in merged.items()}


@dataclass
class ParallelCacheStats:
    """``svdcache.stats(pipe, all_ranks=True)``: this rank's :class:`CacheStats` (its attributes are
    readable here directly) and every rank's, with the cache memory per rank and in total."""

    local: CacheStats
    per_rank: list[CacheStats] = field(default_factory=list)
    kind: str = "none"  # "context", "tensor", "data" (an initialised group, model not parallelised), "none"

    def __getattr__(self, name):
        if name in ("local", "per_rank", "kind"):
            raise AttributeError(name)
        return getattr(self.local, name)

    @property
    def world_size(self) -> int:
        return len(self.per_rank)

    @property
    def cache_bytes_per_rank(self) -> list[int]:
        return [s.last_generation.cache_bytes for s in self.per_rank]

    @property
    def cache_bytes_total(self) -> int:
        return sum(self.cache_bytes_per_rank)

    @property
    def identical_schedules(self) -> bool:
        """Every rank computed and forecast the same number of steps (a divergence would be a bug)."""
        g = [(s.total.full_steps, s.total.cached_steps, s.total.fallbacks) for s in self.per_rank]
        return all(x == g[0] for x in g)

    def __str__(self) -> str:
        mib = [b / 2**20 for b in self.cache_bytes_per_rank]
        lines = [str(self.local).replace("SVD-Cache stats", f"SVD-Cache stats, rank {self._rank()}", 1),
                 f"  {self.world_size} ranks ({self.kind} parallel): cache memory per rank "
                 + ", ".join(f"{m:.2f}" for m in mib) + f" MiB; total {sum(mib):.2f} MiB",
                 f"  same steps computed on every rank: {self.identical_schedules}"]
        return "\n".join(lines)

    def _rank(self) -> int:
        return next((i for i, s in enumerate(self.per_rank) if s is self.local), 0)


def gather_stats(model, local: CacheStats) -> ParallelCacheStats:
    """All-gather every rank's statistics (one collective) over the model's group, or over the
    default group when the model is not parallelised but a process group exists."""
    info = parallel_info(model)
    dist = _dist()
    if info is None and dist is not None and dist.get_world_size() > 1:
        info, kind = ParallelInfo("data", None, dist.get_rank(), dist.get_world_size()), "data"
    else:
        kind = info.kind if info is not None else "none"
    per_rank = all_gather_object(local, info)
    if info is not None and info.size > 1:
        per_rank[info.rank] = local
    return ParallelCacheStats(local=local, per_rank=per_rank, kind=kind)


def parallel_of(model):
    """A callable returning ``parallel_info(model)`` now (parallelism may be enabled after the
    cache), holding the model by a weak reference."""
    import weakref

    ref = weakref.ref(model)

    def info():
        m = ref()
        return None if m is None else parallel_info(m)

    return info


def plain_feature(name: str, F: torch.Tensor) -> torch.Tensor:
    """A cached feature as a plain tensor. Under tensor parallelism diffusers' row-parallel linears
    return their all-reduced output as an AsyncCollectiveTensor (waited for here: the model would
    wait for it at its next use anyway) and may return DTensors: a replicated one is used as its
    local (full) tensor; a sharded one is refused, since caching it would need communication."""
    if type(F) is torch.Tensor:
        return F
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    if isinstance(F, AsyncCollectiveTensor):
        F = F.trigger_wait()
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return F
    if isinstance(F, DTensor):
        if not all(p.is_replicate() for p in F.placements):
            raise ValueError(f"svdcache: feature {name!r} is sharded across ranks ({F.placements}); only replicated "
                             "(tensor parallel) or sequence-sharded (context parallel) features can be cached")
        F = F.to_local()
    return F


def reduce_partial(output):
    """A row-parallel linear's output under tensor parallelism is a Partial(sum) DTensor until torch's
    output hook all-reduces it. A capture point on such a linear reduces it here instead and hands
    the module's caller the replicated result, whose layout the output hook then leaves alone: the
    one all-reduce of the model, moved earlier, none added."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:
        return output
    if isinstance(output, DTensor) and any(p.is_partial() for p in output.placements):
        return output.redistribute(placements=[Replicate()] * len(output.placements))
    return output


def sees_shards(model, root_hook: str) -> bool:
    """Whether the cache's root hook receives the model's inputs already split by context
    parallelism (``enable_parallelism`` called after ``svdcache.enable``: diffusers' split hook was
    registered later, so it runs first). Decisions on the input values must then not be taken per
    rank, as each rank would judge a different shard."""
    if model is None or getattr(model, "_parallel_config", None) is None:
        return False
    reg = getattr(model, "_diffusers_hook", None)
    order = getattr(reg, "_hook_order", [])
    if root_hook not in order:
        return False
    later = order[order.index(root_hook) + 1:]
    return any(name.startswith("cp_input") for name in later)
