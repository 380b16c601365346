"""LoRA on an enabled pipeline (issue 29): followed. A peft-style layer put around a cached Linear after
``enable`` (or taken away) is found at the next full call (every generation starts with one): the hooks go
onto the model as it is then, and the images are those of enabling after the change. Fusing, unfusing and
switching adapters change weights or attributes in place: full steps compute with them, and the next
generation's forecasts come from its own full steps.

A peft-style layer is simulated (no peft needed); with peft installed, diffusers' own ``load_lora_weights``,
``fuse_lora``, ``unfuse_lora``, ``set_adapters`` and ``unload_lora_weights`` are run too."""
import math

import pytest
import torch

import svdcache
from svdcache.embedded import load_basis

CACHE_KW = dict(interval=2, warmup=2)  # the fault suite's (conftest.py)
STEPS = 10


class LowRank(torch.nn.Module):
    """What peft puts in a Linear's place: the Linear as ``base_layer`` plus a low-rank term."""

    def __init__(self, base: torch.nn.Linear, seed: int, r: int = 4, scale: float = 0.3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base_layer = base
        self.lora_A = torch.nn.Parameter(torch.randn(r, base.in_features, generator=g) * scale)
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, r, generator=g) * scale)
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self):  # as peft's layers: the base weight (the low-rank term is not in it)
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + (x @ self.lora_A.t()) @ self.lora_B.t()


# a single block's output projection (a capture point), the AdaLN Linears (gate rows read directly),
# a projection inside the attention (its output is captured)
TARGETS = ("proj_out", "norm1.linear", "norm.linear", "attn.to_q")


def put_lora(model, targets=TARGETS, seed=1):
    """LowRank layers in place of the blocks' Linears at ``targets``; returns the undo."""
    done = []
    for i, (name, mod) in enumerate(list(model.named_modules())):
        if isinstance(mod, torch.nn.Linear) and name.split(".", 2)[-1] in targets and "blocks." in name:
            parent_name, _, key = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, key, LowRank(mod, seed * 1000 + i))
            done.append((parent, key, mod))

    def undo():
        for parent, key, mod in done:
            setattr(parent, key, mod)

    assert done
    return undo


