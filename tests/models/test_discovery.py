"""Discovery beyond diffusers' identifiers: a user's blocks= / streams=, the one warning naming the
lists left uncached, stream mapping read from the output (Bria returns (encoder, hidden)), a clear
error for a wrong spec, and that submodule-level forecasts carry the signal (a zero forecast is far
worse)."""
from __future__ import annotations

import warnings

import pytest
import torch

import svdcache
import zoo_all as Z
import zoo_check as C

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_user_blocks_cache_only_those_and_name_the_rest_once():
    name = "FluxTransformer2DModel"
    model = Z.build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svdcache.enable(model, blocks=["transformer_blocks"], interval=3, warmup=2, online_steps=2,
                        num_inference_steps=C.STEPS)
    uncached = [str(w.message) for w in caught if "left uncached" in str(w.message)]
    assert len(uncached) == 1 and "single_transformer_blocks" in uncached[0]
    plan = svdcache.adapters.last_plan(model)
    assert plan.cached_lists == ["transformer_blocks"]
    assert list(plan.uncached_lists) == ["single_transformer_blocks"]
    lists = C.block_lists(model)
    counts, _ = C._counted_run(name, model, lists, C.STEPS, 0, Z.inputs(name))
    cached = [2, 3, 5]
    assert svdcache.stats(model).last_generation.cached_steps == len(cached)
    for i in cached:
        assert not any(p.startswith("transformer_blocks.") for p in counts[i])  # skipped
        assert any(p.startswith("single_transformer_blocks.") for p in counts[i])  # computed
    svdcache.disable(model)


def test_wrong_block_path_is_one_clear_error():
    model = Z.build("WanTransformer3DModel")
    with pytest.raises(ValueError, match="has no submodule 'no_such_blocks'"):
        svdcache.enable(model, blocks=["no_such_blocks"])
    assert not svdcache.is_enabled(model)


def test_streams_under_another_name_at_block_level():
    """Z-Image's blocks take ``x``: found by itself, and by a user's streams={"hidden": "x"}."""
    name = "ZImageTransformer2DModel"
    for streams in (None, {"hidden": "x"}):
        r = C.check(name, granularity="block") if streams is None else None
        if r is not None:
            assert r.ok, r.detail
            continue
        model = Z.build(name)
        svdcache.enable(model, granularity="block", streams=streams, interval=3, warmup=2, online_steps=2,
                        num_inference_steps=C.STEPS)
        outs = C.denoise(name, model, C.STEPS)
        assert svdcache.stats(model).last_generation.cached_steps == 3
        assert all(torch.isfinite(t).all() for o in outs for t in o)
        adapter = svdcache.adapters.last_plan(model).blocks[-1][2]
        assert any(m == [(0, "hidden", "x")] for _, _, m in adapter.layouts.values())
        svdcache.disable(model)
    model = Z.build(name)
    svdcache.enable(model, granularity="block", streams={"hidden": "hidden_states"}, num_inference_steps=C.STEPS)
    with pytest.raises(ValueError, match="without the tensor argument"):
        C.denoise(name, model, 1)
    svdcache.disable(model)


def test_stream_mapping_is_read_from_the_output():
    """diffusers' registry gives BriaTransformerBlock (hidden 0, encoder None); it returns
    (encoder, hidden): the mapping comes from the first full step's output shapes."""
    name = "BriaTransformer2DModel"
    model = Z.build(name)
    svdcache.enable(model, granularity="block", interval=3, warmup=2, online_steps=2, num_inference_steps=C.STEPS)
    C.denoise(name, model, C.STEPS)
    plan = svdcache.adapters.last_plan(model)
    double = next(a for n, b, a in plan.blocks if n.startswith("transformer_blocks."))
    block = model.transformer_blocks[0]
    kind, n, mapping = double.layouts[id(block)]
    assert sorted(mapping) == [(0, "encoder", "encoder_hidden_states"), (1, "hidden", "hidden_states")]
    svdcache.disable(model)


