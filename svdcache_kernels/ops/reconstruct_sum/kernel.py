"""Many features' gated forecasts summed into one stream on the Triton backend: the reconstruct
kernel once per feature, chained in place on the stream (``out = out + gate * F_hat``), so a cached
step launches one kernel per feature and no other op per feature. Features with rows the stream does
not read (``rows > 0``: FLUX's single blocks hold the text rows first) are reconstructed over all their
rows into a workspace holding the stream in their rows ``rows : rows + N``; the others are dropped. (One
kernel for all features, reading a table of their pointers, would make it one launch: not built.)"""
from __future__ import annotations

import torch

from ... import plan as _plan
from .reference import check_reconstruct_sum_args


class TritonSum:
    """A prepared chain of reconstruct launches for a fixed layout of (x, items, out)."""

    def __init__(self, x, items, out):
        N = x.shape[-2]
        self.direct = [it.rows == 0 and it.R.shape[-2] == N for it in items]  # in place on the stream
        # the stream's own rows first, then by workspace
        self.order = sorted(range(len(items)), key=lambda i: (not self.direct[i], items[i].rows, items[i].R.shape[-2]))
        self.ws = {}
        tgt = out if out is not None else x
        self.plans = {}
        for i in self.order:
            it = items[i]
            t = tgt
            if not self.direct[i]:
                key = (it.rows, it.R.shape[-2])
                if key not in self.ws:
                    self.ws[key] = torch.zeros((*it.R.shape[:-2], it.R.shape[-2], it.R.shape[-1]), dtype=x.dtype,
                                               device=x.device)
                t = self.ws[key]
            self.plans[i] = _plan.ReconstructPlan(
                it.V, it.R, terms=it.terms, weights=it.weights, x=t, gate=it.gate, out=t, dr_scale=it.dr_scale,
                backend="triton", dR_codes=it.codes, dR_scales=it.scales, dR_bits=it.bits)

    def __call__(self, x, items, out):
        N = x.shape[-2]
        y = out if out is not None else torch.empty_like(x)
        if y is not x:
            y.copy_(x)
        cur = None  # the workspace being accumulated, and its stream rows
        for i in self.order:
            it = items[i]
            t = y
            if not self.direct[i]:
                key = (it.rows, it.R.shape[-2])
                if cur is None or cur[0] != key:
                    if cur is not None:
                        y.copy_(cur[2])
                    ws = self.ws[key]
                    ws.zero_()  # the dropped rows: no values carried from call to call
                    rows = ws[..., it.rows:it.rows + N, :]
                    rows.copy_(y)
                    cur = (key, ws, rows)
                t = cur[1]
            self.plans[i](it.V, it.R, it.terms, it.weights, None, it.dr_scale, t, it.gate, t, it.codes, it.scales)
        if cur is not None:
            y.copy_(cur[2])
        return y


def reconstruct_sum_triton(x, items, *, out=None):
    """:func:`reconstruct_sum_reference` as a chain of reconstruct kernel launches (one per feature)."""
    items = list(items)
    check_reconstruct_sum_args(x, items, out, rows=True)
    return TritonSum(x, items, out)(x, items, out)
