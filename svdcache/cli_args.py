"""The command line's arguments: the parsers of ``python -m svdcache`` and every check that needs
neither torch nor diffusers, so that ``--help`` and a bad argument answer at once (one line on
stderr, exit code 2), before anything heavy is imported. Checks that need torch or diffusers (is
this CUDA device there, is this class a pipeline) are here too, importing them only when called.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import re
import sys
import tempfile

PROG = "python -m svdcache"
CALL_DEFAULTS_FILE = "svdcache_call.json"  # in a pipeline folder: the call settings it is meant for

# SVDCacheConfig's defaults and choices as the demo offers them (svdcache.config imports torch);
# tests/faults/test_cli_args.py holds them equal to svdcache.config's.
DEFAULT_INTERVAL = 5
PREDICTORS = ("taylor", "ema", "reuse")
DEFAULT_PREDICTOR = "taylor"
RESIDUALS = ("reuse", "taylor", "damped", "int8", "int4")
DEFAULT_RESIDUAL = "int4"
GUIDANCE_SCALE = 2.0  # svdcache.embedded.GUIDANCE["true_cfg_scale"]
CFG_RANGE = (1.0, 100.0)  # true classifier-free guidance scales the demo accepts
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64", "float", "half", "double")
CLI_CALL_KEYS = {"prompt": "--prompt", "num_inference_steps": "--steps", "generator": "--seed"}
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")  # what svdcache.enable / calibrate cache
_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

DEMO_DOC = """\
The demo: the embedded FLUX pipeline generates digits uncached and with SVD-Cache, side by side.

    python -m svdcache demo [--interval 5] [--predictor taylor] [--steps 50] [--device cpu] [--out out/demo.png]

