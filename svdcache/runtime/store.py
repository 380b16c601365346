"""The feature store of one cache: the basis of every feature (calibrated or built online), the feature
caches of each context (made by the forecast policies of svdcache.features), what a full step records into
them, what a cached step reads out of them, and the runtime's work buffers."""
from __future__ import annotations

import logging
import warnings

import torch

from ..basis import Basis
from ..fastpath.batched_update import defer_update
from ..features import SubspaceCache, make_feature_cache, plan_for_budget
from . import guidance
from .distributed import plain_feature
from .gains import config_gain_key
from .online_basis import OnlineBasisBuilder

logger = logging.getLogger("svdcache")

_MISSING = object()


class FeatureStore:
    """Bases, ranks and gains per feature; per-context feature caches (``st.features``); buffers."""

    def __init__(self, cfg, basis, feature_dims: dict[str, int | None], model_class: str, warn_once):
        self.cfg = cfg
        self.basis = basis
        self.feature_dims = feature_dims
        self.model_class = model_class
        self.warn_once = warn_once
        self.bases = {n: basis.subspace(cfg.subspace)[n] for n in feature_dims} if basis else {}
        self.ranks = {n: fb.rank(cfg.tau, cfg.rank) for n, fb in self.bases.items()}
        self.gains = self._fitted_gains(basis) if cfg.fitted_gains else {}
        self.unread: set[str] = set()  # features no cached step forecasts (adapters' unread_features): no cache
        self.online = OnlineBasisBuilder(cfg, warn_once) if basis is None and cfg.space == "svd" else None
        self.batched = cfg.fast_path("batched_update") != "off"  # small features' full steps in one pass per arena
        self._V: dict[str, torch.Tensor] = {}
        self._bits: dict[str, int] = {}  # residual bits per feature chosen by a memory budget
        self._plans: dict[str, dict] = {}  # per feature: prepared split / reconstruct calls by layout
        self._pending: dict[str, list] = {}  # zero-setup: features held until their basis exists
        self._buffers: dict[str, torch.Tensor] = {}  # cached forwards' output buffers (see buffer)

    def _fitted_gains(self, basis) -> dict[str, float]:
        cfg = self.cfg
        key = config_gain_key(cfg)
        table = (basis.meta.get("gains") if basis is not None else None) or {}
        gains = {n: table[n][key] * cfg.gain for n in self.feature_dims if key in table.get(n, {})}
        if len(gains) < len(self.feature_dims):
            warnings.warn(f"svdcache: the basis has no fitted gains for {key} on {len(self.feature_dims) - len(gains)} "
                          f"features; those use gain {cfg.gain}", stacklevel=5)
        return gains

    # -- features ------------------------------------------------------------------------------------
    def declare(self, name: str, D: int | None) -> None:
        """A feature first seen on a full step (adapters that learn their features from the first
        full step's outputs): it joins the features every full step must produce."""
        if name in self.feature_dims:
            return
        self.feature_dims[name] = D
        if self.basis is not None and self.cfg.space == "svd" and self.online is None:  # a calibrated basis
            sub = self.basis.subspace(self.cfg.subspace)
            if name not in sub:
                raise ValueError(f"the basis has no feature {name!r} (it holds {len(sub)} features, e.g. "
                                 f"{next(iter(sub), None)!r}); calibrate this model with the same granularity")
            self.bases[name] = sub[name]
            self.ranks[name] = sub[name].rank(self.cfg.tau, self.cfg.rank)
            if self.cfg.fitted_gains:  # as _fitted_gains does for the features known at enable
                c = self.cfg
                key = config_gain_key(c)
                g = ((self.basis.meta.get("gains") or {}).get(name) or {}).get(key)
                if g is None:
                    self.warn_once("gains", f"svdcache: the basis has no fitted gains for {key} on some "
                                   f"features; those use gain {c.gain}")
                else:
                    self.gains[name] = g * c.gain

    def forget(self, name: str, states) -> None:
        """Feature ``name`` is no longer produced by full steps (an adapter's decision about its features
        changed): it leaves the features every full step must produce, with everything held for it
        (``states``: every context's state)."""
        self.feature_dims.pop(name, None)
        for d in (self.bases, self.ranks, self.gains, self._V, self._bits, self._plans, self._pending):
            d.pop(name, None)
        if self.online is not None:
            self.online.forget(name)
        for st in states:
            st.features.pop(name, None)
            st.updated.discard(name)

    def all_updated(self, st) -> bool:
        """Every feature holds state from a full step of this context (the context may forecast)."""
        if self.feature_dims.keys() - st.updated <= self.unread:  # the common case, in set operations
            return True
        missing = [n for n in self.feature_dims if n not in st.updated and n not in self.unread]
        if missing and (self.online is None or self.online.done):
            self.warn_once("missing", f"svdcache: features {missing[:3]} were not produced by a full step; "
                           "every step is computed in full")
        return not missing

    def basis_V(self, name: str, F: torch.Tensor) -> torch.Tensor:
        """Feature ``name``'s basis (D, k) in ``F``'s dtype and device (k by tau / rank or the memory budget)."""
        V = self._V.get(name)
        if V is not None and V.device == F.device and V.dtype == F.dtype:
            return V
        fb = self.bases[name]
        if fb.D != F.shape[-1]:
            raise ValueError(f"feature {name!r}: basis has D={fb.D} but the model produced D={F.shape[-1]}")
        if self.cfg.memory_budget is not None:  # rank and residual bits from the budget (per row of F)
            self.ranks[name], self._bits[name] = plan_for_budget(
                self.cfg.memory_budget, fb.D, fb.rank(self.cfg.tau, self.cfg.rank), F.element_size(),
                warn=lambda m: self.warn_once("budget", f"svdcache: feature {name!r}: {m} (warned once)"))
        with torch.inference_mode(False):  # kept across generations: a normal tensor, whatever the mode
            V = fb.V[:, : self.ranks[name]].to(device=F.device, dtype=F.dtype).contiguous()
            if V.is_inference():  # a basis loaded under torch.inference_mode (kernels read V's version)
                V = V.clone()
        self._V[name] = V
        return V

    # -- full steps ----------------------------------------------------------------------------------
    def record(self, st, name: str, F, ctx_name: str) -> None:
        """Feature ``name`` of the full call in progress (context state ``st``)."""
        if F is None:
            st.features[name] = None
            st.updated.add(name)
            return
        if type(F) is not torch.Tensor:  # tensor parallelism: a pending all-reduce or a DTensor
            F = plain_feature(name, F)
        fc = st.features.get(name)
        if fc is not None and st.partner is None and self.batched and defer_update(st, fc, F, st.t):
            st.updated.add(name)  # with its arena's batched update at the end of the call
            return
        if self.cfg.space == "svd" and name not in self.bases:
            # zero-setup: hold the feature until its online basis exists, then replay it, so the
            # first generation's caches start with the whole warm-up history
            pending = self._pending.setdefault(name, [])
            if pending and pending[0][0].generation != pending[0][1]:
                # a generation ended before the basis was built (e.g. NaN features): never replayed
                pending[:] = [p for p in pending if p[0].generation == p[1]]
            pending.append((st, st.generation, F, st.t))
            built = self.online.collect(name, F, ctx_name)
            if built is None:
                return
            self._adopt(name, built)
            for s, gen, Fp, tp in self._pending.pop(name):
                if s.generation == gen:
                    self.update(s, name, Fp, tp, charge=st)
            return
        self.update(st, name, F, st.t)

    def update(self, st, name: str, F: torch.Tensor, t: float, charge=None) -> None:
        """One feature cache's full-step update (``charge``: the state of the call that pays its FLOPs, ``st``
        by default)."""
        if name in self.unread:  # recorded (a basis built online holds it) but never forecast: no state kept
            st.features[name] = None
            st.updated.add(name)
            return
        fc = st.features.get(name)
        relative = False
        if st.partner is not None or getattr(fc, "relative", False):
            # the unconditional branch (guidance): the difference to the conditional feature of the step
            F, relative = guidance.difference(st, name, F)
            if fc is not None and fc.relative != relative:
                fc = None  # one form per history: the other starts over
        held = None if fc is None else fc.held_dtype
        if held is not None and held != F.dtype:
            # e.g. autocast turned on or off mid-generation: this feature's history starts over (its
            # forecasts reuse the new feature until it has two), instead of mixing dtypes
            logger.info("svdcache: feature %s changed dtype (%s -> %s): its history starts over", name, held, F.dtype)
            fc = None
            st.capture_plan = None  # the plan holds the old cache
        if fc is None:
            V = self.basis_V(name, F) if self.cfg.space == "svd" else None
            fc = st.features[name] = make_feature_cache(name, self.cfg, V, self.gains.get(name), self._bits.get(name),
                                                        plans=self._plans.setdefault(name, {}), relative=relative)
            st.mem = None  # measured again (Accounting.measure_memory)
        elif isinstance(fc, SubspaceCache) and not fc.basis_fits(F):
            fc.set_basis(self.basis_V(name, F))
        try:
            fc.update(F, t)
        except (ValueError, TypeError) as e:
            raise type(e)(f"svdcache feature {name!r}: {e}") from None
        st.updated.add(name)
        (st if charge is None else charge).call_cache_flops += fc.update_flops

    def _adopt(self, name, fb) -> None:
        """A feature's basis, built online from the first full steps, joins the model's basis."""
        self.bases[name] = fb
        self.ranks[name] = fb.rank(self.cfg.tau, self.cfg.rank)
        if self.basis is None and set(self.bases) >= set(self.feature_dims):
            meta = {"model_class": self.model_class, "source": "online", "tau": self.cfg.tau}
            if self.cfg.subspace == "change":  # the online SVD of changes stands for both
                self.basis = Basis(dict(self.bases), meta, changes=dict(self.bases))
            else:
                self.basis = Basis(dict(self.bases), meta)

    # -- cached steps --------------------------------------------------------------------------------
    def forecast(self, st, name: str, *, x=None, gate=None, out=None):
        """Feature ``name`` at the cached call's time (``x + gate * F_hat`` with ``x``, into ``out``)."""
        fc = st.features.get(name, _MISSING)
        if fc is _MISSING:  # ready implies every feature was updated (or is unread: none held)
            if name in self.unread:
                return None
            raise RuntimeError(f"svdcache: no cached state for feature {name!r} on a cached step")
        if fc is None:
            return None
        if x is not None and fc.shape is not None and x.shape != fc.shape:
            # a stream that enters a block with batch 1 and leaves it broadcast to the batch (FLUX's
            # text stream with one negative prompt for a batch of images)
            if out is not None and out is not x and tuple(out.shape) == fc.shape:
                x = out.copy_(x)  # broadcast into the output buffer, then in place
            else:
                x = x.expand(fc.shape).contiguous()
        if fc.relative:  # the unconditional branch: F_cond of the step + D_hat
            merged = guidance.forecast(st, name, fc, x, gate, out)
            if merged is not None:
                st.call_cache_flops += merged[1]
                return merged[0]
            xc, flops = guidance.base_input(st, name, fc, x, gate, out)
            if xc is None:
                raise RuntimeError(f"svdcache: the conditional branch holds no feature {name!r} for this step")
            if x is None:
                gate = out = None
            x = xc
            st.call_cache_flops += flops
        res = fc.forecast(st.t, x=x, gate=gate, out=out)
        st.call_cache_flops += fc.forecast_flops
        return res

    def buffer(self, key: str, shape, dtype, device) -> torch.Tensor:
        """A work tensor for cached block outputs, reused by every cached call (one per key; replaced
        when the shape, dtype or device changes). Only cached forwards write it, and what they
        return from it is consumed by the next block of the same call."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            with torch.inference_mode(False):  # written by later calls, under torch.inference_mode or not
                buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def buffer_keys(self) -> set[str]:
        return set(self._buffers)
