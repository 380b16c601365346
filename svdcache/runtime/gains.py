"""Fitted forecast gains: least squares on the calibration trajectory, stored in the basis file as
``meta["gains"][feature][key]`` and read back by ``enable(fitted_gains=True)``."""
from __future__ import annotations

from ..features import newton_weights
from .schedule import full_steps

CHANGE_PREFIX = "change/"  # keys of the gains fitted in the change subspace


def gain_key(order: int, interval: int, warmup: int, prefix: str = "") -> str:
    """The key of one fitted gain in the basis file."""
    return f"{prefix}o{order}_N{interval}_w{warmup}"


def config_gain_key(cfg) -> str:
    """The key ``enable(fitted_gains=True)`` reads for a configuration."""
    return gain_key(cfg.order, cfg.interval, cfg.warmup, CHANGE_PREFIX if cfg.subspace == "change" else "")


def fit_gains(samples, feats, *, warmup: int = 3, intervals=range(2, 13), orders=(1, 2), prefix: str = "") -> dict:
    """Least-squares gains of the principal Taylor increment, per feature, order and interval.

    Teacher-forced on the calibration trajectory (its own features, row-subsampled): at each step the
    schedule would forecast, the increment P - C_last of gain 1 is compared with the true C_t - C_last
    in k dims, and g = sum <dP, dC> / sum |dP|^2 (clipped to [0, 2]). No extra model run."""
    acc: dict[tuple, list[float]] = {}
    for (_, name), traj in samples.items():
        steps = sorted(traj)
        if steps != list(range(len(steps))) or name not in feats:
            continue  # gains need the whole trajectory from step 0
        fb = feats[name]
        V = fb.V[:, : fb.k].double()
        C = [traj[i].double() @ V for i in steps]
        S = len(C)
        for order in orders:
            for N in intervals:
                fs = set(full_steps(S, interval=N, warmup=warmup))
                hist, D1, D2 = [], None, None
                num = den = 0.0
                for i in range(S):
                    if i in fs:
                        if hist:
                            d1 = (C[i] - hist[-1][1]) / (i - hist[-1][0])
                            if order >= 2 and D1 is not None and len(hist) >= 2:
                                D2 = (d1 - D1) / (i - hist[-2][0])
                            D1 = d1
                        hist = (hist + [(i, C[i])])[-3:]
                        continue
                    if len(hist) < 2:
                        continue
                    times = [t for t, _ in hist]
                    w = newton_weights(float(i - times[-1]), [float(t) for t in times], len(hist), order, 1.0)
                    dP = sum(wi * d for wi, d in zip(w, (D1, D2)))
                    dC = C[i] - hist[-1][1]
                    num += float((dP * dC).sum())
                    den += float((dP * dP).sum())
                a = acc.setdefault((name, gain_key(order, N, warmup, prefix)), [0.0, 0.0])
                a[0] += num
                a[1] += den
    gains: dict[str, dict[str, float]] = {}
    for (name, key), (num, den) in acc.items():
        gains.setdefault(name, {})[key] = round(min(2.0, max(0.0, num / den)), 4) if den > 0 else 1.0
    return gains
