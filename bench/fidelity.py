"""Fidelity vs compute on the embedded model: every method side by side, in one run, on one machine.

    python bench/fidelity.py                 # full sweep (about 15 min on 2 CPU cores), resumable
    python bench/fidelity.py --report-only   # rebuild table and plots from bench/results/fidelity.json

Fixed set: the ten digit prompts x 4 seeds, 50 steps, batch 40, the embedded model's guidance (true
CFG 2: a cond and an uncond transformer call per step, cached in separate contexts). Every method is compared with the
uncached images of the same prompt and seed (PSNR, SSIM). FLOPs are counted over the whole sampling
by hooks on every Linear and attention module (checked against torch's flop counter), plus the
SVD-Cache's own projection/reconstruction matmuls; the FLOPs ratio at FLUX.1-dev's dimensions is
analytic. Cache memory is in copies of one set of the module-level cached features (18 tensors of
the batch: the pre-gate attention / MLP outputs of the double blocks and proj_out of the singles).
The teacher-forced forecast error replays each runtime configuration on the uncached trajectory's
own features (8 images) and splits the error into the principal subspace and the residual.
Writes bench/results/fidelity.{json,md}, fidelity_vs_flops.png, fidelity_vs_memory.png.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import statistics
import time

import torch

import common  # noqa: F401  (puts the repo on sys.path)
import svdcache
from svdcache import SVDCacheConfig
from svdcache.embedded import load_basis, load_pipeline
from svdcache.metrics import psnr, ssim
from svdcache.runtime.schedule import full_steps

RESULTS = os.path.join(common.ROOT, "bench", "results")
INTERVALS = [3, 5, 8, 10]  # FLOPs ratios from below 3x to above 7x
# sharing the unconditional branch (uncond_interval=2) makes a full step cost 1.5 calls instead of 2:
# intervals 2..7 span the same ratios
SHARED_INTERVALS = [2, 3, 4, 5, 6, 7]
# diffusers' TaylorSeerCacheConfig hooks only attention modules by default (the MLPs still run every
# step); this set also hooks the double blocks' MLPs and the single blocks' MLP input projection
DIFFUSERS_TS_MODULES = [r"^transformer_blocks\.\d+\.(attn|ff|ff_context)$", r"^single_transformer_blocks\.\d+\.(attn|proj_mlp)$"]
# diffusers' TaylorSeerCacheConfig at its best: whole blocks cached (their outputs forecast), from step 1
DIFFUSERS_TS_BLOCKS = [r"^transformer_blocks\.\d+$", r"^single_transformer_blocks\.\d+$"]
WARMUP = 3


# ----------------------------------------------------------------------------------------------
# methods
def svd_cfg(**kw) -> dict:
    # the families name their subspace: the paper's feature subspace unless they say "change"
    # and the paper's residual reuse and uniform schedule unless they say otherwise
    # and both guidance branches computed at every full step (the peers do that)
    return dict(kind="svdcache", cfg={"warmup": WARMUP, "subspace": "feature", "residual": "reuse",
                                      "schedule": "uniform", "uncond_interval": 1, **kw})


CHOICE_INTERVALS = [2, 3, 4, 5, 6, 7, 8]  # the intervals the embedded basis's choice was made for
CANDIDATE_INTERVALS = [3, 5, 7]


def method_list(quick: bool = False, with_threshold_caches: bool = True, with_cache_dit: bool = False,
                two_calls: bool = True) -> list[dict]:
    from svdcache.choice import candidates
    from svdcache.choose import variants

    I = [3, 5, 8] if quick else INTERVALS  # noqa: E741
    ms = []

    def add(name, family, **m):
        ms.append(dict(name=name, family=family, **m))

    for s in ([17, 10, 7] if quick else [25, 17, 13, 10, 8, 6]):
        add(f"fewer steps {s}", "fewer steps", kind="steps", steps=s, setting=s)
    for n in ([3, 5, 7] if quick else CHOICE_INTERVALS):
        # -- the default: the configuration the basis's calibration chose for this interval (svdcache.choice)
        add(f"SVD default N={n}", "SVD-Cache default (the configuration chosen at calibration per interval)",
            setting=n, kind="svdcache", cfg={"interval": n})
    for n in I:
        add(f"SVD safe N={n}", "SVD-Cache without a choice (order 1, int4 residual, both branches, uniform)",
            setting=n, kind="svdcache", cfg={"interval": n, "choice": "off"})
        # -- peers in this runtime (full space), with the warm-up each does best with
        add(f"FORA w1 N={n}", "FORA (full reuse), warmup 1", setting=n,
            **svd_cfg(interval=n, space="full", predictor="reuse", warmup=1))
        for w in (3, 1):
            add(f"TaylorSeer-o1 w{w} N={n}", f"TaylorSeer o1 (full space), warmup {w}", setting=n,
                **svd_cfg(interval=n, space="full", predictor="taylor", order=1, warmup=w))
        add(f"TaylorSeer-o1 cal N={n}", "TaylorSeer o1 (full space), calibrated schedule", setting=n,
            **svd_cfg(interval=n, space="full", predictor="taylor", order=1, warmup=1, schedule="calibrated"))
        for sig in (0.5, 0.7):  # HiCache as published: Hermite weights on TaylorSeer's (full-space) state
            add(f"HiCache-o2 s{sig} N={n}", f"HiCache o2 (full space, scale {sig})", setting=n,
                **svd_cfg(interval=n, space="full", predictor="hermite", order=2, hermite_scale=sig, warmup=1))
        add(f"SVD paper EMA tau.85 N={n}", "SVD-Cache paper (EMA, tau .85)", setting=n,
            **svd_cfg(interval=n, predictor="ema", tau=0.85))
        # -- diffusers' TaylorSeerCache: its defaults (attention only, 3 warm-up steps) and at its best
        # (whole blocks, caching from step 1), orders 1 and 2
        add(f"diffusers TaylorSeer o1 N={n}", "diffusers TaylorSeerCache o1 (defaults)",
            kind="diffusers_taylorseer", setting=n, interval=n, order=1)
        for o in (1, 2):
            add(f"diffusers TaylorSeer o{o} best N={n}", f"diffusers TaylorSeerCache o{o}, whole blocks, from step 1",
                kind="diffusers_taylorseer", setting=n, interval=n, order=o, identifiers=DIFFUSERS_TS_BLOCKS,
                before=1)
    for n in ([2, 4, 6] if quick else SHARED_INTERVALS) if two_calls else ():
        # what the sharing gives a full-space TaylorSeer in this runtime (schedule selected the same way)
        add(f"TaylorSeer-o1 cal u2 N={n}", "TaylorSeer o1 (full space) + uncond shared, calibrated schedule",
            setting=n, **svd_cfg(interval=n, space="full", predictor="taylor", order=1, warmup=1,
                                 schedule="calibrated", uncond_interval=2))
    # -- every candidate the choice could have taken, at the compute it was measured at (svdcache.choice)
    plans = set(((load_basis().meta.get("schedules") or {}).get("plans") or {}))
    for n in ([5] if quick else CANDIDATE_INTERVALS):
        m_full = len(full_steps(50, interval=n, warmup=1))
        # a shared candidate twice: at the safe configuration's transformer calls and at its own (svdcache.choose)
        for label, kw in variants(candidates(two_calls, plans), m_full):
            add(f"candidate {label} N={n}", f"candidate: {label}", setting=n, kind="svdcache",
                cfg=dict(kw, interval=n, choice="off"))
    if with_cache_dit:  # cache-dit from PyPI (optional): --cache-dit; its settings live in cachedit_peer.py
        import cachedit_peer

        ms += cachedit_peer.method_rows(quick)
    if not with_threshold_caches:  # FirstBlockCache / MagCache: --no-threshold-caches leaves them out
        return ms
    for th in ([0.1, 0.3] if quick else [0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.5]):
        add(f"diffusers FBCache th={th:g}", "diffusers FirstBlockCache", kind="fbcache", setting=th, threshold=th)
    for th, K in ([(0.1, 4)] if quick else [(0.02, 2), (0.06, 3), (0.12, 4), (0.24, 6), (0.5, 8), (1.0, 12)]):
        add(f"diffusers MagCache th={th:g} K={K}", "diffusers MagCache", kind="magcache", setting=th, threshold=th,
            max_skip=K)
    return ms


# ----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        torch.manual_seed(0)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.pipe = load_pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        self.basis = load_basis()
        # block-level caching has other features (block output minus input): its own one-time SVD,
        # calibrated the way the embedded basis was
        self._block_basis = None
        self.prompts, self.seeds = common.prompt_set(args.seeds)
        self.steps = args.steps
        common.self_check(self.pipe)
        self.counter = common.FlopCounter(self.pipe.transformer)
        self.mag_ratios = None
        tr = self.pipe.transformer
        D = tr.config.num_attention_heads * tr.config.attention_head_dim
        N, L = 64, 16
        rows = len(tr.transformer_blocks) * 2 * (N + L) + len(tr.single_transformer_blocks) * (N + L)
        # one copy of the 18 module-level features, in each of the cond and uncond contexts
        self.unit_bytes = (2 if common.GUIDANCE_FORM else 1) * len(self.prompts) * rows * D * 4
        ks = [self.basis.features[n].rank(0.99) for n in self.basis.features]
        self.D = D
        self.k_frac = statistics.median(ks) / D

    @property
    def block_basis(self):
        if self._block_basis is None:
            from calibrate_embedded import calibrate_reference

            self._block_basis = calibrate_reference(self.pipe, steps=self.steps, granularity="block", progress=False)
        return self._block_basis

    # -- runs ----------------------------------------------------------------------------------
    def generate(self, steps=None, mem_probe=None):
        self.counter.flops = 0
        peak = [0]
        kw = {}
        if mem_probe is not None:
            def cb(pipe, i, t, kwargs):
                peak[0] = max(peak[0], mem_probe())
                return {}
            kw["callback_on_step_end"] = cb
        imgs, sec = common.generate(self.pipe, self.prompts, self.seeds, steps or self.steps, **kw)
        return imgs, sec, self.counter.flops, peak[0]

    def reference(self):
        times = []
        for _ in range(3 if not self.args.quick else 1):
            imgs, sec, flops, _ = self.generate()
            times.append(sec)
        self.ref, self.ref_flops = imgs, flops
        self.ref_times = times

    def run(self, m: dict) -> dict:
        pipe = self.pipe
        tr = pipe.transformer
        steps = self.steps
        extra_flops = 0
        mem = None
        st = None
        cd = None
        if m["kind"] == "steps":
            steps = m["steps"]
            imgs, sec, flops, _ = self.generate(steps)
        elif m["kind"] == "svdcache":
            cfg = SVDCacheConfig(**m["cfg"]).resolve()
            basis = self.block_basis if cfg.granularity == "block" else self.basis
            svdcache.enable(pipe, basis=None if m.get("online") else basis, config=cfg)
            if m.get("online"):  # zero-setup: the first generation builds the basis; time the second
                self.generate()
            imgs, sec, flops, _ = self.generate()
            st = svdcache.stats(pipe)
            g = st.last_generation
            extra_flops = g.cache_op_flops
            mem = g.cache_bytes
            svdcache.disable(pipe)
        elif m["kind"] == "cachedit":  # cache-dit skips whole blocks: their Linear/attention hooks do not fire
            import cachedit_peer

            cachedit_peer.enable(pipe, cachedit_peer.CacheDiTSetting(**m["cachedit"]), steps)
            try:  # memory: the tensors cache-dit holds (its buffers and Taylor states), peak over the steps
                imgs, sec, flops, mem = self.generate(mem_probe=lambda: cachedit_peer.buffer_bytes(pipe))
                cd = cachedit_peer.stats(pipe)
            finally:
                cachedit_peer.disable(pipe)
            cachedit_peer.check_restored(pipe)
        else:
            from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

            if m["kind"] == "diffusers_taylorseer":
                c = TaylorSeerCacheConfig(cache_interval=m["interval"], max_order=m["order"],
                                          disable_cache_before_step=m.get("before", WARMUP),
                                          taylor_factors_dtype=torch.float32,
                                          cache_identifiers=m.get("identifiers"))
            elif m["kind"] == "fbcache":
                c = FirstBlockCacheConfig(threshold=m["threshold"])
            else:
                c = MagCacheConfig(threshold=m["threshold"], max_skip_steps=m["max_skip"],
                                   num_inference_steps=steps, mag_ratios=self.magcache_ratios())
            tr.enable_cache(c)
            try:
                imgs, sec, flops, mem = self.generate(mem_probe=lambda: common.state_bytes(tr))
            finally:
                tr.disable_cache()
        total = flops + extra_flops
        p, s = psnr(imgs, self.ref), ssim(imgs, self.ref)
        p = torch.where(torch.isinf(p), torch.full_like(p, 100.0), p)
        row = dict(
            name=m["name"], family=m["family"], setting=m.get("setting"), steps=steps,
            flops_ratio=self.ref_flops / total, psnr=float(p.mean()), psnr_min=float(p.min()),
            ssim=float(s.mean()), seconds=sec, time_ratio=statistics.median(self.ref_times) / sec,
            mem_bytes=mem, mem_copies=None if mem is None else mem / self.unit_bytes,
        )
        if st is not None:
            g = st.last_generation
            row.update(full=g.full_steps, cached=g.cached_steps, runtime_flops_ratio=g.flops_ratio,
                       mem_copies_own=g.memory_ratio)
            c = m["cfg"]
            ranks = list(st.ranks.values())
            k_frac = statistics.median(ranks) / self.D if ranks else self.k_frac
            row["k_frac"] = k_frac
            row["fluxdev_ratio"] = common.fluxdev_flops_ratio(
                g.full_steps, g.cached_steps, k_frac, c.get("predictor", "taylor"),
                c.get("residual", "reuse") == "reuse", c.get("space", "svd"))
            row["config"] = c
        elif m["kind"] == "steps":
            row["fluxdev_ratio"] = self.steps / steps
        if cd is not None:
            import cachedit_peer

            row.update(full=steps - cd["n_cached"], cached=cd["n_cached"], cfg_cached=cd["n_cfg_cached"],
                       config=m["cachedit"], cachedit=dict(version=cachedit_peer.version(), **cd))
        return row

    def magcache_ratios(self):
        if self.mag_ratios is None:
            from diffusers import MagCacheConfig

            tr = self.pipe.transformer
            tr.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=self.steps))
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    common.generate(self.pipe, self.prompts[:4], self.seeds[:4], self.steps)
            finally:
                tr.disable_cache()
            text = buf.getvalue()
            lists = re.findall(r"\[[-0-9.e, ]+\]", text)  # the printed calibration ratios
            if not lists:
                raise RuntimeError(f"MagCache calibration printed no ratios: {text[-300:]!r}")
            self.mag_ratios = json.loads(lists[-1])
        return self.mag_ratios


# ----------------------------------------------------------------------------------------------
# teacher-forced forecast errors on the uncached trajectory
class _Recorder(svdcache.calibration.CalibrationHook):
    """Keeps every feature of every step, per pipeline cache context (cond / uncond)."""

    def __init__(self):
        super().__init__()
        self.feats: dict[str, dict[str, dict[int, torch.Tensor]]] = {}

    def record(self, name, F):
        if F is not None:
            ctx, step = self._where
            self.feats.setdefault(ctx, {}).setdefault(name, {})[step] = F.detach().clone()


def record_features(pipe, prompts, seeds, steps, granularity="auto"):
    """{context: {feature: (steps, B, N, D)}} along the uncached trajectory."""
    from svdcache.hooks.registry import install, plan, uninstall

    rec = _Recorder()
    install(pipe.transformer, rec, plan(pipe.transformer, granularity)[0], root_name="svdcache_recorder")
    try:
        common.generate(pipe, prompts, seeds, steps)
    finally:
        uninstall(pipe.transformer, root_name="svdcache_recorder")
    return {ctx: {n: torch.stack([v[i] for i in sorted(v)]) for n, v in fs.items()} for ctx, fs in rec.feats.items()}


def teacher_forced(feats_by_ctx, cfg: SVDCacheConfig, basis, steps: int, ref_basis=None):
    """Mean relative forecast error over cached steps (and contexts) per feature, split by the subspace
    of ``ref_basis`` (the tau=0.99 basis): principal = error projected on V_k, residual = the rest."""
    from svdcache.features import make_feature_cache

    from svdcache.runtime.gains import config_gain_key
    from svdcache.runtime.schedule import Schedule

    cfg = cfg.resolve()
    sch = Schedule(cfg, basis)
    fs = {i for i in range(steps) if sch.is_full(i, steps)}
    sums: dict[str, list[float]] = {}
    for feats in feats_by_ctx.values():
        for name, F in feats.items():
            fb = basis.subspace(cfg.subspace)[name]
            V = fb.V[:, : fb.rank(cfg.tau, cfg.rank)].contiguous() if cfg.space == "svd" else None
            gain = None
            if cfg.fitted_gains:
                gain = basis.meta.get("gains", {}).get(name, {}).get(config_gain_key(cfg))
            fc = make_feature_cache(name, cfg, V, gain)
            rb = (ref_basis or basis).features[name]
            Vr = rb.V[:, : rb.rank(0.99)]
            acc = sums.setdefault(name, [0.0, 0.0, 0.0, 0])
            for i in range(steps):
                if i in fs:
                    fc.update(F[i], float(i))
                    continue
                err = fc.forecast(float(i)).float() - F[i]
                ep = err @ Vr @ Vr.T
                norm = float(F[i].norm())
                acc[0] += float(err.norm()) / norm
                acc[1] += float(ep.norm()) / norm
                acc[2] += float((err - ep).norm()) / norm
                acc[3] += 1
    return {n: (a[0] / a[3], a[1] / a[3], a[2] / a[3]) for n, a in sums.items()}


# ----------------------------------------------------------------------------------------------
def headline(rows, ratios=(3, 4, 5, 6, 7), key="flops_ratio"):
    """PSNR of each family interpolated at matched FLOPs ratios (linear in log ratio)."""
    fams = {}
    for r in rows:
        if r["family"].startswith("ablation") or r.get(key) is None:
            continue
        fams.setdefault(r["family"], []).append((r[key], r["psnr"], r.get("mem_copies")))
    table = {}
    for fam, pts in fams.items():
        pts.sort()
        vals = []
        for x in ratios:
            v = None
            for (x0, y0, _), (x1, y1, _) in zip(pts, pts[1:]):
                if x0 <= x <= x1 and x1 > x0:
                    w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
                    v = y0 + w * (y1 - y0)
                    break
            vals.append(v)
        mems = [m for _, _, m in pts if m is not None]
        table[fam] = (vals, max(mems) if mems else None)
    return table


def fmt(v, f="{:.2f}"):
    return "n/a" if v is None else f.format(v)


def write_report(data, out_dir):
    rows, meta = data["rows"], data["meta"]
    lines = [
        "# Fidelity vs compute on the embedded model",
        "",
        f"Generated by `python bench/fidelity.py` on {meta['machine']} ({meta['date']}, {meta['minutes']:.1f} min). "
        f"{meta['images']} images (10 digit prompts x {meta['seeds']} seeds), {meta['steps']} steps, batch "
        f"{meta['images']}; uncached reference {meta['ref_seconds']:.2f} s (median of {len(meta['ref_times'])}). "
        "PSNR / SSIM against the uncached images of the same prompt and seed. FLOPs ratio: counted "
        "(uncached / actual, the cache's own matmuls included); FLUX-dev ratio: the same schedule at "
        "FLUX.1-dev's dimensions (analytic, k/D of each configuration taken as its median k over D = 128, "
        "which likely overstates k at D = 3072). Memory: cache state in copies of one set of the module-level features "
        f"({meta['unit_mib']:.1f} MiB, cond and uncond contexts). TF error: teacher-forced relative forecast error on the uncached "
        "trajectory (mean over features and cached steps), split into the principal subspace (tau .99 basis) "
        "and the residual. Calibrated schedules (the default's and TaylorSeer o1's, with and without the "
        "unconditional branch shared): the basis's plans, "
        "chosen closed-loop among candidates (DP plan, uniform, shifted grids) on the calibration prompts "
        "(bench/calibrate_embedded.py: other phrasings, seeds 90000..90009), never on the evaluated images. "
        "'uncond shared' (uncond_interval=2, svdcache.runtime.guidance): the unconditional branch is computed at every "
        "2nd full step of the conditional one and forecast in between as the conditional feature of the step "
        "plus the forecast branch difference; rows without it compute both branches at every full step.",
        "",
        "## Headline: PSNR (dB) at matched FLOPs ratios",
        "",
        "| method | " + " | ".join(f"{x}x" for x in (3, 4, 5, 6, 7)) + " | max memory (copies) |",
        "|---|" + "---|" * 6,
    ]
    for fam, (vals, mem) in sorted(headline(rows).items(), key=lambda kv: -(kv[1][0][2] or -1e9)):
        lines.append(f"| {fam} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(mem)} |")
    lines += ["", "At FLUX.1-dev's dimensions the cache's own matmuls are a far smaller share of a step than at "
              "D = 128, so the same schedules reach higher FLOPs ratios; PSNR at matched analytic FLUX.1-dev "
              "ratios (runtime methods and fewer steps only):", "",
              "| method | " + " | ".join(f"{x}x" for x in (3, 4, 5, 6, 7)) + " | max memory (copies) |",
              "|---|" + "---|" * 6]
    for fam, (vals, mem) in sorted(headline(rows, key="fluxdev_ratio").items(), key=lambda kv: -(kv[1][0][2] or -1e9)):
        lines.append(f"| {fam} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(mem)} |")
    lines += ["", "## All runs", "",
              "| method | FLOPs ratio | FLUX-dev ratio | time ratio | PSNR (min) | SSIM | memory | TF error (princ./resid.) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["flops_ratio"])):
        tf = r.get("tf_error")
        tfs = "n/a" if tf is None else f"{tf[0]:.4f} ({tf[1]:.4f}/{tf[2]:.4f})"
        lines.append(
            f"| {r['name']} | {r['flops_ratio']:.2f} | {fmt(r.get('fluxdev_ratio'))} | {r['time_ratio']:.2f} | "
            f"{r['psnr']:.2f} ({r['psnr_min']:.2f}) | {r['ssim']:.4f} | {fmt(r.get('mem_copies'))} | {tfs} |")
    cd_rows = [r for r in rows if r.get("cachedit")]
    if cd_rows:
        import cachedit_peer

        lines += ["", cachedit_peer.report_note(cd_rows)]
    with open(os.path.join(out_dir, "fidelity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plots(rows, out_dir)


def plots(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = {}
    for r in rows:
        if not r["family"].startswith("ablation"):
            fams.setdefault(r["family"], []).append(r)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    cmap = plt.get_cmap("tab20")
    for i, (fam, rs) in enumerate(sorted(fams.items())):
        rs.sort(key=lambda r: r["flops_ratio"])
        style = "-o" if fam.startswith("SVD") else "--s"
        ax.plot([r["flops_ratio"] for r in rs], [r["psnr"] for r in rs], style, ms=4, label=fam, color=cmap(i % 20),
                lw=2.2 if fam.startswith("SVD-Cache default (") else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("transformer FLOPs ratio (uncached / actual, counted)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title("Fidelity vs compute, embedded FLUX model, 40 images x 50 steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fidelity_vs_flops.png"), dpi=110)
    plt.close(fig)
    # memory at a fixed FLOPs ratio: the runs nearest 5x of each family with measured memory
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for fam, rs in sorted(fams.items()):
        rs = [r for r in rs if r.get("mem_copies") is not None]
        if not rs:
            continue
        r = min(rs, key=lambda r: abs(math.log(r["flops_ratio"] / 5.0)))
        if abs(math.log(r["flops_ratio"] / 5.0)) > math.log(1.3):
            continue  # no run of this family near 5x
        ax.scatter(r["mem_copies"], r["psnr"], s=40, marker="o" if fam.startswith("SVD") else "s")
        ax.annotate(f"{fam}\n({r['flops_ratio']:.1f}x)", (r["mem_copies"], r["psnr"]), fontsize=6,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("cache memory (copies of the module-level cached features)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title("Fidelity vs cache memory: each family's run nearest 5x (within 30%)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fidelity_vs_memory.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few settings per method (a smoke run)")
    ap.add_argument("--fresh", action="store_true", help="ignore earlier results in the JSON")
    ap.add_argument("--only", default=None, help="run only methods whose name contains this")
    ap.add_argument("--redo", action="store_true", help="with --only: run its rows again though the JSON has them")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-tf", action="store_true", help="skip the teacher-forced forecast errors")
    ap.add_argument("--no-threshold-caches", action="store_true", help="leave out diffusers' FirstBlockCache and MagCache")
    ap.add_argument("--cache-dit", action="store_true", help="also cache-dit's DBCache (+ TaylorSeer) from PyPI "
                    "(optional: pip install -e '.[cachedit]'); --only cache-dit runs just those rows")
    ap.add_argument("--guidance", choices=("cfg", "none"), default="cfg",
                    help="cfg: the embedded model's true CFG 2 as two calls per step in cache contexts (the default); "
                         "none: one call per step (FLUX.1-dev's case), the rows sharing the unconditional branch left out")
    args = ap.parse_args(argv)
    if args.guidance == "none":
        common.GUIDANCE_FORM = {}
    if args.cache_dit and not args.report_only:
        import cachedit_peer

        cachedit_peer.require()  # a one-line error before any work when cache-dit is not installed
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fidelity.json")
    data = json.load(open(path)) if os.path.exists(path) and not args.fresh else {"rows": [], "meta": {}}
    if args.report_only:
        write_report(data, args.out)
        return
    from tqdm.auto import tqdm

    t0 = time.time()
    b = Bench(args)
    b.reference()
    done = {r["name"] for r in data["rows"] if not (args.redo and args.only and args.only in r["name"])}
    methods = [m for m in method_list(args.quick, not args.no_threshold_caches, args.cache_dit,
                                     two_calls=args.guidance == "cfg") if m["name"] not in done and (not args.only or args.only in m["name"])]
    n_tf = 8
    feats = None if args.no_tf else record_features(
        b.pipe, b.prompts[:: len(b.prompts) // n_tf][:n_tf], b.seeds[:: len(b.seeds) // n_tf][:n_tf], b.steps)
    for m in tqdm(methods, desc="fidelity sweep", unit="config"):
        row = b.run(m)
        if (m["kind"] == "svdcache" and not args.no_tf and m["cfg"].get("granularity", "auto") != "block"
                and not m.get("online")):
            errs = teacher_forced(feats, SVDCacheConfig(**m["cfg"]), b.basis, b.steps)
            row["tf_error"] = [statistics.mean(e[i] for e in errs.values()) for i in range(3)]
            row["tf_worst_feature"] = max(errs, key=lambda n: errs[n][0])
        data["rows"] = [r for r in data["rows"] if r["name"] != row["name"]] + [row]
        data["meta"] = dict(
            machine=f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
            date=time.strftime("%Y-%m-%d"), minutes=(time.time() - t0) / 60, images=len(b.prompts),
            seeds=args.seeds, steps=b.steps, ref_seconds=statistics.median(b.ref_times), ref_times=b.ref_times,
            k_frac=b.k_frac, unit_mib=b.unit_bytes / 2**20, ref_flops=b.ref_flops,
            guidance="true CFG 2, two calls per step in cache contexts" if common.GUIDANCE_FORM else "one call per step",
        )
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)
    write_report(data, args.out)
    print(open(os.path.join(args.out, "fidelity.md")).read()[:3000])


if __name__ == "__main__":
    main()
