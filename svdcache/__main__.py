"""Command line: ``python -m svdcache demo ...`` and ``python -m svdcache calibrate ...``.

The parsers and every check that needs no torch live in :mod:`svdcache.cli_args`: ``--help`` and a
bad argument answer before torch or diffusers are imported. Every failure found before the work is
one line on stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys

from .cli_args import CALL_DEFAULTS_FILE, FLOAT_DTYPES, UsageError, build_parser  # noqa: F401
from .cli_args import check_calibrate, check_demo, check_device_available, check_pipeline_class
from .cli_args import quiet_foreign_libraries, read_call_defaults


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
    if os.path.isdir(model):
        return read_call_defaults(model)
    return {}, ""


def _calibrate_reserved() -> set:
    """svdcache.calibrate's own keyword arguments (a call settings file must not set them)."""
    import inspect

    import svdcache

    try:
        params = inspect.signature(svdcache.calibrate).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def validate_calibrate_args(args) -> dict:
    """Check every argument of ``calibrate`` before any model is loaded (torch-free checks first);
    returns the resolved values (dtype, steps list, call defaults, ...). Raises UsageError with a
    one-line message."""
    resolved = check_calibrate(args)
    import torch

    check_device_available(args.device)
    dtype = None  # the embedded pipeline's own default (fp32 on CPU, bf16 on CUDA)
    if args.dtype is not None or args.model is not None:
        dtype = getattr(torch, args.dtype or "float32")  # a name of FLOAT_DTYPES (check_calibrate)
    if resolved["kind"] == "folder":
        defaults, source = pipeline_call_defaults(resolved["path"])
        check_pipeline_class(resolved["path"], resolved["index"], defaults, _calibrate_reserved())
    elif resolved["kind"] == "embedded":
        defaults, source = pipeline_call_defaults(None)
    else:
        defaults, source = {}, ""
    resolved.update(dtype=dtype, defaults=defaults, source=source)
    return resolved


def _first_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_pipeline(args, resolved):
    if resolved["kind"] == "embedded":
        from .embedded import load_pipeline

        return load_pipeline(args.device, dtype=resolved["dtype"])
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(resolved["path"], dtype=resolved["dtype"])
    except Exception as e:  # noqa: BLE001  (diffusers and huggingface_hub raise many types; one line each)
        if resolved["kind"] == "hub":
            raise UsageError(f"--model {args.model}: no local folder of that name, and the Hugging Face Hub repo could "
                             f"not be fetched ({type(e).__name__}: {_first_line(e)}); pass a local pipeline folder, "
                             "or connect to the network") from None
        raise UsageError(f"--model {args.model} could not be loaded ({type(e).__name__}: {_first_line(e)})") from None
    return pipe.to(args.device)


def _calibrate(args, resolved: dict) -> None:
    import torch

    import svdcache

    pipe = _load_pipeline(args, resolved)
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
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(desc="svdcache calibrate: reference generation")
    gen = torch.Generator("cpu").manual_seed(args.seed)
    prompts = [p.strip() for p in args.choose_prompts.split("|")] if args.choose_prompts else None
    basis = svdcache.calibrate(pipe, prompt=args.prompt, num_inference_steps=args.steps, steps=resolved["steps"],
                               tau=args.tau, granularity=args.granularity, generator=gen, choose=not args.no_choose,
                               choose_intervals=resolved["intervals"], choose_prompts=prompts, **extra)
    try:
        basis.save(args.out)
    except OSError as e:  # checked before the work, so only a change since (disk full, a removed folder)
        raise UsageError(f"--out: {_first_line(e)}") from None
    print(f"{basis} -> {args.out}")


def main(argv=None) -> None:
    ap, subs = build_parser()
    args, extra = ap.parse_known_args(argv)  # --help and syntax errors end here, before torch is imported
    sub = subs[args.cmd]
    if extra:  # named by the subcommand, with its --help as the hint
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.cmd == "demo":
            check_demo(args)
            with quiet_foreign_libraries():
                from . import demo

                demo.run_cli(args)
        else:
            check_calibrate(args)  # torch-free first: a bad argument answers at once
            with quiet_foreign_libraries():
                resolved = validate_calibrate_args(args)
                _calibrate(args, resolved)
    except UsageError as e:
        sub.fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
