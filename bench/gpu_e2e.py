#!/usr/bin/env python
"""End-to-end latency of SVD-Cache vs diffusers' TaylorSeer on a FLUX.1-dev-sized transformer, one GPU.

    python bench/gpu_e2e.py            # one CUDA GPU (default budget 270 s incl. calibration), no network, no weights
    python bench/gpu_e2e.py --tiny     # the same code path at a tiny config on CPU (reference ops), seconds

A FluxTransformer2DModel with FLUX.1-dev's config (19 double + 38 single blocks, 24 heads x 128, D = 3072)
is built on the meta device and materialised directly on the GPU in bf16 with random weights (Linear
weights N(0, 1/fan_in), biases 0, RMSNorm weights 1, from a seeded generator: deterministic, activations
O(1), checked finite). At 1024x1024 (4096 image + 512 text tokens, batch 1) it runs FluxPipeline's own
denoising loop: FlowMatchEulerDiscreteScheduler with FLUX's dynamic shift for 4096 tokens, guidance 3.5,
each call under ``transformer.cache_context("cond")``, ``x <- scheduler.step(model(x, t), t, x)`` for 50
steps, ``_reset_stateful_cache()`` after each generation (what the pipeline's maybe_free_model_hooks does).

Rows: uncached; SVD-Cache (basis from one ``svdcache.calibrate`` run on the same model, default config
otherwise) with ``sync_free=True`` at N = 5, 7 and with ``cuda_graphs=True`` too at N = 5 (run first), then
at the default config at intervals 4..8; diffusers' TaylorSeerCacheConfig(max_order=1, disable_cache_before_step=3,
bf16 factors) at the same intervals. Each row: one warm-up generation (Triton compilation, FLOP counting),
then 1..--repeats timed generations (median), with CUDA syncs around each and CUDA events around each
transformer call (full vs cached step times). Per row: latency, speedup, counted FLOPs ratio, speedup /
FLOPs ratio (target >= 0.95), peak GPU memory (reset per row), cache bytes, latent PSNR vs uncached.

Everything runs under a time budget (--budget-s, counted from the start of the process): later rows are
skipped, with a note, when it runs out. The table is rewritten after every row to
bench/results/gpu_e2e_<card>.md (and to --copy-dir), so a run cut short still leaves its numbers. Exit
status 1 if a row raised or an output was not finite.
"""
from __future__ import annotations

import time

T_START = time.monotonic()

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import diffusers  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, TaylorSeerCacheConfig  # noqa: E402

import svdcache  # noqa: E402
from svdcache.flops import count_flops  # noqa: E402
from svdcache.schedule import is_full_step  # noqa: E402

# FLUX.1-dev's transformer/config.json (architecture fields).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# Same architecture, tiny: 2 double + 3 single blocks, D = 32.
TINY = dict(
    patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
# FLUX.1-dev's scheduler/scheduler_config.json.
SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
    shift=3.0, use_dynamic_shifting=True,
)
TS_WARMUP = 3  # TaylorSeerCacheConfig.disable_cache_before_step, and svdcache's default warmup


def ts_is_full(step: int, interval: int, before: int = TS_WARMUP) -> bool:
    """diffusers' TaylorSeerCacheHook._measure_should_compute (no cool-down)."""
    return step < before or (step - before - 1) % interval == 0


