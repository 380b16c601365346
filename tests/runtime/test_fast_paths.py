"""Every fast path can be switched off (``SVDCacheConfig.fast_paths``) and gives what the per-feature path
gives. Each path is forced on or off on small shapes, so the path a GPU takes at FLUX.1-dev scale (streams
too large for arenas, bf16 features the batched update leaves alone: per-feature sums and updates) runs
here as well as the one small fp32 features take."""
import pytest
import torch

import svdcache
import svdcache.fastpath.batched_update as bu
import svdcache.fastpath.deferred as deferred

from flux_helpers import FluxLoop, random_module_basis, tiny_flux


@pytest.fixture(scope="module")
def model():
    return tiny_flux(num_single_layers=3)


@pytest.fixture(scope="module")
def basis(model):
    return random_module_basis(model, seed=1, k=4)


@pytest.fixture(autouse=True)
def _clean(model):
    svdcache.disable(model)
    yield
    svdcache.disable(model)


@pytest.fixture
def spies(monkeypatch):
    """Counts of what ran: deferred sums, stacked (arena) groups, batched full-step updates."""
    n = {"sum": 0, "stacked": 0, "batched": 0}
    real_flush, real_stack, real_batched = deferred.DeferredSum.flush, deferred._stack_groups, bu._batched

    def flush(self, *a, **k):
        n["sum"] += 1
        return real_flush(self, *a, **k)

    def stack(*a, **k):
        out = real_stack(*a, **k)
        n["stacked"] += len(out)
        return out

    def batched(*a, **k):
        ok = real_batched(*a, **k)
        n["batched"] += bool(ok)
        return ok

    monkeypatch.setattr(deferred.DeferredSum, "flush", flush)
    monkeypatch.setattr(deferred, "_stack_groups", stack)
    monkeypatch.setattr(bu, "_batched", batched)
    return n


def _run(model, basis, dtype, steps=14, **kw):
    loop = FluxLoop(model, batch=2)
    loop.e, loop.p = loop.e.to(dtype), loop.p.to(dtype)
    m = model.to(dtype)
    svdcache.enable(m, basis=basis, interval=3, warmup=2, **kw)
    h = loop.x.clone().to(dtype)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            v = loop.call(h, 1.0 - i / steps)
            outs.append(v.float().clone())
            h = h - v / steps
    g = svdcache.stats(m).last_generation
    svdcache.disable(m)
    model.to(torch.float32)
    return outs, g


PATHS = ("deferred_sum", "arenas", "batched_update")
# each path switched off alone from all on (what runs on small fp32 features), plus every path off
COMBOS = [("on", "on", "auto"), ("on", "off", "auto"), ("on", "on", "off"), ("off", "on", "auto")]


@pytest.mark.parametrize("residual", ["int4", "reuse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_fast_path_combination_equals_the_per_feature_path(model, basis, spies, residual, dtype):
    off = dict.fromkeys(PATHS, "off")
    ref, g_ref = _run(model, basis, dtype, residual=residual, fast_paths=off)
    assert spies == {"sum": 0, "stacked": 0, "batched": 0}  # nothing fast ran with every path off
    assert g_ref.cached_steps >= 6 and g_ref.fallbacks == 0
    # int4: the summation order may flip a 4-bit code at the next full step (one quantization step, ~1e-5 of
    # the scale here; a missing or stale term would be ~1e-1); bf16 rounds each path's sums differently
    tol = {torch.float32: 1e-3 if residual == "int4" else 1e-5, torch.bfloat16: 3e-2}[dtype]
    for combo in COMBOS:
        fp = dict(zip(PATHS, combo))
        for k in spies:
            spies[k] = 0
        outs, g = _run(model, basis, dtype, residual=residual, fast_paths=fp)
        assert g.cached_steps == g_ref.cached_steps and g.full_steps == g_ref.full_steps and g.fallbacks == 0, fp
        assert g.flops_uncached == g_ref.flops_uncached and g.cache_bytes == g_ref.cache_bytes, fp
        for a, b in zip(outs, ref):
            assert float((a - b).abs().max()) <= tol * float(b.abs().max()), fp
        # the switches are what decides: a path switched on ran, one switched off did not
        assert (spies["sum"] > 0) == (fp["deferred_sum"] == "on"), (fp, spies)
        stacked = fp["deferred_sum"] == "on" and fp["arenas"] == "on"
        assert (spies["stacked"] > 0) == stacked, (fp, spies)
        # the batched update needs the arenas, and fp32 features (16-bit ones go one by one)
        batched = stacked and fp["batched_update"] == "auto" and dtype == torch.float32
        assert (spies["batched"] > 0) == batched, (fp, spies)


def test_arenas_auto_follow_the_stream_size(model, basis, spies, monkeypatch):
    """``arenas="auto"`` stacks small streams only (the default at FLUX.1-dev scale is per feature): the
    threshold, lowered below this model's stream, turns them off as a large stream would."""
    from svdcache_kernels.ops.reconstruct_sum import reference as sum_ref

    _run(model, basis, torch.float32)
    assert spies["stacked"] > 0
    spies["stacked"] = 0
    monkeypatch.setattr(sum_ref, "STACK_ELEMS", 0)
    _run(model, basis, torch.float32)
    assert spies["stacked"] == 0 and spies["sum"] > 0


def test_bad_fast_path_settings_are_refused():
    for bad in ({"arenas": "yes"}, {"stacking": "on"}, "fast", {"batched_update": "on"}):
        with pytest.raises(ValueError, match="fast_paths"):
            svdcache.SVDCacheConfig(fast_paths=bad)
