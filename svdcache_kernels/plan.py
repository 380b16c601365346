"""Prepared calls for the runtime's hot path: arguments validated once per layout, not per call.

A cached step calls ``reconstruct`` once per cached feature (114 times per FLUX step) and a full
step calls ``split`` as often, always with tensors of the same shapes, dtypes, devices and strides.
A plan checks the arguments of its first call exactly as the ops do (same one-line errors), resolves
the backend and, for the Triton kernels, the launch configuration; later calls with the same
layout (:func:`layout`, a few attribute reads) only pass the new pointers and scalars.

On the reference (PyTorch) backend the common runtime variants take fused paths of the same math:

- reconstruct, 0 (a first cached step: ``x + gate * R``, 1 op), 1 or 2 terms, with gate (anchor-form
  Taylor order 1 / 2, FLUX's cached step):
  ``out = x + gate * (R + w T V^T)`` as ``baddbmm`` into a shared scratch + ``addcmul`` (2 ops); two
  terms are first summed in k dims (one ``add`` into a k-wide scratch: k << D);
  with a quantized dR (``residual="int8"/"int4"``) one ``addcmul_`` of the codes and per-row scales
  in between (int4: after one gather of the nibble values, 2 ops more);
- split with F_prev, order 1 or 2 (its full step): ``D1 = (F - F_prev) V / h1`` as sub + addmm (2 ops;
  order 2: ``D2 = (D1_new - D1) / h2`` as one addmm, then ``D1 += h2 D2``, 3 ops). The call
  returns the ``F - F_prev`` it formed (a shared scratch, valid until the next plan call) so a
  quantized residual can be formed from it without a second pass over both features.

Everything else runs the reference body without its checks. The fused reference path rounds like
the unfused one up to the order of the fp32 operations (one baddbmm with alpha instead of a scaled
copy and an addmm; one addcmul instead of mul and add).
"""
from __future__ import annotations

import threading

import torch

from .dispatch import resolve_backend

_scratch = threading.local()


def layout(t):
    """What a plan depends on: shape, strides, dtype and device (None for an absent tensor)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device)


def _scratch3d(shape, dtype, device, tag=None) -> torch.Tensor:
    return _scratch2d(tuple(shape), None, dtype, device, tag)


def _scratch2d(M, D, dtype, device, tag=None) -> torch.Tensor:
    """One (M, D) work buffer (of shape M when D is None) per thread, shape, dtype, device and tag (which
    keeps two buffers of one shape apart), shared by all features: the runtime's ops run one after the other, and a buffer per feature
    would cost a copy of each."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (M, D, dtype, device, tag)
    buf = bufs.get(key)
    if buf is None:
        if len(bufs) > 8:  # shapes changed many times: drop the old buffers
            bufs.clear()
        # a normal tensor even under torch.inference_mode: an inference tensor could not be written
        # by a later call outside it (the buffers are shared by every model of the thread)
        with torch.inference_mode(False):
            buf = bufs[key] = torch.empty(M if D is None else (M, D), dtype=dtype, device=device)
    return buf


def _weights(weights):
    """Device weights (one tensor) as they are; floats as a tuple."""
    return weights if isinstance(weights, torch.Tensor) else tuple(weights)


