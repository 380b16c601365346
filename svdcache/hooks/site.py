"""Thin forward wrappers: the feature site ("this module's output is feature X": its outputs handed to the
block's recorder on a full step) and, on the same mechanism, the block hook (svdcache.hooks.block).

A wrapper replaces the module's ``forward`` (one frame per call), not a diffusers registry hook (four frames
and the packing of the arguments per call): every captured module runs at every full step and every block
at every step, and on a dispatch-bound model those frames are a measurable share of it."""
from __future__ import annotations

import functools

import torch

from ..runtime.distributed import reduce_partial
from .copying import mark, unmark


class ForwardWrapper:
    """``attach(module)`` sets ``module.forward`` to ``make_forward(module, inner)`` (``inner``: the forward
    it replaces); ``detach()`` puts the replaced forward back. A wrapper put over ours after attach keeps
    working: ours then stays in its chain, inert (``go_inert``: it passes the call through)."""

    #: the attribute naming the wrapper on its forward function (``module.forward.<TAG>``)
    TAG = "_svdcache_wrapper"

    def __init__(self):
        self._attached = None  # (module, our forward, the instance forward it replaced or None)

    def make_forward(self, module, inner):
        raise NotImplementedError

    def go_inert(self, module) -> None:
        """Detached from ``module``: pass calls through from now on (another wrapper may still call ours)."""
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        return self._attached is not None

    def attach(self, module: torch.nn.Module) -> None:
        inner, own = module.forward, module.__dict__.get("forward")
        # functools.wraps: inspect.signature (torch.export) follows __wrapped__ to the real one
        forward = functools.wraps(inner)(self.make_forward(module, inner))
        forward._svdcache_wrapper, forward._svdcache_own = self, own
        setattr(forward, self.TAG, self)
        module.forward = forward
        self._attached = (module, forward, own)
        mark(module)  # a deepcopy / pickle of the model leaves the wrapper out

    def detach(self) -> None:
        if self._attached is None:
            return
        module, forward, own = self._attached
        self._attached = None
        self.go_inert(module)
        if module.__dict__.get("forward") is not forward:
            return  # another wrapper took ours in: it stays in that chain, passing calls through
        while getattr(own, "_svdcache_wrapper", None) is not None and not own._svdcache_wrapper.attached:
            own = own._svdcache_own  # an inert wrapper under ours goes too
        if own is None:
            del module.forward
        else:
            module.forward = own
        unmark(module)


class _Inert:
    """What a detached capture still wrapped by another forward wrapper points at: it records nothing."""

    active_sink = active_record = None


class CaptureHook(ForwardWrapper):
    """The feature site on a submodule: during a full step of its block, the listed outputs are features."""

    TAG = "_svdcache_capture"

    def __init__(self, block_hook, outputs: list[tuple[str, int | None]]):
        super().__init__()
        self.block_hook = block_hook
        self.outputs = outputs

    def record_output(self, module, output):
        """The per-feature path: each listed output recorded now (the wrapper's bulk path hands the output
        to the call's sink instead, recorded with the others at the end of the call: record_captured)."""
        record = self.block_hook.active_record
        if record is not None:
            if type(output) is not torch.Tensor and type(output) is not tuple:
                output = reduce_partial(output)  # tensor parallelism: a row-parallel linear's partial sum
            for name, idx in self.outputs:
                record(name, output if idx is None else output[idx])
        return output

    def make_forward(self, module, inner):
        post = self.record_output

        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            bh = self.block_hook
            sink = bh.active_sink
            if sink is not None and (type(out) is torch.Tensor or type(out) is tuple):
                sink += (self, out)  # recorded with the others at the end of the call (record_captured)
                return out
            return out if bh.active_record is None else post(module, out)

        return forward

    def go_inert(self, module) -> None:
        self.block_hook = _Inert()
