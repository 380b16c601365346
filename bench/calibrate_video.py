"""Calibrate the embedded video model's shipped bases (the one-time SVD), submodule and block level.

    OMP_NUM_THREADS=1 python bench/calibrate_video.py     # about 1-2 min on one CPU thread

Reference: ten videos on the held-out calibration set (svdcache.embedded.video.calibration_set:
digit d moving in direction (d + 2) mod 4, seeds 90000 + i; the benchmark evaluates direction
d mod 4 and seeds 1000 d + s), 50 steps, the video model's guidance (true CFG 3: cond and uncond
calls both feed the Gram matrices), every step's features. tau 0.99 sets the default k; columns up to
0.999 energy are stored. The same run prices the calibrated (DP) schedules; no closed-loop schedule
selection is run (the FLUX model's bench/calibrate_embedded.py does one; it would take about an hour here).
Then the configuration per interval is chosen closed loop (svdcache.choice; ``--choose-only`` on the existing
files) on the same held-out set, split into a fitting and a checking half.
Writes svdcache/embedded/tiny-wan-digits/svdcache_basis{,_block}.safetensors.
"""
from __future__ import annotations

import argparse
import json

import torch

import common  # noqa: F401  (puts the repo on sys.path)
import svdcache
from svdcache.embedded.video import (VIDEO_BASIS_PATH, VIDEO_BLOCK_BASIS_PATH, VIDEO_GUIDANCE, calibration_set,
                                     load_video_pipeline)


def calibrate_video(pipe, granularity="submodule", images=10, steps=50, tau=0.99):
    prompts, seeds = calibration_set(images)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    basis = svdcache.calibrate(pipe, choose=False, prompt=prompts, num_inference_steps=steps, tau=tau, generator=gens,
                               granularity=granularity, output_type="pt", progress=False, **VIDEO_GUIDANCE)
    basis.meta["prompt"] = json.dumps(sorted(set(prompts)))
    basis.meta["seeds"] = f"{seeds[0]}..{seeds[-1]}"
    basis.meta["images"] = str(images)
    return basis


def add_choice(pipe, basis, steps=50, images=10, intervals=(2, 3, 4, 5, 6, 7, 8), progress=True):
    """The closed-loop choice of the configuration (svdcache.choice) on the held-out calibration set, split
    alternately into a fitting and a checking half: nothing evaluated is chosen on."""
    from svdcache.choose import choose

    prompts, seeds = calibration_set(images)
    pairs = list(zip(prompts, seeds))
    basis.meta["choice"] = choose(pipe, basis, steps=steps, fit=pairs[0::2], check=pairs[1::2],
                                  call_kwargs=dict(VIDEO_GUIDANCE), two_calls=True, intervals=intervals,
                                  progress=progress)
    return basis.meta["choice"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tau", type=float, default=0.99)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--choose-only", action="store_true",
                    help="keep the basis files' features and plans; choose the configuration per interval (svdcache.choice)")
    ap.add_argument("--granularity", choices=("submodule", "block", "both"), default="both",
                    help="which basis file (submodule: the one granularity='auto' uses)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_video_pipeline()
    for g, path in (("submodule", VIDEO_BASIS_PATH), ("block", VIDEO_BLOCK_BASIS_PATH)):
        if args.granularity not in ("both", g):
            continue
        if args.choose_only:
            from svdcache.basis import Basis

            basis = Basis.load(path)
        else:
            basis = calibrate_video(pipe, g, args.images, args.steps, args.tau)
        add_choice(pipe, basis, args.steps, args.images)
        basis.save(path)
        print(g, basis, "->", path)


if __name__ == "__main__":
    main()
