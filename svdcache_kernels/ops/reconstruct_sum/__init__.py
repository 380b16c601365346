from .reference import SumTerm, reconstruct_stacked, reconstruct_sum_reference


def reconstruct_sum(x, items, *, out=None, backend=None):
    """Gated forecasts of many features summed into one stream; see :func:`reconstruct_sum_reference`.
    ``backend``: auto|triton|torch."""
    from ...dispatch import resolve_backend

    if resolve_backend(backend, x) == "triton":
        from .kernel import reconstruct_sum_triton

        return reconstruct_sum_triton(x, items, out=out)
    return reconstruct_sum_reference(x, items, out=out)


__all__ = ["SumTerm", "reconstruct_stacked", "reconstruct_sum", "reconstruct_sum_reference"]
