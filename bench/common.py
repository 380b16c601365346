"""Shared pieces of the benchmarks on the embedded model: the fixed prompt set, generation, a FLOP
counter that works for every caching method, cache-memory measurement, and FLUX.1-dev analytics."""
from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from svdcache.embedded import CALL_KWARGS, GUIDANCE, canonical_prompt  # noqa: E402


def prompt_set(n_seeds: int = 4):
    """All ten digit prompts x ``n_seeds`` seeds (seed = 1000 * digit + s)."""
    prompts = [canonical_prompt(d) for d in range(10) for _ in range(n_seeds)]
    seeds = [1000 * d + s for d in range(10) for s in range(n_seeds)]
    return prompts, seeds


def dev_prompt_set(n_seeds: int = 2):
    """A development set for design choices, disjoint from the evaluated set and from the calibration
    set: non-canonical phrasings (not the calibration's) and seeds 50000 + 10 * digit + s."""
    from svdcache.embedded import prompts_for

    prompts = [prompts_for(d)[1 + (d + 2) % 4] for d in range(10) for _ in range(n_seeds)]
    seeds = [50000 + 10 * d + s for d in range(10) for s in range(n_seeds)]
    return prompts, seeds


# the guidance form of generate(): the embedded model's (true CFG: cond and uncond transformer calls per
# step, cached in separate contexts) or {} for one call per step (FLUX.1-dev's case; bench/fidelity.py --guidance)
GUIDANCE_FORM = dict(GUIDANCE)


def generate(pipe, prompts, seeds, steps=50, **kw):
    """Images (B, 3, 32, 32) in [0, 1] and wall-clock seconds of the pipeline call (with the guidance
    form ``GUIDANCE_FORM``)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    t0 = time.perf_counter()
    out = pipe(prompts, num_inference_steps=steps, generator=gens, output_type="pt", **CALL_KWARGS, **GUIDANCE_FORM,
               **kw).images
    return out.float(), time.perf_counter() - t0


class FlopCounter:
    """Counts the transformer's matmul FLOPs on any caching method: forward hooks on every nn.Linear
    (2 x rows x in x out) and on every attention module (QK^T and AV: 4 x B x T^2 x inner dim).
    Checked against torch.utils.flop_counter by ``self_check``. The SVD-Cache's own projection and
    reconstruction matmuls are not Linear modules: add them from ``svdcache.stats`` (cache_op_flops)."""

    def __init__(self, transformer):
        self.flops = 0
        self.handles = []
        for m in transformer.modules():
            if isinstance(m, torch.nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear))
            elif type(m).__name__ in ("FluxAttention", "Attention") and hasattr(m, "heads"):
                self.handles.append(m.register_forward_pre_hook(self._attn, with_kwargs=True))

    def _linear(self, m, inp, out):
        x = inp[0]
        self.flops += 2 * (x.numel() // m.in_features) * m.in_features * m.out_features

    def _attn(self, m, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        e = kwargs.get("encoder_hidden_states")
        B, T = h.shape[0], h.shape[1] + (e.shape[1] if e is not None else 0)
        inner = m.heads * (m.inner_dim // m.heads if hasattr(m, "inner_dim") else h.shape[-1] // m.heads)
        self.flops += 4 * B * T * T * inner

    def remove(self):
        for h in self.handles:
            h.remove()


def self_check(pipe):
    """The hook counter and torch's FLOP counter agree on an uncached transformer call."""
    from svdcache.runtime.flops import count_flops

    tr = pipe.transformer
    B, N, L = 2, 64, CALL_KWARGS["max_sequence_length"]
    args = dict(
        hidden_states=torch.randn(B, N, tr.config.in_channels),
        encoder_hidden_states=torch.randn(B, L, tr.config.joint_attention_dim),
        pooled_projections=torch.randn(B, tr.config.pooled_projection_dim),
        timestep=torch.full((B,), 0.5),
        img_ids=torch.zeros(N, 3),
        txt_ids=torch.zeros(L, 3),
        return_dict=False,
    )
    fc = FlopCounter(tr)
    with torch.no_grad():
        _, ref = count_flops(tr, **args)
    fc.remove()
    # count_flops ran the forward once with the hooks on too
    if fc.flops != ref:
        raise RuntimeError(f"FlopCounter {fc.flops} != torch flop_counter {ref}")
    return ref


