"""The second embedded model: a miniature Wan video transformer trained in this repo on moving digits.

    from svdcache.embedded.video import load_video_pipeline, VIDEO_GUIDANCE
    pipe = load_video_pipeline()
    videos = pipe("seven moving left", num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                  **VIDEO_GUIDANCE).videos                     # (B, 1, 4, 16, 16) in [0, 1]

A stock diffusers ``WanTransformer3DModel`` (5 blocks of self-attention, cross-attention and
feed-forward, hidden size 128, 4 heads) in pixel space: 4 frames of 16 x 16, patch (1, 2, 2), 256
video tokens; prompts "<word> moving <direction>" embedded by a fixed seeded table (video_data.py).
``TinyWanPipeline`` is Wan's sampling loop in miniature: FlowMatchEulerDiscreteScheduler, the
transformer called in the cache contexts "cond" and then "uncond" with the same step index / sigma /
step count WanPipeline passes, true classifier-free guidance (scale 3, empty negative prompt; the
model was trained with 10% dropped prompts), and the stateful hooks reset at the end of a call as
diffusers pipelines do. So SVD-Cache sees exactly what it sees under WanPipeline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..env import video_dir
from .video_data import FRAME, FRAMES, TEXT_DIM, encode_prompts

VIDEO_DIR = video_dir(os.path.join(os.path.dirname(__file__), "tiny-wan-digits"))
VIDEO_BASIS_PATH = os.path.join(VIDEO_DIR, "svdcache_basis.safetensors")
VIDEO_BLOCK_BASIS_PATH = os.path.join(VIDEO_DIR, "svdcache_basis_block.safetensors")
VIDEO_GUIDANCE = dict(negative_prompt="", guidance_scale=3.0)
SHIFT = 2.0  # the scheduler's static flow shift (Wan uses 3-5 at 480p-720p; 256 tokens here)

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,  # hidden 128; RoPE splits the head dim 12 / 10 / 10 over (t, h, w)
    in_channels=1,
    out_channels=1,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=384,
    num_layers=5,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def build_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


@dataclass
class VideoOutput:
    videos: torch.Tensor  # (B, 1, FRAMES, FRAME, FRAME) in [0, 1] (output_type "pt")


class TinyWanPipeline:
    """Wan's text-to-video loop for the miniature model (see the module docstring)."""

    def __init__(self, transformer, scheduler=None):
        self.transformer = transformer
        self.scheduler = scheduler if scheduler is not None else build_scheduler()
        self._progress = False

    def set_progress_bar_config(self, disable: bool = True, **_):
        self._progress = not disable

    @property
    def components(self):
        return {"transformer": self.transformer, "scheduler": self.scheduler}

    def to(self, device=None, dtype=None):
        self.transformer.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 50, generator=None, guidance_scale: float = 3.0,
                 negative_prompt: str = "", output_type: str = "pt", latents=None, callback_on_step_end=None,
                 **unknown):
        if unknown:  # a misspelt argument would otherwise be ignored: refused before any work
            import difflib
            import inspect

            names = [n for n in inspect.signature(TinyWanPipeline.__call__).parameters if n not in ("self", "unknown")]
            near = {k: difflib.get_close_matches(k, names, n=1) for k in sorted(unknown)}
            hint = "".join(f" ({k!r}: did you mean {m[0]!r}?)" for k, m in near.items() if m)
            raise TypeError(f"TinyWanPipeline.__call__: unknown argument(s) {sorted(unknown)}{hint}; it takes {names}")
        tr = self.transformer
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        B = len(prompts)
        p = next(tr.parameters())
        device, dtype = p.device, p.dtype
        cond = encode_prompts(prompts).to(device, dtype)
        uncond = encode_prompts([negative_prompt] * B).to(device, dtype)
        if latents is None:
            gens = generator if isinstance(generator, (list, tuple)) else [generator] * B
            shape = (1, 1, FRAMES, FRAME, FRAME)
            latents = torch.cat([torch.randn(shape, generator=g) for g in gens]) if gens[0] is not None \
                else torch.randn((B,) + shape[1:])
        latents = latents.to(device, torch.float32)
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=device)
        timesteps = sched.timesteps
        do_cfg = guidance_scale > 1.0
        it = timesteps
        if self._progress:
            from tqdm.auto import tqdm

            it = tqdm(timesteps)
        try:
            for i, t in enumerate(it):
                timestep = t.expand(B)
                kw = dict(step_index=i, sigma=float(sched.sigmas[i]), num_inference_steps=len(timesteps))
                x = latents.to(dtype)
                with tr.cache_context("cond", **kw):
                    v = tr(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
                if do_cfg:
                    with tr.cache_context("uncond", **kw):
                        vu = tr(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[0]
                    v = vu + guidance_scale * (v - vu)
                latents = sched.step(v.float(), t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_on_step_end(self, i, t, {"latents": latents})
        finally:
            if hasattr(tr, "_reset_stateful_cache"):
                tr._reset_stateful_cache()  # as DiffusionPipeline.maybe_free_model_hooks does
        out = latents if output_type == "latent" else ((latents + 1) / 2).clamp(0, 1)
        return VideoOutput(videos=out)


def load_video_pipeline(device: str = "cpu", dtype=None) -> TinyWanPipeline:
    """The shipped trained model in its sampling loop (fp32 on CPU, bf16 on CUDA by default)."""
    from diffusers import WanTransformer3DModel

    if not os.path.exists(os.path.join(VIDEO_DIR, "config.json")):
        raise FileNotFoundError(f"the embedded video model is missing at {VIDEO_DIR}; train it with "
                                "python -m svdcache.embedded.video_train")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    from safetensors.torch import load_file

    # from_pretrained needs accelerate for a model with fp32-kept modules: build from the config, load the weights
    tr = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(VIDEO_DIR))
    tr.load_state_dict(load_file(os.path.join(VIDEO_DIR, "diffusion_pytorch_model.safetensors")))
    tr = (tr.to(device) if dtype == torch.float32 else tr.to(device=device, dtype=dtype)).eval().requires_grad_(False)
    return TinyWanPipeline(tr)


def load_video_model(device: str = "cpu", dtype=None):
    """(pipeline, basis): the trained video model and its calibrated submodule-level SVD basis."""
    return load_video_pipeline(device, dtype), load_video_basis(device)


def load_video_basis(device: str = "cpu", granularity: str = "submodule"):
    """The shipped basis, calibrated on held-out prompts / seeds (bench/calibrate_video.py)."""
    from ..basis import load_basis

    return load_basis(VIDEO_BASIS_PATH if granularity != "block" else VIDEO_BLOCK_BASIS_PATH, device=device)


EVAL_SEED = 1000
CALIBRATION_SEED = 90000


def eval_set(n_seeds: int = 1) -> tuple[list[str], list[int]]:
    """The evaluated prompts and seeds (bench/video_fidelity.py, the tests): digit d moving in
    direction d mod 4, seeds 1000 d + s."""
    from .video_data import prompt_for

    prompts = [prompt_for(d, d % 4) for d in range(10) for _ in range(n_seeds)]
    return prompts, [EVAL_SEED * d + s for d in range(10) for s in range(n_seeds)]


def calibration_set(images: int = 10) -> tuple[list[str], list[int]]:
    """The held-out calibration prompts and seeds: digit d moving in direction (d + 2) mod 4 (never an
    evaluated digit / direction pair), seeds 90000 + i: nothing evaluated is calibrated on."""
    from .video_data import prompt_for

    prompts = [prompt_for(i % 10, (i % 10 + 2) % 4) for i in range(images)]
    return prompts, [CALIBRATION_SEED + i for i in range(images)]
