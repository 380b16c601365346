"""The shipped miniature Wan video model: loads offline, runs its CFG loop under SVD-Cache at the
submodule level, skips the heavy submodules on cached steps, and interval 1 is the uncached output."""
import os

import pytest
import torch

import svdcache
from svdcache.embedded.video import (VIDEO_BASIS_PATH, VIDEO_BLOCK_BASIS_PATH, VIDEO_DIR, VIDEO_GUIDANCE,
                                     calibration_set, eval_set, load_video_basis, load_video_pipeline)
from svdcache.embedded.video_data import FRAME, FRAMES, encode_prompts, make_clips

STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return load_video_pipeline()


def _generate(pipe, prompts, seeds, steps=STEPS):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, generator=gens, **VIDEO_GUIDANCE).videos


def test_data_is_deterministic_and_moves():
    a, la, da = make_clips(16, seed=5)
    b, lb, db = make_clips(16, seed=5)
    assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(da, db)
    assert a.shape == (16, 1, FRAMES, FRAME, FRAME) and a.min() >= -1 and a.max() <= 1
    c, _, _ = make_clips(16, seed=6)
    assert not torch.equal(a, c)
    # each clip moves: consecutive frames differ, the digit's mass is kept (it stays in the frame)
    m = (a + 1) / 2
    assert ((m[:, :, 1:] - m[:, :, :-1]).abs().flatten(2).sum(2) > 0).all()
    mass = m.sum((1, 3, 4))
    assert torch.allclose(mass, mass[:, :1].expand_as(mass), rtol=1e-5)
    assert torch.equal(encode_prompts(["seven moving left"]), encode_prompts("seven moving left"))
    assert encode_prompts([""]).shape == encode_prompts(["one moving up"]).shape


def test_shipped_folder_is_small_safetensors_and_loads_offline(pipe):
    total = 0
    for f in os.listdir(VIDEO_DIR):
        assert not f.endswith((".bin", ".pt", ".ckpt")), f
        total += os.path.getsize(os.path.join(VIDEO_DIR, f))
    assert total <= 20 * 2**20, total
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert os.path.exists(VIDEO_BASIS_PATH) and os.path.exists(VIDEO_BLOCK_BASIS_PATH)
    basis = load_video_basis()
    assert basis.meta["granularity"] == "submodule"
    # calibrated on held-out pairs and seeds, never on the evaluated ones
    ev_p, ev_s = eval_set(1)
    cal_p, cal_s = calibration_set()
    assert not set(ev_p) & set(cal_p) and not set(ev_s) & set(cal_s)


def test_generation_is_deterministic_in_the_seed(pipe):
    prompts, seeds = eval_set(1)
    a = _generate(pipe, prompts[:2], seeds[:2])
    assert a.shape == (2, 1, FRAMES, FRAME, FRAME) and torch.isfinite(a).all()
    assert torch.equal(a, _generate(pipe, prompts[:2], seeds[:2]))


def _count_heavy_calls(tr):
    """Calls that actually ran inside the blocks' attention / feed-forward submodules."""
    counts = {"n": 0}
    handles = []
    for blk in tr.blocks:
        for lin in (blk.attn1.to_q, blk.attn2.to_q, blk.ffn.net[2]):
            handles.append(lin.register_forward_hook(lambda *a: counts.__setitem__("n", counts["n"] + 1)))
    return counts, handles


def test_submodule_cache_skips_heavy_submodules_on_cached_steps(pipe):
    prompts, seeds = eval_set(1)
    prompts, seeds = prompts[:2], seeds[:2]
    tr = pipe.transformer
    counts, handles = _count_heavy_calls(tr)
    try:
        ref = _generate(pipe, prompts, seeds)
        n_ref = counts["n"]
        assert n_ref == STEPS * 2 * 3 * len(tr.blocks)  # cond + uncond, 3 heavy submodules per block
        svdcache.enable(pipe, basis=load_video_basis(), interval=3, granularity="submodule")
        try:
            counts["n"] = 0
            out = _generate(pipe, prompts, seeds)
            st = svdcache.stats(pipe).last_generation
            plan = svdcache.adapters.last_plan(tr)
        finally:
            svdcache.disable(pipe)
    finally:
        for h in handles:
            h.remove()
    assert plan.granularity == "submodule"
    assert st.cached_steps >= 1 and st.full_steps >= 1
    # every cached call skips all of its heavy submodules
    assert counts["n"] == st.full_steps * 3 * len(tr.blocks)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    # close to the uncached video, not equal (6 steps with cached ones in between: a coarse forecast)
    from svdcache.metrics import psnr

    assert psnr(out, ref).min() > 15, psnr(out, ref)


def test_interval_1_reproduces_the_uncached_output(pipe):
    prompts, seeds = eval_set(1)
    ref = _generate(pipe, prompts[:2], seeds[:2])
    # uncond_interval=1 too: the default (2) still forecasts the unconditional branch at every 2nd
    # full step when interval is 1 (svdcache.runtime.guidance)
    svdcache.enable(pipe, basis=load_video_basis(), interval=1, uncond_interval=1, granularity="submodule")
    try:
        out = _generate(pipe, prompts[:2], seeds[:2])
        st = svdcache.stats(pipe).last_generation
    finally:
        svdcache.disable(pipe)
    assert st.cached_steps == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
