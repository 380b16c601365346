"""FLOP accounting on the Triton backend (the GPU path), checked here under Triton's interpreter: a feature
whose rank k is above the kernels' register limit runs the PyTorch reference ops inside the Triton
wrappers, so torch's FLOP counter sees its matmuls; svdcache.stats must not count them twice."""
import pytest
import torch

import svdcache
from svdcache.adapters import find_blocks
from svdcache.basis import Basis, FeatureBasis
from svdcache_kernels.dispatch import interpreter_on
from svdcache_kernels.ops._triton_common import MAX_KERNEL_K

from flux_helpers import FluxLoop

D = 272  # > MAX_KERNEL_K, so that k can exceed it
K_BIG = MAX_KERNEL_K + 8


def _model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=D, num_attention_heads=1,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(16, 128, 128),
    ).eval()


def _basis(model, k):
    g = torch.Generator().manual_seed(1)
    feats = {}
    for name, block, adapter in find_blocks(model, "module"):
        for local, dim in adapter.feature_dims(block).items():
            V = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:, :k].contiguous()
            feats[f"{name}.{local}"] = FeatureBasis(V=V, sigma=torch.ones(dim), k=k)
    return Basis(feats, {"model_class": type(model).__name__, "granularity": "module"})


@pytest.mark.skipif(not interpreter_on(), reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
@pytest.mark.parametrize("k", [16, K_BIG])
def test_triton_backend_counts_like_torch(k):
    assert MAX_KERNEL_K < D
    model = _model()
    loop = FluxLoop(model, batch=1)
    basis = _basis(model, k)
    flops = {}
    for backend in ("torch", "triton"):
        svdcache.enable(model, basis=basis, interval=2, warmup=2, rank=k, backend=backend, check_finite=False,
                        subspace="feature")
        with torch.no_grad():
            loop.run(steps=7)
        g = svdcache.stats(model).last_generation
        svdcache.disable(model)
        assert g.cached_steps > 0 and g.cache_op_flops > 0
        flops[backend] = (g.flops, g.flops_uncached, g.cache_op_flops)
    assert flops["triton"] == flops["torch"]
