"""The submodule level's own feature sites: hooks on a block's heavy submodules (record a full step's
output, return the forecast on a cached one), on attention output projections a block calls itself, and on
block-level Linears verified to be a fused projection (see svdcache.adapters.submodule)."""
from __future__ import annotations

import torch
from diffusers.hooks import ModelHook


def width_of(out) -> int | None:
    """Channel width of a heavy call's output: a tensor's last dim, or the common last dim of a tuple's
    tensors (joined along the tokens by the block, as HunyuanVideo's image and text attention outputs)."""
    if isinstance(out, torch.Tensor):
        return out.shape[-1] if out.dim() else None
    if isinstance(out, (tuple, list)):
        ws = {o.shape[-1] for o in out if isinstance(o, torch.Tensor) and o.dim()}
        return ws.pop() if len(ws) == 1 else None
    return None


PLACEHOLDERS: dict[tuple, torch.Tensor] = {}


def placeholder(shape, dtype, device) -> torch.Tensor:
    """Zeros of ``shape`` as a stride-0 view of one scalar (nothing computed, nothing written per call).
    In-place writes into an overlapping view raise; a one-element view could be written, so the
    scalar is replaced once its version counter moved (host-side, no sync)."""
    key = (dtype, device)
    z = PLACEHOLDERS.get(key)
    if z is None or z._version != 0:
        z = PLACEHOLDERS[key] = torch.zeros((), dtype=dtype, device=device)
    return z.expand(shape)


def same_output(a, b) -> bool:
    """The same outputs, bit for bit (tensors anywhere in tuples / lists / dicts)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_output(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_output(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def clone_output(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if type(out) in (tuple, list):
        return type(out)(clone_output(o) for o in out)
    if type(out) is dict:
        return {k: clone_output(v) for k, v in out.items()}
    return out


def cat_widths(ws: list[int]) -> set[int]:
    """Widths of a concatenation of tensors of widths ``ws``, each whole or halved."""
    sums = {0}
    for w in ws:
        sums = {t + v for t in sums for v in ((w, w // 2) if w % 2 == 0 else (w,))}
    return sums


class Fusion:
    """A verified fused projection of one block: the projection's call name (its feature) and the
    heavy calls whose outputs only feed it."""

    __slots__ = ("proj", "fed")

    def __init__(self, proj: str, fed: frozenset[str]):
        self.proj, self.fed = proj, fed


class Slot:
    """How one heavy submodule's output is rebuilt on a cached step: a tensor, None, or a tuple/list
    of those (other values of a full step are kept as they were). A slot whose output feeds a fused
    projection (``fused``) is rebuilt as zero placeholders of the last full step's shapes instead."""

    fused = False
    meta = None

    def note(self, out) -> None:
        """The shapes of a full step's output (for the placeholders of the cached steps after it)."""
        if self.kind == "tensor":
            self.meta = [(out.shape, out.dtype, out.device)]
        else:
            self.meta = [(o.shape, o.dtype, o.device) if isinstance(o, torch.Tensor) else None for o in out]

    def blank(self):
        if self.kind == "tensor":
            return placeholder(*self.meta[0])
        return self.kind(c if m is None else placeholder(*m) for m, c in zip(self.meta, self.consts))

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
        bh, ad = self.block_hook, self.adapter
        if bh.active_forecast is not None:
            name = ad.call_name(bh, self.path)
            slot = ad.slots.get((id(bh), name))
            if slot is None:
                raise RuntimeError(f"svdcache: {bh.name}.{name} was not computed on the last full step; "
                                   "its output cannot be forecast")
            if slot.fused:  # feeds a fused projection, which returns the forecast
                return slot.blank()
            return slot.rebuild(lambda n: contiguous_or_none(bh.active_forecast(n)))
        if ad.verifying:  # the check run of a fused projection (SubmoduleAdapter._verify)
            fu = ad.verifying.get(id(bh))
            if fu is not None:
                return ad.check_output(bh, fu, ad.call_name(bh, self.path), self.fn_ref, args, kwargs)
        running, key = ad.running, (id(bh), self.path)
        running.add(key)
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            running.discard(key)
        if bh.active_record is not None:
            name = ad.call_name(bh, self.path)
            key = (id(bh), name)
            slot = ad.slots.get(key)
            if slot is None:
                slot = ad.slots[key] = Slot(out, name)
            probe = ad.probing.get(id(bh))
            if probe is not None:
                probe.append((False, name, width_of(out)))
                ad.outputs[id(bh)][name] = clone_output(out)
            if slot.fused:
                slot.note(out)
                return out
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


class FusedProjectionHook(ModelHook):
    """On a block-level Linear that may be a fused projection (module docstring): a plain Linear
    unless its block's first full step verified it; then its output is the feature (full steps) or
    the forecast of it (cached steps)."""

    def __init__(self, block_hook, adapter: "SubmoduleAdapter", path: str):
        super().__init__()
        self.block_hook = block_hook
        self.adapter = adapter
        self.path = path
        adapter.candidates.add(id(block_hook))

    def new_forward(self, module, *args, **kwargs):
        bh, ad = self.block_hook, self.adapter
        fu = ad.fusion.get(id(bh))
        if bh.active_forecast is not None:
            if fu is not None and ad.call_name(bh, self.path) == fu.proj:
                return contiguous_or_none(bh.active_forecast(fu.proj))
            return self.fn_ref.original_forward(*args, **kwargs)
        if ad.verifying:
            v = ad.verifying.get(id(bh))
            if v is not None:
                return ad.check_output(bh, v, ad.call_name(bh, self.path), self.fn_ref, args, kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if bh.active_record is not None:
            probe = ad.probing.get(id(bh))
            if probe is not None:
                name = ad.call_name(bh, self.path)
                x = args[0] if args else kwargs.get("input")
                ok = isinstance(x, torch.Tensor) and x.dim() and isinstance(out, torch.Tensor) and out.dim()
                w = (x.shape[-1], out.shape[-1]) if ok else None
                probe.append((True, name, w))
                ad.outputs[id(bh)][name] = clone_output(out)
            elif fu is not None and ad.call_name(bh, self.path) == fu.proj:
                bh.active_record(fu.proj, out.contiguous())
        return out


def contiguous_or_none(x):
    return x if x is None else x.contiguous()