class ReconstructPlan:
    """``reconstruct`` for a fixed layout of (V, R, terms, dR, x, gate, out); see :func:`reconstruct_reference`.

    ``n_terms``, the presence of ``dR`` (or of its quantized form ``dR_codes`` / ``dR_scales`` and
    ``dR_bits``) / ``x`` / ``gate`` / ``out`` and every tensor's layout are fixed by the first call
    (``key``); ``weights`` and ``dr_scale`` may change per call, and may be device tensors (see
    :func:`~svdcache_kernels.ops.reconstruct.reference.reconstruct_reference`).
    """

    def __init__(self, V, R, *, terms=(), weights=(), dR=None, dr_scale=0.0, x=None, gate=None, out=None,
                 backend=None, dR_codes=None, dR_scales=None, dR_bits=8):
        from .ops.reconstruct.reference import check_reconstruct_args, gate_rows_shape

        terms = tuple(terms)
        check_reconstruct_args(V, R, terms=terms, weights=_weights(weights), dR=dR, x=x, gate=gate, out=out,
                               dR_codes=dR_codes, dR_scales=dR_scales, dR_bits=dR_bits)
        self.key = self.key_of(V, R, terms, dR, x, gate, out, dR_codes, dR_scales, dR_bits)
        self.bits = dR_bits if dR_codes is not None else 0
        self.backend = resolve_backend(backend, R)
        self.n_terms = len(terms)
        self._launch = None
        self._fast = False
        if self.backend == "triton":
            from .ops.reconstruct.kernel import prepare_reconstruct

            self._launch = prepare_reconstruct(V, R, terms, dR, x, gate, out, dR_codes, dR_scales, dR_bits)
        else:
            D, k = R.shape[-1], V.shape[1]
            f32 = torch.float32
            self._fast = (
                self.n_terms in (0, 1, 2) and dR is None and (self.n_terms or dR_codes is None)
                and x is not None and gate is not None and out is not None
                and R.dim() == 3 and R.dtype == x.dtype == out.dtype == gate.dtype == V.dtype == torch.float32
                and all(t.dim() == 3 and t.dtype == torch.float32 for t in terms)
            )
            if self._fast:
                self._gate3 = not gate_rows_shape(R, gate)  # (B, D): needs a (B, 1, D) view
            if self._fast and self.n_terms:
                self._V = V
                self._Vtb = V.t().expand(R.shape[0], k, D)  # a view of the basis (held by its cache anyway)

    @staticmethod
    def key_of(V, R, terms, dR, x, gate, out, dR_codes=None, dR_scales=None, dR_bits=8) -> tuple:
        key = (layout(V), layout(R), tuple(layout(t) for t in terms), layout(dR), layout(x), layout(gate), layout(out))
        if dR_codes is None:
            return key
        return (*key, layout(dR_codes), layout(dR_scales), dR_bits)

    def __call__(self, V, R, terms, weights, dR=None, dr_scale=0.0, x=None, gate=None, out=None, dR_codes=None,
                 dR_scales=None):
        if self._launch is not None:
            return self._launch(V, R, terms, weights, dR, dr_scale, x, gate, out, dR_codes, dR_scales)
        grad = torch.is_grad_enabled()
        if grad:
            torch.set_grad_enabled(False)
        try:
            if self._fast and not (isinstance(weights, torch.Tensor) or isinstance(dr_scale, torch.Tensor)):
                if not self.n_terms:  # a first cached step (no derivative yet): out = x + gate * R, one op
                    return torch.addcmul(x, gate.unsqueeze(-2) if self._gate3 else gate, R, out=out)
                T, w = terms[0], weights[0]
                if self.n_terms == 2:
                    T, w = self._sum_terms(terms, weights)
                return self._fast_gated(V, R, T, w, x, gate, out, dR_codes, dR_scales, dr_scale)
            from .ops.reconstruct.reference import reconstruct_compute

            dRq = (dR_codes, dR_scales, self.bits) if self.bits else None
            return reconstruct_compute(V, R, tuple(terms), _weights(weights), dR, dr_scale, x, gate, out, dRq)
        finally:
            if grad:
                torch.set_grad_enabled(True)

    @staticmethod
    def _sum_terms(terms, weights):
        # w0 T0 + w1 T1 = w0 (T0 + (w1 / w0) T1): one k-wide add, the weight w0 goes to the GEMM's alpha
        (T0, T1), (w0, w1) = terms, (float(weights[0]), float(weights[1]))
        S = _scratch3d(T0.shape, T0.dtype, T0.device, tag="terms")  # never the GEMM's output buffer
        if w0 != 0.0:
            torch.add(T0, T1, alpha=w1 / w0, out=S)
            return S, w0
        torch.mul(T1, w1, out=S)
        return S, 1.0

    def _fast_gated(self, V, R, T, w, x, gate, out, codes=None, scales=None, dr_scale=0.0):
        # out = x + gate * (R + w T V^T [+ dr_scale * codes * scales]): one batched GEMM with R as its
        # input, the quantized dR added in place from its codes (no fp dR tensor), one fused gated add;
        # no view of R or T is kept (a plan never holds a generation's features alive)
        if V is not self._V:
            self._V, self._Vtb = V, V.t().expand(R.shape[0], V.shape[1], R.shape[-1])
        tmp = _scratch3d(R.shape, R.dtype, R.device)
        torch.baddbmm(R, T, self._Vtb, alpha=float(w), out=tmp)
        if self.bits and dr_scale:
            from .ops.reconstruct.reference import code_values

            tmp.addcmul_(code_values(codes, R.shape[-1], self.bits), scales, value=float(dr_scale))
        return torch.addcmul(x, gate.unsqueeze(-2) if self._gate3 else gate, tmp, out=out)


