"""reconstruct with a quantized dR (int8 codes, or 4-bit codes packed two per byte, plus per-row fp32
scales), the cached step of ``residual="int8"/"int4"``: the Triton kernel (interpreter) and the
reference op against the unfused path the runtime took before (``dequantize_rows`` -> fp dR in R's
dtype -> reconstruct). Fresh random inputs, poisoned outputs, odd D (4-bit: a padded last byte),
row counts and D not multiples of the blocks, the launch configs the heuristic picks on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import DTYPES, TOL, assert_close, basis, dname, gen, gpu_dot_path, poison, randn
from svdcache_kernels import dequantize_codes as dequantize_rows, quantize_rows
from svdcache_kernels import ReconstructPlan, reconstruct, reconstruct_reference
from svdcache_kernels.ops._triton_common import config_override
from svdcache_kernels.ops.reconstruct import kernel as rec_kernel

BITS = (8, 4)


def qinputs(bshape, N, D, k, dtype, bits, g, n_terms=1):
    R = randn((*bshape, N, D), dtype, g=g)
    terms = [randn((*bshape, N, k), g=g, scale=3.0) for _ in range(n_terms)]
    # a residual difference with row scales spread over two decades, like real tokens
    r = torch.randn(*bshape, N, D, generator=g) * (0.05 + torch.rand(*bshape, N, 1, generator=g) * 2.0)
    codes, scales = quantize_rows(r, bits)
    x = randn((*bshape, N, D), dtype, g=g, scale=4.0)
    return basis(D, k, g=g), R, terms, codes, scales, x


def old_path(V, R, codes, scales, bits, **kw):
    """What QuantizedResidualCache.forecast computed before the fused op: an fp dR in R's dtype."""
    dR = dequantize_rows(codes, scales, R.shape[-1], bits).to(R.dtype)
    return reconstruct_reference(V, R, dR=dR, **kw)


def gate_of(bshape, D, dtype, g):
    mod = randn((*bshape, 6 * D), dtype, g=g)
    return mod.chunk(6, dim=-1)[2].unsqueeze(-2)  # (..., 1, D) with a batch stride of 6D


def tol_vs_old(dtype, ref, dr_scale, scales):
    """The old path rounded dR to R's dtype (half an ulp of |dR| <= 127 * scale); the op does not."""
    half_ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    return TOL[dtype] * float(ref.float().abs().max()) + abs(dr_scale) * 127 * float(scales.max()) * half_ulp


def assert_reordered(ref, old, dr_scale, scales):
    """fp32: the unfused path's operations, but code * (scale * dr_scale) for (code * scale) * dr_scale: the
    products differ by a rounding or two, so the results by a few ulp of their magnitude."""
    bound = 4 * 2.0 ** -24 * (float(old.abs().max()) + abs(dr_scale) * 127 * float(scales.max()))
    assert float((ref - old).abs().max()) <= bound


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_terms", (0, 2))
def test_gated_in_place_shared_step_passes(dtype, bits, n_terms):
    """The unconditional branch's cached step (svdcache.runtime.guidance.forecast): pass 1 with no term (the
    difference's anchor and its residual), pass 2 with the two branches' terms, both gated in place."""
    bshape, N, D, k = (3,), 21, 77, 9
    g = gen(300 + 10 * bits + n_terms + DTYPES.index(dtype))
    V, R, terms, codes, scales, x = qinputs(bshape, N, D, k, dtype, bits, g, n_terms)
    gate = gate_of(bshape, D, dtype, g)
    kw = dict(terms=terms, weights=(0.7, -1.9)[:n_terms], dr_scale=2.1, x=x, gate=gate,
              dR_codes=codes, dR_scales=scales, dR_bits=bits)
    ref = reconstruct_reference(V, R, **kw)
    xk = x.clone()
    res = reconstruct(V, R, **{**kw, "x": xk}, out=xk, backend="triton")
    assert res is xk
    assert_close(xk, ref, TOL[dtype], "kernel")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("D", (45, 130))