@pytest.mark.parametrize("name", ["SD3Transformer2DModel", "WanTransformer3DModel", "LTX2VideoTransformer3DModel"])
def test_submodule_forecasts_carry_the_signal(name, monkeypatch):
    """Cached outputs at submodule level: their error is well below that of a forecast of zeros
    (attention / feed-forward contributions dropped on cached steps), so the forecasts are used."""
    from svdcache.hooks.root import SVDCacheHook

    model = Z.build(name)
    inputs = Z.inputs(name)
    ref = C.denoise(name, model, C.STEPS, inputs=inputs)

    def err():
        svdcache.enable(model, interval=3, warmup=2, online_steps=2, num_inference_steps=C.STEPS)
        outs = C.denoise(name, model, C.STEPS, inputs=inputs)
        assert svdcache.adapters.last_plan(model).granularity == "submodule"
        assert svdcache.stats(model).last_generation.cached_steps == 3
        svdcache.disable(model)
        num = sum(float((a - r).norm()) ** 2 for o, ro in zip(outs, ref) for a, r in zip(o, ro))
        den = sum(float(r.norm()) ** 2 for ro in ref for r in ro)
        return (num / den) ** 0.5

    good = err()
    real = SVDCacheHook.forecast

    def zeros(self, feature, **kw):
        out = real(self, feature, **kw)
        return None if out is None else torch.zeros_like(out)

    monkeypatch.setattr(SVDCacheHook, "forecast", zeros)
    bad = err()
    assert good < 0.5 * bad, (good, bad)


def test_calibrated_submodule_basis_and_its_fitted_gains():
    """A basis calibrated at submodule level: enable picks that granularity from it, the features
    learned on the first full step take their bases and fitted gains from it."""
    name = "WanTransformer3DModel"
    model = Z.build(name)
    basis = svdcache.calibrate(model, run=lambda: C.denoise(name, model, C.STEPS, seed=7), progress=False)
    assert basis.meta["granularity"] == "submodule"
    key = "change/o1_N3_w3"  # calibrate fits gains for its gain_warmup (3)
    assert all(key in g for g in basis.meta["gains"].values()), list(next(iter(basis.meta["gains"].values())))
    svdcache.enable(model, basis=basis, interval=3, warmup=3, fitted_gains=True, num_inference_steps=C.STEPS,
                    schedule="uniform")
    C.denoise(name, model, C.STEPS)
    hook = svdcache.hooks.registry.root_of(model)
    assert set(hook.feature_dims) == set(basis.features)
    assert hook.store.gains == {n: g[key] for n, g in basis.meta["gains"].items()}
    assert svdcache.stats(model).last_generation.cached_steps == 2
    svdcache.disable(model)


def test_calibrate_with_user_blocks():
    name = "FluxTransformer2DModel"
    model = Z.build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        basis = svdcache.calibrate(model, run=lambda: C.denoise(name, model, C.STEPS, seed=7), progress=False,
                                   blocks=["single_transformer_blocks"], fit_gain_rows=0)
        assert basis.features and all(n.startswith("single_transformer_blocks.") for n in basis.features)
        svdcache.enable(model, basis=basis, blocks=["single_transformer_blocks"], interval=3, warmup=2,
                        num_inference_steps=C.STEPS)
    C.denoise(name, model, C.STEPS)
    assert svdcache.stats(model).last_generation.cached_steps == 3
    svdcache.disable(model)


def test_an_old_auto_basis_of_block_features_keeps_block_level():
    """Basis files written before the submodule level said granularity "auto" for block-level
    features: enable(granularity="auto") with one stays at block level."""
    name = "WanTransformer3DModel"
    model = Z.build(name)
    basis = svdcache.calibrate(model, run=lambda: C.denoise(name, model, C.STEPS, seed=7), progress=False,
                               granularity="block", fit_gain_rows=0)
    assert all(n.endswith((".hidden", ".encoder")) for n in basis.features)
    basis.meta["granularity"] = "auto"  # as older files recorded it
    svdcache.enable(model, basis=basis, interval=3, warmup=2, num_inference_steps=C.STEPS)
    assert svdcache.adapters.last_plan(model).granularity == "block"
    C.denoise(name, model, C.STEPS)
    assert svdcache.stats(model).last_generation.cached_steps == 3
    svdcache.disable(model)
