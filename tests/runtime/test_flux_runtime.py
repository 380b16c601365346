"""The runtime on a FluxPipeline built offline from tiny components, and on its bare transformer."""
import math
import os
import warnings

import pytest
import torch

import svdcache
from svdcache.runtime.schedule import full_steps

from flux_helpers import FluxLoop, run_pipe


@pytest.fixture(autouse=True)
def _clean(tiny_pipe):
    svdcache.disable(tiny_pipe)
    yield
    svdcache.disable(tiny_pipe)


@pytest.fixture(scope="module")
def basis(tiny_pipe):
    return svdcache.calibrate(tiny_pipe, choose=False, prompt="a handwritten digit three", num_inference_steps=10,
                              height=32, width=32, max_sequence_length=16, output_type="pt", progress=False)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_interval_1_equals_uncached_and_disable_restores(tiny_pipe, basis):
    ref = run_pipe(tiny_pipe)
    svdcache.enable(tiny_pipe, basis=basis, interval=1)
    assert torch.equal(run_pipe(tiny_pipe), ref)
    assert svdcache.stats(tiny_pipe).last_generation.cached_steps == 0
    assert svdcache.disable(tiny_pipe) is True
    assert torch.equal(run_pipe(tiny_pipe), ref)
    assert svdcache.disable(tiny_pipe) is False  # idempotent
    assert not hasattr(tiny_pipe.transformer, "forward") or "svdcache" not in repr(tiny_pipe.transformer._diffusers_hook)


@pytest.mark.parametrize("space,predictor,residual", [
    ("svd", "taylor", "reuse"), ("svd", "ema", "reuse"), ("svd", "reuse", "reuse"),
    ("svd", "taylor", "taylor"), ("svd", "taylor", "damped"), ("full", "reuse", "reuse"), ("full", "taylor", "reuse"),
])
def test_cached_steps_skip_attention_and_mlps(tiny_pipe, basis, space, predictor, residual):
    tr = tiny_pipe.transformer
    counts = {"attn": 0, "ff": 0, "proj_mlp": 0, "proj_out": 0}
    handles = []
    for blk in tr.transformer_blocks:
        handles.append(blk.attn.register_forward_hook(lambda *a: counts.__setitem__("attn", counts["attn"] + 1)))
        handles.append(blk.ff.register_forward_hook(lambda *a: counts.__setitem__("ff", counts["ff"] + 1)))
    for blk in tr.single_transformer_blocks:
        handles.append(blk.proj_mlp.register_forward_hook(lambda *a: counts.__setitem__("proj_mlp", counts["proj_mlp"] + 1)))
        handles.append(blk.proj_out.register_forward_hook(lambda *a: counts.__setitem__("proj_out", counts["proj_out"] + 1)))
    try:
        ref = run_pipe(tiny_pipe, steps=12)
        for k in counts:
            counts[k] = 0
        svdcache.enable(tiny_pipe, basis=basis, interval=4, warmup=2, space=space, predictor=predictor, residual=residual)
        out = run_pipe(tiny_pipe, steps=12)
    finally:
        for h in handles:
            h.remove()
    n_full = len(full_steps(12, interval=4, warmup=2))
    assert full_steps(12, interval=4, warmup=2) == [0, 1, 5, 9]
    assert counts == {"attn": n_full * len(tr.transformer_blocks), "ff": n_full * len(tr.transformer_blocks),
                      "proj_mlp": n_full * len(tr.single_transformer_blocks),
                      "proj_out": n_full * len(tr.single_transformer_blocks)}
    st = svdcache.stats(tiny_pipe).last_generation
    assert (st.full_steps, st.cached_steps, st.fallbacks) == (n_full, 12 - n_full, 0)
    assert st.flops_ratio > 1.5
    # a short trajectory stays close; a zero forecast or a state mix-up gives errors of order 1
    assert _rel(out, ref) < 0.05, _rel(out, ref)


def test_full_steps_schedule():
    assert full_steps(10, interval=3, warmup=2) == [0, 1, 4, 7]
    assert full_steps(10, interval=3, warmup=1) == [0, 3, 6, 9]
    assert full_steps(10, interval=3, warmup=2, tail=2) == [0, 1, 4, 7, 8, 9]
    assert full_steps(5, interval=1, warmup=3) == [0, 1, 2, 3, 4]