Prints wall-clock time of both runs (median of --repeats, interleaved), the speed-up, the transformer
FLOPs ratio, cache memory, and PSNR / SSIM of the cached images against the uncached ones; writes
a PNG with one column per image: uncached / cached / |difference| x 10.
"""


class UsageError(Exception):
    """A bad argument, found before any work: one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but every error is one line (``prog: error: msg``) and at most one hint, exit 2:
    not the usage block."""

    def error(self, message):  # argparse's own errors: unknown flag, bad int, missing argument, ...
        self.fail(message, hint=f"see {self.prog} --help")

    def fail(self, message, hint: str | None = None):
        lines = [f"{self.prog}: error: {' '.join(str(message).split())}"] + ([hint] if hint else [])
        sys.stderr.write("\n".join(lines) + "\n")
        raise SystemExit(2)


def add_demo_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--interval", type=int, default=DEFAULT_INTERVAL,
                    help=f"full step every N steps (default {DEFAULT_INTERVAL})")
    ap.add_argument("--predictor", choices=PREDICTORS, default=DEFAULT_PREDICTOR,
                    help=f"principal-subspace predictor (default {DEFAULT_PREDICTOR})")
    ap.add_argument("--residual", choices=RESIDUALS, default=DEFAULT_RESIDUAL,
                    help=f"residual policy (default {DEFAULT_RESIDUAL})")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    ap.add_argument("--seeds", type=int, default=2, help="images per digit (default 2: 20 images)")
    ap.add_argument("--cfg", type=float, default=GUIDANCE_SCALE,
                    help="true classifier-free guidance scale, %g..%g; cond and uncond calls are cached in separate "
                         "contexts (default %g; 1 = no guidance)" % (*CFG_RANGE, GUIDANCE_SCALE))
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each mode, interleaved; the median is shown (default 5)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (bf16, Triton kernels)")
    ap.add_argument("--basis", default=None, help="basis file (default: the embedded one); 'online' builds one online")
    ap.add_argument("--out", default="out/demo.png", help="side-by-side PNG (default out/demo.png)")
    ap.add_argument("--threads", type=int, default=0, help=f"torch threads, up to {max_threads()} here (0: torch's default)")


def add_calibrate_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--model", default=None, help="diffusers pipeline folder or hub id (default: the embedded model); "
                   f"call settings come from the embedded model's CALL_KWARGS or the folder's {CALL_DEFAULTS_FILE}")
    c.add_argument("--prompt", default="a handwritten digit three", help="reference prompt")
    c.add_argument("--steps", type=int, default=50, help="sampling steps of the reference generation (>= 1)")
    c.add_argument("--calib-steps", default=None, help="comma-separated step indices to use (default all)")
    c.add_argument("--tau", type=float, default=0.99, help="energy threshold choosing k, in (0, 1] (default 0.99)")
    c.add_argument("--granularity", default="auto", choices=("auto", "module", "block"))
    c.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's call settings)")
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    c.add_argument("--dtype", default=None, help="float dtype of the pipeline: float32, bfloat16 or float16 (default "
                   "float32; the embedded model: float32 on CPU, bfloat16 on CUDA)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="basis file to write (.safetensors)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.add_argument("--no-choose", action="store_true",
                   help="skip the closed-loop choice of the configuration per interval (svdcache.choice)")
    c.add_argument("--choose-intervals", default="3,4,5,6,7",
                   help="intervals the configuration is chosen for (comma-separated, each >= 2; default 3,4,5,6,7); "
                   "the guidance form (one call per step, or cond / uncond calls) is the pipeline call's own")
    c.add_argument("--choose-prompts", default=None,
                   help="prompts the choice generates with, separated by '|' (default: --prompt); keep them apart "
                   "from anything you evaluate on")


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The ``python -m svdcache`` parser and its subcommands' parsers, by name."""
    ap = Parser(prog=PROG, description="SVD-Cache for diffusers transformers")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{demo,calibrate}")
    d = sub.add_parser("demo", help="generate with and without the cache on the embedded model",
                       description=DEMO_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(d)
    c = sub.add_parser("calibrate", help="one-time SVD of a pipeline's cached features -> basis file")
    add_calibrate_arguments(c)
    return ap, {"demo": d, "calibrate": c}


def demo_parser() -> Parser:
    ap = Parser(prog=f"{PROG} demo", description=DEMO_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(ap)
    return ap


# -- checks without torch -------------------------------------------------------------------------
def max_threads() -> int:
    """The most torch threads the demo accepts: 4 per CPU here (torch crashes on absurd counts)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(4, 4 * n)


def check_device_syntax(device: str) -> None:
    if not _DEVICE.match(device or ""):
        what = "is not supported" if device in ("meta", "mps", "xpu", "xla", "hpu", "npu") else "is not a device"
        raise UsageError(f"--device {device!r} {what}: use cpu, cuda or cuda:N")


def check_device_available(device: str) -> None:
    """A CUDA device that this machine has (imports torch)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    idx = int(device.split(":")[1]) if ":" in device else 0
    n = torch.cuda.device_count()
    if idx >= n:
        raise UsageError(f"--device {device}: this machine has {n} CUDA device{'s' * (n != 1)} (cuda:0 to cuda:{n - 1})")


def probe_write(flag: str, shown: str, folder: str) -> None:
    """Create and remove a temporary file in ``folder``: unwritable places (/proc, /sys, read-only
    mounts, no permission) are found before any work."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".svdcache-probe-")
    except OSError as e:
        raise UsageError(f"{flag} {shown}: cannot write in {folder} ({e.strerror or e}); choose a writable place") from None
    os.close(fd)
    os.remove(tmp)


def _existing_ancestor(path: str) -> str:
    p = path
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_out_file(flag: str, shown: str, *, create_dirs: bool) -> str:
    """The absolute path of an output file: not a directory or device, its folder there (or, with
    ``create_dirs``, creatable) and writable. Returns it."""
    out = os.path.abspath(os.path.expanduser(shown))
    if os.path.isdir(out):
        raise UsageError(f"{flag} {shown} is a directory; give a file name in it")
    if os.path.lexists(out) and not os.path.isfile(out):
        raise UsageError(f"{flag} {shown} exists and is not a regular file; give a file name")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        anc = _existing_ancestor(parent)
        if os.path.lexists(anc) and not os.path.isdir(anc):
            raise UsageError(f"{flag} {shown}: {anc} is a file, not a directory; choose another place")
        if not create_dirs:
            raise UsageError(f"{flag} {shown}: the directory {parent} does not exist; create it first")
        probe_write(flag, shown, anc)
    else:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {shown}: the directory {parent} is not writable")
        probe_write(flag, shown, parent)
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise UsageError(f"{flag} {shown} exists and is not writable")
    return out


def check_demo(args) -> None:
    """Every demo argument that can be judged without torch; UsageError (one line) if one is bad."""
    for name in ("interval", "steps", "seeds", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    top = max_threads()
    if not 0 <= args.threads <= top:
        raise UsageError(f"--threads must be 0 (torch's default) to {top} (4 per CPU here), got {args.threads}")
    lo, hi = CFG_RANGE
    if not (math.isfinite(args.cfg) and lo <= args.cfg <= hi):
        raise UsageError(f"--cfg must be a number from {lo:g} to {hi:g} (1 = no guidance), got {args.cfg:g}")
    check_device_syntax(args.device)
    if args.basis not in (None, "online"):
        if os.path.isdir(args.basis):
            from .basis_io import local_basis_file

            try:
                local_basis_file(args.basis)
            except OSError as e:
                raise UsageError(f"--basis {e}") from None
        if not os.path.isfile(args.basis):
            raise UsageError(f"--basis {args.basis}: no such file (or 'online' to build one)")
    check_out_file("--out", args.out, create_dirs=True)
    from PIL import Image

    ext = os.path.splitext(args.out)[1].lower()
    if ext not in Image.registered_extensions():
        raise UsageError(f"--out {args.out}: not an image file name (give e.g. out/demo.png)")


def _parse_steps(args) -> list[int] | None:
    if args.calib_steps is None:
        return None
    try:
        steps = [int(s) for s in args.calib_steps.split(",")]
    except ValueError:
        raise UsageError(f"--calib-steps must be comma-separated step indices like 0,1,2, got {args.calib_steps!r}") from None
    bad = [s for s in steps if not 0 <= s < args.steps]
    if bad:
        raise UsageError(f"--calib-steps {bad[0]} is outside the {args.steps} sampling steps (0..{args.steps - 1})")
    if len(set(steps)) != len(steps):
        raise UsageError(f"--calib-steps lists a step twice: {args.calib_steps!r}")
    return steps


def read_call_defaults(folder: str) -> tuple[dict, str]:
    """A pipeline folder's ``svdcache_call.json``: ({}, "") without one; a UsageError if it is not a
    JSON object."""
    path = os.path.join(folder, CALL_DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}, ""
    try:
        with open(path) as f:
            kw = json.loads(f.read())
    except (ValueError, OSError) as e:
        raise UsageError(f"{path} is not valid JSON ({' '.join(str(e).split())}); fix or delete it") from None
    if not isinstance(kw, dict):
        raise UsageError(f"{path} must hold a JSON object of pipeline call arguments")
    for key in ("height", "width"):
        v = kw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 16 or v % 16):
            raise UsageError(f"{path}: {key!r} must be a positive multiple of 16, got {v!r}")
    for key, flag in CLI_CALL_KEYS.items():
        if key in kw:
            raise UsageError(f"{path} sets {key!r}, which calibrate sets itself ({flag}); remove it from the file")
    return kw, path


def read_model_index(folder: str) -> dict:
    """A pipeline folder's ``model_index.json``, checked without loading anything: it parses, names a
    class, every component it lists has its folder, and it holds one transformer."""
    shown = f"--model {folder}"
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise UsageError(f"{shown} is a folder without model_index.json, not a diffusers pipeline")
    try:
        with open(path) as f:
            index = json.loads(f.read())
    except (ValueError, OSError) as e:
        raise UsageError(f"{shown}: model_index.json is not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str) or not index["_class_name"]:
        raise UsageError(f"{shown}: model_index.json names no pipeline class (its '_class_name' field)")
    present = []
    for key, spec in index.items():
        if key.startswith("_"):
            continue
        if not (isinstance(spec, list) and len(spec) == 2):
            raise UsageError(f"{shown}: model_index.json entry {key!r} must be [library, class], got {spec!r}")
        if spec[0] is None or spec[1] is None:
            continue  # an optional component left out
        present.append(key)
        if not os.path.isdir(os.path.join(folder, key)):
            raise UsageError(f"{shown}: model_index.json lists the component {key!r} ({spec[1]}) but its folder "
                             f"{os.path.join(folder, key)} is missing")
    transformers = [k for k in TRANSFORMER_COMPONENTS if k in present]
    if not transformers:
        raise UsageError(f"{shown}: {index['_class_name']} lists no transformer component (it has "
                         f"{', '.join(present) or 'none'}); svdcache caches diffusion transformers")
    if len(transformers) > 1:
        raise UsageError(f"{shown}: {index['_class_name']} has {len(transformers)} transformers "
                         f"({', '.join(transformers)}); calibrate each with svdcache.calibrate in Python")
    return index


def check_model_syntax(model: str | None) -> tuple[str, str | None, dict | None]:
    """``(kind, path, model_index)`` with kind "embedded", "folder" or "hub"; a UsageError for a
    missing folder, a file, or a folder that is not a complete pipeline."""
    if model is None:
        return "embedded", None, None
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return "folder", path, read_model_index(path)
    if os.path.exists(path):
        raise UsageError(f"--model {model} is a file; give a diffusers pipeline folder (with model_index.json) or a hub id")
    if _REPO_ID.match(model) and not model.startswith((".", "~")):
        return "hub", model, None
    raise UsageError(f"--model {model}: no such folder (and not a hub id like owner/name)")


def check_calibrate(args) -> dict:
    """Every calibrate argument that can be judged without torch or diffusers; returns what it
    resolved (steps, model kind, path, model_index, call defaults and where they come from)."""
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 < args.tau <= 1.0:
        raise UsageError(f"--tau must lie in (0, 1], got {args.tau}")
    steps = _parse_steps(args)
    try:
        intervals = tuple(int(s) for s in args.choose_intervals.split(","))
    except ValueError:
        raise UsageError(f"--choose-intervals must be comma-separated integers like 3,5,7, got {args.choose_intervals!r}") from None
    if not intervals or min(intervals) < 2 or len(set(intervals)) != len(intervals):
        raise UsageError(f"--choose-intervals must be distinct integers >= 2, got {args.choose_intervals!r}")
    if args.choose_prompts is not None and not all(p.strip() for p in args.choose_prompts.split("|")):
        raise UsageError("--choose-prompts must be prompts separated by '|', none empty")
    if args.dtype is not None and args.dtype not in FLOAT_DTYPES:
        raise UsageError(f"--dtype must be a torch float dtype such as float32, bfloat16 or float16, got {args.dtype!r}")
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v is not None and (v < 16 or v % 16):
            raise UsageError(f"--{flag} must be a positive multiple of 16, got {v}")
    if not -(2**63) <= args.seed < 2**64:
        raise UsageError(f"--seed must fit 64 bits, got {args.seed}")
    check_device_syntax(args.device)
    out = check_out_file("--out", args.out, create_dirs=False)
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    kind, path, index = check_model_syntax(args.model)
    defaults, source = read_call_defaults(path) if kind == "folder" else ({}, "")
    return dict(steps=steps, kind=kind, path=path, index=index, defaults=defaults, source=source, intervals=intervals)


# -- checks that import diffusers -----------------------------------------------------------------
def check_pipeline_class(folder: str, index: dict, call_keys, reserved=()) -> type:
    """The diffusers pipeline class that ``model_index.json`` names (no weights loaded), and the
    folder's call settings checked against its ``__call__``; UsageError otherwise."""
    import inspect

    import diffusers

    name = index["_class_name"]
    cls = getattr(diffusers, name, None)
    if isinstance(cls, type) and getattr(cls, "_backends", None) and not issubclass(cls, diffusers.DiffusionPipeline):
        raise UsageError(f"--model {folder}: {name} needs {', '.join(cls._backends)}, which is not installed")
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise UsageError(f"--model {folder}: model_index.json names {name!r}, not a pipeline class of diffusers "
                         f"{diffusers.__version__}; fix its '_class_name'")
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return cls
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cls
    names = [n for n in params if n != "self"]
    for key in call_keys:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UsageError(f"{os.path.join(folder, CALL_DEFAULTS_FILE)}: {key!r} is not an argument of "
                             f"{name}.__call__{hint}; fix or remove it")
        if key in reserved:
            raise UsageError(f"{os.path.join(folder, CALL_DEFAULTS_FILE)}: {key!r} is also an argument of "
                             "svdcache.calibrate; remove it from the file")
    return cls


@contextlib.contextmanager
def quiet_foreign_libraries():
    """The command's own output only: warnings, log messages and model-loading progress bars of
    transformers, diffusers and huggingface_hub (accelerate missing, torchvision missing, hub
    retries, ...) are silenced while it runs (download bars stay), and restored after."""
    import warnings

    restore = []
    with warnings.catch_warnings():
        for mod in ("transformers", "diffusers", "huggingface_hub", "accelerate"):
            warnings.filterwarnings("ignore", module=rf"{mod}(\..*)?$")
        for mod in ("transformers.utils.logging", "diffusers.utils.logging", "huggingface_hub.utils.logging"):
            try:
                lib = __import__(mod, fromlist=["get_verbosity"])
            except ImportError:
                continue
            restore.append((lib.set_verbosity, lib.get_verbosity()))
            lib.set_verbosity_error()
            if hasattr(lib, "disable_progress_bar") and hasattr(lib, "is_progress_bar_enabled"):
                if lib.is_progress_bar_enabled():  # "Loading pipeline components", "Loading weights"
                    lib.disable_progress_bar()
                    restore.append((lambda _, lib=lib: lib.enable_progress_bar(), None))
        try:
            yield
        finally:
            for set_level, level in reversed(restore):
                set_level(level)
