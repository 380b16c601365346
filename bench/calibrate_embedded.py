"""Calibrate the embedded model's shipped basis (the one-time SVD).

    python bench/calibrate_embedded.py    # about 20 s on 2 CPU cores, plus ~10 min of schedule selection

Reference: ten images, one per digit, each with a phrasing the benchmarks never use (the benchmarks
and tests use the canonical "a handwritten digit <word>"; this uses "the number 3", "handwritten 7",
...), seeds 90000 + digit (the benchmarks use 1000 * digit + s, s < 10): nothing evaluated is
calibrated on. 50 steps with the embedded model's guidance (cond and uncond calls both feed the Gram
matrices), every step's features. The same run prices the calibrated schedules. The embedded model has only 64 image tokens per image, so one image is a thin
sample of its feature space; FLUX.1-dev's 4096 tokens per image are not. tau 0.99 sets the default
k; columns up to 0.999 energy are stored so that enable(tau=...) can lower or raise it.

Then the configuration per interval is chosen closed loop (svdcache.choice; ``--choose-only`` on an existing
basis file) on the same held-out prompts and seeds, split into a fitting and a checking half.

Schedule selection (``--no-select`` skips it): for the numbers of full steps of the uniform intervals
2..10, the default configuration's and full-space TaylorSeer order 1's calibrated plans are chosen
closed-loop among a few candidates (svdcache.schedule_tuning.tune_schedule, no local moves) on the same
held-out calibration prompts and seeds: nothing evaluated is selected on.
"""
import argparse
import json

import torch

import common  # noqa: F401
import svdcache
from svdcache.embedded import BASIS_PATH, CALL_KWARGS, GUIDANCE, load_pipeline, prompts_for

CALIBRATION_SEED = 90000


def calibration_prompts(images: int = 10) -> tuple[list[str], list[int]]:
    """Held-out prompts (non-canonical phrasings, one digit each in turn) and seeds."""
    prompts = [prompts_for(i % 10)[1 + (i % 10) % 4] for i in range(images)]
    return prompts, [CALIBRATION_SEED + i for i in range(images)]


def calibrate_reference(pipe, prompt=None, images=10, steps=50, tau=0.99, **kw):
    """The embedded basis's recipe (also used for the block-level basis of the benchmarks)."""
    prompts, seeds = calibration_prompts(images)
    if prompt is not None:
        prompts = [prompt] * images
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    kw.setdefault("choose", False)  # main() chooses after the plans are selected (add_choice)
    basis = svdcache.calibrate(pipe, prompt=prompts, num_inference_steps=steps, tau=tau, generator=gens,
                               output_type="pt", **CALL_KWARGS, **GUIDANCE, **kw)
    basis.meta["prompt"] = json.dumps(sorted(set(prompts)))
    basis.meta["seeds"] = f"{seeds[0]}..{seeds[-1]}"
    basis.meta["images"] = str(images)
    return basis


SELECT_INTERVALS = range(2, 11)


def select_schedules(pipe, basis, steps=50, images=10, max_evals=8, progress=True, shared_only=False):
    """Closed-loop choice of the calibrated plans on the calibration set: the default config and
    TaylorSeer o1, each with both guidance branches computed at every full step and with the
    unconditional one shared (``uncond_interval=2``, families ``-u2``). ``shared_only``: the latter two."""
    from svdcache import SVDCacheConfig
    from svdcache.runtime.schedule import full_steps
    from svdcache.schedule_tuning import tune_schedule

    prompts, seeds = calibration_prompts(images)
    ms = sorted({len(full_steps(steps, interval=n, warmup=1)) for n in SELECT_INTERVALS})
    ts = dict(space="full", predictor="taylor", order=1, warmup=1)
    runs = [] if shared_only else [(SVDCacheConfig(uncond_interval=1), False), (SVDCacheConfig(**ts, uncond_interval=1), False)]
    runs += [(SVDCacheConfig(uncond_interval=2), True), (SVDCacheConfig(**ts, uncond_interval=2), True)]
    out = {}
    for cfg, shared in runs:
        out[(cfg.space, shared)] = tune_schedule(
            pipe, basis, cfg, num_full_steps=ms, prompt=prompts, generator_seeds=seeds, num_inference_steps=steps,
            max_evals=max_evals, progress=progress, cfg_pipeline=shared, output_type="pt", **CALL_KWARGS, **GUIDANCE)
    basis.meta["schedules"]["selected_on"] = f"calibration prompts, seeds {seeds[0]}..{seeds[-1]}"
    return out


def add_choice(pipe, basis, steps=50, images=10, intervals=(2, 3, 4, 5, 6, 7, 8), progress=True):
    """The closed-loop choice of the configuration (svdcache.choice) on the calibration prompts and seeds,
    alternately split into a fitting and a checking half: nothing evaluated is chosen on."""
    from svdcache.choose import choose

    prompts, seeds = calibration_prompts(images)
    pairs = list(zip(prompts, seeds))
    basis.meta["choice"] = choose(pipe, basis, steps=steps, fit=pairs[0::2], check=pairs[1::2],
                                  call_kwargs=dict(**CALL_KWARGS, **GUIDANCE), two_calls=True,
                                  intervals=intervals, progress=progress)
    return basis.meta["choice"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default=None, help="one prompt for every image (default: the held-out set)")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tau", type=float, default=0.99)
    ap.add_argument("--out", default=BASIS_PATH)
    ap.add_argument("--no-select", action="store_true", help="keep the DP plans (no closed-loop selection)")
    ap.add_argument("--choose-only", action="store_true",
                    help="keep the basis file's features and plans; choose the configuration per interval (svdcache.choice)")
    ap.add_argument("--shared-only", action="store_true",
                    help="keep the basis file's features and plain plans; select only the shared-branch (-u2) plans")
    args = ap.parse_args(argv)
    pipe = load_pipeline()
    if args.choose_only:
        from svdcache.basis import Basis

        basis = Basis.load(args.out)
        pipe.set_progress_bar_config(disable=True)
        add_choice(pipe, basis, args.steps, args.images)
        basis.save(args.out)
        print(basis, "->", args.out)
        return
    if args.shared_only:
        from svdcache.basis import Basis

        basis = Basis.load(args.out)
        pipe.set_progress_bar_config(disable=True)
        select_schedules(pipe, basis, args.steps, args.images, shared_only=True)
        basis.save(args.out)
        print(basis, "->", args.out)
        return
    basis = calibrate_reference(pipe, args.prompt, args.images, args.steps, args.tau)
    if not args.no_select:
        pipe.set_progress_bar_config(disable=True)
        select_schedules(pipe, basis, args.steps, args.images)
        add_choice(pipe, basis, args.steps, args.images)
    basis.save(args.out)
    print(basis, "->", args.out)


if __name__ == "__main__":
    main()
