"""enable / disable / stats: SVD-Cache on a diffusers pipeline or a bare transformer."""
from __future__ import annotations

import os
import weakref

import torch
from diffusers.hooks import HookRegistry

from .adapters import basis_granularity, find_blocks, last_plan
from .adapters.base import BlockAdapter
from .basis import Basis, load_basis
from .config import SVDCacheConfig
from .distributed import check_parallel_model, gather_stats, parallel_of
from .guards import refuse_foreign_cache
from .hooks import BLOCK_HOOK, CAPTURE_HOOK, ROOT_HOOK, BlockHook, CaptureHook, SVDCacheHook
from .stats import CacheStats

_TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


def _unwrap(m):
    return getattr(m, "_orig_mod", m)  # torch.compile's OptimizedModule


def _transformers(target) -> list[torch.nn.Module]:
    """The denoiser(s) of a pipeline, or the transformer itself."""
    if isinstance(target, torch.nn.Module):
        return [_unwrap(target)]
    models = [_unwrap(getattr(target, n)) for n in _TRANSFORMER_COMPONENTS if getattr(target, n, None) is not None]
    if not models:
        raise TypeError(
            f"svdcache: expected a diffusers pipeline with a transformer, or a transformer model; got {type(target).__name__}"
        )
    return models


def _root(model):
    reg = getattr(model, "_diffusers_hook", None)
    return None if reg is None else reg.get_hook(ROOT_HOOK)


def _is_enabled(model) -> bool:
    return _root(model) is not None


def _plan(model, granularity: str, blocks=None, streams=None):
    blocks = find_blocks(model, granularity, blocks=blocks, streams=streams)
    dims = {}
    for name, block, adapter in blocks:
        for local, D in adapter.feature_dims(block).items():
            dims[f"{name}.{local}"] = D
    return blocks, dims


def _install(model, controller, granularity, root_name: str = ROOT_HOOK, blocks=None) -> dict[str, int]:
    """Register block and capture hooks (pointing at ``controller``) and the root hook. Every hook is
    registered before any call, and the child-registry cache invalidated, so pipeline cache
    contexts reach them (diffusers caches the list of child registries)."""
    if blocks is None:
        blocks, dims = _plan(model, granularity)
    else:
        dims = {f"{n}.{loc}": D for n, b, a in blocks for loc, D in a.feature_dims(b).items()}
    # features no cached step reads are not captured (a module none of whose outputs is read gets no hook),
    # except while a basis is built online: it learns every feature
    skip = getattr(controller, "unread", set()) if getattr(controller, "online", None) is None else set()
    captures = getattr(controller, "captures", [])
    model.__dict__.setdefault("_svdcache_captures", {})[root_name] = captures  # detached by _uninstall
    for name, block, adapter in blocks:
        bh = BlockHook(controller, name, adapter)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(bh, BLOCK_HOOK)
        bh.block, bh.wrapper = block, block.__dict__.get("forward")  # the forward the registry gave it (ours)
        if bh._plain and hasattr(controller, "plain_blocks"):
            controller.plain_blocks.append(bh)
        checks = getattr(controller, "call_checks", None)
        if checks is not None and type(adapter).check_call is not BlockAdapter.check_call and adapter not in checks:
            checks.append(adapter)
        for _, sub, outputs in adapter.capture_points(block):
            if not callable(outputs):
                outputs = [(n, i) for n, i in outputs if f"{name}.{n}" not in skip]
                if not outputs:
                    continue
            if callable(outputs):  # an adapter's own hook
                HookRegistry.check_if_exists_or_initialize(sub).register_hook(outputs(bh), CAPTURE_HOOK)
                continue
            hook = CaptureHook(bh, outputs)
            hook.attach(sub)
            captures.append(hook)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(controller, root_name)
    registry.invalidate_child_registries_cache()
    return dims


def _uninstall(model, root_name: str = ROOT_HOOK) -> bool:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or registry.get_hook(root_name) is None:
        return False
    registry.remove_hook(root_name, recurse=False)
    registry.remove_hook(BLOCK_HOOK, recurse=True)
    registry.remove_hook(CAPTURE_HOOK, recurse=True)
    for hook in reversed(model.__dict__.get("_svdcache_captures", {}).pop(root_name, [])):
        hook.detach()
    registry.invalidate_child_registries_cache()
    return True


