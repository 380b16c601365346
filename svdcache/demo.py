"""The demo: the embedded FLUX pipeline generates digits uncached and with SVD-Cache, side by side
(``python -m svdcache demo --help``; its arguments and their checks: :mod:`svdcache.cli_args`).

Uses the public API only (``svdcache.enable`` / ``disable`` / ``stats`` / ``SVDCacheConfig``), and
imports torch only when it runs, so the command line answers ``--help`` without it.
"""
from __future__ import annotations

import statistics
import time

from .cli_args import DEMO_DOC, UsageError, add_demo_arguments, check_demo, check_device_available  # noqa: F401
from .cli_args import demo_parser, quiet_foreign_libraries


class _Timer:
    """Wall-clock of the transformer calls (forward hooks on the module)."""

    def __init__(self, module, device):
        self.total = 0.0
        self.device = device
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _sync(self):
        if str(self.device).startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def _pre(self, *a):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *a):
        self._sync()
        self.total += time.perf_counter() - self._t0


def _generate(pipe, prompts, seeds, steps, device, cfg_scale):
    import torch

    from .embedded import CALL_KWARGS, GUIDANCE

    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    guidance = dict(GUIDANCE, true_cfg_scale=cfg_scale) if cfg_scale > 1 else {}
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = pipe(prompts, num_inference_steps=steps, generator=gens, output_type="pt", **CALL_KWARGS, **guidance).images
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out.float().cpu(), time.perf_counter() - t0


def save_comparison(path, ref, cached, scale=4, amplify=10.0):
    """One column per image: uncached (top), cached (middle), |difference| x amplify (bottom)."""
    import os

    import torch
    from PIL import Image

    diff = ((cached - ref).abs() * amplify).clamp(0, 1)
    rows = [torch.cat(list(x), dim=2) for x in (ref.clamp(0, 1), cached.clamp(0, 1), diff)]  # (3, H, B*W)
    grid = torch.cat(rows, dim=1)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)


def _check_basis(pipe, basis, cfg, device):
    """The --basis file against the embedded model, before any generation: loaded and validated
    through ``svdcache.enable`` (then disabled again); a UsageError naming the file otherwise."""
    import svdcache

    loaded = _load_basis(basis, device)
    try:
        svdcache.enable(pipe, basis=loaded, config=cfg)
    except (ValueError, OSError) as e:
        raise _basis_error(basis, e) from None
    finally:
        svdcache.disable(pipe)
    return loaded


def _basis_error(basis: str, e: Exception) -> UsageError:
    msg = " ".join(str(e).split())
    return UsageError(msg if basis in msg else f"--basis {basis}: {msg}")


def _load_basis(basis: str, device):
    import svdcache

    try:
        return svdcache.load_basis(basis, device=device)
    except (ValueError, OSError) as e:
        raise _basis_error(basis, e) from None


