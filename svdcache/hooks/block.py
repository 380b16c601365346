"""The block hook: on each cached transformer block, its full forward (features recorded) or its cached
forward (forecasts), as the root hook decided for the call. A thin wrapper of the block's ``forward`` (a
feature site's kind of hook, svdcache.hooks.site), not a registry hook: a cached call that sums the whole
stack at its last block passes the blocks in between through for the cost of one frame each.

Its controller (the root hook, or the calibration hook) offers: ``mode()``, ``feature_dims``,
``declare(name, D)``, ``forget(name)``, ``record(name, F)`` / ``record_eager(name, F)``, ``traced`` (a list a compiled full
step hands its features out through, or None), ``sink`` (a bulk full call's list its feature sites append
to, or None), ``forecast(name, x=, gate=, out=)``, ``buffer(...)`` and ``deferred_sum`` (None where
cached calls are never summed at once)."""
from __future__ import annotations

import torch

from ..adapters.base import BLOCK_ATTR
from .site import ForwardWrapper


class BlockHook(ForwardWrapper):
    """On a transformer block: full forward (features recorded) or cached forward (forecasts)."""

    def __init__(self, controller, name: str, adapter):
        super().__init__()
        self.controller = controller
        self.name = name
        self.adapter = adapter
        self.active_record = None
        self.active_sink = None  # a bulk full call's list of (capture hook, output)
        self.active_forecast = None  # set during a cached forward (submodule hooks read it)
        self.prefix = name + "."
        self.forecaster = Forecaster(controller, self.prefix)
        self._names: dict[str, str] = {}  # local -> full feature name (no string concatenation per call)
        self.recorder = self.record  # one bound method, not one per call
        self.plain = adapter.plain_full_forward  # its full forward is the block's own

    def record(self, local: str, F) -> None:
        """The block's feature ``local`` of a full step."""
        ctl = self.controller
        compiling = torch.compiler.is_compiling()
        if compiling and ctl.traced is not None:
            # traced: hand the feature out of the graph, the root hook's end of call records it eagerly
            # (no graph break inside the blocks, no per-feature guard, one graph per kind of call)
            ctl.traced.append((self, local, F))
            return
        name = self._names.get(local)
        if name is None:
            name = self._names[local] = self.prefix + local
        dims = ctl.feature_dims
        if dims is None or name not in dims:
            # adapters that learn their features on the first full step (submodule, block level) declare them then
            ctl.declare(name, None if F is None else F.shape[-1])
        if compiling:
            ctl.record(name, F)  # behind a graph break
        else:  # the same, without the compiler-disable wrapper per feature
            ctl.record_eager(name, F)

    TAG = "_svdcache_block"

    def make_forward(self, block, inner):
        adapter = self.adapter

        def forward(*args, **kwargs):
            ctl = self.controller
            mode = ctl.mode()
            if mode == "cached":
                ds = ctl.deferred_sum
                if ds is not None and ds.until is not None and ds.until is not block:
                    # a whole-stack cached call: this block's terms were deferred by the first block
                    return adapter.passthrough(block, args, kwargs)
                if torch.compiler.is_compiling():
                    return self._cached_forward(block, inner, args, kwargs)
                return self._cached_forward_eager(block, inner, args, kwargs)
            if mode is None:  # called outside a managed transformer call
                return inner(*args, **kwargs)
            return self._full_forward(block, inner, args, kwargs)

        return forward

    def _full_forward(self, block, inner, args, kwargs):
        self.active_record = rec = self.recorder
        if self.plain:  # its feature sites hand their outputs to the bulk call's sink where there is one
            self.active_sink = self.controller.sink
        try:
            if self.plain:
                return inner(*args, **kwargs)
            return self.adapter.full_forward(block, inner, args, kwargs, rec)
        finally:
            self.active_record = self.active_sink = None

    def _cached_forward_eager(self, block, inner, args, kwargs):
        if self.adapter.needs_forward:  # the block's own forward runs (submodule and block level)
            self.active_forecast = self.forecaster
            try:
                return self.adapter.cached_forward(block, args, kwargs, self.forecaster, forward=inner)
            finally:
                self.active_forecast = None
        return self.adapter.cached_forward(block, args, kwargs, self.forecaster)

    _cached_forward = torch.compiler.disable(_cached_forward_eager)  # under torch.compile: a graph break

    def attach(self, module) -> None:
        super().attach(module)
        module.__dict__[BLOCK_ATTR] = self  # adapters find it from inside the block (block_hook_of)

    def go_inert(self, module) -> None:
        if module.__dict__.get(BLOCK_ATTR) is self:
            del module.__dict__[BLOCK_ATTR]
        self.controller = _INERT

    @property
    def block(self):
        return None if self._attached is None else self._attached[0]


class _InertController:
    """What a detached block hook still wrapped by another forward wrapper points at: it passes calls through."""

    deferred_sum = sink = None

    def mode(self):
        return None


_INERT = _InertController()


class Forecaster:
    """What a block's cached forward calls: ``forecast(local_name, x=, gate=, out=)``, plus
    ``buffer(key, shape, dtype, device)``, a work tensor owned by the runtime and reused every
    cached call (adapters write block outputs into it instead of allocating, or concatenating), and
    ``defer_all(items, until=, undo=)`` / ``flush(x, out)``: gated forecasts added to the stream later,
    all in one batched sum (svdcache.fastpath.deferred)."""

    __slots__ = ("controller", "prefix", "names")

    def __init__(self, controller, prefix: str):
        self.controller = controller
        self.prefix = prefix
        self.names: dict[str, str] = {}

    def __call__(self, local: str, **kw):
        name = self.names.get(local)
        if name is None:
            name = self.names[local] = self.prefix + local
        return self.controller.forecast(name, **kw)

    def buffer(self, key: str, shape, dtype, device):
        return self.controller.buffer(key, shape, dtype, device)

    @property
    def can_defer(self) -> bool:
        """Adapters may defer their terms to a sum at a later block (``fast_paths["deferred_sum"]``)."""
        ds = self.controller.deferred_sum
        return ds is not None and ds.enabled

    def defer_all(self, items, until=None, undo=None) -> None:
        """Deferred terms of any blocks of the call: ``(full feature name, gate, rows)``; ``until``: the
        block module that will flush them (the blocks called before it pass their inputs on); ``undo``: a
        callable run when the call ends, however it ends (an adapter's change to the model for this call)."""
        self.controller.deferred_sum.defer(items, until, undo)

    def flush(self, x, out=None):
        return self.controller.deferred_sum.flush(self.controller, x, out)
