"""Deferred gated forecasts: a cached call's whole stack of blocks summed in one batched op.

On a cached call of a model whose cached blocks only add gated forecasts to a stream (FLUX at module
level: each block's image output is ``x + gate * F_hat`` for its features), the stream after the
last block is ``x + sum_f gate_f * F_hat_f`` whatever the order. So each block hands its terms (the
feature, its gate for this step, the rows of the feature that feed the stream) to :class:`DeferredSum`
and passes the stream on unchanged; the last block sums them all with one
:func:`svdcache_kernels.reconstruct_sum` per row layout: a few ops for the whole stack instead of
several per feature and a Python frame chain per block. Anything added to the stream between
blocks (a ControlNet residual) is in the last block's input and kept.

Only features whose state is of the summed form (anchor-form Taylor in a basis, with or without a
quantized residual difference: ``forecast_terms``) are batched, the unconditional branch's difference
form as two members (the conditional state of the step and the difference, both under the unconditional
gate); the rest (EMA, explicit residuals, full-space caches) are forecast one by one and added.
An adapter defers only where it knows its last block flushes (``bind``); a cached call that ends with
terms still pending is computed in full (the root hook checks), never returned without them.
"""
from __future__ import annotations

import operator

import torch

import svdcache_kernels as K
from svdcache_kernels.ops.reconstruct_sum import reference as _sum_ref
from svdcache_kernels.plan import layout

from ..features import SubspaceCache

_MISSING = object()


