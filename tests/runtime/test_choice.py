"""The configuration chosen per model at calibration (svdcache.choice): what calibrate stores, what enable
applies (and leaves to the user), what stats prints, and the compute each candidate is held to."""
import math

import pytest
import torch

import svdcache
from svdcache.choice import CHOSEN_FIELDS, apply, candidates, explicit_settings, for_interval, shared_scale
from svdcache.choose import curve_at, variants
from svdcache.runtime.schedule import full_steps, spread_steps

from flux_helpers import PIPE_KW, run_pipe

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
    cands = candidates(True, set(chosen.meta.get("schedules", {}).get("plans", {})))
    assert set(c["safe_curve"]["fit"]) == set(c["safe_curve"]["check"]) == {"2", "3", "4", "5", "6"}
    for n, t in c["targets"].items():
        labels = {lbl for lbl, _ in variants(cands, len(full_steps(STEPS, interval=int(n), warmup=1)))}
        # every candidate measured, sharing included (two calls per step) at its own compute and at the safe one's
        assert set(t["fit_db"]) == labels and any(lbl.endswith("own compute") for lbl in labels)
        # never below the safe configuration's curve at the chosen compute, never more compute than safe at N
        assert t["check_db"]["chosen"] >= t["check_db"]["safe at the chosen compute"]
        assert t["check_ratio"]["chosen"] >= 0.98 * t["check_ratio"]["safe"] - 0.05
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


def test_safe_curve_is_linear_in_log_ratio():
    """The safe configuration's dB at a candidate's compute: interpolated between the measured intervals in
    log FLOPs ratio, extended along the nearest segment (the choice scores candidates by their dB above it)."""
    pts = {2: (60.0, 2.0), 3: (54.0, 4.0), 4: (50.0, 8.0)}  # (dB, ratio)
    assert curve_at(pts, 2.0) == pytest.approx(60.0) and curve_at(pts, 8.0) == pytest.approx(50.0)
    assert curve_at(pts, math.sqrt(8.0)) == pytest.approx(57.0)  # halfway in log between 2x and 4x
    assert curve_at(pts, 16.0) == pytest.approx(46.0)  # beyond: the last segment extended
    assert curve_at(pts, 1.0) == pytest.approx(66.0)
    assert curve_at({3: (50.0, 3.0)}, 7.0) == 50.0


def test_shared_candidates_run_at_their_own_and_at_the_safe_compute():
    cands = candidates(True, set())
    vs = dict(variants(cands, 17))
    shared = [lbl for lbl, kw in cands if kw["uncond_interval"] > 1]
    assert shared and all(vs[lbl]["full_steps_scale"] == pytest.approx(shared_scale(17), abs=1e-6) for lbl in shared)
    assert all(vs[f"{lbl}, own compute"]["full_steps_scale"] == 1.0 for lbl in shared)
    assert len(vs) == len(cands) + len(shared)


def test_a_run_of_another_guidance_form_is_told(tiny_pipe, chosen):
    """The choice was made with true CFG as two calls per step: a run of one call per step is warned once
    (the choice may lose there), a run of the calibrated form is not; choice="off" is never warned."""
    import warnings

    def form_warnings(call, **kw):
        svdcache.enable(tiny_pipe, basis=chosen, interval=3, **kw)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run_pipe(tiny_pipe, steps=STEPS, **call)
        finally:
            svdcache.disable(tiny_pipe)
        return [str(w.message) for w in caught if "was chosen for" in str(w.message)]

    one = form_warnings({})
    assert len(one) == 1 and "two calls per step" in one[0] and "one call per step" in one[0]
    assert form_warnings(CFG) == []
    assert form_warnings({}, choice="off") == []
