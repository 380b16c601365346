"""Train the embedded miniature Wan video transformer on moving digits (CPU, resumable, seeded).

    OMP_NUM_THREADS=1 python -m svdcache.embedded.video_train --minutes 45 --work .work/video_train --threads 1

Rectified flow as Wan / FLUX sample it: x_t = (1 - t) x0 + t eps, target eps - x0, the transformer's
timestep 1000 t (t half uniform, half logit-normal); 10% of the prompts dropped to the empty prompt
(classifier-free guidance). Every step draws a fresh batch of clips from video_data.make_clips with a
seed derived from (seed, step), so a resumed run sees the same data as an uninterrupted one.
Checkpoints go to --work every two minutes; rerunning the command resumes. The EMA weights are
written with ``save_pretrained`` (safetensors) to --out, with train_log.json (steps, minutes, loss).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from .video import VIDEO_DIR, build_transformer
from .video_data import DIRECTIONS, digit_images, encode_prompts, make_clips, prompt_for


def _save(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(minutes, work, out, seed=0, batch_size=32, lr=1e-3, log_every=50):
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, "state.pt")
    state = torch.load(ckpt, weights_only=False) if os.path.exists(ckpt) else {}
    tr = build_transformer(seed)
    tr.train().requires_grad_(True)
    ema = copy.deepcopy(tr).eval().requires_grad_(False)
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=0.0)
    if "tr" in state:
        tr.load_state_dict(state["tr"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    step = state.get("step", 0)
    elapsed = state.get("elapsed", 0.0)
    losses = state.get("losses", [])  # (step, mean loss over the last log_every steps)
    images = digit_images()
    # every (digit, direction) prompt, then the empty prompt
    table = encode_prompts([prompt_for(d, k) for d in range(10) for k in range(len(DIRECTIONS))] + [""])
    empty = table.shape[0] - 1
    budget = minutes * 60
    t0, last_save = time.time() - elapsed, time.time()
    acc = []
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        cur_lr = lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = cur_lr
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x0, lab, dirs = make_clips(batch_size, seed=seed * 1_000_003 + step + 7_000_000, images=images)
        pid = lab * len(DIRECTIONS) + dirs
        drop = torch.rand(batch_size, generator=g) < 0.1
        pid = torch.where(drop, torch.full_like(pid, empty), pid)
        u = torch.rand(batch_size, generator=g)
        ln = torch.sigmoid(torch.randn(batch_size, generator=g))
        t = torch.where(torch.rand(batch_size, generator=g) < 0.5, u, ln)
        eps = torch.randn(x0.shape, generator=g)
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * eps
        pred = tr(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=table[pid], return_dict=False)[0]
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.998, (1 + step) / (10 + step))
            for pe_, p_ in zip(ema.parameters(), tr.parameters()):
                pe_.lerp_(p_, 1 - d)
        step += 1
        acc.append(loss.item())
        if len(acc) == log_every:
            losses.append((step, sum(acc) / len(acc)))
            print(f"step {step} loss {losses[-1][1]:.4f} lr {cur_lr:.2e} {(time.time() - t0) / 60:.1f} min", flush=True)
            acc = []
        if time.time() - last_save > 120:
            state.update(tr=tr.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                         elapsed=time.time() - t0, losses=losses)
            _save(ckpt, state)
            last_save = time.time()
    state.update(tr=tr.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step, elapsed=time.time() - t0,
                 losses=losses)
    _save(ckpt, state)
    ema.save_pretrained(out, safe_serialization=True)
    log = dict(steps=step, minutes=state["elapsed"] / 60, batch_size=batch_size, lr=lr, seed=seed,
               threads=torch.get_num_threads(), final_loss=losses[-1][1] if losses else None,
               loss_curve=losses[:: max(1, len(losses) // 40)] + losses[-1:])
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    return log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget (all runs together)")
    ap.add_argument("--work", default=".work/video_train", help="checkpoint folder (resumes from it)")
    ap.add_argument("--out", default=VIDEO_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = train(args.minutes, args.work, args.out, args.seed, args.batch_size, args.lr)
    print(f"saved {args.out}: {log['steps']} steps, {log['minutes']:.1f} min, final loss {log['final_loss']}")


if __name__ == "__main__":
    main()
