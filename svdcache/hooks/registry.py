"""Install and uninstall the cache's hooks on a transformer (and find them again)."""
from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry

from ..adapters import find_blocks, last_plan
from . import CAPTURE_HOOK, ROOT_HOOK
from .block import BlockHook
from .copying import mark, unmark
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
    install_sites(model, controller, blocks, root_name=root_name, skip=skip, captures=captures,
                  call_checks=call_checks)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(controller, root_name)
    registry.invalidate_child_registries_cache()
    mark(model)  # a deepcopy / pickle of the model leaves the hooks out


def install_sites(model, controller, blocks, *, root_name: str = ROOT_HOOK, skip: set[str] = frozenset(),
                  captures: list | None = None, call_checks: list | None = None) -> None:
    """The block hooks and feature sites of :func:`install` (not the root hook), and the :class:`Watch` of
    where their modules sit in the model (:func:`watch_of`)."""
    captures = [] if captures is None else captures
    wrappers: list = []
    model.__dict__.setdefault("_svdcache_wrappers", {})[root_name] = wrappers  # detached by uninstall
    watched: list = []
    for name, block, adapter in blocks:
        watched.append((model, name))
        bh = BlockHook(controller, name, adapter)
        bh.attach(block)
        wrappers.append(bh)
        if call_checks is not None and adapter.refuses_calls and adapter not in call_checks:
            call_checks.append(adapter)
        watched += [(block, path) for path in adapter.watched_paths(block)]
        for path, sub, outputs in adapter.capture_points(block):
            watched.append((block, path))
            if callable(outputs):  # an adapter's own hook
                HookRegistry.check_if_exists_or_initialize(sub).register_hook(outputs(bh), CAPTURE_HOOK)
                mark(sub)
                continue
            outputs = [(n, i) for n, i in outputs if f"{name}.{n}" not in skip]
            if not outputs:
                continue
            hook = CaptureHook(bh, outputs)
            hook.attach(sub)
            captures.append(hook)
            wrappers.append(hook)
    model.__dict__.setdefault("_svdcache_watch", {})[root_name] = Watch(watched)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


class Watch:
    """Where the modules the hooks sit on (blocks, feature sites) and the adapters read (their
    ``watched_paths``) are in the model: ``changed()`` is True once one was replaced in its parent (a
    LoRA layer put around a cached Linear: ``pipe.load_lora_weights``, ``unload_lora_weights``; a block
    swapped), a few dict reads."""

    def __init__(self, where: list[tuple[torch.nn.Module, str]]):
        self.entries = []  # (the parent's child dict, the key, the module there at install)
        for root, path in where:
            parent, _, key = path.rpartition(".")
            try:
                owner = root.get_submodule(parent) if parent else root
            except AttributeError:
                continue
            d = owner.__dict__.get("_modules")
            if d is not None and key in d:
                self.entries.append((d, key, d[key]))

    def changed(self) -> bool:
        return any(d.get(k) is not m for d, k, m in self.entries)


# how many times a child module was set on any module of the process (torch's global registration hook,
# registered once): a root hook reads one int per call to know whether a Watch needs reading
_CHILDREN_SET = [0]
_CLOCK: list = []


def _count_child_set(module, name, submodule):
    _CHILDREN_SET[0] += 1


def children_clock() -> list[int]:
    """A one-element list whose value grows whenever a child module is set anywhere (``setattr(parent,
    name, module)``, ``ModuleList[i] = ...``: how peft puts its layers in): read it, compare, and read
    the :class:`Watch` only when it moved."""
    if not _CLOCK:
        _CLOCK.append(torch.nn.modules.module.register_module_module_registration_hook(_count_child_set))
    return _CHILDREN_SET


def watch_of(model, root_name: str = ROOT_HOOK) -> Watch | None:
    """The :class:`Watch` of the hooks installed under ``root_name``, or None."""
    return model.__dict__.get("_svdcache_watch", {}).get(root_name)


def replan(model, controller, unread, *, root_name: str = ROOT_HOOK) -> list:
    """The hooks of ``root_name`` put again onto ``model`` as it is now (modules replaced or wrapped since
    install), planned with the same request (:class:`svdcache.adapters.Plan`); the root hook stays.
    ``unread(blocks)``: the features not to capture. Returns the new plan's blocks."""
    uninstall_sites(model, root_name)
    request = getattr(last_plan(model), "request", None) or {}
    blocks = find_blocks(model, **request)
    del controller.captures[:], controller.call_checks[:]
    install_sites(model, controller, blocks, root_name=root_name, skip=unread(blocks), captures=controller.captures,
                  call_checks=controller.call_checks)
    return blocks


def uninstall(model, root_name: str = ROOT_HOOK) -> bool:
    """Remove every hook ``install`` put on ``model`` under ``root_name``; False if there was none."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or registry.get_hook(root_name) is None:
        return False
    registry.remove_hook(root_name, recurse=False)
    uninstall_sites(model, root_name)
    d = model.__dict__
    for k in ("_svdcache_wrappers", "_svdcache_watch"):
        if not d.get(k, True):
            del d[k]
    for m in model.modules():
        fwd = m.__dict__.get("forward")  # diffusers leaves the class's forward bound on the instance
        if getattr(fwd, "__self__", None) is m and getattr(fwd, "__func__", None) is getattr(type(m), "forward", None):
            del m.__dict__["forward"]
        unmark(m)
    return True


def uninstall_sites(model, root_name: str = ROOT_HOOK) -> None:
    """Remove the block hooks and feature sites of :func:`install_sites`."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(CAPTURE_HOOK, recurse=True)  # adapters' own hooks
    for hook in reversed(model.__dict__.get("_svdcache_wrappers", {}).pop(root_name, [])):
        hook.detach()
    model.__dict__.get("_svdcache_watch", {}).pop(root_name, None)
    registry.invalidate_child_registries_cache()
