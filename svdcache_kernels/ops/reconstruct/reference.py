"""Cached-step reconstruction, PyTorch reference: F_hat = P V^T + R (+ s dR), optional gated add."""
from __future__ import annotations

from typing import Sequence

import torch

from ..._checks import check_activation, check_basis, check_like, check_rows

MAX_TERMS = 3


def gate_rows_shape(R: torch.Tensor, gate: torch.Tensor) -> bool:
    """True if ``gate`` is (..., 1, D) (else it must be (..., D)); ``...`` are R's batch dims."""
    batch, D = tuple(R.shape[:-2]), R.shape[-1]
    if tuple(gate.shape) == (*batch, 1, D):
        return True
    if tuple(gate.shape) == (*batch, D):
        return False
    raise ValueError(f"gate must have shape {(*batch, 1, D)} or {(*batch, D)} to broadcast over tokens, got {tuple(gate.shape)}")


def check_reconstruct_args(V, R, *, terms, weights, dR, x, gate, out) -> None:
    check_activation("R", R)
    check_rows("R", R)
    k = check_basis(V, R.shape[-1], "R")
    if V.device != R.device:
        raise ValueError(f"V is on {V.device} but R is on {R.device}")
    if len(terms) != len(weights):
        raise ValueError(f"got {len(terms)} terms but {len(weights)} weights")
    if len(terms) > MAX_TERMS:
        raise ValueError(f"at most {MAX_TERMS} coefficient terms, got {len(terms)}")
    for i, t in enumerate(terms):
        check_like(f"terms[{i}]", t, (*R.shape[:-1], k), torch.float32, R.device)
    check_like("dR", dR, R.shape, R.dtype, R.device)
    if x is not None:
        check_activation("x", x)
        check_like("x", x, R.shape, x.dtype, R.device)
    if gate is not None:
        if x is None:
            raise ValueError("gate needs x (out = x + gate * F_hat)")
        if not isinstance(gate, torch.Tensor):
            raise TypeError(f"gate must be a torch.Tensor, got {type(gate).__name__}")
        if gate.device != R.device:
            raise ValueError(f"gate is on {gate.device} but R is on {R.device}")
        gate_rows_shape(R, gate)
        if gate.stride(-1) != 1:
            raise ValueError(f"gate must be contiguous in its last dim, got strides {gate.stride()}")
    if out is not None:
        want = x.dtype if x is not None else R.dtype
        check_like("out", out, R.shape, want, R.device)


@torch.no_grad()
def reconstruct_reference(
    V: torch.Tensor,
    R: torch.Tensor,
    *,
    terms: Sequence[torch.Tensor] = (),
    weights: Sequence[float] = (),
    dR: torch.Tensor | None = None,
    dr_scale: float = 0.0,
    x: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forecast of a cached feature and, optionally, its gated residual add.

    ``F_hat = (sum_i weights[i] * terms[i]) @ V^T + R + dr_scale * dR`` with ``terms`` (..., N, k) fp32
    coefficient states (the forecast P is formed in k dims: Taylor terms, or EMA minus last
    coefficients), ``R`` (..., N, D). With ``x``: ``out = x + gate * F_hat`` (``gate`` (..., 1, D) or
    (..., D), broadcast over tokens; no gate means 1). ``out`` may be ``x`` itself (in place) or a
    new tensor; ``None`` allocates one. Returns the result (dtype of x, else of R).
    """
    check_reconstruct_args(V, R, terms=terms, weights=weights, dR=dR, x=x, gate=gate, out=out)
    return reconstruct_compute(V, R, terms, weights, dR, dr_scale, x, gate, out)


def reconstruct_compute(V, R, terms, weights, dR, dr_scale, x, gate, out) -> torch.Tensor:
    """The body of :func:`reconstruct_reference` for arguments already checked (plans call it)."""
    # fp32 throughout; fused torch calls (addmm, in-place adds on fresh tensors) keep the CPU path,
    # which the runtime uses off-GPU, at a few passes over the feature
    D = R.shape[-1]
    fh = R.float()
    fresh = fh is not R  # may be modified in place
    if terms:
        k = V.shape[1]
        P = terms[0].reshape(-1, k) * float(weights[0])
        for w, t in zip(weights[1:], terms[1:]):
            P.add_(t.reshape(-1, k), alpha=float(w))
        fh = torch.addmm(fh.reshape(-1, D), P, V.float().T).view(R.shape)
        fresh = True
    if dR is not None and dr_scale:
        fh = fh.add_(dR.float(), alpha=float(dr_scale)) if fresh else fh.add(dR.float(), alpha=float(dr_scale))
        fresh = True
    if x is not None:
        if gate is not None:
            g = gate.float() if gate_rows_shape(R, gate) else gate.float().unsqueeze(-2)
            fh = fh.mul_(g) if fresh else fh * g
            fresh = True
        if out is x and x.dtype == torch.float32:
            return x.add_(fh)
        fh = fh.add_(x.float()) if fresh else fh + x.float()
        fresh = True
    dtype = x.dtype if x is not None else R.dtype
    if out is None:
        return fh.to(dtype) if fresh else fh.clone()
    out.copy_(fh)
    return out
