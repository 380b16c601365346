"""A hand-written loop with classifier-free guidance as two transformer calls per step and no
``cache_context``: the second call of each step (the same latent) is cached apart, as a pipeline's "uncond"
context is, never mixed into the first call's history."""
import pytest
import torch

import svdcache

from flux_helpers import tiny_flux

STEPS = 12


@pytest.fixture(scope="module")
def model():
    return tiny_flux()


@pytest.fixture(autouse=True)
def _clean(model):
    svdcache.disable(model)
    yield
    svdcache.disable(model)


def _loop(model, contexts: bool, in_place: bool = False, cfg: bool = True, same_tensor: bool = True):
    g = torch.Generator().manual_seed(3)
    B, N, L = 1, 32, 8
    x = torch.randn(B, N, 16, generator=g)
    cond, uncond = torch.randn(B, L, 32, generator=g), torch.zeros(B, L, 32)
    pooled_c, pooled_u = torch.randn(B, 16, generator=g), torch.zeros(B, 16)
    ids, tids = torch.zeros(N, 3), torch.zeros(L, 3)

    def call(h, t, e, p, ctx):
        kw = dict(hidden_states=h, encoder_hidden_states=e, pooled_projections=p, timestep=torch.full((B,), t),
                  img_ids=ids, txt_ids=tids, return_dict=False)
        if contexts:
            with model.cache_context(ctx):
                return model(**kw)[0]
        return model(**kw)[0]

    with torch.no_grad():
        for i in range(STEPS):
            t = 1.0 - i / STEPS
            vc = call(x, t, cond, pooled_c, "cond")
            if cfg:
                vu = call(x if same_tensor else x.clone(), t, uncond, pooled_u, "uncond")
                v = vu + 2.0 * (vc - vu)
            else:
                v = vc
            if in_place:
                x.sub_(v / STEPS)
            else:
                x = x - v / STEPS
    return x


@pytest.mark.parametrize("same_tensor", [True, False], ids=["same-latent-tensor", "a-copy-of-the-latent"])
def test_two_calls_per_step_without_contexts_equal_the_contexts_run(model, same_tensor):
    svdcache.enable(model, interval=3, warmup=1)
    ref = _loop(model, contexts=True)
    g_ref = svdcache.stats(model).last_generation
    svdcache.enable(model, interval=3, warmup=1)
    got = _loop(model, contexts=False, same_tensor=same_tensor)
    g = svdcache.stats(model).last_generation
    assert g.cached_steps == g_ref.cached_steps > 0 and g.full_steps == g_ref.full_steps  # cached, per branch
    assert torch.equal(got, ref)
    assert svdcache.stats(model).generations == 1  # one generation, not one per call


def test_one_call_per_step_is_one_branch_even_with_in_place_updates(model):
    """A latent stepped in place (the same tensor at every step, its version moving) is no second branch."""
    svdcache.enable(model, interval=3, warmup=1)
    a = _loop(model, contexts=False, cfg=False, in_place=True)
    ga = svdcache.stats(model).last_generation
    svdcache.enable(model, interval=3, warmup=1)
    b = _loop(model, contexts=False, cfg=False, in_place=False)
    gb = svdcache.stats(model).last_generation
    assert ga.full_steps + ga.cached_steps == STEPS and ga.cached_steps == gb.cached_steps > 0
    assert torch.equal(a, b)
