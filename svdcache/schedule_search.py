"""Calibrated schedules: which steps to compute in full, chosen on the calibration trajectory.

For a given number M of full steps, the positions that minimise the teacher-forced forecast error of a
predictor on the reference trajectory, found exactly by dynamic programming over step positions.

The predictors searched for are the ones the runtime has: reuse (FORA, and every cached step that
follows the first full step), and first-order Taylor through the last two full steps a < b,

    F_hat(i) = F_b + (i - b) / (b - a) * P (F_b - F_a),

with P = I (full space, TaylorSeer) or the projection on the first k change-subspace directions
(SVD-Cache, anchor form: the residual is reused). Its squared error needs only inner products of the
trajectory with itself, so every (a, b, i) triple is priced from two S x S Gram matrices per feature
(one in full space, one in the k-dim coefficient space): no forecast is ever formed.

The error of step i is weighted by dt_i^2, the squared step of the sampler there (the latent moves by
dt_i times the model output, so a feature error at a large step costs more), and each feature's error
is taken relative to its mean energy along the trajectory, so all features count alike.
"""
from __future__ import annotations

import numpy as np
import torch

FAMILIES = ("svd-taylor1", "full-taylor1", "full-reuse")


def family_key(space: str, predictor: str, order: int, residual: str = "reuse", uncond_interval: int = 1) -> str:
    """The calibrated-schedule family a configuration uses (order 2 uses the order-1 placement; the kept
    residual variants use the SVD family's: on the development set it did better for them than the
    full-space plan at interval 8 (+1.8 dB) and 0.3 dB worse at 5). Runs that share the unconditional
    branch (``uncond_interval`` m > 1, true CFG) have their own plans, suffix ``-u{m}``: a full step
    costs less there and the best placement differs."""
    if predictor == "reuse":
        fam = f"{space}-reuse" if space == "full" else "full-reuse"
    elif predictor in ("taylor", "hermite"):  # the same state and placement problem
        fam = f"{space}-taylor1"
    else:
        fam = f"{space}-{predictor}"
    return fam if uncond_interval <= 1 else f"{fam}-u{uncond_interval}"


def trajectory_grams(traj: dict[int, torch.Tensor], V: torch.Tensor | None):
    """(Gf, Gk): S x S Gram matrices of one feature's trajectory (rows sampled per step) in full space and
    in the coefficient space of V (None: Gk = Gf), both divided by the mean energy per step."""
    steps = sorted(traj)
    X = torch.stack([traj[i].double().reshape(-1, traj[i].shape[-1]) for i in steps])  # (S, n, D)
    Xf = X.reshape(len(steps), -1)
    Gf = Xf @ Xf.T
    if V is None:
        Gk = Gf
    else:
        C = (X @ V.double()).reshape(len(steps), -1)
        Gk = C @ C.T
    scale = float(Gf.diagonal().mean()) or 1.0
    return (Gf / scale).numpy(), (Gk / scale).numpy()


def _errors(Gf: np.ndarray, Gp: np.ndarray, times: np.ndarray):
    """reuse[b, i] and taylor[a, b, i]: squared errors of the forecasts of step i (S x S, S x S x S)."""
    d = np.diag(Gf)
    reuse = d[None, :] - 2 * Gf + d[:, None]  # ||X_i - X_b||^2, indexed [b, i]
    dp = np.diag(Gp)
    # <P(X_i - X_b), X_b - X_a>, indexed [a, b, i]
    cross = Gp.T[None, :, :] - Gp.T[:, None, :] - dp[None, :, None] + Gp[:, :, None]
    step = dp[None, :] - 2 * Gp + dp[:, None]  # ||P(X_b - X_a)||^2 [a, b]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = (times[None, None, :] - times[None, :, None]) / (times[None, :, None] - times[:, None, None])
    alpha = np.nan_to_num(alpha, nan=0.0, posinf=0.0, neginf=0.0)
    taylor = reuse[None, :, :] - 2 * alpha * cross + alpha**2 * step[:, :, None]
    return reuse, taylor


