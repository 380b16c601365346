"""Train the embedded miniature FLUX pipeline on sklearn digits (CPU, resumable).

    python -m svdcache.embedded.train --minutes 70 --work .work/train

Phase 1 trains the tiny VAE (a few minutes), phase 2 the FluxTransformer2DModel with rectified
flow exactly as FLUX samples it (x_t = (1-t) x0 + t eps, target eps - x0, timestep t in [0, 1]).
The text encoders stay at their seeded random weights: the transformer learns to read them.
Checkpoints go to --work every two minutes; rerunning the command resumes. The final pipeline is
written with ``save_pretrained`` to --out (safetensors).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .build import build_pipeline
from .data import MAX_SEQUENCE_LENGTH, load_digit_images, prompts_for

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "tiny-flux-digits")


def _save(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never corrupts the checkpoint


def train_vae(pipe, images, minutes, ckpt, state):
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    if "vae_opt" in state:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["vae_opt"])
    g = torch.Generator().manual_seed(1 + state.get("vae_step", 0))
    budget = minutes * 60
    elapsed = state.get("vae_elapsed", 0.0)
    step = state.get("vae_step", 0)
    t0, last_save = time.time() - elapsed, time.time()
    bar = tqdm(desc="vae", unit="step")
    while time.time() - t0 < budget:
        idx = torch.randint(0, images.shape[0], (64,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_save > 120:
            state.update(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=step, vae_elapsed=time.time() - t0)
            _save(ckpt, state)
            last_save = time.time()
    bar.close()
    vae.eval().requires_grad_(False)
    state.update(vae=vae.state_dict(), vae_step=step, vae_done=True)
    state.pop("vae_opt", None)
    _save(ckpt, state)


@torch.no_grad()
def encode_latents(pipe, images):
    lat = torch.cat([pipe.vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    shift = lat.mean().item()
    scale = 1.0 / lat.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (lat - shift) * scale


@torch.no_grad()
def encode_prompts(pipe):
    """Embeddings of every phrasing of every digit, and of the empty prompt (dropped condition)."""
    texts = [p for d in range(10) for p in prompts_for(d)] + [""]
    pe, pooled, _ = pipe.encode_prompt(texts, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return pe, pooled


def train_transformer(pipe, latents, labels, minutes, ckpt, state, batch_size=128, lr=5e-4):
    tr = pipe.transformer
    tr.train().requires_grad_(True)
    ema = copy.deepcopy(tr).eval().requires_grad_(False)
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=0.0)
    if "tr" in state:
        tr.load_state_dict(state["tr"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    step = state.get("step", 0)
    elapsed = state.get("elapsed", 0.0)
    pe, pooled = encode_prompts(pipe)
    n_phr = (pe.shape[0] - 1) // 10
    B, C, H, W = latents.shape
    packed = pipe._pack_latents(latents, B, C, H, W)  # (M, 64, 64)
    img_ids = pipe._prepare_latent_image_ids(batch_size, H // 2, W // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(pe.shape[1], 3)
    g = torch.Generator().manual_seed(1000 + step)
    budget = minutes * 60
    t0, last_save = time.time() - elapsed, time.time()
    bar = tqdm(desc="transformer", unit="step", initial=step)
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        cur_lr = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for group in opt.param_groups:
            group["lr"] = cur_lr
        idx = torch.randint(0, packed.shape[0], (batch_size,), generator=g)
        x0 = packed[idx]
        lab = labels[idx]
        phr = lab * n_phr + torch.randint(0, n_phr, (batch_size,), generator=g)
        drop = torch.rand(batch_size, generator=g) < 0.1
        phr = torch.where(drop, torch.full_like(phr, pe.shape[0] - 1), phr)
        u = torch.rand(batch_size, generator=g)
        ln = torch.sigmoid(torch.randn(batch_size, generator=g))
        t = torch.where(torch.rand(batch_size, generator=g) < 0.5, u, ln)
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        pred = tr(
            hidden_states=xt,
            encoder_hidden_states=pe[phr],
            pooled_projections=pooled[phr],
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for pe_, p_ in zip(ema.parameters(), tr.parameters()):
                pe_.lerp_(p_, 1 - d)
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{cur_lr:.1e}")
        if time.time() - last_save > 120:
            state.update(tr=tr.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                         elapsed=time.time() - t0)
            _save(ckpt, state)
            last_save = time.time()
    bar.close()
    state.update(tr=tr.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step, elapsed=time.time() - t0)
    _save(ckpt, state)
    tr.load_state_dict(ema.state_dict())
    tr.eval().requires_grad_(False)
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=70.0, help="wall-clock budget of the transformer phase")
    ap.add_argument("--vae-minutes", type=float, default=4.0, help="wall-clock budget of the VAE phase")
    ap.add_argument("--work", default=".work/train", help="checkpoint folder (resumes from it)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="where the trained pipeline is saved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    ckpt = os.path.join(args.work, "state.pt")
    state = torch.load(ckpt, weights_only=False) if os.path.exists(ckpt) else {}
    torch.manual_seed(args.seed)
    pipe = build_pipeline(seed=args.seed)
    images, labels = load_digit_images(seed=args.seed)
    start = time.time()
    if not state.get("vae_done"):
        train_vae(pipe, images, args.vae_minutes, ckpt, state)
    pipe.vae.load_state_dict(state["vae"])
    latents = encode_latents(pipe, images)
    steps = train_transformer(pipe, latents, labels, args.minutes, ckpt, state)
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out}: {steps} transformer steps; this run {time.time() - start:.0f} s; "
          f"transformer phase {state['elapsed'] / 60:.1f} min in all")


if __name__ == "__main__":
    main()
