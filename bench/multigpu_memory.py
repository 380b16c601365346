"""On paper: cache memory per rank and communication per step of SVD-Cache under context
parallelism at video scale, from the model's config (no weights, no GPU).

    python bench/multigpu_memory.py                 # HunyuanVideo 720p, 129 frames, 2/4/8 ranks
    python bench/multigpu_memory.py --out bench/results/multigpu.md

The transformer's configuration is diffusers' HunyuanVideoTransformer3DModel default (the released
13B model); its parameters are counted on the meta device. What is counted:

- Tokens: video (frames - 1) / 4 + 1 latent frames of (H / 8 / p) x (W / 8 / p) patches, plus the
  text tokens (the pipeline's max_sequence_length 256), sequence-sharded over the ranks.
- Cached features, module level as TaylorSeer and svdcache's FLUX adapter: per dual-stream block the
  attention and MLP outputs of the video stream and of the text stream, per single-stream block the
  output projection (the 2 token refiner blocks see only text tokens and are not counted).
- Cache memory in copies of those features (bf16): FORA 1, TaylorSeer order 1 / 2: 2 / 3 (what they
  keep per feature), SVD-Cache's default 1 + 2k/D (the last full feature held as the anchor plus the
  k-dim Taylor state; k/D from --k-frac, 0.045 gives the 1.09 copies measured on the embedded model).
  Under context parallelism every rank keeps its own tokens' cache: memory per rank = total / P.
- Communication per rank, bytes received: Ulysses 4 all-to-alls per attention layer (q, k, v, out;
  measured on the CPU test model: 24 for its 6 attention layers) of (N / P) x D, (P - 1) / P of it
  from other ranks; Ring an all-gather of k and v per attention layer, (P - 1) x 2 x (N / P) x D; and
  the output all-gather, (P - 1) / P x N x (out_channels x p^2). A cached step skips every attention
  layer and keeps only the output all-gather (measured in tests/distributed); svdcache adds none.
  One-time, for a zero-setup basis only: one all-reduce of a D x D fp32 Gram per feature.
"""
from __future__ import annotations

import argparse
import inspect
import sys

BF16 = 2


def hunyuan_config() -> dict:
    from diffusers import HunyuanVideoTransformer3DModel as H

    sig = inspect.signature(H.__init__)
    return {k: v.default for k, v in sig.parameters.items() if k != "self"}


def count_params() -> int:
    import torch
    from diffusers import HunyuanVideoTransformer3DModel as H

    with torch.device("meta"):
        m = H()
    return sum(p.numel() for p in m.parameters())


