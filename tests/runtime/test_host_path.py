"""The thin host path of a cached FLUX step, and the GPU sync policy simulated on a CPU.

- The buffered cached forwards (gates from the gate rows only, outputs into reused runtime buffers,
  no torch.cat in single blocks) give the same outputs as the plain cached forward they replace
  (full AdaLN modulation, new tensors, cat), including after an in-place weight change (a LoRA fuse).
- On a GPU the timestep is not read when the step count is known, and the finite check moves from
  every cached output to one device-side flag over the states at each full step. ``_device_side`` is
  what decides "a read would sync"; patched to say yes for CPU tensors, the policy runs here.
"""
import contextlib
import warnings

import pytest
import torch

import svdcache
import svdcache.hooks.site as site_mod
import svdcache.runtime.decider as decider_mod
from svdcache.adapters import flux as flux_mod
from svdcache.hooks.root import SVDCacheHook
from svdcache.runtime.decider import StepDecider
from svdcache.runtime.schedule import is_full_step

from flux_helpers import FluxLoop, random_module_basis, tiny_flux


@pytest.fixture(scope="module")
def model():
    """A tiny FLUX transformer (2 double + 2 single blocks, random weights): built in well under a second."""
    return tiny_flux()


@pytest.fixture(autouse=True)
def _clean(model):
    svdcache.disable(model)
    yield
    svdcache.disable(model)


@pytest.fixture(scope="module")
def basis(model):
    """A random orthonormal basis per feature: these tests compare code paths, not fidelity."""
    return random_module_basis(model, seed=0, k=12)


def _plain_double(self, block, args, kwargs, forecast):
    """The cached double block as it was written first: whole modulation, chunks, fresh tensors."""
    a = kwargs
    _, _, g_msa, _, _, g_mlp = flux_mod._gates(block.norm1, a["temb"], 6)
    _, _, c_msa, _, _, c_mlp = flux_mod._gates(block.norm1_context, a["temb"], 6)
    h = forecast("attn.img", x=a["hidden_states"], gate=g_msa.unsqueeze(1))
    h = forecast("ff", x=h, gate=g_mlp.unsqueeze(1), out=h)
    e = forecast("attn.txt", x=a["encoder_hidden_states"], gate=c_msa.unsqueeze(1))
    if e is None:  # the text features hold no state where nothing reads the text stream (unread_features)
        return a["encoder_hidden_states"], h
    e = forecast("ff_context", x=e, gate=c_mlp.unsqueeze(1), out=e)
    return e, h


def _plain_single(self, block, args, kwargs, forecast):
    a = kwargs
    enc = a["encoder_hidden_states"]
    x = torch.cat([enc, a["hidden_states"]], dim=1)
    gate = flux_mod._gates(block.norm, a["temb"], 3)[2]
    x = forecast("proj_out", x=x, gate=gate.unsqueeze(1), out=x)
    return x[:, :enc.shape[1]], x[:, enc.shape[1]:]


def _run_with_lora_fuse(loop, model, steps=10, fuse_at=6):
    """A generation where one block's AdaLN weight changes in place mid-generation."""
    h = loop.x.clone()
    lin = model.transformer_blocks[0].norm1.linear
    for i in range(steps):
        if i == fuse_at:
            with torch.no_grad():
                lin.weight.mul_(1.5)
        h = h - loop.call(h, 1.0 - i / steps) / steps
    with torch.no_grad():
        lin.weight.div_(1.5)
    return h


def _adapters(model):
    from svdcache.adapters import last_plan

    return {id(a): a for _, _, a in last_plan(model).blocks}.values()


def _fast(defer: bool) -> dict:
    """The whole-stack deferred sum on (the fast path) or off (the per-block forecasts it must equal)."""
    return {"deferred_sum": "on" if defer else "off"}