def coherent_costs(grams, dts: np.ndarray, times: np.ndarray, projected: bool):
    """Like :func:`segment_costs`, but a segment's errors add up before they are squared: the cost of the
    cached steps b < i < e is || sum_i dt_i e_i ||^2, the latent error they leave (errors of one
    extrapolation point the same way, so they add coherently)."""
    S = len(dts)
    idx = np.arange(S)
    R = np.zeros((S, S + 1))
    T = np.zeros((S, S, S + 1))
    # 1-D sums over i in (b, end): sum_i dt_i f(i), as [b, end] for f indexed [b, i]
    for Gf, Gk in grams:
        Gp = Gk if projected else Gf
        W = dts[:, None] * dts[None, :] * Gf
        P2 = np.zeros((S + 1, S + 1))
        P2[1:, 1:] = np.cumsum(np.cumsum(W, 0), 1)
        lo = np.minimum(idx[:, None] + 1, S)  # first cached step b + 1, as [b, 1]
        en = np.arange(S + 1)[None, :]
        lo_b = np.broadcast_to(lo, (S, S + 1))
        en_b = np.broadcast_to(en, (S, S + 1))
        hi = np.maximum(en_b, lo_b)
        AA = P2[hi, hi] - P2[lo_b, hi] - P2[hi, lo_b] + P2[lo_b, lo_b]  # ||A||^2 [b, end]
        w = _cum(np.broadcast_to(dts[None, :], (S, S)).copy(), S)  # sum dt_i [b, end]
        AXb = _cum(dts[None, :] * Gf, S)  # <A, X_b> = sum dt_i Gf[b, i]  [b, end]
        dgf = np.diag(Gf)
        R += AA + w**2 * dgf[:, None] - 2 * w * AXb
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = (times[None, None, :] - times[None, :, None]) / (times[None, :, None] - times[:, None, None])
        alpha = np.nan_to_num(alpha, nan=0.0, posinf=0.0, neginf=0.0)  # [a, b, i]
        u = _cum(alpha * dts[None, None, :], S)  # [a, b, end]
        dp = np.diag(Gp)
        # <A, P d> = sum_i dt_i (Gp[i, b] - Gp[i, a])  [a, b, end]
        APd = _cum(dts[None, None, :] * (Gp.T[None, :, :] - Gp.T[:, None, :]) * (alpha != 0), S)
        Pd2 = (dp[None, :] - 2 * Gp + dp[:, None])[:, :, None]  # ||P d||^2 [a, b]
        XbPd = (dp[None, :] - Gp)[:, :, None]  # <X_b, P d> = Gp[b, b] - Gp[a, b]
        Rb = (AA + w**2 * dgf[:, None] - 2 * w * AXb)[None]
        T += Rb + u**2 * Pd2 - 2 * u * APd + 2 * w[None] * u * XbPd
    return R, T


def segment_costs(grams, weights: np.ndarray, times: np.ndarray, projected: bool):
    """R[b, e] = sum_{b<i<e} w_i reuse(i | b);  T[a, b, e] = sum_{b<i<e} w_i taylor(i | a, b), over all
    trajectories (features x contexts)."""
    S = len(weights)
    R = np.zeros((S, S + 1))
    T = np.zeros((S, S, S + 1))
    for Gf, Gk in grams:
        reuse, taylor = _errors(Gf, Gk if projected else Gf, times)
        R += _cum(reuse * weights[None, :], S)
        T += _cum(taylor * weights[None, None, :], S)
    return R, T


def _cum(e: np.ndarray, S: int) -> np.ndarray:
    """Sums over i of e[..., i] for b < i < end, as an array [..., b, end] (end in 0..S)."""
    idx = np.arange(S)
    mask = idx[None, :] > idx[:, None]  # i > b
    c = np.concatenate([np.zeros(e.shape[:-1] + (1,)), np.cumsum(e * mask, axis=-1)], axis=-1)  # [.., b, end]
    # sum_{b < i < end} = c[..., b, end] for end > b (terms with i <= b are masked to 0); end <= b: 0
    end_ok = np.arange(S + 1)[None, :] > idx[:, None]
    return np.where(end_ok, c, 0.0)


def search(R: np.ndarray, T: np.ndarray, max_full: int) -> dict[int, tuple[list[int], float]]:
    """For every M in 1..max_full the full-step positions (step 0 always full) of least total cost."""
    S = R.shape[0]
    inf = np.inf
    out = {1: ([0], float(R[0, S]))}
    # best[a, b]: least cost of steps 0..b with the current number of full steps, the last two at a < b
    best = np.full((S, S), inf)
    best[0, 1:] = R[0, 1:S]
    back = []
    for m in range(2, max_full + 1):
        fin = best[:, :, None] + T[:, :, S : S + 1]
        a, b = np.unravel_index(np.argmin(fin[:, :, 0]), (S, S))
        if np.isfinite(fin[a, b, 0]):
            path = [b, a]
            for arg in reversed(back):
                path.append(int(arg[path[-1], path[-2]]))
            steps = sorted(set(int(p) for p in path))
            out[m] = (steps, float(fin[a, b, 0]))
        if m == max_full:
            break
        new = np.full((S, S), inf)
        arg = np.zeros((S, S), dtype=np.int64)
        for bb in range(1, S - 1):
            vals = best[:bb, bb][:, None] + T[:bb, bb, : S]  # [a, c]
            j = np.argmin(vals, axis=0)
            v = vals[j, np.arange(S)]
            c = np.arange(S) > bb
            new[bb, c] = v[c]
            arg[bb, c] = j[c]
        back.append(arg)
        best = new
    return out