def test_gated_in_place_matches_unfused_path(dtype, bits, D):
    """The runtime's cached step: 1 Taylor term, out = x + gate * F_hat in place on x."""
    bshape, N, k = (2,), 37, 12
    g = gen(1000 * bits + D + DTYPES.index(dtype))
    V, R, terms, codes, scales, x = qinputs(bshape, N, D, k, dtype, bits, g)
    gate = gate_of(bshape, D, dtype, g)
    kw = dict(terms=terms, weights=(0.7,), dr_scale=1.3, x=x, gate=gate)
    old = old_path(V, R, codes, scales, bits, **kw)
    q = dict(dR_codes=codes, dR_scales=scales, dR_bits=bits)
    ref = reconstruct_reference(V, R, **kw, **q)
    if dtype == torch.float32:
        assert_reordered(ref, old, 1.3, scales)
    else:
        assert_close(ref, old, 1.0, "reference vs old", scale=tol_vs_old(dtype, old, 1.3, scales))
    xk = x.clone()
    res = reconstruct(V, R, **{**kw, "x": xk}, out=xk, backend="triton", **q)
    assert res is xk
    assert_close(xk, ref, TOL[dtype], "kernel")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_terms", (0, 2))
def test_no_epilogue_batch_dims_poisoned_out(bits, n_terms):
    """F_hat alone (no x, no gate), two batch dims, into a poisoned out and as a new tensor."""
    bshape, N, D = (2, 3), 21, 77
    g = gen(50 + bits + n_terms)
    V, R, terms, codes, scales, _ = qinputs(bshape, N, D, 16, torch.float32, bits, g, n_terms)
    kw = dict(terms=terms, weights=(1.0, -0.4)[:n_terms], dr_scale=-0.8, dR_codes=codes, dR_scales=scales, dR_bits=bits)
    ref = reconstruct_reference(V, R, **kw)
    assert_reordered(ref, old_path(V, R, codes, scales, bits, **{k: v for k, v in kw.items() if not k.startswith("dR_")}),
                     -0.8, scales)
    out = poison(R.shape, torch.float32)
    assert reconstruct(V, R, **kw, out=out, backend="triton") is out
    assert_close(out, ref, TOL[torch.float32], "out=")
    assert_close(reconstruct(V, R, **kw, backend="triton"), ref, TOL[torch.float32], "new")


@pytest.mark.parametrize("bits", BITS)
def test_no_batch_dims_ungated_into_new_tensor(bits):
    N, D = 50, 33
    g = gen(60 + bits)
    V, R, terms, codes, scales, x = qinputs((), N, D, 8, torch.bfloat16, bits, g)
    kw = dict(terms=terms, weights=(1.5,), dr_scale=0.5, x=x, dR_codes=codes, dR_scales=scales, dR_bits=bits)
    ref = reconstruct_reference(V, R, **kw)
    out = reconstruct(V, R, **kw, backend="triton")
    assert out is not x and out.dtype == torch.bfloat16
    assert_close(out, ref, TOL[torch.bfloat16], "out")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=dname)
