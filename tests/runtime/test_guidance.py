"""True CFG: the unconditional branch computed at every m-th full step of the conditional one and
forecast from it in between (svdcache.runtime.guidance)."""
import pytest
import torch

import svdcache
from svdcache.runtime.schedule import full_steps

from flux_helpers import run_pipe

CFG = dict(negative_prompt="the number 2", true_cfg_scale=3.0)
STEPS = 12


@pytest.fixture(autouse=True)
def _clean(tiny_pipe):
    svdcache.disable(tiny_pipe)
    yield
    svdcache.disable(tiny_pipe)


@pytest.fixture(scope="module")
def basis(tiny_pipe):
    return svdcache.calibrate(tiny_pipe, choose=False, prompt="a handwritten digit three", num_inference_steps=STEPS,
                              height=32, width=32, max_sequence_length=16, progress=False)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class Spy:
    """Per transformer call: the cache context, the step, and whether attention ran (a full call)."""

    def __init__(self, pipe):
        self.calls = []
        tr = pipe.transformer
        self._ctx = None
        self.handles = [tr.transformer_blocks[0].attn.register_forward_pre_hook(self._attn)]
        self._orig = tr.forward
        hook = tr._diffusers_hook.get_hook("svdcache")
        sm = hook.state_manager

        def fwd(*a, **k):
            self.calls.append([sm.context.name, False])
            return self._orig(*a, **k)
        tr.forward = fwd
        self.tr = tr

    def _attn(self, m, args):
        if self.calls:
            self.calls[-1][1] = True

    def remove(self):
        for h in self.handles:
            h.remove()
        self.tr.forward = self._orig

    def full(self, ctx):
        return [i for i, (c, f) in enumerate([c for c in self.calls if c[0] == ctx]) if f]


@pytest.mark.parametrize("space", ["svd", "full"])
def test_uncond_computed_at_every_second_full_step(tiny_pipe, basis, space):
    svdcache.enable(tiny_pipe, basis=basis, interval=3, warmup=1, space=space, uncond_interval=2,
                    schedule="uniform")
    spy = Spy(tiny_pipe)
    try:
        run_pipe(tiny_pipe, steps=STEPS, **CFG)
    finally:
        spy.remove()
    cond_full = full_steps(STEPS, interval=3, warmup=1)  # 0, 3, 6, 9
    assert spy.full("cond") == cond_full
    assert spy.full("uncond") == cond_full[::2]  # 0, 6: attention skipped at 3 and 9
    st = svdcache.stats(tiny_pipe).last_generation
    assert st.shared_steps == len(cond_full) - len(cond_full[::2])
    assert (st.full_steps, st.cached_steps) == (6, 2 * STEPS - 6)


def test_cond_branch_unchanged_and_uncond_close(tiny_pipe, basis):
    """Sharing changes nothing in the conditional branch; the guided images stay within the
    cache's own error of the uncached ones (a stale unconditional forecast is several times worse:
    test_stale_uncond_is_worse)."""
    ref = run_pipe(tiny_pipe, steps=STEPS, **CFG)
    outs = {}
    for m in (1, 2):
        svdcache.enable(tiny_pipe, basis=basis, interval=2, warmup=1, uncond_interval=m, schedule="uniform")
        outs[m] = run_pipe(tiny_pipe, steps=STEPS, **CFG)
        svdcache.disable(tiny_pipe)
    # same conditional branch, same images without guidance's second call: compare cond-only runs
    svdcache.enable(tiny_pipe, basis=basis, interval=2, warmup=1, uncond_interval=2, schedule="uniform")
    a = run_pipe(tiny_pipe, steps=STEPS)
    svdcache.disable(tiny_pipe)
    svdcache.enable(tiny_pipe, basis=basis, interval=2, warmup=1, uncond_interval=1, schedule="uniform")
    b = run_pipe(tiny_pipe, steps=STEPS)
    assert torch.equal(a, b)  # no uncond context: nothing is shared
    assert _rel(outs[2], ref) < 2 * _rel(outs[1], ref) + 1e-3


