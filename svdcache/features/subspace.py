"""Forecasts in the coefficient space of a fixed basis V (D, k) (``space="svd"``).

The k-dim states C = F V, divided differences D1/D2 or EMA E, all fp32. With the residual reused
(the anchor form) no residual is stored at all: F_hat = P V^T + R with R = F - C V^T equals
F_last + (P - C_last) V^T, so the last full-step feature itself (held by reference, not copied) is the
anchor and the full step only projects (one read of F). The residual-Taylor policies (``residual=
"taylor"/"damped"``) keep R and dR explicitly; EMA (the paper's eq. 11) keeps C and E.
"""
from __future__ import annotations

import weakref

import torch

import svdcache_kernels as K
from svdcache_kernels.plan import layout as plan_layout

from .base import FeatureCache, nbytes_of


class SubspaceCache(FeatureCache):
    needs_basis = True

    @classmethod
    def applies(cls, cfg, bits) -> bool:
        return cfg.space == "svd"

    @classmethod
    def create(cls, name, cfg, V, gain, bits):
        return cls(name, cfg, V, gain)

    def __init__(self, name: str, cfg, V: torch.Tensor, gain: float | None = None):
        super().__init__(name, cfg, gain)
        self.V = V  # (D, k), activation dtype, on the model's device
        self.anchor_form = cfg.residual == "reuse"
        # C is kept between steps only where a forecast reads it (EMA: E - C_last; residual forms:
        # C V^T + R). Anchor-form Taylor projects F - F_prev at the next full step instead (F_prev is
        # held anyway): k fp32 values per token less memory for one extra read of F_prev.
        self.keep_C = cfg.predictor == "ema" or not self.anchor_form
        self.C = self.D1 = self.D2 = self.E = None
        self.R = self.dR = None  # anchor (reference to F_last) or explicit residual
        self.update_flops = self.forecast_flops = 0

    @property
    def held_dtype(self):
        return None if self.R is None else self.R.dtype

    def basis_fits(self, F: torch.Tensor) -> bool:
        """Its basis is in ``F``'s dtype and on its device."""
        return self.V.dtype == F.dtype and self.V.device == F.device

    def set_basis(self, V: torch.Tensor) -> None:
        """The same basis in another dtype / on another device (the features' changed)."""
        self.V = V

    # -- what the fast paths (svdcache.fastpath) ask of it: they never write its state themselves ------------
    def adopt_storage(self, views: dict) -> None:
        """Its state tensors named in ``views`` now live there (a fast path's stacked storage, which already
        holds their values): an arena's slot, or a buffer that stays put for CUDA graphs."""
        for a, v in views.items():
            setattr(self, a, v)
        self._own = {}  # its layout cache held the replaced tensors
        lp = self.__dict__.get("_lprev")
        if lp is not None and "R" in views:
            self._lprev = (views["R"], lp[1])  # the anchor's layout, on the new storage (the old tensor released)

    def pinned_anchor(self) -> torch.Tensor:
        """A buffer of its anchor's layout that stays put across full steps (CUDA graphs read fixed addresses)."""
        R, buf = self.R, self.__dict__.get("_pin")
        if buf is None or buf.shape != R.shape or buf.stride() != R.stride() or buf.dtype != R.dtype or buf.device != R.device:
            buf = self._pin = torch.empty_strided(R.size(), R.stride(), dtype=R.dtype, device=R.device)
        return buf

    def commit_stacked(self, times: list, anchor: torch.Tensor, codes, nbytes: int, flops: int, state_key) -> None:
        """A stacked full-step update (svdcache.fastpath.batched_update) wrote its new D1 / D2 / codes into
        the storage this cache adopted: take the step's time, anchor, codes (``(rq, rs)``, or None for none
        yet), sizes and the storage's state key."""
        self.times = times
        if anchor is not None:
            self.R = anchor
            self.feature_nbytes = nbytes
            self.update_flops = flops
            if codes is not None or hasattr(self, "rq"):
                self.rq, self.rs = codes if codes is not None else (None, None)
            self.state_key = state_key
            self._lprev = (self.R, state_key[1])

    def state_of(self) -> tuple:
        """Its state tensors in the order of :attr:`state_key` (V, R, C, D1, D2, E, dR, then any codes)."""
        return (self.V, self.R, self.C, self.D1, self.D2, self.E, self.dR)

    def _alloc(self, F: torch.Tensor) -> None:
        cfg = self.cfg
        new = lambda: torch.empty(self._cshape(F), dtype=torch.float32, device=F.device)  # noqa: E731
        self.C = new() if self.keep_C else None
        self.D1 = new() if self.polynomial else None
        self.D2 = new() if self.polynomial and cfg.order == 2 else None
        self.E = new() if cfg.predictor == "ema" else None
        if not self.anchor_form:
            self.R = torch.empty_like(F)
            self.dR = torch.empty_like(F)
        self.shape = tuple(F.shape)
        self.device = F.device

    def _cshape(self, F):
        return (*F.shape[:-1], self.V.shape[1])

    def update(self, F: torch.Tensor, t: float) -> None:
        self._update(F, t)

    def _update(self, F: torch.Tensor, t: float):
        """The full step's update; returns the fp32 (rows, D) ``F - F_prev`` where the split formed one
        (a shared scratch, valid until the next plan call), else None."""
        cfg = self.cfg
        diff = None
        if self.shape != tuple(F.shape) or self.device != F.device:
            self._alloc(F)
            self.times = []
        h1, h2 = self.steps_to(t)
        order = min(cfg.order, self.n) if self.polynomial else 0
        proj = 2 * (F.numel() // F.shape[-1]) * F.shape[-1] * self.V.shape[1]  # one F V
        if self.keep_C:
            self._split(
                F, self.V, C=self.C,
                D1=self.D1 if order >= 1 else None, D2=self.D2 if order >= 2 else None, E=self.E,
                R=None if self.anchor_form else self.R,
                dR=None if self.anchor_form or self.n == 0 else self.dR,
                order=order, h1=h1, h2=h2, beta=cfg.beta, ema_init=self.n == 0, backend=cfg.backend,
            )
            self.update_flops = proj * (1 if self.anchor_form else 2)
        elif order >= 1:  # D1 = (F - F_prev) V / h1: one projection, no coefficients kept
            diff = self._split(F, self.V, D1=self.D1, D2=self.D2 if order >= 2 else None, order=order, h1=h1,
                               h2=h2, F_prev=self.R, backend=cfg.backend)
            self.update_flops = proj
        else:
            self.update_flops = 0  # reuse, or a first full step: F itself is the whole state
        if self.anchor_form:
            self.R = F  # held, not copied: R + C V^T is F itself
        self._push_time(F, t)
        # what a reconstruct plan depends on besides x / gate / out: read once per full step
        self.state_key = tuple(self._layout(u) for u in (self.V, self.R, self.C, self.D1, self.D2, self.E, self.dR))
        self._lprev = (self.R, self.state_key[1])  # the anchor's layout: the next split's F_prev
        return diff

    def _layout(self, u):
        """plan_layout(u), read once per tensor this cache owns (its states, the basis: replaced only when
        the shape changes) and per full step for the feature: a full step reads a handful, not dozens."""
        if u is None:
            return None
        own = self.__dict__.get("_own")
        if own is None:
            own = self._own = {}
        ent = own.get(id(u))
        if ent is not None and ent[0] is u:
            return ent[1]
        lay = plan_layout(u)
        if u is self.V or any(u is t for t in (self.C, self.D1, self.D2, self.E, self.dR, getattr(self, "rq", None),
                                               getattr(self, "rs", None))):
            if len(own) > 16:
                own.clear()
            own[id(u)] = (u, lay)  # held: an id is not reused while the entry lives
        else:
            lp = self.__dict__.get("_lprev")
            if lp is not None and lp[0] is u:
                return lp[1]
        return lay

    def _split(self, F, V, *, backend=None, **kw) -> None:
        """K.split through a plan: arguments validated once per layout (a few per feature: the first
        full steps have less history), not on every full step."""
        key = K.SplitPlan.key_of(F, V, kw.get("C"), kw.get("D1"), kw.get("D2"), kw.get("E"), kw.get("R"),
                                 kw.get("dR"), kw.get("F_prev"), kw.get("order", 0), kw.get("ema_init", False),
                                 lay=self._layout)  # layouts read once per owned tensor
        plans = self.plans  # shared by this feature's caches across generations (see hooks)
        plan = plans.get(key)
        if plan is None:
            if len(plans) > 8:
                plans.clear()
            plan = plans[key] = K.SplitPlan(F, V, backend=backend, **kw)
        kw.pop("order", None)
        return plan(F, V, **kw)

    def reconstruct(self, terms, weights, dR, dr_scale, x, gate, out, dRq=None, foreign=()) -> torch.Tensor:
        """K.reconstruct through a plan: validated once per layout of x / gate / out and of the state.
        ``dRq``: ``(codes, scales, bits)`` of a quantized dR, read by the op itself (one launch on a GPU);
        the cache's own state, replaced only at a full step (which renews the state key). ``foreign``:
        the coefficient terms among ``terms`` that are not this cache's state (their layouts join the key)."""
        sk = getattr(self, "state_key", None)
        if foreign:
            sk = (sk, tuple(plan_layout(u) for u in foreign))
        fast = getattr(self, "_rfast", None)
        dk = (dR is not None) if dRq is None else dRq[2]  # kind of dR term: none / fp / 8 / 4 bits
        qc, qs = (None, None) if dRq is None else dRq[:2]
        if (fast is not None and not foreign and x is out and fast[0] is sk and fast[1] == len(terms) and fast[2] == dk
                and fast[3]() is gate and fast[4]() is out):
            # the same state, gate and output tensors as the last call (the runtime's buffers), in place:
            # their layouts cannot have changed, so the plan needs no layout check
            return self._rplan(self.V, self.R, terms, weights, dR, dr_scale, x, gate, out, qc, qs)
        key = (sk, len(terms), dk, plan_layout(x), plan_layout(gate), plan_layout(out), plan_layout(qc), plan_layout(qs))
        plan = getattr(self, "_rplan", None)
        if plan is None or self._rkey != key:
            plan = self.plans.get(key)
            if plan is None:
                if len(self.plans) > 8:
                    self.plans.clear()
                plan = self.plans[key] = K.ReconstructPlan(
                    self.V, self.R, terms=terms, weights=weights, dR=dR, dr_scale=dr_scale, x=x, gate=gate, out=out,
                    backend=self.cfg.backend, dR_codes=qc, dR_scales=qs, dR_bits=dk if dRq is not None else 8)
            self._rplan, self._rkey = plan, key
        self._rfast = None
        if x is out and gate is not None and out is not None and not foreign:  # weak: a plan keeps no call's tensors alive
            self._rfast = (sk, len(terms), dk, weakref.ref(gate), weakref.ref(out))
        return plan(self.V, self.R, terms, weights, dR, dr_scale, x, gate, out, qc, qs)

    def reconstruct_flops(self) -> int:
        """FLOPs of one reconstruct with coefficient terms: (rows, k) @ (k, D)."""
        return 2 * (self.R.numel() // self.R.shape[-1]) * self.R.shape[-1] * self.V.shape[1]

    def forecast_terms(self, t):
        """The forecast at ``t`` as ``(terms, weights, dRq, dr_scale)`` of F_hat = R + (sum_i w_i T_i) V^T
        (+ dr_scale * dRq), R the anchor; None where the state is not of that form (EMA, explicit R)."""
        if not self.anchor_form or not self.polynomial or self.n < 1:
            return None
        w = self.weights(t - self.times[-1])
        return [self.D1, self.D2][: len(w)], w, None, 0.0

    def weights_key(self):
        """What the weights and ``dr_scale`` of :meth:`forecast_terms` depend on besides ``t``: caches with
        equal keys get equal weights at every ``t`` (a deferred sum forms them once per key)."""
        return (type(self), self.cfg.predictor, self.cfg.order, self.anchor_form, tuple(self.times), self.gain,
                getattr(self, "rq", None) is None)

    def forecast(self, t, *, x=None, gate=None, out=None) -> torch.Tensor:
        cfg = self.cfg
        s = t - self.times[-1]
        terms, weights = [], []
        if self.polynomial:
            w = self.weights(s)
            terms, weights = [self.D1, self.D2][: len(w)], w
        elif cfg.predictor == "ema":
            terms, weights = [self.E], [1.0]
            if self.anchor_form:
                terms, weights = [self.E, self.C], [1.0, -1.0]
        if not self.anchor_form and cfg.predictor != "ema":
            terms, weights = [self.C, *terms], [1.0, *weights]
        dR, dr_scale = None, 0.0
        if not self.anchor_form and self.n >= 2:
            dR = self.dR
            dr_scale = s * (cfg.residual_gain if cfg.residual == "damped" else 1.0)
        self.forecast_flops = self.reconstruct_flops() if terms else 0
        if not terms and dR is None and x is None:
            return self.R
        return self.reconstruct(terms, weights, dR, dr_scale, x, gate, out)

    def nbytes(self) -> int:
        return nbytes_of(self.C, self.D1, self.D2, self.E, self.R, self.dR if not self.anchor_form else None)

    def state_tensors(self) -> list:
        """The k-dim states (and an explicit dR) a forecast reads besides the anchor: a non-finite
        feature makes them non-finite, so checking them at a full step guards the next cached steps."""
        if self.n < 2:  # D1 (and dR) hold no value yet; the forecast reads none of them
            return [u for u in (self.C, self.E) if u is not None and self.n >= 1]
        return [u for u in (self.C, self.D1, self.D2 if self.n >= 3 else None, self.E,
                            None if self.anchor_form else self.dR) if u is not None]
