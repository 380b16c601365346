"""Helpers for the FLUX runtime tests."""
import torch

PIPE_KW = dict(height=32, width=32, max_sequence_length=16, output_type="pt")


def tiny_flux(num_single_layers: int = 2):
    """A tiny FLUX transformer (2 double blocks, random weights, width 32): built in well under a second."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()


def random_module_basis(model, seed: int, k: int):
    """A random orthonormal basis per module-level feature (rank ``k``): for tests that compare code paths,
    not fidelity."""
    from svdcache.adapters import find_blocks
    from svdcache.basis import Basis, FeatureBasis

    g = torch.Generator().manual_seed(seed)
    feats = {}
    for name, block, adapter in find_blocks(model, "module"):
        for local, D in adapter.feature_dims(block).items():
            V = torch.linalg.qr(torch.randn(D, D, generator=g))[0].contiguous()
            feats[f"{name}.{local}"] = FeatureBasis(V=V, sigma=torch.logspace(0, -3, D), k=k)
    return Basis(feats, {"model_class": type(model).__name__, "granularity": "module"}, changes=dict(feats))


def run_pipe(pipe, prompt="a handwritten digit seven", steps=10, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=g, **PIPE_KW, **kw).images


class FluxLoop:
    """A bare FluxTransformer2DModel in a user's own Euler loop (no cache_context)."""

    def __init__(self, transformer, batch=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        cfg = transformer.config
        self.model = transformer
        self.B = batch
        self.x = torch.randn(batch, 64, cfg.in_channels, generator=g)
        self.e = torch.randn(batch, 16, cfg.joint_attention_dim, generator=g)
        self.p = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
        self.img_ids = torch.zeros(64, 3)
        self.txt_ids = torch.zeros(16, 3)

    def call(self, h, t, model=None, e=None):
        m = self.model if model is None else model
        B = h.shape[0]
        return m(
            hidden_states=h,
            encoder_hidden_states=(self.e if e is None else e)[:B],
            pooled_projections=self.p[:B],
            timestep=torch.full((B,), t),
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]

    def run(self, steps=10, model=None, stop_after=None):
        h = self.x.clone()
        for i in range(steps):
            if stop_after is not None and i == stop_after:
                break
            h = h - self.call(h, 1.0 - i / steps, model) / steps
        return h
