"""FLUX (FluxTransformer2DModel), module level like TaylorSeer: the pre-gate outputs of attention and
feed-forward of both streams in the double blocks and the pre-gate proj_out output of the single
blocks are cached. On a cached step only the AdaLN gates are computed (for the current step) and
the gated residual adds are fused into the reconstruction; attention and MLPs are skipped.
"""
from __future__ import annotations

import torch

from .base import BlockAdapter, bind_arguments


def _gates(norm: torch.nn.Module, temb: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, ...]:
    # AdaLayerNormZero(/Single).forward without normalising x: the gates depend on temb only
    return norm.linear(norm.silu(temb)).chunk(n_chunks, dim=1)


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxDoubleBlockAdapter(BlockAdapter):
    granularity = "module"

    def feature_dims(self, block):
        D = block.norm2.normalized_shape[0]
        return {"attn.img": D, "attn.txt": D, "ff": D, "ff_context": D}

    def capture_points(self, block):
        return [
            ("attn", block.attn, [("attn.img", 0), ("attn.txt", 1)]),
            ("ff", block.ff, [("ff", None)]),
            ("ff_context", block.ff_context, [("ff_context", None)]),
        ]

    def full_forward(self, block, forward, args, kwargs, record):
        jak = bind_arguments(block, args, kwargs).get("joint_attention_kwargs") or {}
        if "ip_adapter_image_embeds" in jak:
            raise NotImplementedError("SVD-Cache does not cache FLUX blocks with IP-Adapter attention yet")
        return forward(*args, **kwargs)  # the capture hooks on attn / ff / ff_context record

    def cached_forward(self, block, args, kwargs, forecast):
        a = bind_arguments(block, args, kwargs)
        temb = a["temb"]
        _, _, gate_msa, _, _, gate_mlp = _gates(block.norm1, temb, 6)
        _, _, c_gate_msa, _, _, c_gate_mlp = _gates(block.norm1_context, temb, 6)
        h = forecast("attn.img", x=a["hidden_states"], gate=gate_msa)
        h = forecast("ff", x=h, gate=gate_mlp, out=h)
        e = forecast("attn.txt", x=a["encoder_hidden_states"], gate=c_gate_msa)
        e = forecast("ff_context", x=e, gate=c_gate_mlp, out=e)
        return _clip_fp16(e), h


class FluxSingleBlockAdapter(BlockAdapter):
    granularity = "module"

    def feature_dims(self, block):
        return {"proj_out": block.proj_out.out_features}

    def capture_points(self, block):
        return [("proj_out", block.proj_out, [("proj_out", None)])]

    def full_forward(self, block, forward, args, kwargs, record):
        return forward(*args, **kwargs)

    def cached_forward(self, block, args, kwargs, forecast):
        a = bind_arguments(block, args, kwargs)
        enc = a["encoder_hidden_states"]
        x = torch.cat([enc, a["hidden_states"]], dim=1)
        gate = _gates(block.norm, a["temb"], 3)[2]
        x = _clip_fp16(forecast("proj_out", x=x, gate=gate, out=x))
        L = enc.shape[1]
        return x[:, :L], x[:, L:]


ADAPTERS = {
    "FluxTransformerBlock": FluxDoubleBlockAdapter,
    "FluxSingleTransformerBlock": FluxSingleBlockAdapter,
}