def test_identical_branches_share_exactly(tiny_pipe, basis):
    """With the same prompt in both branches the difference D is zero: at a shared step the
    unconditional forecast must equal the conditional features of that step, so the guided image
    equals the unguided one of the same cache (a forecast of stale unconditional features would not)."""
    kw = dict(negative_prompt="a handwritten digit seven", true_cfg_scale=3.0)
    svdcache.enable(tiny_pipe, basis=basis, interval=2, warmup=1, uncond_interval=2, schedule="uniform")
    guided = run_pipe(tiny_pipe, steps=STEPS, **kw)
    assert svdcache.stats(tiny_pipe).last_generation.shared_steps > 0
    svdcache.disable(tiny_pipe)
    svdcache.enable(tiny_pipe, basis=basis, interval=2, warmup=1, uncond_interval=2, schedule="uniform")
    plain = run_pipe(tiny_pipe, steps=STEPS)
    # cfg with equal branches: cond + s (cond - uncond) = cond up to rounding
    assert _rel(guided, plain) < 1e-4


def test_stale_uncond_is_worse(tiny_pipe, basis, monkeypatch):
    """The test above can fail: forecasting the unconditional branch from its own stale state at the
    shared steps (no conditional base) moves the identical-branch image well away."""
    from svdcache.runtime import guidance

    kw = dict(negative_prompt="a handwritten digit seven", true_cfg_scale=3.0)
    svdcache.enable(tiny_pipe, basis=basis, interval=2, warmup=1, uncond_interval=2, schedule="uniform")
    plain = run_pipe(tiny_pipe, steps=STEPS)
    svdcache.disable(tiny_pipe)
    # the unconditional branch forecast from its own (older) full steps alone: F held as it is, no base
    monkeypatch.setattr(guidance, "difference", lambda st, name, F: (F, True))
    # (no x: the whole-stack cached call asks for the feature itself, here D_hat on a zero base)
    monkeypatch.setattr(guidance, "base_input",
                        lambda st, name, fc, x, gate, out: (torch.zeros(fc.shape) if x is None else x, 0))
    monkeypatch.setattr(guidance, "forecast", lambda *a: None)
    svdcache.enable(tiny_pipe, basis=basis, interval=2, warmup=1, uncond_interval=2, schedule="uniform")
    stale = run_pipe(tiny_pipe, steps=STEPS, **kw)
    assert svdcache.stats(tiny_pipe).last_generation.shared_steps > 0
    assert _rel(stale, plain) > 1e-3


def test_uncond_first_is_not_shared(tiny_pipe, basis):
    """A loop that calls the unconditional branch first: nothing is shared, same result as m=1."""
    from svdcache.embedded.build import build_pipeline  # noqa: F401  (the fixture's pipeline)

    tr = tiny_pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, tr.config.in_channels, generator=g)
    e = {c: torch.randn(1, 16, tr.config.joint_attention_dim, generator=g) for c in ("cond", "uncond")}
    p = torch.randn(1, tr.config.pooled_projection_dim, generator=g)
    ids_i, ids_t = torch.zeros(64, 3), torch.zeros(16, 3)

    def loop():
        h = x.clone()
        for i in range(STEPS):
            out = {}
            for c in ("uncond", "cond"):
                with tr.cache_context(c):
                    out[c] = tr(hidden_states=h, encoder_hidden_states=e[c], pooled_projections=p,
                                timestep=torch.full((1,), 1.0 - i / STEPS), img_ids=ids_i, txt_ids=ids_t,
                                return_dict=False)[0]
            h = h - (out["uncond"] + 2 * (out["cond"] - out["uncond"])) / STEPS
        return h

    res = {}
    for m in (1, 2):
        svdcache.enable(tr, basis=basis, interval=2, warmup=1, uncond_interval=m, num_inference_steps=STEPS)
        res[m] = loop()
        assert svdcache.stats(tr).last_generation.shared_steps == 0
        svdcache.disable(tr)
    assert torch.equal(res[1], res[2])