def _gen(emb, pipe=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (pipe or emb.pipe)(num_inference_steps=STEPS, generator=g, output_type="latent", **emb.embeds,
                              **emb.kw).images


def _psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(float(b.max() - b.min()) ** 2 / mse) if mse else float("inf")


@pytest.fixture
def pipe(emb):
    yield emb.pipe
    svdcache.disable(emb.pipe)


MODULE_PATHS = {"whole stack": "auto", "per block": {"deferred_sum": "off"}}


@pytest.mark.parametrize("path", list(MODULE_PATHS))
def test_lora_layer_after_enable_module_level(emb, pipe, path):
    """FLUX module level, calibrated basis: bit for bit what enabling after the LoRA gives, and after
    taking it away what enabling without it gives."""
    kw = dict(CACHE_KW, basis=load_basis(), fast_paths=MODULE_PATHS[path])
    svdcache.enable(pipe, **kw)
    base = _gen(emb)
    undo = put_lora(pipe.transformer)
    try:
        after = _gen(emb)
        n_after = svdcache.stats(pipe).last_generation.cached_steps
        svdcache.enable(pipe, **kw)
        first = _gen(emb)
        svdcache.disable(pipe)
        lora_ref = _gen(emb)
        svdcache.enable(pipe, **kw)
    finally:
        undo()
    gone = _gen(emb)  # the LoRA layers taken away from an enabled pipeline
    assert n_after > 0
    assert _psnr(first, lora_ref) > _psnr(base, lora_ref) + 10  # the LoRA changes the image
    assert torch.equal(after, first)
    assert torch.equal(gone, base)


@pytest.mark.parametrize("granularity", ["submodule", "block"])
def test_lora_layer_after_enable_zero_setup(emb, pipe, granularity):
    """Submodule and block level with a basis built online from the first generation (without the LoRA):
    within 1 dB (PSNR) of enabling after the LoRA."""
    kw = dict(CACHE_KW, granularity=granularity)
    undo = put_lora(pipe.transformer)
    try:
        lora_ref = _gen(emb, seed=1)
        svdcache.enable(pipe, **kw)
        _gen(emb)
        first = _gen(emb, seed=1)
        undo()
        svdcache.enable(pipe, **kw)
        _gen(emb)  # the basis is built without the LoRA
        undo = put_lora(pipe.transformer)
        after = _gen(emb, seed=1)
        st = svdcache.stats(pipe).last_generation
    finally:
        undo()
    assert st.cached_steps > 0
    assert _psnr(after, lora_ref) >= _psnr(first, lora_ref) - 1.0, (_psnr(after, lora_ref), _psnr(first, lora_ref))


def test_lora_layer_put_mid_generation(emb, pipe):
    """Put in by a step callback: the computed steps use it at once, the hooks move at the next full step
    (the histories start over there); the image is within 1 dB (PSNR) of the cached image of a LoRA
    present from the start, each against its uncached run."""
    state = {}

    def at_step_3(p, i, t, kwargs):
        if i == 3 and "undo" not in state:
            state["undo"] = put_lora(p.transformer)
        return kwargs

    def gen():
        state.pop("undo", None)
        g = torch.Generator().manual_seed(0)
        try:
            return pipe(num_inference_steps=STEPS, generator=g, output_type="latent", callback_on_step_end=at_step_3,
                        **emb.embeds, **emb.kw).images
        finally:
            state["undo"]()

    ref_mid = gen()
    undo = put_lora(pipe.transformer)
    try:
        ref_lora = _gen(emb)
        svdcache.enable(pipe, basis=load_basis(), **CACHE_KW)
        lora = _gen(emb)
    finally:
        undo()
    svdcache.enable(pipe, basis=load_basis(), **CACHE_KW)
    mid = gen()
    st = svdcache.stats(pipe).last_generation
    assert st.cached_steps > 0
    assert _psnr(mid, ref_mid) >= _psnr(lora, ref_lora) - 1.0, (_psnr(mid, ref_mid), _psnr(lora, ref_lora))


# -- diffusers' LoRA calls (peft) -----------------------------------------------------------------------
def _lora_state_dict(model, seed, targets=("proj_out", "to_q", "linear"), r=4, scale=0.3):
    """A tiny LoRA in diffusers' format for the blocks' Linears at ``targets``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets and "blocks." in name:
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * scale
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * scale
    return sd


def test_diffusers_lora_calls_on_an_enabled_pipeline(emb, pipe):
    pytest.importorskip("peft")
    kw = dict(CACHE_KW, basis=load_basis())
    sd_a, sd_b = _lora_state_dict(pipe.transformer, 1), _lora_state_dict(pipe.transformer, 2)

    def cached_and_ref(load):
        """(cached image enabled after ``load``, its uncached image): the normal path of that LoRA."""
        load()
        ref = _gen(emb)
        svdcache.enable(pipe, **kw)
        out = _gen(emb)
        svdcache.disable(pipe)
        pipe.unload_lora_weights()
        return out, ref

    base_ref = _gen(emb)
    a, a_ref = cached_and_ref(lambda: pipe.load_lora_weights(dict(sd_a), adapter_name="a"))
    b, b_ref = cached_and_ref(lambda: pipe.load_lora_weights(dict(sd_b), adapter_name="b"))
    svdcache.enable(pipe, **kw)
    base = _gen(emb)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}  # (unfusing rounds them)
    try:
        pipe.load_lora_weights(dict(sd_a), adapter_name="a")
        assert torch.equal(_gen(emb), a)
        pipe.fuse_lora()
        fused = _gen(emb)
        pipe.unfuse_lora()
        unfused = _gen(emb)
        pipe.load_lora_weights(dict(sd_b), adapter_name="b")
        pipe.set_adapters(["b"])
        switched = _gen(emb)
        pipe.set_adapters(["a", "b"], [0.0, 0.0])
        off = _gen(emb)
    finally:
        pipe.unload_lora_weights()
        pipe.transformer.load_state_dict(weights)
    unloaded = _gen(emb)
    assert _psnr(a, a_ref) > _psnr(base_ref, a_ref) + 10  # the LoRA changes the image
    assert _psnr(fused, a_ref) >= _psnr(a, a_ref) - 1.0
    assert _psnr(unfused, a_ref) >= _psnr(a, a_ref) - 1.0  # (unfusing rounds the base weights: not bit for bit)
    assert _psnr(switched, b_ref) >= _psnr(b, b_ref) - 1.0
    assert _psnr(off, base_ref) >= _psnr(base, base_ref) - 1.0
    assert torch.equal(unloaded, base)
