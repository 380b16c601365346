"""The change subspace: principal directions of F_t - F_t-1 instead of F."""
import torch

import svdcache
from svdcache import SVDCacheConfig
from svdcache.features import make_feature_cache
from flux_helpers import FluxLoop, run_pipe


def test_change_subspace_carries_the_motion_a_feature_subspace_misses():
    """A large static part along e0 and a small linear motion along e1: with k = 1 the feature
    subspace holds e0 (the residual reuse then freezes the motion), the change subspace holds e1."""
    D, rows = 16, 32
    g = torch.Generator().manual_seed(0)
    static = torch.randn(rows, 1, generator=g) * 10
    speed = torch.randn(rows, 1, generator=g)
    e0, e1 = torch.eye(D)[:, :1], torch.eye(D)[:, 1:2]
    traj = [static @ e0.T + t * speed @ e1.T for t in range(12)]
    cfg = SVDCacheConfig(interval=4, warmup=2, order=1, rank=1, tau=None, residual="reuse")
    errs = {}
    for name, V in (("feature", e0), ("change", e1)):
        fc = make_feature_cache("f", cfg, V)
        for t in (0, 1):
            fc.update(traj[t], float(t))
        errs[name] = float((fc.forecast(4.0) - traj[4]).norm() / traj[4].norm())
    assert errs["change"] < 1e-6 < 0.01 < errs["feature"]


def test_calibration_stores_both_subspaces_and_enable_uses_the_change_one(tiny_pipe, tmp_path):
    basis = svdcache.calibrate(tiny_pipe, choose=False, prompt="a handwritten digit three", num_inference_steps=10,
                               height=32, width=32, max_sequence_length=16, output_type="pt", progress=False)
    assert set(basis.changes) == set(basis.features)
    n = next(iter(basis.features))
    assert not torch.allclose(basis.changes[n].V[:, :1].abs(), basis.features[n].V[:, :1].abs())
    basis.save(tmp_path / "b.safetensors")
    loaded = svdcache.load_basis(tmp_path / "b.safetensors")
    for name, cb in basis.changes.items():
        assert torch.equal(loaded.changes[name].V, cb.V) and loaded.changes[name].k == cb.k
    assert any(k.startswith("change/") for k in loaded.meta["gains"][n])
    ref = run_pipe(tiny_pipe, steps=12)
    svdcache.enable(tiny_pipe, basis=loaded, interval=3, warmup=2, order=1, subspace="change")
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    assert hook.store.bases[n] is loaded.changes[n]
    out = run_pipe(tiny_pipe, steps=12)
    svdcache.disable(tiny_pipe)
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_zero_setup_change_subspace(tiny_pipe):
    loop = FluxLoop(tiny_pipe.transformer)
    ref = loop.run(10)
    svdcache.enable(tiny_pipe.transformer, interval=3, warmup=3, order=1, subspace="change")
    out = loop.run(10)
    b = svdcache.current_basis(tiny_pipe.transformer)
    svdcache.disable(tiny_pipe.transformer)
    assert b is not None and b.changes and b.meta["source"] == "online"
    assert float((out - ref).norm() / ref.norm()) < 0.05