def calculate_shift(seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """diffusers.pipelines.flux.pipeline_flux.calculate_shift (copied: that module imports transformers)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


# ---------------------------------------------------------------------------------------------------
# Harness: budget, timing, error capture (as bench/gpu_kernels.py)
# ---------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.dev = torch.device("cpu" if self.tiny else "cuda")
        self.dtype = torch.bfloat16
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.rows: list[dict] = []
        self.info: dict = {}
        self.plan: list[tuple[str, int]] = []  # rows still to run: (method, interval)
        self.full_call_flops = None
        self.ts_cached_call_flops = None
        self.full_step_s = None  # median uncached transformer call
        self.cached_step_s: dict[str, float] = {}
        self.ref = None  # uncached final latent
        self.triton_warm = False

    def elapsed(self) -> float:
        return time.monotonic() - T_START

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def guard(self, label: str, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # keep going: one broken row must not hide the others' numbers
            self.errors.append(f"{label}: {type(e).__name__}: {e}")
            self.log(f"ERROR in {label}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return None

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self):
        return torch.cuda.max_memory_allocated() if self.dev.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------
# Model, inputs, the denoising loop
# ---------------------------------------------------------------------------------------------------
def build_model(run: Run) -> FluxTransformer2DModel:
    """FLUX.1-dev-sized transformer, random bf16 weights written directly on the device (no fp32 copy)."""
    cfg = TINY if run.tiny else FLUX_DEV
    old = torch.get_default_dtype()
    torch.set_default_dtype(run.dtype)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=run.dev)  # uninitialised: every parameter is written below
    g = torch.Generator(device=run.dev).manual_seed(run.args.seed)
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0.0, run.args.init_gain / math.sqrt(mod.in_features), generator=g)
                if mod.bias is not None:
                    mod.bias.zero_()
                n += 1 + (mod.bias is not None)
            else:
                for pname, p in mod.named_parameters(recurse=False):  # RMSNorm weights (q/k norms)
                    p.fill_(1.0 if pname == "weight" else 0.0)
                    n += 1
    if n != len(list(model.parameters())) or len(list(model.buffers())):
        raise RuntimeError("build_model: a parameter or buffer was left uninitialised")
    model.eval().requires_grad_(False)
    run.sync()
    run.info["params"] = sum(p.numel() for p in model.parameters())
    run.info["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    run.info["model_cfg"] = cfg
    return model


class Inputs:
    def __init__(self, run: Run, cfg: dict):
        dev, dt = run.dev, run.dtype
        self.grid = 8 if run.tiny else run.args.resolution // 16  # latent 1/8, packed 2x2: 1024 px -> 64x64
        self.L = 16 if run.tiny else 512
        g = torch.Generator(device=dev).manual_seed(run.args.seed + 1)
        B, N = 1, self.grid * self.grid
        self.latents = torch.randn(B, N, cfg["in_channels"], generator=g, device=dev).to(dt)
        self.prompt_embeds = torch.randn(B, self.L, cfg["joint_attention_dim"], generator=g, device=dev).to(dt)
        self.pooled = torch.randn(B, cfg["pooled_projection_dim"], generator=g, device=dev).to(dt)
        self.text_ids = torch.zeros(self.L, 3, device=dev, dtype=dt)
        ids = torch.zeros(self.grid, self.grid, 3)  # FluxPipeline._prepare_latent_image_ids
        ids[..., 1] += torch.arange(self.grid)[:, None]
        ids[..., 2] += torch.arange(self.grid)[None, :]
        self.img_ids = ids.reshape(N, 3).to(device=dev, dtype=dt)
        self.guidance = torch.full([1], 3.5, device=dev, dtype=torch.float32).expand(B)
        self.mu = calculate_shift(N, SCHEDULER["base_image_seq_len"], SCHEDULER["max_image_seq_len"],
                                  SCHEDULER["base_shift"], SCHEDULER["max_shift"])


def generate(run: Run, model, inp: Inputs, *, timed: bool = False, flop_steps=(), before_reset=None) -> dict:
    """FluxPipeline's denoising loop on the bare transformer. Returns the final latent, the wall time of
    the loop (synced at both ends), per-call step times (CUDA events; host clock on CPU) and, for the
    steps in ``flop_steps``, the FLOPs of that transformer call (torch.utils.flop_counter)."""
    n = run.args.steps
    sched = run.scheduler
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), device=run.dev, mu=inp.mu)
    sched.set_begin_index(0)  # as the pipeline: no device-to-host sync to find the step index
    timesteps = sched.timesteps
    x = inp.latents.clone()
    B = x.shape[0]
    cuda = run.dev.type == "cuda" and timed
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)] if cuda else []
    host, flops = [], {}
    with torch.no_grad():
        run.sync()
        t0 = time.perf_counter()
        for i, t in enumerate(timesteps):
            timestep = t.expand(B).to(x.dtype)
            kw = dict(
                hidden_states=x, timestep=timestep / 1000, guidance=inp.guidance, pooled_projections=inp.pooled,
                encoder_hidden_states=inp.prompt_embeds, txt_ids=inp.text_ids, img_ids=inp.img_ids,
                joint_attention_kwargs={}, return_dict=False,
            )
            with model.cache_context("cond"):
                if i in flop_steps:
                    out, flops[i] = count_flops(model, **kw)
                else:
                    if cuda:
                        evs[i][0].record()
                    h0 = time.perf_counter()
                    out = model(**kw)
                    host.append(time.perf_counter() - h0)
                    if cuda:
                        evs[i][1].record()
            x = sched.step(out[0], t, x, return_dict=False)[0]
        run.sync()
        wall = time.perf_counter() - t0
    if before_reset is not None:
        before_reset()
    model._reset_stateful_cache()  # what FluxPipeline's maybe_free_model_hooks does after a generation
    step_s = [s.elapsed_time(e) / 1e3 for s, e in evs] if cuda else list(host)
    return dict(x=x, wall=wall, step_s=step_s, host_s=host, flops=flops)


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------
def latent_metrics(run: Run, x: torch.Tensor) -> dict:
    finite = bool(torch.isfinite(x).all())
    if run.ref is None or not finite:
        return dict(finite=finite, psnr=float("nan"), rel=float("nan"))
    a, b = x.double(), run.ref.double()
    mse = float(((a - b) ** 2).mean())
    rng = float(b.max() - b.min())
    rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return dict(finite=finite, psnr=float("inf") if mse == 0 else 10 * math.log10(rng**2 / mse), rel=rel)


def schedule_counts(method: str, interval: int, steps: int) -> tuple[list[bool], int, int]:
    if method.startswith("svd"):
        full = [is_full_step(i, interval=interval, warmup=TS_WARMUP) for i in range(steps)]
    elif method == "ts":
        full = [ts_is_full(i, interval) for i in range(steps)]
    else:
        full = [True] * steps
    return full, sum(full), steps - sum(full)


def est_gen_s(run: Run, method: str, interval: int) -> float:
    """Expected seconds of one generation of a row, from the measured uncached step time."""
    U = run.full_step_s or 0.3
    _, nf, nc = schedule_counts(method, interval, run.args.steps)
    c = run.cached_step_s.get(method, {"svd": 0.05, "svd_sf": 0.05, "svd_cg": 0.03, "ts": 0.65}.get(method, 1.0) * U)
    return nf * U + nc * c + 0.002 * run.args.steps


def est_row_s(run: Run, method: str, interval: int) -> float:
    """Warm-up + one timed generation (+ Triton compilation for the first SVD-Cache row)."""
    extra = 0.0 if run.triton_warm or not method.startswith("svd") or run.tiny else 60.0
    return 2 * est_gen_s(run, method, interval) + extra + (0 if run.tiny else 3.0)


def reserve_s(run: Run) -> float:
    return run.args.reserve_s + sum(est_row_s(run, m, n) for m, n in run.plan)


def timed_gens(run: Run, model, inp, method: str, interval: int, **kw) -> list[dict]:
    """At least one timed generation, more (up to --repeats) while the budget of later rows allows."""
    gens = [generate(run, model, inp, timed=True, **kw)]
    while len(gens) < run.args.repeats and run.left() - reserve_s(run) > 1.3 * gens[-1]["wall"]:
        gens.append(generate(run, model, inp, timed=True, **kw))
    return gens


def summarize(run: Run, row: dict, gens: list[dict], full_mask: list[bool]) -> None:
    walls = [g["wall"] for g in gens]
    row["lat"] = statistics.median(walls)
    row["lat_all"] = walls
    steps = gens[-1]["step_s"]
    hosts = gens[-1]["host_s"]
    fs = [s for s, f in zip(steps, full_mask) if f]
    cs = [s for s, f in zip(steps, full_mask) if not f]
    row["full_ms"] = 1e3 * statistics.median(fs) if fs else None
    row["cached_ms"] = 1e3 * statistics.median(cs) if cs else None
    ch = [h for h, f in zip(hosts, full_mask) if not f]
    row["cached_host_ms"] = 1e3 * statistics.median(ch) if ch else None
    row["step_ms"] = [round(1e3 * s, 3) for s in steps]  # the last timed generation's calls, in order
    row["host_ms"] = [round(1e3 * h, 3) for h in hosts]
    row.update(latent_metrics(run, gens[-1]["x"]))
    if not row["finite"]:
        run.errors.append(f"{row['method']} N={row['N']}: the final latent is not finite")


def row_uncached(run: Run, model, inp) -> None:
    run.reset_peak()
    warm = generate(run, model, inp, flop_steps={0})
    run.full_call_flops = warm["flops"][0]
    if not bool(torch.isfinite(warm["x"]).all()):
        raise RuntimeError("the uncached output is not finite: lower --init-gain")
    gens = timed_gens(run, model, inp, "uncached", 1)
    run.ref = gens[-1]["x"].clone()
    row = dict(method="uncached", N="-", n_full=run.args.steps, n_cached=0, flops_ratio=1.0, cache_bytes=0,
               mem_copies=None, flops_how="1 call counted x steps")
    summarize(run, row, gens, [True] * run.args.steps)
    row["peak"] = run.peak_bytes()
    run.full_step_s = statistics.median(gens[-1]["step_s"])
    run.rows.append(row)
    rep = float(torch.isfinite(warm["x"]).all()) and float((warm["x"].double() - run.ref.double()).abs().max())
    run.log(f"uncached: {row['lat']:.3f} s ({run.full_step_s * 1e3:.1f} ms/step), "
            f"{run.full_call_flops / 1e9:.4g} GFLOP/call; repeat-to-repeat max |diff| {rep:.3g}; "
            f"|x| max {float(run.ref.abs().max()):.3g}")


def calibrate(run: Run, model, inp):
    run.reset_peak()
    t = time.perf_counter()
    kw = {}
    if "fit_gain_rows" in inspect.signature(svdcache.calibrate).parameters:
        kw["fit_gain_rows"] = 0  # the default config does not use fitted gains: keep no samples for them
    # fp32 eigh (SVDCACHE_EIGH_DTYPE): 228 Grams of 3072^2 in float64 are unbudgeted minutes
    os.environ.setdefault("SVDCACHE_EIGH_DTYPE", run.args.eigh_dtype)
    basis = svdcache.calibrate(model, run=lambda: generate(run, model, inp), tau=run.cfg.tau or 0.85, progress=False,
                               **kw)
    run.sync()
    dt = time.perf_counter() - t
    run.info["calib_s"] = dt
    run.info["calib_peak"] = run.peak_bytes()
    run.log(f"calibrate: {dt:.1f} s ({os.environ['SVDCACHE_EIGH_DTYPE']} eigh), {len(basis.features)} features")
    return basis


def row_svd(run: Run, model, inp, basis, interval: int, key: str = "svd") -> None:
    """SVD-Cache at the default config. ``key`` "svd_sf" adds the no-host-sync option (the CPU queues
    cached steps while the GPU still runs a full one; no timestep read, no finite check); "svd_cg" adds
    ``cuda_graphs=True`` to that (cached steps replayed from CUDA graphs; graph counts in the notes)."""
    run.reset_peak()
    extra = {"svd": {}, "svd_sf": {"sync_free": True, "num_inference_steps": run.args.steps}}
    extra["svd_cg"] = dict(extra["svd_sf"], cuda_graphs=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            svdcache.enable(model, basis=basis, config=run.cfg, interval=interval, **extra[key])
            if key == "svd_cg" and not torch.cuda.is_available():  # --tiny on CPU: the graph path's stand-in
                from svdcache.graphs import ReplayGraph, StepGraphs

                model._diffusers_hook.get_hook("svdcache").graphs = StepGraphs(ReplayGraph)
            if "ranks" not in run.info:  # the ranks the runtime uses (its subspace, tau or rank), once
                ks = sorted(svdcache.stats(model).ranks.values())
                run.info["ranks"] = ks
                if ks:
                    run.log(f"ranks (svdcache.stats): {len(ks)} features, k min {ks[0]}, median {ks[len(ks) // 2]}, "
                            f"max {ks[-1]} ({run.cfg.label})")
            t = time.perf_counter()
            generate(run, model, inp)  # warm-up: Triton compilation, FLOP counting of each kind of call
            run.triton_warm = True
            warm_s = time.perf_counter() - t
            gens = timed_gens(run, model, inp, key, interval)
            st = svdcache.stats(model)
        finally:
            svdcache.disable(model)
    label = {"svd": "SVD-Cache", "svd_sf": "SVD-Cache sync-free", "svd_cg": "SVD-Cache CUDA graphs"}[key]
    for w in caught:
        run.notes.append(f"{label} N={interval}: warning: {w.message}")
    if key == "svd_cg":
        gr = st.graphs
        run.notes.append(f"{label} N={interval}: " + ("cuda_graphs inactive" if gr is None else
                         ("" if torch.cuda.is_available() else "CPU stand-in (ReplayGraph): ") + f"{gr['captures']} captures, {gr['replays']} replays, {gr['eager']} cached calls eager "
                         f"over all generations of the row (eager: {gr['refused']})"))
    g = st.last_generation
    full_mask, _, _ = schedule_counts(key, interval, run.args.steps)
    row = dict(method=label, N=interval, n_full=g.full_steps, n_cached=g.cached_steps, fallbacks=g.fallbacks,
               flops_ratio=g.flops_ratio, cache_bytes=g.cache_bytes, mem_copies=g.memory_ratio,
               flops_how="svdcache.stats (counted)", cache_op_share=g.cache_op_flops / g.flops if g.flops else None)
    summarize(run, row, gens, full_mask)
    row["peak"] = run.peak_bytes()
    row["warm_s"] = warm_s
    if row["cached_ms"] is not None:
        run.cached_step_s[key] = row["cached_ms"] / 1e3
    run.rows.append(row)
    log_row(run, row)


def ts_cache_bytes(model) -> tuple[int, int]:
    """Bytes held by diffusers' TaylorSeer states (every Taylor factor, order 0 = the module output held
    by reference), and bytes of the order-0 factors alone (one copy of the cached features)."""
    seen, total, order0 = set(), 0, 0
    for m in model.modules():
        reg = getattr(m, "_diffusers_hook", None)
        hook = reg.get_hook("taylorseer_cache") if reg is not None else None
        if hook is None:
            continue
        for state in hook.state_manager._state_cache.values():
            for factors in state.taylor_factors.values():
                for order, tsr in factors.items():
                    key = (tsr.data_ptr(), tsr.numel())
                    if key in seen:
                        continue
                    seen.add(key)
                    b = tsr.numel() * tsr.element_size()
                    total += b
                    order0 += b if order == 0 else 0
    return total, order0


def row_ts(run: Run, model, inp, interval: int) -> None:
    run.reset_peak()
    cfg = TaylorSeerCacheConfig(cache_interval=interval, max_order=1, disable_cache_before_step=TS_WARMUP,
                                taylor_factors_dtype=torch.bfloat16)
    full_mask, nf, nc = schedule_counts("ts", interval, run.args.steps)
    first_cached = next((i for i, f in enumerate(full_mask) if not f), None)
    held = {}

    def measure():
        held["bytes"], held["order0"] = ts_cache_bytes(model)

    model.enable_cache(cfg)
    try:
        flop_steps = {0} | ({first_cached} if first_cached is not None and run.ts_cached_call_flops is None else set())
        t = time.perf_counter()
        warm = generate(run, model, inp, flop_steps=flop_steps)
        warm_s = time.perf_counter() - t
        if first_cached in warm["flops"]:
            run.ts_cached_call_flops = warm["flops"][first_cached]
        gens = timed_gens(run, model, inp, "ts", interval, before_reset=measure)
    finally:
        model.disable_cache()
    full_f = run.full_call_flops
    ts_full = warm["flops"][0]
    if ts_full != full_f:
        run.notes.append(f"TaylorSeer N={interval}: a full call counted {ts_full} FLOPs vs {full_f} uncached")
    actual = nf * ts_full + nc * (run.ts_cached_call_flops or 0)
    row = dict(method="TaylorSeer (diffusers)", N=interval, n_full=nf, n_cached=nc, fallbacks=0,
               flops_ratio=run.args.steps * full_f / actual, cache_bytes=held.get("bytes"),
               mem_copies=held["bytes"] / held["order0"] if held.get("order0") else None,
               flops_how="1 full + 1 cached call counted x schedule")
    summarize(run, row, gens, full_mask)
    row["peak"] = run.peak_bytes()
    row["warm_s"] = warm_s
    if row["cached_ms"] is not None:
        run.cached_step_s["ts"] = row["cached_ms"] / 1e3
    run.rows.append(row)
    log_row(run, row)


def log_row(run: Run, row: dict) -> None:
    base = run.rows[0]["lat"] if run.rows and run.rows[0]["method"] == "uncached" else float("nan")
    sp = base / row["lat"]
    run.log(f"{row['method']} N={row['N']}: {row['lat']:.3f} s (x{sp:.2f}), FLOPs ratio {row['flops_ratio']:.2f}, "
            f"speedup/FLOPs {sp / row['flops_ratio']:.3f}; {row['n_full']} full + {row['n_cached']} cached; steps "
            f"full {fmt(row['full_ms'], 1)} ms, cached {fmt(row['cached_ms'], 2)} ms (host "
            f"{fmt(row['cached_host_ms'], 2)} ms); PSNR {fmt(row['psnr'], 2)} dB; repeats {len(row['lat_all'])}")


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def fmt(v, p=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{p}f}" if isinstance(v, float) else str(v)


def card_name(run: Run) -> str:
    return "CPU (tiny config, reference ops)" if run.tiny else torch.cuda.get_device_name(run.dev)


def card_slug(run: Run) -> str:
    if run.tiny:
        return "cpu-tiny"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name(run.dev)).strip("_")


def report(run: Run) -> str:
    a = run.args
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "?"
    cfg = run.info.get("model_cfg", TINY if run.tiny else FLUX_DEV)
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    L = [f"# SVD-Cache end to end on {card_name(run)}", ""]
    L.append(f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, triton {tv}, "
             f"diffusers {diffusers.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}; "
             f"`python bench/gpu_e2e.py{' --tiny' if run.tiny else ''}` ({run.elapsed():.0f} s of a {a.budget_s:.0f} s budget).")
    if run.tiny:
        L += ["", "**Tiny run: a 5-block FLUX on CPU with the PyTorch reference ops; the times are not GPU speeds.**"]
    img = (8 if run.tiny else a.resolution // 16) ** 2
    txt = 16 if run.tiny else 512
    L += ["", f"Model: FluxTransformer2DModel, {cfg['num_layers']} double + {cfg['num_single_layers']} single blocks, "
          f"{cfg['num_attention_heads']} heads x {cfg['attention_head_dim']} (D = {D}), {'FLUX.1-dev config' if not run.tiny else 'tiny config'}, "
          f"{run.info.get('params', 0) / 1e9:.3g} B parameters = {run.info.get('weight_bytes', 0) / 2**30:.3g} GiB of random bf16 "
          f"weights built on the device (Linear N(0, {a.init_gain:g}^2/fan_in), seed {a.seed}). Batch 1, {img} image + "
          f"{txt} text tokens, {a.steps} steps of FlowMatchEulerDiscreteScheduler with FLUX's dynamic shift, guidance 3.5, "
          "FluxPipeline's loop (`cache_context(\"cond\")`, `scheduler.step`).", ""]
    ks = run.info.get("ranks")
    if ks:
        c = run.cfg
        k_how = f"rank = {c.rank} (override)" if c.rank is not None else f"tau = {c.tau}"
        L.append(f"SVD-Cache: basis from one `svdcache.calibrate` generation ({fmt(run.info.get('calib_s'), 1)} s, "
                 f"{os.environ.get('SVDCACHE_EIGH_DTYPE', 'float64')} eigh); ranks as the runtime uses them "
                 f"(`svdcache.stats(...).ranks`: the {c.subspace} subspace, {k_how}) over {len(ks)} features: min "
                 f"{ks[0]}, median {ks[len(ks) // 2]}, max {ks[-1]}; every k runs in the Triton kernels (tiled over k "
                 f"above 256). Config: `{c.label}` (Taylor order {c.order} in the {c.subspace} subspace at this "
                 f"config's interval, order 2 from N = 4 on by default; residual "
                 f"{c.residual}, warm-up {c.warmup}, check_finite {c.check_finite}: on a GPU one device-side state "
                 "check per full step instead of a host sync per cached step).")
    L.append("TaylorSeer: diffusers' `TaylorSeerCacheConfig(cache_interval=N, max_order=1, disable_cache_before_step=3, "
             "taylor_factors_dtype=bf16)`, which by default hooks the attention modules only: on its cached steps the "
             "feed-forward layers (and the single blocks' proj_mlp / proj_out) are still computed.")
    L += ["", "Latency: median of the timed generations (count in brackets) after one warm-up generation, CUDA-synced. "
          "FLOPs ratio: uncached FLOPs / FLOPs run, counted with torch.utils.flop_counter (SVD-Cache: `svdcache.stats`, "
          "model calls counted plus the cache's own matmuls analytically; TaylorSeer: one full and one cached call "
          "counted, times the number of each in its schedule). Efficiency = speedup / FLOPs ratio (target >= 0.95; the "
          "paper reports 0.72). Step times: median transformer call of each kind in the last timed generation (CUDA "
          "events), host: CPU time of a cached call. Peak: torch.cuda.max_memory_allocated per row (weights included). "
          "Cache: bytes held by the cache states (copies of the cached features). PSNR / rel. err: final latent vs "
          "the uncached one (random weights: a measure of drift, not of image quality).", ""]
    L.append("| method | N | full + cached | latency s | speedup | FLOPs ratio | efficiency | full step ms | "
             "cached step ms | cached host ms | peak GiB | cache MiB (copies) | latent PSNR dB | rel. err |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = run.rows[0]["lat"] if run.rows and run.rows[0]["method"] == "uncached" else None
    for r in run.rows:
        sp = base / r["lat"] if base else None
        eff = sp / r["flops_ratio"] if sp and r["flops_ratio"] else None
        mark = "" if eff is None or r["method"] == "uncached" else (" ok" if eff >= 0.95 else " **miss**")
        peak = fmt(r["peak"] / 2**30, 2) if r.get("peak") is not None else "-"
        cache = "-" if r.get("cache_bytes") is None else (
            f"{r['cache_bytes'] / 2**20:.4g} ({fmt(r.get('mem_copies'), 2)})" if r["cache_bytes"] else "0")
        fb = f", {r['fallbacks']} fallback" if r.get("fallbacks") else ""
        L.append(f"| {r['method']} | {r['N']} | {r['n_full']} + {r['n_cached']}{fb} | {fmt(r['lat'])} "
                 f"({len(r['lat_all'])}) | {fmt(sp, 2)} | {fmt(r['flops_ratio'], 2)} | {fmt(eff, 3)}{mark} | "
                 f"{fmt(r.get('full_ms'), 1)} | {fmt(r.get('cached_ms'), 2)} | {fmt(r.get('cached_host_ms'), 2)} | {peak} | "
                 f"{cache} | {fmt(r.get('psnr'), 2)} | {fmt(r.get('rel'), 4)} |")
    svd = [r for r in run.rows if r["method"] == "SVD-Cache" and base]
    if svd:
        effs = [(base / r["lat"]) / r["flops_ratio"] for r in svd]
        met = all(e >= 0.95 for e in effs)
        L += ["", f"SVD-Cache efficiency (speedup / FLOPs ratio) over N = {', '.join(str(r['N']) for r in svd)}: "
              f"min {min(effs):.3f}, max {max(effs):.3f}: target >= 0.95 at every interval "
              f"{'**met**' if met else '**missed**'}."]
        shares = [r.get("cache_op_share") for r in svd if r.get("cache_op_share") is not None]
        if shares:
            L.append(f"The cache's own matmuls are {100 * min(shares):.2f}-{100 * max(shares):.2f}% of the FLOPs run.")
    L += ["", f"FLOPs of a full transformer call: {(run.full_call_flops or 0) / 1e9:.4g} GFLOP; of a TaylorSeer cached "
          f"call: {(run.ts_cached_call_flops or 0) / 1e9:.4g} GFLOP. Calibration peak memory: "
          f"{fmt((run.info.get('calib_peak') or 0) / 2**30, 2)} GiB. Warm-up generations (s): "
          + ", ".join(f"{r['method']} N={r['N']} {r['warm_s']:.1f}" for r in run.rows if "warm_s" in r) + "."]
    if run.plan:
        L.append("Rows not (yet) run: " + ", ".join(f"{m} N={n}" for m, n in run.plan) + ".")
    if run.notes or run.errors:
        L += ["", "## Notes and errors", ""]
        L += [f"- {n}" for n in dict.fromkeys(run.notes)]
        L += [f"- ERROR {e}" for e in run.errors]
    return "\n".join(L) + "\n"


def raw_json(run: Run) -> str:
    """Every number of the table plus the per-call step times, for a closer look."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)

    info = {k: clean(v) for k, v in run.info.items() if k != "model_cfg"}
    return json.dumps(dict(card=card_name(run), args=vars(run.args), info=info, errors=run.errors, notes=run.notes,
                           rows=[{k: clean(v) for k, v in r.items()} for r in run.rows]), indent=1)


