"""Fused projections of the submodule level (svdcache/adapters/submodule.py): a parallel block's
block-level output projection over cat(attention, MLP) is the feature (FLUX's single blocks at
granularity="submodule"), verified on the block's first full step; a wrong guess keeps the
per-submodule features with one warning, and never changes an output."""
from __future__ import annotations

import warnings

import pytest
import torch

import model_zoo as Z
import svdcache
from svdcache.adapters.base import block_hook_of
from svdcache.runtime.schedule import full_steps

STEPS, INTERVAL, WARMUP = 8, 3, 2
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FULL = full_steps(STEPS, interval=INTERVAL, warmup=WARMUP)


def _fusion(block):
    bh = block_hook_of(block)
    return bh.adapter.fusion.get(id(bh), "undecided")


def _linear_calls(model, weights):
    """Counts F.linear calls per step on the given weights (id -> label)."""
    linear = torch.nn.functional.linear
    counts, step = [], [0]

    def counted(input, weight, bias=None):
        label = weights.get(id(weight))
        if label is not None:
            while len(counts) <= step[0]:
                counts.append({})
            counts[step[0]][label] = counts[step[0]].get(label, 0) + 1
        return linear(input, weight, bias)

    return counted, counts, step


def test_flux_single_blocks_fuse_proj_out_at_submodule_level():
    model = Z.build("flux")
    ref, _ = Z.denoise("flux", model, steps=STEPS, batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the guess holds: no warning
        svdcache.enable(model, interval=1, granularity="submodule")
        one, _ = Z.denoise("flux", model, steps=STEPS, batch=2)
    assert torch.equal(one, ref)
    for blk in model.single_transformer_blocks:
        fu = _fusion(blk)
        assert fu is not None and fu.proj == "proj_out" and fu.fed == {"attn", "proj_mlp"}
    for blk in model.transformer_blocks:  # double blocks: no block-level projection
        assert _fusion(blk) == "undecided"
    names = model._diffusers_hook.get_hook("svdcache").feature_dims
    single = [n for n in names if n.startswith("single_transformer_blocks.")]
    assert single and all(n.endswith(".proj_out") for n in single)

    svdcache.enable(model, interval=INTERVAL, warmup=WARMUP, granularity="submodule")
    weights = {}
    for blk in model.single_transformer_blocks:
        for label, lin in (("proj_out", blk.proj_out), ("proj_mlp", blk.proj_mlp), ("to_q", blk.attn.to_q)):
            weights[id(lin.weight)] = label
    counted, counts, step = _linear_calls(model, weights)
    h = model.register_forward_hook(lambda *_: step.__setitem__(0, step[0] + 1))
    torch.nn.functional.linear = counted
    try:
        x, _ = Z.denoise("flux", model, steps=STEPS, batch=2)
    finally:
        torch.nn.functional.linear = _LINEAR
        h.remove()
    st = svdcache.stats(model).last_generation
    assert (st.full_steps, st.cached_steps, st.fallbacks) == (len(FULL), STEPS - len(FULL), 0)
    n = len(model.single_transformer_blocks)
    for i in range(STEPS):
        c = counts[i] if i < len(counts) else {}
        if i in FULL:
            assert c == {"proj_out": n, "proj_mlp": n, "to_q": n}, (i, c)
        else:  # nothing of the single blocks' heavy work runs, proj_out included
            assert c == {}, (i, c)
    assert torch.isfinite(x).all()
    assert float((x - ref).norm() / ref.norm()) < 0.2
    svdcache.disable(model)
    again, _ = Z.denoise("flux", model, steps=STEPS, batch=2)
    assert torch.equal(again, ref)


_LINEAR = torch.nn.functional.linear


class _Attention(torch.nn.Module):  # found by class name
    def __init__(self, d):
        super().__init__()
        self.to_qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


class _ParallelBlock(torch.nn.Module):
    """FLUX-like single block; ``leak``: the attention output also reaches the output directly (the
    guess is wrong); ``inplace``: the attention output is scaled in place (placeholders refuse it)."""

    def __init__(self, d, leak=False, inplace=False):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.attn = _Attention(d)
        self.proj_mlp = torch.nn.Linear(d, 4 * d)
        self.proj_out = torch.nn.Linear(5 * d, d)
        self.leak, self.inplace = leak, inplace

    def forward(self, hidden_states, temb):
        h = self.norm(hidden_states) * (1 + temb[:, None])
        mlp = torch.nn.functional.gelu(self.proj_mlp(h))
        a = self.attn(h)
        if self.inplace:
            a.mul_(0.5)
        out = hidden_states + torch.tanh(temb[:, None]) * self.proj_out(torch.cat([a, mlp], dim=-1))
        if self.leak:
            out = out + 0.1 * a
        return out


class _Toy(torch.nn.Module):
    def __init__(self, d=16, n=3, **kw):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ParallelBlock(d, **kw) for _ in range(n))
        self.t_embed = torch.nn.Linear(1, d)

    def forward(self, hidden_states, timestep, return_dict=False):
        temb = self.t_embed(timestep.reshape(-1, 1).float() / 1000)
        for b in self.blocks:
            hidden_states = b(hidden_states, temb)
        return (hidden_states,)


def _loop(model, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 10, 16, generator=g)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), 1000.0 * (1 - i / steps))
            o = model(hidden_states=x, timestep=t)[0]
            outs.append(o.clone())
            x = x - 0.1 * o
    return x, outs


@pytest.mark.parametrize("kw, fused, warns", [({}, True, False), ({"leak": True}, False, True),
                                              ({"inplace": True}, False, True)])
def test_submodule_fused_projection_is_verified(kw, fused, warns):
    torch.manual_seed(0)
    model = _Toy(**kw).eval()
    ref, ref_outs = _loop(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svdcache.enable(model, interval=1, granularity="submodule", num_inference_steps=STEPS)
        one, outs = _loop(model)
    assert torch.equal(one, ref) and all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
    said = [str(w.message) for w in caught if "looked like a projection" in str(w.message)]
    assert bool(said) == warns, said
    for b in model.blocks:
        fu = _fusion(b)
        assert (fu is not None) == fused
        if fused:
            assert fu.proj == "proj_out" and fu.fed == {"attn", "proj_mlp"}
    feats = set(model._diffusers_hook.get_hook("svdcache").feature_dims)
    want = {f"blocks.{i}.proj_out" for i in range(3)} if fused else \
        {f"blocks.{i}.{n}" for i in range(3) for n in ("attn", "proj_mlp")}
    assert feats == want

    svdcache.enable(model, interval=INTERVAL, warmup=WARMUP, online_steps=WARMUP, granularity="submodule",
                    num_inference_steps=STEPS)
    x, _ = _loop(model)
    st = svdcache.stats(model).last_generation
    assert (st.cached_steps, st.fallbacks) == (STEPS - len(FULL), 0)
    assert torch.isfinite(x).all()
    svdcache.disable(model)
    assert torch.equal(_loop(model)[0], ref)