@pytest.mark.parametrize("defer", [True, False], ids=["whole-stack", "per-block"])
@pytest.mark.parametrize("residual", ["reuse", "int4"])
def test_buffered_cached_forward_equals_plain(model, basis, monkeypatch, residual, defer):
    """With residual="int4" the two forwards' gates round differently (gate rows vs the whole
    modulation), so a full-step feature may differ by an ulp and flip a 4-bit code of the residual
    difference: a jump of one quantization step, not a host-path defect (the quantized forecast
    itself is compared with the unfused path in test_residual_fused.py). There the bound is 1e-3 of
    the output's scale (a code flip moves it ~1e-5; stale gates or buffers would move it ~1e-1)."""
    loop = FluxLoop(model, batch=2)
    svdcache.enable(model, basis=basis, interval=3, warmup=2, residual=residual, fast_paths=_fast(defer))
    fast = _run_with_lora_fuse(loop, model)
    g = svdcache.stats(model).last_generation
    assert g.cached_steps >= 4
    hook = model._diffusers_hook.get_hook("svdcache")
    if defer:  # the gates of all blocks in one buffer, the image stream summed into another
        assert hook.store.buffer_keys() == {"flux.gates.all", "flux.sum.img"}
    else:
        assert {"flux.double.img", "flux.single"} <= hook.store.buffer_keys()
        assert "flux.double.txt" not in hook.store.buffer_keys()  # the unread text stream is not forecast (next test)
    svdcache.disable(model)
    monkeypatch.setattr(flux_mod.FluxDoubleBlockAdapter, "cached_forward", _plain_double)
    monkeypatch.setattr(flux_mod.FluxSingleBlockAdapter, "cached_forward", _plain_single)
    svdcache.enable(model, basis=basis, interval=3, warmup=2, residual=residual)
    plain = _run_with_lora_fuse(loop, model)
    if residual == "reuse":
        assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-6), float((fast - plain).abs().max())
    else:
        err = float((fast - plain).abs().max())
        assert err <= 1e-3 * float(plain.abs().max()), err


def _double_adapters(model):
    from svdcache.adapters import last_plan

    return {id(a): a for _, _, a in last_plan(model).blocks if isinstance(a, flux_mod.FluxDoubleBlockAdapter)}.values()


@pytest.mark.parametrize("residual", ["reuse", "int4"])
def test_cached_step_skips_the_text_stream_nothing_reads(model, basis, monkeypatch, residual):
    """FluxTransformer2DModel drops the text stream after its blocks: on a cached call the double
    blocks' text features are not forecast, and every step's output is bitwise the same as with them."""
    loop = FluxLoop(model, batch=2)
    calls = []
    real = SVDCacheHook.forecast
    monkeypatch.setattr(SVDCacheHook, "forecast", lambda self, name, **kw: calls.append(name) or real(self, name, **kw))

    def run():
        calls.clear()
        h, outs = loop.x.clone(), []
        for i in range(10):
            out = loop.call(h, 1.0 - i / 10)
            outs.append(out.clone())
            h = h - out / 10
        return outs, list(calls), svdcache.stats(model).last_generation

    # the per-block path (the whole-stack sum is compared below)
    svdcache.enable(model, basis=basis, interval=3, warmup=2, residual=residual, fast_paths=_fast(False))
    assert all(a.text_unused for a in _double_adapters(model))
    blk = model.transformer_blocks[0]
    assert not hasattr(blk.ff_context.forward, "_svdcache_capture")  # nothing read of it: not captured
    assert isinstance(blk.ff.forward._svdcache_capture, site_mod.CaptureHook)
    skip, names_skip, g_skip = run()
    # the text features captured and held (as before), and forecast
    monkeypatch.setattr(flux_mod.FluxDoubleBlockAdapter, "unread_features", lambda self, block: set())
    svdcache.enable(model, basis=basis, interval=3, warmup=2, residual=residual, fast_paths=_fast(False))
    for a in _double_adapters(model):
        a.text_unused = False
    full, names_full, g_full = run()
    assert g_skip.cache_bytes < g_full.cache_bytes  # the text features held no state
    assert g_skip.cached_steps == g_full.cached_steps >= 4
    text = lambda ns: [n for n in ns if n.endswith((".attn.txt", ".ff_context"))]  # noqa: E731
    assert not text(names_skip) and len(text(names_full)) == 2 * 2 * g_full.cached_steps
    for a, b in zip(skip, full):
        assert torch.equal(a, b)
    assert g_skip.flops < g_full.flops  # the cache's own FLOPs of the skipped forecasts


def _generation(loop, model, steps=10):
    h, outs = loop.x.clone(), []
    for i in range(steps):
        out = loop.call(h, 1.0 - i / steps)
        outs.append(out.clone())
        h = h - out / steps
    return outs, svdcache.stats(model).last_generation


