"""A bulk full call's captured submodules reached without nn.Module's call path.

In a full step of a plain block (its own forward, its capture hooks record), every captured submodule call
goes ``block.attn`` (nn.Module.__getattr__) -> Module.__call__ -> _call_impl -> the capture wrapper -> the
module's forward. On a dispatch-bound model those frames cost more than the recording itself (issue 12).
For the length of a bulk call (SVDCacheHook._bypass_plain_blocks) the parent's instance dict holds a
:class:`SinkCall` under the submodule's name instead: found before ``__getattr__`` looks in ``_modules``, it
runs the forward the wrapper wraps and hands the output to the call's sink, as the wrapper would.

Only where nothing else would see the call: no hook of any kind on the submodules nor a global module hook,
no JIT tracing, the capture wrappers still their forwards, the names free in the parents' dicts. Anything
else the block reads of the submodule (``self.attn.heads``, ``isinstance``) is the submodule's.
"""
from __future__ import annotations

import operator
from itertools import chain

import torch

_HOOKS = operator.attrgetter("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
           "_global_backward_pre_hooks", "_global_forward_hooks_always_called", "_global_forward_hooks_with_kwargs")


class SinkCall:
    """What the block finds as its captured submodule during a bulk call."""

    __slots__ = ("module", "forward", "hook", "sink")

    def __init__(self, module, forward, hook):
        self.module, self.forward, self.hook, self.sink = module, forward, hook, None

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if type(out) is torch.Tensor or type(out) is tuple:
            self.sink += (self.hook, out)  # recorded with the others at the end of the call (record_captured)
            return out
        return self.hook.record_output(self.module, out)

    def __getattr__(self, name):  # what else the block reads of the submodule (e.g. attn.heads)
        return getattr(self.module, name)

    @property
    def __class__(self):  # isinstance(self.attn, Attention) in a block's forward holds as before
        return type(self.module)


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return any(getattr(m, n, None) for n in _GLOBAL)


class DirectCalls:
    """The SinkCalls of a set of capture hooks, put in place and taken out together (one check for all)."""

    def __init__(self):
        self._n = -1
        self._active = False

    def _build(self, captures) -> None:
        # those of plain blocks (their forwards bypassed for the call: SVDCacheHook._bypass_plain_blocks)
        slots = [(c, c.slot) for c in captures if c.slot is not None and getattr(c.block_hook, "_plain", False)]
        self._slots = tuple((d, attr, call) for _, (d, attr, call) in slots)
        self._mods = tuple(call.module for _, _, call in self._slots)
        self._mdicts = tuple(m.__dict__ for m in self._mods)
        self._fwds = tuple(c.wrapper for c, _ in slots)
        self._dicts = tuple(d for d, _, _ in self._slots)
        self._attrs = tuple(attr for _, attr, _ in self._slots)
        self._n = len(captures)

    def swap_in(self, captures, sink: list) -> bool:
        """Put every capture's SinkCall in place for a bulk call writing to ``sink``; False (nothing done)
        where any of them could be seen by something else."""
        if self._n != len(captures):
            self._build(captures)
        if not self._slots or _global_hooks() or torch.jit.is_tracing():
            return False
        if any(chain.from_iterable(map(_HOOKS, self._mods))):
            return False
        if not all(map(operator.is_, map(operator.methodcaller("get", "forward"), self._mdicts), self._fwds)):
            return False  # another wrapper took a capture's in (or it was detached)
        if any(map(operator.contains, self._dicts, self._attrs)):
            return False
        for d, attr, call in self._slots:
            call.sink = sink
            d[attr] = call
        self._active = True
        return True

    def swap_out(self) -> None:
        if not self._active:
            return
        self._active = False
        for d, attr, call in self._slots:
            call.sink = None
            if d.get(attr) is call:
                del d[attr]