def tokens(cfg: dict, height: int, width: int, frames: int, text: int) -> tuple[int, int]:
    p, pt = cfg["patch_size"], cfg["patch_size_t"]
    lat_f = (frames - 1) // 4 + 1
    n_video = (lat_f // pt) * (height // 8 // p) * (width // 8 // p)
    return n_video, text


def feature_bytes(cfg: dict, n_video: int, n_text: int) -> int:
    """One copy of every cached feature (bf16)."""
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    dual = cfg["num_layers"] * (2 * n_video + 2 * n_text) * D
    single = cfg["num_single_layers"] * (n_video + n_text) * D
    return (dual + single) * BF16


def n_features(cfg: dict) -> int:
    return 4 * cfg["num_layers"] + cfg["num_single_layers"]


def comm_per_step(cfg: dict, n_video: int, n_text: int, P: int, kind: str) -> tuple[float, float]:
    """(full step, cached step) bytes received per rank."""
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    N = n_video + n_text
    layers = cfg["num_layers"] + cfg["num_single_layers"]
    local = N / P * D * BF16
    if kind == "ulysses":
        attn = 4 * local * (P - 1) / P
    else:  # ring: all-gather of k and v
        attn = (P - 1) * 2 * local
    out_ch = cfg["out_channels"] or cfg["in_channels"]
    gather = (P - 1) / P * n_video * out_ch * cfg["patch_size"] ** 2 * cfg["patch_size_t"] * BF16
    return layers * attn + gather, gather


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--frames", type=int, default=129)
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--k-frac", type=float, default=0.045, help="k / D of SVD-Cache's Taylor state")
    ap.add_argument("--out", default=None, help="write the markdown here")
    a = ap.parse_args(argv)

    from svdcache.runtime.schedule import full_steps

    cfg = hunyuan_config()
    params = count_params()
    nv, nt = tokens(cfg, a.height, a.width, a.frames, a.text)
    copy = feature_bytes(cfg, nv, nt)
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n_full = len(full_steps(a.steps, interval=a.interval, warmup=a.warmup))
    GB = 1e9
    methods = [
        ("uncached", 0.0),
        ("FORA (reuse)", 1.0),
        (f"SVD-Cache default (1 + 2k/D, k/D = {a.k_frac})", 1 + 2 * a.k_frac),
        ("TaylorSeer order 1", 2.0),
        ("TaylorSeer order 2", 3.0),
    ]
    lines = [
        "# SVD-Cache under context parallelism at video scale (on paper)",
        "",
        f"`python bench/multigpu_memory.py` (HunyuanVideoTransformer3DModel defaults from diffusers: {params / 1e9:.2f} B "
        f"parameters, D = {D}, {cfg['num_layers']} dual + {cfg['num_single_layers']} single blocks; "
        f"{a.height}x{a.width}, {a.frames} frames -> {nv:,} video + {nt} text tokens; bf16). The method and "
        "what is counted are in the script's docstring. Weights are replicated on every rank under context "
        f"parallelism: {params * BF16 / GB:.1f} GB per rank in bf16, in every row.",
        "",
        f"One copy of the cached features ({n_features(cfg)} module outputs): **{copy / GB:.1f} GB** for the whole "
        "sequence.",
        "",
        "## Cache memory per rank (GB)",
        "",
        "| method | copies | 1 GPU | " + " | ".join(f"{P} ranks" for P in a.ranks) + " |",
        "|---|---|---|" + "---|" * len(a.ranks),
    ]
    for name, c in methods:
        lines.append(f"| {name} | {c:.2f} | {c * copy / GB:.1f} | " + " | ".join(f"{c * copy / P / GB:.1f}" for P in a.ranks) + " |")
    lines += [
        "",
        "Every method's cache is token-wise, so each rank keeps its own tokens' share and none needs "
        "communication for it; what separates them is the number of copies. At 8 ranks SVD-Cache holds "
        f"{(1 + 2 * a.k_frac) * copy / 8 / GB:.1f} GB per rank where TaylorSeer order 1 holds {2 * copy / 8 / GB:.1f} "
        f"and order 2 {3 * copy / 8 / GB:.1f} GB (per rank, on top of the weights).",
        "",
        f"## Communication per rank per step (GB received; {a.steps} steps, interval {a.interval}, warm-up "
        f"{a.warmup}: {n_full} full + {a.steps - n_full} cached)",
        "",
        "| attention | ranks | uncached step | cached step | average per step, cached run | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("ulysses", "ring"):
        for P in a.ranks:
            full, cached = comm_per_step(cfg, nv, nt, P, kind)
            avg = (n_full * full + (a.steps - n_full) * cached) / a.steps
            lines.append(f"| {kind} | {P} | {full / GB:.2f} | {cached / GB:.4f} | {avg / GB:.2f} | {full / avg:.2f}x |")
    gram = n_features(cfg) * D * D * 4
    lines += [
        "",
        "A cached step's only collective is the model's own output all-gather (the attention layers it skips "
        "carry all the rest); svdcache adds nothing on any step, for every method in the table alike. "
        f"Once per model, a zero-setup basis all-reduces one D x D fp32 Gram per feature: {gram / GB:.1f} GB "
        "in total (an offline basis file: nothing).",
        "",
        "Caveat: diffusers 0.42.1 ships no context-parallel plan for HunyuanVideoTransformer3DModel (FLUX, "
        "Wan, LTX, QwenImage and others have one), so this layout needs a user-supplied `cp_plan` or another "
        "runtime (xDiT); the numbers are what such a layout implies.",
    ]
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    sys.stdout.write(main())