@pytest.mark.parametrize("kw", [dict(residual="int4"), dict(residual="int4", order=1), dict(residual="reuse"),
                                dict(residual="int4", fitted_gains=False, gain=0.8), dict(predictor="ema"),
                                dict(space="full")],
                         ids=["int4", "int4-order1", "reuse", "int4-gain0.8", "ema", "full-space"])
def test_whole_stack_sum_equals_per_block_forecasts(model, basis, monkeypatch, kw):
    """A cached call of the whole stack: the first block computes every gate and defers every image
    feature, the blocks in between return their inputs without entering the adapter, the last one sums
    all forecasts at once (svdcache.fastpath.deferred). Same outputs as the per-block forecasts up to fp32
    summation order, same FLOPs; states of another form (EMA, full space) are forecast one by one."""
    loop = FluxLoop(model, batch=2)
    calls, fcalls = [], []
    for cls in (flux_mod.FluxDoubleBlockAdapter, flux_mod.FluxSingleBlockAdapter):
        real_cf = cls.cached_forward
        monkeypatch.setattr(cls, "cached_forward", lambda self, *a, _r=real_cf, **k: calls.append(1) or _r(self, *a, **k))
    real = SVDCacheHook.forecast
    monkeypatch.setattr(SVDCacheHook, "forecast", lambda self, name, **k: fcalls.append(name) or real(self, name, **k))
    res = {}
    for defer in (True, False):
        svdcache.enable(model, basis=None if kw.get("space") == "full" else basis, interval=3, warmup=2, **kw, fast_paths=_fast(defer))
        calls.clear()
        fcalls.clear()
        outs, g = _generation(loop, model)
        res[defer] = (outs, g, len(calls), len(fcalls))
        svdcache.disable(model)
    (o1, g1, c1, f1), (o2, g2, c2, f2) = res[True], res[False]
    assert g1.cached_steps == g2.cached_steps >= 4 and g1.fallbacks == g2.fallbacks == 0
    # the cached outputs differ in fp32 summation order, so the next full step's features may differ by an
    # ulp and flip a 4-bit code of the residual difference (a jump of one quantization step, ~1e-5 of the
    # scale; a missing or stale term would be ~1e-1): int4 gets the bound of the test above
    tol = 1e-3 if kw.get("residual") == "int4" else 1e-5
    for a, b in zip(o1, o2):
        assert float((a - b).abs().max()) <= tol * float(b.abs().max())
    # the same model FLOPs; the sum's GEMM covers the image rows only (the single blocks' text rows are
    # not formed), so its own FLOPs are at most the per-block forecasts'
    assert g1.flops_uncached == g2.flops_uncached and g1.flops - g1.cache_op_flops == g2.flops - g2.cache_op_flops
    assert g1.cache_op_flops <= g2.cache_op_flops
    n_blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert c1 == 2 * g1.cached_steps  # the first and the last block's adapters only
    assert c2 == n_blocks * g2.cached_steps
    per_call = 2 * len(model.transformer_blocks) + len(model.single_transformer_blocks)  # image features
    if kw.get("predictor") == "ema" or kw.get("space") == "full":
        assert f1 == f2 == per_call * g1.cached_steps  # forecast one by one
    else:
        assert f1 == 0 and f2 == per_call * g2.cached_steps


def test_whole_stack_state_views_are_dropped_at_full_steps(model, basis):
    """The sum's bound views of the states live from the first cached call after a full step to the
    next full step: none is held through a full step (it would keep the old anchors alive)."""
    loop = FluxLoop(model, batch=2)
    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    hook = model._diffusers_hook.get_hook("svdcache")
    h = loop.x.clone()
    seen = []
    for i in range(10):
        before = hook.cur.cached_steps
        out = loop.call(h, 1.0 - i / 10)
        st = hook.state_manager.get_state()
        cached = hook.cur.cached_steps > before
        seen.append(cached)
        assert (st.sum_bound is not None) == cached
        h = h - out / 10
    assert any(seen) and not all(seen)