@pytest.mark.parametrize("bits", BITS)
def test_gpu_heuristic_configs(dtype, bits):
    """The launch config reconstruct_config picks for a 16-bit feature on a GPU (64 x 64 tiles, D split
    across programs when rows are few) run under the interpreter, at odd D so the last split is ragged."""
    bshape, N, D, k = (2,), 65, 201, 24
    M = 2 * N
    cfg = rec_kernel.reconstruct_config(M, D, k, 1, dtype, torch.device("cuda"))
    assert cfg["BLOCK_M"] == 64 and cfg["BLOCK_D"] == 64 and cfg["D_SPLITS"] >= 2
    g = gen(70 + bits)
    V, R, terms, codes, scales, x = qinputs(bshape, N, D, k, dtype, bits, g)
    gate = gate_of(bshape, D, dtype, g)
    kw = dict(terms=terms, weights=(0.9,), dr_scale=2.0, gate=gate, dR_codes=codes, dR_scales=scales, dR_bits=bits)
    ref = reconstruct_reference(V, R, x=x, **kw)
    grids = []
    real = rec_kernel.launch

    def spy(kernel, grid, args, meta, c):
        grids.append((grid, meta["DR_BITS"]))
        return real(kernel, grid, args, meta, c)

    rec_kernel.launch = spy
    try:
        with config_override("reconstruct", **{n: cfg[n] for n in ("BLOCK_M", "BLOCK_D", "BLOCK_K", "D_SPLITS")}):
            xk = x.clone()
            reconstruct(V, R, x=xk, out=xk, **kw, backend="triton")
    finally:
        rec_kernel.launch = real
    assert grids == [((3, 2), bits)]  # one launch; 3 row blocks x D split in 2 (4 chunks of 64 over D = 201)
    assert_close(xk, ref, TOL[dtype], "out")


@pytest.mark.parametrize("bits", BITS)
def test_small_blocks_many_chunks_and_splits(bits):
    """16-row, 32-wide chunks, D split in 3: the codes' one-chunk-ahead loads cross split and row ends."""
    bshape, N, D = (3,), 19, 203
    g = gen(80 + bits)
    V, R, terms, codes, scales, x = qinputs(bshape, N, D, 20, torch.float32, bits, g, n_terms=3)
    gate = gate_of(bshape, D, torch.float32, g).squeeze(-2)  # (B, D) form
    kw = dict(terms=terms, weights=(1.0, 1.7, -0.45), dr_scale=0.6, x=x, gate=gate,
              dR_codes=codes, dR_scales=scales, dR_bits=bits)
    ref = reconstruct_reference(V, R, **kw)
    with config_override("reconstruct", BLOCK_M=16, BLOCK_D=32, D_SPLITS=3):
        out = reconstruct(V, R, **kw, out=poison(R.shape, torch.float32), backend="triton")
    assert_close(out, ref, TOL[torch.float32], "out")


@pytest.mark.parametrize("bits", BITS)
def test_gpu_dot_path_fp16(bits):
    """Tensor-core code path (P, V rounded to fp16 for the dot); the dequantized term stays fp32."""
    g = gen(90 + bits)
    V, R, terms, codes, scales, x = qinputs((2,), 40, 99, 16, torch.float16, bits, g)
    gate = gate_of((2,), 99, torch.float16, g)
    kw = dict(terms=terms, weights=(1.2,), dr_scale=0.7, x=x, gate=gate, dR_codes=codes, dR_scales=scales, dR_bits=bits)
    ref = reconstruct_reference(V, R, **kw)
    with gpu_dot_path():
        out = reconstruct(V, R, **kw, backend="triton")
    P = 1.2 * terms[0]
    bound = 2.0 ** -10 * P.norm(dim=-1).max() * V.float().norm(dim=-1).max() * gate.float().abs().max()
    assert_close(out, ref, 1.0, "out", scale=bound + 2.0 ** -10 * ref.float().abs().max())


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_dr_scale_zero_reads_no_codes(backend):
    """dr_scale = 0 (a forecast at the full step's own time): the quantized term is skipped, so
    poisoned scales do not show."""
    g = gen(95)
    V, R, terms, codes, _, x = qinputs((2,), 30, 40, 8, torch.float32, 4, g)
    scales = poison((2, 30, 1), torch.float32)
    out = reconstruct(V, R, terms=terms, weights=(1.0,), dr_scale=0.0, dR_codes=codes, dR_scales=scales, dR_bits=4,
                      backend=backend)
    assert_close(out, reconstruct_reference(V, R, terms=terms, weights=(1.0,)), TOL[torch.float32], "out")


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("bits", BITS)
def test_plan_matches_reference(backend, bits):
    """ReconstructPlan (the runtime's entry: on the torch backend its fused gated path) = the op, over
    two calls with new weights, dr_scale and codes of the same layout."""
    bshape, N, D = (2,), 24, 37
    g = gen(97 + bits)
    V, R, terms, codes, scales, x = qinputs(bshape, N, D, 8, torch.float32, bits, g)
    gate = gate_of(bshape, D, torch.float32, g)
    plan = None
    for w, s in ((0.5, 1.0), (1.5, -2.0)):
        _, _, _, codes, scales, _ = qinputs(bshape, N, D, 8, torch.float32, bits, g)
        ref = reconstruct_reference(V, R, terms=terms, weights=(w,), dr_scale=s, x=x, gate=gate,
                                    dR_codes=codes, dR_scales=scales, dR_bits=bits)
        xk = x.clone()
        if plan is None:
            plan = ReconstructPlan(V, R, terms=terms, weights=(w,), dr_scale=s, x=xk, gate=gate, out=xk,
                                   dR_codes=codes, dR_scales=scales, dR_bits=bits, backend=backend)
        assert plan(V, R, terms, (w,), None, s, xk, gate, xk, codes, scales) is xk
        assert_close(xk, ref, TOL[torch.float32], f"plan {backend}")


