"""Write a pipeline folder from a training checkpoint (to look at a model while it trains).

    python -m svdcache.embedded.export --work .work/train --out /tmp/tiny-flux-snapshot
"""
from __future__ import annotations

import argparse
import os

import torch

from .build import build_pipeline
from .data import load_digit_images
from .train import encode_latents


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default=".work/train")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    state = torch.load(os.path.join(args.work, "state.pt"), weights_only=False)
    pipe = build_pipeline(seed=args.seed)
    pipe.vae.load_state_dict(state["vae"])
    encode_latents(pipe, load_digit_images(seed=args.seed)[0])  # sets the VAE's latent scale/shift
    pipe.transformer.load_state_dict(state["ema"])
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"step {state.get('step')} -> {args.out}")


if __name__ == "__main__":
    main()
