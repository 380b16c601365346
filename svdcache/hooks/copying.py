"""What ``copy.deepcopy`` and ``pickle`` / ``torch.save`` see of an enabled model: the model as it was before
``enable`` (the copy computes uncached; enable it again to cache it), the original untouched.

Every module the hooks sit on gets an instance ``__getstate__`` (both deepcopy and pickle read it through
``object.__reduce_ex__``) returning its ``__dict__`` without the cache's entries: our forward wrappers (the
forward they replaced put back), the block hook, the root hook's diffusers registry, the ``_svdcache_*``
bookkeeping. Without it a deepcopy fails on the root hook's lock, or worse: a copied forward closure would
still call the original module."""
from __future__ import annotations

import types

from . import CAPTURE_HOOK, ROOT_HOOK, CALIBRATION_HOOK

_OURS = (ROOT_HOOK, CAPTURE_HOOK, CALIBRATION_HOOK)
_ATTR = "__getstate__"
_HELD = ("_svdcache_wrappers", "_svdcache_watch", "_svdcache_block_hook")  # while hooks of ours are there


def mark(module) -> None:
    """Give ``module`` the instance ``__getstate__`` that leaves the cache out (idempotent)."""
    if _ATTR not in module.__dict__:
        module.__dict__[_ATTR] = types.MethodType(plain_state, module)


def unmark(module) -> None:
    """Remove what :func:`mark` put once nothing of the cache is left on ``module``."""
    d = module.__dict__
    held = any(k in d for k in _HELD) or getattr(d.get("forward"), "_svdcache_wrapper", None) is not None
    if _ATTR in d and not held and not _ours_in_registry(d):
        getter = d[_ATTR]
        if getattr(getter, "__func__", None) is plain_state:
            del d[_ATTR]


def _ours_in_registry(d) -> bool:
    reg = d.get("_diffusers_hook")
    return reg is not None and any(is_ours(n) for n in reg.hooks)


def is_ours(hook_name: str) -> bool:
    return hook_name in _OURS


def _unwrapped(forward):
    """The forward under our wrappers (None: the class's own)."""
    while getattr(forward, "_svdcache_wrapper", None) is not None:
        forward = forward._svdcache_own
    return forward


def plain_state(module) -> dict:
    """``module.__dict__`` as it would be without the cache (a new dict; the module is not changed)."""
    d = module.__dict__
    state = {k: v for k, v in d.items() if k != _ATTR and not k.startswith("_svdcache")}
    forward = d.get("forward")
    reg = d.get("_diffusers_hook")
    if reg is not None and any(is_ours(n) for n in reg.hooks):
        others = [n for n in reg.hooks if not is_ours(n)]
        if others:
            raise TypeError(
                f"svdcache: cannot copy or pickle {type(module).__name__} while it holds other diffusers hooks "
                f"({', '.join(others)}) beside SVD-Cache's: svdcache.disable(model) first"
            )
        del state["_diffusers_hook"]
        ref = next(iter(reg.hooks.values())).fn_ref  # the first hook registered: what it wrapped
        forward = _unwrapped(ref.original_forward or ref.forward)
    elif forward is not None:
        forward = _unwrapped(forward)
    if "forward" in d:
        own = forward is not None and not (
            isinstance(forward, types.MethodType) and forward.__self__ is module
            and forward.__func__ is getattr(type(module), "forward", None)
        )
        if own:
            state["forward"] = forward
        else:
            state.pop("forward", None)  # the class's forward: nothing to keep
    return state