def test_cond_and_uncond_contexts_keep_separate_state(tiny_pipe, basis):
    kw = dict(negative_prompt="the number 2", true_cfg_scale=3.0)
    ref = run_pipe(tiny_pipe, steps=12, **kw)
    # both branches computed at every full step (the unconditional one's sharing: test_guidance.py)
    svdcache.enable(tiny_pipe, basis=basis, interval=3, warmup=2, uncond_interval=1)
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    seen = {}

    def spy(pipe, i, t, kwargs):
        seen[i] = {name: st.step for name, st in hook.state_manager._state_cache.items()}
        return {}

    out = run_pipe(tiny_pipe, steps=12, callback_on_step_end=spy, **kw)
    assert seen[5] == {"cond": 5, "uncond": 5}  # each context counts its own steps
    st = svdcache.stats(tiny_pipe).last_generation
    n_full = len(full_steps(12, interval=3, warmup=2))
    assert (st.full_steps, st.cached_steps) == (2 * n_full, 2 * (12 - n_full))
    assert _rel(out, ref) < 0.05
    # the pipeline reset every hook's state at the end of the call
    assert hook.state_manager._state_cache == {}


def test_pipeline_resets_between_calls_and_interrupt_leaves_next_correct(tiny_pipe, basis):
    svdcache.enable(tiny_pipe, basis=basis, interval=3, warmup=2)
    a = run_pipe(tiny_pipe, steps=9)
    b = run_pipe(tiny_pipe, steps=9)
    assert torch.equal(a, b)
    assert svdcache.stats(tiny_pipe).generations == 2

    def interrupt(pipe, i, t, kwargs):
        if i == 4:
            pipe._interrupt = True
        return {}

    run_pipe(tiny_pipe, steps=9, callback_on_step_end=interrupt)
    tiny_pipe._interrupt = False
    assert torch.equal(run_pipe(tiny_pipe, steps=9), a)


def test_bare_transformer_without_context_and_new_generation_detection(tiny_pipe, basis):
    loop = FluxLoop(tiny_pipe.transformer)
    ref = loop.run(10)
    svdcache.enable(tiny_pipe.transformer, basis=basis, interval=3, warmup=2)
    first = loop.run(10)
    assert _rel(first, ref) < 0.05
    loop.run(10, stop_after=5)  # interrupted generation, no pipeline reset
    assert torch.equal(loop.run(10), first)  # timestep went back up: a clean new generation
    assert svdcache.stats(tiny_pipe.transformer).generations == 3


def test_shape_batch_dtype_change_resets_and_computes_full(tiny_pipe, basis):
    loop = FluxLoop(tiny_pipe.transformer, batch=2)
    svdcache.enable(tiny_pipe.transformer, basis=basis, interval=3, warmup=2)
    h = loop.x.clone()
    for i in range(4):
        h = h - loop.call(h, 1.0 - i / 10) / 10
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    full_before = hook.cur.full_steps
    # batch 2 -> 1 mid-generation: state reset, this call computed in full, equal to uncached
    got = loop.call(h[:1], 1.0 - 4 / 10)
    assert hook.cur.full_steps + hook.total.full_steps >= full_before + 1
    svdcache.disable(tiny_pipe.transformer)
    want = loop.call(h[:1], 1.0 - 4 / 10)
    assert torch.equal(got, want)
    # dtype change: fp64 inputs on an fp64 model
    svdcache.enable(tiny_pipe.transformer, basis=basis, interval=3, warmup=2)
    loop.run(6)
    tr64 = tiny_pipe.transformer.double()
    try:
        loop64 = FluxLoop(tr64, batch=2)
        loop64.x, loop64.e, loop64.p = loop.x.double(), loop.e.double(), loop.p.double()
        with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
            loop64.run(6)  # fp64 features: the ops refuse them before any launch, with a clear message
    finally:
        tiny_pipe.transformer.float()


def test_nan_in_forecast_falls_back_to_full_once_warned(tiny_pipe, basis):
    loop = FluxLoop(tiny_pipe.transformer)
    ref = loop.run(10)
    svdcache.enable(tiny_pipe.transformer, basis=basis, interval=3, warmup=2)
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    h = loop.x.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(10):
            if i == 2:  # poison a predictor state just before the first cached step
                st = hook.state_manager.get_state()
                next(iter(st.features.values())).D1.fill_(float("nan"))
            h = h - loop.call(h, 1.0 - i / 10) / 10
    msgs = [str(w.message) for w in caught if "svdcache" in str(w.message)]
    assert len(msgs) == 1 and "not finite" in msgs[0]
    assert torch.isfinite(h).all()
    assert hook.cur.fallbacks == 1
    assert _rel(h, ref) < 0.05


