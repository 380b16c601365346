"""Gate-aware submodule level for any transformer block: the outputs of the attention and
feed-forward submodules inside a block are the cached features. On a cached step the block's own
forward runs (its norms, AdaLN modulation and gates of the current step, its residual adds), and
each heavy submodule returns the forecast of its output instead of computing it; tuple outputs
(joint attention's (hidden, encoder)) keep their structure, a None stays None.

Heavy submodules are found by class: diffusers' ``Attention`` / ``AttentionModuleMixin`` and
``FeedForward``, and, for families with their own classes, a class name naming an attention, an MLP
or a feed-forward (outermost such module that holds parameters; norms, embeddings and processors
excluded). An attention's output projection that the block calls itself, outside the attention's
forward (LuminaNext mixes two attentions' outputs, then runs ``attn2.to_out[0]``), is a feature of its
own: its hook passes through while its attention runs and caches only the block's own calls.
Features are named ``<block>.<submodule path>`` (``#n`` for the n-th call of a module
called more than once per block call, ``.i`` for the i-th tensor of a tuple output) and learned on
the first full step (their dim from the output).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.hooks import ModelHook

from .base import BlockAdapter

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


class _Slot:
    """How one heavy submodule's output is rebuilt on a cached step: a tensor, None, or a tuple/list
    of those (other values of a full step are kept as they were)."""

    def __init__(self, out, name: str):
        if isinstance(out, torch.Tensor):
            self.kind, self.names = "tensor", [name]
        elif isinstance(out, (tuple, list)):
            self.kind = type(out)
            self.names = [f"{name}.{i}" if isinstance(o, torch.Tensor) else None for i, o in enumerate(out)]
            self.consts = [None if isinstance(o, torch.Tensor) else o for o in out]
        else:
            raise TypeError(f"{name}: output of type {type(out).__name__} cannot be cached")

    def features(self, out) -> list[tuple[str, torch.Tensor]]:
        if self.kind == "tensor":
            return [(self.names[0], out)]
        return [(n, o) for n, o in zip(self.names, out) if n is not None]

    def rebuild(self, forecast):
        if self.kind == "tensor":
            return forecast(self.names[0])
        return self.kind(c if n is None else forecast(n) for n, c in zip(self.names, self.consts))


class SubmoduleHook(ModelHook):
    """On a heavy submodule: records its output on full steps of its block, returns the forecast of
    it on cached steps (without computing), and computes normally outside the cached blocks."""

    def __init__(self, block_hook, adapter: "SubmoduleAdapter", path: str):
        super().__init__()
        self.block_hook = block_hook
        self.adapter = adapter
        self.path = path

    def new_forward(self, module, *args, **kwargs):
        bh = self.block_hook
        if bh.active_forecast is not None:
            name = self.adapter.call_name(bh, self.path)
            slot = self.adapter.slots.get((id(bh), name))
            if slot is None:
                raise RuntimeError(f"svdcache: {bh.name}.{name} was not computed on the last full step; "
                                   "its output cannot be forecast")
            return slot.rebuild(lambda n: _contiguous(bh.active_forecast(n)))
        running, key = self.adapter.running, (id(bh), self.path)
        running.add(key)
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            running.discard(key)
        if bh.active_record is not None:
            name = self.adapter.call_name(bh, self.path)
            key = (id(bh), name)
            slot = self.adapter.slots.get(key)
            if slot is None:
                slot = self.adapter.slots[key] = _Slot(out, name)
            for n, o in slot.features(out):
                # rows with unit channel stride for the kernels
                bh.active_record(n, o.contiguous() if o is not None else None)
        return out


class ProjectionHook(SubmoduleHook):
    """On an attention's output projection: a plain Linear while its attention runs; called by the
    block itself (outside the attention's forward) it is a cached feature like any heavy submodule."""

    def __init__(self, block_hook, adapter, parent: str, path: str):
        super().__init__(block_hook, adapter, path)
        self.parent = parent

    def new_forward(self, module, *args, **kwargs):
        if (id(self.block_hook), self.parent) in self.adapter.running:
            return self.fn_ref.original_forward(*args, **kwargs)
        return super().new_forward(module, *args, **kwargs)


def _contiguous(x):
    return x if x is None else x.contiguous()


class SubmoduleAdapter(BlockAdapter):
    """Submodule level for blocks holding heavy submodules (see the module docstring)."""

    granularity = "submodule"
    needs_forward = True

    def __init__(self):
        self.slots: dict[tuple[int, str], _Slot] = {}
        self._calls: dict[int, dict[str, int]] = {}  # per block hook: calls of each path in this block call
        self.running: set[tuple[int, str]] = set()  # (block hook, path) of heavy submodules running now

    def applies(self, block: torch.nn.Module) -> bool:
        return bool(heavy_submodules(block))

    def feature_dims(self, block):
        return {}  # learned on the first full step (declared by the block hook)

    def capture_points(self, block):
        points = [(path, mod, lambda bh, p=path: SubmoduleHook(bh, self, p)) for path, mod in heavy_submodules(block)]
        points += [(path, mod, lambda bh, a=parent, p=path: ProjectionHook(bh, self, a, p))
                   for parent, path, mod in escaping_projections(block)]
        return points

    def call_name(self, bh, path: str) -> str:
        calls = self._calls.setdefault(id(bh), {})
        n = calls.get(path, 0)
        calls[path] = n + 1
        return path if n == 0 else f"{path}#{n}"

    def _start(self, bh_id: int) -> None:
        self._calls[bh_id] = {}

    def full_forward(self, block, forward, args, kwargs, record) -> Any:
        self._start(_hook_id(block))
        return forward(*args, **kwargs)

    def cached_forward(self, block, args, kwargs, forecast, forward=None) -> Any:
        self._start(_hook_id(block))
        return forward(*args, **kwargs)


def _hook_id(block) -> int:
    from ..hooks import BLOCK_HOOK

    return id(block._diffusers_hook.get_hook(BLOCK_HOOK))
