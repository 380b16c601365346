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

Fused projections: where a block-level Linear (outside the heavy submodules: FLUX / HunyuanVideo /
Chroma / LongCat / Ovis / Bria single blocks' ``proj_out``) takes the outputs of the last heavy calls
before it, concatenated (its input wider than any of them, narrower than all together: the parallel
block's cat(attention, MLP)), that projection's output is the feature instead of theirs, and on a
cached step those heavy submodules return zero placeholders (stride-0 views, no compute) and the
projection returns its forecast. Not trusted from the names or widths: on the block's first full step
the block runs a second time (under no_grad) with the placeholders and the projection's recorded
output, and the guess is kept only where that reproduces the block's outputs bit for bit; else (the
heavy outputs reach the output another way too, the placeholders do not fit the block's ops) the
block keeps the per-submodule features, with one warning.
"""
from __future__ import annotations

import re
import warnings
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


def _width(out) -> int | None:
    """Channel width of a heavy call's output: a tensor's last dim, or the common last dim of a tuple's
    tensors (joined along the tokens by the block, as HunyuanVideo's image and text attention outputs)."""
    if isinstance(out, torch.Tensor):
        return out.shape[-1] if out.dim() else None
    if isinstance(out, (tuple, list)):
        ws = {o.shape[-1] for o in out if isinstance(o, torch.Tensor) and o.dim()}
        return ws.pop() if len(ws) == 1 else None
    return None


_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(shape, dtype, device) -> torch.Tensor:
    """Zeros of ``shape`` as a stride-0 view of one scalar (nothing computed, nothing written per call).
    In-place writes into an overlapping view raise; a one-element view could be written, so the
    scalar is replaced once its version counter moved (host-side, no sync)."""
    key = (dtype, device)
    z = _ZEROS.get(key)
    if z is None or z._version != 0:
        z = _ZEROS[key] = torch.zeros((), dtype=dtype, device=device)
    return z.expand(shape)


def _same(a, b) -> bool:
    """The same outputs, bit for bit (tensors anywhere in tuples / lists / dicts)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if type(out) in (tuple, list):
        return type(out)(_clone(o) for o in out)
    if type(out) is dict:
        return {k: _clone(v) for k, v in out.items()}
    return out


def _cat_widths(ws: list[int]) -> set[int]:
    """Widths of a concatenation of tensors of widths ``ws``, each whole or halved."""
    sums = {0}
    for w in ws:
        sums = {t + v for t in sums for v in ((w, w // 2) if w % 2 == 0 else (w,))}
    return sums


class _Fusion:
    """A verified fused projection of one block: the projection's call name (its feature) and the
    heavy calls whose outputs only feed it."""

    __slots__ = ("proj", "fed")

    def __init__(self, proj: str, fed: frozenset[str]):
        self.proj, self.fed = proj, fed


class _Slot:
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
            return _zeros(*self.meta[0])
        return self.kind(c if m is None else _zeros(*m) for m, c in zip(self.meta, self.consts))

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
            return slot.rebuild(lambda n: _contiguous(bh.active_forecast(n)))
        if ad.verifying:  # the check run of a fused projection (SubmoduleAdapter._verify)
            fu = ad.verifying.get(id(bh))
            if fu is not None:
                return ad._check_output(bh, fu, ad.call_name(bh, self.path), self.fn_ref, args, kwargs)
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
                slot = ad.slots[key] = _Slot(out, name)
            probe = ad.probing.get(id(bh))
            if probe is not None:
                probe.append((False, name, _width(out)))
                ad.outputs[id(bh)][name] = _clone(out)
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
                return _contiguous(bh.active_forecast(fu.proj))
            return self.fn_ref.original_forward(*args, **kwargs)
        if ad.verifying:
            v = ad.verifying.get(id(bh))
            if v is not None:
                return ad._check_output(bh, v, ad.call_name(bh, self.path), self.fn_ref, args, kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if bh.active_record is not None:
            probe = ad.probing.get(id(bh))
            if probe is not None:
                name = ad.call_name(bh, self.path)
                x = args[0] if args else kwargs.get("input")
                ok = isinstance(x, torch.Tensor) and x.dim() and isinstance(out, torch.Tensor) and out.dim()
                w = (x.shape[-1], out.shape[-1]) if ok else None
                probe.append((True, name, w))
                ad.outputs[id(bh)][name] = _clone(out)
            elif fu is not None and ad.call_name(bh, self.path) == fu.proj:
                bh.active_record(fu.proj, out.contiguous())
        return out


def _contiguous(x):
    return x if x is None else x.contiguous()


class SubmoduleAdapter(BlockAdapter):
    """Submodule level for blocks holding heavy submodules (see the module docstring)."""

    granularity = "submodule"
    needs_forward = True

    #: verification runs per block for a fused projection (each a cheap forward: heavy calls skipped)
    max_checks = 3

    def __init__(self):
        self.slots: dict[tuple[int, str], _Slot] = {}
        self._calls: dict[int, dict[str, int]] = {}  # per block hook: calls of each path in this block call
        self.running: set[tuple[int, str]] = set()  # (block hook, path) of heavy submodules running now
        self.candidates: set[int] = set()  # block hooks with a candidate fused projection
        self.fusion: dict[int, _Fusion | None] = {}  # per block hook, decided on its first full step
        self.probing: dict[int, list] = {}  # block hook -> (is projection, call name, width) in call order
        self.outputs: dict[int, dict[str, Any]] = {}  # block hook -> call name -> output (first full step)
        self.verifying: dict[int, _Fusion] = {}  # block hook -> the guess its check run tests
        self._warned: set[type] = set()

    def applies(self, block: torch.nn.Module) -> bool:
        return bool(heavy_submodules(block))

    def feature_dims(self, block):
        return {}  # learned on the first full step (declared by the block hook)

    def capture_points(self, block):
        points = [(path, mod, lambda bh, p=path: SubmoduleHook(bh, self, p)) for path, mod in heavy_submodules(block)]
        points += [(path, mod, lambda bh, a=parent, p=path: ProjectionHook(bh, self, a, p))
                   for parent, path, mod in escaping_projections(block)]
        points += [(path, mod, lambda bh, p=path: FusedProjectionHook(bh, self, p))
                   for path, mod in block_projections(block)]
        return points

    def call_name(self, bh, path: str) -> str:
        calls = self._calls.setdefault(id(bh), {})
        n = calls.get(path, 0)
        calls[path] = n + 1
        return path if n == 0 else f"{path}#{n}"

    def _start(self, bh_id: int) -> None:
        self._calls[bh_id] = {}

    def full_forward(self, block, forward, args, kwargs, record) -> Any:
        bh = _hook(block)
        self._start(id(bh))
        if id(bh) in self.fusion or id(bh) not in self.candidates:
            return forward(*args, **kwargs)
        return self._probe(block, bh, forward, args, kwargs, record)

    def cached_forward(self, block, args, kwargs, forecast, forward=None) -> Any:
        self._start(_hook_id(block))
        return forward(*args, **kwargs)

    # -- fused projections: found and verified on a block's first full step ------------------------
    @torch.compiler.disable
    def _probe(self, block, bh, forward, args, kwargs, record):
        """The block's first full step: its calls logged and its features held back until the check
        of a fused projection decided which ones this block records."""
        key = id(bh)
        log, held = [], []
        with torch.no_grad():  # the check run's inputs: the block may write into its own in place
            inputs = _clone(args), {k: _clone(v) for k, v in kwargs.items()}
        self.probing[key], self.outputs[key] = log, {}
        # held features are copies: the block may write into a submodule's output after the hook
        bh.active_record = lambda n, F: held.append((n, F.clone() if isinstance(F, torch.Tensor) else F))
        try:
            out = forward(*args, **kwargs)
            bh.active_record = None  # the check runs record nothing
            fu = self._find(block, bh, forward, *inputs, out, log)
        finally:
            bh.active_record = record
            self.probing.pop(key, None)
            outputs = self.outputs.pop(key, {})
            self._start(key)
        self.fusion[key] = fu
        skip = set()
        if fu is not None:
            for c in fu.fed:
                slot = self.slots[(key, c)]
                slot.fused = True
                slot.note(outputs[c])
                skip.update(n for n in slot.names if n is not None)
        for n, F in held:
            if n not in skip:
                record(n, F)
        if fu is not None:
            record(fu.proj, outputs[fu.proj].contiguous())
        return out

    def _find(self, block, bh, forward, args, kwargs, out, log) -> _Fusion | None:
        """The guesses, checked one by one: a block-level Linear called right after two or more heavy
        calls (no other Linear of the block between), wider at its input than at its output, its input
        as wide as their outputs concatenated, each whole or halved (a gated MLP's activation:
        OvisImage); the most heavy calls first."""
        tried, why, run = [], None, []
        for is_proj, name, w in log:
            if not is_proj:
                run.append((name, w))
                continue
            heavy, run = run, []
            if w is None:
                continue
            w_in, w_out = w
            for s in range(len(heavy) - 1):
                ws = [hw for _, hw in heavy[s:]]
                if None in ws or len(ws) > 8 or not w_out < w_in or w_in not in _cat_widths(ws):
                    continue
                if len(tried) == self.max_checks:
                    break
                fu = _Fusion(name, frozenset(n for n, _ in heavy[s:]))
                tried.append(fu)
                why = self._verify(bh, fu, forward, args, kwargs, out)
                if why is None:
                    return fu
        if tried and type(block) not in self._warned:  # once per block class
            self._warned.add(type(block))
            fu = tried[0]
            warnings.warn(f"svdcache: {type(block).__name__}: {fu.proj} looked like a projection of "
                          f"{', '.join(sorted(fu.fed))} only, but {why}; those stay separate features",
                          stacklevel=5)
        return None

    def _verify(self, bh, fu: _Fusion, forward, args, kwargs, out) -> str | None:
        """Runs the block with the guess's placeholders and the projection's recorded output: None
        where that reproduces ``out`` bit for bit, else why not."""
        key = id(bh)
        self.verifying[key] = fu
        self._start(key)
        try:
            with torch.no_grad():
                again = forward(*args, **kwargs)
            return None if _same(out, again) else "the block's output changes without them"
        except Exception as e:  # e.g. an in-place op or a view the placeholders do not allow
            return f"the block fails without them ({type(e).__name__}: {str(e)[:80]})"
        finally:
            del self.verifying[key]
            self._start(key)

    def _check_output(self, bh, fu: _Fusion, name: str, fn_ref, args, kwargs):
        """A hooked module's output in a check run: placeholders for the guess's heavy calls, a copy
        of the first full step's output for the others (computed where it was not called then)."""
        if name in fu.fed:
            slot = self.slots[(id(bh), name)]
            slot.note(self.outputs[id(bh)][name])
            return slot.blank()
        got = self.outputs[id(bh)].get(name, _NOT_SEEN)
        if got is _NOT_SEEN:
            return fn_ref.original_forward(*args, **kwargs)
        return _clone(got)


_NOT_SEEN = object()


def _hook(block):
    from ..hooks import BLOCK_HOOK

    return block._diffusers_hook.get_hook(BLOCK_HOOK)


def _hook_id(block) -> int:
    from ..hooks import BLOCK_HOOK

    return id(block._diffusers_hook.get_hook(BLOCK_HOOK))
