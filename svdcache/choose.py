"""The closed-loop choice at calibration (see :mod:`svdcache.choice`): candidates run with the cache on, on the
calibration's fitting and checking prompts, against the uncached outputs."""
from __future__ import annotations

import math

import torch

from .api import disable, enable, stats
from .choice import FAMILIES, candidates, shared_scale
from .config import SVDCacheConfig
from .metrics import psnr
from .runtime.schedule import full_steps

INTERVALS = (3, 4, 5, 6, 7)


def _outputs(out) -> torch.Tensor:
    for name in ("images", "frames", "videos", "sample"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v.detach().float().cpu()
    if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
        return out[0].detach().float().cpu()
    raise TypeError(f"svdcache: the pipeline returned {type(out).__name__}: no image / video tensor to compare "
                    "(pass output_type='pt')")


class Runner:
    """Generations of the pipeline on a set of (prompt, seed), uncached or under a configuration."""

    def __init__(self, pipe, basis, pairs, steps: int, call_kwargs: dict):
        self.pipe, self.basis, self.pairs, self.steps = pipe, basis, pairs, steps
        self.kw = dict(call_kwargs)
        self.kw["output_type"] = "pt"
        self.ref = None

    def generate(self) -> torch.Tensor:
        prompts = [p for p, _ in self.pairs]
        gens = [torch.Generator().manual_seed(s) for _, s in self.pairs]
        with torch.no_grad():
            return _outputs(self.pipe(prompts, num_inference_steps=self.steps, generator=gens, **self.kw))

    def score(self, cfg) -> tuple[float, float]:
        """(mean PSNR dB against the uncached outputs, counted FLOPs ratio) under ``cfg``."""
        if self.ref is None:
            self.ref = self.generate()
        enable(self.pipe, basis=self.basis, config=cfg)
        try:
            out = self.generate()
            ratio = stats(self.pipe).last_generation.flops_ratio
        finally:
            disable(self.pipe)
        p = psnr(out, self.ref).clamp(max=100.0)  # identical outputs: 100 dB, not inf
        return float(p.mean()), ratio


def curve_at(points: dict, ratio: float) -> float:
    """dB of the safe configuration at ``ratio``: linear in log ratio between its measured points
    ({interval: (dB, ratio)}), extended along the nearest segment outside them."""
    pts = sorted((r, db) for db, r in points.values())
    if len(pts) == 1:
        return pts[0][1]
    x = math.log(ratio)
    for (r0, d0), (r1, d1) in zip(pts, pts[1:]):
        if ratio <= r1 or (r1, d1) == pts[-1]:
            if r1 <= r0:
                return d1
            return d0 + (x - math.log(r0)) * (d1 - d0) / (math.log(r1) - math.log(r0))
    return pts[-1][1]


def variants(cands: list, m_full: int) -> list[tuple[str, dict]]:
    """Each candidate as it runs at interval N: one that shares the unconditional branch twice, at its own
    compute (fewer transformer calls than the safe configuration) and with the full steps added that bring
    it to the safe configuration's calls (``full_steps_scale``)."""
    out = []
    for label, kw in cands:
        if kw.get("uncond_interval", 1) > 1:
            out.append((label, dict(kw, full_steps_scale=round(shared_scale(m_full), 6))))
            out.append((f"{label}, own compute", dict(kw, full_steps_scale=1.0)))
        else:
            out.append((label, dict(kw)))
    return out


def choose(pipe, basis, *, steps: int, fit: list, check: list, call_kwargs: dict, two_calls: bool,
           intervals=INTERVALS, progress: bool = True) -> dict:
    """The choice for each interval of ``intervals`` (see :mod:`svdcache.choice`); ``fit`` / ``check``:
    (prompt, seed) pairs.

    Candidates are compared where the user compares them, at matched compute: each is scored by its dB
    above the safe configuration's curve at its own counted FLOPs ratio (the safe configuration run at
    every interval from N-1 to N+1, interpolated in log ratio), among those at no more compute than the safe
    configuration at N and no less than at N+1; the best on the fitting pairs is kept only where it is
    not below that curve on the checking pairs."""
    from tqdm.auto import tqdm

    plans = set(((basis.meta.get("schedules") or {}).get("plans") or {}))
    cands = candidates(two_calls, plans)
    fitr, checkr = Runner(pipe, basis, fit, steps, call_kwargs), Runner(pipe, basis, check, steps, call_kwargs)
    safe_kw = dict(FAMILIES["taylor o1"], uncond_interval=1, schedule="uniform")
    safe_label = next(lbl for lbl, kw in cands if kw == safe_kw)
    curve = list(range(max(2, min(intervals) - 1), max(intervals) + 2))
    var_of = {n: variants(cands, len(full_steps(steps, interval=n, warmup=1))) for n in intervals}
    # runs: the safe curve on both halves; per interval every variant but the safe one, and one check
    bar = tqdm(total=2 * len(curve) + sum(len(v) for v in var_of.values()),
               desc="svdcache: choosing the configuration", disable=not progress, unit="run")

    def safe_cfg(n):
        return SVDCacheConfig(interval=n, choice="off", **safe_kw)

    safe_fit, safe_chk = {}, {}
    for n in curve:
        safe_fit[n] = fitr.score(safe_cfg(n))
        safe_chk[n] = checkr.score(safe_cfg(n))
        bar.update(2)
    targets = {}
    for n in intervals:
        vs = var_of[n]
        fit_db = {safe_label: safe_fit[n]}
        for label, kw in vs:
            if label != safe_label:
                fit_db[label] = fitr.score(SVDCacheConfig(interval=n, choice="off", **kw))
                bar.update()
        lo, hi = 0.98 * safe_fit[n][1], 1.02 * safe_fit[n + 1][1]
        margin = {lbl: v[0] - curve_at(safe_fit, v[1]) for lbl, v in fit_db.items() if lo <= v[1] <= hi}
        best = max(margin, key=margin.get)
        kws = dict(vs)
        if best != safe_label:
            chk_best = checkr.score(SVDCacheConfig(interval=n, choice="off", **kws[best]))
        else:
            chk_best = safe_chk[n]
        bar.update()
        chk_curve = curve_at(safe_chk, chk_best[1])
        chosen = best if chk_best[0] >= chk_curve else safe_label
        settings = dict(kws[chosen])
        targets[str(n)] = dict(
            label=chosen, settings=settings,
            fit_db={lbl: round(v[0], 3) for lbl, v in fit_db.items()},
            fit_ratio={lbl: round(v[1], 3) for lbl, v in fit_db.items()},
            check_db={"chosen": round(chk_best[0] if chosen == best else safe_chk[n][0], 3),
                      "safe": round(safe_chk[n][0], 3), "best on fit": round(chk_best[0], 3),
                      "safe at the chosen compute": round(chk_curve if chosen == best else safe_chk[n][0], 3)},
            check_ratio={"chosen": round(chk_best[1] if chosen == best else safe_chk[n][1], 3),
                         "safe": round(safe_chk[n][1], 3)},
            best_on_fit=best,
        )
    bar.close()
    return dict(version=2, guidance="two calls per step" if two_calls else "one call per step", num_steps=steps,
                fit=[list(p) for p in fit], check=[list(p) for p in check], targets=targets,
                safe_curve={"fit": {str(n): [round(v[0], 3), round(v[1], 3)] for n, v in safe_fit.items()},
                            "check": {str(n): [round(v[0], 3), round(v[1], 3)] for n, v in safe_chk.items()}})
