"""Full-step split, PyTorch reference: coefficients, residual and predictor-state updates."""
from __future__ import annotations

import torch

from ..._checks import check_activation, check_basis, check_like, check_rows


def check_split_args(F, V, *, C, D1, D2, E, R, dR, order, h1, h2, beta, F_prev=None) -> None:
    check_activation("F", F)
    check_rows("F", F)
    k = check_basis(V, F.shape[-1])
    if V.device != F.device:
        raise ValueError(f"V is on {V.device} but F is on {F.device}")
    cshape = (*F.shape[:-1], k)
    for name, t in (("C", C), ("D1", D1), ("D2", D2), ("E", E)):
        check_like(name, t, cshape, torch.float32, F.device)
    for name, t in (("R", R), ("dR", dR), ("F_prev", F_prev)):
        check_like(name, t, F.shape, F.dtype, F.device)
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0, 1 or 2, got {order}")
    if order >= 1 and ((C is None and F_prev is None) or D1 is None):
        raise ValueError("order >= 1 needs D1, and C holding the previous coefficients or F_prev the previous feature")
    if F_prev is not None and order < 1:
        raise ValueError("F_prev (the previous feature) is read only for order >= 1")
    if order >= 2 and D2 is None:
        raise ValueError("order 2 needs D1 (holding the previous first difference) and D2")
    if dR is not None and R is None:
        raise ValueError("dR needs R (holding the previous residual)")
    if (order >= 1 or dR is not None) and not h1:
        raise ValueError(f"h1 (step distance to the previous full step) must be non-zero, got {h1}")
    if order >= 2 and not h2:
        raise ValueError(f"h2 (step distance to the full step before the previous) must be non-zero, got {h2}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")


@torch.no_grad()
def split_reference(
    F: torch.Tensor,
    V: torch.Tensor,
    *,
    C: torch.Tensor | None = None,
    D1: torch.Tensor | None = None,
    D2: torch.Tensor | None = None,
    E: torch.Tensor | None = None,
    R: torch.Tensor | None = None,
    dR: torch.Tensor | None = None,
    order: int = 0,
    h1: float = 1.0,
    h2: float = 1.0,
    beta: float = 0.9,
    ema_init: bool = False,
    F_prev: torch.Tensor | None = None,
) -> None:
    """One full-compute step of SVD-Cache for feature ``F`` (..., N, D) and basis ``V`` (D, k).

    Writes, in place, only the buffers that are passed (``None`` = not produced, not read):

    - ``C`` (..., N, k) fp32: on entry the previous coefficients (read when ``order >= 1``), on exit
      ``F @ V``.
    - ``D1``: first divided difference ``(C_new - C_prev) / h1`` (``order >= 1``); on entry the
      previous one, read for ``D2 = (D1_new - D1_prev) / h2`` (``order == 2``). ``h1 = t - t_prev``,
      ``h2 = t - t_prevprev``: divided differences over the actual step distances.
    - ``E``: EMA of the coefficients, ``beta * E + (1 - beta) * C_new`` (``C_new`` if ``ema_init``).
    - ``R`` (..., N, D) in F's dtype: residual ``F - C_new V^T``; ``dR``: ``(R_new - R_prev) / h1``
      with ``R_prev`` read from ``R`` on entry.

    With ``F_prev`` (the previous full step's feature, F's shape and dtype) the first difference is
    projected directly, ``D1 = (F - F_prev) V / h1``, and ``C`` need not hold (or keep) anything:
    a cache that holds F_prev anyway stores no coefficients between steps.

    ``order`` counts the differences that have valid history (0 on a first full step). The paper's
    eq. 8-9 divide by sigma and multiply it back; the sigmas cancel (F_k = F V V^T), so none is
    applied here.
    """
    check_split_args(F, V, C=C, D1=D1, D2=D2, E=E, R=R, dR=dR, order=order, h1=h1, h2=h2, beta=beta, F_prev=F_prev)
    split_compute(F, V, C, D1, D2, E, R, dR, order, h1, h2, beta, ema_init, F_prev)


def split_compute(F, V, C, D1, D2, E, R, dR, order, h1, h2, beta, ema_init, F_prev) -> None:
    """The body of :func:`split_reference` for arguments already checked (plans call it)."""
    Vf = V.float()
    need_c = C is not None or E is not None or R is not None
    Cn = F.float() @ Vf if need_c or F_prev is None else None
    if order >= 1:
        d1 = ((F.float() - F_prev.float()) @ Vf if F_prev is not None else Cn - C) / h1
        if order >= 2:
            D2.copy_((d1 - D1) / h2)
        D1.copy_(d1)
    if E is not None:
        E.copy_(Cn if ema_init else beta * E + (1.0 - beta) * Cn)
    if C is not None:
        C.copy_(Cn)
    if R is not None:
        Rn = F.float() - Cn @ Vf.T
        if dR is not None:
            dR.copy_((Rn - R.float()) / h1)
        R.copy_(Rn)