def step_weights(timesteps: list[float] | None, S: int) -> np.ndarray:
    """dt_i^2 per step from the timesteps the model was called with (the last step runs to 0), mean 1."""
    if not timesteps or len(timesteps) != S:
        return np.ones(S)
    t = np.asarray(timesteps, dtype=np.float64)
    dt = np.abs(np.diff(np.concatenate([t, [0.0]])))
    w = dt**2
    return w / w.mean() if w.mean() > 0 else np.ones(S)


def step_sizes(timesteps: list[float] | None, S: int) -> np.ndarray:
    """dt_i per step (the last step runs to 0), mean 1; ones without timesteps."""
    if not timesteps or len(timesteps) != S:
        return np.ones(S)
    t = np.asarray(timesteps, dtype=np.float64)
    dt = np.abs(np.diff(np.concatenate([t, [0.0]])))
    return dt / dt.mean() if dt.mean() > 0 else np.ones(S)


def calibrated_schedules(samples, change_bases: dict, tau: float, timesteps: list[float] | None = None,
                         families=FAMILIES, max_full: int | None = None, objective: str = "dt2") -> dict:
    """Search the schedules of ``families`` on the calibration trajectories ``samples``
    ({(context, feature): {step: rows}}); ``change_bases`` give the SVD family's subspace (k by ``tau``).
    Returns the basis-file entry: {"num_steps", "tau", "weights", "plans": {family: {M: steps}}}."""
    trajs = [(name, traj) for (_, name), traj in samples.items() if sorted(traj) == list(range(len(traj)))]
    if not trajs:
        return {}
    S = max(len(t) for _, t in trajs)
    trajs = [(n, t) for n, t in trajs if len(t) == S]
    max_full = max_full or max(1, S // 2)
    weights = step_weights(timesteps, S)
    times = np.arange(S, dtype=np.float64)
    plans = {}
    full_grams = [trajectory_grams(t, None) for _, t in trajs]
    svd_grams = None
    for fam in families:
        if fam.startswith("svd"):
            if svd_grams is None:
                svd_grams = []
                for name, t in trajs:
                    fb = change_bases.get(name)
                    V = None if fb is None else fb.V[:, : fb.rank(tau)]
                    svd_grams.append(trajectory_grams(t, V))
            grams, projected = svd_grams, True
        else:
            grams, projected = full_grams, False
        if objective == "coherent":
            R, T = coherent_costs(grams, step_sizes(timesteps, S), times, projected)
        else:
            R, T = segment_costs(grams, weights if objective == "dt2" else np.ones(S), times, projected)
        if fam.endswith("reuse"):
            T = np.broadcast_to(R[None], T.shape).copy()  # reuse: the forecast ignores the older step
        found = search(R, T, max_full)
        plans[fam] = {str(m): steps for m, (steps, _) in found.items()}
    return {"num_steps": S, "tau": tau, "objective": objective, "dt": bool(timesteps), "plans": plans}


def check_schedules(entry, where: str = "basis") -> None:
    """Raise a one-line ValueError if a basis file's ``schedules`` entry is malformed."""
    if entry is None:
        return
    bad = f"{where}: metadata field 'schedules'"
    if not isinstance(entry, dict) or not isinstance(entry.get("plans", {}), dict):
        raise ValueError(f"{bad} is not a mapping of plans; recalibrate or delete the field")
    S = entry.get("num_steps")
    if not isinstance(S, int) or S < 1:
        raise ValueError(f"{bad}: num_steps must be an integer >= 1, got {S!r}")
    for fam, plans in entry.get("plans", {}).items():
        if not isinstance(plans, dict):
            raise ValueError(f"{bad}: plans of {fam!r} are not a mapping")
        for m, steps in plans.items():
            ok = (isinstance(steps, list) and steps and all(isinstance(x, int) and 0 <= x < S for x in steps)
                  and steps == sorted(set(steps)) and steps[0] == 0 and str(len(steps)) == str(m))
            if not ok:
                raise ValueError(f"{bad}: plan {fam!r}/{m!r} must be {m} sorted distinct step indices in [0, {S}) "
                                 f"starting at 0, got {steps!r}")
