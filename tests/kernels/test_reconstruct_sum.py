"""reconstruct_sum (a whole cached stack's gated forecasts summed into one stream): the reference op, its
plan and the Triton chain (interpreter) against a float64 sum of each feature's forecast formed from
the definition. Fresh random inputs, NaN-poisoned outputs, mixed ranks / term counts / residual kinds /
row offsets / gate forms, row counts and D that are not multiples of the blocks, batch dims, every
dtype, several chunks, weights with and without one common gain."""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import DTYPES, TOL, assert_close, basis, dname, gen, poison, randn
from svdcache_kernels import dequantize_codes as dequantize_rows, quantize_rows
from svdcache_kernels import ReconstructSumPlan, SumTerm, reconstruct_sum, reconstruct_sum_reference
from svdcache_kernels.ops.reconstruct_sum import reference as sum_ref
from svdcache_kernels.ops.reconstruct_sum.reference import reconstruct_sum_compute


def make_items(bshape, N, D, dtype, g, kinds, uniform=False):
    """One SumTerm per kind: (k, n_terms, bits or 0, row offset, gate form)."""
    items = []
    for i, (k, nt, bits, rows, gform) in enumerate(kinds):
        Nf = rows + N + (i % 2)  # some features hold more rows than the stream reads
        R = randn((*bshape, Nf, D), dtype, g=g)
        terms = [randn((*bshape, Nf, k), g=g, scale=2.0) for _ in range(nt)]
        gain = 1.0 if uniform else 0.5 + 0.3 * i
        weights = [gain * w for w in (0.7, -0.4, 0.2)[:nt]]
        codes = scales = None
        if bits:
            r = torch.randn(*bshape, Nf, D, generator=g) * (0.05 + torch.rand(*bshape, Nf, 1, generator=g))
            codes, scales = quantize_rows(r, bits)
        gate = None
        if gform:
            gate = randn((*bshape, 1, D) if gform == "rows" else (*bshape, D), dtype, g=g)
        items.append(SumTerm(basis(D, k, dtype, g), R, terms, weights, gate, codes, scales, bits or 8,
                             1.3 * gain if bits else 0.0, rows))
    return items


def expected(x, items):
    """x + sum_f gate_f * F_hat_f[rows], each F_hat from its definition in float64, rounded once."""
    N, D = x.shape[-2], x.shape[-1]
    acc = x.double()
    for it in items:
        fh = it.R.double()
        for w, T in zip(it.weights, it.terms):
            fh = fh + w * (T.double() @ it.V.double().T)
        if it.codes is not None and it.dr_scale:
            fh = fh + it.dr_scale * dequantize_rows(it.codes, it.scales, D, it.bits).double()
        fh = fh[..., it.rows:it.rows + N, :]
        if it.gate is not None:
            fh = fh * (it.gate.double() if it.gate.dim() == x.dim() else it.gate.double().unsqueeze(-2))
        acc = acc + fh
    return acc.to(x.dtype)


MIXED = [  # (k, n_terms, bits, rows, gate form)
    (3, 2, 4, 0, "rows"), (5, 2, 4, 0, "rows"), (1, 1, 8, 0, "flat"), (4, 0, 4, 0, "rows"),
    (6, 2, 0, 5, "rows"), (2, 2, 4, 5, None), (7, 2, 4, 5, "rows"), (3, 1, 4, 5, "flat"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("bshape", [(2,), (2, 3)], ids=["B2", "B2x3"])
@pytest.mark.parametrize("uniform", [False, True], ids=["gains", "one-gain"])
@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "one-by-one"])
def test_reference_matches_definition(dtype, bshape, uniform, stack, monkeypatch):
    """Both ways the reference sums: stacked (small features) and one feature at a time (large ones)."""
    if not stack:
        monkeypatch.setattr(sum_ref, "STACK_ELEMS", 0)
    g = gen(11 + DTYPES.index(dtype) + 7 * len(bshape) + 3 * uniform)
    N, D = 13, 37
    items = make_items(bshape, N, D, dtype, g, MIXED, uniform)
    x = randn((*bshape, N, D), dtype, g=g, scale=3.0)
    ref = expected(x, items)
    assert_close(reconstruct_sum_reference(x, items), ref, TOL[dtype], "new out")
    out = poison(x.shape, dtype)
    res = reconstruct_sum_reference(x, items, out=out)
    assert res is out
    assert_close(out, ref, TOL[dtype], "poisoned out")
    y = x.clone()
    assert reconstruct_sum_reference(y, items, out=y) is y  # in place
    assert_close(y, ref, TOL[dtype], "in place")


