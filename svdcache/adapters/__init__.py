"""Model adapters: which blocks of a transformer are cached, and how.

Blocks are the elements of every ModuleList whose elements hold attention / feed-forward submodules
(or the lists a user names). Each block is cached at the gate-aware submodule level by default
(submodule.py: attention / feed-forward outputs; the block's norms, gates and residual adds run
every step), at block level on request (generic.py: output minus input per stream), and a family
with a module-level adapter (flux.py) gets that instead.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .base import BlockAdapter
from .flux import ADAPTERS as _FLUX
from .generic import GenericBlockAdapter
from .heavy import heavy_submodules, is_heavy
from .submodule import SubmoduleAdapter

MODULE_ADAPTERS: dict[str, type[BlockAdapter]] = {**_FLUX}


# the block-list names diffusers' own hooks know, in their order (diffusers.hooks._common, 0.42)
BLOCK_IDENTIFIERS = ("blocks", "temporal_transformer_blocks", "layers", "transformer_blocks", "visual_transformer_blocks",
                     "single_transformer_blocks")


def model_dim(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    # a diffusers config is a dict; another library's (a transformers model's) an object with attributes
    get = cfg.get if isinstance(cfg, dict) else (lambda key: getattr(cfg, key, None))
    heads, head_dim = get("num_attention_heads"), get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    return getattr(model, "inner_dim", None)


@dataclass
class Plan:
    """What ``find_blocks`` chose for a model: the blocks and their adapters, the block lists cached,
    and those left uncached with the reason (named in one warning); ``request``: find_blocks' arguments
    (to plan again on the model as it is later: svdcache.hooks.registry.replan)."""

    blocks: list = field(default_factory=list)
    granularity: str = "block"
    cached_lists: list = field(default_factory=list)
    uncached_lists: dict = field(default_factory=dict)
    request: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The granularity and which blocks get which adapter: keys the model's FLOP table, so two
        plans of one granularity (``blocks=`` given or not) do not share counts."""
        import hashlib

        desc = ";".join(f"{n}={type(a).__name__}" for n, _, a in self.blocks)
        return f"{self.granularity}:{hashlib.sha1(desc.encode()).hexdigest()[:10]}"


def block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """Every ModuleList of blocks in ``model``, in registration order: a list whose every element holds
    an attention / feed-forward submodule (found by class) and is none itself; lists inside a block
    of an earlier list (an attention's ``to_out``, a feed-forward's ``net``) are not block lists.
    diffusers' block identifiers come first in the order they list them."""
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or not len(mod):
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue
        if all(not is_heavy(b) and heavy_submodules(b) for b in mod):
            found.append((path, mod))
    idents = BLOCK_IDENTIFIERS
    return sorted(found, key=lambda pm: (idents.index(pm[0]) if pm[0] in idents else len(idents)))


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def _not_callable(lst: torch.nn.ModuleList) -> bool:
    """Elements that are containers (ConsisID's ``[attention, feed-forward]`` pairs) are never called
    as blocks: the model iterates into them, so no block hook would run."""
    return any(isinstance(b, _CONTAINERS) for b in lst)


def _resolve_lists(model, blocks) -> list[tuple[str, list[tuple[str, torch.nn.Module]]]]:
    """A user's ``blocks=[...]``: paths of ModuleLists or of single blocks."""
    out = []
    for path in blocks:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"svdcache: blocks={blocks!r}: {type(model).__name__} has no submodule {path!r}") from None
        if isinstance(mod, torch.nn.ModuleList):
            out.append((path, [(f"{path}.{i}", b) for i, b in enumerate(mod)]))
        else:
            out.append((path, [(path, mod)]))
    return out


