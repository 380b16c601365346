"""Install and uninstall the cache's hooks on a transformer (and find them again)."""
from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry

from ..adapters import find_blocks
from . import CAPTURE_HOOK, ROOT_HOOK
from .block import BlockHook
from .site import CaptureHook

_TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


def _unwrap(m):
    return getattr(m, "_orig_mod", m)  # torch.compile's OptimizedModule


def transformers(target) -> list[torch.nn.Module]:
    """The denoiser(s) of a pipeline, or the transformer itself."""
    if isinstance(target, torch.nn.Module):
        return [_unwrap(target)]
    models = [_unwrap(getattr(target, n)) for n in _TRANSFORMER_COMPONENTS if getattr(target, n, None) is not None]
    if not models:
        raise TypeError(
            f"svdcache: expected a diffusers pipeline with a transformer, or a transformer model; got {type(target).__name__}"
        )
    return models


def root_of(model, name: str = ROOT_HOOK):
    """The root hook of that name on ``model``, or None."""
    reg = getattr(model, "_diffusers_hook", None)
    return None if reg is None else reg.get_hook(name)


def plan(model, granularity: str, blocks=None, streams=None):
    """(blocks, feature dims): what :func:`svdcache.adapters.find_blocks` chose, and the features it knows now."""
    blocks = find_blocks(model, granularity, blocks=blocks, streams=streams)
    return blocks, feature_dims(blocks)


def feature_dims(blocks) -> dict[str, int]:
    return {f"{n}.{loc}": D for n, b, a in blocks for loc, D in a.feature_dims(b).items()}


def install(model, controller, blocks, *, root_name: str = ROOT_HOOK, skip: set[str] = frozenset(),
            captures: list | None = None, call_checks: list | None = None) -> None:
    """Wrap ``blocks`` ((name, block, adapter)) in block hooks and their feature sites in capture hooks (all
    pointing at ``controller``), and register ``controller`` as the model's root hook. ``skip``: features not
    captured (no cached step reads them); ``captures`` / ``call_checks``: the controller's lists of its capture
    hooks and of the adapters that refuse some calls. Every hook is in place before any call, and the
    child-registry cache invalidated, so pipeline cache contexts reach adapters' own registry hooks
    (diffusers caches the list of child registries)."""
    captures = [] if captures is None else captures
    wrappers: list = []
    model.__dict__.setdefault("_svdcache_wrappers", {})[root_name] = wrappers  # detached by uninstall
    for name, block, adapter in blocks:
        bh = BlockHook(controller, name, adapter)
        bh.attach(block)
        wrappers.append(bh)
        if call_checks is not None and adapter.refuses_calls and adapter not in call_checks:
            call_checks.append(adapter)
        for _, sub, outputs in adapter.capture_points(block):
            if callable(outputs):  # an adapter's own hook
                HookRegistry.check_if_exists_or_initialize(sub).register_hook(outputs(bh), CAPTURE_HOOK)
                continue
            outputs = [(n, i) for n, i in outputs if f"{name}.{n}" not in skip]
            if not outputs:
                continue
            hook = CaptureHook(bh, outputs)
            hook.attach(sub)
            captures.append(hook)
            wrappers.append(hook)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(controller, root_name)
    registry.invalidate_child_registries_cache()


def uninstall(model, root_name: str = ROOT_HOOK) -> bool:
    """Remove every hook ``install`` put on ``model`` under ``root_name``; False if there was none."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or registry.get_hook(root_name) is None:
        return False
    registry.remove_hook(root_name, recurse=False)
    registry.remove_hook(CAPTURE_HOOK, recurse=True)  # adapters' own hooks
    for hook in reversed(model.__dict__.get("_svdcache_wrappers", {}).pop(root_name, [])):
        hook.detach()
    registry.invalidate_child_registries_cache()
    return True