def test_unsummed_deferred_forecasts_fall_back_to_full_compute(model, basis, monkeypatch):
    """If the forward never reaches the block that sums the deferred terms (here: a last block that does
    leaves a term unsummed), the call is computed in full, warned once, never returned without its terms."""
    loop = FluxLoop(model, batch=2)
    ref = loop.run(10)
    real = flux_mod._StackMixin._deferred_forward

    def no_sum(self, block, a, forecast):
        r = real(self, block, a, forecast)
        if r is not None and id(block) == self.stack.last:
            forecast.controller.deferred_sum.items.append(("x", None, 0))  # as if left unsummed
            return a["encoder_hidden_states"], a["hidden_states"]
        return r

    monkeypatch.setattr(flux_mod._StackMixin, "_deferred_forward", no_sum)
    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    with pytest.warns(UserWarning, match="did not reach the block that sums"):
        out = loop.run(10)
    g = svdcache.stats(model).last_generation
    assert g.fallbacks >= 1 and g.cached_steps == 0
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_text_stream_kept_where_something_may_read_it(model, basis):
    """A subclass (its forward may use the text stream) or a plan without every block keeps it."""
    from diffusers import FluxTransformer2DModel

    with pytest.warns(UserWarning, match="single_transformer_blocks"):
        svdcache.enable(model, basis=basis, blocks=["transformer_blocks"])
    assert not any(a.text_unused for a in _double_adapters(model))
    svdcache.disable(model)

    class MyFlux(FluxTransformer2DModel):
        pass

    torch.manual_seed(0)
    sub = MyFlux(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    svdcache.enable(sub, interval=3)
    assert not any(a.text_unused for a in _double_adapters(sub))
    svdcache.disable(sub)


@pytest.fixture
def gpu_policy(monkeypatch):
    """Treat every tensor as device-side (a host read would sync), and count the timestep reads."""
    monkeypatch.setattr(StepDecider, "device_side", staticmethod(lambda t: isinstance(t, torch.Tensor)))
    reads = []
    real = decider_mod.timestep_value
    monkeypatch.setattr(decider_mod, "timestep_value", lambda t: reads.append(1) or real(t))
    return reads


def test_gpu_policy_no_timestep_read_with_known_step_count(model, basis, gpu_policy):
    loop = FluxLoop(model)
    svdcache.enable(model, basis=basis, interval=3, warmup=2, num_inference_steps=10)
    first = loop.run(10)
    second = loop.run(10)  # a new generation by the step count, not by the timestep going up
    assert not gpu_policy  # no read: no host sync per step
    assert torch.equal(first, second)
    st = svdcache.stats(model)
    assert st.generations == 2 and st.last_generation.cached_steps > 0


def test_gpu_policy_reads_timestep_when_nothing_else_tells(model, basis, gpu_policy):
    loop = FluxLoop(model)
    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    loop.run(10, stop_after=5)
    full = loop.run(10)
    assert len(gpu_policy) == 15  # a bare loop of unknown length: restart detection needs it
    assert svdcache.stats(model).generations == 2
    assert torch.isfinite(full).all()


def test_gpu_policy_state_check_falls_back_before_the_forecast(model, basis, gpu_policy):
    """A non-finite state seen by the device-side flag of the full step: the next (cached) step is
    computed in full, warned once, and no cached output is read back."""
    loop = FluxLoop(model)
    ref = loop.run(10)
    svdcache.enable(model, basis=basis, interval=3, warmup=2, num_inference_steps=10)
    hook = model._diffusers_hook.get_hook("svdcache")
    h = loop.x.clone()
    poisoned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(10):
            st = hook.state_manager.get_state()
            fc = next(iter(st.features.values()), None)
            if not poisoned and fc is not None and fc.n >= 2 and not is_full_step(i, interval=3, warmup=2, num_steps=10):
                # just before the first cached step whose forecast reads D1
                fc.D1.view(-1)[0] = float("nan")
                st.finite_flag = hook.decider.states_finite(st)  # as the full step would have computed it now
                poisoned = True
            h = h - loop.call(h, 1.0 - i / 10) / 10
    assert poisoned
    msgs = [str(w.message) for w in caught if "svdcache" in str(w.message)]
    assert len(msgs) == 1 and "not finite" in msgs[0]
    assert hook.cur.fallbacks == 1
    assert torch.isfinite(h).all()
    assert float((h - ref).norm() / ref.norm()) < 0.2  # a random basis: only a sanity bound


def test_gpu_policy_state_flag_is_computed_at_full_steps(model, basis, gpu_policy, monkeypatch):
    loop = FluxLoop(model)
    svdcache.enable(model, basis=basis, interval=3, warmup=2, num_inference_steps=10)
    calls = []
    real = StepDecider.states_finite
    monkeypatch.setattr(StepDecider, "states_finite", staticmethod(lambda st: calls.append(1) or real(st)))
    loop.run(10)
    g = svdcache.stats(model).last_generation
    assert g.fallbacks == 0 and g.cached_steps > 0
    assert len(calls) == g.full_steps  # once per full step, never on a cached one


def test_whole_stack_leaves_the_block_lists_alone(model, basis, monkeypatch):
    """The blocks between the first and the last of a whole-stack cached call pass their streams through
    (their hooks return the inputs): the model's block lists are never changed, during the call, after it,
    and after a call that raised inside the sum."""
    loop = FluxLoop(model, batch=2)
    lists = (model.transformer_blocks, model.single_transformer_blocks)
    blocks = [list(lst) for lst in lists]
    same = lambda: [list(lst) for lst in lists] == blocks  # noqa: E731
    seen = []
    real = flux_mod._WholeStack.defer_all

    def spy(self, forecast, temb, L):
        real(self, forecast, temb, L)
        seen.append(same())  # while the call runs

    monkeypatch.setattr(flux_mod._WholeStack, "defer_all", spy)
    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    loop.run(10)
    assert seen and all(seen) and same()
    import svdcache.fastpath.deferred as deferred_mod

    def boom(self, hook, x, out=None):
        raise RuntimeError("injected")

    monkeypatch.setattr(deferred_mod.DeferredSum, "flush", boom)
    h = loop.x.clone()
    with pytest.raises(RuntimeError, match="injected"):
        for i in range(10):
            h = h - loop.call(h, 1.0 - i / 10) / 10
    assert same()


def test_whole_stack_keeps_controlnet_residuals(model, basis):
    """ControlNet residuals are added to the image stream between blocks: the bypassed blocks keep the
    lists' lengths and indices, so the sum sees every residual, as the per-block forecasts do."""
    loop = FluxLoop(model, batch=2)
    g = torch.Generator().manual_seed(3)
    D = model.config.num_attention_heads * model.config.attention_head_dim
    cn = [0.1 * torch.randn(2, 64, D, generator=g) for _ in range(2)]
    cn_single = [0.1 * torch.randn(2, 64, D, generator=g)]

    def run():
        h = loop.x.clone()
        for i in range(10):
            out = model(hidden_states=h, encoder_hidden_states=loop.e, pooled_projections=loop.p,
                        timestep=torch.full((2,), 1.0 - i / 10), img_ids=loop.img_ids, txt_ids=loop.txt_ids,
                        controlnet_block_samples=cn, controlnet_single_block_samples=cn_single,
                        return_dict=False)[0]
            h = h - out / 10
        return h, svdcache.stats(model).last_generation

    res = {}
    for defer in (True, False):
        svdcache.enable(model, basis=basis, interval=3, warmup=2, residual="reuse", fast_paths=_fast(defer))
        res[defer] = run()
        svdcache.disable(model)
    (a, ga), (b, gb) = res[True], res[False]
    assert ga.cached_steps == gb.cached_steps >= 4
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_small_feature_states_live_in_one_stacked_tensor(model, basis, monkeypatch):
    """Small features (the dispatch-bound regime): from the first cached call after a full step each
    cache's anchor, D1, D2 and residual codes are views of one stacked tensor per kind (the anchor copied
    in, the model's own feature tensor released: no memory added); later full steps update the group in
    one pass (svdcache.fastpath.batched_update), copying the new features in; the next generation starts over."""
    import gc
    import weakref

    loop = FluxLoop(model, batch=2)
    seen = []  # weak references to the model's own feature tensors, as the block's attention returns them
    spy = model.transformer_blocks[0].attn.register_forward_hook(lambda m, a, out: seen.append(weakref.ref(out[0])))
    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    hook = model._diffusers_hook.get_hook("svdcache")
    h = loop.x.clone()
    views = []
    with torch.no_grad():  # inference: no autograd graph keeps the features alive
        for i in range(10):
            h = h - loop.call(h, 1.0 - i / 10) / 10
            st = hook.state_manager.get_state()
            fcs = [st.features[f"transformer_blocks.{b}.{n}"] for b in range(2) for n in ("attn.img", "ff")]
            if all(fc.R._base is not None and fc.D1._base is not None for fc in fcs):
                for attr in ("R", "D1", "D2", "rq", "rs"):
                    if getattr(fcs[0], attr) is None:  # D2 at order 1, codes before the second full step
                        continue
                    assert len({getattr(fc, attr)._base.data_ptr() for fc in fcs}) == 1, attr
                views.append(i)
    spy.remove()
    gc.collect()
    assert len(seen) == svdcache.stats(model).last_generation.full_steps and views and st.sum_arena
    assert all(r() is None for r in seen[:-1])  # every feature but the last one released
    with torch.no_grad():
        loop.run(10)  # a new generation: new caches, new arenas
    assert not any(fc in hook.state_manager.get_state().features.values() for fc in fcs)


def test_batched_full_step_updates_equal_one_by_one(model, basis, monkeypatch):
    """The arena's full-step update in one pass gives the per-feature updates' states and outputs (the
    same fp32 arithmetic, batched), the same FLOPs and memory; so do full steps whose features are handed
    over by their capture hooks and held by the state's capture plan (no per-feature record call)."""
    import svdcache.fastpath.batched_update as bu
    import svdcache.hooks.root as root_mod
    import svdcache.runtime.store as store_mod

    loop = FluxLoop(model, batch=2)
    calls, bulk = [], []
    real = bu._batched
    monkeypatch.setattr(bu, "_batched", lambda *a: calls.append(1) or real(*a))
    real_bulk = bu.record_captured
    monkeypatch.setattr(root_mod, "record_captured", lambda *a: bulk.append(1) or real_bulk(*a))
    res = {}
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(store_mod, "defer_update", lambda *a: False)
        svdcache.enable(model, basis=basis, interval=3, warmup=2)
        with torch.no_grad():
            outs, g = _generation(loop, model, steps=12)
        res[batched] = (outs, g)
        svdcache.disable(model)
    assert calls and bulk  # the batched path ran, its later full steps recorded in bulk (a capture plan)
    (o1, g1), (o2, g2) = res[True], res[False]
    for a, b in zip(o1, o2):
        assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max())  # int4 code flips at most
    assert g1.flops == g2.flops and g1.cache_bytes == g2.cache_bytes and g1.cached_steps == g2.cached_steps