class SplitPlan:
    """``split`` for a fixed layout of its tensors and fixed ``order`` / ``ema_init``; see :func:`split_reference`.

    The step distances ``h1``, ``h2`` and ``beta`` may change per call (they are checked each call:
    a zero distance is an error, not a division by zero).
    """

    def __init__(self, F, V, *, C=None, D1=None, D2=None, E=None, R=None, dR=None, order=0, h1=1.0, h2=1.0,
                 beta=0.9, ema_init=False, F_prev=None, backend=None):
        from .ops.split.reference import check_split_args

        check_split_args(F, V, C=C, D1=D1, D2=D2, E=E, R=R, dR=dR, order=order, h1=h1, h2=h2, beta=beta,
                         F_prev=F_prev)
        self.key = self.key_of(F, V, C, D1, D2, E, R, dR, F_prev, order, ema_init)
        self.backend = resolve_backend(backend, F)
        self.order = order
        self._launch = None
        self._fast = False
        if self.backend == "triton":
            from .ops.split.kernel import prepare_split

            self._launch = prepare_split(F, V, C, D1, D2, E, R, dR, order, ema_init, F_prev)
        else:
            self._fast = (
                order in (1, 2) and F_prev is not None and C is None and E is None and R is None and dR is None
                and F.dtype == F_prev.dtype == V.dtype == torch.float32 and F.is_contiguous()
                and F_prev.is_contiguous() and D1.is_contiguous() and (order == 1 or D2.is_contiguous())
            )
            if self._fast:
                self._M, self._D = F.numel() // F.shape[-1], F.shape[-1]

    @staticmethod
    def key_of(F, V, C, D1, D2, E, R, dR, F_prev, order, ema_init, lay=None) -> tuple:
        """``lay``: the layout function (a caller that caches layouts passes its own)."""
        lay = layout if lay is None else lay
        return (tuple(lay(t) for t in (F, V, C, D1, D2, E, R, dR, F_prev)), order, bool(ema_init))

    def __call__(self, F, V, *, C=None, D1=None, D2=None, E=None, R=None, dR=None, h1=1.0, h2=1.0, beta=0.9,
                 ema_init=False, F_prev=None):
        """Runs the split; returns the fp32 ``F - F_prev`` (M, D) it formed on the fused reference path
        (a shared scratch: read it before the next plan call), else None."""
        order = self.order
        if (order >= 1 or dR is not None) and not h1:
            raise ValueError(f"h1 (step distance to the previous full step) must be non-zero, got {h1}")
        if order >= 2 and not h2:
            raise ValueError(f"h2 (step distance to the full step before the previous) must be non-zero, got {h2}")
        if self._launch is not None:
            return self._launch(F, V, C, D1, D2, E, R, dR, h1, h2, beta, F_prev)
        grad = torch.is_grad_enabled()
        if grad:
            torch.set_grad_enabled(False)
        try:
            if self._fast:
                diff = _scratch2d(self._M, self._D, F.dtype, F.device)
                torch.sub(F.view(self._M, self._D), F_prev.view(self._M, self._D), out=diff)
                d1 = D1.view(self._M, D1.shape[-1])
                if order == 1:  # the reference's (F - F_prev) @ V / h1, into D1 itself (beta 0: D1 unread)
                    torch.addmm(d1, diff, V, beta=0.0, alpha=1.0 / h1, out=d1)
                    return diff
                # D2 = (diff V / h1 - D1) / h2 in one GEMM, then D1 + h2 D2 is the new D1
                d2 = D2.view(self._M, D1.shape[-1])
                torch.addmm(d1, diff, V, beta=-1.0 / h2, alpha=1.0 / (h1 * h2), out=d2)
                d1.add_(d2, alpha=h2)
                return diff
            from .ops.split.reference import split_compute

            split_compute(F, V, C, D1, D2, E, R, dR, order, h1, h2, beta, ema_init, F_prev)
            return None
        finally:
            if grad:
                torch.set_grad_enabled(True)


class ReconstructSumPlan:
    """``reconstruct_sum`` for a fixed layout of (x, items, out); see
    :func:`svdcache_kernels.ops.reconstruct_sum.reference.reconstruct_sum_reference`. The items, their
    kinds (terms, quantized dR, gate, rows) and every tensor's layout are fixed by the first call;
    weights and ``dr_scale`` may change per call. The caller keys its plans by that layout."""

    def __init__(self, x, items, *, out=None, backend=None):
        from .ops.reconstruct_sum.reference import check_reconstruct_sum_args

        items = list(items)
        self.backend = resolve_backend(backend, x)
        check_reconstruct_sum_args(x, items, out, rows=self.backend == "triton")
        self._cache: dict = {}
        self._triton = None
        if self.backend == "triton":
            from .ops.reconstruct_sum.kernel import TritonSum

            self._triton = TritonSum(x, items, out)

    def __call__(self, x, items, out=None):
        if self._triton is not None:
            return self._triton(x, items, out)
        from .ops.reconstruct_sum.reference import reconstruct_sum_compute

        with torch.no_grad():
            return reconstruct_sum_compute(x, items, out, cache=self._cache)
