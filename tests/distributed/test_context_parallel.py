"""SVD-Cache under diffusers' context parallelism: 2 gloo ranks on CPU, Ulysses and Ring.

One launch (tests/distributed/cp_worker.py on 2 ranks, hard timeout) measures everything; the
tests below read what each rank wrote. Reference: the same tiny FluxTransformer2DModel, inputs and
cache settings in one process without parallelism."""
from __future__ import annotations

import os

import pytest
import torch
from dist_launch import launch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cp_worker.py")
MODES = ("ulysses", "ring")  # context parallelism; "tensor" (tensor parallelism) runs in the same launch
# hard limit of the whole launch (the launcher kills what is left, and the tests then fail); each
# rank's own collective timeout is DIST_TIMEOUT
LAUNCH_TIMEOUT = 300


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    ranks = launch(WORKER, ["parity", ",".join(MODES + ("tensor",)), str(out)], nprocs=2, timeout=LAUNCH_TIMEOUT,
                   env={"DIST_TIMEOUT": "60"})
    data = []
    for r in ranks:
        path = out / f"rank{r.rank}.pt"
        assert path.exists(), f"rank {r.rank} wrote no results (exit {r.returncode}, killed {r.killed}):\n{_tail(r.output)}"
        data.append(torch.load(path, weights_only=False))
    return ranks, data


def _theirs(call):
    return [c for c in call if not c[1]]


def _ours(call):
    return [c[0] for c in call if c[1]]


def assert_same_through_codes(cp, sp, sp_reuse):
    """Parity of a run with the 4-bit kept residual (the default). Context parallelism changes the
    rounding of a full step's features by an ulp (attention's reduction order), which can flip a
    4-bit code of the residual difference: one quantization step of one element, not a defect. So the
    bound is relative to what the residual adds to the output (the run with it reused): a code
    flip is a few per mille of it, a rank holding wrong or stale codes or scales moves it by its
    whole size."""
    kept = float((sp - sp_reuse).abs().max())
    assert kept > 1e-4  # the residual is in effect on this run
    err = float((cp - sp).abs().max())
    assert err <= 0.01 * kept, (err, kept)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("basis", ["offline", "offline_reuse", "online"])
def test_cached_output_equals_single_process(launched, mode, basis):
    _, (r0, r1) = launched
    cp, sp = r0[mode][f"cp_{basis}"], r0[f"sp_{basis}"]
    # the cache forecast on this run (else the comparison would be of two uncached runs)
    assert (sp - r0["sp_uncached"]).abs().max() > 1e-4
    if basis == "offline":  # the default: 4-bit residual codes
        assert_same_through_codes(cp, sp, r0["sp_offline_reuse"])
    else:  # the residual reused: no quantizer, fp32 parity
        torch.testing.assert_close(cp, sp)  # fp32 tolerance (rtol 1.3e-6, atol 1e-5)
    assert torch.equal(cp, r1[mode][f"cp_{basis}"])  # the gathered output is the same on both ranks


def test_enable_before_parallelism(launched):
    """svdcache.enable first, enable_parallelism after: the root hook sees the input shards (and
    knows it: no per-rank decision on input values); the output is the same as one process's."""
    _, (r0, r1) = launched
    res = r0["ulysses"]
    assert res["inner_sees_shards"] and not res["outer_sees_shards"]
    assert_same_through_codes(res["inner_offline"], r0["sp_offline"], r0["sp_offline_reuse"])
    torch.testing.assert_close(res["inner_offline_reuse"], r0["sp_offline_reuse"])
    assert torch.equal(res["inner_offline"], r1["ulysses"]["inner_offline"])
    assert res["inner_stats"].last_generation.cached_steps == r0["sp_offline_stats"].last_generation.cached_steps