class TensorBytes:
    """Sums the bytes of the tensors reachable from the objects it is called on (dicts, lists, tuples
    and, with ``objects``, plain objects' attributes; modules skipped), each storage view once."""

    def __init__(self, max_depth: int = 6, objects: bool = True):
        self.max_depth, self.objects = max_depth, objects
        self.seen, self.total = set(), 0

    def __call__(self, obj, depth: int = 0) -> None:
        if depth > self.max_depth or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape))
            if key not in self.seen:
                self.seen.add(key)
                self.total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                self(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self(v, depth + 1)
        elif self.objects and hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            for v in vars(obj).values():
                self(v, depth + 1)


def state_bytes(transformer) -> int:
    """Bytes of every tensor held in the state of the diffusers hooks on ``transformer`` (deduplicated)."""
    walk = TensorBytes()
    from diffusers.hooks.hooks import StateManager

    for m in transformer.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is None:
            continue
        for hook in reg.hooks.values():
            for v in vars(hook).values():
                if isinstance(v, StateManager):
                    walk(v._state_cache)
    return walk.total


# --- FLUX.1-dev at 1024 x 1024 (4096 image + 512 text tokens), analytic --------------------------
FLUXDEV = dict(D=3072, N=4096, L=512, double=19, single=38, t5=4096, in_ch=64, pooled=768)


def fluxdev_step_flops() -> int:
    """Matmul FLOPs of one FLUX.1-dev transformer call (74.4 TFLOP, the paper's 3719.5 T / 50 steps)."""
    D, N, L = FLUXDEV["D"], FLUXDEV["N"], FLUXDEV["L"]
    T = N + L
    block = 24 * T * D * D + 4 * T * T * D  # double and single blocks cost the same
    return (FLUXDEV["double"] + FLUXDEV["single"]) * block + _fluxdev_outside_blocks()


def _fluxdev_outside_blocks() -> int:
    D, N, L = FLUXDEV["D"], FLUXDEV["N"], FLUXDEV["L"]
    emb = 2 * (256 * D + D * D) * 2 + 2 * (FLUXDEV["pooled"] * D + D * D)  # time + guidance + text pooled
    return emb + 2 * L * FLUXDEV["t5"] * D + 2 * N * FLUXDEV["in_ch"] * D + 2 * D * 2 * D + 2 * N * D * FLUXDEV["in_ch"]


def fluxdev_flops_ratio(full: int, cached: int, k_frac: float, predictor: str, anchor: bool, space: str) -> float:
    """The same schedule's FLOPs ratio at FLUX.1-dev's dimensions, with k = k_frac * D per feature.

    Cached call: embedders, the AdaLN gates of every block, the output layer, and (SVD) one
    reconstruction matmul per feature; full call: the model plus (SVD) one projection per feature
    (two when the residual is written)."""
    D, N, L = FLUXDEV["D"], FLUXDEV["N"], FLUXDEV["L"]
    T = N + L
    k = max(1, round(k_frac * D))
    rows = FLUXDEV["double"] * 2 * (N + L) + FLUXDEV["single"] * T  # feature rows per call
    gates = FLUXDEV["double"] * 2 * (2 * D * 6 * D) + FLUXDEV["single"] * 2 * D * 3 * D
    svd = space == "svd"
    split = 2 * rows * D * k * (1 if anchor else 2) if svd else 0
    recon = 2 * rows * D * k if svd and not (anchor and predictor == "reuse") else 0
    full_f = fluxdev_step_flops()
    cached_f = _fluxdev_outside_blocks() + gates + recon
    return (full + cached) * full_f / (full * (full_f + split) + cached * cached_f)
