from .reference import split_reference


def split(F, V, *, backend=None, **kwargs):
    """Full-step split; see :func:`split_reference` for the arguments. ``backend``: auto|triton|torch."""
    from ...dispatch import resolve_backend

    if resolve_backend(backend, F) == "triton":
        from .kernel import split_triton

        return split_triton(F, V, **kwargs)
    return split_reference(F, V, **kwargs)


__all__ = ["split", "split_reference"]