@pytest.mark.parametrize("chunk_elems", [1, 600, 5000])
def test_chunks_give_the_same_sum(chunk_elems):
    """Chunks of one feature, of a few, of all: the fp32 sums differ only in their order."""
    g = gen(5)
    N, D = 9, 21
    items = make_items((2,), N, D, torch.float32, g, MIXED * 2)
    x = randn((2, N, D), g=g)
    ref = expected(x, items)
    assert_close(reconstruct_sum_compute(x, items, None, chunk_elems), ref, TOL[torch.float32], "chunked")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_plan_follows_new_weights(dtype):
    """A plan is made once per layout; each call's weights and dr_scales are its own."""
    g = gen(40 + DTYPES.index(dtype))
    N, D = 11, 19
    x = randn((2, N, D), dtype, g=g)
    items = make_items((2,), N, D, dtype, g, MIXED)
    plan = ReconstructSumPlan(x, items, out=None)
    for step in range(3):
        f = 1.0 + 0.5 * step
        cur = [it._replace(weights=[w * f for w in it.weights], dr_scale=it.dr_scale * f) for it in items]
        out = poison(x.shape, dtype)
        plan(x, cur, out)
        assert_close(out, expected(x, cur), TOL[dtype], f"step {step}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dname)  # the interpreter's bf16 dot is broken
def test_triton_chain_matches_reference(dtype):
    """The Triton backend: one reconstruct launch per feature, in place on the stream; features with
    a row offset through a workspace holding the stream in their last rows (rows the kernels walk)."""
    g = gen(60 + DTYPES.index(dtype))
    N, D = 13, 37
    kinds = [(3, 2, 4, 0, "rows"), (5, 1, 8, 0, "rows"), (4, 0, 4, 0, "rows"), (6, 2, 4, 5, "rows"),
             (2, 2, 0, 5, "rows"), (3, 2, 4, 7, "rows")]
    items = make_items((2,), N, D, dtype, g, kinds)
    x = randn((2, N, D), dtype, g=g, scale=3.0)
    ref = expected(x, items)
    out = poison(x.shape, dtype)
    reconstruct_sum(x, items, out=out, backend="triton")
    assert_close(out, ref, TOL[dtype], "triton")
    plan = ReconstructSumPlan(x, items, out=out, backend="triton")
    for _ in range(2):  # the workspace is reused: nothing carried from one call to the next
        out.fill_(float("nan"))
        plan(x, items, out)
        assert_close(out, ref, TOL[dtype], "triton plan")


def test_bad_inputs_fail_with_one_line_errors():
    g = gen(3)
    N, D = 5, 8
    x = randn((2, N, D), g=g)
    (it,) = make_items((2,), N, D, torch.float32, g, [(3, 2, 4, 2, "rows")])
    with pytest.raises(ValueError, match="does not hold rows"):
        reconstruct_sum_reference(x, [it._replace(rows=4)])
    with pytest.raises(ValueError, match="does not hold rows"):
        reconstruct_sum_reference(randn((3, N, D), g=g), [it])
    with pytest.raises(ValueError, match="gate must have shape"):
        reconstruct_sum_reference(x, [it._replace(gate=randn((2, 2, D), g=g))])
    with pytest.raises(ValueError, match="at least one term"):
        reconstruct_sum_reference(x, [])
    with pytest.raises(TypeError, match="SumTerm"):
        reconstruct_sum_reference(x, [tuple(it)])
    with pytest.raises(ValueError, match="weights"):
        reconstruct_sum_reference(x, [it._replace(weights=[1.0])])
    with pytest.raises(ValueError, match="out must be like x"):
        reconstruct_sum_reference(x, [it], out=torch.empty(2, N, D + 1))
    with pytest.raises(ValueError, match="cannot be flattened to rows"):  # the kernels read rows
        reconstruct_sum(x, [it._replace(R=it.R[:, 1:])], backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("one_gain", [True, False], ids=["one-gain", "gains"])
@pytest.mark.parametrize("rows", [0, 4])
def test_stacked_matches_the_list_form(dtype, one_gain, rows):
    """reconstruct_stacked (states stacked along F, as the runtime's arenas hold them) = the list form."""
    from svdcache_kernels import reconstruct_stacked

    g = gen(80 + DTYPES.index(dtype) + 2 * one_gain + rows)
    N, D, k, F = 11, 21, 5, 6
    Nf = rows + N + 1  # one row more than the stream reads
    items = []
    for f in range(F):
        gain = 1.0 if one_gain else 0.5 + 0.2 * f
        r = torch.randn(2, Nf, D, generator=g) * 0.3
        codes, scales = quantize_rows(r, 4)
        items.append(SumTerm(basis(D, k, dtype, g), randn((2, Nf, D), dtype, g=g),
                             [randn((2, Nf, k), g=g, scale=2.0) for _ in range(2)], [0.7 * gain, -0.3 * gain],
                             randn((2, 1, D), dtype, g=g), codes, scales, 4, 1.1 * gain, rows))
    x = randn((2, N, D), dtype, g=g, scale=3.0)
    ref = expected(x, items)
    st = lambda f: torch.stack([f(it) for it in items])  # noqa: E731
    if one_gain:
        weights, d = list(items[0].weights), items[0].dr_scale
    else:
        weights = [torch.tensor([it.weights[i] for it in items]) for i in range(2)]
        d = torch.tensor([it.dr_scale for it in items])
    out = poison(x.shape, dtype)
    reconstruct_stacked(x, st(lambda it: it.R), [st(lambda it, i=i: it.terms[i]) for i in range(2)], weights,
                        st(lambda it: it.gate), st(lambda it: it.V), st(lambda it: it.codes), st(lambda it: it.scales),
                        4, d, rows, out=out)
    assert_close(out, ref, TOL[dtype], "stacked")
