"""CUDA-graph capture of the cached step (``SVDCacheConfig(cuda_graphs=True)``).

A cached call is a few hundred small launches; a CUDA graph replays them all with one. What a graph
bakes in is fixed at capture: every tensor address, every launch argument. So a cached call is
graphed only where everything that changes from step to step is a tensor the graph reads:

- the model's inputs: copied into the graph's static inputs before each replay;
- the forecast weights of the step (Taylor weights, residual gain): the deferred sum's per-kind
  weights (svdcache.deferred) are read from one fp32 device tensor (device weights, see
  ``svdcache_kernels`` reconstruct), written before each replay from the host values of the step;
- the cached states: the graph reads them where they were at capture; a graph is replayed only while
  every tensor the call's deferred sum reads is where it was (address and layout, checked once per
  bound sum, i.e. once per interval) and the input layouts are the same; else it is captured again.

Graphed are cached calls whose forecasts all go through the deferred sum (FLUX-style adapters, any
predictor whose state is of the summed form); a call with another forecast (a full-space or EMA
feature, the unconditional branch's difference form), one that counts FLOPs, or one whose inputs are
not plain tensors and scalars runs eagerly, as without graphs; so does every cached call in a
process group of several ranks (a sharded call's collectives are not captured). A capture that
fails (an op that syncs the host, a library that refuses capture) turns graphs off for the model with
one warning and the call runs eagerly: never a wrong or missing output. The first cached call of an
interval always runs eagerly (it binds the sum); a context whose states move every interval (no
replay between captures) stops graphing after a few tries.

Off CUDA there are no graphs; :class:`ReplayGraph` is a CPU stand-in with the same semantics (the
ops of the captured call recorded with their arguments, replayed on the same tensors: addresses and
scalars fixed at capture) so that tests can check what a replay would compute.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger("svdcache")

#: captures without a replay between them after which a context stops graphing (its states move)
MAX_FRUITLESS = 3
#: graphs kept per context (input layouts)
MAX_GRAPHS = 4


class GraphUnsafe(RuntimeError):
    """The captured call did something a graph cannot replay (a host sync)."""


# -- the CPU stand-in --------------------------------------------------------------------------------
class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = out if isinstance(out, (tuple, list)) else (out,)
        if not all(isinstance(o, torch.Tensor) or o is None for o in flat):
            # .item(), bool(tensor), tolist(): the host reads a device value (a sync; illegal in a capture)
            raise GraphUnsafe(f"{func} returns a host value to Python: a graph cannot replay it")
        rets = func._schema.returns
        alias = [r.alias_info for r in rets]
        if any(a is not None and a.is_write for a in alias):
            kind = "mutate"  # in place / out=: re-run on the same tensors
        elif any(a is not None for a in alias):
            kind = "view"  # aliases its input's memory: nothing to replay
        else:
            kind = "new"  # re-run, result copied into the tensor made at capture
        self.ops.append((func, args, kwargs, flat, kind))
        return out


class ReplayGraph:
    """CPU stand-in for :class:`CudaGraph` (tests): :meth:`capture` runs ``fn`` once as a warm-up, then once
    more recording its ops; :meth:`replay` re-runs them on the tensors of the capture with the arguments of the capture."""

    def __init__(self, pool=None):
        self.ops: list = []

    def capture(self, fn):
        fn()  # the warm-up run CudaGraph makes: the call's Python side effects happen twice, as on CUDA
        rec = _Recorder()
        with rec:
            out = fn()
        self.ops = rec.ops
        return out

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, outs, kind in self.ops:
            if kind == "view":
                continue
            res = func(*args, **kwargs)
            if kind == "new":
                res = res if isinstance(res, (tuple, list)) else (res,)
                for o, r in zip(outs, res):
                    if o is not None:
                        o.copy_(r)


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the same two calls: a warm-up run on a side stream, the capture,
    one replay (a capture records the work without running it)."""

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        self.graph.replay()
        return out

    def replay(self) -> None:
        self.graph.replay()


# -- what a graph depends on -------------------------------------------------------------------------
_SCALARS = (type(None), bool, int, float, str)


