"""Block-level caching for any transformer block: each block's output minus its input, per stream.

The streams (the block's arguments whose updated value it returns) and their positions in the
output are read from the first full step's actual output, never trusted blindly: an output tensor
is matched to the tensor argument of the same shape (the closest one where several share it: a
residual block's output lies near its input), after diffusers' block registry's layout where that
layout agrees with the output. Any number of streams (LTX-2's video / audio), any argument names
(``x``), or a user's ``streams={"hidden": "x", ...}``. A block whose output cannot be mapped (an
output that is no updated argument) is computed in full on every step, with one warning.
"""
from __future__ import annotations

import warnings

import torch

from .base import BlockAdapter, bind_arguments

# Blocks diffusers' TransformerBlockRegistry does not list: (hidden index, encoder index) of the output.
_EXTRA_LAYOUTS = {"JointTransformerBlock": (1, 0)}
_NAMES = {"hidden_states": "hidden", "encoder_hidden_states": "encoder"}  # stream names of older bases


def output_layout(block: torch.nn.Module) -> tuple[int | None, int | None]:
    """Indices of (hidden_states, encoder_hidden_states) in the block's output tuple, as registered."""
    name = type(block).__name__
    if name in _EXTRA_LAYOUTS:
        return _EXTRA_LAYOUTS[name]
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        meta = TransformerBlockRegistry.get(type(block))
        return meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
    except Exception:
        return None, None


def _broadcasts(src, dst) -> bool:
    """A stream entering with batch 1 and leaving broadcast to the batch (one negative prompt)."""
    try:
        return tuple(torch.broadcast_shapes(src, dst)) == tuple(dst)
    except RuntimeError:
        return False


class Uncacheable(Exception):
    pass


class GenericBlockAdapter(BlockAdapter):
    granularity = "block"
    needs_forward = True

    def __init__(self, dim: int | None = None, streams: dict[str, str] | None = None):
        self.dim = dim
        self.streams = dict(streams) if streams else None  # stream name -> argument name
        self.layouts: dict[int, tuple] = {}  # id(block) -> (kind, [(position, stream, arg)])
        self.uncacheable: dict[int, str] = {}
        self._warned = False

    def feature_dims(self, block):
        return {}  # learned on the first full step (declared by the block hook)

    # -- the layout -------------------------------------------------------------------------------
    def _candidates(self, inputs: dict) -> list[tuple[str, str]]:
        """(stream name, argument) of every tensor argument that may be a stream."""
        if self.streams:
            return [(s, a) for s, a in self.streams.items()]
        return [(_NAMES.get(a, a), a) for a, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() >= 2]

    def _layout(self, block, inputs: dict, out):
        key = id(block)
        if key in self.layouts:
            return self.layouts[key]
        cands = [(s, a) for s, a in self._candidates(inputs) if isinstance(inputs.get(a), torch.Tensor)]
        if self.streams and len(cands) < len(self.streams):
            missing = [a for s, a in self.streams.items() if not isinstance(inputs.get(a), torch.Tensor)]
            raise ValueError(f"svdcache: streams={self.streams}: {type(block).__name__} was called without the "
                             f"tensor argument(s) {missing}")
        outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else None
        if outs is None:
            raise Uncacheable(f"returns a {type(out).__name__}")
        registered = dict(zip(("hidden_states", "encoder_hidden_states"), output_layout(block)))
        mapping, used = [], set()
        for pos, o in enumerate(outs):
            if o is None:
                continue
            if not isinstance(o, torch.Tensor):
                raise Uncacheable(f"returns a {type(o).__name__} at position {pos}")
            same = [(s, a) for s, a in cands if a not in used and (inputs[a].shape == o.shape
                                                                   or _broadcasts(inputs[a].shape, o.shape))]
            if any(inputs[a] is o for _, a in same):  # handed through unchanged
                s, a = next((s, a) for s, a in same if inputs[a] is o)
                mapping.append((pos, None, a))
                used.add(a)
                continue
            reg = [(s, a) for s, a in same if registered.get(a) == pos]
            if reg:
                pick = reg[0]
            elif same:
                pick = min(same, key=lambda sa: float((o - inputs[sa[1]]).float().norm()
                                                      / (inputs[sa[1]].float().norm() + 1e-12)))
            else:
                raise Uncacheable(f"output {pos} (shape {tuple(o.shape)}) matches no tensor argument")
            mapping.append((pos, pick[0], pick[1]))
            used.add(pick[1])
        layout = ("tensor" if isinstance(out, torch.Tensor) else type(out), len(outs), mapping)
        self.layouts[key] = layout
        return layout

    # -- forwards ---------------------------------------------------------------------------------
    def full_forward(self, block, forward, args, kwargs, record):
        out = forward(*args, **kwargs)
        if id(block) in self.uncacheable:
            return out
        inputs = bind_arguments(block, args, kwargs)
        try:
            kind, n, mapping = self._layout(block, inputs, out)
        except Uncacheable as e:
            self.uncacheable[id(block)] = f"{type(block).__name__} {e}"
            self._warn(block)
            return out
        outs = [out] if kind == "tensor" else list(out)
        for pos, stream, arg in mapping:
            if stream is None:
                continue
            # the kernels walk rows with unit channel stride; a transposed input (PixArt, DiT and
            # HunyuanVideo embed patches as flatten(2).transpose(1, 2)) gives o - x the same strides
            record(stream, (outs[pos] - inputs[arg]).contiguous())
        return out

    def _warn(self, block):
        if not self._warned:
            self._warned = True
            warnings.warn(f"svdcache: block level cannot cache {self.uncacheable[id(block)]}; such blocks are "
                          "computed on every step (name the streams with enable(..., streams={...}) or use "
                          "granularity='submodule')", stacklevel=5)

    def cached_forward(self, block, args, kwargs, forecast, forward=None):
        if id(block) in self.uncacheable or id(block) not in self.layouts:
            return forward(*args, **kwargs)
        inputs = bind_arguments(block, args, kwargs)
        kind, n, mapping = self.layouts[id(block)]
        outs = [None] * n
        for pos, stream, arg in mapping:
            x = inputs[arg]
            outs[pos] = x if stream is None else forecast(stream, x=x.contiguous())
        return outs[0] if kind == "tensor" else kind(outs)
