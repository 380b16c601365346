"""What a model adapter tells the runtime: the cached features of a block, and its cached forward."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

BLOCK_ATTR = "_svdcache_block_hook"  # a cached block's hook, in the block's __dict__ while attached


def block_hook_of(block: torch.nn.Module):
    """The block hook on ``block`` (adapters that find it from inside the block's own forward), or None."""
    return block.__dict__.get(BLOCK_ATTR)


Record = Callable[[str, torch.Tensor], None]  # (local feature name, feature) on a full step
Forecast = Callable[..., torch.Tensor]  # (local name, x=, gate=, out=) -> F_hat or x + gate * F_hat


class BlockAdapter:
    """How one block class is cached. One instance serves every block of that class."""

    #: cache granularity this adapter implements ("module" or "block")
    granularity = "block"
    #: the full forward is the block's own forward (capture hooks record): the runtime calls it directly
    plain_full_forward = False
    #: the cached forward runs the block's own forward (its sites return forecasts): it is passed ``forward=``
    needs_forward = False

    def feature_dims(self, block: torch.nn.Module) -> dict[str, int]:
        """Local feature name -> channel dim D."""
        raise NotImplementedError

    def capture_points(self, block: torch.nn.Module) -> list[tuple[str, torch.nn.Module, list[tuple[str, int | None]]]]:
        """Submodules whose outputs are cached features: (path, module, [(feature, output index)])."""
        return []

    def full_forward(self, block, forward, args, kwargs, record: Record) -> Any:
        if self.plain_full_forward:  # the block's own forward (its capture points record)
            return forward(*args, **kwargs)
        raise NotImplementedError

    def cached_forward(self, block, args, kwargs, forecast: Forecast) -> Any:
        raise NotImplementedError

    @property
    def refuses_calls(self) -> bool:
        """It overrides :meth:`check_call` (the root hook runs those at the start of every call)."""
        return type(self).check_call is not BlockAdapter.check_call

    def check_call(self, kwargs: dict) -> None:
        """Raise before any work on a transformer call (its keyword arguments) this adapter's blocks cannot
        cache (default: none)."""

    def unread_features(self, block: torch.nn.Module) -> set[str]:
        """Local features a cached step never forecasts (given what ``bind`` learned of the model): their
        full steps need not update a cache for them (default: none)."""
        return set()

    def passthrough(self, block, args, kwargs) -> Any:
        """The block's output with its streams unchanged (what it returns when its cached terms were
        deferred to a later block: svdcache.deferred). Only adapters that defer implement it."""
        raise NotImplementedError

    def watched_paths(self, block: torch.nn.Module) -> list[str]:
        """Submodules of ``block`` (paths) the adapter reads besides its capture points (weights it uses
        directly): if one is replaced after install (a LoRA layer around it), the model is planned again
        (default: none)."""
        return []

    def bind(self, model: torch.nn.Module, blocks: list) -> None:
        """Called once the whole plan (``[(name, block, adapter)]``) of ``model`` is known: what an adapter
        may conclude from the model around its blocks (default: nothing)."""


def bind_arguments(block: torch.nn.Module, args, kwargs) -> dict[str, Any]:
    """The block's forward arguments by name, however they were passed."""
    if not args:
        return kwargs
    sig = _signature(type(block))
    bound = sig.bind_partial(*args, **kwargs)
    return dict(bound.arguments)


_SIGS: dict[type, inspect.Signature] = {}


def _signature(cls: type) -> inspect.Signature:
    if cls not in _SIGS:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop self
        _SIGS[cls] = inspect.Signature(params)
    return _SIGS[cls]
