"""svdcache.runtime.distributed in one process: no process group, bad parallel plans, stats(all_ranks=True)."""
from __future__ import annotations

import types

import pytest
import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

import svdcache
from svdcache.runtime import distributed as D


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()


def test_no_process_group_means_local():
    m = _tiny_flux()
    assert D.parallel_info(m) is None
    t = torch.randn(3)
    assert torch.equal(D.all_reduce_(t.clone(), None), t)
    assert D.all_gather_object({"a": 1}, None) == [{"a": 1}]


def test_merge_samples_concatenates_rows_in_rank_order():
    a = {("cond", "f"): {0: torch.ones(2, 3), 1: torch.ones(2, 3)}}
    b = {("cond", "f"): {0: torch.zeros(1, 3)}}  # step 1 missing on rank 1: dropped, not half-merged
    m = D.merge_samples([a, b])
    assert list(m[("cond", "f")]) == [0]
    assert torch.equal(m[("cond", "f")][0], torch.cat([torch.ones(2, 3), torch.zeros(1, 3)]))


def test_plan_without_output_gather_is_refused():
    m = _tiny_flux()
    cp = types.SimpleNamespace(_flattened_mesh=None)
    m._parallel_config = types.SimpleNamespace(context_parallel_config=cp, tensor_parallel_config=None)
    m._cp_plan = {"": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)}}
    with pytest.raises(ValueError, match="gathers no output") as e:
        svdcache.enable(m, interval=3)
    assert "\n" not in str(e.value)
    assert not svdcache.is_enabled(m)
    m._cp_plan = {"": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
                  "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}
    svdcache.enable(m, interval=3)  # a plan that gathers the output is accepted
    assert svdcache.is_enabled(m)


def test_stats_all_ranks_in_one_process():
    m = _tiny_flux()
    svdcache.enable(m, interval=2, warmup=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(1, 4, 16, generator=g), pooled_projections=torch.randn(1, 8, generator=g),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), return_dict=False)
    with torch.no_grad():
        for i in range(4):
            x = x - m(hidden_states=x, timestep=torch.full((1,), 1 - i / 4), **kw)[0] / 4
    s = svdcache.stats(m, all_ranks=True)
    local = svdcache.stats(m)
    assert s.kind == "none" and s.world_size == 1
    assert s.cache_bytes_per_rank == [local.last_generation.cache_bytes] and s.cache_bytes_total > 0
    assert s.last_generation.cached_steps == local.last_generation.cached_steps > 0  # delegated attributes
    assert "cache memory per rank" in str(s) and s.identical_schedules
