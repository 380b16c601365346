"""Parity of the fused split kernel (Triton interpreter) against split_reference."""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import (
    DTYPES, TOL, assert_close, assert_untouched, basis, clone_states, dname, gen, gpu_dot_path, poison, randn,
    split_scales,
)
from svdcache_kernels import split, split_reference
from svdcache_kernels.ops._triton_common import config_override

KS = (1, 16, 48, 128)
# (batch dims, N, D): N and D never multiples of the interpreter blocks (64 rows, 128 channels),
# D never a power of two, > 1 program and > 1 D chunk.
SHAPES = [((2,), 100, 200), ((2, 3), 33, 136), ((), 130, 300)]


def split_triton(F, V, **kw):
    return split(F, V, backend="triton", **kw)


def both(F, V, states: dict, **kw):
    """Run reference and kernel on copies of the same states; return (ref_states, kernel_states)."""
    ref, ker = clone_states(states), clone_states(states)
    split_reference(F, V, **ref, **kw)
    split_triton(F, V, **ker, **kw)
    ref["_scales"] = split_scales(F, ref, states.get("R"), kw.get("h1", 1.0))
    return ref, ker


def compare(ref: dict, ker: dict, act_dtype, label=""):
    scales = ref.get("_scales", {})
    for name, r in ref.items():
        if r is None or name == "_scales":
            continue
        tol = TOL[torch.float32] if r.dtype == torch.float32 else TOL[act_dtype]
        assert_close(ker[name], r, tol, f"{label}{name}", scale=scales.get(name))


