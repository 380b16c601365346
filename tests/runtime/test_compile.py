"""torch.compile(transformer) with the cache on: same outputs as eager, and no recompile after the
first full and the first cached call of each input shape (tiny config, CPU).

Recompiles are counted with what torch does write: a counting ``backend=`` (called once per graph
compiled) and ``torch._dynamo.utils.guard_failures`` (one entry per recompile); after the warm-up
generation ``error_on_recompile`` turns any further recompile into an error, and
``fail_on_recompile_limit_hit`` turns a hit of ``recompile_limit`` (after which torch silently runs
the frame eagerly) into one.
"""
import torch

import svdcache
from flux_helpers import FluxLoop


def _compile_counting(model):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    return torch.compile(model, backend=backend), graphs


def _recompiles() -> int:
    from torch._dynamo.utils import guard_failures

    return sum(len(v) for v in guard_failures.values())


def test_compiled_transformer_with_cache_matches_eager_and_does_not_recompile(tiny_pipe, monkeypatch):
    import torch._dynamo
    import torch._dynamo.config as dcfg
    from torch._dynamo.utils import counters, guard_failures

    tr = tiny_pipe.transformer
    loop = FluxLoop(tr)
    svdcache.enable(tr, interval=3, warmup=2)
    try:
        eager = loop.run(8)
        small_eager = FluxLoop(tr, batch=1).run(8)
        torch._dynamo.reset()
        counters.clear()
        guard_failures.clear()
        monkeypatch.setattr(dcfg, "fail_on_recompile_limit_hit", True)
        compiled, graphs = _compile_counting(tr)
        first = loop.run(8, model=compiled)  # warm-up: the first full and the first cached calls compile
        warm_graphs, warm_recompiles = len(graphs), _recompiles()
        # one graph for a full step (the cache's ops run eagerly around it); the cached step runs
        # eagerly (one guard failure: the resume function specialises on the step's mode)
        assert warm_graphs == 1, graphs
        assert warm_recompiles <= 1, dict(guard_failures)
        monkeypatch.setattr(dcfg, "error_on_recompile", True)  # from now on a recompile raises
        second = loop.run(8, model=compiled)  # a second generation: every graph is reused
        assert len(graphs) == warm_graphs and _recompiles() == warm_recompiles
        for out in (first, second):
            torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
        st = svdcache.stats(tr)
        assert st.last_generation.cached_steps == 4 and st.generations == 4
        # a new input shape: its first full and first cached call may compile, then nothing
        monkeypatch.setattr(dcfg, "error_on_recompile", False)
        small = FluxLoop(tr, batch=1)
        small.run(8, model=compiled)
        n, r = len(graphs), _recompiles()
        monkeypatch.setattr(dcfg, "error_on_recompile", True)
        torch.testing.assert_close(small.run(8, model=compiled), small_eager, rtol=1e-4, atol=1e-5)
        assert len(graphs) == n and _recompiles() == r
    finally:
        svdcache.disable(tr)
        torch._dynamo.reset()