def test_capture_wrappers_come_off_with_disable_and_under_another_wrapper(model, basis):
    """Captures wrap their module's forward (not a registry hook): disable restores the module's own forward;
    a wrapper put on a captured module after enable keeps working after disable (ours, inside it, goes
    inert: it records nothing), and a second enable captures through it."""
    from diffusers.hooks import HookRegistry, ModelHook

    loop = FluxLoop(model, batch=2)
    with torch.no_grad():
        ref = loop.call(loop.x, 1.0).clone()
    ff = model.transformer_blocks[0].ff
    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    assert "forward" in ff.__dict__ and ff.forward._svdcache_capture is not None
    svdcache.disable(model)
    assert not any(hasattr(m.forward, "_svdcache_capture") for m in model.modules())
    assert "forward" not in ff.__dict__  # a captured module's forward is its class's again

    calls = []

    class Counting(ModelHook):
        def post_forward(self, module, output):
            calls.append(1)
            return output

    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    HookRegistry.check_if_exists_or_initialize(ff).register_hook(Counting(), "counting")
    svdcache.disable(model)
    with torch.no_grad():
        out = loop.call(loop.x, 1.0)
    assert calls and torch.equal(out, ref)  # the other wrapper runs; ours records nothing, changes nothing
    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    with torch.no_grad():
        loop.run(10)
    assert svdcache.stats(model).last_generation.cached_steps >= 4  # captured through the other wrapper
    svdcache.disable(model)
    HookRegistry.check_if_exists_or_initialize(ff).remove_hook("counting")


