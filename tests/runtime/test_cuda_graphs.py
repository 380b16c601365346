"""``cuda_graphs=True`` as far as a CPU allows: the graph path with :class:`svdcache.fastpath.graphs.ReplayGraph`
(the captured call's ops replayed on the tensors of the capture with the arguments of the capture, as a
CUDA graph would) in place of ``torch.cuda.CUDAGraph``. A replayed cached step must give the eager
cached step's output at every step, though its forecast weights change from step to step (they reach
the ops as device tensors, written before each replay); accounting unchanged; a call the graph cannot
hold runs eagerly."""
import logging

import pytest
import torch

import svdcache
from svdcache.fastpath.graphs import GraphUnsafe, ReplayGraph, StepGraphs, _fill, input_key

from flux_helpers import FluxLoop
from test_host_path import _clean, basis, model  # noqa: F401 (fixtures)


def _hook(model):
    return model._diffusers_hook.get_hook("svdcache")


def _generation(loop, model, steps):
    h, outs = loop.x.clone(), []
    for i in range(steps):
        out = loop.call(h, 1.0 - i / steps)
        outs.append(out.clone())
        h = h - out / steps
    return outs, svdcache.stats(model).last_generation


def _run(model, basis, loop, graphs: bool, steps=16, generations=1, **kw):
    svdcache.enable(model, basis=basis, interval=5, warmup=1, **kw)
    hook = _hook(model)
    if graphs:
        hook.graphs = StepGraphs(ReplayGraph)
    res = [_generation(loop, model, steps) for _ in range(generations)]
    gs = hook.graphs.stats if graphs else None
    st = svdcache.stats(model)
    assert st.graphs == (gs.as_dict() if graphs else None)
    assert ("CUDA graphs: " in str(st)) == graphs
    svdcache.disable(model)
    return res, gs


@pytest.mark.parametrize("kw", [dict(), dict(residual="int4", order=1), dict(residual="reuse"),
                                dict(residual="int4", fitted_gains=False, gain=0.8)],
                         ids=["default", "int4-order1", "reuse", "gain0.8"])
def test_replayed_cached_steps_equal_eager_ones(model, basis, kw):
    loop = FluxLoop(model, batch=2)
    (eager,), _ = _run(model, basis, loop, False, **kw)
    (graphed,), gs = _run(model, basis, loop, True, **kw)
    (o1, g1), (o2, g2) = eager, graphed
    assert gs.captures >= 1 and gs.replays >= 2, gs
    assert g1.cached_steps == g2.cached_steps >= 8 and g2.fallbacks == 0
    for i, (a, b) in enumerate(zip(o1, o2)):
        # device weights sum in another order than the host-float path: fp32 rounding only
        assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max()), f"step {i}"
    assert g1.flops == g2.flops and g1.cache_op_flops == g2.cache_op_flops
    assert g1.flops_uncached == g2.flops_uncached


def test_graphs_follow_generations_and_inputs(model, basis):
    """A second generation and a batch change: graphs of states that moved are never replayed."""
    loop = FluxLoop(model, batch=2)
    loop1 = FluxLoop(model, batch=1, seed=3)
    ref = []
    for graphs in (False, True):
        svdcache.enable(model, basis=basis, interval=5, warmup=1)
        if graphs:
            _hook(model).graphs = StepGraphs(ReplayGraph)
        outs = [_generation(lp, model, 12)[0] for lp in (loop, loop1, loop)]
        gs = _hook(model).graphs.stats if graphs else None
        svdcache.disable(model)
        ref.append(outs)
    assert gs.replays >= 3
    for gen_e, gen_g in zip(*ref):
        for a, b in zip(gen_e, gen_g):
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_replay_graph_bakes_python_scalars(model):
    """The stand-in is a real test of graph safety: a Python scalar is fixed at capture, a device tensor
    is read at replay (what a CUDA graph does)."""
    x = torch.ones(3)
    w = torch.tensor([2.0])
    out = torch.empty(3)
    scalar = [2.0]
    g = ReplayGraph()
    g.capture(lambda: torch.add(x * scalar[0], x * w, out=out))
    scalar[0], w[0] = 5.0, 7.0
    g.replay()
    assert out.tolist() == [9.0, 9.0, 9.0]  # 2 (baked) + 7 (read)
    with pytest.raises(GraphUnsafe):
        ReplayGraph().capture(lambda: float(x.sum()))


def test_a_capture_that_syncs_turns_graphs_off_and_runs_eagerly(model, basis, monkeypatch, caplog):
    loop = FluxLoop(model, batch=2)
    (eager,), _ = _run(model, basis, loop, False)
    import svdcache.fastpath.deferred as deferred

    real = deferred.DeferredSum.flush

    def syncing(self, hook, x, out=None):
        if self.device_weights is not None:
            float(x.sum())  # a host read inside the capture
        return real(self, hook, x, out)

    monkeypatch.setattr(deferred.DeferredSum, "flush", syncing)
    with caplog.at_level(logging.WARNING, logger="svdcache"):
        (graphed,), gs = _run(model, basis, loop, True)
    assert gs.captures == 0 and gs.replays == 0 and gs.refused.get("capture failed") == 1
    assert any("cuda_graphs is off" in r.message for r in caplog.records)
    for a, b in zip(eager[0], graphed[0]):
        assert torch.equal(a, b)
    assert graphed[1].fallbacks == 0


