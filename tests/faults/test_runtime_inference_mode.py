"""Generation under ``torch.inference_mode()`` (issue 29): the same images as under ``torch.no_grad()`` on
every path (FLUX module level with its whole-stack sum and per block, submodule level, block level), and
mixing the two modes across generations, models and a bare loop's steps works; the kernels' plans share
their scratch buffers between modes."""
import pytest
import torch

import svdcache
from svdcache.embedded import load_basis

from test_runtime_faults import Loop, _psnr, _sigmas

CACHE_KW = dict(interval=2, warmup=2)  # the fault suite's (conftest.py)

PATHS = {
    # (granularity, basis, fast paths): the module level's whole-stack sum and its per-block path (gates
    # per block), the submodule and block levels (zero-setup basis: built under the first mode used)
    "module, whole stack": ("module", True, "auto"),
    "module, per block": ("module", True, {"deferred_sum": "off"}),
    "submodule": ("submodule", False, "auto"),
    "block": ("block", False, "auto"),
}


def _gen(emb, mode, pipe=None):
    with mode():
        g = torch.Generator().manual_seed(0)
        return (pipe or emb.pipe)(num_inference_steps=emb.steps, generator=g, output_type="latent",
                                  **emb.embeds, **emb.kw).images


def _enable(pipe, path):
    gran, calibrated, fp = PATHS[path]
    svdcache.enable(pipe, basis=load_basis() if calibrated else None, granularity=gran, fast_paths=fp, **CACHE_KW)


@pytest.fixture
def other_pipe():
    """A second embedded pipeline (another transformer, the same process and thread)."""
    from svdcache.embedded import load_pipeline

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    svdcache.disable(pipe)


@pytest.mark.parametrize("path", list(PATHS))
def test_inference_mode_gives_the_no_grad_images(emb, path):
    try:
        _enable(emb.pipe, path)
        ref = [_gen(emb, torch.no_grad), _gen(emb, torch.no_grad)]  # (a zero-setup basis: built by the first)
        _enable(emb.pipe, path)  # a fresh cache, first used under inference_mode
        got = [_gen(emb, torch.inference_mode), _gen(emb, torch.no_grad), _gen(emb, torch.inference_mode)]
        assert svdcache.stats(emb.pipe).last_generation.cached_steps > 0
    finally:
        svdcache.disable(emb.pipe)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[1])


@pytest.mark.parametrize("path", ["module, whole stack", "module, per block", "submodule"])
def test_another_model_after_inference_mode(emb, other_pipe, path):
    """Buffers made by one model's generation under inference_mode (the kernels' plans share them per
    thread) are written by another model's generation under no_grad."""
    _enable(other_pipe, path)
    ref = [_gen(emb, torch.no_grad, other_pipe), _gen(emb, torch.no_grad, other_pipe)]
    svdcache.disable(other_pipe)
    try:
        _enable(emb.pipe, path)
        _gen(emb, torch.inference_mode)
        _gen(emb, torch.inference_mode)
        _enable(other_pipe, path)
        got = [_gen(emb, torch.no_grad, other_pipe), _gen(emb, torch.no_grad, other_pipe)]
    finally:
        svdcache.disable(emb.pipe)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_bare_loop_switching_mode_mid_generation(emb):
    """A bare loop whose steps change mode: its state starts over at the switch (a full step), no error,
    and the image within 1 dB (PSNR) of the loop's under one mode."""
    lp = Loop(emb)
    sig, x = _sigmas(1.0, 12), lp.noise(3)

    def run(modes):
        h = x.clone()
        for i in range(12):
            with modes(i)():
                v = lp.tr(hidden_states=h, encoder_hidden_states=lp.e, pooled_projections=lp.p,
                          timestep=torch.full((1,), sig[i]), img_ids=lp.img_ids, txt_ids=lp.txt_ids,
                          return_dict=False)[0]
            h = h + (sig[i + 1] - sig[i]) * v
        return h

    ref = run(lambda i: torch.no_grad)
    try:
        svdcache.enable(lp.tr, basis=load_basis(), **CACHE_KW)
        one = run(lambda i: torch.no_grad)
        svdcache.reset(lp.tr)
        mixed = run(lambda i: torch.inference_mode if i < 7 else torch.no_grad)
        st = svdcache.stats(lp.tr).last_generation
    finally:
        svdcache.disable(lp.tr)
    # the switch starts the context over (as a shape change does): from step 7 on, warm-up then cached steps
    assert st.full_steps + st.cached_steps == 5 and st.cached_steps > 0
    assert _psnr(mixed, ref) >= _psnr(one, ref) - 1.0


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_plan_scratch_across_modes(first):
    """The kernels' plans share one scratch buffer per shape: made under one mode, written under the other."""
    from svdcache_kernels.plan import ReconstructPlan, SplitPlan

    g = torch.Generator().manual_seed(0)
    B, N, D, k = 2, 8, 16, 3
    V = torch.linalg.qr(torch.randn(D, k, generator=g))[0].contiguous()
    F, Fp = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    R, x, gate = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g)
    T = torch.randn(B, N, k, generator=g)
    want_r = x + gate.unsqueeze(1) * (R + 0.5 * T @ V.t())
    want_d1 = (F - Fp).reshape(-1, D) @ V / 0.25
    modes = [torch.inference_mode, torch.no_grad] if first == "inference_mode" else [torch.no_grad, torch.inference_mode]
    for mode in modes + modes:
        with mode():
            D1 = torch.zeros(B, N, k)
            SplitPlan(F, V, D1=D1, order=1, h1=0.25, F_prev=Fp)(F, V, D1=D1, h1=0.25, F_prev=Fp)
            out = torch.empty(B, N, D)
            plan = ReconstructPlan(V, R, terms=(T,), weights=(0.5,), x=x, gate=gate, out=out)
            plan(V, R, (T,), (0.5,), x=x, gate=gate, out=out)
        torch.testing.assert_close(D1.reshape(-1, k), want_d1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, want_r, rtol=1e-5, atol=1e-5)
