"""The development-set grid that chose cache-dit's settings for bench/fidelity.py --cache-dit.

    python bench/cachedit_dev_grid.py                 # about 15 min on 2 CPU cores (needs cache-dit)
    python bench/cachedit_dev_grid.py --report-only   # the table from bench/results/cachedit_dev.jsonl

Development prompts and seeds only (bench/common.py: dev_prompt_set(1): 10 prompts x 1 seed, disjoint
from the evaluated set and from the calibration set), 50 steps, the embedded model's guidance; PSNR
against the uncached images of the same prompts; FLOPs by the same counter as bench/fidelity.py.
Writes bench/results/cachedit_dev.{jsonl,md}: every run, and each calibrator's Pareto front (the
settings no other run beats in both FLOPs ratio and PSNR), from which cachedit_peer.FAMILIES was taken.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import cachedit_peer as cp
import common

OUT = os.path.join(common.ROOT, "bench", "results")


def grid() -> list[cp.CacheDiTSetting]:
    g = []
    for ts in (0, 1, 2):
        for W in (1, 3):  # warm-up; max_continuous unlimited, thresholds only
            g += [cp.CacheDiTSetting(threshold=th, warmup=W, taylorseer_order=ts)
                  for th in (0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8)]
        for MC in (2, 3, 4, 5, 6, 8, 10, 12, 16):  # warm-up 1, capped streaks
            g += [cp.CacheDiTSetting(threshold=th, warmup=1, max_continuous=MC, taylorseer_order=ts)
                  for th in (0.1, 0.15, 0.2, 0.3, 0.4, 0.8)]
    for ts in (0, 1):  # a block more at the end (F1B1)
        for MC in (-1, 3, 5):
            g += [cp.CacheDiTSetting(Fn=1, Bn=1, threshold=th, warmup=1, max_continuous=MC, taylorseer_order=ts)
                  for th in (0.1, 0.2, 0.4)]
    return g


def front(rows):
    return sorted((r for r in rows if not any(
        (o["ratio"] >= r["ratio"] and o["psnr"] > r["psnr"]) or (o["ratio"] > r["ratio"] and o["psnr"] >= r["psnr"])
        for o in rows)), key=lambda r: r["ratio"])


def report(rows, path):
    rows = list({r["tag"]: r for r in rows}.values())
    missing = len({s.tag() for s in grid()} - {r["tag"] for r in rows})
    lines = ["# cache-dit settings on the development set", "",
             f"`python bench/cachedit_dev_grid.py`: {len(rows)} settings measured"
             + (f" ({missing} of the grid not run yet; the script fills them)" if missing else "")
             + f", cache-dit {cp.version() or cp.PINNED}, "
             "dev_prompt_set(1) (10 prompts x 1 seed, not the evaluated set), 50 steps. "
             "Per calibrator, the Pareto front (FLOPs ratio, PSNR vs uncached):", ""]
    for ts in sorted({r["ts"] for r in rows}):
        lines += [f"## {'no calibrator' if ts == 0 else f'TaylorSeer order {ts}'}", "",
                  "| setting | FLOPs ratio | PSNR (dB) | cached steps (cond / uncond) |", "|---|---|---|---|"]
        seen = set()
        for r in front([r for r in rows if r["ts"] == ts]):
            if (r["ratio"], r["psnr"]) in seen:
                continue  # several thresholds giving the same schedule: the first
            seen.add((r["ratio"], r["psnr"]))
            lines.append(f"| {r['tag']} | {r['ratio']:.2f} | {r['psnr']:.2f} | {r['n_cached']} / {r['n_cfg']} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    jl = os.path.join(args.out, "cachedit_dev.jsonl")
    rows = [json.loads(line) for line in open(jl)] if os.path.exists(jl) else []
    if not args.report_only:
        cp.require()
        from svdcache.embedded import load_pipeline
        from svdcache.metrics import psnr

        torch.set_num_threads(1)
        pipe = load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        prompts, seeds = common.dev_prompt_set(1)
        fc = common.FlopCounter(pipe.transformer)
        ref, _ = common.generate(pipe, prompts, seeds, 50)
        ref_flops, done = fc.flops, {r["tag"] for r in rows}
        with open(jl, "a") as out:
            for s in grid():
                if s.tag() in done:
                    continue
                cp.enable(pipe, s, 50)
                fc.flops = 0
                try:
                    imgs, sec = common.generate(pipe, prompts, seeds, 50)
                    st = cp.stats(pipe)
                finally:
                    cp.disable(pipe)
                p = psnr(imgs, ref)
                p = torch.where(torch.isinf(p), torch.full_like(p, 100.0), p)
                r = dict(tag=s.tag(), ts=s.taylorseer_order, W=s.warmup, MC=s.max_continuous, Fn=s.Fn, Bn=s.Bn,
                         th=s.threshold, ratio=ref_flops / fc.flops, psnr=float(p.mean()), n_cached=st["n_cached"],
                         n_cfg=st["n_cfg_cached"], sec=sec)
                out.write(json.dumps(r) + "\n")
                out.flush()
                rows.append(r)
    report(rows, os.path.join(args.out, "cachedit_dev.md"))


if __name__ == "__main__":
    main()
