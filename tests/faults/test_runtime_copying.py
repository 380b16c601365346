"""``copy.deepcopy`` / ``torch.save`` of an enabled transformer (issue 29): the copy is the model as it was
before ``enable`` (uncached, the uncached images bit for bit, no hook of ours left on any module), the
original stays enabled and keeps caching; enabling the copy caches it like the original."""
import copy
import io

import pytest
import torch

import svdcache
from svdcache.embedded import load_basis

CACHE_KW = dict(interval=2, warmup=2)
PATHS = {"module": ("module", True), "submodule": ("submodule", False), "block": ("block", False)}


def _gen(emb, transformer=None):
    old = emb.pipe.transformer
    if transformer is not None:
        emb.pipe.transformer = transformer
    try:
        return emb.gen()
    finally:
        emb.pipe.transformer = old


def _ours(model) -> list[str]:
    found = []
    for name, m in model.named_modules():
        d = m.__dict__
        keys = [k for k in d if k.startswith("_svdcache_wrappers") or k.startswith("_svdcache_watch")
                or k == "_svdcache_block_hook" or k == "__getstate__"]
        if "forward" in d:
            keys.append("forward")
        reg = d.get("_diffusers_hook")
        if reg is not None and any(n.startswith("svdcache") for n in reg.hooks):
            keys.append("_diffusers_hook")
        found += [f"{name}:{k}" for k in keys]
    return found


def _copy(model, how):
    if how == "deepcopy":
        return copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("path", list(PATHS))
def test_copy_of_enabled_model_is_the_plain_model(emb, path, how):
    gran, calibrated = PATHS[path]
    svdcache.enable(emb.pipe, basis=load_basis() if calibrated else None, granularity=gran, **CACHE_KW)
    try:
        cached = [emb.gen(), emb.gen()]
        c = _copy(emb.pipe.transformer, how)
        assert not svdcache.is_enabled(c)
        assert _ours(c) == []
        assert torch.equal(_gen(emb, c), emb.ref)  # uncached, and not routed through the original's hooks
        before = svdcache.stats(emb.pipe).total.cached_steps
        assert torch.equal(emb.gen(), cached[1])  # the original still caches, unchanged
        assert svdcache.stats(emb.pipe).total.cached_steps > before
        # the copy cached on its own gives the original's images
        svdcache.enable(c, basis=load_basis() if calibrated else None, granularity=gran, **CACHE_KW)
        got = [_gen(emb, c), _gen(emb, c)]
        assert torch.equal(got[0], cached[0]) and torch.equal(got[1], cached[1])
        svdcache.disable(c)
        assert _ours(c) == []
    finally:
        svdcache.disable(emb.pipe)


def test_copy_refused_with_other_diffusers_hooks(emb):
    """Another library's diffusers hook on the same module: one line naming it, not a deep pickling error."""
    from diffusers.hooks import HookRegistry, ModelHook

    svdcache.enable(emb.pipe, basis=load_basis(), **CACHE_KW)
    reg = HookRegistry.check_if_exists_or_initialize(emb.pipe.transformer)
    reg.register_hook(ModelHook(), "someone_elses")
    try:
        with pytest.raises(TypeError, match="someone_elses.*svdcache.disable"):
            copy.deepcopy(emb.pipe.transformer)
    finally:
        reg.remove_hook("someone_elses", recurse=False)
        svdcache.disable(emb.pipe)
