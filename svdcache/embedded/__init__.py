"""The embedded model: a complete miniature FluxPipeline trained in this repo on sklearn's digits.

    from svdcache.embedded import load_pipeline, CALL_KWARGS, canonical_prompt
    pipe = load_pipeline()
    images = pipe(canonical_prompt(7), **CALL_KWARGS).images

Every component is tiny (a 3.4 M-parameter FluxTransformer2DModel with 3 double and 6 single blocks,
hidden size 128, 64 image tokens); it loads with no network. ``CALL_KWARGS`` are the pipeline
arguments it was trained for (32 x 32 images, 16 T5 tokens) and must be passed; ``GUIDANCE`` is
true classifier-free guidance (scale 2, empty negative prompt: the model was trained with 10%
dropped prompts), which the demo, tests and benchmarks use: without it the digits are much less
legible (a digits classifier agrees with the prompt on about half the samples, with it on ~90%).
"""
from __future__ import annotations

import os

from .data import MAX_SEQUENCE_LENGTH, NUMBER_WORDS, canonical_prompt, prompts_for  # noqa: F401

from ..env import embedded_dir

PIPELINE_DIR = embedded_dir(os.path.join(os.path.dirname(__file__), "tiny-flux-digits"))
BASIS_PATH = os.path.join(PIPELINE_DIR, "svdcache_basis.safetensors")
CALL_KWARGS = dict(height=32, width=32, max_sequence_length=MAX_SEQUENCE_LENGTH)
GUIDANCE = dict(negative_prompt="", true_cfg_scale=2.0)


def load_pipeline(device: str = "cpu", dtype=None):
    """``FluxPipeline.from_pretrained`` on the shipped folder (fp32 on CPU, bf16 on CUDA by default)."""
    import torch
    from diffusers import FluxPipeline

    if not os.path.exists(os.path.join(PIPELINE_DIR, "model_index.json")):
        raise FileNotFoundError(
            f"the embedded pipeline is missing at {PIPELINE_DIR}; train it with python -m svdcache.embedded.train"
        )
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    pipe = FluxPipeline.from_pretrained(PIPELINE_DIR, dtype=dtype)  # diffusers 0.42 deprecates torch_dtype=
    return pipe.to(device)


def load_basis(device: str = "cpu"):
    """The embedded model's calibrated SVD basis (bench/calibrate_embedded.py writes it)."""
    from ..basis import load_basis as _load

    return _load(BASIS_PATH, device=device)


def load_video_model(device: str = "cpu", dtype=None):
    """The second embedded model, a trained miniature Wan video transformer in its CFG sampling loop,
    and its calibrated submodule-level basis: ``(pipe, basis)`` (see svdcache.embedded.video)."""
    from .video import load_video_model as _load

    return _load(device, dtype)
