"""The baselines in the same runtime (``space="full"``): FORA (reuse the whole feature) and TaylorSeer
(Taylor divided differences of the whole feature), states in the activation dtype like TaylorSeer's."""
from __future__ import annotations

import torch

from .base import FeatureCache, nbytes_of


class FullSpaceCache(FeatureCache):
    """FORA / TaylorSeer on the whole feature; states in the activation dtype (TaylorSeer's memory)."""

    @classmethod
    def applies(cls, cfg, bits) -> bool:
        return cfg.space == "full"

    def __init__(self, name: str, cfg, gain: float | None = None):
        super().__init__(name, cfg, gain)
        self.F = self.D1 = self.D2 = self.E = None

    @property
    def held_dtype(self):
        return None if self.F is None else self.F.dtype

    def update(self, F: torch.Tensor, t: float) -> None:
        cfg = self.cfg
        if self.shape != tuple(F.shape) or (self.F is not None and self.F.device != F.device):
            self.F = self.D1 = self.D2 = self.E = None
            self.times = []
            self.shape = tuple(F.shape)
        h1, h2 = self.steps_to(t)
        with torch.no_grad():
            if self.polynomial and self.n >= 1:
                d1 = (F.float() - self.F.float()) / h1
                if cfg.order >= 2 and self.n >= 2:
                    self.D2 = ((d1 - self.D1.float()) / h2).to(F.dtype)
                self.D1 = d1.to(F.dtype)
            elif cfg.predictor == "ema":
                self.E = F.clone() if self.n == 0 else torch.lerp(self.E, F, 1.0 - cfg.beta)
        self.F = F  # held, not copied
        self._push_time(F, t)

    def forecast(self, t, *, x=None, gate=None, out=None) -> torch.Tensor:
        cfg = self.cfg
        s = t - self.times[-1]
        with torch.no_grad():
            if cfg.predictor == "ema":
                fh = self.E
            else:
                fh = self.F
                if self.polynomial:
                    w = self.weights(s)
                    for wi, d in zip(w, (self.D1, self.D2)):
                        fh = fh + wi * d
            if x is None:
                return fh
            if gate is None:
                res = x + fh
            else:
                g = gate.unsqueeze(-2) if gate.dim() == x.dim() - 1 else gate  # (..., D) -> (..., 1, D)
                res = x + g * fh
            if out is not None:
                out.copy_(res)
                return out
            return res

    def nbytes(self) -> int:
        return nbytes_of(self.F, self.D1, self.D2, self.E)

    def state_tensors(self) -> list:
        return [u for u in (self.D1, self.D2, self.E) if u is not None]
