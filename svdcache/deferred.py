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
quantized residual difference: ``forecast_terms``) are batched; the rest (EMA, explicit residuals,
the unconditional branch's difference form, full-space caches) are forecast one by one and added.
An adapter defers only where it knows its last block flushes (``bind``); a cached call that ends with
terms still pending is computed in full (the root hook checks), never returned without them.
"""
from __future__ import annotations

import torch

import svdcache_kernels as K
from svdcache_kernels.plan import layout

from .predictors import SubspaceCache

_MISSING = object()


class DeferredSum:
    """The terms deferred in the cached call in progress, and the prepared sums (by layout)."""

    __slots__ = ("items", "plans", "last", "until")

    def __init__(self):
        self.items: list = []  # (feature name, gate, row offset)
        self.plans: dict = {}
        self.last = None  # (plan, state keys, gates, layouts, rows) of the last sum
        # the block that sums the deferred terms: the blocks before it (after the one that deferred them
        # all) pass their inputs on, without entering their adapters (BlockHook)
        self.until = None

    def add(self, name: str, gate, rows: int = 0) -> None:
        self.items.append((name, gate, rows))

    def clear(self) -> None:
        self.items.clear()
        self.until = None

    def _plan(self, hook, y, out, bound, terms):
        """The prepared sum for this layout: the same bound members (same states, gates and rows) and the
        same stream layout as the last call: the same plan; otherwise keyed by every layout."""
        io = (layout(y), layout(out))
        last = self.last
        if last is not None and last[1] is bound and last[2] == io:
            return last[0]
        key = (io, tuple((m[0]._state_key, len(t.terms), t.bits if t.codes is not None else 0, m[1], layout(t.gate))
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
        st = hook._state
        items, self.items = self.items, []
        self.until = None
        N = x.shape[-2]
        bound = _bound(st, items, x, K.resolve_backend(hook.cfg.backend, x) == "torch")
        t = st.t
        # the weights of this step, once per kind of state (all features of a context share their times)
        wd = [fc.forecast_terms(t)[1::2] for fc in bound.reps]
        SumTerm = K.SumTerm
        terms = [SumTerm(V, R, T, wd[g][0], gate, codes, scales, bits, wd[g][1] if codes is not None else 0.0, rows)
                 for _, _, V, R, T, codes, scales, bits, gate, rows, g in bound.members]
        y = x
        if terms:
            y = self._plan(hook, x, out, bound, terms)(x, terms, out)
        if bound.rest:
            if y is x:
                y = x.clone() if out is None else out.copy_(x)
            for name, gate, rows in bound.rest:
                fh = hook.forecast(name)  # the feature itself (any form), then added with its gate
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

    __slots__ = ("items", "plain", "layout", "members", "rest", "flops", "names", "reps")


def _bound(st, items, x, views: bool) -> _Bound:
    """``views``: the stream's rows of each state as views (the torch ops read any strides); else as views
    where they flatten to rows (batch 1), the whole states with their row offsets otherwise."""
    b = st.sum_bound
    feats = st.features
    plain = st.partner is None
    if (b is not None and b.plain == plain and b.layout == (x.shape, x.device) and len(b.items) == len(items)
            and all(a is c for a, c in zip(items, b.items))
            and all(feats.get(m[-1]) is m[0] for m in b.names)):
        return b
    b = _Bound()
    b.items, b.plain, b.layout = list(items), plain, (x.shape, x.device)
    b.members, b.rest, b.flops = [], [], 0
    b.names = None
    lead, N = tuple(x.shape[:-2]), x.shape[-2]
    names = []
    kinds: dict = {}  # weights_key -> index into b.reps
    b.reps = []
    for name, gate, rows in items:
        fc = feats.get(name, _MISSING)
        if fc is _MISSING:
            raise RuntimeError(f"svdcache: no cached state for feature {name!r} on a cached step")
        names.append((fc, name))
        if fc is None:
            continue
        ft = None
        if plain and not fc.relative and isinstance(fc, SubspaceCache):
            shape = fc.shape
            if shape is not None and shape[:-2] == lead and shape[-2] >= rows + N:
                ft = fc.forecast_terms(st.t)
        if ft is None:
            b.rest.append((name, gate, rows))
            continue
        terms, _, dRq, _ = ft
        ts = (fc.R, *terms, *(dRq[:2] if dRq is not None else ()))
        whole = rows == 0 and fc.shape[-2] == N
        if not whole:  # the stream's rows as views, where the backend reads them (kernels: as flat rows)
            cut = [u[..., rows:rows + N, :] for u in ts]
            if views or all(_flat(u) for u in cut):
                ts, whole = cut, True
        R, terms_b = ts[0], tuple(ts[1:1 + len(terms)])
        codes, scales, bits = (ts[-2], ts[-1], dRq[2]) if dRq is not None else (None, None, 8)
        g = kinds.get(fc.weights_key())
        if g is None:
            g = kinds[fc.weights_key()] = len(b.reps)
            b.reps.append(fc)
        b.members.append((fc, rows, fc.V, R, terms_b, codes, scales, bits, gate, 0 if whole else rows, g))
        if terms:
            # what runs (the GEMM over the rows the op reads): torch's FLOP counter sees the torch ops, and
            # the model's own count is what it saw less this
            rows_run = R.numel() // R.shape[-1]
            b.flops += 2 * rows_run * fc.V.shape[0] * fc.V.shape[1]
    b.names = names
    st.sum_bound = b
    return b


def _flat(t: torch.Tensor) -> bool:
    try:
        t.view(-1, t.shape[-1])
        return True
    except RuntimeError:
        return False