def run_demo(args) -> dict:
    """Generate uncached and cached (interleaved, --repeats times); the table's numbers. Bad
    arguments that need torch or the model (a CUDA device that is not there, a basis of another
    model) raise UsageError before the first generation."""
    import torch

    import svdcache

    from .embedded import BASIS_PATH, canonical_prompt, load_pipeline
    from .metrics import psnr, ssim

    device = args.device
    check_device_available(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.basis not in (None, "online"):
        _load_basis(args.basis, device)  # a file that is no basis: refused before the model loads
    pipe = load_pipeline(device)
    pipe.set_progress_bar_config(disable=True)
    digits = list(range(10))
    prompts = [canonical_prompt(d) for d in digits for _ in range(args.seeds)]
    seeds = [1000 * d + s for d in digits for s in range(args.seeds)]
    cfg = svdcache.SVDCacheConfig(interval=args.interval, predictor=args.predictor, residual=args.residual)
    basis = None if args.basis == "online" else _check_basis(pipe, BASIS_PATH if args.basis is None else args.basis, cfg, device)
    timer = _Timer(pipe.transformer, device)

    _generate(pipe, prompts[:2], seeds[:2], 2, device, args.cfg)  # warm-up: lazy initialisation, not timed
    times = {"uncached": [], "cached": []}
    tr_times = {"uncached": [], "cached": []}
    images = {}
    from tqdm.auto import tqdm

    with tqdm(total=2 * args.repeats, desc="demo generations", unit="gen") as bar:
        for _ in range(args.repeats):
            for mode in ("uncached", "cached"):
                if mode == "cached":
                    applied = svdcache.enable(pipe, basis=basis, config=cfg)  # with the basis's choice
                else:
                    svdcache.disable(pipe)
                timer.total = 0.0
                images[mode], dt = _generate(pipe, prompts, seeds, args.steps, device, args.cfg)
                times[mode].append(dt)
                tr_times[mode].append(timer.total)
                if mode == "cached":
                    st = svdcache.stats(pipe)
                bar.update()
    svdcache.disable(pipe)
    ref, cached = images["uncached"], images["cached"]
    p, s = psnr(cached, ref), ssim(cached, ref)
    med = {k: statistics.median(v) for k, v in times.items()}
    tmed = {k: statistics.median(v) for k, v in tr_times.items()}
    g = st.last_generation
    res = dict(
        config=applied.label + (f" (chosen: {applied.chosen})" if applied.chosen else ""),
        images=len(prompts),
        steps=args.steps,
        cfg=args.cfg,
        device=device,
        time_uncached=med["uncached"],
        time_cached=med["cached"],
        speedup=med["uncached"] / med["cached"],
        transformer_speedup=tmed["uncached"] / tmed["cached"],
        flops_ratio=g.flops_ratio,
        memory_ratio=g.memory_ratio,
        full_steps=g.full_steps,
        cached_steps=g.cached_steps,
        psnr_mean=float(p.mean()),
        psnr_min=float(p.min()),
        ssim_mean=float(s.mean()),
        ssim_min=float(s.min()),
    )
    save_comparison(args.out, ref[:: args.seeds], cached[:: args.seeds])
    res["png"] = args.out
    return res


def format_table(r: dict) -> str:
    rows = [
        ("configuration", r["config"]),
        ("images x steps", f"{r['images']} x {r['steps']} on {r['device']}, guidance {r['cfg']:g}"),
        ("wall-clock uncached (median)", f"{r['time_uncached']:.2f} s"),
        ("wall-clock SVD-Cache (median)", f"{r['time_cached']:.2f} s"),
        ("speed-up (pipeline / transformer)", f"{r['speedup']:.2f}x / {r['transformer_speedup']:.2f}x"),
        ("transformer FLOPs ratio", f"{r['flops_ratio']:.2f}x ({r['full_steps']} full + {r['cached_steps']} cached calls)"),
        ("transformer speed-up / FLOPs ratio", f"{r['transformer_speedup'] / r['flops_ratio']:.2f}"),
        ("cache memory", f"{r['memory_ratio']:.2f} copies of the cached features"),
        ("PSNR vs uncached (mean / min)", f"{r['psnr_mean']:.2f} / {r['psnr_min']:.2f} dB"),
        ("SSIM vs uncached (mean / min)", f"{r['ssim_mean']:.4f} / {r['ssim_min']:.4f}"),
        ("side-by-side PNG", r["png"]),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"| {a:<{w}} | {b} |" for a, b in rows)


def add_arguments(ap) -> None:
    """The demo's arguments on an argparse parser (see :mod:`svdcache.cli_args`)."""
    add_demo_arguments(ap)


def check_arguments(ap, args) -> None:
    """Bad arguments end here, in one line (exit 2), before a minute of generation."""
    try:
        check_demo(args)
    except UsageError as e:
        if hasattr(ap, "fail"):  # cli_args.Parser: one line, exit 2
            ap.fail(str(e))
        ap.error(str(e))


def run_cli(args) -> None:
    """Run the demo (arguments checked by :func:`check_arguments`) and print its table; a UsageError
    for what is found wrong before the first generation."""
    print(format_table(run_demo(args)))


def main(argv=None) -> None:
    ap = demo_parser()
    args = ap.parse_args(argv)
    check_arguments(ap, args)
    try:
        with quiet_foreign_libraries():
            run_cli(args)
    except UsageError as e:
        ap.fail(str(e))
