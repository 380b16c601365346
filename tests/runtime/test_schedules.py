"""Calibrated schedules (DP search, closed-loop tuning, run-time use), the kept residual difference
(residual='int8' / 'int4'), memory budgets, and the step count learned from the pipeline."""
import itertools
import warnings

import numpy as np
import pytest
import torch

import svdcache
from svdcache import SVDCacheConfig
from svdcache.features import plan_for_budget
from svdcache_kernels import dequantize_codes as dequantize_rows, quantize_rows
from svdcache.runtime.schedule import Schedule, full_steps, transfer_plan
from svdcache.schedule_search import (calibrated_schedules, check_schedules, coherent_costs, search,
                                      segment_costs, trajectory_grams)

from flux_helpers import run_pipe


@pytest.fixture(autouse=True)
def _clean(tiny_pipe):
    svdcache.disable(tiny_pipe)
    yield
    svdcache.disable(tiny_pipe)


@pytest.fixture(scope="module")
def basis(tiny_pipe):
    return svdcache.calibrate(tiny_pipe, choose=False, prompt="the number 5", num_inference_steps=10,
                              height=32, width=32, max_sequence_length=16, output_type="pt", progress=False)


# -- the search -----------------------------------------------------------------------------------------
def _direct_cost(trajs, Vs, steps, S, weights, coherent, dts):
    """The cost of a placement, forecasting explicitly (no Gram algebra)."""
    total = 0.0
    for X, V in zip(trajs, Vs):
        scale = float(np.mean([float((x * x).sum()) for x in X]))
        P = None if V is None else V @ V.T
        fs = sorted(steps)
        segs = {}
        for i in range(S):
            if i in fs:
                continue
            prev = [f for f in fs if f < i]
            b = prev[-1]
            if len(prev) == 1:
                F_hat = X[b]
            else:
                a = prev[-2]
                d = X[b] - X[a]
                F_hat = X[b] + (i - b) / (b - a) * (d if P is None else d @ P)
            e = X[i] - F_hat
            if coherent:
                segs[b] = segs.get(b, 0) + dts[i] * e
            else:
                total += weights[i] * float((e * e).sum()) / scale
        total += sum(float((v * v).sum()) for v in segs.values()) / scale
    return total


@pytest.mark.parametrize("coherent", [False, True])
@pytest.mark.parametrize("projected", [False, True])
def test_dp_finds_the_brute_force_optimum(coherent, projected):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    S, n, D, k = 9, 5, 6, 2
    trajs, Vs, grams = [], [], []
    for _ in range(2):  # two features
        walk = torch.cumsum(torch.randn(S, n, D, generator=g, dtype=torch.float64), 0)
        traj = {i: walk[i] for i in range(S)}
        V = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0] if projected else None
        trajs.append([walk[i].numpy() for i in range(S)])
        Vs.append(None if V is None else V.numpy())
        grams.append(trajectory_grams(traj, V))
    # scale the direct costs the same way trajectory_grams does
    times = np.arange(S, dtype=np.float64)
    dts = np.linspace(0.5, 2.0, S)
    dts = dts / dts.mean()
    weights = dts**2 / (dts**2).mean()
    if coherent:
        R, T = coherent_costs(grams, dts, times, projected)
    else:
        R, T = segment_costs(grams, weights, times, projected)
    found = search(R, T, max_full=5)
    for m in range(2, 6):
        best = min(
            ([0, *c] for c in itertools.combinations(range(1, S), m - 1)),
            key=lambda st: _direct_cost(trajs, Vs, st, S, weights, coherent, dts),
        )
        want = _direct_cost(trajs, Vs, best, S, weights, coherent, dts)
        steps, cost = found[m]
        assert len(steps) == m and steps[0] == 0
        assert cost == pytest.approx(want, rel=1e-6)
        assert _direct_cost(trajs, Vs, steps, S, weights, coherent, dts) == pytest.approx(want, rel=1e-6)


def test_calibrate_stores_valid_schedules_and_they_round_trip(basis, tmp_path):
    entry = basis.meta["schedules"]
    check_schedules(entry)
    assert entry["num_steps"] == 10
    for fam in ("svd-taylor1", "full-taylor1", "full-reuse"):
        plans = entry["plans"][fam]
        assert {int(m) for m in plans} == set(range(1, 6))
    path = tmp_path / "b.safetensors"
    basis.save(path)
    assert svdcache.load_basis(path).meta["schedules"]["plans"] == entry["plans"]


