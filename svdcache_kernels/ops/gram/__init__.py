from .reference import basis_from_gram, gram_update_reference, rank_for_energy


def gram_update(G, F, *, backend=None):
    """``G += F^T F`` (fp32); see :func:`gram_update_reference`. ``backend``: auto|triton|torch."""
    from ...dispatch import resolve_backend

    if resolve_backend(backend, F) == "triton":
        from .kernel import gram_update_triton

        return gram_update_triton(G, F)
    return gram_update_reference(G, F)


__all__ = ["gram_update", "gram_update_reference", "basis_from_gram", "rank_for_energy"]
