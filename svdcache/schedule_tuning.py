"""Closed-loop schedule selection: pick the full-step positions by generating with the cache on.

The dynamic programme of :mod:`svdcache.schedule_search` prices each placement by the teacher-forced
forecast error on the reference trajectory, which cannot see how an error at one step is carried to
the output (on the embedded model an error in the first steps is largely washed out, one near the end
is not: ending the last interval two steps before the end beats ending it at the last step by 2 dB).
This module measures that instead: for a number M of full steps it generates the calibration prompts
with the cache on under a few candidate placements - the DP's, the uniform schedule, uniform grids at
other offsets (those ending nearest two steps before the end first) - and keeps the one of least
output error against the uncached output of the same prompts and seeds. Optionally (``local_moves``)
it then moves single full steps by one while that lowers the error; measured on the embedded model
those moves fit the calibration images' noise and do not carry over to other prompts, the choice
among candidates does (within ~0.5 dB on a disjoint development set). The winner is stored in the
basis (``meta["schedules"]``) under its family, so ``enable(schedule="calibrated")`` / ``"auto"``
use it. It costs at most ``max_evals`` cached generations per M, once.
"""
from __future__ import annotations

import time

import torch

from .runtime.schedule import full_steps
from .schedule_search import family_key


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("images", "frames", "sample"):
        v = getattr(out, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError("tune_schedule needs the pipeline to return tensors: pass output_type='pt' or 'latent'")


def grids(num_steps: int, m: int) -> list[list[int]]:
    """Uniform placements of m full steps (step 0 included) at every offset, spacings around (S-1)/(m-1)."""
    if m <= 1:
        return [[0]]
    out = []
    base = max(1, (num_steps - 1) // (m - 1))
    for n in sorted({base, base + 1, max(1, base - 1)}):
        for o in range(1, n + 1):
            steps = [0] + [o + j * n for j in range(m - 1)]
            if steps[-1] < num_steps and steps not in out:
                out.append(steps)
    return out


def uniform_plans(num_steps: int, m: int) -> list[list[int]]:
    """The uniform warm-up-1 schedules of every interval that have exactly m full steps."""
    out = []
    for n in range(1, num_steps + 1):
        u = full_steps(num_steps, interval=n, warmup=1)
        if len(u) == m and u not in out:
            out.append(u)
    return out


def candidates(num_steps: int, m: int, dp_plan=None) -> list[list[int]]:
    """Placements of m full steps tried in order: the DP plan, the uniform schedules, then the grids
    whose last full step is nearest two steps before the end (where the closed-loop error is least)."""
    out = [list(dp_plan)] if dp_plan else []
    rest = sorted(grids(num_steps, m), key=lambda c: (abs(c[-1] - (num_steps - 3)), c))
    for c in uniform_plans(num_steps, m) + rest:
        if c not in out:
            out.append(c)
    return out


def tune_schedule(target, basis, config=None, *, num_full_steps, prompt, num_inference_steps: int = 50,
                  generator_seeds=(0,), max_evals: int = 8, local_moves: bool = False, progress: bool = True,
                  cfg_pipeline: bool = False, **pipe_kwargs):
    """Tune the calibrated schedule of ``config``'s family for each M in ``num_full_steps`` on ``prompt``
    (a string or list) and the seeds ``generator_seeds`` (one per image), in place in ``basis``: at most
    ``max_evals`` candidate placements per M (:func:`candidates`), then single-step moves if
    ``local_moves``. The error is the relative L2 error of the output against the uncached one.

    ``target`` is the pipeline the basis was calibrated on; ``pipe_kwargs`` go to every call (use
    ``output_type="latent"`` or ``"pt"``). ``cfg_pipeline``: the calls run true CFG (cond / uncond
    contexts), so the plans are stored for the shared-branch family of ``config.uncond_interval``.
    Returns {M: (steps, relative output error)}."""
    from tqdm.auto import tqdm

    from .api import disable, enable
    from .config import SVDCacheConfig

    cfg = (config or SVDCacheConfig()).replace(schedule="uniform")
    # a pipeline with true CFG runs the shared-branch family (its own plans); one without, the plain one
    fam = family_key(cfg.space, cfg.predictor, cfg.order, cfg.residual, cfg.uncond_interval if cfg_pipeline else 1)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = list(generator_seeds)
    if len(seeds) == 1 and len(prompts) > 1:
        seeds = seeds * len(prompts)

    def run():
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            return _output(target(prompt=prompts, num_inference_steps=num_inference_steps, generator=gens,
                                  **pipe_kwargs)).float()

    ref = run()
    entry = basis.meta.setdefault("schedules", {"num_steps": num_inference_steps, "plans": {}})
    if entry.get("num_steps") != num_inference_steps:
        raise ValueError(f"the basis's schedules are for {entry.get('num_steps')} steps, not {num_inference_steps}")
    plans = entry.setdefault("plans", {}).setdefault(fam, {})
    results = {}
    t0 = time.perf_counter()
    cache: dict[tuple, float] = {}

    def err(steps) -> float:
        key = tuple(steps)
        if key not in cache:
            enable(target, basis=basis if cfg.space == "svd" else None, config=cfg.replace(schedule=list(steps)))
            try:
                out = run()
            finally:
                disable(target)
            cache[key] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
        return cache[key]

    S = num_inference_steps
    bar = tqdm(total=len(num_full_steps) * max_evals, desc=f"svdcache: tuning {fam} schedules", disable=not progress)
    for m in num_full_steps:
        cache.clear()
        cands = candidates(S, m, plans.get(str(m)))
        best, best_e = None, float("inf")
        for c in cands:
            if len(cache) >= max_evals:
                break
            e = err(c)
            bar.update(1)
            if e < best_e:
                best, best_e = list(c), e
        improved = True
        while local_moves and improved and len(cache) < max_evals:
            improved = False
            for p in range(len(best) - 1, 0, -1):  # the last full steps matter most: try them first
                for d in (1, -1):
                    c = list(best)
                    c[p] += d
                    lo, hi = c[p - 1], c[p + 1] if p + 1 < len(c) else S
                    if not lo < c[p] < hi or tuple(c) in cache or len(cache) >= max_evals:
                        continue
                    e = err(c)
                    bar.update(1)
                    if e < best_e:
                        best, best_e, improved = c, e, True
                        break
        plans[str(m)] = best
        results[m] = (best, best_e)
    bar.close()
    entry.setdefault("tuned", {})[fam] = sorted(set(entry.get("tuned", {}).get(fam, [])) | set(results))
    entry["tuning_seconds"] = round(entry.get("tuning_seconds", 0.0) + time.perf_counter() - t0, 1)
    return results