def _walk(v, key: list, tensors: list) -> bool:
    """Append the structure of ``v`` to ``key`` (tensor layouts, other values with their types: 1, 1.0 and
    True hash alike) and its tensors to ``tensors``; False for anything else (an object, a namedtuple)."""
    if isinstance(v, torch.Tensor):
        key.append((tuple(v.shape), v.stride(), v.dtype, v.device))
        tensors.append(v)
    elif isinstance(v, _SCALARS):
        key.append((type(v), v))
    elif type(v) in (list, tuple):
        key.append((type(v), len(v)))
        return all(_walk(x, key, tensors) for x in v)
    elif type(v) is dict and all(isinstance(k, str) for k in v):
        key.append((dict, tuple(sorted(v))))
        return all(_walk(v[k], key, tensors) for k in sorted(v))
    else:
        return False
    return True


def _fill(v, it):
    """``v`` with its tensors replaced, in :func:`_walk`'s order, by the next ones of ``it``."""
    if isinstance(v, torch.Tensor):
        return next(it)
    if type(v) in (list, tuple):
        return type(v)(_fill(x, it) for x in v)
    if type(v) is dict:
        return {k: _fill(v[k], it) for k in sorted(v)}
    return v


def input_key(args, kwargs):
    """(key, tensors) of a call: the layout of every tensor argument (also inside lists, tuples and dicts
    with string keys, e.g. FluxPipeline's ``joint_attention_kwargs={}``) and the value of every other
    one; (None, None) where an argument is none of these (not graphed)."""
    key, tensors = [], []
    for name, v in [*enumerate(args), *sorted(kwargs.items())]:
        key.append(name)
        if not _walk(v, key, tensors):
            return None, None
    return tuple(key), tensors


def _layout(t):
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t


def bound_signature(b) -> tuple | None:
    """Where every tensor a bound deferred sum reads is, and its structure; None if it forecasts a feature
    outside the sum (``rest``: its weights would be baked in). Cached on the bound (states change only at
    full steps, which drop it)."""
    sig = getattr(b, "gsig", None)
    if sig is not None:
        return sig
    if b.rest:
        return None
    parts = []
    for m in b.members:
        _, rows, V, R, T, codes, scales, bits, gate, rows2, g = m
        parts.append((rows, rows2, bits, g, _layout(V), _layout(R), tuple(_layout(t) for t in T),
                      _layout(codes), _layout(scales), _layout(gate)))
    for grp in b.stacked:
        gates = grp.gates if isinstance(grp.gates, torch.Tensor) else tuple(grp.gates)
        parts.append((tuple(grp.gs), grp.rows, grp.nt, grp.bits,
                      tuple((k, _layout(v)) for k, v in sorted(grp.ar.t.items()) if isinstance(v, torch.Tensor)),
                      _layout(grp.ar.stacked_V()),
                      _layout(gates) if isinstance(gates, torch.Tensor) else tuple(_layout(u) for u in gates)))
    b.gsig = sig = (len(b.reps), tuple(parts))
    return sig


def pin_anchors(st) -> None:
    """At the end of a full step: anchors held as the step's own features (``R = F``, a new tensor every
    full step) copied into one buffer per feature that stays put, so the next interval's bound sum reads
    the same addresses and its graph is replayed, not captured again (one copy of each such feature per
    full step, only with graphs; features stacked in arenas are in place already)."""
    from ..features import SubspaceCache

    arena_of = st.sum_arena_of
    for fc in st.features.values():
        if not isinstance(fc, SubspaceCache) or not fc.anchor_form or fc.R is None or id(fc) in arena_of:
            continue
        buf = fc.pinned_anchor()
        if fc.R is buf:
            continue
        with torch.no_grad():
            buf.copy_(fc.R)
        fc.adopt_storage({"R": buf})  # the same layout: the state key stands


