"""Which submodules of a block are heavy (the work a cached step skips): attention / feed-forward / MLP
modules found by class, the MLP input projection of parallel blocks, the attention output projections a
block may call itself, and the block-level Linears that may be a fused projection."""
from __future__ import annotations

import re

import torch


_NAME = re.compile(r"(Attention|Attn|FeedForward|MLP|Mlp|FFN|Ffn|GLU|MoE|Moe)")
# a block's own class may name MoE or attention ("...MoEImageTransformerBlock"): blocks are no submodules
_NOT = re.compile(r"(Processor|Norm|Embed|Pool|Rotary|RoPE|Router|Gate$|Block|Layer$|Transformer)")


def _diffusers_classes() -> tuple[type, ...]:
    classes = []
    try:
        from diffusers.models.attention_processor import Attention

        classes.append(Attention)
    except Exception:
        pass
    try:
        from diffusers.models.attention import AttentionModuleMixin, FeedForward

        classes += [AttentionModuleMixin, FeedForward]
    except Exception:
        pass
    return tuple(classes)


_CLASSES = _diffusers_classes()


def is_heavy(module: torch.nn.Module) -> bool:
    """An attention / feed-forward / MLP submodule: the work a cached step skips."""
    if isinstance(module, _CLASSES):
        return True
    name = type(module).__name__
    return bool(_NAME.search(name)) and not _NOT.search(name) and next(module.parameters(), None) is not None


# the MLP input projection of parallel attention + MLP blocks (FLUX / HunyuanVideo single blocks:
# ``proj_mlp``), a bare Linear: named, not typed
_MLP_LINEAR = re.compile(r"^(proj_mlp|mlp_in|ff_in)$")
# output projections of an attention, relative to it: a block may call one itself (see the docstring)
_OUT_PROJ = re.compile(r"^(to_out(\.0)?|to_add_out|proj_out|o_proj|out_proj)$")


def escaping_projections(block: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """(heavy path, projection path, projection) for the output-projection Linears of the block's heavy
    attention submodules: hooked so that a call from the block itself is cached too."""
    out = []
    for path, mod in heavy_submodules(block):
        for rel, child in mod.named_modules():
            if rel and isinstance(child, torch.nn.Linear) and _OUT_PROJ.match(rel):
                out.append((path, f"{path}.{rel}", child))
    return out


def heavy_submodules(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost heavy submodules of ``block`` (not the block itself), in registration order."""
    found: list[tuple[str, torch.nn.Module]] = []
    for path, mod in block.named_modules():
        if not path or any(path.startswith(p + ".") for p, _ in found):
            continue
        if is_heavy(mod) or (isinstance(mod, torch.nn.Linear) and _MLP_LINEAR.match(path)):
            found.append((path, mod))
    return found


_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def block_projections(block: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """Linears of the block itself (direct children, or inside plain containers: ``proj_out``,
    ``to_out.0``), outside its heavy submodules: candidates for a fused projection (module docstring)."""
    heavy = [p for p, _ in heavy_submodules(block)]
    mods = dict(block.named_modules())
    out = []
    for path, mod in mods.items():
        if not path or not isinstance(mod, torch.nn.Linear):
            continue
        if any(path == h or path.startswith(h + ".") for h in heavy):
            continue
        parts = path.split(".")
        if all(isinstance(mods[".".join(parts[:i])], _CONTAINERS) for i in range(1, len(parts))):
            out.append((path, mod))
    return out
