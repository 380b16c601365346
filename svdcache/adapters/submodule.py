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

import warnings
from typing import Any

import torch

from .base import BlockAdapter, block_hook_of
from .heavy import block_projections, escaping_projections, heavy_submodules
from .submodule_sites import (FusedProjectionHook, Fusion, ProjectionHook, SubmoduleHook, cat_widths, clone_output,
                              same_output, width_of)


class SubmoduleAdapter(BlockAdapter):
    """Submodule level for blocks holding heavy submodules (see the module docstring)."""

    granularity = "submodule"
    needs_forward = True

    #: verification runs per block for a fused projection (each a cheap forward: heavy calls skipped)
    max_checks = 3

    def __init__(self):
        self.slots: dict[tuple[int, str], Slot] = {}
        self._calls: dict[int, dict[str, int]] = {}  # per block hook: calls of each path in this block call
        self.running: set[tuple[int, str]] = set()  # (block hook, path) of heavy submodules running now
        self.candidates: set[int] = set()  # block hooks with a candidate fused projection
        self.fusion: dict[int, Fusion | None] = {}  # per block hook, decided on its first full step
        self.probing: dict[int, list] = {}  # block hook -> (is projection, call name, width) in call order
        self.outputs: dict[int, dict[str, Any]] = {}  # block hook -> call name -> output (first full step)
        self.verifying: dict[int, Fusion] = {}  # block hook -> the guess its check run tests
        self.undecided: set[int] = set()  # block hooks whose first probe saw a non-finite output
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
        bh = block_hook_of(block)
        self._start(id(bh))
        if id(bh) in self.fusion or id(bh) not in self.candidates:
            return forward(*args, **kwargs)
        return self._probe(block, bh, forward, args, kwargs, record)

    def cached_forward(self, block, args, kwargs, forecast, forward=None) -> Any:
        self._start(id(block_hook_of(block)))
        return forward(*args, **kwargs)

    # -- fused projections: found and verified on a block's first full step ------------------------
    @torch.compiler.disable
    def _probe(self, block, bh, forward, args, kwargs, record):
        """The block's first full step: its calls logged and its features held back until the check
        of a fused projection decided which ones this block records."""
        key = id(bh)
        log, held = [], []
        with torch.no_grad():  # the check run's inputs: the block may write into its own in place
            inputs = clone_output(args), {k: clone_output(v) for k, v in kwargs.items()}
        self.probing[key], self.outputs[key] = log, {}
        # held features are copies: the block may write into a submodule's output after the hook
        bh.active_record = lambda n, F: held.append((n, F.clone() if isinstance(F, torch.Tensor) else F))
        try:
            out = forward(*args, **kwargs)
            bh.active_record = None  # the check runs record nothing
            # a non-finite output cannot be reproduced bit for bit (NaN != NaN): decided at a later full step
            decide = _finite(out)
            fu = self._find(block, bh, forward, *inputs, out, log) if decide else None
        finally:
            bh.active_record = record
            self.probing.pop(key, None)
            outputs = self.outputs.pop(key, {})
            self._start(key)
        if decide:
            self.fusion[key] = fu
        skip = set()
        if fu is not None:
            for c in fu.fed:
                slot = self.slots[(key, c)]
                slot.fused = True
                slot.note(outputs[c])
                skip.update(n for n in slot.names if n is not None)
            if key in self.undecided:  # an earlier (non-finite) probe recorded these as features of their own
                for n in skip:
                    bh.controller.forget(bh.prefix + n)
        if not decide:
            self.undecided.add(key)
        for n, F in held:
            if n not in skip:
                record(n, F)
        if fu is not None:
            record(fu.proj, outputs[fu.proj].contiguous())
        return out

    def _find(self, block, bh, forward, args, kwargs, out, log) -> Fusion | None:
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
                if None in ws or len(ws) > 8 or not w_out < w_in or w_in not in cat_widths(ws):
                    continue
                if len(tried) == self.max_checks:
                    break
                fu = Fusion(name, frozenset(n for n, _ in heavy[s:]))
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

    def _verify(self, bh, fu: Fusion, forward, args, kwargs, out) -> str | None:
        """Runs the block with the guess's placeholders and the projection's recorded output: None
        where that reproduces ``out`` bit for bit, else why not."""
        key = id(bh)
        self.verifying[key] = fu
        self._start(key)
        try:
            with torch.no_grad():
                again = forward(*args, **kwargs)
            return None if same_output(out, again) else "the block's output changes without them"
        except Exception as e:  # e.g. an in-place op or a view the placeholders do not allow
            return f"the block fails without them ({type(e).__name__}: {str(e)[:80]})"
        finally:
            del self.verifying[key]
            self._start(key)

    def check_output(self, bh, fu: Fusion, name: str, fn_ref, args, kwargs):
        """A hooked module's output in a check run: placeholders for the guess's heavy calls, a copy
        of the first full step's output for the others (computed where it was not called then)."""
        if name in fu.fed:
            slot = self.slots[(id(bh), name)]
            slot.note(self.outputs[id(bh)][name])
            return slot.blank()
        got = self.outputs[id(bh)].get(name, _NOT_SEEN)
        if got is _NOT_SEEN:
            return fn_ref.original_forward(*args, **kwargs)
        return clone_output(got)


_NOT_SEEN = object()


def _finite(out) -> bool:
    """Every tensor of a block's output is finite (one host read per tensor: the probe runs once per block)."""
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all())
    if isinstance(out, (tuple, list)):
        return all(_finite(o) for o in out)
    return True
