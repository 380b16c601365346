"""Tiny random configurations of the six diffusers transformer classes the runtime is tested on,
deterministic forward inputs for them, and a short flow-matching "denoising loop" on a bare model.

Every model is sized so one forward takes a few milliseconds on one CPU thread. The loop is

    sigma_0 = 1 > sigma_1 > ... > sigma_S = 0,   t_i = sigma_i * timestep_scale
    x <- x + (sigma_{i+1} - sigma_i) * v(x, t_i)     (v = the model output, latent channels only)

so the timestep goes down within a generation (how svdcache tells generations apart without a
pipeline) and the latent keeps its shape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

TXT_LEN = 8  # text tokens
# The noise level sigma in [0, 1] is passed as the timestep (FLUX: sigma / 1000, as it multiplies by
# 1000 itself). The sinusoidal timestep embeddings have frequencies up to 1 rad per unit of t: at
# diffusers' usual t in [0, 1000] a 10-step loop moves t by 100 per step, so in a random (untrained)
# model the embedding, hence every AdaLN gate, jumps from step to step (measured: a forecast is then
# barely better than skipping the blocks). Trained models learn a smooth time dependence; t in
# [0, 1] mimics that.
TSCALE = 1.0
GAIN = 1.0  # see build()


@dataclass
class ModelSpec:
    name: str
    cls: type
    config: dict
    latent_shape: tuple  # per sample, as hidden_states is passed to forward
    cond: Callable[[int, torch.Generator], dict]  # (batch, generator) -> conditioning kwargs
    timestep_scale: float = TSCALE  # t = sigma * timestep_scale (FLUX multiplies by 1000 itself)
    out_slice: int | None = None  # output channels that are the velocity (PixArt also predicts variance)
    block_lists: tuple = ("transformer_blocks",)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _flux_cond(B, gen, h=4, w=4):
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "encoder_hidden_states": _randn(gen, B, TXT_LEN, 32),
        "pooled_projections": _randn(gen, B, 32),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(TXT_LEN, 3),
    }


def _sd3_cond(B, gen):
    return {"encoder_hidden_states": _randn(gen, B, TXT_LEN, 32), "pooled_projections": _randn(gen, B, 16)}


def _hunyuan_cond(B, gen):
    mask = torch.ones(B, TXT_LEN, dtype=torch.long)
    mask[:, -2:] = 0  # some padding, so the mask matters
    return {
        "encoder_hidden_states": _randn(gen, B, TXT_LEN, 16),
        "encoder_attention_mask": mask,
        "pooled_projections": _randn(gen, B, 8),
    }


def _wan_cond(B, gen):
    return {"encoder_hidden_states": _randn(gen, B, TXT_LEN, 16)}


def _pixart_cond(B, gen):
    return {
        "encoder_hidden_states": _randn(gen, B, TXT_LEN, 16),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _dit_cond(B, gen):
    return {"class_labels": torch.randint(0, 10, (B,), generator=gen)}


SPECS: dict[str, ModelSpec] = {
    "flux": ModelSpec(
        "flux",
        FluxTransformer2DModel,
        dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        latent_shape=(16, 4),  # packed: (h*w, channels)
        cond=_flux_cond,
        timestep_scale=TSCALE / 1000,
        block_lists=("transformer_blocks", "single_transformer_blocks"),
    ),
    "sd3": ModelSpec(
        "sd3",
        SD3Transformer2DModel,
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
             joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
             pos_embed_max_size=16),
        latent_shape=(4, 8, 8),
        cond=_sd3_cond,
    ),
    "hunyuan_video": ModelSpec(
        "hunyuan_video",
        HunyuanVideoTransformer3DModel,
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
             num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=False,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)),
        latent_shape=(4, 1, 4, 4),  # (C, frames, h, w)
        cond=_hunyuan_cond,
        block_lists=("transformer_blocks", "single_transformer_blocks"),
    ),
    "wan": ModelSpec(
        "wan",
        WanTransformer3DModel,
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
             rope_max_seq_len=32),
        latent_shape=(4, 2, 8, 8),  # (C, frames, h, w)
        cond=_wan_cond,
        block_lists=("blocks",),
    ),
    "pixart": ModelSpec(
        "pixart",
        PixArtTransformer2DModel,
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, norm_num_groups=1),
        latent_shape=(4, 8, 8),
        cond=_pixart_cond,
        out_slice=4,
    ),
    "dit": ModelSpec(
        "dit",
        DiTTransformer2DModel,
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
             sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1),
        latent_shape=(4, 8, 8),
        cond=_dit_cond,
    ),
}

MODEL_NAMES = tuple(SPECS)


def build(name: str, seed: int = 0, gain: float | None = GAIN) -> torch.nn.Module:
    """The tiny random model, weights fixed by ``seed``, in eval mode.

    ``gain``: every nn.Linear weight is redrawn from N(0, gain^2 / fan_in) (variance preserving at
    gain 1). PyTorch's default init (std 1/sqrt(3 fan_in)) leaves the AdaLN gates so small that the
    blocks of FLUX, SD3 and HunyuanVideo change their stream by ~5% only, and a cache that skipped
    them outright scores within ~3x of a working one (SD3); with gain 1 every block changes it by
    15-100%, as blocks of trained models do. ``None`` keeps diffusers' own init.
    """
    spec = SPECS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.cls(**spec.config)
        if gain is not None:
            with torch.no_grad():
                for mod in model.modules():
                    if isinstance(mod, torch.nn.Linear):
                        mod.weight.normal_(0.0, gain / mod.in_features**0.5)
    return model.eval()


def make_inputs(name: str, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(initial latent x_T, conditioning kwargs) for ``batch`` samples; deterministic in ``seed``."""
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, batch, *spec.latent_shape)
    return x, spec.cond(batch, gen)


