"""The configuration chosen per model at calibration (svdcache.choice): what calibrate stores, what enable
applies (and leaves to the user), what stats prints, and the compute each candidate is held to."""
import math

import pytest
import torch

import svdcache
from svdcache.choice import CHOSEN_FIELDS, apply, candidates, explicit_settings, for_interval, shared_scale
from svdcache.runtime.schedule import full_steps, spread_steps

from flux_helpers import PIPE_KW

CFG = dict(negative_prompt="", true_cfg_scale=2.0)  # two calls per step, in the contexts "cond" / "uncond"
STEPS = 10


@pytest.fixture(scope="module")
def chosen(tiny_pipe):
    """A basis calibrated with the choice on, for two intervals (two pairs each side: fit and check)."""
    kw = {k: v for k, v in PIPE_KW.items() if k != "output_type"}
    return svdcache.calibrate(tiny_pipe, prompt="a handwritten digit three", num_inference_steps=STEPS,
                              generator=torch.Generator().manual_seed(0), choose_seeds=(1, 2, 3, 4),
                              choose_intervals=(3, 5), progress=False, **kw, **CFG)


def test_calibrate_stores_a_choice_never_below_the_safe_configuration(chosen, tmp_path):
    c = chosen.meta["choice"]
    assert c["guidance"] == "two calls per step" and c["num_steps"] == STEPS
    assert set(c["targets"]) == {"3", "5"}
    fit, check = {tuple(p) for p in c["fit"]}, {tuple(p) for p in c["check"]}
    assert fit and check and not fit & check  # the checking part is apart from the fitting part
    for t in c["targets"].values():
        labels = {lbl for lbl, _ in candidates(True, set(chosen.meta.get("schedules", {}).get("plans", {})))}
        assert set(t["fit_db"]) == labels  # every candidate measured, sharing included (two calls per step)
        assert t["check_db"]["chosen"] >= t["check_db"]["safe"]  # never below the safe configuration
        assert set(t["settings"]) <= set(CHOSEN_FIELDS)
    path = tmp_path / "b.safetensors"
    chosen.save(path)
    assert svdcache.load_basis(path).meta["choice"] == c  # stored under the file's checksum


def test_enable_applies_the_choice_where_the_user_did_not_set_it(tiny_pipe, chosen):
    t = for_interval(chosen.meta["choice"], 5)
    cfg = svdcache.enable(tiny_pipe, basis=chosen, interval=5)
    try:
        assert cfg.chosen == t["label"]
        for k, v in t["settings"].items():
            assert getattr(cfg, k) == v, k
        s = str(svdcache.stats(tiny_pipe))
        assert "chosen at calibration for N=5" in s and t["label"] in s
        # a setting the user gives stays theirs; choice="off" is the safe configuration
        cfg = svdcache.enable(tiny_pipe, basis=chosen, interval=5, uncond_interval=1, order=2)
        assert cfg.uncond_interval == 1 and cfg.order == 2
        cfg = svdcache.enable(tiny_pipe, basis=chosen, interval=5, choice="off")
        assert cfg.chosen is None and cfg.order == 1 and cfg.uncond_interval == 1 and cfg.schedule == "auto"  # uniform
    finally:
        svdcache.disable(tiny_pipe)


def test_choice_apply_and_explicit_settings():
    from svdcache.basis import Basis

    basis = Basis({}, {"choice": {"guidance": "two calls per step", "targets": {
        "4": {"label": "x", "settings": {"order": 2, "uncond_interval": 2, "full_steps_scale": 1.3},
              "check_db": {"chosen": 40.0, "safe": 39.0}}}}})
    base = svdcache.SVDCacheConfig(interval=6)
    got = apply(base, basis, explicit_settings(None, {"interval": 6}))
    assert (got.order, got.uncond_interval, got.full_steps_scale, got.chosen) == (2, 2, 1.3, "x")  # nearest target
    own = svdcache.SVDCacheConfig(interval=6, order=1)
    got = apply(own, basis, explicit_settings(own, {}))
    assert got.order == 1 and got.uncond_interval == 2  # the config's own non-default setting is kept
    assert apply(svdcache.taylorseer(6), basis, set()).chosen is None  # full space: not a subspace choice
    assert apply(base, None, set()) is base


@pytest.mark.parametrize("m", [1, 2, 5, 8, 10, 17, 25])
def test_shared_runs_get_the_full_steps_that_cost_no_more(m):
    """Sharing the unconditional branch: M' full steps cost M' + ceil(M'/2) calls; at most the 2M calls of M
    full steps with both branches, and one more would exceed them."""
    mp = round(shared_scale(m) * m)
    assert mp + math.ceil(mp / 2) <= 2 * m < (mp + 1) + math.ceil((mp + 1) / 2)


@pytest.mark.parametrize("steps", [10, 28, 50])
@pytest.mark.parametrize("interval", [2, 3, 5, 7])
def test_spread_steps_is_the_interval_rule_where_it_divides(steps, interval):
    fs = full_steps(steps, interval=interval, warmup=1)
    sp = spread_steps(steps, len(fs))
    assert len(sp) == len(fs) and sp[0] == 0
    if steps % interval == 0:
        assert sp == fs