@pytest.mark.parametrize("bad", [
    {"num_steps": 0, "plans": {}},
    {"num_steps": 10, "plans": {"svd-taylor1": {"3": [0, 5]}}},
    {"num_steps": 10, "plans": {"svd-taylor1": {"2": [1, 5]}}},
    {"num_steps": 10, "plans": {"svd-taylor1": {"2": [0, 12]}}},
    {"num_steps": 10, "plans": {"svd-taylor1": {"2": [0, 0]}}},
    {"num_steps": 10, "plans": ["x"]},
])
def test_malformed_schedules_are_refused_at_enable(tiny_pipe, basis, bad):
    b = svdcache.Basis(basis.features, {**basis.meta, "schedules": bad}, basis.changes)
    with pytest.raises(ValueError, match="schedules"):
        svdcache.enable(tiny_pipe, basis=b, schedule="calibrated")


def test_calibrated_schedule_is_used_and_moves_to_other_step_counts(tiny_pipe, basis):
    """A plan serves its own step count as made, and another step count (28 steps of a 50-step calibration:
    FLUX's diffusers default) at the same fractions of the run, with the uniform rule's number of full steps."""
    plan = basis.meta["schedules"]["plans"]["svd-taylor1"]["4"]
    cfg = SVDCacheConfig(interval=3, warmup=1, schedule="calibrated")
    sch = Schedule(cfg, basis)
    assert len(full_steps(10, interval=3, warmup=1)) == 4
    assert [i for i in range(10) if sch.is_full(i, 10)] == plan
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = [i for i in range(20) if sch.is_full(i, 20)]
        [sch.is_full(i, 20) for i in range(20)]
    assert len(got) == len(full_steps(20, interval=3, warmup=1)) and got[0] == 0
    plans = basis.meta["schedules"]["plans"]["svd-taylor1"]
    near = min(plans, key=lambda k: (abs(int(k) / 10 - len(got) / 20), int(k)))  # the nearest share of full steps
    assert got == transfer_plan(plans[near], 10, 20, len(got))
    assert transfer_plan(plan, 10, 20, len(plan)) == [2 * p for p in plan]  # as many full steps: the same places
    assert not [x for x in w if "svdcache" in str(x.message)]
    with pytest.warns(UserWarning, match="no calibrated schedule"):
        Schedule(cfg, svdcache.Basis(basis.features, {}, basis.changes))
    # inside the pipeline: the plan's full steps are the computed ones
    svdcache.enable(tiny_pipe, basis=basis, config=cfg)
    run_pipe(tiny_pipe, steps=10, true_cfg_scale=1.0)
    g = svdcache.stats(tiny_pipe).last_generation
    assert g.full_steps == len(plan) and g.cached_steps == 10 - len(plan)
    # full space (TaylorSeer) keeps no basis but takes its family's plan from the file, without a warning
    full_plan = basis.meta["schedules"]["plans"]["full-taylor1"]["4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svdcache.enable(tiny_pipe, basis=basis, config=cfg.replace(space="full"))
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("svdcache")
    assert [i for i in range(10) if hook.decider.schedule.is_full(i, 10)] == full_plan


def test_explicit_schedule_and_config_errors():
    cfg = SVDCacheConfig(schedule=[5, 0, 2, 2])
    assert cfg.schedule == (0, 2, 5)
    assert [i for i in range(8) if Schedule(cfg).is_full(i, 8)] == [0, 2, 5]
    for bad in ("often", [-1, 2], [0.5], []):
        with pytest.raises(ValueError, match="schedule"):
            SVDCacheConfig(schedule=bad)
    with pytest.raises(ValueError, match="num_full_steps"):
        SVDCacheConfig(num_full_steps=0)
    assert SVDCacheConfig(residual="int4", space="full").resolve().residual == "reuse"  # a Taylor term only
    assert SVDCacheConfig(predictor="ema").resolve().residual == "reuse"
    with pytest.raises(ValueError, match="memory_budget"):
        SVDCacheConfig(memory_budget=0.9)


def test_tail_and_step_count_are_learned_from_the_pipeline(tiny_pipe, basis):
    # the pipeline passes no step count to the cache: it is read from the scheduler
    svdcache.enable(tiny_pipe, basis=basis, interval=4, warmup=1, tail=3)
    run_pipe(tiny_pipe, steps=12, true_cfg_scale=1.0)
    g = svdcache.stats(tiny_pipe).last_generation
    want = full_steps(12, interval=4, warmup=1, tail=3)
    assert g.full_steps == len(want)
    svdcache.enable(tiny_pipe, basis=basis, interval=4, warmup=1, num_inference_steps=20)
    with pytest.warns(UserWarning, match="pipeline runs 12 steps"):
        run_pipe(tiny_pipe, steps=12, true_cfg_scale=1.0)


def test_tuning_never_returns_worse_than_its_uniform_candidate(tiny_pipe, basis):
    from svdcache.schedule_tuning import tune_schedule

    b = svdcache.Basis(basis.features, {**basis.meta, "schedules": dict(basis.meta["schedules"])}, basis.changes)
    b.meta["schedules"]["plans"] = {k: dict(v) for k, v in basis.meta["schedules"]["plans"].items()}
    cfg = SVDCacheConfig(interval=3, warmup=1)
    res = tune_schedule(tiny_pipe, b, cfg, num_full_steps=[4], prompt="the number 4", generator_seeds=[7],
                        num_inference_steps=10, max_evals=6, progress=False, height=32, width=32,
                        max_sequence_length=16, output_type="pt", true_cfg_scale=1.0)
    steps, err = res[4]
    assert len(steps) == 4 and steps[0] == 0 and b.meta["schedules"]["plans"]["svd-taylor1"]["4"] == steps
    check_schedules(b.meta["schedules"])
    ref = run_pipe(tiny_pipe, prompt="the number 4", steps=10, seed=7, true_cfg_scale=1.0)
    svdcache.enable(tiny_pipe, basis=b, config=cfg)  # the uniform schedule, one of the candidates
    uni = run_pipe(tiny_pipe, prompt="the number 4", steps=10, seed=7, true_cfg_scale=1.0)
    assert err <= float((uni - ref).norm() / ref.norm()) + 1e-6


# -- the kept residual difference and memory budgets -------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("D", [7, 64, 129])
def test_quantize_round_trip_within_half_a_step(bits, D):
    r = torch.randn(2, 5, D) * torch.rand(2, 5, 1) * 10
    q, s = quantize_rows(r, bits)
    assert q.shape[-1] == (D if bits == 8 else (D + 1) // 2)
    L = 127 if bits == 8 else 7
    err = (dequantize_rows(q, s, D, bits) - r).abs()
    assert bool((err <= s / 2 * (1 + 1e-5)).all())
    assert float(err.max()) <= float(r.abs().max()) / (2 * L) * (1 + 1e-5)


@pytest.mark.parametrize("residual", ["int8", "int4"])
def test_kept_residual_forecast_is_full_space_taylor_up_to_quantization(residual):
    from svdcache.features import FullSpaceCache, make_feature_cache

    D, k = 48, 5
    V = torch.linalg.qr(torch.randn(D, k))[0]
    cfg = SVDCacheConfig(residual=residual, tau=None, rank=k, order=1)
    ts = svdcache.taylorseer(order=1)
    q = make_feature_cache("f", cfg, V)
    full = FullSpaceCache("f", ts)
    F0, F1 = torch.randn(2, 9, D), torch.randn(2, 9, D)
    for t, F in ((0.0, F0), (3.0, F1)):
        q.update(F, t)
        full.update(F, t)
    want = full.forecast(5.0)
    got = q.forecast(5.0)
    diff = (F1 - F0) / 3.0
    r = diff - diff @ V @ V.T
    L = 127 if residual == "int8" else 7
    bound = 2.0 * r.abs().amax(-1, keepdim=True) / (2 * L) * (1 + 1e-4) + 1e-5
    assert bool(((got - want).abs() <= bound).all())
    assert not torch.allclose(got, F1 + 2.0 * (diff @ V @ V.T), atol=1e-3)  # the residual part is kept
    rows = 2 * 9
    held = rows * D * 4 + rows * k * 4 + rows * 4  # the anchor F1, D1, one scale per row
    assert q.nbytes() == held + rows * (D if residual == "int8" else (D + 1) // 2)


def test_default_settings_without_a_choice_are_the_safe_ones():
    """Without a choice from the basis (svdcache.choice) the automatic settings resolve to what lost nowhere
    measured: order 1, both guidance branches at every full step, whatever the interval; an explicit setting
    stays, replace() re-chooses the automatic ones."""
    for n in (2, 3, 4, 5, 8):
        c = SVDCacheConfig(interval=n).resolve()
        assert (c.order, c.uncond_interval) == (1, 1), n
    assert svdcache.taylorseer(interval=8).resolve().order == 1 and svdcache.fora(interval=8).resolve().order == 1
    assert SVDCacheConfig(interval=8, order=2).resolve().order == 2
    assert SVDCacheConfig(interval=8, order=2, uncond_interval=2).resolve().replace(interval=2).resolve().order == 2
    assert SVDCacheConfig(interval=8).resolve().replace(order=2).resolve().order == 2
    assert SVDCacheConfig().order is None  # automatic until resolved: the config itself is never rewritten
    with pytest.raises(ValueError, match="order"):
        SVDCacheConfig(order=3)


def test_memory_budget_plan_and_stats(tiny_pipe, basis):
    assert plan_for_budget(1.25, 128, 13, 4) == (13, 4)
    assert plan_for_budget(1.5, 128, 13, 4) == (13, 8)
    assert plan_for_budget(1.05, 128, 13, 4) == (6, 0)
    assert plan_for_budget(1.01, 128, 40, 2) == (1, 0)
    for budget in (1.1, 1.3):
        svdcache.enable(tiny_pipe, basis=basis, interval=3, warmup=1, memory_budget=budget)
        run_pipe(tiny_pipe, steps=10, true_cfg_scale=1.0)
        assert svdcache.stats(tiny_pipe).last_generation.memory_ratio <= budget