def enable(target, basis: Basis | str | os.PathLike | None = None, config: SVDCacheConfig | None = None, *,
           blocks=None, streams=None, **overrides):
    """Turn SVD-Cache on for a diffusers pipeline or transformer; generate exactly as before.

    ``basis``: a :class:`Basis` (or the path of a saved one) from :func:`svdcache.calibrate`; with
    none, ``space="svd"`` builds one online from the first full steps of the first generation and
    keeps it. ``config`` and/or keyword overrides (``interval=5, predictor="taylor", ...``) set the
    behaviour, see :class:`SVDCacheConfig`. Enabling an enabled model replaces its cache. Returns
    the config in use.
    """
    cfg = config if config is not None else SVDCacheConfig()
    if not isinstance(cfg, SVDCacheConfig):
        raise TypeError(f"config must be an SVDCacheConfig, got {type(cfg).__name__}")
    if overrides:
        cfg = cfg.replace(**overrides)
    cfg.validate()
    env_backend = os.environ.get("SVDCACHE_BACKEND", "")
    if cfg.backend == "auto" and env_backend not in ("", "auto"):  # the environment decides what "auto" means
        if env_backend not in ("triton", "torch"):
            raise ValueError(f"SVDCACHE_BACKEND={env_backend!r} must be auto, triton or torch")
        cfg = cfg.replace(backend=env_backend)
    if isinstance(basis, (str, os.PathLike)):
        basis = load_basis(basis)
    if basis is not None and not isinstance(basis, Basis):
        raise TypeError(f"basis must be an svdcache Basis or a path, got {type(basis).__name__}")
    models = _transformers(target)
    for model in models:
        refuse_foreign_cache(model)  # FirstBlockCache, TaylorSeerCache, ...: refused before anything changes
    if basis is not None and len(models) > 1:
        raise ValueError("this pipeline has several transformers: enable each one with its own basis")
    for model in models:
        if getattr(getattr(model, "_diffusers_hook", None), "get_hook", lambda n: None)("svdcache_calibration"):
            raise ValueError("this model is being calibrated")
        _uninstall(model)
        granularity = cfg.granularity
        if granularity == "auto" and basis is not None and basis_granularity(basis) is not None:
            granularity = basis_granularity(basis)  # the granularity it was calibrated at
        use_basis = basis if cfg.space == "svd" else None
        if use_basis is not None and cfg.granularity != "auto":
            # block-level features are learned at the first full step: refuse a mismatch here, before any call
            bg = basis_granularity(use_basis)
            is_block = bg == "block"
            if (cfg.granularity == "block") != is_block:
                raise ValueError(
                    f"the basis was calibrated at {bg or 'module/submodule'} level (features like "
                    f"{next(iter(use_basis.features), None)!r}) but enable asked for granularity={cfg.granularity!r}: "
                    f"calibrate with granularity={cfg.granularity!r} or leave granularity='auto'")
        planned, dims = _plan(model, granularity, blocks, streams)
        if use_basis is not None:
            use_basis.validate(model, dims)
            if cfg.subspace == "change":
                use_basis.subspace("change")  # a clear error if the basis holds none
        resolved = last_plan(model).key  # granularity ("module", "submodule", "block", a mix) and plan
        check_parallel_model(model)
        hook = SVDCacheHook(cfg, use_basis, dims, type(model).__name__, resolved, schedule_basis=basis)
        hook.unread = {f"{n}.{loc}" for n, b, a in planned for loc in a.unread_features(b)}
        if hook.online is not None:
            hook.online.parallel = parallel_of(model)  # zero-setup basis: all-reduce over the model's ranks
        sched = None if isinstance(target, torch.nn.Module) else getattr(target, "scheduler", None)
        if sched is not None:
            hook.scheduler = weakref.ref(sched)  # the step count of each run (tail, calibrated schedules)
        _install(model, hook, granularity, blocks=planned)
    return cfg


def disable(target) -> bool:
    """Remove SVD-Cache; the model computes exactly as before. Returns False if it was not enabled."""
    removed = False
    for model in _transformers(target):
        removed |= _uninstall(model)
    return removed


def reset(target) -> None:
    """Start a new generation on the next call (pipelines do this themselves at the end of a call;
    a bare transformer in a user's loop is reset by the timestep going up, or by this)."""
    for m in _transformers(target):
        hook = _root(m)
        if hook is not None:
            hook.new_generation()


def is_enabled(target) -> bool:
    return any(_is_enabled(m) for m in _transformers(target))


def stats(target, all_ranks: bool = False) -> CacheStats:
    """Steps computed vs forecast, FLOPs, cache memory and ranks (per generation and cumulative).

    ``all_ranks=True`` (multi-GPU): every rank of the model's parallel group must call it; one
    all-gather returns a :class:`svdcache.distributed.ParallelCacheStats` with every rank's stats and
    the cache memory per rank and in total. Nothing is exchanged otherwise."""
    models = _transformers(target)
    hooks = [_root(m) for m in models]
    if not any(hooks):
        raise ValueError("svdcache is not enabled on this pipeline/model")
    model, hook = next((m, h) for m, h in zip(models, hooks) if h is not None)
    if all_ranks:
        return gather_stats(model, hook.stats())
    return hook.stats()


def current_basis(target) -> Basis | None:
    """The basis in use (e.g. one built online), to save and reuse."""
    hooks = [_root(m) for m in _transformers(target)]
    return next((h.basis for h in hooks if h is not None), None)
