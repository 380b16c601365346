"""Fidelity vs compute on the embedded video model (a trained miniature Wan, svdcache.embedded.video).

    OMP_NUM_THREADS=1 python bench/video_fidelity.py            # about 10 min on one CPU thread, resumable
    python bench/video_fidelity.py --report-only                # rebuild the table from the JSON

Fixed set: svdcache.embedded.video.eval_set: ten prompts "<digit> moving <direction>" (digit d,
direction d mod 4) x --seeds seeds (1000 d + s), 50 steps, true CFG 3 (a "cond" and an "uncond"
transformer call per step, in their cache contexts). The bases are calibrated on other digit /
direction pairs and seeds (bench/calibrate_video.py): nothing evaluated is calibrated on. Every
method is compared with the uncached videos of the same prompt and seed (PSNR over all frames).

Methods, each at intervals N = 3..8, all in this runtime:
  - SVD-Cache default at the submodule level (granularity="submodule": the outputs of each Wan
    block's self-attention, cross-attention and feed-forward; the block's norms, AdaLN modulation,
    gates and residual adds run every step) and at block level (granularity="block": each block's
    output minus its input), each with its own basis. Default settings otherwise (change subspace,
    Taylor order 2 from N = 4 / order 1 below, int4 residual, warm-up 1, the unconditional branch
    computed at every 2nd full step).
  - the same with both guidance branches computed at every full step (uncond_interval=1), both levels;
  - FORA (full-space reuse) and TaylorSeer order 1 (full-space Taylor), submodule level, warm-up 1,
    both branches every full step, uniform schedule; TaylorSeer o1 on the basis's calibrated (DP)
    schedule; and TaylorSeer o1 with the unconditional branch shared as the default does
    (uncond_interval=2, uniform).
Schedules: the default's schedule="auto" takes the basis's DP plan (calibration's svd-taylor1 family)
for the rows with both branches every full step (u1); the shared rows (uncond_interval=2) have no
plan of their own in these bases (no closed-loop selection was run) and use the uniform rule.
FLOPs are counted over the whole sampling by hooks on every Linear, the patch-embedding Conv3d and
every attention (QK^T and AV, booked by the projections that ran), checked against torch's flop counter on an uncached call, plus the
cache's own projection / reconstruction matmuls (svdcache.stats cache_op_flops). PSNR is interpolated
at matched FLOPs ratios (linear in log ratio). Memory: the cache's peak bytes over one copy of its
cached features (svdcache.stats memory_ratio, measured), and on paper at HunyuanVideo 720p x 129 frames.
Writes bench/results/video_model/fidelity.{json,md} and reference_videos.png (the uncached videos, seed 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

import common  # noqa: F401  (puts the repo on sys.path)
import svdcache
from svdcache import SVDCacheConfig
from svdcache.embedded.video import (TRANSFORMER_CONFIG, VIDEO_GUIDANCE, eval_set, load_video_basis,
                                     load_video_pipeline)
from svdcache.metrics import psnr, ssim

RESULTS = os.path.join(common.ROOT, "bench", "results", "video_model")
INTERVALS = [3, 4, 5, 6, 7, 8]
RATIOS = (3, 4, 5, 6, 7)


def method_list(intervals=INTERVALS):
    ms = []
    peer = dict(warmup=1, uncond_interval=1, schedule="uniform", granularity="submodule")
    for n in intervals:
        for g in ("submodule", "block"):
            ms.append(dict(name=f"SVD default {g} N={n}", family=f"SVD-Cache default (chosen at calibration), {g} level",
                           setting=n, granularity=g, cfg=dict(interval=n, granularity=g)))
            ms.append(dict(name=f"SVD safe {g} N={n}",
                           family=f"SVD-Cache without a choice (order 1, both branches, uniform), {g} level",
                           setting=n, granularity=g, cfg=dict(interval=n, granularity=g, choice="off")))
        ms.append(dict(name=f"FORA N={n}", family="FORA (full-space reuse), submodule level", setting=n,
                       granularity="submodule", cfg=dict(interval=n, space="full", predictor="reuse", **peer)))
        ms.append(dict(name=f"TaylorSeer-o1 N={n}", family="TaylorSeer o1 (full space), submodule level", setting=n,
                       granularity="submodule", cfg=dict(interval=n, space="full", predictor="taylor", order=1, **peer)))
        ms.append(dict(name=f"TaylorSeer-o1 cal N={n}",
                       family="TaylorSeer o1 (full space), submodule level, the basis's calibrated (DP) schedule",
                       setting=n, granularity="submodule",
                       cfg=dict(interval=n, space="full", predictor="taylor", order=1,
                                **{**peer, "schedule": "calibrated"})))
        ms.append(dict(name=f"TaylorSeer-o1 u2 N={n}",
                       family="TaylorSeer o1 (full space), submodule level, uncond shared (uncond_interval=2)",
                       setting=n, granularity="submodule",
                       cfg=dict(interval=n, space="full", predictor="taylor", order=1,
                                **{**peer, "uncond_interval": 2})))
        ms.append(dict(name=f"HiCache-o2 N={n}", family="HiCache o2 (full space, scale 0.7), submodule level",
                       setting=n, granularity="submodule",
                       cfg=dict(interval=n, space="full", predictor="hermite", order=2, hermite_scale=0.7, **peer)))
    # the target comparison first (the sweep is resumable: an interrupted run keeps what it finished)
    order = ["SVD default submodule", "SVD default block", "TaylorSeer-o1 N", "SVD safe submodule", "SVD safe block",
             "TaylorSeer-o1 cal", "TaylorSeer-o1 u2", "HiCache", "FORA"]
    return sorted(ms, key=lambda m: next(i for i, o in enumerate(order) if m["name"].startswith(o)))


class VideoFlopCounter:
    """Matmul FLOPs of the Wan transformer on any caching method: every nn.Linear (2 x rows x in x out),
    the patch-embedding Conv3d, and every WanAttention's QK^T and AV (4 x B x Nq x Nk x inner dim).
    Only modules that actually run are counted: the attention products are booked by forward hooks on
    the attention's to_q / to_k projections (a pre-hook on the attention itself would also fire on a
    cached step, where the submodule hook returns the forecast without running the attention)."""

    def __init__(self, tr):
        self.flops = 0
        self.handles = []
        self._q = {}
        for m in tr.modules():
            if isinstance(m, torch.nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear))
            elif isinstance(m, torch.nn.Conv3d):
                self.handles.append(m.register_forward_hook(self._conv))
            elif type(m).__name__ == "WanAttention":
                if getattr(m, "fused_projections", False):
                    raise RuntimeError("VideoFlopCounter: fused attention projections are not counted")
                self.handles.append(m.to_q.register_forward_hook(self._query))
                self.handles.append(m.to_k.register_forward_hook(self._key))

    def _linear(self, m, inp, out):
        x = inp[0]
        self.flops += 2 * (x.numel() // m.in_features) * m.in_features * m.out_features

    def _conv(self, m, inp, out):
        k = math.prod(m.kernel_size) * m.in_channels // m.groups
        self.flops += 2 * out.numel() * k

    def _query(self, m, inp, out):
        self._q[id(m)] = out.shape  # (B, Nq, inner)

    def _key(self, m, inp, out):
        # to_k of the same attention runs right after its to_q (WanAttnProcessor)
        qs = next(reversed(self._q.values()))
        self.flops += 4 * qs[0] * qs[1] * out.shape[1] * qs[2]

    def remove(self):
        for h in self.handles:
            h.remove()


def self_check(tr):
    from svdcache.embedded.video_data import FRAME, FRAMES, TEXT_DIM, TEXT_LEN
    from svdcache.runtime.flops import count_flops

    args = dict(hidden_states=torch.randn(2, 1, FRAMES, FRAME, FRAME), timestep=torch.full((2,), 500.0),
                encoder_hidden_states=torch.randn(2, TEXT_LEN, TEXT_DIM), return_dict=False)
    fc = VideoFlopCounter(tr)
    with torch.no_grad():
        _, ref = count_flops(tr, **args)
    fc.remove()
    if fc.flops != ref:
        raise RuntimeError(f"VideoFlopCounter {fc.flops} != torch flop_counter {ref}")
    return ref


def generate(pipe, prompts, seeds, steps):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    t0 = time.perf_counter()
    v = pipe(prompts, num_inference_steps=steps, generator=gens, output_type="pt", **VIDEO_GUIDANCE).videos
    return v.float(), time.perf_counter() - t0


def save_grid(videos, prompts, path):
    """The uncached reference videos, one row per video, one column per frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B, _, F = videos.shape[:3]
    fig, ax = plt.subplots(B, F, figsize=(F * 0.9, B * 1.0), squeeze=False)
    for i in range(B):
        for f in range(F):
            ax[i, f].imshow(videos[i, 0, f], cmap="gray", vmin=0, vmax=1)
            ax[i, f].axis("off")
        ax[i, 0].set_title(prompts[i], fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def frame_ssim(a, b):
    B, C, F, H, W = a.shape
    fa = a.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)
    fb = b.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)
    return ssim(fa, fb).view(B, F).mean(1)


