"""Calibrate the embedded model's shipped basis (the one-time SVD).

    python bench/calibrate_embedded.py    # about 20 s on 2 CPU cores

Reference: one prompt ("a handwritten digit three"), 8 images of it (seeds 0..7), 50 steps with the
embedded model's guidance (cond and uncond calls both feed the Gram matrices), every step's features. The embedded model has only 64 image tokens per image, so one image is a thin
sample of its feature space; FLUX.1-dev's 4096 tokens per image are not. tau 0.99 sets the default
k; columns up to 0.999 energy are stored so that enable(tau=...) can lower or raise it.
"""
import argparse

import torch

import common  # noqa: F401
import svdcache
from svdcache.embedded import BASIS_PATH, CALL_KWARGS, GUIDANCE, load_pipeline


def calibrate_reference(pipe, prompt="a handwritten digit three", images=8, steps=50, tau=0.99, **kw):
    """The embedded basis's recipe (also used for the block-level basis of the benchmarks)."""
    gens = [torch.Generator().manual_seed(s) for s in range(images)]
    basis = svdcache.calibrate(pipe, prompt=[prompt] * images, num_inference_steps=steps, tau=tau, generator=gens,
                               output_type="pt", **CALL_KWARGS, **GUIDANCE, **kw)
    basis.meta["prompt"] = prompt
    basis.meta["images"] = str(images)
    return basis


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="a handwritten digit three")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tau", type=float, default=0.99)
    ap.add_argument("--out", default=BASIS_PATH)
    args = ap.parse_args(argv)
    pipe = load_pipeline()
    basis = calibrate_reference(pipe, args.prompt, args.images, args.steps, args.tau)
    basis.save(args.out)
    print(basis, "->", args.out)


if __name__ == "__main__":
    main()
