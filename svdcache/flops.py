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
    """Run ``fn`` and return ``(output, flops)`` as torch's FLOP counter sees it (matmuls, attention)."""
    with _fc.FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())