def full_states(bshape, N, D, k, dtype, g, poisoned=()):
    cs, rs = (*bshape, N, k), (*bshape, N, D)
    st = {
        "C": randn(cs, g=g), "D1": randn(cs, g=g), "D2": randn(cs, g=g), "E": randn(cs, g=g),
        "R": randn(rs, dtype, g=g), "dR": randn(rs, dtype, g=g),
    }
    for name in poisoned:
        st[name] = poison(st[name].shape, st[name].dtype)
    return st


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{len(s[0])}-N{s[1]}-D{s[2]}")
def test_split_order2_all_outputs(dtype, k, shape):
    bshape, N, D = shape
    g = gen(1000 * k + D)
    F = randn((*bshape, N, D), dtype, g=g, scale=2.0)
    V = basis(D, k, g=g)
    # C, D1 and R hold history (read); D2, dR are pure outputs: poisoned so any unwritten element fails.
    st = full_states(bshape, N, D, k, dtype, g, poisoned=("D2", "dR"))
    ref, ker = both(F, V, st, order=2, h1=0.75, h2=2.0, beta=0.9)
    compare(ref, ker, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("k", (1, 48))
def test_split_order0_ema_init_poisoned(dtype, k):
    """First full step: nothing is read; every requested output starts as NaN."""
    bshape, N, D = (2,), 70, 96
    g = gen(7 + k)
    F = randn((*bshape, N, D), dtype, g=g)
    V = basis(D, k, dtype, g=g)  # basis in the activation dtype too
    st = {"C": poison((*bshape, N, k), torch.float32), "E": poison((*bshape, N, k), torch.float32),
          "R": poison((*bshape, N, D), dtype)}
    ref, ker = both(F, V, st, order=0, ema_init=True)
    compare(ref, ker, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("k", (16, 48))
def test_split_state_chain(dtype, k):
    """Consecutive full steps with uneven spacing: order 0 -> 1 -> 2 -> 2, EMA init then updates, R/dR.

    Each side feeds its own states back, as the runtime does, so errors would compound if any update
    were wrong."""
    bshape, N, D = (2,), 90, 160
    g = gen(42 + k)
    V = basis(D, k, g=g)
    cs, rs = (*bshape, N, k), (*bshape, N, D)
    init = {"C": poison(cs, torch.float32), "D1": poison(cs, torch.float32), "D2": poison(cs, torch.float32),
            "E": poison(cs, torch.float32), "R": poison(rs, dtype), "dR": poison(rs, dtype)}
    ref, ker = clone_states(init), clone_states(init)
    times = [0.0, 1.0, 2.0, 5.0, 8.0]  # warmup steps then an interval: uneven distances
    F = randn(rs, dtype, g=g, scale=2.0)
    for step, t in enumerate(times):
        F = (F.float() + randn(rs, g=g, scale=0.5, shift=0.1)).to(dtype)  # a drifting feature
        order = min(step, 2)
        h1 = t - times[step - 1] if step >= 1 else 1.0
        h2 = t - times[step - 2] if step >= 2 else 1.0
        kw = dict(order=order, h1=h1, h2=h2, beta=0.9, ema_init=step == 0)
        pick = lambda st: {n: st[n] for n in ("C", "D1", "D2", "E", "R")} | ({"dR": st["dR"]} if step >= 1 else {})
        pr, pk = pick(ref), pick(ker)
        if order < 1:
            pr.pop("D1"), pk.pop("D1")
        if order < 2:
            pr.pop("D2"), pk.pop("D2")
        # Each side reads its own history, which may differ from the other's by the tolerance: the
        # differences then carry it over scaled by 1/h, e.g. dR = (R_new - R_prev)/h1 inherits the
        # one-ulp rounding difference of R_prev / h1. Scales: the propagated inputs' magnitudes.
        prev = {n: pr[n].float().abs().max() if n in pr and step >= 1 else 0.0 for n in ("C", "D1", "R")}
        f = F.float().abs().max()
        split_reference(F, V, **pr, **kw)
        split_triton(F, V, **pk, **kw)
        for name, r in pr.items():
            big = r.float().abs().max()
            scale = {"D1": (big * h1 + prev["C"]) / h1, "D2": (big * h2 + prev["D1"]) / h2,
                     "R": max(big, f), "dR": (max(big * h1, f) + prev["R"]) / h1}.get(name, big)
            tol = TOL[torch.float32] if r.dtype == torch.float32 else TOL[dtype]
            assert_close(pk[name], r, tol, f"step {step}: {name}", scale=scale)


def test_split_unused_buffers_untouched():
    """Buffers passed but not used by the order are neither written nor (with NaN) read."""
    g = gen(3)
    F, V = randn((2, 40, 72), g=g), basis(72, 16, g=g)
    C = randn((2, 40, 16), g=g)
    D1, D2 = poison((2, 40, 16), torch.float32), poison((2, 40, 16), torch.float32)
    D1b, D2b = D1.clone(), D2.clone()
    split_triton(F, V, C=C, D1=D1, D2=D2, order=0)
    assert_untouched(D1, D1b, "D1 at order 0")
    assert_untouched(D2, D2b, "D2 at order 0")
    D1 = randn((2, 40, 16), g=g)
    split_triton(F, V, C=C, D1=D1, D2=D2, order=1, h1=0.5)
    assert_untouched(D2, D2b, "D2 at order 1")
    assert torch.isfinite(D1).all()


@pytest.mark.parametrize("which", ["C", "E", "R", "E+R"])
def test_split_single_outputs(which):
    g = gen(11)
    F, V = randn((3, 50, 136), torch.bfloat16, g=g), basis(136, 48, g=g)
    st = {}
    if "C" in which:
        st["C"] = poison((3, 50, 48), torch.float32)
    if "E" in which:
        st["E"] = randn((3, 50, 48), g=g)
    if "R" in which:
        st["R"] = poison((3, 50, 136), torch.bfloat16)
    ref, ker = both(F, V, st, order=0, beta=0.8)
    compare(ref, ker, torch.bfloat16)


def test_split_nothing_requested_is_noop():
    F, V = randn((4, 64)), basis(64, 8)
    split_triton(F, V)  # nothing to produce: no launch, no error


def test_split_empty_rows():
    F, V = randn((2, 0, 64)), basis(64, 8)
    C, R = torch.empty(2, 0, 8), torch.empty(2, 0, 64)
    split_triton(F, V, C=C, R=R)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_split_small_blocks_many_chunks(dtype):
    """Many programs and D chunks (loop 2 runs them in reverse), tails in both dims."""
    g = gen(5)
    F, V = randn((2, 45, 200), dtype, g=g), basis(200, 20, g=g)
    st = full_states((2,), 45, 200, 20, dtype, g, poisoned=("D2", "dR"))
    with config_override("split", BLOCK_M=16, BLOCK_D=32):
        ref, ker = both(F, V, st, order=2, h1=1.0, h2=3.0)
    compare(ref, ker, dtype)


def test_split_residual_in_place_over_F():
    """R may alias F: loop 2 reads each F chunk before writing the same chunk of R."""
    g = gen(9)
    F, V = randn((2, 40, 100), g=g), basis(100, 16, g=g)
    C_ref, R_ref = torch.empty(2, 40, 16), torch.empty(2, 40, 100)
    split_reference(F, V, C=C_ref, R=R_ref)
    C = poison((2, 40, 16), torch.float32)
    F2 = F.clone()
    split_triton(F2, V, C=C, R=F2)
    assert_close(C, C_ref, TOL[torch.float32], "C")
    assert_close(F2, R_ref, TOL[torch.float32], "R (in place)", scale=F.abs().max())


def test_split_large_k_tiled():
    g = gen(13)
    F, V = randn((30, 320), g=g), basis(320, 300, g=g)
    st = {"C": poison((30, 300), torch.float32), "R": poison((30, 320), torch.float32)}
    ref, ker = both(F, V, st)
    compare(ref, ker, torch.float32)


@pytest.mark.parametrize("k", (16, 128))
def test_split_gpu_dot_path_fp16(k):
    """The tensor-core code path (F, V and then C rounded to fp16 for the dots, fp32 accumulate).

    Its extra error bound: C_j and V_dj each carry a relative rounding <= 2^-11, so the error of
    (C V^T)_d is at most 2 * 2^-11 * sum_j |C_j V_dj| <= 2^-10 * |F_row| * |V_d,:| (Cauchy-Schwarz,
    |C| <= |F_row| for orthonormal V), plus one fp16 ulp of R. C, E, D1 (fp32) see only V's rounding.
    """
    bshape, N, D = (2,), 70, 200
    g = gen(17 + k)
    F = randn((*bshape, N, D), torch.float16, g=g, scale=2.0)
    V = basis(D, k, g=g)
    st = full_states(bshape, N, D, k, torch.float16, g, poisoned=("D2", "dR"))
    ref = clone_states(st)
    split_reference(F, V, **ref, order=1, h1=0.5)
    ker = clone_states(st)
    with gpu_dot_path():
        split_triton(F, V, **ker, order=1, h1=0.5)
    row = F.float().norm(dim=-1).max()
    vrow = V.float().norm(dim=-1).max()
    bound_fk = 2.0 ** -10 * row * vrow
    r_scale = ref["R"].float().abs().max()
    assert_close(ker["R"], ref["R"], 1.0, "R", scale=bound_fk + 2.0 ** -10 * r_scale)
    # C: each product F_d V_dj with V rounded: error <= 2^-11 sum_d |F_d V_dj| <= 2^-11 |F_row| |V_:,j|.
    assert_close(ker["C"], ref["C"], 1.0, "C", scale=2.0 ** -11 * row + 1e-5 * ref["C"].abs().max())
    d1_scale = 2 * (2.0 ** -11 * row) / 0.5
    assert_close(ker["D1"], ref["D1"], 1.0, "D1", scale=d1_scale + 1e-5 * ref["D1"].abs().max())
    # dR = (R_new - R_prev) / h1 with R_prev shared: R_new's error / h1, plus one fp16 ulp of dR.
    dr_scale = ref["dR"].float().abs().max()
    assert_close(ker["dR"], ref["dR"], 1.0, "dR", scale=bound_fk / 0.5 + 2.0 ** -10 * dr_scale)


def test_split_gpu_dot_path_basis_cast_cache_follows_in_place_updates():
    """The 16-bit path casts an fp32 V once and caches the copy on V: an in-place change of V
    (version counter) must invalidate it."""
    g = gen(31)
    F = randn((40, 72), torch.float16, g=g)
    V = basis(72, 16, g=g)
    with gpu_dot_path():
        C1 = poison((40, 16), torch.float32)
        split_triton(F, V, C=C1)
        assert V._svdcache_dot_cast[2].dtype == torch.float16
        V.mul_(-1.0)
        C2 = poison((40, 16), torch.float32)
        split_triton(F, V, C=C2)
    torch.testing.assert_close(C2, -C1)  # V -> -V flips the coefficients exactly


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("k", (1, 48))
@pytest.mark.parametrize("order", (1, 2))
def test_split_with_previous_feature(dtype, k, order):
    """F_prev instead of stored coefficients: D1 = (F - F_prev) V / h1; C is neither read nor needed."""
    bshape, N, D = (2,), 70, 136
    g = gen(31 * k + order)
    F, F_prev = randn((*bshape, N, D), dtype, g=g), randn((*bshape, N, D), dtype, g=g)
    V = basis(D, k, g=g)
    st = {"D1": randn((*bshape, N, k), g=g), "D2": poison((*bshape, N, k), torch.float32)}
    if order == 1:
        st["D2"] = None
    ref, ker = both(F, V, st, order=order, h1=0.5, h2=1.5, F_prev=F_prev)
    compare(ref, ker, dtype)
    # the same differences as from the coefficients of F_prev
    C = torch.empty((*bshape, N, k))
    split_reference(F_prev, V, C=C)
    via_c = clone_states(st)
    split_reference(F, V, C=C, **via_c, order=order, h1=0.5, h2=1.5)
    for name in ("D1", "D2")[:order]:
        assert_close(ref[name], via_c[name], 1e-5, name)


def test_split_previous_feature_bad_input():
    F = torch.randn(2, 8, 24)
    V = torch.randn(24, 4)
    D1 = torch.randn(2, 8, 4)
    for be in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"F_prev must have shape \(2, 8, 24\)"):
            split(F, V, D1=D1, order=1, F_prev=torch.randn(2, 7, 24), backend=be)
        with pytest.raises(ValueError, match="read only for order >= 1"):
            split(F, V, C=torch.empty(2, 8, 4), F_prev=F.clone(), backend=be)
        with pytest.raises(TypeError, match="F_prev must be float32, got .* float16"):
            split(F, V, D1=D1, order=1, F_prev=F.half(), backend=be)
