"""FLOP counting: torch.utils.flop_counter, plus the CPU attention op it does not know."""
from __future__ import annotations

import torch
from torch.utils import flop_counter as _fc

_aten = torch.ops.aten


def _register_cpu_sdpa() -> None:
    op = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in _fc.flop_registry:
        return

    @_fc.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa()


def count_flops(fn, *args, **kwargs):
    """Run ``fn`` and return ``(output, flops)`` as torch's FLOP counter sees it (matmuls, attention).

    An op the counter's dispatch mode cannot run (torch's flex_attention higher-order op, eagerly,
    e.g. AnyFlow-FAR) fails at its first call, before the model's first attention output exists:
    ``fn`` then runs again uncounted and the count is 0, with one warning."""
    try:
        with _fc.FlopCounterMode(display=False) as counter:
            out = fn(*args, **kwargs)
    except TypeError as e:
        if "no implementation found" not in str(e):
            raise
        import warnings

        warnings.warn(f"svdcache: torch's FLOP counter cannot run this model ({str(e)[:90]}...); its FLOPs "
                      "are not counted", stacklevel=3)
        torch._dynamo.reset()  # the failed call leaves flex_attention's eager trace marked as skipped
        return fn(*args, **kwargs), 0
    return out, int(counter.get_total_flops())