def test_calibrate_save_load_round_trip(tiny_pipe, basis, tmp_path):
    path = tmp_path / "basis.safetensors"
    basis.save(path)
    loaded = svdcache.load_basis(path)
    assert set(loaded.features) == set(basis.features)
    for n, fb in basis.features.items():
        assert torch.equal(loaded.features[n].V, fb.V) and loaded.features[n].k == fb.k
    assert loaded.meta["model_class"] == "FluxTransformer2DModel"
    assert loaded.meta["tau"] == 0.99 and loaded.meta["steps"] == list(range(10))
    assert loaded.meta["prompt"] == "a handwritten digit three"
    assert set(loaded.meta["feature_shapes"]) == set(basis.features)
    svdcache.enable(tiny_pipe, basis=basis, interval=3)
    a = run_pipe(tiny_pipe)
    svdcache.enable(tiny_pipe, basis=str(path), interval=3)  # enable twice: replaces, by path
    assert torch.equal(run_pipe(tiny_pipe), a)
    # 18 module-level features: 4 per double block, 1 per single block
    tr = tiny_pipe.transformer
    assert len(basis) == 4 * len(tr.transformer_blocks) + len(tr.single_transformer_blocks)


def test_basis_mismatch_errors_name_the_feature(tiny_pipe, basis, tmp_path):
    import copy

    b = copy.deepcopy(basis)
    name = "transformer_blocks.1.ff"
    del b.features[name]
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.ff"):
        svdcache.enable(tiny_pipe, basis=b)
    b = copy.deepcopy(basis)
    fb = b.features["single_transformer_blocks.2.proj_out"]
    fb.V = torch.randn(fb.V.shape[0] + 8, fb.V.shape[1])
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.2\.proj_out.*D=136.*D=128"):
        svdcache.enable(tiny_pipe, basis=b)
    b = copy.deepcopy(basis)
    b.meta["model_class"] = "SD3Transformer2DModel"
    with pytest.raises(ValueError, match="SD3Transformer2DModel"):
        svdcache.enable(tiny_pipe, basis=b)
    with pytest.raises(ValueError, match="granularity='block'|no feature"):
        svdcache.enable(tiny_pipe, basis=basis, granularity="block")
    assert not svdcache.is_enabled(tiny_pipe)  # a failed enable leaves the model untouched
    # corrupt and foreign files
    path = tmp_path / "b.safetensors"
    basis.save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable svdcache basis"):
        svdcache.load_basis(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an svdcache basis"):
        svdcache.load_basis(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        svdcache.load_basis(tmp_path / "missing.safetensors")


def test_zero_setup_online_basis_is_built_once_and_kept(tiny_pipe):
    ref = run_pipe(tiny_pipe, steps=12)
    svdcache.enable(tiny_pipe, interval=3, warmup=3, online_steps=3)
    a = run_pipe(tiny_pipe, steps=12)
    basis = svdcache.current_basis(tiny_pipe)
    assert basis is not None and basis.meta["source"] == "online" and len(basis) == 18
    s = svdcache.stats(tiny_pipe)
    assert s.online_basis_seconds > 0 and s.online_basis_flops > 0
    assert s.last_generation.cached_steps == 12 - len(full_steps(12, interval=3, warmup=3))
    b = run_pipe(tiny_pipe, steps=12)
    assert svdcache.current_basis(tiny_pipe) is basis  # kept for later generations
    # warm-up features were replayed once the basis existed: the first generation forecast from
    # the same history as later ones and as an offline basis would
    assert torch.equal(a, b)
    svdcache.enable(tiny_pipe, basis=basis, interval=3, warmup=3)
    assert torch.equal(run_pipe(tiny_pipe, steps=12), a)
    assert _rel(a, ref) < 0.05


def test_stats_flops_and_memory(tiny_pipe, basis):
    svdcache.enable(tiny_pipe, basis=basis, interval=5, warmup=1, predictor="reuse")
    run_pipe(tiny_pipe, steps=20)
    s = svdcache.stats(tiny_pipe)
    g = s.last_generation
    n_full = len(full_steps(20, interval=5, warmup=1))
    assert (g.full_steps, g.cached_steps) == (n_full, 20 - n_full)
    # a cached FLUX call runs only embedders, gates and the output layer: FLOPs ratio near 20 / n_full
    assert 0.7 * 20 / n_full < g.flops_ratio <= 20 / n_full
    # with the residual reused, SVD "reuse" is FORA exactly: the held feature is the whole state
    assert g.cache_op_flops == 0 and math.isclose(g.memory_ratio, 1.0)
    assert set(s.ranks) == set(basis.features) and all(1 <= k <= 128 for k in s.ranks.values())
    svdcache.enable(tiny_pipe, basis=basis, interval=5, warmup=1, predictor="taylor", order=2)
    run_pipe(tiny_pipe, steps=20)
    s = svdcache.stats(tiny_pipe)
    g = s.last_generation
    assert g.cache_op_flops > 0
    # Taylor 2 in the principal subspace: the held feature plus D1, D2 (fp32, k per token), plus the
    # default's kept residual difference (int4: D / 2 bytes and one fp32 scale per token)
    tokens = {"attn.img": 64, "ff": 64, "attn.txt": 16, "ff_context": 16, "proj_out": 80}  # batch 1
    N = {n: next(v for k, v in tokens.items() if n.endswith("." + k)) for n in basis.features}
    # the double blocks' text features hold nothing: FluxTransformer2DModel never reads the text stream
    # after its blocks, so no cached step forecasts them (unread_features)
    live = [n for n in basis.features if not n.endswith((".attn.txt", ".ff_context"))]
    assert svdcache.stats(tiny_pipe).last_generation.feature_bytes == sum(N[n] * 4 * 128 for n in live)
    want = sum(N[n] * (4 * 128 + 4 * 2 * s.ranks[n] + 64 + 4) for n in live)
    one = sum(N[n] * 4 * 128 for n in live)
    assert math.isclose(g.memory_ratio, want / one, rel_tol=1e-6)
    assert "FLOPs ratio" in str(s)
    svdcache.enable(tiny_pipe, space="full", predictor="taylor", order=2, interval=5)
    run_pipe(tiny_pipe, steps=20)
    assert math.isclose(svdcache.stats(tiny_pipe).last_generation.memory_ratio, 3.0)
    svdcache.enable(tiny_pipe, space="full", predictor="reuse", interval=5)
    run_pipe(tiny_pipe, steps=20)
    assert math.isclose(svdcache.stats(tiny_pipe).last_generation.memory_ratio, 1.0)


def test_flop_counter_matches_analytic_count(tiny_pipe):
    """The counted FLOPs of a full call agree with an analytic count of the transformer's matmuls."""
    from svdcache.runtime.flops import count_flops

    tr = tiny_pipe.transformer
    loop = FluxLoop(tr, batch=1)
    _, counted = count_flops(loop.call, loop.x[:1], 1.0)
    c = tr.config
    D = c.num_attention_heads * c.attention_head_dim
    N, L = 64, 16
    T = N + L
    lin = lambda rows, i, o: 2 * rows * i * o  # noqa: E731
    attn = 4 * T * T * D  # QK^T and AV
    double = (2 * lin(1, D, 6 * D) + 3 * lin(N, D, D) + 3 * lin(L, D, D) + attn + lin(N, D, D) + lin(L, D, D)
              + lin(N, D, 4 * D) + lin(N, 4 * D, D) + lin(L, D, 4 * D) + lin(L, 4 * D, D))
    single = lin(1, D, 3 * D) + lin(T, D, 4 * D) + 3 * lin(T, D, D) + attn + lin(T, 5 * D, D)
    emb = (lin(1, 256, D) + lin(1, D, D) + lin(1, c.pooled_projection_dim, D) + lin(1, D, D)
           + lin(L, c.joint_attention_dim, D) + lin(N, c.in_channels, D) + lin(1, D, 2 * D) + lin(N, D, c.in_channels))
    analytic = len(tr.transformer_blocks) * double + len(tr.single_transformer_blocks) * single + emb
    assert counted == analytic


def test_equal_bf16_timesteps_mid_generation_are_not_a_restart(tiny_pipe, basis):
    """Two consecutive steps can round to the same bf16 timestep; only a repeat of the first restarts."""
    loop = FluxLoop(tiny_pipe.transformer)
    svdcache.enable(tiny_pipe.transformer, basis=basis, interval=3, warmup=2)
    h = loop.x.clone()
    for t in (1.0, 0.9, 0.8, 0.8, 0.7, 0.6):
        h = h - loop.call(h, t) / 10
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    assert hook.generations == 0 and hook.cur.calls == 6 and hook.cur.cached_steps > 0
    for _ in range(3):  # repeated one-step generations: each is a new generation
        loop.call(loop.x, 1.0)
    assert svdcache.stats(tiny_pipe.transformer).generations == 4


def test_reset_and_num_inference_steps_start_new_generations(tiny_pipe, basis):
    loop = FluxLoop(tiny_pipe.transformer)
    svdcache.enable(tiny_pipe.transformer, basis=basis, interval=3, warmup=2)
    first = loop.run(10)
    loop.run(10, stop_after=5)
    svdcache.reset(tiny_pipe.transformer)
    assert svdcache.stats(tiny_pipe.transformer).generations == 2
    assert torch.equal(loop.run(10), first)
    # with the number of steps known, a new generation starts after the last step whatever the timesteps
    svdcache.enable(tiny_pipe.transformer, basis=basis, interval=3, warmup=2, num_inference_steps=10)
    h = loop.x.clone()
    for i in range(20):
        h = h - loop.call(h, 1.0 - i / 20) / 10  # timesteps keep going down: only the step count splits them
    assert svdcache.stats(tiny_pipe.transformer).generations == 2
