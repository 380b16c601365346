"""Full-step residual codes, PyTorch reference: the residual's divided difference, quantized per row.

``r = (F - F_prev) / h - D1 V^T`` (the part of the feature's change outside the rank-k subspace, per unit
of time; ``D1 = (F - F_prev) V / h`` was just written by the split) is stored as int8 codes, or 4-bit
codes packed two per byte, with one fp32 scale per row (symmetric absmax): the state of
``residual="int8"/"int4"`` that the cached step's reconstruct reads (svdcache.residual_cache).
"""
from __future__ import annotations

import math

import torch

from ..._checks import check_activation, check_basis, check_like, check_rows


def quantize_rows_into(r: torch.Tensor, bits: int, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Symmetric per-row quantization of an fp32 (M, D) ``r`` (clobbered) into ``q`` / ``scale`` (M, D or
    D/2) / (M, 1): ``scale = max |r| / L`` (L = 127 or 7), codes ``round(r / scale)`` (half to even). 8 bits:
    int8; 4 bits (even D): ``(q0 + 8) | (q1 + 8) << 4`` per uint8, packed in fp32 as ``q0 + 16 q1 + 136``
    (exact) and converted once: a third of the ops of packing integers."""
    L = 127.0 if bits == 8 else 7.0
    # absmax as abs + amax: the CPU's inf-norm along a dim is ~12x slower (measured at 912 x 32 fp32)
    torch.amax(r.abs(), dim=-1, keepdim=True, out=scale)
    scale.clamp_min_(1e-30).div_(L)
    r.div_(scale).round_()  # |r| / (max |r| / L) rounds to at most L: no clamp needed
    if bits == 8:
        q.copy_(r)
        return
    pair = torch.add(r[:, 0::2], r[:, 1::2], alpha=16.0)
    q.copy_(pair.add_(136.0))


def quantize_rows(r: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of :func:`quantize_rows_into` in new tensors, for any last dim: ``(q, scale)`` with ``q``
    (..., D) int8 (8 bits) or (..., ceil(D/2)) uint8 (4 bits; an odd D padded with a zero channel) and
    ``scale`` (..., 1) fp32; ``reconstruct`` reads them as ``dR_codes`` / ``dR_scales``."""
    D = r.shape[-1]
    rows = r.detach().reshape(-1, D).float()
    if bits == 4 and D % 2:
        rows = torch.nn.functional.pad(rows, (0, 1))  # a zero channel: no effect on the row's absmax
    rows = rows.clone() if rows.data_ptr() == r.data_ptr() else rows  # quantize_rows_into clobbers its input
    Dq = rows.shape[-1] if bits == 8 else rows.shape[-1] // 2
    q = torch.empty((rows.shape[0], Dq), dtype=torch.int8 if bits == 8 else torch.uint8, device=r.device)
    scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=r.device)
    quantize_rows_into(rows, bits, q, scale)
    return q.view(*r.shape[:-1], Dq), scale.view(*r.shape[:-1], 1)


def check_residual_codes_args(F, F_prev, D1, V, h, bits, codes, scales) -> None:
    check_activation("F", F)
    check_rows("F", F)
    D = F.shape[-1]
    k = check_basis(V, D)
    if V.device != F.device:
        raise ValueError(f"V is on {V.device} but F is on {F.device}")
    if F_prev is None or D1 is None or codes is None or scales is None:
        raise ValueError("residual_codes needs F_prev, D1, codes and scales")
    check_like("F_prev", F_prev, F.shape, F.dtype, F.device)
    check_like("D1", D1, (*F.shape[:-1], k), torch.float32, F.device)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 4 and D % 2:
        raise ValueError(f"4-bit codes pack two channels per byte: D must be even, got D={D}")
    qdt = torch.int8 if bits == 8 else torch.uint8
    check_like("codes", codes, (*F.shape[:-1], D if bits == 8 else D // 2), qdt, F.device)
    check_like("scales", scales, (*F.shape[:-1], 1), torch.float32, F.device)
    if not isinstance(h, (int, float)) or not math.isfinite(h) or h == 0:
        raise ValueError(f"h (step distance to the previous full step) must be a finite non-zero number, got {h!r}")


@torch.no_grad()
def residual_codes_reference(
    F: torch.Tensor,
    F_prev: torch.Tensor,
    D1: torch.Tensor,
    V: torch.Tensor,
    *,
    h: float,
    bits: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Write the codes and scales of ``r = (F - F_prev) / h - D1 V^T`` in place.

    ``F``, ``F_prev`` (..., N, D) in one activation dtype; ``D1`` (..., N, k) fp32; ``V`` (D, k);
    ``codes`` (..., N, D) int8 (``bits=8``) or (..., N, D/2) uint8 (``bits=4``, even D); ``scales``
    (..., N, 1) fp32. Everything in fp32; see :func:`quantize_rows_into` for the format.
    """
    check_residual_codes_args(F, F_prev, D1, V, h, bits, codes, scales)
    residual_codes_compute(F, F_prev, D1, V, h, bits, codes, scales)


def residual_difference(F, F_prev, D1, V, h, diff=None) -> torch.Tensor:
    """r = (F - F_prev) / h - D1 V^T as fp32 (rows, D); ``diff``: an fp32 (rows, D) ``F - F_prev`` already
    formed (the CPU split's scratch), overwritten with r."""
    D, k = F.shape[-1], V.shape[1]
    if diff is None:
        diff = (F.float() - F_prev.float()).reshape(-1, D)
    # out= rather than addmm_: torch's FLOP counter sees it (it does not see the in-place variant)
    return torch.addmm(diff, D1.reshape(-1, k), V.float().T, beta=1.0 / h, alpha=-1.0, out=diff)


def residual_codes_compute(F, F_prev, D1, V, h, bits, codes, scales, diff=None) -> None:
    """The body of :func:`residual_codes_reference` for arguments already checked (``diff``: see
    :func:`residual_difference`)."""
    if F.numel() == 0:
        return
    r = residual_difference(F, F_prev, D1, V, h, diff)
    quantize_rows_into(r, bits, codes.view(-1, codes.shape[-1]), scales.view(-1, 1))