def write_report(run: Run, final: bool = False) -> str:
    text = report(run)
    name = f"gpu_e2e_{card_slug(run)}"
    for d in dict.fromkeys(x for x in (run.args.out_dir, run.args.copy_dir) if x):
        try:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, name + ".md"), "w") as f:
                f.write(text)
            with open(os.path.join(d, name + ".json"), "w") as f:
                f.write(raw_json(run))
        except OSError as e:
            print(f"could not write {d}/{name}: {e}", file=sys.stderr)
    if final:
        print()
        print(text)
        print(f"written: {os.path.join(run.args.out_dir, name)}.md (.json: every number and step time)")
    return text


# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", "--cpu-smoke", dest="tiny", action="store_true",
                    help="tiny config on CPU (reference ops): the same code path in seconds")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--copy-dir", default=None, help="also write the table here (e.g. $OUT), after every row")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget from process start (GPU: 270)")
    ap.add_argument("--reserve-s", type=float, default=None, help="kept free for the report (GPU: 8)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--resolution", type=int, default=1024, help="image side in pixels (GPU run)")
    ap.add_argument("--intervals", default="4,5,6,7,8")
    ap.add_argument("--sync-free-intervals", default="5,7",
                    help="extra SVD-Cache rows with sync_free=True (no host sync per call), run first")
    ap.add_argument("--graph-intervals", default="5",
                    help="extra SVD-Cache rows with sync_free=True and cuda_graphs=True, run after the sync-free ones")
    ap.add_argument("--repeats", type=int, default=None, help="timed generations per row at most (GPU: 3)")
    ap.add_argument("--tau", type=float, default=None, help="SVD-Cache energy threshold (default: the config's)")
    ap.add_argument("--rank", type=int, default=None, help="fixed rank k for every feature (overrides tau)")
    ap.add_argument("--eigh-dtype", default="float32", choices=("float32", "float64"),
                    help="calibration's eigendecomposition (SVDCACHE_EIGH_DTYPE); float32 keeps it in budget")
    ap.add_argument("--init-gain", type=float, default=1.0, help="Linear weights N(0, gain^2 / fan_in)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-taylorseer", action="store_true")
    ap.add_argument("--no-svd", action="store_true")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 600.0 if args.tiny else 270.0
    if args.reserve_s is None:
        args.reserve_s = 1.0 if args.tiny else 8.0
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 3
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --tiny", file=sys.stderr)
        return 2
    run = Run(args)
    over = {k: v for k, v in (("tau", args.tau), ("rank", args.rank)) if v is not None}
    run.cfg = svdcache.SVDCacheConfig(**over)
    intervals = [int(n) for n in args.intervals.split(",") if n.strip()]
    sync_free = [int(n) for n in args.sync_free_intervals.split(",") if n.strip()]
    graphed = [int(n) for n in args.graph_intervals.split(",") if n.strip()]
    # sync-free and graph rows first: a run cut short by the budget keeps them
    run.plan = ([] if args.no_svd else [("svd_sf", n) for n in sync_free] + [("svd_cg", n) for n in graphed]
                + [("svd", n) for n in intervals]) + (
        [] if args.no_taylorseer else [("ts", n) for n in intervals])
    run.log(f"device: {card_name(run)}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
            f"budget {args.budget_s:.0f} s")
    try:
        model = build_model(run)
        run.log(f"model built: {run.info['params'] / 1e9:.3g} B parameters, {run.info['weight_bytes'] / 2**30:.1f} GiB")
        inp = Inputs(run, run.info["model_cfg"])
        run.scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        row_uncached(run, model, inp)
        write_report(run)
        basis = None
        if any(m.startswith("svd") for m, _ in run.plan):
            # one generation with the Gram updates, then an eigendecomposition per feature
            need = 1.5 * est_gen_s(run, "uncached", 1) + (0 if run.tiny else 45.0)
            first = next(n for m, n in run.plan if m.startswith("svd"))
            if run.left() < need + est_row_s(run, "svd", first) + args.reserve_s:
                run.notes.append(f"calibration skipped: {run.left():.0f} s left, about {need:.0f} s needed")
            else:
                basis = run.guard("calibrate", calibrate, run, model, inp)
            if basis is None:
                run.plan = [(m, n) for m, n in run.plan if not m.startswith("svd")]
            write_report(run)
        while run.plan:
            method, n = run.plan.pop(0)
            need = est_row_s(run, method, n)
            if run.left() < need + args.reserve_s:
                run.notes.append(f"{method} N={n} skipped: {run.left():.0f} s left, about {need:.0f} s needed")
                run.log(f"skip {method} N={n}: time budget")
                continue
            if method.startswith("svd"):
                run.guard(f"{method} N={n}", row_svd, run, model, inp, basis, n, method)
            else:
                run.guard(f"TaylorSeer N={n}", row_ts, run, model, inp, n)
            write_report(run)
    except Exception as e:
        run.errors.append(f"{type(e).__name__}: {e}")
        run.log(f"ERROR: {type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        write_report(run, final=True)
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