def _adapter_for(block, granularity, module_level, generic, submodule):
    cls = type(block).__name__
    if granularity in ("auto", "module") and cls in MODULE_ADAPTERS:
        return module_level.setdefault(cls, MODULE_ADAPTERS[cls]())
    if granularity == "module":
        raise ValueError(
            f"no module-level adapter for {cls} (have: {sorted(MODULE_ADAPTERS)}); use granularity='auto', "
            "'submodule' or 'block'"
        )
    if granularity in ("auto", "submodule") and submodule.applies(block):
        return submodule
    return generic


def find_blocks(model: torch.nn.Module, granularity: str = "auto", blocks=None, streams=None):
    """(name, block, adapter) for every transformer block of ``model``, in registration order.

    Blocks: every ModuleList of blocks (:func:`block_lists`), or the user's ``blocks`` (paths of
    ModuleLists or single blocks). Adapter per block: a family's module-level adapter (FLUX) for
    "auto"/"module"; the gate-aware submodule level (attention / feed-forward outputs) for
    "auto"/"submodule" where the block holds such submodules; else block level (``streams``: the
    block's argument names per stream, e.g. ``{"hidden": "x"}``). Lists not cached are named in
    one warning. The plan is kept on the model (:func:`last_plan`).
    """
    generic = GenericBlockAdapter(model_dim(model), streams=streams)
    submodule = SubmoduleAdapter()
    module_level: dict[str, BlockAdapter] = {}
    plan = Plan(request=dict(granularity=granularity, blocks=blocks, streams=streams))
    if blocks is not None:
        chosen = _resolve_lists(model, list(blocks))
        names = {p for p, _ in chosen}
        for path, _ in block_lists(model):
            if path not in names and not any(path.startswith(n + ".") or n.startswith(path + ".") for n in names):
                plan.uncached_lists[path] = "not in blocks=[...]"
    else:
        chosen = []
        for p, lst in block_lists(model):
            if _not_callable(lst):
                plan.uncached_lists[p] = "its elements are module lists, not blocks called as a whole"
            else:
                chosen.append((p, [(f"{p}.{i}", b) for i, b in enumerate(lst)]))
    kinds = []
    for path, members in chosen:
        for name, block in members:
            adapter = _adapter_for(block, granularity, module_level, generic, submodule)
            kinds.append(adapter.granularity)
            plan.blocks.append((name, block, adapter))
        plan.cached_lists.append(path)
    if not plan.blocks:
        raise ValueError(
            f"{type(model).__name__} has no transformer blocks (no ModuleList whose elements hold attention or "
            f"feed-forward modules): nothing to cache; name them with svdcache.enable(model, blocks=[...])"
        )
    for adapter in {id(a): a for _, _, a in plan.blocks}.values():
        adapter.bind(model, plan.blocks)
    order = ("module", "submodule", "block")
    plan.granularity = "+".join(k for k in order if k in kinds)
    if plan.uncached_lists:
        listed = "; ".join(f"{p} ({why})" for p, why in plan.uncached_lists.items())
        warnings.warn(f"svdcache: block lists left uncached (computed on every step): {listed}", stacklevel=3)
    model.__dict__["_svdcache_plan"] = plan
    return plan.blocks


def basis_granularity(basis) -> str | None:
    """The granularity a basis was calibrated at: recorded since svdcache 0.1's submodule level;
    older files said "auto", which meant block level for every model but FLUX (its features end
    in ``.hidden`` / ``.encoder`` there)."""
    g = basis.meta.get("granularity")
    if g in ("module", "submodule", "block"):
        return g
    if any(n.endswith((".hidden", ".encoder")) for n in basis.features):
        return "block"
    return None


def last_plan(model: torch.nn.Module) -> Plan | None:
    """The plan of the last :func:`find_blocks` on ``model`` (enable / calibrate)."""
    return getattr(model, "_svdcache_plan", None)


__all__ = ["BlockAdapter", "GenericBlockAdapter", "MODULE_ADAPTERS", "Plan", "SubmoduleAdapter", "basis_granularity",
           "block_lists", "find_blocks", "last_plan", "model_dim"]
