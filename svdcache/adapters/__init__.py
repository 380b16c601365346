"""Model adapters: which blocks of a transformer are cached, and how.

One mechanism serves all models: blocks are found under diffusers' block identifiers and cached at
block level (generic.py); a model family with a module-level adapter (flux.py) gets that instead.
"""
from __future__ import annotations

import torch

from .base import BlockAdapter
from .flux import ADAPTERS as _FLUX
from .generic import GenericBlockAdapter

MODULE_ADAPTERS: dict[str, type[BlockAdapter]] = {**_FLUX}


def _block_identifiers() -> tuple[str, ...]:
    try:
        from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

        return tuple(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)
    except Exception:  # older diffusers
        return ("blocks", "transformer_blocks", "single_transformer_blocks", "temporal_transformer_blocks", "layers")


def model_dim(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", {}) or {}
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    return getattr(model, "inner_dim", None)


def find_blocks(model: torch.nn.Module, granularity: str = "auto") -> list[tuple[str, torch.nn.Module, BlockAdapter]]:
    """(name, block, adapter) for every transformer block of ``model``, in execution order."""
    generic = GenericBlockAdapter(model_dim(model))
    module_level: dict[str, BlockAdapter] = {}
    found = []
    for ident in _block_identifiers():
        blocks = getattr(model, ident, None)
        if not isinstance(blocks, torch.nn.ModuleList):
            continue
        for i, block in enumerate(blocks):
            cls = type(block).__name__
            if granularity in ("auto", "module") and cls in MODULE_ADAPTERS:
                adapter = module_level.setdefault(cls, MODULE_ADAPTERS[cls]())
            elif granularity == "module":
                raise ValueError(
                    f"no module-level adapter for {cls} (have: {sorted(MODULE_ADAPTERS)}); use granularity='block'"
                )
            else:
                adapter = generic
            found.append((f"{ident}.{i}", block, adapter))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no transformer blocks under diffusers' block identifiers "
            f"{_block_identifiers()}: nothing to cache"
        )
    return found


__all__ = ["BlockAdapter", "GenericBlockAdapter", "MODULE_ADAPTERS", "find_blocks", "model_dim"]
