"""``with svdcache.generation(model_or_pipe): ...``: mark one generation explicitly in a user's loop."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def generation(target):
    """Every transformer call inside the block belongs to one new generation: the state of earlier
    calls is dropped on entry and on exit, and no restart is guessed from the timesteps or the
    inputs in between (use it with stochastic samplers, or any loop the guessing gets wrong).
    Pipelines need none: they reset the cache at the end of each call."""
    from .apply import _root, _transformers

    hooks = [h for h in (_root(m) for m in _transformers(target)) if h is not None]
    if not hooks:
        raise ValueError("svdcache.generation: svdcache is not enabled on this pipeline/model (svdcache.enable first)")
    for h in hooks:
        h.new_generation()
        h._finish_generation()
        h.explicit += 1
    try:
        yield
    finally:
        for h in hooks:
            h.explicit -= 1
            h.new_generation()  # the next call, inside or outside a block, starts a new generation
            h._finish_generation()
