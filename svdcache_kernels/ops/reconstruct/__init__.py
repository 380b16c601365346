from .reference import reconstruct_reference


def reconstruct(V, R, *, backend=None, **kwargs):
    """Cached-step reconstruction; see :func:`reconstruct_reference`. ``backend``: auto|triton|torch."""
    from ...dispatch import resolve_backend

    if resolve_backend(backend, R) == "triton":
        from .kernel import reconstruct_triton

        return reconstruct_triton(V, R, **kwargs)
    return reconstruct_reference(V, R, **kwargs)


__all__ = ["reconstruct", "reconstruct_reference"]
