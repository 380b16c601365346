"""Full steps of small features in one pass: the caches of an arena (svdcache.deferred: a group of like
small features whose states are stacked) are updated together at the end of the full call.

Each feature's update is a few small ops (the difference to the last feature, its projection on the
basis, the order-2 divided difference, the residual difference and its 4-bit codes): on features of a
few thousand elements their dispatch is the cost. The arena already holds the last features (the
anchors), D1, D2 and the codes stacked, so the whole group is the same ops once: one stack of the new
features, one batched GEMM per projection, one quantization, the same arithmetic as the per-feature
fast path (``SplitPlan``: ``D2 = (dF V / h1 - D1) / h2``, ``D1 += h2 D2``; the residual as one GEMM into
the difference). The updates wait for the end of the call holding nothing more than they would (each
new feature is the next anchor anyway; the last ones are in the arena).

Once a full step's updates were all batched, the state keeps a capture plan (capture hook -> arena
slots): the next full steps hand their features over in bulk (record_captured: the capture wrappers append
to the call's sink, no per-feature record call), and the checks that would cost a host op per feature
(dtype, shape, device) are made on the stacked group.

Anything else (a first full step, another shape, a feature not yet in an arena, mixed histories,
16-bit features, the unconditional branch's difference form) is updated one by one as it is recorded.
"""
from __future__ import annotations

import operator
from itertools import chain

import torch

from svdcache_kernels import quantize_rows_into

from ..features import QuantizedResidualCache


def defer_update(st, fc, F: torch.Tensor, t: float) -> bool:
    """Hold ``fc``'s update with ``F`` for the end of the call if it can join its arena's batched one. An
    arena holds caches of the summed form only (anchor-form Taylor in a basis, svdcache.deferred._summable),
    so what is checked per call is that the cache still lives there and ``F`` is of its kind."""
    ent = st.sum_arena_of.get(id(fc))
    if ent is None:
        return False
    ar, f = ent
    if ar.fcs[f] is not fc or fc.R is not ar.views["R"][f] or F.dtype is not torch.float32 or F.shape != fc.shape:
        return False
    if F.get_device() != fc.R.get_device():
        return False
    held = ar.held
    if held is None:
        held = ar.held = [None] * len(ar.fcs)
        st.pending_updates.append(ar)
    held[f] = (fc, F, t)
    return True


def flush_updates(hook, st) -> bool:
    """Run the held updates: batched per arena whose members are all held with one history, else one by
    one (their ``update``). True when every arena was batched."""
    arenas, st.pending_updates = st.pending_updates, []
    every = True
    for ar in arenas:
        entries, ar.held = ar.held, None
        if not _batchable(ar, entries) or not _batched(hook, st, ar, entries):
            every = False
            st.capture_plan = None  # the members' states may have left the arena's views
            for e in entries:
                if e is not None:
                    hook.store.update(st, e[0].name, e[1], e[2])  # its checks and errors
    return every


def capture_plan(st, captures) -> tuple | None:
    """Where each capture hook's features go once every one of them lives in an arena: ({capture hook:
    ((output index, arena, slot, cache, feature name), ...)}, the arenas); None while any does not (see
    record_captured)."""
    plan, arenas = {}, {}
    for h in captures:
        slots = []
        for local, idx in h.outputs:
            name = h.block_hook.prefix + local
            fc = st.features.get(name)
            ent = None if fc is None else st.sum_arena_of.get(id(fc))
            if ent is None:
                return None
            slots.append((idx, ent[0], ent[1], fc, name))
            arenas[id(ent[0])] = ent[0]
        plan[h] = tuple(slots)
    return (plan, tuple(arenas.items())) if plan else None


def record_captured(hook, st, sink: list) -> None:
    """A full step's features as its capture hooks handed them over (``sink``: capture hook, output, ...),
    held in their arenas by the state's capture plan (learnt at a full step whose updates were all batched:
    the same caches in the same arenas); what the plan does not cover is recorded one by one. What costs a
    host op per feature (dtype, shape, device) is checked on the stacked group (_batched)."""
    plan, arenas = st.capture_plan
    if not all(st.sum_arena.get(i) is ar for i, ar in arenas):
        plan = {}  # an arena was rebuilt (the sum regrouped): one by one, and the plan learnt again
        st.capture_plan = None
    pending = st.pending_updates
    for _, ar in arenas:
        if not any(p is ar for p in pending):  # else its held slots are this call's (an adapter's own hook)
            ar.held = [None] * len(ar.fcs)
            pending.append(ar)
    t, updated = st.t, st.updated
    for i in range(0, len(sink), 2):
        h, out = sink[i], sink[i + 1]
        slots = plan.get(h)
        if slots is None:
            for local, idx in h.outputs:
                h.block_hook.record(local, out if idx is None else out[idx])
            continue
        for idx, ar, f, fc, name in slots:
            F = out if idx is None else out[idx]
            if type(F) is not torch.Tensor:  # tensor parallelism: the per-feature path gathers it
                h.block_hook.record(name[len(h.block_hook.prefix):], F)
            elif ar.held[f] is None:
                ar.held[f] = (fc, F, t)
                updated.add(name)
            else:  # the module ran twice in the block: a feature is recorded once per call
                raise RuntimeError(f"svdcache: feature {name!r} recorded twice in one call")


_RQ, _RS = operator.attrgetter("rq"), operator.attrgetter("rs")
_STATE = ("V", "R", "C", "D1", "D2", "E", "dR")
_STATES = {False: operator.attrgetter(*_STATE), True: operator.attrgetter(*_STATE, "rq", "rs")}


