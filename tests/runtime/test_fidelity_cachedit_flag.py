"""bench/fidelity.py --cache-dit without cache-dit installed: a one-line error naming the fix, before any
work (no pipeline loaded, no output written); the flag adds rows of kind "cachedit" that --only cache-dit
selects. Needs no cache-dit: the missing package is simulated."""
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


@pytest.fixture
def fidelity(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import cachedit_peer
    import fidelity

    return fidelity, cachedit_peer


def test_missing_cache_dit_is_one_line_error_before_work(fidelity, monkeypatch, tmp_path):
    fid, cdp = fidelity
    monkeypatch.setattr(cdp, "version", lambda: None)

    def no_work(*a, **k):
        raise AssertionError("work started before the missing-package check")

    monkeypatch.setattr(fid, "Bench", no_work)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        fid.main(["--cache-dit", "--only", "cache-dit", "--out", str(out)])
    msg = str(e.value.code)
    assert "\n" not in msg and "cache-dit" in msg and "pip install" in msg and "1.5.3" in msg, msg
    assert not out.exists()


def test_flag_adds_cachedit_rows(fidelity):
    fid, _ = fidelity
    base = fid.method_list()
    assert not any(m["kind"] == "cachedit" for m in base)
    rows = [m for m in fid.method_list(with_cache_dit=True) if m not in base]
    assert rows and all(m["kind"] == "cachedit" and "cache-dit" in m["name"] for m in rows)
    assert not any("cache-dit" in m["name"] for m in base)  # --only cache-dit selects exactly these
    assert len({m["name"] for m in rows}) == len(rows)
    orders = {m["cachedit"]["taylorseer_order"] for m in rows}
    assert orders == {0, 1, 2}, orders  # with and without the TaylorSeer calibrator
