"""Behaviour fingerprints of the runtime, to check that a restructuring changes nothing.

    python bench/equivalence.py save out/golden.pt      # before the change
    python bench/equivalence.py check out/golden.pt     # after it: max |diff| of every image, stats equal

Runs the embedded FLUX pipeline (true CFG: "cond" / "uncond" contexts), the same model as a bare
transformer in a hand-written loop, and the embedded Wan video model, each under a spread of
configurations (the default, the baselines, every predictor / residual / granularity / schedule
form), and keeps the final images and what ``svdcache.stats`` counted. ``check`` prints one row per
configuration: the largest absolute image difference, PSNR against the saved images, and whether the
full / cached call counts, FLOPs and cache memory are the same. Exit status 1 if any row differs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import svdcache  # noqa: E402
from svdcache.embedded import CALL_KWARGS, GUIDANCE, canonical_prompt, load_basis, load_pipeline  # noqa: E402

STEPS = 30
PROMPTS = [canonical_prompt(3), canonical_prompt(8)]
SEEDS = [7001, 7002]

FLUX_CONFIGS = {
    "default": {},
    "default N3": dict(interval=3),
    "default N7": dict(interval=7),
    "uncond 1": dict(uncond_interval=1),
    "uniform": dict(schedule="uniform"),
    "taylorseer o1": "taylorseer",
    "taylorseer o2": "taylorseer2",
    "fora": "fora",
    "ema": dict(predictor="ema", residual="reuse"),
    "reuse residual tau.85": dict(residual="reuse", order=1),
    "residual taylor": dict(residual="taylor", order=1),
    "residual damped": dict(residual="damped", order=1),
    "int8": dict(residual="int8"),
    "budget 1.3": dict(memory_budget=1.3),
    "feature subspace": dict(subspace="feature", residual="reuse"),
    "order 1": dict(order=1),
    "fitted gains": dict(fitted_gains=True, subspace="feature", residual="reuse", order=1),
    "timestep axis": dict(time_axis="timestep"),
    "warmup 3 tail 2": dict(warmup=3, tail=2, schedule="uniform"),
}


def _config(spec):
    if spec == "taylorseer":
        return svdcache.taylorseer(5)
    if spec == "taylorseer2":
        return svdcache.taylorseer(5, order=2)
    if spec == "fora":
        return svdcache.fora(5)
    return svdcache.SVDCacheConfig(**spec)


def _stats(target) -> dict:
    g = svdcache.stats(target).last_generation
    return dict(full=g.full_steps, cached=g.cached_steps, fallbacks=g.fallbacks, shared=g.shared_steps,
                flops=g.flops, flops_uncached=g.flops_uncached, cache_bytes=g.cache_bytes,
                feature_bytes=g.feature_bytes)


def _pipe_images(pipe):
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, num_inference_steps=STEPS, generator=gens, output_type="pt", **CALL_KWARGS,
                **GUIDANCE).images.float()


def _bare_loop(model, steps=STEPS):
    """A hand-written Euler loop on the bare transformer, one call per step (no cache context)."""
    g = torch.Generator().manual_seed(11)
    B, N, L = 2, 64, 16
    x = torch.randn(B, N, model.config.in_channels, generator=g)
    enc = torch.randn(B, L, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(B, model.config.pooled_projection_dim, generator=g)
    img_ids = torch.zeros(N, 3)
    img_ids[:, 1] = torch.arange(N) // 8
    img_ids[:, 2] = torch.arange(N) % 8
    txt_ids = torch.zeros(L, 3)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = ts[i].expand(B)
            v = model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                      img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
            x = x + (ts[i + 1] - ts[i]) * v
    return x


def run_all() -> dict:
    torch.manual_seed(0)
    out = {}
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    basis = load_basis()
    out["uncached"] = dict(images=_pipe_images(pipe))
    for name, spec in FLUX_CONFIGS.items():
        t0 = time.perf_counter()
        svdcache.enable(pipe, basis=basis, config=_config(spec))
        out[name] = dict(images=_pipe_images(pipe), stats=_stats(pipe))
        svdcache.disable(pipe)
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    # zero setup: the basis built online from the first full steps
    svdcache.enable(pipe)
    out["zero setup"] = dict(images=_pipe_images(pipe), stats=_stats(pipe))
    svdcache.disable(pipe)
    svdcache.enable(pipe, granularity="submodule")
    out["submodule online"] = dict(images=_pipe_images(pipe), stats=_stats(pipe))
    svdcache.disable(pipe)
    # block level (its own basis: built online)
    svdcache.enable(pipe, granularity="block", uncond_interval=1)
    out["block online"] = dict(images=_pipe_images(pipe), stats=_stats(pipe))
    svdcache.disable(pipe)
    # a bare loop on the transformer (no contexts, no step count)
    tr = pipe.transformer
    out["bare uncached"] = dict(images=_bare_loop(tr))
    for name, kw in {"bare default": {}, "bare taylorseer": "taylorseer"}.items():
        svdcache.enable(tr, basis=basis, config=_config(kw))
        out[name] = dict(images=_bare_loop(tr), stats=_stats(tr))
        svdcache.disable(tr)
    # the video model (Wan, submodule level)
    from svdcache.embedded import load_video_model

    vpipe, vbasis = load_video_model()
    out["video uncached"] = dict(images=_video(vpipe))
    for name, kw in {"video default u1": dict(uncond_interval=1), "video default": {},
                     "video taylorseer": "taylorseer"}.items():
        svdcache.enable(vpipe.transformer, basis=vbasis, config=_config(kw))
        out[name] = dict(images=_video(vpipe), stats=_stats(vpipe.transformer))
        svdcache.disable(vpipe.transformer)
    return out


def _video(vpipe):
    from svdcache.embedded.video import VIDEO_GUIDANCE

    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return vpipe(["seven moving left", "two moving up"], num_inference_steps=STEPS, generator=gens,
                 **VIDEO_GUIDANCE).videos.float()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("save", "check"))
    ap.add_argument("path")
    ap.add_argument("--tol", type=float, default=0.0, help="largest image difference still counted as equal")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = run_all()
    if a.mode == "save":
        os.makedirs(os.path.dirname(os.path.abspath(a.path)), exist_ok=True)
        torch.save(res, a.path)
        print(f"saved {len(res)} runs -> {a.path}")
        return 0
    gold = torch.load(a.path)
    bad = 0
    print(f"| run | max abs diff | PSNR vs saved | stats |\n|---|---|---|---|")
    for name, g in gold.items():
        r = res.get(name)
        if r is None:
            print(f"| {name} | missing | | |")
            bad += 1
            continue
        d = float((r["images"] - g["images"]).abs().max())
        mse = float(((r["images"] - g["images"]) ** 2).mean())
        p = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
        same = r.get("stats") == g.get("stats")
        diff = "" if same else {k: (g["stats"][k], r["stats"][k]) for k in g.get("stats", {})
                                if g["stats"][k] != r["stats"].get(k)}
        print(f"| {name} | {d:.3g} | {p:.2f} | {'same' if same else diff} |")
        bad += (d > a.tol) or not same
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