# ---- bad input: one-line errors before any launch ---------------------------------------------------
def _q(**over):
    g = gen(3)
    V, R, terms, codes, scales, _ = qinputs((2,), 10, 33, 4, torch.float32, 4, g)
    kw = dict(V=V, R=R, terms=terms, weights=[1.0], dr_scale=1.0, dR_codes=codes, dR_scales=scales, dR_bits=4)
    kw.update(over)
    return kw


BAD = {
    "codes and fp dR": (lambda: _q(dR=torch.zeros(2, 10, 33)), ValueError, ["either dR", "not both"]),
    "codes without scales": (lambda: _q(dR_scales=None), ValueError, ["dR_codes and dR_scales"]),
    "bits 3": (lambda: _q(dR_bits=3), ValueError, ["dR_bits", "3"]),
    "int8 codes as 4 bits": (lambda: _q(dR_codes=torch.zeros(2, 10, 17, dtype=torch.int8)), TypeError,
                             ["dR_codes", "uint8", "int8", "dR_bits=8"]),
    "4-bit codes unpadded width": (lambda: _q(dR_codes=torch.zeros(2, 10, 16, dtype=torch.uint8)), ValueError,
                                   ["dR_codes", "(2, 10, 17)", "(2, 10, 16)"]),
    "int8 codes wrong width": (lambda: _q(dR_codes=torch.zeros(2, 10, 17, dtype=torch.int8), dR_bits=8), ValueError,
                               ["dR_codes", "(2, 10, 33)"]),
    "scales bf16": (lambda: _q(dR_scales=torch.ones(2, 10, 1, dtype=torch.bfloat16)), TypeError, ["dR_scales", "float32"]),
    "scales per tensor": (lambda: _q(dR_scales=torch.ones(2, 1, 1)), ValueError, ["dR_scales", "(2, 10, 1)"]),
    "codes on meta": (lambda: _q(dR_codes=torch.zeros(2, 10, 17, dtype=torch.uint8, device="meta")), ValueError,
                      ["dR_codes", "meta"]),
    "codes not flattenable": (lambda: _q(dR_codes=torch.zeros(10, 2, 17, dtype=torch.uint8).transpose(0, 1)), ValueError,
                              ["dR_codes", "flatten"]),
}


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched despite invalid arguments")


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantized_input(backend, case, monkeypatch):
    monkeypatch.setattr(rec_kernel, "_reconstruct_kernel", _NoLaunch())
    make, exc, words = BAD[case]
    kw = make()
    V, R = kw.pop("V"), kw.pop("R")
    with pytest.raises(exc) as info:
        reconstruct(V, R, backend=backend, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg}"
    with pytest.raises(exc):
        ReconstructPlan(V, R, backend=backend, **kw)