def test_calls_outside_the_deferred_sum_are_not_graphed(model, basis):
    loop = FluxLoop(model, batch=2)
    (eager,), _ = _run(model, basis, loop, False, predictor="ema")
    (graphed,), gs = _run(model, basis, loop, True, predictor="ema")
    assert gs.captures == 0 and gs.refused.get("a forecast outside the deferred sum", 0) >= 1
    for a, b in zip(eager[0], graphed[0]):
        assert torch.equal(a, b)


class PipelineLoop(FluxLoop):
    """Calls as FluxPipeline makes them: ``joint_attention_kwargs={}`` and a guidance tensor in the kwargs."""

    def call(self, h, t, model=None, e=None):
        B = h.shape[0]
        return self.model(hidden_states=h, encoder_hidden_states=self.e[:B], pooled_projections=self.p[:B],
                          timestep=torch.full((B,), t), img_ids=self.img_ids, txt_ids=self.txt_ids,
                          joint_attention_kwargs={}, return_dict=False)[0]


def test_pipeline_style_calls_are_graphed(model, basis):
    loop = PipelineLoop(model, batch=2)
    (eager,), _ = _run(model, basis, loop, False)
    (graphed,), gs = _run(model, basis, loop, True)
    assert gs.captures >= 1 and gs.replays >= 2 and not any("inputs" in k for k in gs.refused), gs
    for a, b in zip(eager[0], graphed[0]):
        assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_input_key_structure():
    t = torch.randn(2, 3)
    k1, ts = input_key((t,), {"a": {"x": [t.t(), 1]}, "b": None})
    assert len(ts) == 2 and ts[1].stride() == (1, 3)
    # a value's type is part of the key: 1, 1.0 and True hash alike
    keys = {input_key((), {"a": v})[0] for v in (1, 1.0, True)}
    assert len(keys) == 3
    assert input_key((), {"a": [t]})[0] != input_key((), {"a": (t,)})[0]
    assert input_key((), {"a": {"x": t}})[0] != input_key((), {"a": {"y": t}})[0]
    assert input_key((), {"a": object()}) == (None, None)
    assert input_key((), {"a": {1: t}}) == (None, None)  # a dict with non-string keys
    # _fill puts fresh tensors where the call's were, in the same structure
    args, kw = (t,), {"a": {"x": [t, 2]}, "b": (t,)}
    _, ts = input_key(args, kw)
    new = [torch.full_like(x, i) for i, x in enumerate(ts)]
    it = iter(new)
    a2 = [_fill(a, it) for a in args]
    kw2 = {k: _fill(v, it) for k, v in sorted(kw.items())}
    assert a2[0] is new[0] and kw2["a"]["x"][0] is new[1] and kw2["a"]["x"][1] == 2
    assert type(kw2["b"]) is tuple and kw2["b"][0] is new[2]


def test_several_ranks_run_eagerly(model, basis, monkeypatch):
    # a sharded call's collectives are not captured: every cached call of a multi-rank group is eager
    loop = FluxLoop(model, batch=2)
    (eager,), _ = _run(model, basis, loop, False)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    (graphed,), gs = _run(model, basis, loop, True)
    assert gs.captures == 0 and gs.replays == 0 and gs.refused.get("several ranks", 0) >= 8, gs
    for a, b in zip(eager[0], graphed[0]):
        assert torch.equal(a, b)


def test_cuda_graphs_flag():
    assert svdcache.SVDCacheConfig(cuda_graphs=True).cuda_graphs is True
    with pytest.raises(ValueError, match="cuda_graphs"):
        svdcache.SVDCacheConfig(cuda_graphs="yes")


@pytest.mark.parametrize("residual", ["int4", "reuse"])
@pytest.mark.parametrize("stacked", [True, False], ids=["arena-states", "own-states"])
def test_one_graph_serves_every_interval_once_histories_are_full(model, basis, monkeypatch, stacked, residual):
    """The first three intervals differ in structure (no derivative yet, one, two and the first codes);
    from then on the same graph is replayed: anchors held as the full step's own tensors are copied into
    buffers that stay put (pin_anchors), states stacked in arenas are in place already."""
    import svdcache_kernels.ops.reconstruct_sum.reference as sum_ref

    if not stacked:
        monkeypatch.setattr(sum_ref, "STACK_ELEMS", 0)  # every feature a member of its own (large streams)
    loop = FluxLoop(model, batch=2)
    (eager,), _ = _run(model, basis, loop, False, steps=36, residual=residual)
    (graphed,), gs = _run(model, basis, loop, True, steps=36, residual=residual)
    assert gs.eager == 7 and gs.captures + gs.replays == 21 and gs.captures <= 3, gs  # 7 intervals, 28 cached steps
    # fp32 rounding differences of the cached outputs reach the next full steps' features and may flip a
    # 4-bit code of the residual (one quantization step, ~1e-5 of the scale; a stale term would be ~1e-1)
    tol = 1e-3 if residual == "int4" else 1e-4
    for a, b in zip(eager[0], graphed[0]):
        assert float((a - b).abs().max()) <= tol * float(a.abs().max())