# --------------------------------------------------------------------------------------------------
def headline(rows, ratios=RATIOS):
    fams = {}
    for r in rows:
        fams.setdefault(r["family"], []).append((r["flops_ratio"], r["psnr"]))
    out = {}
    for fam, pts in fams.items():
        pts.sort()
        vals = []
        for x in ratios:
            v = None
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                if x0 <= x <= x1 and x1 > x0:
                    w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
                    v = y0 + w * (y1 - y0)
                    break
            vals.append(v)
        out[fam] = vals
    return out


# HunyuanVideo 720p x 129 frames: latent 33 x 90 x 160, patch (1, 2, 2) -> 118,800 video tokens; 256
# text tokens (its max_sequence_length); hidden 3072; 20 double-stream + 40 single-stream blocks; MLP
# ratio 4; its guidance is distilled (one transformer call per step: one cache context).
HV = dict(N=33 * 90 * 160 // 4, L=256, D=3072, double=20, single=40, mlp=4)


def hunyuan_rows():
    """Token-rows x channels of one copy of the cached features, per granularity."""
    N, L, D, mlp = HV["N"], HV["L"], HV["D"], HV["mlp"]
    T = N + L
    # submodule: double block attn -> (video N, text L), ff (N), ff_context (L); single block: its fused
    # proj_out over cat(attn, MLP) (T x D; commit 62fb47f, checked on a tiny HunyuanVideo: the feature is
    # single_transformer_blocks.i.proj_out); the token refiner's 2 blocks (L rows each) are left out (< 0.01%)
    sub = HV["double"] * (2 * N + 2 * L) * D + HV["single"] * T * D
    block = HV["double"] * (N + L) * D + HV["single"] * (N + L) * D  # output - input per stream
    return {"submodule": sub, "block": block}


def paper_memory(k_over_D: float):
    """Bytes of cache state per method at HunyuanVideo 720p x 129 frames, bf16 features."""
    rows = hunyuan_rows()
    bf16 = 2
    # copies of one set of the cached features (bf16): the default keeps the last full feature (1), its
    # k change coefficients (fp32, two terms at order 2: 2 x 2k/D of a bf16 copy at most; 2k/D stated by
    # the config) and the residual difference at 4 bits (1/4 of bf16) with one scale per token
    svd = 1 + 2 * k_over_D + 0.25
    methods = [
        ("SVD-Cache default (1 + 2k/D + 1/4: last feature, fp32 coefficients, int4 residual difference)", svd),
        ("FORA (1 copy: the last feature)", 1.0),
        ("TaylorSeer o1 (2 copies: the feature and its first difference)", 2.0),
        ("TaylorSeer o2 (3 copies)", 3.0),
    ]
    out = []
    for g in ("submodule", "block"):
        for name, copies in methods:
            out.append(dict(granularity=g, method=name, copies=copies, bytes=copies * rows[g] * bf16))
    return out, rows


def fmt(v, f="{:.2f}"):
    return "n/a" if v is None else f.format(v)


def write_report(data, out_dir):
    rows, meta = data["rows"], data["meta"]
    cmd = meta.get("command", "python bench/video_fidelity.py")
    L = [
        "# Fidelity vs compute on the embedded video model (trained miniature Wan)",
        "",
        f"Command: `{cmd}` on {meta['machine']} ({meta['date']}, {meta['minutes']:.1f} min in all runs of it). "
        f"Model: svdcache/embedded/tiny-wan-digits ({meta['model']}), trained in this repo "
        f"({meta.get('train', '')}). {meta['videos']} videos (10 prompts '<digit> moving <direction>' x "
        f"{meta['seeds']} seed(s)), {meta['steps']} steps, FlowMatchEuler shift 2, true CFG 3 (cond + uncond calls "
        f"per step); uncached reference {meta['ref_seconds']:.1f} s, {meta['ref_flops'] / 1e9:.1f} GFLOP. "
        "Bases calibrated on held-out digit / direction pairs and seeds (bench/calibrate_video.py). PSNR (dB) over "
        "all frames against the uncached video of the same prompt and seed; SSIM per frame. FLOPs ratio: counted "
        "(uncached / actual, the cache's own matmuls included).",
        "",
        "## PSNR (dB) at matched counted FLOPs ratios",
        "",
        "| method | " + " | ".join(f"{x}x" for x in RATIOS) + " |",
        "|---|" + "---|" * len(RATIOS),
    ]
    hl = headline(rows)
    for fam, vals in sorted(hl.items(), key=lambda kv: -(kv[1][2] if kv[1][2] is not None else -1e9)):
        L.append(f"| {fam} | " + " | ".join(fmt(v) for v in vals) + " |")
    fs, fu = "SVD-Cache default, submodule level", "SVD-Cache default, submodule level, both branches every full step (uncond_interval=1)"
    ts = "TaylorSeer o1 (full space), submodule level"
    if fs in hl and fu in hl and ts in hl:
        i5 = RATIOS.index(5)
        a, b, c = hl[fs][i5], hl[fu][i5], hl[ts][i5]
        if None not in (a, b, c):
            L += ["", f"At 5x: the default (unconditional branch shared, uncond_interval=2) {a:.2f} dB, the same with both "
                  f"branches at every full step {b:.2f} dB ({a - b:+.2f} dB from the sharing on this model, true CFG 3), "
                  f"TaylorSeer o1 {c:.2f} dB (uniform schedule; the default u1 rows use the basis's DP plan). "
                  "20 videos: differences of about 1 dB between rows are within the spread (see the min column)."]
    # the target: submodule vs block at N = 5, same config
    L += ["", "## Submodule vs block level at the same interval (default config)", "",
          "| N | submodule PSNR (min) [FLOPs x] | block PSNR (min) [FLOPs x] | difference (dB) | u1: submodule | u1: block | u1 difference |",
          "|---|---|---|---|---|---|---|"]
    by = {r["name"]: r for r in rows}
    for n in INTERVALS:
        cells = []
        diffs = []
        for pre in ("SVD default", "SVD default u1"):
            s, b = by.get(f"{pre} submodule N={n}"), by.get(f"{pre} block N={n}")
            if s is None or b is None:
                cells += ["n/a", "n/a"]
                diffs.append(None)
                continue
            cells += [f"{s['psnr']:.2f} ({s['psnr_min']:.2f}) [{s['flops_ratio']:.2f}]",
                      f"{b['psnr']:.2f} ({b['psnr_min']:.2f}) [{b['flops_ratio']:.2f}]"]
            diffs.append(s["psnr"] - b["psnr"])
        L.append(f"| {n} | {cells[0]} | {cells[1]} | {fmt(diffs[0], '{:+.2f}')} | {cells[2]} | {cells[3]} | "
                 f"{fmt(diffs[1], '{:+.2f}')} |")
    s5, b5 = by.get("SVD default submodule N=5"), by.get("SVD default block N=5")
    s5u, b5u = by.get("SVD default u1 submodule N=5"), by.get("SVD default u1 block N=5")
    if s5 and b5:
        d, du = s5["psnr"] - b5["psnr"], (s5u["psnr"] - b5u["psnr"]) if s5u and b5u else None
        L += ["", f"Target (issue 10: submodule level >= 3 dB above block level at N = 5): "
              f"{'met' if d >= 3 else 'NOT met'}: {d:+.2f} dB with the default config "
              f"({s5['psnr']:.2f} vs {b5['psnr']:.2f} dB), {fmt(du, '{:+.2f}')} dB with both guidance branches at "
              "every full step (uncond_interval=1). On Wan's blocks the submodule level recomputes only the "
              "AdaLN modulation / gates (a function of the timestep alone, the same for every token) and the "
              "norms on cached steps; the block level forecasts their effect along with the rest."]
    L += ["", "## All runs", "",
          "| method | full / cached calls | FLOPs ratio (counted) | runtime's ratio | time ratio | PSNR (min) | SSIM | memory (copies of its features) | cache MiB |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["setting"])):
        L.append(f"| {r['name']} | {r['full']} / {r['cached']} | {r['flops_ratio']:.2f} | {r['runtime_flops_ratio']:.2f} | "
                 f"{r['time_ratio']:.2f} | {r['psnr']:.2f} ({r['psnr_min']:.2f}) | {r['ssim']:.4f} | "
                 f"{fmt(r['mem_copies'])} | {r['mem_bytes'] / 2**20:.2f} |")
    # memory on paper
    k_abs = meta.get("median_k", round(meta.get("k_over_D", 0.0) * 128))
    k_frac = k_abs / HV["D"]  # the same k (1-2 directions of change) at D = 3072
    mem, hrows = paper_memory(k_frac)
    L += ["", "## Cache memory on paper: HunyuanVideo 720p, 129 frames", "",
          f"Latent 33 x 90 x 160, patch (1, 2, 2): N = {HV['N']:,} video tokens + L = {HV['L']} text tokens, "
          f"D = {HV['D']}, {HV['double']} double-stream + {HV['single']} single-stream blocks, bf16 features, one "
          "cache context (HunyuanVideo's guidance is distilled: one transformer call per step; true CFG doubles "
          "every number). One copy of the cached features:",
          "",
          f"- block level: each block's output minus input per stream: (20 + 40) x (N + L) x D = {hrows['block']:,} values "
          f"= {hrows['block'] * 2 / 1e9:.1f} GB in bf16;",
          f"- submodule level: double blocks attn (N + L) + ff (N) + ff_context (L) rows, i.e. 20 x 2 (N + L) x D; single "
          f"blocks their fused proj_out over cat(attention, MLP), (N + L) x D (the submodule adapter's fused-projection "
          f"feature; before it, attn + the 4D-wide proj_mlp: 5 (N + L) x D); in all 80 x (N + L) x D = {hrows['submodule']:,} values "
          f"= {hrows['submodule'] * 2 / 1e9:.1f} GB (4/3 of the block level: the double blocks hold two features per stream).",
          "",
          f"SVD-Cache default: 1 + 2k/D + 1/4 copies of bf16 features (the config's formula; 1 + k/D + 1/8 of fp32 "
          f"ones, measured below) with k = {k_abs:g} (the median rank of the default's change subspace on the video "
          f"model) at D = 3072: k/D = {k_frac:.5f}. Submodule and block level hold the same number of copies; "
          "their features differ in size.",
          "",
          "| granularity | method | copies | GB (bf16) |", "|---|---|---|---|"]
    for m in mem:
        L.append(f"| {m['granularity']} | {m['method']} | {m['copies']:.3f} | {m['bytes'] / 1e9:.1f} |")
    measured = {}
    for r in rows:
        measured.setdefault(r["family"], []).append(r["mem_copies"])
    mib = {}
    for r in rows:
        mib.setdefault(r["family"], []).append(r["mem_bytes"] / 2**20)
    L += ["", "Measured on the video model (peak cache bytes over one copy of its cached features, fp32, cond and "
          "uncond contexts, 20 videos; svdcache.stats memory_ratio), max over N. Wan's submodule level caches three "
          "features per block (attn1, attn2, ffn: 3 x N x D) where the block level caches one (N x D):", "",
          "| method | copies | MiB |", "|---|---|---|"]
    for fam, v in sorted(measured.items()):
        v = [x for x in v if x is not None]
        L.append(f"| {fam} | {fmt(max(v) if v else None, '{:.3f}')} | {max(mib[fam]):.1f} |")
    with open(os.path.join(out_dir, "fidelity.md"), "w") as f:
        f.write("\n".join(L) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--seeds", type=int, default=1, help="seeds per prompt (10 prompts)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--intervals", type=int, nargs="*", default=INTERVALS)
    ap.add_argument("--only", default=None)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fidelity.json")
    data = json.load(open(path)) if os.path.exists(path) and not args.fresh else {"rows": [], "meta": {}}
    if args.report_only:
        write_report(data, args.out)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    pipe = load_video_pipeline()
    tr = pipe.transformer
    self_check(tr)
    bases = {"submodule": load_video_basis(granularity="submodule"), "block": load_video_basis(granularity="block")}
    prompts, seeds = eval_set(args.seeds)
    counter = VideoFlopCounter(tr)
    ref_times = []
    for _ in range(2):
        counter.flops = 0
        ref, sec = generate(pipe, prompts, seeds, args.steps)
        ref_times.append(sec)
    ref_flops = counter.flops
    save_grid(ref[:: args.seeds], prompts[:: args.seeds], os.path.join(args.out, "reference_videos.png"))
    ref_sec = statistics.median(ref_times)
    done = {r["name"] for r in data["rows"]}
    ranks = []
    for m in method_list(args.intervals):
        if m["name"] in done or (args.only and args.only not in m["name"]):
            continue
        cfg = SVDCacheConfig(**m["cfg"]).resolve()
        svdcache.enable(pipe, basis=bases[m["granularity"]], config=cfg)
        counter.flops = 0
        vids, sec = generate(pipe, prompts, seeds, args.steps)
        st = svdcache.stats(pipe)
        plan = svdcache.adapters.last_plan(tr).granularity
        svdcache.disable(pipe)
        g = st.last_generation
        if cfg.space == "svd" and m["granularity"] == "submodule" and cfg.uncond_interval == 2 and st.ranks:
            ranks = list(st.ranks.values())
        total = counter.flops + g.cache_op_flops
        p = psnr(vids, ref)
        p = torch.where(torch.isinf(p), torch.full_like(p, 100.0), p)
        row = dict(name=m["name"], family=m["family"], setting=m["setting"], config=m["cfg"], plan=plan,
                   flops_ratio=ref_flops / total, runtime_flops_ratio=g.flops_ratio, psnr=float(p.mean()),
                   psnr_min=float(p.min()), ssim=float(frame_ssim(vids, ref).mean()), seconds=sec,
                   time_ratio=ref_sec / sec, full=g.full_steps, cached=g.cached_steps, shared=g.shared_steps,
                   mem_bytes=g.cache_bytes, mem_copies=g.memory_ratio if g.feature_bytes else None,
                   median_rank=statistics.median(st.ranks.values()) if st.ranks else None)
        print(f"{row['name']}: {row['psnr']:.2f} dB (min {row['psnr_min']:.2f}), {row['flops_ratio']:.2f}x, "
              f"{row['full']}/{row['cached']} calls, {row['mem_copies']} copies, plan {plan}", flush=True)
        data["rows"] = [r for r in data["rows"] if r["name"] != row["name"]] + [row]
        D = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
        meta = data.get("meta") or {}
        meta.update(
            command="OMP_NUM_THREADS=1 python bench/video_fidelity.py" + (f" --seeds {args.seeds}" if args.seeds != 1 else ""),
            machine=f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
                    f"{torch.get_num_threads()} thread",
            date=time.strftime("%Y-%m-%d"), minutes=meta.get("minutes_prev", 0.0) + (time.time() - t0) / 60,
            videos=len(prompts), seeds=args.seeds, steps=args.steps, ref_seconds=ref_sec, ref_flops=ref_flops,
            model=f"WanTransformer3DModel, {TRANSFORMER_CONFIG['num_layers']} blocks, hidden {D}, 256 video tokens",
        )
        if ranks:
            meta["k_over_D"] = statistics.median(ranks) / D
            meta["median_k"] = statistics.median(ranks)
        tl = os.path.join(common.ROOT, "svdcache", "embedded", "tiny-wan-digits", "train_log.json")
        if os.path.exists(tl):
            t = json.load(open(tl))
            meta["train"] = f"{t['steps']} steps of batch {t['batch_size']}, {t['minutes']:.0f} min on 1 CPU thread, final loss {t['final_loss']:.4f}"
        data["meta"] = meta
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)
    data["meta"]["minutes_prev"] = data["meta"].get("minutes", 0.0)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    write_report(data, args.out)
    print(open(os.path.join(args.out, "fidelity.md")).read()[:4000])


if __name__ == "__main__":
    main()
