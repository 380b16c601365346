"""The closed-loop choice at calibration (see :mod:`svdcache.choice`): candidates run with the cache on, on the
calibration's fitting and checking prompts, against the uncached outputs."""
from __future__ import annotations

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


def choose(pipe, basis, *, steps: int, fit: list, check: list, call_kwargs: dict, two_calls: bool,
           intervals=INTERVALS, progress: bool = True) -> dict:
    """The choice for each interval of ``intervals`` (see the module docstring); ``fit`` / ``check``:
    (prompt, seed) pairs."""
    from tqdm.auto import tqdm

    plans = set(((basis.meta.get("schedules") or {}).get("plans") or {}))
    cands = candidates(two_calls, plans)
    fitr, checkr = Runner(pipe, basis, fit, steps, call_kwargs), Runner(pipe, basis, check, steps, call_kwargs)
    targets = {}
    bar = tqdm(total=len(intervals) * (len(cands) + 2), desc="svdcache: choosing the configuration",
               disable=not progress, unit="run")
    for n in intervals:
        m_full = len(full_steps(steps, interval=n, warmup=1))

        def cfg_of(kw):
            scale = shared_scale(m_full) if kw.get("uncond_interval", 1) > 1 else 1.0
            return SVDCacheConfig(interval=n, full_steps_scale=scale, choice="off", **kw)

        fit_db = {}
        for label, kw in cands:
            fit_db[label] = fitr.score(cfg_of(kw))
            bar.update()
        safe_label = next(lbl for lbl, kw in cands if kw == dict(FAMILIES["taylor o1"], uncond_interval=1,
                                                                  schedule="uniform"))
        safe_ratio = fit_db[safe_label][1]
        # at the safe configuration's compute or less (the counted FLOPs ratio, up to the cache's own ops)
        ok = [lbl for lbl in fit_db if fit_db[lbl][1] >= 0.98 * safe_ratio]
        best = max(ok, key=lambda lbl: fit_db[lbl][0])
        kws = dict(cands)
        chk_safe = checkr.score(cfg_of(kws[safe_label]))
        bar.update()
        chk_best = checkr.score(cfg_of(kws[best])) if best != safe_label else chk_safe
        bar.update()
        chosen = best if chk_best[0] >= chk_safe[0] else safe_label
        settings = dict(kws[chosen])
        if settings.get("uncond_interval", 1) > 1:
            settings["full_steps_scale"] = round(shared_scale(m_full), 6)
        targets[str(n)] = dict(
            label=chosen, settings=settings,
            fit_db={lbl: round(v[0], 3) for lbl, v in fit_db.items()},
            fit_ratio={lbl: round(v[1], 3) for lbl, v in fit_db.items()},
            check_db={"chosen": round(chk_best[0] if chosen == best else chk_safe[0], 3), "safe": round(chk_safe[0], 3),
                      "best on fit": round(chk_best[0], 3)},
            best_on_fit=best,
        )
    bar.close()
    return dict(version=1, guidance="two calls per step" if two_calls else "one call per step", num_steps=steps,
                fit=[list(p) for p in fit], check=[list(p) for p in check], targets=targets)