def _state_of(fc):
    """(fc) -> its state tensors, as a tuple."""
    return _STATES[isinstance(fc, QuantizedResidualCache)]


def _batchable(ar, entries) -> bool:
    if len(entries) < 2 or None in entries:
        return False
    fc0, _, t0 = entries[0]
    if fc0.n < 1:
        return False
    times, cfg, kind = fc0.times, fc0.cfg, type(fc0)
    for fc, F, t in entries:
        if t != t0 or fc.times != times or fc.cfg is not cfg or type(fc) is not kind:
            return False
    if issubclass(kind, QuantizedResidualCache) and fc0.bits and fc0.n + 1 >= 2:  # the update makes codes
        if fc0.bits not in (4, 8) or (fc0.bits == 4 and fc0.shape[-1] % 2):
            return False
        fcs = [e[0] for e in entries]
        if len({fc.bits for fc in fcs}) != 1:
            return False
        if "rq" in ar.t:  # written into the arena's: they must be its views
            return (all(map(operator.is_, map(_RQ, fcs), ar.views["rq"]))
                    and all(map(operator.is_, map(_RS, fcs), ar.views["rs"])))
    return True


@torch.no_grad()
def _batched(hook, st, ar, entries) -> bool:
    """The arena's update; False (nothing changed) when the new features do not stack into its kind."""
    fcs = [e[0] for e in entries]
    fc0, t = fcs[0], entries[0][2]
    R = ar.t["R"]
    try:
        Fs = torch.stack([e[1] for e in entries])
    except RuntimeError:  # shapes or devices differ
        return False
    if Fs.dtype is not torch.float32 or R.dtype is not torch.float32 or Fs.shape != R.shape or Fs.device != R.device:
        return False  # (16-bit anchors, e.g. a history restarted under autocast: one by one)
    V = ar.stacked_V()  # (W, D, k)
    if V.dtype is not torch.float32:
        return False
    cfg = fc0.cfg
    h1, h2 = fc0.steps_to(t)  # raises on a repeated time, as update does
    order = min(cfg.order, fc0.n)
    W = len(fcs)
    D = R.shape[-1]
    M = R.numel() // (W * D)
    k = fc0.V.shape[1]
    diff = torch.sub(Fs.view(W, M, D), R.view(W, M, D))  # F - F_prev, fp32
    T0 = ar.t["D1"].view(W, M, k)
    if order == 1:  # D1 = (F - F_prev) V / h1
        torch.baddbmm(T0, diff, V, beta=0.0, alpha=1.0 / h1, out=T0)
    elif order >= 2:  # D2 = (dF V / h1 - D1) / h2 in one GEMM, then D1 += h2 D2
        T1 = ar.t["D2"].view(W, M, k)
        torch.baddbmm(T0, diff, V, beta=-1.0 / h2, alpha=1.0 / (h1 * h2), out=T1)
        T0.add_(T1, alpha=h2)
    proj = 2 * M * D * k if order >= 1 else 0
    R.copy_(Fs)  # the new anchors, in the arena: the model's feature tensors are released
    codes = isinstance(fc0, QuantizedResidualCache) and fc0.bits and order >= 1 and fc0.n >= 1
    if codes:
        h = t - fc0.times[-1]
        # the residual difference dF / h - D1 V^T, into the difference; then its codes into the arena (the
        # first ones: into storage the arena grows for them)
        r = torch.baddbmm(diff, T0, V.transpose(1, 2), beta=1.0 / h, alpha=-1.0, out=diff)
        if "rq" not in ar.t:
            Dq = D if fc0.bits == 8 else D // 2
            ar.grow("rq", torch.empty((W, *fc0.shape[:-1], Dq), dtype=torch.int8 if fc0.bits == 8 else torch.uint8,
                                      device=R.device))
            ar.grow("rs", torch.empty((W, *fc0.shape[:-1], 1), dtype=torch.float32, device=R.device))
        Q, S = ar.t["rq"], ar.t["rs"]
        qv, sv = ar.views["rq"], ar.views["rs"]
        quantize_rows_into(r.view(W * M, D), fc0.bits, Q.view(W * M, -1), S.view(W * M, 1))
        proj *= 2
    times = (fc0.times + [t])[-3:]  # one list for the group (never changed in place: _push_time makes a new one)
    nbytes = Fs.numel() // W * Fs.element_size()
    state = _state_of(fc0)
    settled = (bool(codes), proj, nbytes)
    if ar.settled != settled or not all(map(operator.is_, chain.from_iterable(map(state, fcs)), chain.from_iterable(ar.srcs))):
        # the members' states are not those this arena's last batch left (its first batches, a member
        # updated on its own): each takes its slot's anchor, codes and state key; else every one is as it was
        views = ar.views["R"]
        for f, fc in enumerate(fcs):
            cq = (qv[f], sv[f]) if codes else None
            src = (fc.V, views[f], fc.C, fc.D1, fc.D2, fc.E, fc.dR) + (cq if codes else ())
            fc.commit_stacked(times, views[f], cq, nbytes, proj, ar.state_key(f, src))
        ar.settled, ar.srcs = settled, list(map(state, fcs))
    else:
        for fc in fcs:
            fc.commit_stacked(times, None, None, nbytes, proj, None)
    st.call_cache_flops += proj * W  # the group's
    return True