def test_bad_uncond_interval():
    with pytest.raises(ValueError, match="uncond_interval"):
        svdcache.SVDCacheConfig(uncond_interval=0)
    with pytest.raises(ValueError, match="uncond_interval"):
        svdcache.SVDCacheConfig(uncond_interval=1.5)


def test_shared_runs_use_their_own_plans(tiny_pipe, basis):
    """A run that shares the unconditional branch reads the basis's "-u2" plans; one without guidance
    the plain family's."""
    import copy

    from svdcache.schedule_search import family_key

    b = copy.deepcopy(basis)
    plans = b.meta.setdefault("schedules", {"num_steps": STEPS, "plans": {}}).setdefault("plans", {})
    m = len(full_steps(STEPS, interval=3, warmup=1))
    shared_plan = [0, 2, 5, 10]
    plans[family_key("svd", "taylor", 1, "int4", 2)] = {str(m): shared_plan}
    plain = plans.get(family_key("svd", "taylor", 1, "int4"), {}).get(str(m)) or full_steps(STEPS, interval=3, warmup=1)
    assert plain != shared_plan
    for kw, want in ((CFG, shared_plan), ({}, plain)):
        svdcache.enable(tiny_pipe, basis=b, interval=3, uncond_interval=2, schedule="calibrated")
        spy = Spy(tiny_pipe)
        try:
            run_pipe(tiny_pipe, steps=STEPS, **kw)
        finally:
            spy.remove()
        svdcache.disable(tiny_pipe)
        assert spy.full("cond") == want
        if kw:
            assert spy.full("uncond") == want[::2]


def test_batch_with_one_negative_prompt_is_shared(tiny_pipe, basis):
    """Two prompts, one negative prompt: the unconditional text stream enters with batch 1, the
    latent with batch 2; the branches are still shared (the text features where their shapes match)."""
    svdcache.enable(tiny_pipe, basis=basis, interval=2, warmup=1, uncond_interval=2, schedule="uniform")
    g = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = tiny_pipe(["a handwritten digit seven", "a handwritten digit one"], num_inference_steps=STEPS, generator=g,
                    height=32, width=32, max_sequence_length=16, output_type="pt", **CFG).images
    assert torch.isfinite(out).all()
    assert svdcache.stats(tiny_pipe).last_generation.shared_steps > 0


@pytest.mark.parametrize("residual", ["int4", "reuse"])
def test_one_pass_forecast_equals_two(tiny_pipe, basis, residual):
    """The unconditional forecast sums both branches' Taylor terms in k dims and reconstructs once:
    the same values as forecasting F_cond in full and adding D's own forecast, at half the counted
    cache FLOPs (one k-dim matmul instead of two)."""
    svdcache.enable(tiny_pipe, basis=basis, interval=3, warmup=1, uncond_interval=2, schedule="uniform",
                    residual=residual)
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    checked = []

    def check(pipe, i, t, kw):  # the pipeline resets the states when it ends: check at the last step
        if i == STEPS - 1:
            checked.append(_check_one_pass(hook.state_manager._state_cache, residual))
        return {}

    run_pipe(tiny_pipe, steps=STEPS, callback_on_step_end=check, **CFG)  # full 0, 3, 6, 9 (uncond 0, 6)
    assert checked and checked[0] >= 3 * 6


