"""Bad input: a clear ValueError/TypeError naming the shapes, from both backends, before any launch."""
from __future__ import annotations

import pytest
import torch

from kernel_testutils import basis, randn
from svdcache_kernels import gram_update, reconstruct, split
from svdcache_kernels.ops.gram import kernel as gram_kernel
from svdcache_kernels.ops.reconstruct import kernel as rec_kernel
from svdcache_kernels.ops.split import kernel as split_kernel

BACKENDS = ("torch", "triton")


class _NoLaunch:
    """Stands in for a @triton.jit kernel: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("kernel launched despite invalid arguments")


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    for mod, name in ((split_kernel, "_split_kernel"), (rec_kernel, "_reconstruct_kernel"), (gram_kernel, "_gram_kernel")):
        monkeypatch.setattr(mod, name, _NoLaunch())


def F_(shape=(2, 10, 32), dtype=torch.float32):
    return randn(shape, dtype)


META = torch.device("meta")  # a second device on a CPU-only machine


# ---- split ----------------------------------------------------------------------------------------
SPLIT_CASES = {
    "D mismatch": (lambda: (F_(), basis(33, 4), {}), ValueError, ["D=33", "D=32"]),
    "V not 2-D": (lambda: (F_(), torch.randn(32, 4, 1), {}), ValueError, ["(32, 4, 1)"]),
    "F int": (lambda: (torch.ones(2, 10, 32, dtype=torch.int32), basis(32, 4), {}), TypeError, ["(2, 10, 32)", "int32"]),
    "F 1-D": (lambda: (torch.randn(32), basis(32, 4), {}), ValueError, ["(32,)"]),
    "F last dim strided": (lambda: (F_((2, 32, 10)).transpose(-1, -2), basis(32, 4), {}), ValueError, ["(2, 10, 32)"]),
    "F not flattenable": (lambda: (F_((10, 2, 32)).transpose(0, 1), basis(32, 4), {}), ValueError, ["(2, 10, 32)", "flatten"]),
    "C wrong dtype": (lambda: (F_(), basis(32, 4), {"C": torch.zeros(2, 10, 4, dtype=torch.float16)}),
                      TypeError, ["C", "float32", "(2, 10, 4)"]),
    "C wrong shape": (lambda: (F_(), basis(32, 4), {"C": torch.zeros(2, 10, 5)}), ValueError, ["C", "(2, 10, 4)", "(2, 10, 5)"]),
    "E wrong device": (lambda: (F_(), basis(32, 4), {"E": torch.zeros(2, 10, 4, device=META)}), ValueError, ["E", "meta"]),
    "R wrong dtype": (lambda: (F_(), basis(32, 4), {"R": torch.zeros(2, 10, 32, dtype=torch.bfloat16)}),
                      TypeError, ["R", "(2, 10, 32)", "bfloat16"]),
    "R not flattenable": (lambda: (F_(), basis(32, 4), {"R": torch.zeros(10, 2, 32).transpose(0, 1)}),
                          ValueError, ["R", "(2, 10, 32)"]),
    "D1 strided last dim": (lambda: (F_(), basis(32, 4), {"C": torch.zeros(2, 10, 4), "D1": torch.zeros(2, 4, 10).transpose(-1, -2),
                                                          "order": 1}), ValueError, ["D1"]),
    "order 1 without C": (lambda: (F_(), basis(32, 4), {"order": 1}), ValueError, ["order"]),
    "order 2 without D2": (lambda: (F_(), basis(32, 4), {"C": torch.zeros(2, 10, 4), "D1": torch.zeros(2, 10, 4), "order": 2}),
                           ValueError, ["D2"]),
    "order 3": (lambda: (F_(), basis(32, 4), {"C": torch.zeros(2, 10, 4), "order": 3}), ValueError, ["order"]),
    "dR without R": (lambda: (F_(), basis(32, 4), {"dR": torch.zeros(2, 10, 32)}), ValueError, ["dR"]),
    "h1 zero": (lambda: (F_(), basis(32, 4), {"C": torch.zeros(2, 10, 4), "D1": torch.zeros(2, 10, 4), "order": 1, "h1": 0.0}),
                ValueError, ["h1"]),
    "beta out of range": (lambda: (F_(), basis(32, 4), {"E": torch.zeros(2, 10, 4), "beta": 1.5}), ValueError, ["beta"]),
    "V on another device": (lambda: (F_(), torch.zeros(32, 4, device=META), {}), ValueError, ["meta"]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_bad_input(backend, case):
    make, exc, words = SPLIT_CASES[case]
    F, V, kw = make()
    kw = {"C": torch.zeros(2, 10, 4), **kw} if "C" not in kw and "E" not in kw and "R" not in kw and "order" not in kw else kw
    with pytest.raises(exc) as info:
        split(F, V, backend=backend, **kw)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


# ---- reconstruct -----------------------------------------------------------------------------------
def _rec(**over):
    kw = dict(V=basis(32, 4), R=F_(), terms=[torch.zeros(2, 10, 4)], weights=[1.0])
    kw.update(over)
    return kw


REC_CASES = {
    "D mismatch": (lambda: _rec(V=basis(40, 4)), ValueError, ["D=40", "D=32"]),
    "terms/weights count": (lambda: _rec(weights=[1.0, 2.0]), ValueError, ["1 terms", "2 weights"]),
    "4 terms": (lambda: _rec(terms=[torch.zeros(2, 10, 4)] * 4, weights=[1.0] * 4), ValueError, ["at most 3"]),
    "term wrong k": (lambda: _rec(terms=[torch.zeros(2, 10, 5)]), ValueError, ["terms[0]", "(2, 10, 4)", "(2, 10, 5)"]),
    "term fp16": (lambda: _rec(terms=[torch.zeros(2, 10, 4, dtype=torch.float16)]), TypeError, ["terms[0]", "float32"]),
    "term on meta": (lambda: _rec(terms=[torch.zeros(2, 10, 4, device=META)]), ValueError, ["terms[0]", "meta"]),
    "dR wrong dtype": (lambda: _rec(dR=torch.zeros(2, 10, 32, dtype=torch.float16), dr_scale=1.0), TypeError, ["dR", "float16"]),
    "x wrong shape": (lambda: _rec(x=torch.zeros(2, 11, 32)), ValueError, ["x", "(2, 10, 32)", "(2, 11, 32)"]),
    "x not flattenable": (lambda: _rec(x=torch.zeros(10, 2, 32).transpose(0, 1)), ValueError, ["x", "(2, 10, 32)"]),
    "gate not a tensor": (lambda: _rec(x=torch.zeros(2, 10, 32), gate=[1.0] * 32), TypeError, ["gate"]),
    "gate without x": (lambda: _rec(gate=torch.zeros(2, 1, 32)), ValueError, ["gate needs x"]),
    "gate wrong shape": (lambda: _rec(x=torch.zeros(2, 10, 32), gate=torch.zeros(2, 2, 32)), ValueError, ["(2, 1, 32)", "(2, 32)", "(2, 2, 32)"]),
    "gate strided last dim": (lambda: _rec(x=torch.zeros(2, 10, 32), gate=torch.zeros(32, 2).T), ValueError, ["gate"]),
    "out wrong dtype": (lambda: _rec(x=torch.zeros(2, 10, 32, dtype=torch.bfloat16), out=torch.zeros(2, 10, 32)), TypeError,
                        ["out", "bfloat16"]),
    "R int": (lambda: _rec(R=torch.ones(2, 10, 32, dtype=torch.int64)), TypeError, ["R", "(2, 10, 32)"]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(REC_CASES))
def test_reconstruct_bad_input(backend, case):
    make, exc, words = REC_CASES[case]
    kw = make()
    V, R = kw.pop("V"), kw.pop("R")
    with pytest.raises(exc) as info:
        reconstruct(V, R, backend=backend, **kw)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


# ---- gram ------------------------------------------------------------------------------------------
GRAM_CASES = {
    "G wrong shape": (lambda: (torch.zeros(32, 31), F_()), ValueError, ["G", "(32, 32)", "(32, 31)"]),
    "G fp16": (lambda: (torch.zeros(32, 32, dtype=torch.float16), F_()), TypeError, ["G", "float32"]),
    "G on meta": (lambda: (torch.zeros(32, 32, device=META), F_()), ValueError, ["G", "meta"]),
    "G transposed": (lambda: (torch.zeros(32, 32).T, F_()), ValueError, ["contiguous"]),
    "F not flattenable": (lambda: (torch.zeros(32, 32), F_((10, 2, 32)).transpose(0, 1)), ValueError, ["F", "(2, 10, 32)"]),
    "G not a tensor": (lambda: (None, F_()), TypeError, ["G"]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(GRAM_CASES))
def test_gram_bad_input(backend, case):
    make, exc, words = GRAM_CASES[case]
    G, F = make()
    with pytest.raises(exc) as info:
        gram_update(G, F, backend=backend)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        split(F_(), basis(32, 4), backend="cuda")