def forward_kwargs(name: str, batch: int = 1, seed: int = 0, sigma: float = 1.0) -> dict:
    """Keyword arguments for one forward call of the model at noise level ``sigma``."""
    spec = SPECS[name]
    x, cond = make_inputs(name, batch, seed)
    return {"hidden_states": x, "timestep": torch.full((batch,), sigma * spec.timestep_scale), **cond,
            "return_dict": False}


def sigmas(steps: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, steps + 1)


def velocity(name: str, model, x: torch.Tensor, sigma: float, cond: dict) -> torch.Tensor:
    spec = SPECS[name]
    t = torch.full((x.shape[0],), float(sigma) * spec.timestep_scale)
    out = model(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
    if spec.out_slice is not None:
        out = out[:, : spec.out_slice]
    return out


@torch.no_grad()
def denoise(name: str, model, steps: int = 10, batch: int = 1, seed: int = 0, stop_after: int | None = None,
            on_step: Callable[[int], None] | None = None, inputs=None):
    """Run a ``steps``-step Euler flow-matching loop on the bare ``model``.

    Returns (final latent, [model output of every step]). ``stop_after`` ends the loop early (an
    interrupted generation); ``on_step(i)`` is called after step ``i``; ``inputs`` overrides
    :func:`make_inputs`.
    """
    x, cond = inputs if inputs is not None else make_inputs(name, batch, seed)
    s = sigmas(steps)
    outs = []
    for i in range(steps if stop_after is None else stop_after):
        v = velocity(name, model, x, s[i], cond)
        outs.append(v)
        x = x + (s[i + 1] - s[i]) * v
        if on_step is not None:
            on_step(i)
    return x, outs


_EXPENSIVE = re.compile(r"^(attn\d*|ff|ff_context|ffn|proj_mlp|proj_out)$")


def blocks(name: str, model) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks svdcache caches, as (path, block)."""
    return [(f"{lst}.{i}", b) for lst in SPECS[name].block_lists for i, b in enumerate(getattr(model, lst))]


def expensive_modules(name: str, model) -> list[tuple[str, torch.nn.Module]]:
    """The attention / feed-forward / projection modules inside the blocks: the work a cached step
    skips (FLUX: attn, ff, ff_context of the double blocks; attn, proj_mlp, proj_out of the single
    blocks; other models: every such module, as the whole block is skipped)."""
    found = []
    for path, block in blocks(name, model):
        for child_name, child in block.named_children():
            if child is not None and _EXPENSIVE.match(child_name):
                found.append((f"{path}.{child_name}", child))
    return found
