"""The feature site: "this module's output is feature X". A thin wrapper of the module's ``forward``
that hands its outputs to the block's recorder on a full step (one frame per call)."""
from __future__ import annotations

import functools

import torch

from ..runtime.distributed import reduce_partial


class _Inert:
    """What a detached capture still wrapped by another forward wrapper points at: it records nothing."""

    active_sink = active_record = None


class CaptureHook:
    """On a submodule: during a full step of its block, record the listed outputs as features.

    Attached as a thin wrapper of the submodule's ``forward`` (one frame per call), not a diffusers registry
    hook (four frames and the packing of the arguments per call): every captured module runs at every full
    step, and on a dispatch-bound model those frames are a measurable share of it (issue 12)."""

    def __init__(self, block_hook: "BlockHook", outputs: list[tuple[str, int | None]]):
        self.block_hook = block_hook
        self.outputs = outputs
        self._attached = None  # (module, our forward, the instance forward it replaced or None)

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

    def attach(self, module: torch.nn.Module) -> None:
        inner, own = module.forward, module.__dict__.get("forward")
        post = self.record_output

        @functools.wraps(inner)  # inspect.signature (torch.export) follows __wrapped__ to the real one
        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            bh = self.block_hook
            sink = bh.active_sink
            if sink is not None and (type(out) is torch.Tensor or type(out) is tuple):
                sink += (self, out)  # recorded with the others at the end of the call (record_captured)
                return out
            return out if bh.active_record is None else post(module, out)

        forward._svdcache_capture, forward._svdcache_own = self, own
        module.forward = forward
        self._attached = (module, forward, own)

    def detach(self) -> None:
        if self._attached is None:
            return
        module, forward, own = self._attached
        self._attached = None
        self.block_hook = _Inert()
        if module.__dict__.get("forward") is not forward:
            return  # another wrapper took ours in: it stays in that chain, recording nothing
        while getattr(own, "_svdcache_capture", None) is not None and own._svdcache_capture._attached is None:
            own = own._svdcache_own  # an inert capture under ours goes too
        if own is None:
            del module.forward
        else:
            module.forward = own
