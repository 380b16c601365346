"""Runtime faults on the embedded (trained) transformer in a bare Euler loop and in its pipeline:
restarts at an equal or lower timestep, two threads, another diffusers cache, failed calls, the
backend environment variable, stats before any step."""
import threading

import pytest
import torch

import svdcache
from svdcache.hooks import ROOT_HOOK


class Loop:
    """The embedded FluxTransformer2DModel in a user's own flow-matching Euler loop (no pipeline)."""

    def __init__(self, emb, batch=1):
        self.tr = emb.pipe.transformer
        pe, ppe = emb.embeds["prompt_embeds"], emb.embeds["pooled_prompt_embeds"]
        self.e, self.p = pe.expand(batch, -1, -1), ppe.expand(batch, -1)
        ids = torch.zeros(64, 3)
        ids[:, 1] = torch.arange(64) // 8
        ids[:, 2] = torch.arange(64) % 8
        self.img_ids, self.txt_ids = ids, torch.zeros(pe.shape[1], 3)
        self.B = batch

    def noise(self, seed):
        return torch.randn(self.B, 64, self.tr.config.in_channels, generator=torch.Generator().manual_seed(seed))

    def call(self, h, t):
        with torch.no_grad():
            return self.tr(hidden_states=h, encoder_hidden_states=self.e, pooled_projections=self.p,
                           timestep=torch.full((self.B,), t), img_ids=self.img_ids, txt_ids=self.txt_ids,
                           return_dict=False)[0]

    def run(self, sigmas, x, stop_after=None):
        h = x.clone()
        for i in range(len(sigmas) - 1):
            if stop_after is not None and i == stop_after:
                break
            h = h + (sigmas[i + 1] - sigmas[i]) * self.call(h, sigmas[i])
        return h


