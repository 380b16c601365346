"""End to end at FLUX.1-dev width with random weights: uncached, SVD-Cache's default, the default with
``cuda_graphs=True`` (CUDA only) and TaylorSeer order 1 (``svdcache.taylorseer``), each at intervals N.

The model is a FluxTransformer2DModel with FLUX.1-dev's dimensions (hidden 3072 = 24 heads x 128, joint
attention 4096, pooled 768, guidance embedding) but few blocks (2 double + 4 single by default, where
FLUX.1-dev has 19 + 38) so that every row fits the check's budget; built on the meta device and
materialised on the device in bf16 with random weights (Linear N(0, 1/fan_in), biases 0, norms 1,
from a seeded generator). --tiny: the same architecture at hidden 64 on the CPU (fp32).

A generation is a plain Euler flow loop over ``steps`` calls of the bare transformer at 1024x1024
(4096 image + 512 text tokens, batch 1), ``svdcache.reset`` before each. Every call is timed on its
own (CUDA events on a GPU, perf_counter on the CPU); around each call the cumulative counters
``svdcache.stats(model).total.full_steps`` / ``.cached_steps`` are read (outside the timed span), so
each call's mode is what the runtime says it did, not what a schedule predicts. A row: one warm-up
generation (zero-setup basis built online, FLOPs counted, kernels compiled), then 1..R timed ones
(median). Latency = the sum of a generation's call times; wall = the loop's wall time (adds the Euler
update and the counter reads). FLOPs ratio: ``stats(model).last_generation.flops_ratio`` of the last
timed generation. Only the public API of svdcache is used.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch

from .common import Ctx, compiled_kernels

# FLUX.1-dev's transformer/config.json, architecture fields; num_layers / num_single_layers are set per run.
FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# The same architecture at hidden 64 (2 heads x 32).
TINY = dict(patch_size=1, in_channels=16, out_channels=None, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(8, 12, 12))


def settings(ctx: Ctx) -> dict:
    p = ctx.params
    tiny = ctx.tiny
    layers = [int(x) for x in str(p.get("e2e_layers") or "2,4").split(",")]
    ivs = p.get("intervals") or ("4" if tiny else "4,6,8")
    return dict(
        cfg=dict(TINY if tiny else FLUX_DEV, num_layers=layers[0], num_single_layers=layers[1]),
        dtype=torch.float32 if tiny else torch.bfloat16,
        grid=8 if tiny else 64,  # packed latent side: 1024 px / 16
        text=16 if tiny else 512,
        steps=int(p.get("steps") or (12 if tiny else 50)),
        intervals=[int(x) for x in str(ivs).split(",")],
        repeats=int(p.get("repeats") or (2 if tiny else 3)),
        seed=int(p.get("seed", 0)),
    )


def build_model(ctx: Ctx, cfg: dict, dtype: torch.dtype, seed: int):
    from diffusers import FluxTransformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=ctx.device)
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0.0, 1.0 / math.sqrt(mod.in_features), generator=g)
                if mod.bias is not None:
                    mod.bias.zero_()
                n += 1 + (mod.bias is not None)
            else:
                for pname, prm in mod.named_parameters(recurse=False):  # norm weights
                    prm.fill_(1.0 if pname == "weight" else 0.0)
                    n += 1
    if n != len(list(model.parameters())) or len(list(model.buffers())):
        raise RuntimeError("build_model: a parameter or buffer was left uninitialised")
    return model.eval().requires_grad_(False)


class Inputs:
    def __init__(self, ctx: Ctx, s: dict, seed: int):
        dev, dt, cfg = ctx.device, s["dtype"], s["cfg"]
        g = torch.Generator(device=dev).manual_seed(seed + 1)
        n, L, B = s["grid"] ** 2, s["text"], 1
        self.B, self.n = B, n
        self.latents = torch.randn(B, n, cfg["in_channels"], generator=g, device=dev).to(dt)
        self.prompt = torch.randn(B, L, cfg["joint_attention_dim"], generator=g, device=dev).to(dt)
        self.pooled = torch.randn(B, cfg["pooled_projection_dim"], generator=g, device=dev).to(dt)
        self.txt_ids = torch.zeros(L, 3, device=dev, dtype=dt)
        ids = torch.zeros(s["grid"], s["grid"], 3)  # FluxPipeline._prepare_latent_image_ids
        ids[..., 1] += torch.arange(s["grid"])[:, None]
        ids[..., 2] += torch.arange(s["grid"])[None, :]
        self.img_ids = ids.reshape(n, 3).to(device=dev, dtype=dt)
        self.guidance = torch.full((B,), 3.5, device=dev, dtype=torch.float32)
        # FLUX's dynamically shifted sigmas (FlowMatchEulerDiscreteScheduler, use_dynamic_shifting)
        m = (1.15 - 0.5) / (4096 - 256)
        mu = n * m + 0.5 - m * 256
        sig = torch.linspace(1.0, 1.0 / s["steps"], s["steps"], dtype=torch.float64)
        sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1))
        self.sigmas = [float(x) for x in sig] + [0.0]


def counters(model):
    import svdcache

    t = svdcache.stats(model).total
    return t.full_steps, t.cached_steps


def generate(ctx: Ctx, model, inp: Inputs, read_modes: bool) -> dict:
    """One generation. Returns per-call seconds, per-call modes (from the runtime's counters), the
    loop's wall time and the final latent."""
    import svdcache

    if read_modes:
        svdcache.reset(model)
    cuda = ctx.device.type == "cuda"
    steps = len(inp.sigmas) - 1
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
           for _ in range(steps)] if cuda else []
    host, modes = [], []
    x = inp.latents.clone()
    with torch.no_grad():
        ctx.sync()
        t0 = time.perf_counter()
        for i in range(steps):
            before = counters(model) if read_modes else None
            ts = torch.full((inp.B,), inp.sigmas[i], device=ctx.device, dtype=x.dtype)
            if cuda:
                evs[i][0].record()
            h = time.perf_counter()
            out = model(hidden_states=x, timestep=ts, guidance=inp.guidance, pooled_projections=inp.pooled,
                        encoder_hidden_states=inp.prompt, txt_ids=inp.txt_ids, img_ids=inp.img_ids,
                        return_dict=False)[0]
            if cuda:
                evs[i][1].record()
            host.append(time.perf_counter() - h)
            if read_modes:
                f1, c1 = counters(model)
                df, dc = f1 - before[0], c1 - before[1]
                modes.append("full" if (df, dc) == (1, 0) else "cached" if (df, dc) == (0, 1) else f"?{df},{dc}")
            else:
                modes.append("full")  # no cache: every call computes in full
            x = x + (inp.sigmas[i + 1] - inp.sigmas[i]) * out
        ctx.sync()
        wall = time.perf_counter() - t0
    call_s = [s.elapsed_time(e) / 1e3 for s, e in evs] if cuda else host
    return dict(call_s=call_s, modes=modes, wall=wall, x=x)


