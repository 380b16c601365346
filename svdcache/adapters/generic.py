"""Block-level caching for any diffusers transformer: each block's output minus input, per stream."""
from __future__ import annotations

import torch

from .base import BlockAdapter, bind_arguments

# Blocks diffusers' TransformerBlockRegistry does not list: (hidden index, encoder index) of the output.
_EXTRA_LAYOUTS = {"JointTransformerBlock": (1, 0)}


def output_layout(block: torch.nn.Module) -> tuple[int | None, int | None]:
    """Indices of (hidden_states, encoder_hidden_states) in the block's output tuple."""
    name = type(block).__name__
    if name in _EXTRA_LAYOUTS:
        return _EXTRA_LAYOUTS[name]
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        meta = TransformerBlockRegistry.get(type(block))
        return meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
    except Exception:
        return None, None  # inferred from the output on the first full step


def _broadcasts(src, dst) -> bool:
    """A stream entering with batch 1 and leaving broadcast to the batch (one negative prompt)."""
    try:
        return tuple(torch.broadcast_shapes(src, dst)) == tuple(dst)
    except RuntimeError:
        return False


class GenericBlockAdapter(BlockAdapter):
    granularity = "block"
    STREAMS = (("hidden", "hidden_states"), ("encoder", "encoder_hidden_states"))

    def __init__(self, dim: int):
        self.dim = dim
        self.layouts: dict[type, tuple] = {}

    def feature_dims(self, block):
        hid, enc = output_layout(block)
        dims = {"hidden": self.dim}
        # SD3's last block (context_pre_only) returns no encoder stream
        if enc is not None and not getattr(block, "context_pre_only", False):
            dims["encoder"] = self.dim
        return dims

    def _layout(self, block, inputs, out):
        """Map output positions to streams: from the registry, else by matching input shapes."""
        key = type(block)
        if key in self.layouts:
            return self.layouts[key]
        hid, enc = output_layout(block)
        if isinstance(out, torch.Tensor):
            layout = (None, None)
        elif hid is not None:
            layout = (hid, enc)
        else:
            h, e = inputs.get("hidden_states"), inputs.get("encoder_hidden_states")
            match = {}
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor) and h is not None and o.shape == h.shape:
                    match.setdefault("hidden", i)
                elif isinstance(o, torch.Tensor) and e is not None and o.shape == e.shape:
                    match.setdefault("encoder", i)
            if "hidden" not in match:
                raise ValueError(f"cannot tell which output of {key.__name__} is hidden_states; register its layout")
            layout = (match["hidden"], match.get("encoder"))
        self.layouts[key] = layout
        return layout

    def full_forward(self, block, forward, args, kwargs, record):
        inputs = bind_arguments(block, args, kwargs)
        out = forward(*args, **kwargs)
        hid, enc = self._layout(block, inputs, out)
        for stream, arg, idx in (("hidden", "hidden_states", hid), ("encoder", "encoder_hidden_states", enc)):
            if stream == "encoder" and idx is None:
                continue
            o = out if idx is None else out[idx]
            x = inputs.get(arg)
            if o is None or x is None:
                record(stream, None)  # the stream is absent: forecast it as absent
                continue
            if o.shape != x.shape and not _broadcasts(x.shape, o.shape):
                raise ValueError(
                    f"{type(block).__name__} changes the shape of {arg} ({tuple(x.shape)} -> {tuple(o.shape)}): "
                    "its output minus input cannot be cached"
                )
            # the kernels walk rows with unit channel stride; a transposed input (PixArt, DiT and
            # HunyuanVideo embed patches as flatten(2).transpose(1, 2)) gives o - x the same strides
            record(stream, (o - x).contiguous())
        return out

    def cached_forward(self, block, args, kwargs, forecast):
        inputs = bind_arguments(block, args, kwargs)
        hid, enc = self.layouts[type(block)]
        h = forecast("hidden", x=inputs["hidden_states"].contiguous())
        if hid is None:
            return h
        n_out = 1 + max(i for i in (hid, enc) if i is not None)
        out = [None] * n_out
        out[hid] = h
        if enc is not None:
            e = inputs.get("encoder_hidden_states")
            out[enc] = None if e is None else forecast("encoder", x=e.contiguous())
        return tuple(out)