def _sigmas(start, steps):
    return [start * (1 - i / steps) for i in range(steps + 1)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _psnr(a, b):
    """PSNR of latents, peak = the reference's range."""
    mse = float(((a - b) ** 2).mean())
    return 10 * torch.log10(torch.tensor((b.max() - b.min()) ** 2 / mse)).item() if mse else float("inf")


@pytest.fixture
def loop(emb):
    lp = Loop(emb)
    yield lp
    svdcache.disable(lp.tr)
    if lp.tr.is_cache_enabled:
        lp.tr.disable_cache()


CASES = {
    # (first run: sigmas, stop after this many calls), (second run: sigmas); the second starts at an
    # equal or lower timestep than the last call of the interrupted first one
    "equal timestep": ((_sigmas(1.0, 12), 7), _sigmas(_sigmas(1.0, 12)[6], 8)),
    "lower timestep": ((_sigmas(1.0, 12), 7), _sigmas(0.3, 6)),
    "img2img-like at a lower timestep, same noise": ((_sigmas(1.0, 12), 5), _sigmas(0.5, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_generation_then_restart_at_equal_or_lower_timestep(loop, case):
    (s1, stop), s2 = CASES[case]
    x1 = loop.noise(0)
    x2 = loop.noise(1) if "same noise" not in case else 0.5 * x1 + 0.5 * loop.noise(2)
    svdcache.enable(loop.tr, interval=3, warmup=2)
    loop.run(s1, x1)  # warm the basis up on one whole generation
    svdcache.reset(loop.tr)
    fresh = loop.run(s2, x2)  # the second generation from a clean state: what a restart must give
    loop.run(s1, x1, stop_after=stop)  # interrupted
    restarted = loop.run(s2, x2)
    st = svdcache.stats(loop.tr).last_generation
    assert st.cached_steps > 0
    assert _rel(restarted, fresh) < 1e-5, (_rel(restarted, fresh), _psnr(restarted, fresh))


def test_continuation_is_not_mistaken_for_a_restart(loop):
    """A generation with CFG batched (rows combined by the user) and equal-timestep steps stays one
    generation: the cache keeps forecasting."""
    lp = Loop.__new__(Loop)
    lp.__dict__.update(loop.__dict__)
    lp.B = 2
    lp.e = torch.cat([loop.e, torch.zeros_like(loop.e)])
    lp.p = torch.cat([loop.p, torch.zeros_like(loop.p)])
    svdcache.enable(lp.tr, interval=3, warmup=2)
    sig = _sigmas(1.0, 16)
    h = lp.noise(0)[:1]
    for i in range(16):
        v = lp.call(torch.cat([h, h]), sig[i])
        h = h + (sig[i + 1] - sig[i]) * (v[1:] + 3.0 * (v[:1] - v[1:]))  # guidance 3
    st = svdcache.stats(lp.tr)
    assert st.generations == 1 and st.last_generation.cached_steps == 10, st  # full: 0, 1, 4, 7, 10, 13


def test_explicit_generation_context(loop):
    """Inside svdcache.generation() nothing is guessed: a stochastic sampler (fresh noise every step,
    which looks like a restart) is still cached; on exit the next call starts a new generation."""
    svdcache.enable(loop.tr, interval=3, warmup=2)
    sig = _sigmas(1.0, 10)
    g = torch.Generator().manual_seed(5)

    def sde_run():
        h = loop.noise(0)
        for i in range(10):
            h = h + (sig[i + 1] - sig[i]) * loop.call(h, sig[i])
            h = h + 0.5 * sig[i + 1] * torch.randn(h.shape, generator=g)  # ancestral-like noise
        return h

    sde_run()
    guessed = svdcache.stats(loop.tr).total.cached_steps  # the noisy steps look like restarts: computed in full
    with svdcache.generation(loop.tr):
        sde_run()
    st = svdcache.stats(loop.tr)
    assert st.last_generation.cached_steps == 6 and st.last_generation.full_steps == 4  # full: 0, 1, 4, 7
    assert guessed < 6
    with svdcache.generation(loop.tr):
        loop.run(sig, loop.noise(1), stop_after=4)  # interrupted inside a block
    fresh_state = loop.run(sig, loop.noise(1))
    svdcache.reset(loop.tr)
    assert torch.equal(fresh_state, loop.run(sig, loop.noise(1)))
    with pytest.raises(ValueError, match="not enabled"):
        with svdcache.generation(torch.nn.Linear(2, 2)):
            pass


def test_two_threads_at_once_is_a_clear_error(loop):
    svdcache.enable(loop.tr, interval=3, warmup=2)
    sig = _sigmas(1.0, 10)
    ref = loop.run(sig, loop.noise(0))
    started, release, errors = threading.Event(), threading.Event(), []

    def pre(mod, inp):
        if threading.current_thread().name == "gen-A" and not release.is_set():
            started.set()
            release.wait(10)

    handle = loop.tr.transformer_blocks[0].register_forward_pre_hook(pre)
    try:
        a = threading.Thread(target=lambda: errors.append(loop.run(sig, loop.noise(0))), name="gen-A")
        a.start()
        assert started.wait(10)
        with pytest.raises(RuntimeError, match="two threads at once"):
            loop.call(loop.noise(3), 1.0)
        release.set()
        a.join(20)
    finally:
        handle.remove()
        release.set()
    assert torch.equal(errors[0], ref)  # the thread that was first is unaffected
    svdcache.reset(loop.tr)
    assert torch.equal(loop.run(sig, loop.noise(0)), ref)


def _fbc():
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=0.2)


def _taylorseer():
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig()


@pytest.mark.parametrize("other", [_fbc, _taylorseer])
def test_other_diffusers_cache_enabled_first_is_refused(emb, loop, other):
    loop.tr.enable_cache(other())
    with pytest.raises(ValueError, match="another cache"):
        svdcache.enable(emb.pipe)
    assert not svdcache.is_enabled(emb.pipe)


def test_other_cache_registered_by_hand_is_refused(emb, loop):
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.hooks import HookRegistry

    apply_first_block_cache(loop.tr, _fbc())
    try:
        with pytest.raises(ValueError, match="fbc_"):
            svdcache.enable(loop.tr)
    finally:
        reg = HookRegistry.check_if_exists_or_initialize(loop.tr)
        reg.remove_hook("fbc_leader_block_hook", recurse=True)
        reg.remove_hook("fbc_block_hook", recurse=True)


@pytest.mark.parametrize("other", [_fbc, _taylorseer])
def test_other_cache_enabled_after_svdcache_is_refused_and_leaves_nothing(emb, other):
    """The second order: the call is refused before any work; after disabling both, the next call
    works and gives what a clean enable gives (no 'updated twice at the same time')."""
    tr = emb.pipe.transformer
    svdcache.enable(emb.pipe, interval=2, warmup=2)
    clean = emb.gen()
    svdcache.reset(emb.pipe)
    tr.enable_cache(other())
    try:
        with pytest.raises(ValueError, match="another cache"):
            emb.gen()
    finally:
        tr.disable_cache()
    assert svdcache.stats(emb.pipe).last_generation.calls in (0, emb.steps)
    assert torch.equal(emb.gen(), clean)
    svdcache.disable(emb.pipe)
    svdcache.enable(emb.pipe, interval=2, warmup=2, basis=svdcache.current_basis(emb.pipe))
    svdcache.disable(emb.pipe)


def test_a_call_that_raises_leaves_no_state(loop):
    svdcache.enable(loop.tr, interval=3, warmup=2)
    sig = _sigmas(1.0, 10)
    ref = loop.run(sig, loop.noise(0))
    calls = {"n": 0}

    def boom(mod, inp):
        calls["n"] += 1
        if calls["n"] == 2:  # the second full step (warm-up): a cached call passes this middle block by
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a full step's blocks

    handle = loop.tr.single_transformer_blocks[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run(sig, loop.noise(0))
    finally:
        handle.remove()
    hook = loop.tr._diffusers_hook.get_hook(ROOT_HOOK)
    assert hook.state is None  # no call in progress is left behind
    assert torch.equal(loop.run(sig, loop.noise(0)), ref)  # the next generation is a clean one
    assert not hook.busy


def test_backend_environment_variable_is_honoured(loop, monkeypatch):
    monkeypatch.setenv("SVDCACHE_BACKEND", "triton")
    cfg = svdcache.enable(loop.tr)
    assert cfg.backend == "triton"
    assert loop.tr._diffusers_hook.get_hook(ROOT_HOOK).cfg.backend == "triton"
    assert svdcache.enable(loop.tr, backend="torch").backend == "torch"  # an explicit choice wins
    monkeypatch.setenv("SVDCACHE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SVDCACHE_BACKEND"):
        svdcache.enable(loop.tr)


def test_stats_before_any_step_say_so(loop):
    svdcache.enable(loop.tr)
    text = str(svdcache.stats(loop.tr))
    assert "nan" not in text and "no steps yet" in text
