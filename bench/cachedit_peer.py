"""cache-dit (PyPI ``cache-dit``, an optional benchmark dependency) as a peer on the embedded FLUX pipeline.

``enable(pipe, CacheDiTSetting(...))`` puts cache-dit's DBCache (optionally with its TaylorSeer
calibrator) on a diffusers ``FluxPipeline`` through cache-dit's own registered FLUX adapter
(``cache_dit.enable_cache``); ``disable(pipe)`` takes it off again; ``stats(pipe)`` returns
cache-dit's own record of the last call (cached steps per CFG branch, residual diffs);
``buffer_bytes(pipe)`` the bytes of every tensor cache-dit holds (its context buffers and its
calibrators' Taylor states, deduplicated).

What DBCache does here: the embedded model's 3 double + 6 single blocks become one list of 9
blocks (cache-dit's default FLUX adapter, the single blocks as "dummy" blocks). Every transformer
call runs the first ``Fn`` blocks; if the relative L1 change of their output residual against the
last fully computed step is below ``residual_diff_threshold`` (after ``max_warmup_steps`` full
steps, within ``max_cached_steps`` / ``max_continuous_cached_steps``) the middle blocks are skipped
and their cached residual (or its Taylor forecast) is added; the last ``Bn`` blocks always run. The
decision is one per transformer call, i.e. per batch, not per image.

Nothing in site-packages is patched. Two things are done here and why:
- ``enable_separate_cfg=True``: the embedded pipeline runs true CFG (``true_cfg_scale=2``) as two
  transformer calls per step (cond, then uncond). cache-dit's FLUX adapter assumes FLUX.1-dev's
  distilled guidance (one call per step) and would otherwise compare the cond call's residual with
  the uncond call's and count every call as a step. With it, cache-dit keeps separate buffers,
  decisions and calibrators for the two branches (its Wan / Qwen-Image mode).
- ``disable`` also restores the transformer's own ``forward``: cache-dit's FLUX patch functor
  replaces it with cache-dit's copy of the FLUX forward before wrapping it, and
  ``cache_dit.disable_cache`` unwraps only its wrapper, leaving the copy in place (checked by
  ``check_restored``, which the benchmark runs).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging

import common

PINNED = "1.5.3"
INSTALL_HINT = f"pip install 'cache-dit=={PINNED}' (or pip install -e '.[cachedit]')"


def version() -> str | None:
    """Installed cache-dit version, or None when it is not installed (without importing it)."""
    if importlib.util.find_spec("cache_dit") is None:
        return None
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("cache-dit")
    except PackageNotFoundError:
        return "unknown"


def require() -> str:
    """The installed version; a one-line error naming the fix when cache-dit is missing."""
    v = version()
    if v is None:
        raise SystemExit(f"--cache-dit needs the optional package cache-dit, which is not installed: {INSTALL_HINT}")
    return v


@dataclasses.dataclass(frozen=True)
class CacheDiTSetting:
    """One cache-dit configuration (the fields map 1:1 onto ``DBCacheConfig`` /
    ``TaylorSeerCalibratorConfig``; ``taylorseer_order=0`` means no calibrator)."""

    Fn: int = 1
    Bn: int = 0
    threshold: float = 0.08
    warmup: int = 8
    max_cached: int = -1
    max_continuous: int = -1
    taylorseer_order: int = 0

    def tag(self) -> str:
        """cache-dit's own naming (``strify``): F1B0_W4I1M0MC3_R0.12, + _T1O1 with TaylorSeer o1."""
        s = (f"F{self.Fn}B{self.Bn}_W{self.warmup}I1M{max(0, self.max_cached)}"
             f"MC{max(0, self.max_continuous)}_R{self.threshold:g}")
        return s + (f"_T1O{self.taylorseer_order}" if self.taylorseer_order else "")

    def configs(self, steps: int):
        import cache_dit

        cc = cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.Fn, Bn_compute_blocks=self.Bn, residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup, max_cached_steps=self.max_cached,
            max_continuous_cached_steps=self.max_continuous, num_inference_steps=steps,
            enable_separate_cfg=True,  # true CFG: cond and uncond calls per step (see module docstring)
        )
        cal = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)
               if self.taylorseer_order else None)
        return cc, cal


def _quiet():
    # cache-dit logs several INFO/WARNING lines per enable/disable; keep the benchmark's output readable
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)


