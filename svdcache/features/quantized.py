"""``residual="int8"/"int4"``: keep the change that leaves the subspace, its first difference in 8 / 4 bits.

With the residual reused (the default anchor form), the part of each interval's change outside the
rank-k subspace is dropped: F_hat = F_last + s * D1 V^T. This cache also keeps that part,

    r = (F - F_prev) / h - D1 V^T        (the residual's divided difference, (..., N, D)),

quantized to int8 (or int4, two per byte) with one fp32 scale per token (symmetric absmax), so a
cached step forecasts

    F_hat = F_last + s * (D1 V^T + r_q)

which is first-order Taylor in full space (TaylorSeer) with the principal part of the derivative held
exactly in k dims and the rest at 8 (4) bits: 1 + k/D + 1/4 (1/8) copies of fp32 features, 1 + 2k/D +
1/2 (1/4) of bf16 ones, where TaylorSeer holds 2. The residual is small where the subspace is good, so its
quantization error is small against the forecast's own.
"""
from __future__ import annotations

import torch

from svdcache_kernels import quantize_rows, resolve_backend, residual_codes
from svdcache_kernels.ops.residual_codes import residual_codes_compute, residual_difference

from ..config import POLYNOMIAL
from .base import nbytes_of
from .subspace import SubspaceCache


class QuantizedResidualCache(SubspaceCache):
    """Anchor-form Taylor in the subspace plus the quantized residual difference (``residual="int8"`` or
    ``"int4"``; ``bits`` may be set per feature by a memory budget)."""

    @classmethod
    def applies(cls, cfg, bits) -> bool:
        return cfg.space == "svd" and cfg.predictor in POLYNOMIAL and (cfg.residual in ("int8", "int4") or bits is not None)

    @classmethod
    def create(cls, name, cfg, V, gain, bits):
        return cls(name, cfg, V, gain, bits)

    def __init__(self, name, cfg, V, gain=None, bits: int | None = None):
        super().__init__(name, cfg, V, gain)
        self.bits = bits if bits is not None else (4 if cfg.residual == "int4" else 8)
        self.anchor_form = True  # F_last is the anchor; no explicit R
        self.keep_C = False
        self.rq = self.rs = None

    def update(self, F: torch.Tensor, t: float) -> None:
        same = self.shape == tuple(F.shape) and self.device == F.device
        F_prev = self.R if same else None
        diff = self._update(F, t)  # D1 = (F - F_prev) V / h (one projection), F held as the anchor
        rq, rs = self.rq, self.rs
        self.rq = self.rs = None
        if not self.bits or F_prev is None or self.n < 2 or self.D1 is None:
            return
        with torch.no_grad():
            h = self.times[-1] - self.times[-2]
            D = F.shape[-1]
            odd4 = self.bits == 4 and D % 2
            # on the Triton backend the split kernel formed no F - F_prev: r and its codes in one fused pass
            fused = (diff is None and not odd4 and F_prev.dtype == F.dtype
                     and resolve_backend(self.cfg.backend, F) == "triton")
            if not odd4:
                # the last full step's buffers are overwritten: no cached step reads them any more
                qshape = (*F.shape[:-1], D if self.bits == 8 else D // 2)
                dt = torch.int8 if self.bits == 8 else torch.uint8
                if rq is None or rq.shape != qshape or rq.dtype != dt or rq.device != F.device:
                    rq = torch.empty(qshape, dtype=dt, device=F.device)
                    rs = torch.empty((*F.shape[:-1], 1), dtype=torch.float32, device=F.device)
            if fused:
                residual_codes(F, F_prev, self.D1, self.V, h=h, bits=self.bits, codes=rq, scales=rs, backend="triton")
            elif odd4:  # 4-bit codes of an odd D: quantize_rows pads the last byte
                rq, rs = quantize_rows(residual_difference(F, F_prev, self.D1, self.V, h, diff).view(F.shape), 4)
            else:
                residual_codes_compute(F, F_prev, self.D1, self.V, h, self.bits, rq, rs, diff=diff)
            self.rq, self.rs = rq, rs
            # the codes' layouts join the state key (a plan that reads them is keyed by it)
            self.state_key = (*self.state_key, self._layout(self.rq), self._layout(self.rs))
        self.update_flops += 2 * (F.numel() // D) * D * self.V.shape[1]

    def forecast_terms(self, t):
        if self.rq is None or self.n < 1:
            return super().forecast_terms(t)
        s = t - self.times[-1]
        w = self.weights(s)
        return [self.D1, self.D2][: len(w)], w, (self.rq, self.rs, self.bits), self.residual_weight(s)

    def forecast(self, t, *, x=None, gate=None, out=None) -> torch.Tensor:
        if self.rq is None:
            return super().forecast(t, x=x, gate=gate, out=out)
        terms, w, dRq, dr_scale = self.forecast_terms(t)
        self.forecast_flops = self.reconstruct_flops()
        # the codes and scales go to the op as they are: it dequantizes them itself (one kernel launch
        # per feature on a GPU, no full-size fp dR); the plan is checked once per layout
        return self.reconstruct(terms, w, None, dr_scale, x, gate, out, dRq=dRq)

    def nbytes(self) -> int:
        return super().nbytes() + nbytes_of(self.rq, self.rs)

    def state_of(self) -> tuple:
        return super().state_of() + ((self.rq, self.rs) if self.rq is not None else ())

    def state_tensors(self) -> list:
        # a non-finite residual difference shows in its per-row scales (the int codes are always finite)
        return super().state_tensors() + ([self.rs] if self.rs is not None else [])


def plan_for_budget(budget: float, D: int, k: int, elem_bytes: int, warn=None) -> tuple[int, int]:
    """(rank, residual bits) of one feature under a cache-memory budget in copies of the feature.

    Per token the cache holds the feature itself (1 copy: the anchor), k fp32 coefficients of its
    difference, and, if they fit, the residual difference at 8 or 4 bits plus one fp32 scale. The
    rank is capped first (down to 1), then the most residual bits that fit are taken (0: reused).
    A budget below the smallest cache (rank 1) gets that, and ``warn(message)`` is called."""
    avail = (budget - 1.0) * D * elem_bytes
    k = max(1, min(k, int(avail // 4)))
    if 4 * k > avail and warn is not None:
        least = 1.0 + 4.0 / (D * elem_bytes)
        warn(f"memory_budget={budget:g} cannot be met for a feature of D={D} in {8 * elem_bytes}-bit floats: its "
             f"smallest cache (rank 1) holds {least:.4f} copies; set memory_budget >= {-(-least * 1e4 // 1) / 1e4:.4f}")
    rest = avail - 4 * k - 4
    bits = 8 if rest >= D else 4 if rest >= (D + 1) // 2 else 0
    return k, bits
