from .reference import quantize_rows, quantize_rows_into, residual_codes_compute, residual_codes_reference, residual_difference


def residual_codes(F, F_prev, D1, V, *, backend=None, **kwargs):
    """Full-step residual codes; see :func:`residual_codes_reference`. ``backend``: auto|triton|torch."""
    from ...dispatch import resolve_backend

    if resolve_backend(backend, F) == "triton":
        from .kernel import residual_codes_triton

        return residual_codes_triton(F, F_prev, D1, V, **kwargs)
    return residual_codes_reference(F, F_prev, D1, V, **kwargs)


__all__ = ["residual_codes", "residual_codes_reference", "residual_codes_compute", "residual_difference",
           "quantize_rows", "quantize_rows_into"]
