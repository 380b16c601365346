"""What the runtime is given (issue 29): a model that is no denoiser, wrappers standing in for a FLUX
block's Linears, a memory budget that cannot be met, ``calibrate``'s arguments and the embedded video
pipeline's: a correct image, or one line naming the thing and the fix before any work."""
import math
import warnings

import pytest
import torch

import svdcache
from svdcache.embedded import load_basis

CACHE_KW = dict(interval=2, warmup=2)  # the fault suite's (conftest.py)


def _gen(emb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return emb.pipe(num_inference_steps=emb.steps, generator=g, output_type="latent", **emb.embeds, **emb.kw).images


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


class _Calls:
    """Counts the transformer's calls (a refusal comes before any)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- a model that is no denoiser -------------------------------------------------------------------
@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_text_encoder_is_refused(emb, component):
    model = getattr(emb.pipe, component)
    with pytest.raises(TypeError) as e:
        svdcache.enable(model)
    msg = _one_line(e)
    assert type(model).__name__ in msg and "svdcache.enable(pipe)" in msg
    assert not svdcache.is_enabled(emb.pipe)
    with pytest.raises(TypeError) as e:
        svdcache.calibrate(model, run=lambda: None)
    assert type(model).__name__ in _one_line(e)


# -- wrappers in a FLUX block --------------------------------------------------------------------------
class _Wrap(torch.nn.Module):
    """A module standing in for a Linear: no ``out_features``, no ``weight``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(float(b.max() - b.min()) ** 2 / mse) if mse else float("inf")


@pytest.mark.parametrize("where", ["proj_out", "norm.linear", "norm1.linear"])
def test_wrapper_without_linear_attributes(emb, where):
    """A wrapper around a single block's output projection or an AdaLN Linear (no out_features / weight):
    the cache reads the stream width from the block's norm and computes the wrapped gates by calling it."""
    tr = emb.pipe.transformer
    block = tr.single_transformer_blocks[1] if where != "norm1.linear" else tr.transformer_blocks[1]
    parent_path, attr = where.rpartition(".")[0], where.rpartition(".")[2]
    parent = block.get_submodule(parent_path) if parent_path else block
    inner = getattr(parent, attr)
    try:
        svdcache.enable(emb.pipe, basis=load_basis(), **CACHE_KW)
        ref = _gen(emb)
        setattr(parent, attr, _Wrap(inner))
        svdcache.enable(emb.pipe, basis=load_basis(), **CACHE_KW)
        out = _gen(emb)
        st = svdcache.stats(emb.pipe).last_generation
    finally:
        setattr(parent, attr, inner)
        svdcache.disable(emb.pipe)
    assert st.cached_steps > 0
    if where == "proj_out":
        assert torch.equal(out, ref)
    else:  # the whole modulation computed by the wrapper, its gate chunk taken (rounds like the gate rows' GEMM)
        assert _psnr(out, ref) > 100, _psnr(out, ref)


# -- a memory budget that cannot be met --------------------------------------------------------------------
@pytest.mark.parametrize("budget, warned", [(1.0001, True), (1.0157, False), (1.3, False)])
def test_memory_budget_that_cannot_be_met_is_named(emb, budget, warned):
    """The smallest cache of a feature (rank 1) holds 1 + 4 / (D * 4) copies of an fp32 feature (D = 128:
    1.0078; D = 64: 1.0156): a budget below that warns once, naming the feature and the least budget."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            svdcache.enable(emb.pipe, basis=load_basis(), memory_budget=budget, **CACHE_KW)
            _gen(emb)
            _gen(emb)
        st = svdcache.stats(emb.pipe)
    finally:
        svdcache.disable(emb.pipe)
    ours = [str(w.message) for w in caught if "memory_budget" in str(w.message)]
    if not warned:
        assert not ours, ours
        return
    assert len(ours) == 1, ours
    assert f"memory_budget={budget:g} cannot be met" in ours[0] and "set memory_budget >= 1.0" in ours[0], ours
    least = float(ours[0].rsplit(">= ", 1)[1].split()[0])
    feats = st.last_generation.feature_bytes
    assert st.last_generation.cache_bytes > budget * feats  # what it holds: more than asked for
    assert st.last_generation.cache_bytes <= least * feats  # and no more than the least it names


# -- calibrate's arguments -------------------------------------------------------------------------
CALIBRATE_CASES = {
    "no steps": (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 2"),
    "one step": (dict(num_inference_steps=1), "num_inference_steps must be an integer >= 2"),
    "steps a float": (dict(num_inference_steps=3.0), "num_inference_steps must be an integer >= 2"),
    "steps True": (dict(num_inference_steps=True), "num_inference_steps must be an integer >= 2"),
    "granularity layer": (dict(granularity="layer"), "granularity must be one of"),
    "index past the run": (dict(num_inference_steps=3, steps=[0, 1, 10]), "past the run's last step 2"),
    "one calibration step": (dict(num_inference_steps=3, steps=[1]), "no two consecutive indices"),
    "no consecutive steps": (dict(num_inference_steps=6, steps=[0, 2, 4]), "no two consecutive indices"),
    "empty steps": (dict(steps=[]), "steps must be step indices"),
    "negative step": (dict(steps=[-1, 0]), "steps must be step indices"),
    "steps not indices": (dict(steps=["a", "b"]), "steps must be step indices"),
    "tau 0": (dict(tau=0.0), "tau must be a number in (0, 1]"),
    "store_tau nan": (dict(store_tau=float("nan")), "store_tau must be a number in (0, 1]"),
}


@pytest.mark.parametrize("case", list(CALIBRATE_CASES))
def test_calibrate_arguments_refused_before_any_work(emb, case):
    kw, match = CALIBRATE_CASES[case]
    kw = dict(dict(num_inference_steps=3, progress=False), **kw)
    with _Calls(emb.pipe.transformer) as calls, pytest.raises(ValueError) as e:
        svdcache.calibrate(emb.pipe, prompt="the number 3", output_type="latent", **emb.kw, **kw)
    assert match in _one_line(e) and _one_line(e).startswith("svdcache.calibrate:")
    assert calls.n == 0


def test_calibrate_bare_transformer_checks_the_steps_form(emb):
    """With run= the run's length is unknown before it runs: the indices' form is still checked."""
    with _Calls(emb.pipe.transformer) as calls, pytest.raises(ValueError) as e:
        svdcache.calibrate(emb.pipe.transformer, run=lambda: None, steps=[3], progress=False)
    assert "no two consecutive indices" in _one_line(e) and calls.n == 0


def test_calibrate_refuses_another_cache(emb):
    from diffusers import FirstBlockCacheConfig

    tr = emb.pipe.transformer
    tr.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with _Calls(tr) as calls, pytest.raises(ValueError) as e:
            svdcache.calibrate(emb.pipe, prompt="the number 3", num_inference_steps=3, output_type="latent",
                               progress=False, **emb.kw)
    finally:
        tr.disable_cache()
    assert "FirstBlockCacheConfig" in _one_line(e) and calls.n == 0


def test_calibrate_accepts_what_it_can_use(emb):
    """The smallest usable calibration (two consecutive steps of a 2-step run) gives a basis enable takes."""
    basis = svdcache.calibrate(emb.pipe, prompt="the number 3", num_inference_steps=2, steps=[0, 1],
                               output_type="latent", progress=False, fit_gain_rows=0, **emb.kw)
    try:
        svdcache.enable(emb.pipe, basis=basis, **CACHE_KW)
    finally:
        svdcache.disable(emb.pipe)
    assert basis.changes


# -- the embedded video pipeline -------------------------------------------------------------------
def test_video_pipeline_refuses_misspelt_arguments():
    from svdcache.embedded.video import load_video_pipeline

    pipe = load_video_pipeline()
    with _Calls(pipe.transformer) as calls, pytest.raises(TypeError) as e:
        pipe("seven moving left", num_inference_step=3)
    msg = _one_line(e)
    assert "'num_inference_step'" in msg and "did you mean 'num_inference_steps'" in msg and calls.n == 0
    with pytest.raises(TypeError) as e:
        pipe("seven moving left", num_inference_steps=2, height=64)
    assert "'height'" in _one_line(e)
