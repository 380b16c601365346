"""Calibration, PyTorch reference: streaming Gram accumulation and the basis from the Gram matrix."""
from __future__ import annotations

import os

import torch

from ..._checks import check_activation, check_like, check_rows

CHUNK_ROWS = 8192  # bounds the fp32 copy of a chunk of F


def check_gram_args(G, F) -> None:
    check_activation("F", F)
    check_rows("F", F)
    D = F.shape[-1]
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    check_like("G", G, (D, D), torch.float32, F.device)
    if not G.is_contiguous():
        raise ValueError("G must be contiguous")


@torch.no_grad()
def gram_update_reference(G: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """``G += F^T F`` in fp32 over every row of ``F`` (..., N, D), in token chunks. Returns G."""
    check_gram_args(G, F)
    rows = F.reshape(-1, F.shape[-1])
    for i in range(0, rows.shape[0], CHUNK_ROWS):
        f = rows[i : i + CHUNK_ROWS].float()
        G.addmm_(f.T, f)
    return G


def rank_for_energy(sigma: torch.Tensor, tau: float) -> int:
    """Smallest k with sum(sigma[:k]^2) / sum(sigma^2) >= tau (paper eq. 6)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    e = sigma.double() ** 2
    total = e.sum()
    if total <= 0:
        return 1
    frac = torch.cumsum(e, 0) / total
    k = int(torch.searchsorted(frac, torch.tensor(tau, dtype=frac.dtype) - 1e-12).item()) + 1
    return max(1, min(k, sigma.numel()))


@torch.no_grad()
def basis_from_gram(G: torch.Tensor, *, tau: float | None = None, k: int | None = None):
    """Right singular vectors and singular values of the stacked features behind ``G``.

    Returns ``(V, sigma, k)``: ``V`` (D, D) fp32 columns by descending ``sigma`` (D,), and the rank
    picked by energy ``tau`` (eq. 6) or fixed ``k`` (clipped to D). Signs are fixed (largest entry
    of each vector positive) so a basis is reproducible.
    """
    if (tau is None) == (k is None):
        raise ValueError("give exactly one of tau and k")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be square (D, D), got {tuple(G.shape)}")
    if not torch.isfinite(G).all():
        raise ValueError("G holds NaN or Inf: a calibration feature was not finite")
    # float64 by default; SVDCACHE_EIGH_DTYPE=float32 for a time-budgeted GPU calibration (FLUX.1-dev:
    # 228 Grams of 3072^2; fp32 eigh loses only the tail of the spectrum, below what tau ever selects)
    eig_dtype = {"float64": torch.float64, "float32": torch.float32}.get(
        os.environ.get("SVDCACHE_EIGH_DTYPE", "float64").strip() or "float64")
    if eig_dtype is None:
        raise ValueError(f"SVDCACHE_EIGH_DTYPE must be float64 or float32, got {os.environ['SVDCACHE_EIGH_DTYPE']!r}")
    Gd = 0.5 * (G.to(eig_dtype) + G.to(eig_dtype).T)
    evals, evecs = torch.linalg.eigh(Gd)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma = evals.clamp_min(0).sqrt()
    idx = evecs.abs().argmax(0)
    signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1], device=evecs.device)])
    evecs = evecs * torch.where(signs == 0, 1.0, signs)
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(int(k), G.shape[0])
    else:
        kk = rank_for_energy(sigma, tau)
    return evecs.float(), sigma.float(), kk