def _clone_out(out):
    """The call's output, its tensors copied out of the graph's (overwritten by the next replay)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return type(out)(_clone_out(o) for o in out)
    if isinstance(out, dict):  # diffusers' BaseOutput (an OrderedDict dataclass)
        return type(out)(**{k: _clone_out(v) for k, v in out.items()})
    return out


@dataclass
class _Entry:
    graph: object
    sig: tuple
    static: list
    wdev: torch.Tensor
    out: object
    flops: tuple
    replays: int = 0


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager: int = 0  # cached calls that ran without a graph (first of an interval, not graphable)
    refused: dict = field(default_factory=dict)  # reason -> count

    def as_dict(self) -> dict:
        return dict(captures=self.captures, replays=self.replays, eager=self.eager, refused=dict(self.refused))


class StepGraphs:
    """The cached-step graphs of one cache (per context: its state's ``graphs``); see the module docstring."""

    def __init__(self, graph_cls=None):
        self.graph_cls = graph_cls or CudaGraph
        self.pool = torch.cuda.graph_pool_handle() if graph_cls is None and torch.cuda.is_available() else None
        self.off = False
        self.multi = None  # a process group of several ranks (read at the first cached call)
        self.stats = GraphStats()

    def _refuse(self, why: str):
        self.stats.eager += 1
        self.stats.refused[why] = self.stats.refused.get(why, 0) + 1
        return None

    def run(self, hook, st, args, kwargs):
        """The cached call's output from a graph (replayed, or captured now), or None: run it eagerly."""
        b = st.sum_bound
        if self.off or b is None:
            return self._refuse("off" if self.off else "first cached call of the interval")
        if st.graph_fruitless >= MAX_FRUITLESS:
            return self._refuse("states move every interval")
        if hook.acct.wants_count(st):
            return self._refuse("counting FLOPs")
        if self.multi is None:
            dist = torch.distributed
            self.multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.multi:  # collectives of a sharded call (context parallel) are not captured here: eager
            return self._refuse("several ranks")
        sig = bound_signature(b)
        if sig is None:
            return self._refuse("a forecast outside the deferred sum")
        key, tensors = input_key(args, kwargs)
        if key is None:
            return self._refuse("inputs that are not tensors, scalars or lists / dicts of them")
        wd = [fc.forecast_terms(st.t)[1::2] for fc in b.reps]
        sig = (sig, tuple(len(w) for w, _ in wd))
        e = st.graphs.get(key)
        if e is not None and e.sig == sig:
            e.wdev.copy_(_host_weights(wd, e.wdev.device), non_blocking=True)
            for s, t in zip(e.static, tensors):
                s.copy_(t)
            e.graph.replay()
            e.replays += 1
            st.graph_fruitless = 0
            self.stats.replays += 1
            st.call_cache_flops, st.call_torch_flops = e.flops
            return _clone_out(e.out)
        return self._capture(hook, st, args, kwargs, key, tensors, sig, wd, b)

    def _capture(self, hook, st, args, kwargs, key, tensors, sig, wd, b):
        old = st.graphs.pop(key, None)
        if old is not None and old.replays == 0:
            st.graph_fruitless += 1
        dev = tensors[0].device if tensors else torch.device("cpu")
        wdev = torch.zeros(max(1, len(wd)), 4, dtype=torch.float32, device=dev)
        wdev.copy_(_host_weights(wd, dev))
        static = [t.clone() for t in tensors]
        it = iter(static)
        s_args = [_fill(a, it) for a in args]
        s_kw = {k: _fill(v, it) for k, v in sorted(kwargs.items())}
        ds = hook.deferred_sum
        views = [(wdev[g, :len(w)], wdev[g, 3:4]) for g, (w, _) in enumerate(wd)]
        flops0 = (st.call_cache_flops, st.call_torch_flops)

        def fn():
            st.call_cache_flops, st.call_torch_flops = flops0
            ds.device_weights = views
            try:
                return hook.fn_ref.original_forward(*s_args, **s_kw)
            finally:
                ds.device_weights = None

        graph = self.graph_cls(self.pool)
        try:
            out = graph.capture(fn)
        except Exception as exc:  # noqa: BLE001 - any refusal: eager from now on, the call recomputed
            self.off = True
            ds.clear()
            logger.warning("svdcache: cuda_graphs is off for this model: capturing its cached step failed (%s: %s);"
                           " cached steps run eagerly", type(exc).__name__, exc)
            st.call_cache_flops, st.call_torch_flops = flops0
            return self._refuse("capture failed")
        if st.sum_bound is not b or ds.items:  # the call bound another sum, or left terms: not what was checked
            ds.clear()
            st.call_cache_flops, st.call_torch_flops = flops0
            return self._refuse("the sum changed during the capture")
        if len(st.graphs) >= MAX_GRAPHS:
            st.graphs.pop(next(iter(st.graphs)))
        st.graphs[key] = _Entry(graph, sig, static, wdev, out, (st.call_cache_flops, st.call_torch_flops))
        self.stats.captures += 1
        return _clone_out(out)


def _host_weights(wd, device) -> torch.Tensor:
    """The step's weights as the (kinds, 4) rows the graph reads: w0, w1, w2, dr_scale (pinned on CUDA, so
    the copy is queued without waiting; each step its own staging tensor: one still being copied is not
    overwritten)."""
    rows = [[*(float(u) for u in w), *([0.0] * (3 - len(w))), float(d)] for w, d in wd] or [[0.0] * 4]
    t = torch.tensor(rows, dtype=torch.float32)
    return t.pin_memory() if device.type == "cuda" else t
