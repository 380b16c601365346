"""Command line: ``python -m svdcache demo ...`` and ``python -m svdcache calibrate ...``."""
from __future__ import annotations

import argparse
import json
import os
import sys

CALL_DEFAULTS_FILE = "svdcache_call.json"  # in a pipeline folder: the call settings it is meant for


class UsageError(Exception):
    """A bad argument, found before any work: one line on stderr, exit code 2."""


def _fail(prog: str, msg: str):
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def pipeline_call_defaults(model: str | None) -> tuple[dict, str]:
    """The call settings a pipeline is meant to be run with, where the project knows them: the
    embedded pipeline's CALL_KWARGS (no --model, or --model pointing at its folder), else a folder's
    ``svdcache_call.json``; ({}, "") when none are known (diffusers' own defaults apply)."""
    from .embedded import CALL_KWARGS, PIPELINE_DIR

    if model is None or _same_dir(model, PIPELINE_DIR):
        return dict(CALL_KWARGS), "the embedded pipeline's CALL_KWARGS"
    path = os.path.join(model, CALL_DEFAULTS_FILE)
    if os.path.isfile(path):
        try:
            kw = json.loads(open(path).read())
        except ValueError as e:
            raise UsageError(f"{path} is not valid JSON ({e}); fix or delete it") from None
        if not isinstance(kw, dict):
            raise UsageError(f"{path} must hold a JSON object of pipeline call arguments")
        return kw, path
    return {}, ""


def validate_calibrate_args(args) -> dict:
    """Check every argument of ``calibrate`` before any model is loaded; returns the resolved
    values (dtype, steps list, call defaults). Raises UsageError with a one-line message."""
    import torch

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 < args.tau <= 1.0:
        raise UsageError(f"--tau must lie in (0, 1], got {args.tau}")
    steps = None
    if args.calib_steps is not None:
        try:
            steps = [int(s) for s in args.calib_steps.split(",")]
        except ValueError:
            raise UsageError(f"--calib-steps must be comma-separated step indices like 0,1,2, got {args.calib_steps!r}") from None
        bad = [s for s in steps if not 0 <= s < args.steps]
        if bad:
            raise UsageError(f"--calib-steps {bad[0]} is outside the {args.steps} sampling steps (0..{args.steps - 1})")
        if len(set(steps)) != len(steps):
            raise UsageError(f"--calib-steps lists a step twice: {args.calib_steps!r}")
    dtype = None  # the embedded pipeline's own default (fp32 on CPU, bf16 on CUDA)
    if args.dtype is not None or args.model is not None:
        name = args.dtype or "float32"
        dtype = getattr(torch, name, None) if name.isidentifier() else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise UsageError(f"--dtype must be a torch float dtype such as float32, bfloat16 or float16, got {name!r}")
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v is not None and (v < 16 or v % 16):
            raise UsageError(f"--{flag} must be a positive multiple of 16, got {v}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    if os.path.isdir(out):
        raise UsageError(f"--out {args.out} is a directory; give a file name such as {os.path.join(args.out, 'basis.safetensors')}")
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {args.out}: the directory {parent} is not writable")
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise UsageError(f"--out {args.out} exists and is not writable")
    if args.model is not None and os.path.isdir(args.model):
        if not os.path.isfile(os.path.join(args.model, "model_index.json")):
            raise UsageError(f"--model {args.model} is a folder without model_index.json, not a diffusers pipeline")
    elif args.model is not None and (os.path.exists(args.model) or args.model.startswith((".", "/", "~"))
                                     or args.model.count("/") != 1):
        raise UsageError(f"--model {args.model} is neither a pipeline folder nor a hub id like owner/name")
    defaults, source = pipeline_call_defaults(args.model)
    return dict(dtype=dtype, steps=steps, defaults=defaults, source=source)


def _calibrate(args, resolved: dict) -> None:
    import torch

    from .calibration import calibrate

    dtype = resolved["dtype"]
    if args.model is None:
        from .embedded import load_pipeline

        pipe = load_pipeline(args.device, dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(args.device)
    extra = dict(resolved["defaults"])
    if args.height:
        extra["height"] = args.height
    if args.width:
        extra["width"] = args.width
    default_px = getattr(pipe, "default_sample_size", None)
    default_px = default_px * getattr(pipe, "vae_scale_factor", 1) if default_px else None
    h, w = extra.get("height", default_px), extra.get("width", default_px)
    origin = f" (call settings from {resolved['source']})" if resolved["source"] else " (the pipeline's defaults)"
    print(f"svdcache calibrate: {type(pipe).__name__} at {h}x{w}, {args.steps} steps{origin}", flush=True)
    gen = torch.Generator("cpu").manual_seed(args.seed)
    basis = calibrate(pipe, prompt=args.prompt, num_inference_steps=args.steps, steps=resolved["steps"], tau=args.tau,
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
    c.add_argument("--model", default=None, help="diffusers pipeline folder or hub id (default: the embedded model); "
                   f"call settings come from the embedded model's CALL_KWARGS or the folder's {CALL_DEFAULTS_FILE}")
    c.add_argument("--prompt", default="a handwritten digit three", help="reference prompt")
    c.add_argument("--steps", type=int, default=50, help="sampling steps of the reference generation (>= 1)")
    c.add_argument("--calib-steps", default=None, help="comma-separated step indices to use (default all)")
    c.add_argument("--tau", type=float, default=0.99, help="energy threshold choosing k, in (0, 1] (default 0.99)")
    c.add_argument("--granularity", default="auto", choices=("auto", "module", "block"))
    c.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's call settings)")
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default=None, help="torch float dtype of the pipeline, e.g. bfloat16 (default float32; "
                   "the embedded model: float32 on CPU, bfloat16 on CUDA)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="basis file to write (.safetensors)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        demo.check_arguments(d, args)
        print(demo.format_table(demo.run_demo(args)))
    else:
        try:
            resolved = validate_calibrate_args(args)
        except UsageError as e:
            _fail(c.prog, str(e))
        _calibrate(args, resolved)


if __name__ == "__main__":
    main(sys.argv[1:])
