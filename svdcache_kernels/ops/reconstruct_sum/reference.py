"""Many cached features' gated forecasts summed into one stream, PyTorch reference:

    out = x + sum_f gate_f * F_hat_f[rows_f],   F_hat_f = R_f + (sum_i w_fi T_fi) V_f^T + s_f * dequant(codes_f)

the whole image stream of a cached transformer call whose blocks only add gated forecasts to it
(FLUX: every double and single block at module level). One term per feature is a :class:`SumTerm`,
the arguments of ``reconstruct`` for that feature (anchor ``R``, coefficient ``terms`` / ``weights``,
optional quantized dR) and ``rows``: the feature's rows ``rows : rows + N`` feed the stream's N rows
(FLUX's single blocks hold the text rows first). The features of a call are processed in a few
batched ops per group of like features instead of several per feature (the host cost of a cached
step is per op):

- anchors, codes, scales and gates are stacked (one op each), the anchor and residual parts of all
  features are formed and gated together, then summed over features;
- the subspace parts take one GEMM for all features: sum_f (P_f V_f^T) * g_f = [P_1 .. P_F] @
  [V_1^T * g_1; ..; V_F^T * g_F] (the gates scale the basis rows, so the ranks may differ).

Chunks bound the stacked fp32 work tensor (``chunk_elems``): memory stays a few features' worth.
Sums are in fp32 and rounded once, where a chain of per-feature reconstructs rounds after each one.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..._checks import check_activation
from ..reconstruct.reference import (
    check_device_weights,
    check_reconstruct_args,
    code_values,
    gate_rows_shape,
    reconstruct_compute,
)

#: fp32 elements of the stacked work tensor of one chunk (256 MiB)
CHUNK_ELEMS = 1 << 26
#: stream elements (B N D) up to which features are stacked; above, each is summed on its own (the same
#: fused ops as a per-feature reconstruct). Stacking saves ops but costs about two passes over each
#: feature: on the 2-core CPU it wins at 512 elements (the FLUX-shaped host-overhead proxy: 0.11x -> 0.09x
#: of an uncached call) and is a wash at 82K (the embedded demo's batch of 10).
STACK_ELEMS = 1 << 15


class SumTerm(NamedTuple):
    """One feature of :func:`reconstruct_sum`: ``reconstruct``'s arguments for it (``codes`` /
    ``scales`` / ``bits`` = ``dR_codes`` / ``dR_scales`` / ``dR_bits``, weighed by ``dr_scale``), and
    the first of its rows that feed the stream. ``weights`` / ``dr_scale`` may be device tensors (see
    :func:`~svdcache_kernels.ops.reconstruct.reference.reconstruct_reference`)."""

    V: torch.Tensor
    R: torch.Tensor
    terms: Sequence[torch.Tensor] = ()
    weights: Sequence[float] | torch.Tensor = ()
    gate: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    bits: int = 8
    dr_scale: float | torch.Tensor = 0.0
    rows: int = 0


def check_reconstruct_sum_args(x, items, out, rows: bool = False) -> None:
    """``rows``: every item's tensors flatten to rows as views (the Triton backend's reconstruct kernel
    reads them so); the reference reads any strides."""
    check_activation("x", x)
    if not items:
        raise ValueError("reconstruct_sum needs at least one term")
    batch, N, D = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    for i, it in enumerate(items):
        if not isinstance(it, SumTerm):
            raise TypeError(f"items[{i}] must be a SumTerm, got {type(it).__name__}")
        R = it.R
        check_device_weights(it.weights, R.device, it.dr_scale)
        check_reconstruct_args(it.V, R, terms=tuple(it.terms), weights=_w(it.weights), dR=None, x=None,
                               gate=None, out=None, dR_codes=it.codes, dR_scales=it.scales, dR_bits=it.bits,
                               rows=rows)
        if not isinstance(it.rows, int) or it.rows < 0:
            raise ValueError(f"items[{i}].rows must be a non-negative int, got {it.rows!r}")
        if tuple(R.shape[:-2]) != batch or R.shape[-1] != D or R.shape[-2] < it.rows + N:
            raise ValueError(f"items[{i}].R {tuple(R.shape)} does not hold rows {it.rows}:{it.rows + N} "
                             f"of a stream {tuple(x.shape)}")
        if R.device != x.device:
            raise ValueError(f"items[{i}].R is on {R.device} but x is on {x.device}")
        g = it.gate
        if g is not None:
            if not isinstance(g, torch.Tensor) or g.device != x.device:
                raise ValueError(f"items[{i}].gate must be a tensor on {x.device}")
            gate_rows_shape(x, g)
    if out is not None and (tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must be like x {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")


@torch.no_grad()
def reconstruct_sum_reference(x: torch.Tensor, items: Sequence[SumTerm], *, out: torch.Tensor | None = None,
                              chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """``out = x + sum_f gate_f * F_hat_f[..., rows_f:rows_f + N, :]`` (see the module docstring); ``out``
    may be ``x`` (in place) or None (a new tensor). Returns the result (dtype of x)."""
    items = list(items)
    check_reconstruct_sum_args(x, items, out)
    return reconstruct_sum_compute(x, items, out, chunk_elems)


def reconstruct_sum_compute(x, items, out, chunk_elems=CHUNK_ELEMS, cache=None) -> torch.Tensor:
    """The body of :func:`reconstruct_sum_reference` for checked arguments. Plans pass a ``cache`` dict
    for what depends on the layout only (each group's basis-row -> feature index, weight ratios)."""
    N, D = x.shape[-2], x.shape[-1]
    per = max(1, chunk_elems // max(1, x.numel()))
    # features with the same rows (offset and count), residual kind and dtype are stacked together
    groups: dict = {}
    for it in items:
        q = it.bits if it.codes is not None else 0  # not by dr_scale's value: a plan's groups stay fixed
        groups.setdefault((it.rows, it.R.shape[-2], q, it.R.dtype), []).append(it)
    acc = None  # fp32 sum of the gated forecasts; x is added last (x may be out)
    for gk, group in groups.items():
        if x.numel() > STACK_ELEMS:
            acc = _accumulate_each(acc, group, gk[0], N, x)
            continue
        for i in range(0, len(group), per):
            acc = _accumulate(acc, group[i:i + per], gk[2], gk[0], N, D, cache, (gk, i))
    if out is None:
        return acc.add_(x).to(x.dtype) if x.dtype != torch.float32 else acc.add_(x)
    return torch.add(x, acc, out=out)


def _accumulate_each(acc, group, row_offset, N, x) -> torch.Tensor:
    """acc + sum of gate * F_hat, one feature at a time (large features: no stacking copies)."""
    if acc is None:
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for it in group:
        rs = lambda t: None if t is None else _rows(t, row_offset, N)  # noqa: E731
        dRq = (rs(it.codes), rs(it.scales), it.bits) if it.codes is not None else None
        ones = None if it.gate is not None else acc.new_ones(x.shape[-1]).expand(*x.shape[:-2], 1, x.shape[-1])
        reconstruct_compute(it.V, rs(it.R), tuple(rs(t) for t in it.terms), _w(it.weights), None, it.dr_scale,
                            acc, it.gate if it.gate is not None else ones, acc, dRq)
    return acc


def _rows(t: torch.Tensor, row_offset: int, N: int) -> torch.Tensor:
    """Rows ``row_offset : row_offset + N`` of a stacked (F, *batch, rows, c) tensor (a view)."""
    return t if row_offset == 0 and t.shape[-2] == N else t[..., row_offset:row_offset + N, :]


def _w(weights):
    """Device weights (one tensor, see reconstruct_reference) as they are; floats as a tuple."""
    return weights if isinstance(weights, torch.Tensor) else tuple(weights)


def _uniform(vals) -> bool:
    """One value for all features (floats only: comparing device values would wait for the device)."""
    if any(isinstance(v, torch.Tensor) for v in vals):
        return False
    v0 = vals[0]
    return all(v == v0 for v in vals)


def _scalars(vals, device, cache=None) -> torch.Tensor:
    """(F,) fp32 tensor of the Python floats ``vals`` (per-feature weights). With a plan's ``cache``, no
    host-to-device copy per call where ``vals`` is a scalar times a ratio vector seen before (one step's
    weights are gain_f times a function of the step: the ratios stay): on a GPU a copy of a fresh host
    list would wait for the device."""
    if any(isinstance(v, torch.Tensor) for v in vals):  # device weights: gathered on the device
        return torch.stack([v.reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=device)
                            for v in vals]).float()
    v0 = float(vals[0])
    if cache is None or v0 == 0.0:
        return torch.tensor(vals, dtype=torch.float32, device=device)
    key = ("scalars", device, tuple(round(v / v0, 9) for v in vals))
    rel = cache.get(key)
    if rel is None:
        if len(cache) > 64:
            for k in [k for k in cache if k[0] == "scalars"]:
                del cache[k]
        rel = cache[key] = torch.tensor([v / v0 for v in vals], dtype=torch.float32, device=device)
    return rel * v0


def _accumulate(acc, chunk, bits, row_offset, N, D, cache=None, ck=None) -> torch.Tensor:
    """acc + the sum over the chunk's features of gate * F_hat (rows of the stream; acc None: a new sum)."""
    Y = _rows(torch.stack([it.R for it in chunk]), row_offset, N)  # (F, *batch, N, D), fresh
    Y = Y.float() if Y.dtype != torch.float32 else Y
    lead, dev = Y.shape[1:-2], Y.device
    if bits:
        vals = code_values(_rows(torch.stack([it.codes for it in chunk]), row_offset, N), D, bits)
        S = _rows(torch.stack([it.scales for it in chunk]), row_offset, N)  # (F, *batch, N, 1)
        d = [it.dr_scale for it in chunk]
        if _uniform(d):  # one gain for all features (the default)
            Y.addcmul_(vals, S, value=float(d[0]))
        else:
            Y.addcmul_(vals, S.mul_(_scalars(d, dev, cache).view(-1, *([1] * (S.dim() - 1)))))
    gates = [it.gate for it in chunk]
    if any(g is None for g in gates):
        ones = Y.new_ones(D)
        gates = [ones.expand(*lead, 1, D) if g is None else g for g in gates]
    G = torch.stack([g if g.dim() == Y.dim() - 1 else g.unsqueeze(-2) for g in gates])  # (F, *batch, 1, D)
    G = G.float() if G.dtype != torch.float32 else G
    Y.mul_(G)
    acc = Y.sum(0) if acc is None else acc.add_(Y.sum(0))
    # subspace parts: one GEMM per number of terms over the concatenated coefficients of its features
    by_terms: dict[int, list] = {}
    for f, it in enumerate(chunk):
        if it.terms:
            by_terms.setdefault(len(it.terms), []).append((f, it))
    for n, sub in by_terms.items():
        _subspace(acc, G, sub, n, row_offset, N, D, dev, cache, (ck, n))
    return acc


def _subspace(acc, G, sub, n, row_offset, N, D, dev, cache, ck) -> None:
    """acc += sum_f (sum_i w_fi T_fi) V_f^T * g_f = [P_1 .. P_F] @ [V_1^T * g_1; ..] (one GEMM)."""
    lead = acc.shape[:-2]
    idx = cache.get(ck) if cache is not None else None
    if idx is None:  # basis row -> (feature in the chunk, feature in sub)
        ks = torch.tensor([it.V.shape[1] for _, it in sub], device=dev)
        idx = (torch.repeat_interleave(torch.tensor([f for f, _ in sub], device=dev), ks),
               torch.repeat_interleave(torch.arange(len(sub), device=dev), ks))
        if cache is not None:
            cache[ck] = idx
    ws = [[it.weights[i] for _, it in sub] for i in range(n)]
    alpha = 1.0
    if all(_uniform(w) for w in ws) and ws[0][0] != 0.0:  # one gain for all: P = w0 (T0 + (w1 / w0) T1)
        alpha = float(ws[0][0])
        P = torch.cat([it.terms[0] for _, it in sub], dim=-1)
        for i in range(1, n):
            P.add_(torch.cat([it.terms[i] for _, it in sub], dim=-1), alpha=float(ws[i][0]) / alpha)
    else:
        P = None
        for i in range(n):
            T = torch.cat([it.terms[i] for _, it in sub], dim=-1)  # (*batch, rows, sum k), fresh
            w = _scalars(ws[i], dev, cache).index_select(0, idx[1])
            P = T.mul_(w) if P is None else P.addcmul_(T, w)
    Pc = _rows(P, row_offset, N)
    VT = torch.cat([it.V for _, it in sub], dim=1).t()  # (sum k, D)
    VT = VT.float() if VT.dtype != torch.float32 else VT
    Gr = G.squeeze(-2).index_select(0, idx[0])  # (sum k, *batch, D): each basis row's gate
    Vg = Gr.mul_(VT.reshape(VT.shape[0], *([1] * len(lead)), D)).movedim(0, -2)  # (*batch, sum k, D)
    B = acc.numel() // (N * D)
    a3 = acc.view(B, N, D)
    # out= rather than baddbmm_: torch's FLOP counter (the runtime's count of the model's own FLOPs is
    # what it saw less the cache's) does not see the in-place variant
    torch.baddbmm(a3, Pc.reshape(B, N, -1), Vg.reshape(B, -1, D), alpha=alpha, out=a3)


@torch.no_grad()
def reconstruct_stacked(x, R, terms, weights, gates, V, codes=None, scales=None, bits: int = 8, dr_scales=0.0,
                        rows: int = 0, out=None) -> torch.Tensor:
    """:func:`reconstruct_sum_reference` for features whose states are stacked along a first dim F (a
    runtime that keeps them so: svdcache.deferred): ``R`` (F, *batch, Nf, D); ``terms`` (F, *batch, Nf, k)
    each, one rank k for all; ``weights[i]`` a float (one for all features) or a (F,) fp32 tensor;
    ``gates`` (F, *batch, 1, D); ``V`` (F, D, k); ``codes`` / ``scales`` (F, *batch, Nf, D or D/2) / (..., 1)
    with ``dr_scales`` a float or (F,) tensor; the stream reads rows ``rows : rows + N`` of each feature.
    A handful of ops for all F features, none of them a stack or a concatenation: the per-call cost of
    the list form (one stack per kind of state) is gone. Arguments are the runtime's, not checked."""
    N, D = x.shape[-2], x.shape[-1]
    Fn = R.shape[0]
    sl = (lambda t: t) if rows == 0 and R.shape[-2] == N else (lambda t: t[..., rows:rows + N, :])  # noqa: E731
    Y = sl(R)
    Y = Y.float() if Y.dtype != torch.float32 else Y.clone()  # (F, *batch, N, D), fresh
    one = [1] * (Y.dim() - 1)
    if codes is not None:
        vals = code_values(sl(codes), D, bits)
        if isinstance(dr_scales, torch.Tensor):
            Y.addcmul_(vals, sl(scales) * dr_scales.view(-1, *one))
        elif dr_scales:
            Y.addcmul_(vals, sl(scales), value=float(dr_scales))
    if terms:
        k = V.shape[-1]
        alpha = 1.0
        if all(not isinstance(w, torch.Tensor) for w in weights) and float(weights[0]) != 0.0:
            alpha = float(weights[0])
            P = sl(terms[0])
            P = P.clone() if len(terms) == 1 else torch.add(P, sl(terms[1]), alpha=float(weights[1]) / alpha)
            for w, T in zip(weights[2:], terms[2:]):
                P.add_(sl(T), alpha=float(w) / alpha)
        else:
            P = None
            for w, T in zip(weights, terms):
                wv = w.view(-1, *one) if isinstance(w, torch.Tensor) else float(w)
                P = sl(T) * wv if P is None else P.add_(sl(T) * wv)
        Y3 = Y.view(Fn, -1, D)
        Vt = V.float().transpose(1, 2) if V.dtype != torch.float32 else V.transpose(1, 2)
        # out= rather than baddbmm_: torch's FLOP counter does not see the in-place variant
        torch.baddbmm(Y3, P.reshape(Fn, -1, k), Vt, alpha=alpha, out=Y3)
    Y.mul_(gates.float() if gates.dtype != torch.float32 else gates)
    acc = Y.sum(0)
    if out is None:
        return acc.add_(x).to(x.dtype) if x.dtype != torch.float32 else acc.add_(x)
    return torch.add(x, acc, out=out)
