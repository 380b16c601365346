"""The public calls: enable / disable / reset / stats / generation on a diffusers pipeline or a bare transformer."""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from dataclasses import fields

import torch

from .adapters import basis_granularity, last_plan
from .basis import Basis, load_basis
from . import choice, env
from .config import SVDCacheConfig
from .hooks import CALIBRATION_HOOK
from .hooks.registry import install, plan, root_of, transformers, uninstall
from .hooks.root import SVDCacheHook
from .runtime.distributed import check_parallel_model, gather_stats, parallel_of
from .runtime.guards import refuse_foreign_cache, refuse_non_denoiser
from .runtime.stats import CacheStats

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
        unknown = sorted(set(overrides) - {f.name for f in fields(SVDCacheConfig)} - {"resolved"})
        if unknown:
            raise TypeError(f"svdcache.enable: unknown setting(s) {unknown}; see svdcache.SVDCacheConfig")
        cfg = cfg.replace(**overrides)
    env_backend = env.backend()
    if cfg.backend == "auto" and env_backend is not None:  # the environment decides what "auto" means
        cfg = cfg.replace(backend=env_backend)
    if isinstance(basis, (str, os.PathLike)):
        basis = load_basis(basis)
    if basis is not None and not isinstance(basis, Basis):
        raise TypeError(f"basis must be an svdcache Basis or a path, got {type(basis).__name__}")
    # the configuration chosen for this model at calibration, in the settings not given (svdcache.choice)
    cfg = choice.apply(cfg, basis, choice.explicit_settings(config, overrides)).resolve()
    models = transformers(target)
    for model in models:
        refuse_non_denoiser(model)  # e.g. enable(pipe.text_encoder)
        refuse_foreign_cache(model)  # FirstBlockCache, TaylorSeerCache, ...: refused before anything changes
    if basis is not None and len(models) > 1:
        raise ValueError("this pipeline has several transformers: enable each one with its own basis")
    for model in models:
        if root_of(model, CALIBRATION_HOOK) is not None:
            raise ValueError("this model is being calibrated")
        uninstall(model)
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
        planned, dims = plan(model, granularity, blocks, streams)
        if use_basis is not None:
            use_basis.validate(model, dims)
            if cfg.subspace == "change":
                use_basis.subspace("change")  # a clear error if the basis holds none
        resolved = last_plan(model).key  # granularity ("module", "submodule", "block", a mix) and plan
        check_parallel_model(model)
        hook = SVDCacheHook(cfg, use_basis, dims, type(model).__name__, resolved, schedule_basis=basis)
        store = hook.store
        store.unread = {f"{n}.{loc}" for n, b, a in planned for loc in a.unread_features(b)}
        if store.online is not None:
            store.online.parallel = parallel_of(model)  # zero-setup basis: all-reduce over the model's ranks
        if not isinstance(target, torch.nn.Module) and getattr(target, "scheduler", None) is not None:
            # its scheduler at each call (replaced or not): the step count of each run (tail, calibrated schedules)
            hook.decider.pipeline = weakref.ref(target)
        # features no cached step reads are not captured (a module none of whose outputs is read gets no hook),
        # except while a basis is built online: it learns every feature
        install(model, hook, planned, skip=store.unread if store.online is None else set(), captures=hook.captures,
                call_checks=hook.call_checks)
    return cfg


def disable(target) -> bool:
    """Remove SVD-Cache; the model computes exactly as before. Returns False if it was not enabled."""
    removed = False
    for model in transformers(target):
        removed |= uninstall(model)
    return removed


def reset(target) -> None:
    """Start a new generation on the next call (pipelines do this themselves at the end of a call;
    a bare transformer in a user's loop is reset by the timestep going up, or by this)."""
    for m in transformers(target):
        hook = root_of(m)
        if hook is not None:
            hook.new_generation()


def is_enabled(target) -> bool:
    return any(root_of(m) is not None for m in transformers(target))


def stats(target, all_ranks: bool = False) -> CacheStats:
    """Steps computed vs forecast, FLOPs, cache memory and ranks (per generation and cumulative).

    ``all_ranks=True`` (multi-GPU): every rank of the model's parallel group must call it; one
    all-gather returns a :class:`svdcache.distributed.ParallelCacheStats` with every rank's stats and
    the cache memory per rank and in total. Nothing is exchanged otherwise."""
    models = transformers(target)
    hooks = [root_of(m) for m in models]
    if not any(hooks):
        raise ValueError("svdcache is not enabled on this pipeline/model")
    model, hook = next((m, h) for m, h in zip(models, hooks) if h is not None)
    if all_ranks:
        return gather_stats(model, hook.stats())
    return hook.stats()


def current_basis(target) -> Basis | None:
    """The basis in use (e.g. one built online), to save and reuse."""
    hooks = [root_of(m) for m in transformers(target)]
    return next((h.basis for h in hooks if h is not None), None)


@contextmanager
def generation(target):
    """Every transformer call inside the block belongs to one new generation: the state of earlier
    calls is dropped on entry and on exit, and no restart is guessed from the timesteps or the
    inputs in between (use it with stochastic samplers, or any loop the guessing gets wrong).
    Pipelines need none: they reset the cache at the end of each call."""
    hooks = [h for h in (root_of(m) for m in transformers(target)) if h is not None]
    if not hooks:
        raise ValueError("svdcache.generation: svdcache is not enabled on this pipeline/model (svdcache.enable first)")
    for h in hooks:
        h.begin_explicit()
    try:
        yield
    finally:
        for h in hooks:
            h.end_explicit()