def _check_one_pass(states, residual) -> int:
    from svdcache.runtime import guidance

    st = states["uncond"]
    p = st.partner
    assert p is states["cond"] and p.step == st.step == STEPS - 1
    rel = {n: fc for n, fc in st.features.items() if fc is not None and fc.relative}
    assert len(rel) >= 3
    g = torch.Generator().manual_seed(1)
    t_last = st.t
    checked = 0
    for name, fc in rel.items():
        pc = p.features[name]
        assert len(pc.times) == 3 and len(fc.times) == 2 and fc.times[-1] < pc.times[-1]
        if residual == "int4":
            assert fc.rq is not None and pc.rq is not None
        for t in (t_last, pc.times[-1]):  # a cached step of both; the conditional branch's full step
            st.t = p.t = t
            x = torch.randn(fc.shape, generator=g)
            gate = torch.randn(fc.shape[0], fc.shape[-1], generator=g)
            for args in ((x, gate, torch.full_like(x, float("nan"))), (x.clone(), None, None), (None, None, None)):
                one, flops = guidance.forecast(st, name, fc, *args)
                xc, f2 = guidance.base_input(st, name, fc, *args[:2], None)
                two = fc.forecast(t, x=xc, gate=args[1] if args[0] is not None else None)
                f2 += fc.forecast_flops
                torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
                if args[2] is not None:
                    assert one is args[2]
                assert one is not fc.R and one is not pc.R  # no anchor handed out to be written
                rows = fc.R.numel() // fc.R.shape[-1]
                one_matmul = 2 * rows * fc.R.shape[-1] * fc.V.shape[1]
                assert flops == one_matmul and f2 == 2 * one_matmul  # D's terms: D is older in both
                checked += 1
    st.t = p.t = t_last
    return checked


def test_interval_one_computes_both_branches_every_step(tiny_pipe, basis):
    """interval=1 means no caching: with true CFG the unconditional branch is not shared either (the
    default uncond_interval resolves to 1 there), so the images equal the uncached ones exactly; an
    explicit uncond_interval=2 still shares it."""
    ref = run_pipe(tiny_pipe, steps=STEPS, **CFG)
    cfg = svdcache.enable(tiny_pipe, basis=basis, interval=1)
    assert cfg.uncond_interval == 1 and cfg.replace(interval=3).resolve().uncond_interval == 1  # shared only by choice
    out = run_pipe(tiny_pipe, steps=STEPS, **CFG)
    assert torch.equal(out, ref)
    assert svdcache.stats(tiny_pipe).last_generation.cached_steps == 0
    svdcache.enable(tiny_pipe, basis=basis, interval=1, uncond_interval=2)
    run_pipe(tiny_pipe, steps=STEPS, **CFG)
    assert svdcache.stats(tiny_pipe).last_generation.cached_steps > 0


def test_shared_uncond_step_is_summed_with_the_stack(tiny_pipe, basis, monkeypatch):
    """FLUX's whole-stack cached call with the unconditional branch shared: the conditional branch's
    cached calls are summed at once, and so are the shared unconditional ones (each difference-form
    feature two members of the sum: the conditional state of the step and the difference, under the
    unconditional gate): no per-feature forecast at all; the same images as the per-block forecasts (up
    to fp32 summation order and the 4-bit code flips it may cause)."""
    from svdcache.hooks.root import SVDCacheHook

    calls = []
    real = SVDCacheHook.forecast
    monkeypatch.setattr(SVDCacheHook, "forecast", lambda self, name, **kw: calls.append(name) or real(self, name, **kw))
    outs, stats = {}, {}
    for defer in (True, False):
        svdcache.enable(tiny_pipe, basis=basis, interval=3, warmup=1, uncond_interval=2, schedule="uniform",
                        fast_paths={"deferred_sum": "on" if defer else "off"})
        calls.clear()
        outs[defer] = run_pipe(tiny_pipe, steps=STEPS, **CFG)
        stats[defer] = (svdcache.stats(tiny_pipe).last_generation, len(calls))
        svdcache.disable(tiny_pipe)
    (g1, n1), (g2, n2) = stats[True], stats[False]
    assert g1.shared_steps == g2.shared_steps > 0 and g1.cached_steps == g2.cached_steps
    assert n1 == 0  # every cached call summed, the shared unconditional ones included
    n_img = 2 * len(tiny_pipe.transformer.transformer_blocks) + len(tiny_pipe.transformer.single_transformer_blocks)
    uncond_cached = STEPS - len(full_steps(STEPS, interval=3, warmup=1)[::2])  # all in the difference form
    assert n2 >= n_img * uncond_cached  # the per-block path forecasts each feature
    assert _rel(outs[True], outs[False]) < 1e-3
