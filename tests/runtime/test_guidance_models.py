"""Guidance sharing on every model family of the zoo (FLUX module level, the others submodule
level), in a bare CFG loop with the two cache contexts: with identical branches the difference is
zero, so at a shared step the unconditional output must equal the conditional one; a forecast from
the unconditional branch's own older full steps would not."""
import contextlib

import pytest
import torch

import model_zoo as Z
import svdcache

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 10


@contextlib.contextmanager
def context(model, name):
    """model.cache_context(name), also for classes without diffusers' CacheMixin (SD3, PixArt, DiT:
    their pipelines batch the two branches into one call, where nothing is shared)."""
    if hasattr(model, "cache_context"):
        with model.cache_context(name):
            yield
        return
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(model, None)


@pytest.fixture(scope="module", params=Z.MODEL_NAMES)
def zoo(request):
    return request.param, Z.build(request.param)


@torch.no_grad()
def cfg_loop(name, model, cond_u=None):
    x, cond = Z.make_inputs(name, 1, 0)
    s = Z.sigmas(STEPS)
    pairs = []
    for i in range(STEPS):
        with context(model, "cond"):
            vc = Z.velocity(name, model, x, s[i], cond)
        with context(model, "uncond"):
            vu = Z.velocity(name, model, x, s[i], cond if cond_u is None else cond_u)
        pairs.append((vc, vu))
        x = x + (s[i + 1] - s[i]) * (vu + 2.0 * (vc - vu))
    return x, pairs


@pytest.mark.parametrize("space", ["svd", "full"])
def test_identical_branches_shared_exactly(zoo, space):
    name, model = zoo
    svdcache.enable(model, interval=2, warmup=1, uncond_interval=2, space=space, num_inference_steps=STEPS)
    try:
        _, pairs = cfg_loop(name, model)
        st = svdcache.stats(model).last_generation
    finally:
        svdcache.disable(model)
    assert st.shared_steps >= 2, st
    for vc, vu in pairs:
        assert float((vu - vc).norm() / vc.norm()) < 1e-4


def test_different_branches_stay_close(zoo):
    """Another conditioning for the unconditional branch: the shared run stays within a few times
    the unshared run's error against the uncached loop."""
    name, model = zoo
    _, cond_u = Z.make_inputs(name, 1, 7)
    ref, _ = cfg_loop(name, model, cond_u)
    errs = {}
    for m in (1, 2):
        svdcache.enable(model, interval=2, warmup=1, uncond_interval=m, space="full", num_inference_steps=STEPS)
        try:
            x, _ = cfg_loop(name, model, cond_u)
            assert svdcache.stats(model).last_generation.shared_steps == (0 if m == 1 else 2)
        finally:
            svdcache.disable(model)
        assert torch.isfinite(x).all()
        errs[m] = float((x - ref).norm() / ref.norm())
    assert errs[2] < 3 * errs[1] + 1e-3, errs
