"""Command line: ``python -m svdcache demo ...`` and ``python -m svdcache calibrate ...``."""
from __future__ import annotations

import argparse
import sys


def _calibrate(args) -> None:
    import torch

    from .calibration import calibrate

    if args.model is None:
        from .embedded import CALL_KWARGS, load_pipeline

        pipe = load_pipeline(args.device)
        extra = dict(CALL_KWARGS)
    else:
        from diffusers import DiffusionPipeline

        dtype = getattr(torch, args.dtype)
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
        extra = {}
    if args.height:
        extra["height"] = args.height
    if args.width:
        extra["width"] = args.width
    steps = None if args.calib_steps is None else [int(s) for s in args.calib_steps.split(",")]
    gen = torch.Generator("cpu").manual_seed(args.seed)
    basis = calibrate(pipe, prompt=args.prompt, num_inference_steps=args.steps, steps=steps, tau=args.tau,
                      granularity=args.granularity, generator=gen, **extra)
    basis.save(args.out)
    print(f"{basis} -> {args.out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m svdcache", description="SVD-Cache for diffusers transformers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    from . import demo

    d = sub.add_parser("demo", help="generate with and without the cache on the embedded model",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(d)
    c = sub.add_parser("calibrate", help="one-time SVD of a pipeline's cached features -> basis file")
    c.add_argument("--model", default=None, help="diffusers pipeline folder or hub id (default: the embedded model)")
    c.add_argument("--prompt", default="a handwritten digit three", help="reference prompt")
    c.add_argument("--steps", type=int, default=50, help="sampling steps of the reference generation")
    c.add_argument("--calib-steps", default=None, help="comma-separated step indices to use (default all)")
    c.add_argument("--tau", type=float, default=0.99, help="energy threshold choosing k (default 0.99)")
    c.add_argument("--granularity", default="auto", choices=("auto", "module", "block"))
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32", help="torch dtype of a --model pipeline (e.g. bfloat16)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="basis file to write (.safetensors)")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        print(demo.format_table(demo.run_demo(args)))
    else:
        _calibrate(args)


if __name__ == "__main__":
    main(sys.argv[1:])