class DeferredSum:
    """The terms deferred in the cached call in progress, and the prepared sums (by layout)."""

    __slots__ = ("items", "plans", "last", "until", "undo", "device_weights", "enabled", "stacking")

    def __init__(self, enabled: bool = True, stacking: str = "auto"):
        self.enabled = enabled  # fast_paths["deferred_sum"] is not "off": adapters may defer
        self.stacking = stacking  # fast_paths["arenas"]: "auto" (small streams), "on" or "off"
        self.items: list = []  # (feature name, gate, row offset)
        self.plans: dict = {}
        self.last = None  # (plan, bound, stream layouts) of the last sum
        # the block that sums the deferred terms: the blocks before it (after the one that deferred them
        # all) pass their inputs on, without entering their adapters (BlockHook)
        self.until = None
        self.undo: list = []  # callables restoring what an adapter changed for this call (run by clear)
        # per kind of state, (weights, dr_scale) as views of one device tensor: set while a CUDA graph
        # captures the call (svdcache.graphs), so the step's weights are read by the ops, not baked in
        self.device_weights = None

    def clear(self) -> None:
        """Forget the call's terms and undo what its adapters changed (at the start and end of every call,
        and when one raises)."""
        self.items.clear()
        self.until = None
        while self.undo:
            self.undo.pop()()

    def defer(self, items, until, undo=None) -> None:
        """Terms of the cached call in progress, summed when the block ``until`` flushes them."""
        self.items.extend(items)
        self.until = until
        if undo is not None:
            self.undo.append(undo)

    def _plan(self, hook, y, out, bound, terms):
        """The prepared sum for this layout: the same bound members (same states, gates and rows) and the
        same stream layout as the last call: the same plan; otherwise keyed by every layout."""
        io = (layout(y), layout(out))
        last = self.last
        if last is not None and last[1] is bound and last[2] == io:
            return last[0]
        key = (io, tuple((m[0].state_key, len(t.terms), t.bits if t.codes is not None else 0, m[1], layout(t.gate))
                         for m, t in zip(bound.members, terms)))
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) > 8:
                self.plans.clear()
            plan = self.plans[key] = K.ReconstructSumPlan(y, terms, out=out, backend=hook.cfg.backend)
        self.last = (plan, bound, io)
        return plan

    def flush(self, hook, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x + sum of the deferred terms`` into ``out`` (a new tensor if None); the terms are consumed."""
        st = hook.state
        items, self.items = self.items, []
        self.until = None
        N = x.shape[-2]
        bound = _bound(st, items, x, K.resolve_backend(hook.cfg.backend, x) == "torch", self.stacking)
        # the weights of this step, once per kind of state (all features of a context share their times)
        wd = self.device_weights or [fc.forecast_terms(st.t)[1::2] for fc in bound.reps]
        SumTerm = K.SumTerm
        terms = [SumTerm(V, R, T, wd[g][0], gate, codes, scales, bits, wd[g][1] if codes is not None else 0.0, rows)
                 for _, _, V, R, T, codes, scales, bits, gate, rows, g in bound.members]
        y = x
        for grp in bound.stacked:  # small features whose states live stacked (one op per kind of state)
            y = grp.run(y, out, wd)
            out = y if out is None else out
        if terms:
            y = self._plan(hook, y, out, bound, terms)(y, terms, out)
        if bound.rest:
            if y is x:
                y = x.clone() if out is None else out.copy_(x)
            for name, gate, rows, whole in bound.rest:
                if whole:  # in place on the stream, as a per-block forecast would
                    hook.forecast(name, x=y, gate=gate, out=y)
                    continue
                fh = hook.forecast(name)  # the feature itself (any form), then its rows added with the gate
                if fh is None:
                    continue
                fh = fh[..., rows:rows + N, :]
                if gate is None:
                    y.add_(fh)
                else:
                    y.addcmul_(gate if gate.dim() == y.dim() else gate.unsqueeze(-2), fh)
        st.call_cache_flops += bound.flops
        if y is x:  # nothing was deferred: the stream as it came, in out if asked
            y = x if out is None else out.copy_(x)
        return y


class _Bound:
    """The tensors a context's deferred sum reads, as bound at its first cached call after a full step
    (views of the stream's rows of each feature's state): the states only change at full steps, which
    drop it (``ContextState.sum_bound``), so no view outlives the state it shows."""

    __slots__ = ("items", "layout", "members", "rest", "flops", "names", "reps", "stacked", "gsig", "partners")


def _summable(fc, lead, rows, N) -> bool:
    """The feature's forecast is of the summed form (its own anchor-form state)."""
    return (isinstance(fc, SubspaceCache) and fc.shape is not None
            and fc.shape[:-2] == lead and fc.shape[-2] >= rows + N)


def _partner_of(st, name, fc, lead, rows, N):
    """The unconditional branch's difference form (F_hat = F_cond_hat + D_hat, svdcache.guidance) is two
    members of the sum, both under the unconditional gate: the conditional branch's state of this step and
    the difference's. Returns (the conditional cache, its forecast_terms), or None where that does not hold
    (forecast apart)."""
    p = st.partner
    pc = None if p is None or p.step != st.step else p.features.get(name)
    if (pc is None or pc.relative or pc.V is not fc.V or tuple(pc.shape) != tuple(fc.shape)
            or not _summable(pc, lead, rows, N)):
        return None
    ft = pc.forecast_terms(p.t)
    return None if ft is None else (pc, ft)


def _bound(st, items, x, views: bool, stacking: str = "auto") -> _Bound:
    """``views``: the stream's rows of each state as views (the torch ops read any strides); else as views
    where they flatten to rows (batch 1), the whole states with their row offsets otherwise."""
    b = st.sum_bound
    feats = st.features
    pfeats = st.partner.features if st.partner is not None else {}
    if (b is not None and b.layout == (x.shape, x.device) and len(b.items) == len(items)
            and all(a is c for a, c in zip(items, b.items))
            and all(feats.get(n) is fc and getattr(fc, "state_key", None) is sk for n, fc, sk in b.names)
            and all(pfeats.get(n) is fc and fc.state_key is sk for n, fc, sk in b.partners)):
        return b
    b = _Bound()
    b.items, b.layout = list(items), (x.shape, x.device)
    b.members, b.rest, b.flops = [], [], 0
    lead, N = tuple(x.shape[:-2]), x.shape[-2]
    names = []
    kinds: dict = {}  # weights_key -> index into b.reps
    b.reps = []
    b.partners = []
    for name, gate, rows in items:
        fc = feats.get(name, _MISSING)
        if fc is _MISSING:
            raise RuntimeError(f"svdcache: no cached state for feature {name!r} on a cached step")
        names.append((name, fc, getattr(fc, "state_key", None)))
        if fc is None:
            continue
        ft = fc.forecast_terms(st.t) if _summable(fc, lead, rows, N) else None
        partner = _partner_of(st, name, fc, lead, rows, N) if ft is not None and fc.relative else None
        if ft is None or (fc.relative and partner is None):
            b.rest.append((name, gate, rows, rows == 0 and fc.shape == tuple(x.shape)))
            continue
        if partner is not None:  # the conditional branch's forecast of this step, under this call's gate
            pc, pft = partner
            b.partners.append((name, pc, pc.state_key))
            _member(b, kinds, pc, pft, gate, rows, N, views)
        _member(b, kinds, fc, ft, gate, rows, N, views)
    b.names = names
    stack = stacking == "on" or (stacking == "auto" and x.numel() <= _sum_ref.STACK_ELEMS)
    b.stacked = _stack_groups(st, b, x) if views and stack else []
    st.sum_bound = b
    return b


def _member(b, kinds, fc, ft, gate, rows, N, views) -> None:
    """One member of the bound sum: ``fc``'s anchor-form state (``ft``: its forecast_terms) under ``gate``."""
    terms, _, dRq, _ = ft
    ts = (fc.R, *terms, *(dRq[:2] if dRq is not None else ()))
    whole = rows == 0 and fc.shape[-2] == N
    if not whole:  # the stream's rows as views, where the backend reads them (kernels: as flat rows)
        cut = [u[..., rows:rows + N, :] for u in ts]
        if views or all(_flat(u) for u in cut):
            ts, whole = cut, True
    R, terms_b = ts[0], tuple(ts[1:1 + len(terms)])
    codes, scales, bits = (ts[-2], ts[-1], dRq[2]) if dRq is not None else (None, None, 8)
    wk = fc.weights_key()
    g = kinds.get(wk)
    if g is None:
        g = kinds[wk] = len(b.reps)
        b.reps.append(fc)
    b.members.append((fc, rows, fc.V, R, terms_b, codes, scales, bits, gate, 0 if whole else rows, g))
    if terms:
        # what runs (the GEMM over the rows the op reads): torch's FLOP counter sees the torch ops, and
        # the model's own count is what it saw less this
        b.flops += 2 * (R.numel() // R.shape[-1]) * fc.V.shape[0] * fc.V.shape[1]


class _Arena:
    """Stacked storage of the states of a group of small features of one context: ``t[attr]`` is a
    (F, ...) tensor and each cache's ``attr`` a view of its slot, so the caches keep working as before
    (a full step writes D1, D2 and the residual codes in place) and a cached call reads each kind of
    state as one tensor. Only the anchor is copied in at each interval's first cached call (a full
    step holds the new feature itself): a few features' worth of small tensors, by construction."""

    __slots__ = ("fcs", "attrs", "t", "views", "vlay", "keys", "_V", "held", "settled", "srcs")

    def __init__(self, fcs):
        self.fcs = list(fcs)
        self.attrs, self.t, self.views, self.vlay = [], {}, {}, {}
        f0 = self.fcs[0]
        for a in _ATTRS:
            u = getattr(f0, a, None)
            if u is not None:
                self.grow(a, torch.empty((len(self.fcs), *u.shape), dtype=u.dtype, device=u.device))
        self.keys = [None] * len(self.fcs)  # per slot: (state tensors, state key)
        self._V = None
        self.held = None  # a full step's updates of its members, held for one batch (svdcache.batched_update)
        self.settled = self.srcs = None  # what the last batch left: its kind and the members' state tensors

    def stacked_V(self) -> torch.Tensor:
        """The members' bases as one (F, D, k) tensor, stacked again only when a member's basis is replaced
        (a dtype or device change): the bases are fixed for a cache's life."""
        Vs = [fc.V for fc in self.fcs]
        held = self._V
        if held is None or not all(map(operator.is_, held[0], Vs)):
            held = self._V = (Vs, torch.stack(Vs))
        return held[1]

    def state_key(self, f: int, src: tuple):
        """Slot ``f``'s state key (``SubspaceCache.state_key``: the layouts of ``src``), the same object
        while the same tensors hold the state: the arena's views, written in place at every full step."""
        ent = self.keys[f]
        if ent is None or len(ent[0]) != len(src) or not all(map(operator.is_, ent[0], src)):
            lays, views = [], self.views
            for u in src:  # the layouts of the slot's views are the arena's (one per kind of state)
                lay = None
                if u is not None:
                    for a in self.attrs:
                        if views[a][f] is u:
                            lay = self.vlay[a]
                            break
                    else:
                        lay = layout(u)
                lays.append(lay)
            ent = self.keys[f] = (src, tuple(lays))
        return ent[1]

    def grow(self, attr: str, t: torch.Tensor) -> None:
        """Storage for one more kind of state (``t``: (F, ...)), e.g. the first residual codes, written by a
        full step's batched update (svdcache.batched_update)."""
        self.attrs.append(attr)
        self.t[attr] = t
        self.views[attr] = list(t.unbind(0))
        self.vlay[attr] = layout(self.views[attr][0])  # every slot's view has it


_ATTRS = ("R", "D1", "D2", "rq", "rs")


def _fits(ar: _Arena, fcs) -> bool:
    """``ar`` holds exactly these caches, in this order, with storage of the kind of each of their states."""
    if len(ar.fcs) != len(fcs) or not all(map(operator.is_, ar.fcs, fcs)):
        return False
    f0 = fcs[0]
    for a in _ATTRS:
        u, t = getattr(f0, a, None), ar.t.get(a)
        if (u is None) != (t is None):
            return False
        if u is not None and (t.shape[1:] != u.shape or t.dtype != u.dtype or t.device != u.device):
            return False
    return True


def _arena(st, fcs) -> _Arena:
    """The arena of these caches: found by its members (an arena outlives the changes of the sum's grouping
    as histories grow: one more term, the first codes), else a new one, which the caches' states move to."""
    ent = st.sum_arena_of.get(id(fcs[0]))
    ar = ent[0] if ent is not None else None
    if ar is None or not _fits(ar, fcs):
        for fc in fcs:  # a feature lives in one arena: those holding any of these go
            old = st.sum_arena_of.get(id(fc))
            if old is not None:
                st.sum_arena.pop(id(old[0]), None)
                for g in old[0].fcs:
                    st.sum_arena_of.pop(id(g), None)
        ar = _Arena(fcs)
        st.sum_arena[id(ar)] = ar
        for f, fc in enumerate(fcs):
            st.sum_arena_of[id(fc)] = (ar, f)
    for a in ar.attrs:
        cur = [getattr(fc, a) for fc in fcs]
        vs = ar.views[a]
        if all(c is v for c, v in zip(cur, vs)):
            continue
        if any(c is v for c, v in zip(cur, vs)):
            for c, v in zip(cur, vs):
                if c is not v:
                    v.copy_(c)
        else:
            torch.stack(cur, out=ar.t[a])
    for f, fc in enumerate(fcs):
        fc.adopt_storage({a: ar.views[a][f] for a in ar.attrs})
    return ar


class _Stacked:
    """One group of a bound sum whose states live in an arena: the call's weights, then one
    :func:`svdcache_kernels.reconstruct_stacked`."""

    __slots__ = ("ar", "gs", "rows", "gates", "nt", "bits", "cache")

    def run(self, y, out, wd):
        g0 = self.gs[0]
        same = all(g == g0 for g in self.gs)
        if same:
            w, d = wd[g0]
            weights = list(w) if isinstance(w, torch.Tensor) else [float(u) for u in w]
        else:
            w = [wd[g][0] for g in self.gs]
            weights = [_sum_ref._scalars([u[i] for u in w], y.device, self.cache) for i in range(self.nt)]
            d = _sum_ref._scalars([wd[g][1] for g in self.gs], y.device, self.cache)
        t = self.ar.t
        G = self.gates if isinstance(self.gates, torch.Tensor) else torch.stack(self.gates)
        V = self.ar.stacked_V()
        T = [t[a] for a in ("D1", "D2")[:self.nt]]
        codes = t.get("rq") if self.bits else None
        return K.reconstruct_stacked(y, t["R"], T, weights, G, V, codes, t.get("rs") if self.bits else None,
                                     self.bits or 8, d if self.bits else 0.0, self.rows, out=out)


def _stack_groups(st, b, x) -> list:
    """Move the bound's small features of one kind (shapes, rank, terms, residual, rows) into arenas:
    groups of two or more leave ``b.members`` for a :class:`_Stacked`."""
    groups: dict = {}
    theirs = {id(pc) for _, pc, _ in b.partners}  # the conditional branch's caches: their storage stays theirs
    for i, m in enumerate(b.members):
        c, rows, V, R, T, codes, scales, bits, gate, _, g = m
        if gate is None or gate.dim() != x.dim() or id(c) in theirs:
            continue
        key = (tuple(c.R.shape), c.R.dtype, tuple(V.shape), V.dtype, len(T), c.D2 is not None,
               None if codes is None else (bits, tuple(c.rq.shape)), rows)
        groups.setdefault(key, []).append(i)
    out, taken = [], set()
    for key, idx in groups.items():
        if len(idx) < 2:
            continue
        ms = [b.members[i] for i in idx]
        fcs = [m[0] for m in ms]
        grp = _Stacked()
        grp.ar = _arena(st, fcs)
        grp.gs = [m[10] for m in ms]
        grp.rows = key[-1]
        grp.gates = _consecutive([m[8] for m in ms])
        grp.nt = len(ms[0][4])
        grp.bits = ms[0][7] if ms[0][5] is not None else 0
        grp.cache = {}
        out.append(grp)
        taken.update(idx)
    b.members = [m for i, m in enumerate(b.members) if i not in taken]
    return out


def _consecutive(ts):
    """The tensors as one (F, ...) view where they are consecutive slots of one buffer (the runtime's
    gate buffer), else the list (stacked per call)."""
    t0 = ts[0]
    base = t0._base
    if base is None or not base.is_contiguous():
        return ts
    step = t0.numel()
    if any(t._base is not base or t.shape != t0.shape or not t.is_contiguous()
           or t.data_ptr() != t0.data_ptr() + i * step * t0.element_size() for i, t in enumerate(ts)):
        return ts
    off = t0.storage_offset()
    return base.as_strided((len(ts), *t0.shape), (step, *t0.stride()), off)


def _flat(t: torch.Tensor) -> bool:
    try:
        t.view(-1, t.shape[-1])
        return True
    except RuntimeError:
        return False
