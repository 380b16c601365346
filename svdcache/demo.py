"""The demo: the embedded FLUX pipeline generates digits uncached and with SVD-Cache, side by side.

    python -m svdcache demo [--interval 5] [--predictor taylor] [--steps 50] [--device cpu] [--out out/demo.png]

Prints wall-clock time of both runs (median of --repeats, interleaved), the speed-up, the transformer
FLOPs ratio, cache memory, and PSNR / SSIM of the cached images against the uncached ones; writes
a PNG with one column per image: uncached / cached / |difference| x 10.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from . import api as apply, config as config_mod
from .embedded import CALL_KWARGS, GUIDANCE, canonical_prompt, load_basis, load_pipeline
from .metrics import psnr, ssim


class _Timer:
    """Wall-clock of the transformer calls (forward hooks on the module)."""

    def __init__(self, module, device):
        self.total = 0.0
        self.device = device
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _sync(self):
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()

    def _pre(self, *a):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *a):
        self._sync()
        self.total += time.perf_counter() - self._t0


def _generate(pipe, prompts, seeds, steps, device, cfg_scale):
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
    from PIL import Image

    diff = ((cached - ref).abs() * amplify).clamp(0, 1)
    rows = [torch.cat(list(x), dim=2) for x in (ref.clamp(0, 1), cached.clamp(0, 1), diff)]  # (3, H, B*W)
    grid = torch.cat(rows, dim=1)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)


def run_demo(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available")
    pipe = load_pipeline(device)
    pipe.set_progress_bar_config(disable=True)
    digits = list(range(10))
    prompts = [canonical_prompt(d) for d in digits for _ in range(args.seeds)]
    seeds = [1000 * d + s for d in digits for s in range(args.seeds)]
    cfg = config_mod.SVDCacheConfig(interval=args.interval, predictor=args.predictor, residual=args.residual)
    basis = None if args.basis == "online" else (load_basis(device) if args.basis is None else args.basis)
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
                    apply.enable(pipe, basis=basis, config=cfg)
                else:
                    apply.disable(pipe)
                timer.total = 0.0
                images[mode], dt = _generate(pipe, prompts, seeds, args.steps, device, args.cfg)
                times[mode].append(dt)
                tr_times[mode].append(timer.total)
                if mode == "cached":
                    st = apply.stats(pipe)
                bar.update()
    apply.disable(pipe)
    ref, cached = images["uncached"], images["cached"]
    p, s = psnr(cached, ref), ssim(cached, ref)
    med = {k: statistics.median(v) for k, v in times.items()}
    tmed = {k: statistics.median(v) for k, v in tr_times.items()}
    g = st.last_generation
    res = dict(
        config=cfg.label,
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


def add_arguments(ap: argparse.ArgumentParser) -> None:
    d = config_mod.SVDCacheConfig()
    ap.add_argument("--interval", type=int, default=d.interval, help=f"full step every N steps (default {d.interval})")
    ap.add_argument("--predictor", choices=config_mod.PREDICTORS, default=d.predictor,
                    help=f"principal-subspace predictor (default {d.predictor})")
    ap.add_argument("--residual", choices=config_mod.RESIDUALS, default=d.residual,
                    help=f"residual policy (default {d.residual})")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    ap.add_argument("--seeds", type=int, default=2, help="images per digit (default 2: 20 images)")
    ap.add_argument("--cfg", type=float, default=GUIDANCE["true_cfg_scale"],
                    help="true classifier-free guidance scale; cond and uncond calls are cached in separate "
                         f"contexts (default {GUIDANCE['true_cfg_scale']:g}; 1 = no guidance)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each mode, interleaved; the median is shown (default 5)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16, Triton kernels)")
    ap.add_argument("--basis", default=None, help="basis file (default: the embedded one); 'online' builds one online")
    ap.add_argument("--out", default="out/demo.png", help="side-by-side PNG (default out/demo.png)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def check_arguments(ap: argparse.ArgumentParser, args) -> None:
    """Bad arguments end here, in one line (exit 2), before a minute of generation."""
    from PIL import Image

    for name in ("interval", "steps", "seeds", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        ap.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if not args.cfg >= 1.0:
        ap.error(f"--cfg must be >= 1 (1 = no guidance), got {args.cfg:g}")
    if args.basis not in (None, "online") and not os.path.isfile(args.basis):
        ap.error(f"--basis {args.basis}: no such file (or 'online' to build one)")
    if os.path.isdir(args.out):
        ap.error(f"--out {args.out} is a directory; give a file name such as {os.path.join(args.out, 'demo.png')}")
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in Image.registered_extensions():
        ap.error(f"--out {args.out}: not an image file name (give e.g. out/demo.png)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m svdcache demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    check_arguments(ap, args)
    print(format_table(run_demo(args)))
