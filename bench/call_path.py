#!/usr/bin/env python
"""The path of one cached call through the runtime: how many of svdcache's functions it runs, how often
it hops from one svdcache module to another, and which modules it passes through.

    python bench/call_path.py            # a tiny FLUX (module level) and a tiny SD3 (submodule level)

Each model is enabled with a random basis (built online), run to its third cached call of a generation
(a steady cached call), and that call is traced with ``sys.setprofile``: a hop is a Python call whose
caller and callee are in different modules of svdcache (calls into torch / diffusers and back are not
counted; a call from svdcache into another svdcache module through a library frame counts once).
Run it on two checkouts to compare layouts (the numbers depend on the code, not on the machine).
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import svdcache  # noqa: E402

PKG = os.path.join(ROOT, "svdcache") + os.sep


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                               axes_dims_rope=(4, 6, 6)).eval()
    B, N, L = 1, 16, 8

    def call(x, t):
        return m(hidden_states=x, encoder_hidden_states=torch.ones(B, L, 32), pooled_projections=torch.ones(B, 16),
                 timestep=torch.full((B,), t), img_ids=torch.zeros(N, 3), txt_ids=torch.zeros(L, 3),
                 return_dict=False)[0]
    return m, call, torch.randn(B, N, 16)


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=32,
                              pooled_projection_dim=16, out_channels=4).eval()

    def call(x, t):
        return m(hidden_states=x, encoder_hidden_states=torch.ones(1, 8, 32), pooled_projections=torch.ones(1, 16),
                 timestep=torch.full((1,), t * 1000), return_dict=False)[0]
    return m, call, torch.randn(1, 4, 8, 8)


def trace_cached_call(model, call, x, steps=12):
    svdcache.enable(model, interval=4, warmup=1, uncond_interval=1)
    cached_seen = 0
    res = None
    with torch.no_grad():
        for i in range(steps):
            t = 1.0 - i / steps
            before = svdcache.stats(model).total.cached_steps
            if cached_seen == 2:  # the next cached call is traced
                calls, hops, mods = 0, 0, []
                stack: list = []

                def prof(frame, event, arg):
                    nonlocal calls, hops
                    if event == "call":
                        f = frame.f_code.co_filename
                        ours = f.startswith(PKG)
                        mod = os.path.relpath(f, ROOT) if ours else None
                        if ours:
                            calls += 1
                            last = next((m for m in reversed(stack) if m is not None), None)
                            if last is not None and last != mod:
                                hops += 1
                            if mod not in mods:
                                mods.append(mod)
                        stack.append(mod)
                    elif event == "return" and stack:
                        stack.pop()

                sys.setprofile(prof)
                out = call(x, t)
                sys.setprofile(None)
                if svdcache.stats(model).total.cached_steps > before:
                    res = (calls, hops, mods)
                    break
            else:
                out = call(x, t)
            if svdcache.stats(model).total.cached_steps > before:
                cached_seen += 1
            x = x - out / steps
    svdcache.disable(model)
    return res


def main():
    torch.set_num_threads(1)
    print("| model | svdcache calls | module hops | modules |\n|---|---|---|---|")
    for name, make in (("FLUX (module level)", _flux), ("SD3 (submodule level)", _sd3)):
        m, call, x = make()
        res = trace_cached_call(m, call, x)
        if res is None:
            print(f"| {name} | no cached call | | |")
            continue
        calls, hops, mods = res
        print(f"| {name} | {calls} | {hops} | {len(mods)}: {', '.join(mods)} |")


if __name__ == "__main__":
    main()