@pytest.mark.parametrize("mode", MODES)
def test_basis_identical_on_all_ranks(launched, mode):
    _, (r0, r1) = launched
    for key in ("cp_online_basis", "cp_basis"):  # zero-setup, and calibration under context parallelism
        a, b = r0[mode][key], r1[mode][key]
        assert a.keys() == b.keys() and a
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        assert not bad, f"{key}: differs between ranks in {bad[:4]}"
    a, b = r0["loaded_basis"], r1["loaded_basis"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _projector_gap(a: dict, b: dict) -> tuple[float, int]:
    gap, k_mismatch = 0.0, 0
    for key in a:
        if key.endswith("/k"):
            k_mismatch += int(a[key] != b[key])
        elif key.endswith("/V"):
            k = int(a[key[:-2] + "/k"])
            Pa, Pb = a[key][:, :k] @ a[key][:, :k].T, b[key][:, :k] @ b[key][:, :k].T
            gap = max(gap, float((Pa - Pb).abs().max()))
    return gap, k_mismatch


@pytest.mark.parametrize("mode", MODES)
def test_bases_match_single_process(launched, mode):
    _, (r0, r1) = launched
    # calibration under context parallelism (Grams all-reduced before the eigh) vs one process
    gap, k_mismatch = _projector_gap(r0[mode]["cp_basis"], r0["sp_basis"])
    assert k_mismatch == 0 and gap < 1e-4, (gap, k_mismatch)
    # zero-setup basis (Gram of the first full steps' rows, all-reduced) vs one process
    gap, k_mismatch = _projector_gap(r0[mode]["cp_online_basis"], r0["sp_online_basis"])
    assert k_mismatch == 0 and gap < 1e-4, (gap, k_mismatch)
    # fitted gains and calibrated schedules come from the gathered rows: the same on every rank
    assert r0[mode]["cp_basis_meta"] == r1[mode]["cp_basis_meta"]
    sp_gains, cp_gains = r0["sp_basis_meta"]["gains"], r0[mode]["cp_basis_meta"]["gains"]
    assert sp_gains.keys() == cp_gains.keys()
    worst = max(abs(sp_gains[f][k] - cp_gains[f][k]) for f in sp_gains for k in sp_gains[f])
    assert worst <= 2e-4, worst  # gains are stored rounded to 4 decimals
    assert r0[mode]["cp_basis_meta"]["schedules"] == r0["sp_basis_meta"]["schedules"]


@pytest.mark.parametrize("mode", MODES)
def test_no_collective_added_on_any_step(launched, mode):
    """Per transformer call: a full step issues exactly the uncached model's collectives, a cached
    step exactly the model's own collectives outside attention (the output all-gather), svdcache
    none of its own except one all-reduce per feature at the step the zero-setup basis is built;
    and both ranks issue the same sequence."""
    _, (r0, r1) = launched
    res0, res1 = r0[mode], r1[mode]
    unc = res0["counts_uncached"]
    assert unc and all(c == unc[0] for c in unc)
    full = unc[0]
    outside_attention = [c for c in full if c[2] != "attention_dispatch.py"]
    assert 0 < len(outside_attention) < len(full)
    for run in ("offline", "online"):
        calls = res0[f"counts_{run}"]
        assert calls == res1[f"counts_{run}"], f"{run}: the ranks issued different collectives"
        kinds = []
        for i, call in enumerate(calls):
            theirs = _theirs(call)
            assert theirs in (full, outside_attention), f"{run} call {i}: {theirs}"
            kinds.append("full" if theirs == full else "cached")
        stats = res0[f"cp_{run}_stats"].last_generation
        assert kinds.count("cached") == stats.cached_steps > 0
        ours = [_ours(c) for c in calls]
        if run == "offline":
            assert all(o == [] for o in ours), ours
        else:
            built = [i for i, o in enumerate(ours) if o]
            assert len(built) == 1 and ours[built[0]] == ["dist.all_reduce"] * res0["n_features"], ours


@pytest.mark.parametrize("mode", MODES)
def test_nan_on_one_rank_falls_back_on_every_rank(launched, mode):
    _, (r0, r1) = launched
    assert r1[mode]["nan_hits"] > 0 and r0[mode]["nan_hits"] == 0  # only rank 1's shard was poisoned
    for r in (r0, r1):
        g = r[mode]["nan_stats"].last_generation
        assert g.fallbacks == 1 and g.cached_steps > 0
        assert torch.isfinite(r[mode]["cp_nan"]).all()
    assert r0[mode]["counts_nan"] == r1[mode]["counts_nan"]


@pytest.mark.parametrize("mode", MODES)
def test_stats_all_ranks(launched, mode):
    _, (r0, r1) = launched
    for r in (r0, r1):
        s = r[mode]["all_ranks_stats"]
        assert s["world"] == 2 and s["kind"] == "context" and s["identical"]
        assert s["per_rank"][r["rank"]] == r[mode]["cp_offline_stats"].last_generation.cache_bytes
        assert s["total"] == sum(s["per_rank"])
        assert "cache memory per rank" in s["text"]
    # each rank caches its own tokens: together they hold what one process holds
    assert r0[mode]["all_ranks_stats"]["total"] == r0["sp_offline_stats"].last_generation.cache_bytes
    # the explicit call is the only exchange: one all-gather
    assert [c[0] for c in r0[mode]["stats_outside"] if c[1]] == ["dist.all_gather_object"]


def test_tensor_parallel(launched):
    """Tensor parallelism: the cached features are the row-parallel linears' all-reduced outputs,
    replicated, so every rank holds the whole cache and builds the same basis locally. A full step
    issues the uncached model's collectives (svdcache reduces a single block's partial proj_out
    itself, in place of torch's output hook: moved, not added), a cached step none."""
    _, (r0, r1) = launched
    t0, t1 = r0["tensor"], r1["tensor"]
    torch.testing.assert_close(t0["cp_uncached"], r0["sp_uncached"])
    torch.testing.assert_close(t0["cp_online"], r0["sp_online"])
    assert torch.equal(t0["cp_online"], t1["cp_online"])
    a, b = t0["cp_online_basis"], t1["cp_online_basis"]
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    unc = t0["counts_uncached"]
    assert unc and all(c == unc[0] for c in unc)
    names = sorted(c[0] for c in unc[0])
    calls = t0["counts_online"]
    assert calls == t1["counts_online"]
    full = [c for c in calls if c]
    assert all(sorted(x[0] for x in c) == names for c in full)
    assert len(calls) - len(full) == t0["cp_online_stats"].last_generation.cached_steps > 0
    assert t0["all_ranks_stats"]["kind"] == "tensor"


def test_failure_on_one_rank_ends_both(launched):
    """Rank 1 raises inside a cached step while rank 0 waits in the output all-gather: rank 0 must
    end by itself (gloo reports the closed connection), long before the collective timeout."""
    ranks, _ = launched
    r0, r1 = ranks
    assert not r0.killed and not r1.killed
    assert r1.returncode == 3 and "injected failure on rank 1" in r1.output, _tail(r1.output)
    assert r0.returncode == 3, _tail(r0.output)
    assert abs(r0.seconds - r1.seconds) < 30, (r0.seconds, r1.seconds)