def probe_ranks(ctx: Ctx) -> list[int]:
    """The ranks the zero-setup basis picks on this model (for the precompile stage: which kernel
    variants the e2e rows will launch): one short generation on the PyTorch backend."""
    import svdcache

    s = settings(ctx)
    model = build_model(ctx, s["cfg"], s["dtype"], s["seed"])
    inp = Inputs(ctx, s, s["seed"])
    inp.sigmas = inp.sigmas[:3] + [0.0]
    N = sorted(s["intervals"])[len(s["intervals"]) // 2]
    svdcache.enable(model, interval=N, backend="torch")
    try:
        generate(ctx, model, inp, read_modes=True)
        return sorted(set(svdcache.stats(model).ranks.values()))
    finally:
        svdcache.disable(model)


def _letters(modes) -> str:
    return "".join("F" if m == "full" else "c" if m == "cached" else "?" for m in modes)


def _median(xs):
    return statistics.median(xs) if xs else None


def run(ctx: Ctx) -> bool:
    import svdcache

    s = settings(ctx)
    sink = ctx.sink
    cache = os.environ.get("TRITON_CACHE_DIR")
    cfg = s["cfg"]
    t = time.monotonic()
    model = build_model(ctx, cfg, s["dtype"], s["seed"])
    inp = Inputs(ctx, s, s["seed"])
    params = sum(p.numel() for p in model.parameters())
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    model_note = (f"FluxTransformer2DModel {cfg['num_layers']} double + {cfg['num_single_layers']} single blocks "
                  f"(FLUX.1-dev: 19 + 38), hidden {hidden} = {cfg['num_attention_heads']} x "
                  f"{cfg['attention_head_dim']}, "
                  f"{params / 1e6:.1f} M random {str(s['dtype']).replace('torch.', '')} parameters; "
                  f"{inp.n} image + {s['text']} text tokens, batch 1, {s['steps']} steps")
    sink.row(kind="model", note=model_note, params=params, build_s=round(time.monotonic() - t, 2), steps=s["steps"],
             intervals=s["intervals"])
    sink.log(model_note)

    ivs = s["intervals"]
    mid = sorted(ivs)[len(ivs) // 2]
    plan = [("uncached", None)]
    plan += [("default", mid), ("default + cuda_graphs", mid), ("TaylorSeer o1", mid)]
    for n in ivs:
        if n != mid:
            plan += [("default", n), ("TaylorSeer o1", n)]
    cuda = ctx.device.type == "cuda"
    base = None  # uncached latency, final latent
    est_gen = None
    results = []
    ok = True
    reserve = 1.0 if ctx.tiny else 4.0
    for i, (method, N) in enumerate(plan):
        row = dict(kind="row", method=method, N=N if N is not None else "-")
        if method == "default + cuda_graphs" and not cuda:
            row.update(status="skipped", reason="no CUDA device: cuda_graphs does nothing off CUDA")
            sink.row(**row)
            results.append(row)
            continue
        if method != "uncached" and base is None:
            row.update(status="skipped", reason="no uncached baseline")
            sink.row(**row)
            results.append(row)
            continue
        left = ctx.left() - reserve
        share = left / max(1, len(plan) - i)
        if est_gen is not None:
            extra = 0.0 if ctx.tiny else 5.0  # enable, online basis, a late compile
            repeats = max(1, min(s["repeats"], int((share - extra) / est_gen) - 1))
            if left < 2 * est_gen + extra:
                row.update(status="skipped",
                           reason=f"budget: {left:.0f} s left, about {2 * est_gen + extra:.0f} s needed")
                sink.row(**row)
                results.append(row)
                continue
        else:
            repeats = s["repeats"]
        kw = None
        if method == "default":
            kw = dict(interval=N)
        elif method == "default + cuda_graphs":
            kw = dict(interval=N, cuda_graphs=True)
        elif method == "TaylorSeer o1":
            kw = dict(config=svdcache.taylorseer(interval=N, order=1))
        try:
            row.update(status="ok", **_row(ctx, model, inp, kw, repeats, cache, base))
        except Exception as e:
            import traceback

            traceback.print_exc()
            row.update(status="failed", reason=f"{type(e).__name__}: {e}")
            ok = False
        if method == "uncached" and row["status"] == "ok":
            base = dict(latency=row["latency_s"], x=row.pop("_x"))
            est_gen = row["wall_s"]
        row.pop("_x", None)
        if row["status"] == "ok" and row.get("mode_mismatch"):
            ok = False
        sink.row(**row)
        sink.log(f"{method} N={N}: {row.get('status')} {row.get('reason', '')} latency {row.get('latency_s')} "
                 f"speedup {row.get('speedup')} flops {row.get('flops_ratio')} "
                 f"modes {row.get('n_full')}+{row.get('n_cached')}")
        results.append(row)
    ran = [r for r in results if r["status"] == "ok" and r["method"] != "uncached"]
    skipped_budget = [r for r in results if r["status"] == "skipped" and str(r.get("reason", "")).startswith("budget")]
    parts = []
    for r in ran:
        parts.append(f"{r['method']} N={r['N']}: {r['speedup']:.2f}x latency at {r['flops_ratio']:.2f}x FLOPs "
                     f"({r['efficiency']:.2f})")
    u = next((r for r in results if r["method"] == "uncached" and r["status"] == "ok"), None)
    numbers = (f"{cfg['num_layers']}+{cfg['num_single_layers']} blocks at hidden {hidden}, {s['steps']} steps; "
               + (f"uncached {u['latency_s'] * 1e3:.1f} ms; " if u else "uncached failed; ") + "; ".join(parts)
               + (f"; {len(skipped_budget)} rows skipped (budget)" if skipped_budget else ""))
    ok = ok and u is not None and all(r["status"] != "failed" for r in results)
    sink.emit("summary", ok=ok, partial=bool(skipped_budget), numbers=numbers, model=model_note)
    return ok


def _row(ctx: Ctx, model, inp: Inputs, enable_kw: dict | None, repeats: int, cache, base) -> dict:
    import svdcache

    out = {}
    c0 = compiled_kernels(cache)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    cached_run = enable_kw is not None
    if cached_run:
        out["config"] = svdcache.enable(model, **enable_kw).label
    try:
        warm = generate(ctx, model, inp, read_modes=cached_run)
        out["warm_s"] = time.perf_counter() - t
        c1 = compiled_kernels(cache)
        gens = [generate(ctx, model, inp, read_modes=cached_run)]
        while len(gens) < repeats and ctx.left() > 2 * gens[-1]["wall"] + 1:
            gens.append(generate(ctx, model, inp, read_modes=cached_run))
        c2 = compiled_kernels(cache)
        st = svdcache.stats(model) if cached_run else None
    finally:
        if cached_run:
            svdcache.disable(model)
    if ctx.device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30  # weights included
    last = gens[-1]
    modes = last["modes"]
    lat = [sum(g["call_s"]) for g in gens]
    full = [c for g in gens for c, m in zip(g["call_s"], g["modes"]) if m == "full"]
    cached = [c for g in gens for c, m in zip(g["call_s"], g["modes"]) if m == "cached"]
    out.update(repeats=len(gens), latency_s=_median(lat), latency_all=[round(x, 5) for x in lat],
               wall_s=_median([g["wall"] for g in gens]), full_ms=_median(full) and _median(full) * 1e3,
               cached_ms=_median(cached) and _median(cached) * 1e3, n_full=modes.count("full"),
               n_cached=modes.count("cached"), modes=_letters(modes), warm_modes=_letters(warm["modes"]),
               compiles_warmup=None if c0 is None else c1 - c0, compiles_timed=None if c1 is None else c2 - c1)
    if st is not None:
        g = st.last_generation
        out.update(stats_full=g.full_steps, stats_cached=g.cached_steps, fallbacks=g.fallbacks,
                   flops_ratio=g.flops_ratio, cache_mib=g.cache_bytes / 2**20, online_basis_s=st.online_basis_seconds)
        # the per-call modes and the runtime's per-generation counts must agree
        out["mode_mismatch"] = (g.full_steps, g.cached_steps) != (out["n_full"], out["n_cached"])
        ks = sorted(st.ranks.values())
        if ks:
            out["ranks"] = f"{len(ks)} features, k {ks[0]}..{ks[-1]} (median {ks[len(ks) // 2]})"
        if st.graphs is not None:
            gr = st.graphs
            out["graphs"] = f"{gr['captures']} captures, {gr['replays']} replays, {gr['eager']} eager"
    else:
        out.update(flops_ratio=1.0, stats_full=None, stats_cached=None)
    x = last["x"]
    out["finite"] = bool(torch.isfinite(x).all())
    if base is not None:
        out["speedup"] = base["latency"] / out["latency_s"]
        out["efficiency"] = out["speedup"] / out["flops_ratio"]
        b = base["x"].double()
        out["rel_err"] = float((x.double() - b).norm() / b.norm().clamp_min(1e-30))
    else:
        out["speedup"], out["efficiency"] = 1.0, 1.0
        out["_x"] = x.clone()
    return out