def test_bulk_full_steps_leave_no_sink_behind(model, basis):
    """A full step recording in bulk hands the feature sites' outputs to the call's sink (no per-feature
    record): the same outputs and stats as recording one by one; after every call, and after one that raised,
    no block hook holds a recorder or a sink, and every block's forward is still its hook's."""
    from svdcache.adapters.base import block_hook_of

    loop = FluxLoop(model, batch=2)
    res, sinks = {}, []
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]

    def clean():
        return all(block_hook_of(b).active_sink is None and block_hook_of(b).active_record is None
                   and b.forward._svdcache_block is block_hook_of(b) for b in blocks)

    for bulk in (True, False):
        svdcache.enable(model, basis=basis, interval=3, warmup=2,
                        fast_paths="auto" if bulk else {"batched_update": "off"})
        root = model._diffusers_hook.get_hook("svdcache")
        hd = blocks[-1].register_forward_hook(lambda m, a, o: sinks.append(root.sink is not None))
        with torch.no_grad():
            res[bulk] = _generation(loop, model, steps=12)
        hd.remove()
        assert clean()
        if bulk:
            assert any(sinks)  # some full steps recorded in bulk
            hd = model.single_transformer_blocks[1].proj_out.register_forward_pre_hook(
                lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
            root.decider.schedule.is_full = lambda *a, **k: True
            with pytest.raises(KeyboardInterrupt), torch.no_grad():
                loop.call(loop.x, 0.01)  # a bulk full step of the same generation
            hd.remove()
            assert clean() and root.sink is None
        else:
            assert not any(sinks)  # one by one: no capture plan, no sink
        sinks.clear()
        svdcache.disable(model)
    (o1, g1), (o2, g2) = res[True], res[False]
    for a, b in zip(o1, o2):
        assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max())  # int4 code flips at most
    assert g1.flops == g2.flops and g1.cached_steps == g2.cached_steps >= 4