def enable(pipe, setting: CacheDiTSetting, steps: int) -> None:
    """cache-dit's DBCache (+ TaylorSeer) on ``pipe`` (a diffusers FluxPipeline), for ``steps`` steps."""
    require()
    import cache_dit

    _quiet()
    tr = pipe.transformer
    # what disable() must put back: instance-level forwards (normally none) of the transformer
    pipe._svdbench_cachedit_saved = {"forward": tr.__dict__.get("forward"), "call": type(pipe).__call__}
    cc, cal = setting.configs(steps)
    cache_dit.enable_cache(pipe, cache_config=cc, calibrator_config=cal)
    _quiet()


def disable(pipe) -> None:
    """Removes cache-dit from ``pipe`` and restores the transformer's own forward."""
    import cache_dit

    cache_dit.disable_cache(pipe)
    tr = pipe.transformer
    saved = getattr(pipe, "_svdbench_cachedit_saved", {"forward": None})
    if saved["forward"] is None:
        tr.__dict__.pop("forward", None)  # back to FluxTransformer2DModel.forward
    else:
        tr.forward = saved["forward"]
    if "_is_patched" in tr.__dict__:
        del tr._is_patched
    pipe.__dict__.pop("_svdbench_cachedit_saved", None)
    pipe._svdbench_cachedit_call = saved.get("call")
    pipe._svdbench_cachedit_forward = saved["forward"]  # what check_restored may find there


def check_restored(pipe) -> None:
    """Raises if anything of cache-dit is left on the pipeline (a one-line error)."""
    tr = pipe.transformer
    left = [n for n in ("forward", "_is_cached", "_context_manager", "_original_forward", "_is_patched")
            if n in tr.__dict__]
    # an instance-level forward that was there before enable (diffusers' HookRegistry wrapper, left by
    # the rows run before this one) is not cache-dit's
    before = pipe.__dict__.get("_svdbench_cachedit_forward")
    if "forward" in left and before is not None and tr.__dict__.get("forward") is before:
        left.remove("forward")
    call = pipe.__dict__.get("_svdbench_cachedit_call")
    if (call is not None and type(pipe).__call__ is not call) or "_original_call" in vars(type(pipe)):
        left.append("pipeline __call__")
    if left:
        raise RuntimeError(f"cache-dit left {left} on the pipeline after disable")


def stats(pipe) -> dict:
    """cache-dit's own stats of the last pipeline call (set on the transformer by cache-dit)."""
    tr = pipe.transformer
    cached = list(getattr(tr, "_cached_steps", []) or [])
    cfg_cached = list(getattr(tr, "_cfg_cached_steps", []) or [])
    diffs = dict(getattr(tr, "_residual_diffs", {}) or {})
    return dict(cached_steps=cached, cfg_cached_steps=cfg_cached,
                n_cached=len(cached), n_cfg_cached=len(cfg_cached),
                residual_diffs={k: round(float(v), 5) for k, v in diffs.items()})


def buffer_bytes(pipe) -> int:
    """Bytes of every tensor in cache-dit's state on ``pipe``: the contexts' buffers (Fn residual,
    Bn hidden / encoder residuals, per CFG branch) and the calibrators' Taylor states."""
    cm = getattr(pipe, "_context_manager", None) or getattr(pipe.transformer, "_context_manager", None)
    if cm is None:
        return 0
    walk = common.TensorBytes(max_depth=8, objects=False)
    for ctx in getattr(cm, "_cached_context_manager", {}).values():
        walk(ctx.buffers)
        for cal in (ctx.calibrator, ctx.encoder_calibrator, ctx.cfg_calibrator, ctx.cfg_encoder_calibrator):
            for st in (getattr(cal, "states", None) or {}).values():
                walk(st.state)
    return walk.total


# ----------------------------------------------------------------------------------------------
# the rows of bench/fidelity.py --cache-dit, chosen on the development set (bench/common.py: dev_prompt_set,
# 10 prompts x 1 seed, 50 steps; never on the evaluated images): a grid over warm-up (1, 3), Fn/Bn (F1B0,
# F1B1), max_continuous_cached_steps (2..16, unlimited) and residual_diff_threshold (0.05..0.8), per
# calibrator. Warm-up 1 beat 3 at every ratio, F1B1 was dominated by F1B0 (same cached steps, a block more
# per cached call), and each family's dev Pareto front was the same list of (max continuous, threshold)
# pairs below: the cap sets the ratio, the threshold decides within it. F1B0 on 9 blocks still runs block 0
# on a cached call (11.9% of a full call), so 6.5x (48 of 50 steps cached) is the ceiling here.
_FRONT = ((3, 0.15), (4, 0.3), (5, 0.4), (6, 0.3), (8, 0.4), (12, 0.8), (16, 0.8), (-1, 0.6))
FAMILIES = [
    # (label, base setting, [(max_continuous_cached_steps, residual_diff_threshold), ...])
    ("DBCache F1B0 W1", CacheDiTSetting(Fn=1, Bn=0, warmup=1), _FRONT),
    ("DBCache F1B0 W1 + TaylorSeer o1", CacheDiTSetting(Fn=1, Bn=0, warmup=1, taylorseer_order=1), _FRONT),
    ("DBCache F1B0 W1 + TaylorSeer o2", CacheDiTSetting(Fn=1, Bn=0, warmup=1, taylorseer_order=2), _FRONT),
    # a commonly published setting (sglang's cache-dit defaults: F1B0, warm-up 4, MC 3, threshold 0.24),
    # one row each without and with TaylorSeer o1, for reference
    ("DBCache F1B0 W4 MC3 R0.24 (sglang defaults)", CacheDiTSetting(Fn=1, Bn=0, warmup=4), ((3, 0.24),)),
    ("DBCache F1B0 W4 MC3 R0.24 + TaylorSeer o1 (sglang defaults)",
     CacheDiTSetting(Fn=1, Bn=0, warmup=4, taylorseer_order=1), ((3, 0.24),)),
]


