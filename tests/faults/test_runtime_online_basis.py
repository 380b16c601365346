"""The zero-setup basis (built online from the first full steps) with non-finite features (issue 29): the
steps holding NaN/inf are left out (one warning), the basis is built from finite ones, and the clean
generations after a NaN one give the images of a cache that never saw it."""
import warnings

import pytest
import torch

import svdcache

CACHE_KW = dict(interval=2, warmup=2)  # the fault suite's (conftest.py)


def _gen(emb, latents=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return emb.pipe(num_inference_steps=emb.steps, generator=g, latents=latents, output_type="latent",
                    **emb.embeds, **emb.kw).images


def _nan_latents(emb, where):
    lat = torch.randn(1, 64, emb.pipe.transformer.config.in_channels, generator=torch.Generator().manual_seed(9))
    lat[where] = float("nan")
    return lat


@pytest.mark.parametrize("granularity", ["module", "submodule", "block"])
@pytest.mark.parametrize("subspace", ["change", "feature"])
def test_nan_generation_does_not_poison_the_online_basis(emb, granularity, subspace):
    kw = dict(CACHE_KW, granularity=granularity, subspace=subspace)
    if subspace == "feature":
        kw["residual"] = "reuse"
    try:
        svdcache.enable(emb.pipe, **kw)
        clean = [_gen(emb, seed=1), _gen(emb, seed=2)]  # what a cache that never saw the NaN gives
        svdcache.enable(emb.pipe, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bad = _gen(emb, latents=_nan_latents(emb, (0, 5, 3)))
            first = svdcache.stats(emb.pipe).last_generation
            after = [_gen(emb, seed=1), _gen(emb, seed=2)]
            last = svdcache.stats(emb.pipe).last_generation
    finally:
        svdcache.disable(emb.pipe)
    assert not torch.isfinite(bad).all()  # the model itself gives NaN for a NaN input
    assert first.cached_steps == 0  # no basis from it: every step computed in full
    ours = [str(w.message) for w in caught if "NaN/inf" in str(w.message)]
    assert len(ours) == 1 and "left out of the basis built online" in ours[0], ours
    assert last.cached_steps > 0
    assert torch.equal(after[0], clean[0]) and torch.equal(after[1], clean[1])