def test_ip_adapter_call_refused_before_any_work(model, basis):
    """FLUX blocks with IP-Adapter attention are not cached: the call is refused with a one-line error before
    any block runs (the adapter's check_call, once per call), and the next plain call works."""
    loop = FluxLoop(model, batch=2)
    svdcache.enable(model, basis=basis, interval=3, warmup=2)
    ran = []
    hd = model.transformer_blocks[0].register_forward_pre_hook(lambda m, a: ran.append(1))
    B = 2
    with pytest.raises(NotImplementedError, match="IP-Adapter"), torch.no_grad():
        model(hidden_states=loop.x, encoder_hidden_states=loop.e[:B], pooled_projections=loop.p[:B],
              timestep=torch.full((B,), 1.0), img_ids=loop.img_ids, txt_ids=loop.txt_ids, return_dict=False,
              joint_attention_kwargs={"ip_adapter_image_embeds": [torch.zeros(B, 4, 32)]})
    assert not ran
    with torch.no_grad():
        loop.run(10)
    hd.remove()
    assert ran and svdcache.stats(model).last_generation.cached_steps >= 4


@pytest.mark.parametrize("steps", [(4,), (7,), (7, 8, 9, 10, 11)], ids=["per-feature-step", "bulk-step", "rest-of-run"])
def test_features_changing_dtype_mid_generation_restart_their_history(model, basis, steps):
    """Autocast turned on mid-generation (the features turn bf16, the model's input stays fp32): each
    feature whose dtype changed starts its history over (on the per-feature and the bulk path; no dtype
    error from inside the cache), the full steps give the model's own output, the run goes on caching."""
    import copy

    loop = FluxLoop(model, batch=2)
    ref = copy.deepcopy(model)
    svdcache.enable(model, basis=basis, interval=3, warmup=2)  # full at 0, 1, 4, 7, 10: bulk from 7 on
    hook = model._diffusers_hook.get_hook("svdcache")
    h = loop.x.clone()
    with torch.no_grad():
        for i in range(12):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if i in steps else contextlib.nullcontext()
            before = hook.cur.full_steps
            with ctx:
                out = loop.call(h, 1.0 - i / 12)
                if hook.cur.full_steps > before:  # a full step: the model's own output
                    assert torch.equal(out, loop.call(h, 1.0 - i / 12, model=ref))
            assert bool(torch.isfinite(out).all())
            if i == steps[0] and i in (4, 7):
                st = hook.state_manager.get_state()
                assert st.features["transformer_blocks.0.attn.img"].R.dtype == torch.bfloat16
            h = h - out.float() / 12
    g = svdcache.stats(model).last_generation
    assert g.full_steps == 5 and g.cached_steps == 7 and g.fallbacks == 0
