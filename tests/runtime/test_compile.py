"""torch.compile(transformer) keeps working with the cache enabled (tiny config, CPU)."""
import torch

import svdcache
from flux_helpers import FluxLoop


def test_compiled_transformer_with_cache_matches_eager_and_does_not_recompile(tiny_pipe):
    import torch._dynamo
    from torch._dynamo.utils import counters

    tr = tiny_pipe.transformer
    loop = FluxLoop(tr)
    svdcache.enable(tr, interval=3, warmup=2)
    try:
        eager = loop.run(8)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(tr)
        first = loop.run(8, model=compiled)
        graphs = counters["stats"]["unique_graphs"]
        second = loop.run(8, model=compiled)  # a second generation: every graph is reused
        assert counters["stats"]["unique_graphs"] == graphs
        assert not counters["recompiles"]
        # the graph breaks are the cache's own eager islands: the per-call decision and bookkeeping,
        # the feature updates of full steps and the cached block forwards
        breaks = " ".join(counters["graph_break"])
        for fn in ("_begin", "_end", "record"):
            assert fn in breaks
        for out in (first, second):
            torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
        st = svdcache.stats(tr)
        assert st.last_generation.cached_steps == 4 and st.generations == 3
    finally:
        svdcache.disable(tr)
        torch._dynamo.reset()