def method_rows(quick: bool = False) -> list[dict]:
    """bench/fidelity.py methods (kind "cachedit"): one family per calibrator, one row per setting."""
    v = version() or PINNED
    rows = []
    for label, base, pts in FAMILIES:
        fam = f"cache-dit {v} {label}" + (" (dev-tuned MC x threshold)" if len(pts) > 1 else "")
        for mc, th in (pts[1], pts[-2]) if quick and len(pts) > 2 else pts:
            s = dataclasses.replace(base, threshold=th, max_continuous=mc)
            rows.append(dict(name=f"cache-dit {s.tag()}", family=fam, kind="cachedit", setting=th,
                             cachedit=dataclasses.asdict(s)))
    return rows


def report_note(rows: list[dict]) -> str:
    """One paragraph for fidelity.md on the cache-dit rows: version, how they were configured and measured."""
    vs = sorted({r["cachedit"]["version"] for r in rows})
    return (f"cache-dit rows: cache-dit {', '.join(vs)} from PyPI (`--cache-dit`), its DBCache on the embedded "
            "FluxPipeline through cache-dit's own FLUX adapter (3 double + 6 single blocks as one list of 9), "
            "`enable_separate_cfg=True` (true CFG: separate buffers and decisions for the cond and uncond "
            "calls); names are cache-dit's own tags (F<Fn>B<Bn>_W<max_warmup_steps>I1M<max_cached_steps>"
            "MC<max_continuous_cached_steps>_R<residual_diff_threshold>[_T1O<TaylorSeer order>], 0 = unlimited); "
            "warm-up, Fn/Bn, MC and thresholds chosen on the development prompts (bench/common.py "
            "dev_prompt_set; see cachedit_peer.py). FLOPs counted by the same hooks (a block cache-dit skips fires none; cache-dit's elementwise L1 diff and Taylor "
            "arithmetic are not matmuls and, as for the other peers, not counted); memory: "
            "every tensor cache-dit holds (its Fn/Bn residual buffers and TaylorSeer states, both CFG "
            "branches), peak over the steps.")


def merge(src: str, dst: str) -> int:
    """Puts the cache-dit rows of ``src`` (a fidelity.json of a ``--cache-dit --only cache-dit`` run) into
    ``dst`` by name, leaving every other row and dst's meta as they are; returns how many were merged."""
    import json
    import os

    rows = [r for r in json.load(open(src))["rows"] if r.get("cachedit")]
    data = json.load(open(dst)) if os.path.exists(dst) else {"rows": [], "meta": {}}
    names = {r["name"] for r in rows}
    data["rows"] = [r for r in data["rows"] if r["name"] not in names] + rows
    with open(dst + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(dst + ".tmp", dst)
    return len(rows)


if __name__ == "__main__":  # python bench/cachedit_peer.py --merge [SRC [DST]]: merge, then redraw fidelity.md
    import os
    import sys

    import common

    if sys.argv[1:2] != ["--merge"]:
        raise SystemExit("usage: python bench/cachedit_peer.py --merge [SRC [DST]]")
    res = os.path.join(common.ROOT, "bench", "results")
    src = sys.argv[2] if len(sys.argv) > 2 else os.path.join(res, "fidelity_cachedit.json")
    dst = sys.argv[3] if len(sys.argv) > 3 else os.path.join(res, "fidelity.json")
    n = merge(src, dst)
    import fidelity

    fidelity.main(["--report-only", "--out", os.path.dirname(dst)])
    print(f"merged {n} cache-dit rows of {src} into {dst}; report redrawn")
