"""Coverage: every transformer class of zoo_all.py (diffusers' own tiny test configs) under the
default granularity: interval 1 bit-exact, cached steps skip every attention / feed-forward module
of the cached block lists (leaf calls counted), lists left uncached named in one warning, disable
bit-exact (zoo_check.check). bench/coverage.py writes the same results as a table."""
from __future__ import annotations

import pytest

import zoo_all as Z
import zoo_check as C

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Classes that do not run uncached on this machine (the check then reports why, and the test skips).
NEEDS = {"CosmosTransformer3DModel": "torchvision (not installed in CI)"}
# Known gaps, with the reason; strict: an unexpected pass fails, so the list stays true.
KNOWN: dict[str, str] = {}


def test_enough_classes_are_required():
    required = [n for n in Z.NAMES if not Z.ZOO[n].extra and n not in NEEDS and n not in KNOWN]
    assert len(required) >= 56, required


@pytest.mark.parametrize("name", Z.NAMES)
def test_class_is_cached(name):
    res = C.check(name)
    if name in NEEDS and res.granularity == "-":
        pytest.skip(f"{name} needs {NEEDS[name]}: {res.detail}")
    if name in KNOWN:
        assert not res.ok, f"{name} now passes: remove it from KNOWN"
        pytest.xfail(KNOWN[name] + f" [{res.detail}]")
    assert res.ok, f"{name} ({res.granularity}): {res.detail}"
    assert res.heavy_full > 0
