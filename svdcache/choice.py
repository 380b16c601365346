"""The configuration chosen per model: at calibration, closed loop, among candidates; used by ``enable``.

What wins on one model loses on another (the unconditional branch shared: +3 dB on the embedded model,
-4 to -10 dB on others; the order-2 forecast of the top change directions; the calibrated placement of the
full steps). So ``svdcache.calibrate`` measures the candidates on the model itself: for each target interval
N, every candidate is run with the cache on, on fitting prompts / seeds, against the uncached outputs
(PSNR), and scored at matched compute: by its dB above the safe configuration's curve (the safe
configuration run at every interval from N-1 to N+1, interpolated in log FLOPs ratio) at the candidate's
own counted FLOPs ratio, which must lie between the safe configuration's at N and at N+1. A candidate that
shares the unconditional branch runs twice: at its own compute (fewer transformer calls) and with the full
steps added that bring it to the safe configuration's calls. The best on the fitting part is then run on
the checking part and kept only where it is not below the safe curve there; else the safe configuration
is the choice. Both parts are the calibration's own prompts and seeds, never an evaluated set
(:mod:`svdcache.choose`).

The safe configuration (what ``enable`` runs where the basis holds no choice) is the one that lost nowhere
measured: the top change directions and the 4-bit residual at Taylor order 1 (full-space TaylorSeer order 1
within 0.05 dB, at 1.15-1.35 copies instead of 2), both guidance branches computed at every full step, the
uniform schedule.

The choice is stored in the basis file (``meta["choice"]``, covered by its checksum) and printed by
``svdcache.stats``: what was chosen for the interval in use and what it measured on the checking part.
"""
from __future__ import annotations

import math

#: the settings a choice may set; ``enable`` leaves any the user set
CHOSEN_FIELDS = ("predictor", "order", "hermite_scale", "uncond_interval", "schedule", "full_steps_scale")
SAFE = dict(predictor="taylor", order=1, uncond_interval=1, schedule="uniform")
#: forecast families tried (each with the 4-bit residual of the default: the memory stays <= 1.35 copies)
FAMILIES = {
    "taylor o1": dict(predictor="taylor", order=1),
    "taylor o2": dict(predictor="taylor", order=2),
    "hermite o2": dict(predictor="hermite", order=2, hermite_scale=0.7),
}


def shared_scale(m_full: int) -> float:
    """Full steps of a run that shares the unconditional branch (every 2nd full step computes it), per full
    step of one that does not, at no more transformer calls: M' + ceil(M'/2) <= 2 M."""
    best = m_full
    while (best + 1) + math.ceil((best + 1) / 2) <= 2 * m_full:
        best += 1
    return best / m_full


def candidates(two_calls: bool, plans: set[str]) -> list[tuple[str, dict]]:
    """(label, settings) of every candidate: each family, shared or not (two calls per step only), on the
    uniform schedule or the basis's calibrated one (where ``plans``, the basis's plan families, has one)."""
    from .schedule_search import family_key

    out = []
    for fam, kw in FAMILIES.items():
        for m in ((1, 2) if two_calls else (1,)):
            has = family_key("svd", kw["predictor"], kw["order"], "int4", m) in plans
            for sched in (("uniform", "calibrated") if has else ("uniform",)):
                label = f"{fam}{', uncond shared' if m > 1 else ''}{', calibrated schedule' if sched == 'calibrated' else ''}"
                out.append((label, dict(kw, uncond_interval=m, schedule=sched)))
    return out


def check_choice(choice, where: str = "basis") -> None:
    """A stored choice is well formed: targets keyed by interval, each with a label, settings among
    :data:`CHOSEN_FIELDS` that make a valid config, and its measured dB; ValueError naming the file otherwise."""
    if choice is None:
        return
    from .config import SVDCacheConfig

    def bad(what):
        raise ValueError(f"{where}: metadata field 'choice' {what}; recalibrate (svdcache.calibrate) or delete the field")

    if not isinstance(choice, dict) or not isinstance(choice.get("targets"), dict) or not choice["targets"]:
        bad("must be an object with a non-empty 'targets' object")
    for n, t in choice["targets"].items():
        if not (isinstance(n, str) and n.isdigit() and int(n) >= 1):
            bad(f"has a target {n!r} that is not an interval")
        if not isinstance(t, dict) or not isinstance(t.get("label"), str) or not isinstance(t.get("settings"), dict):
            bad(f"target {n}: needs a 'label' and 'settings'")
        extra = set(t["settings"]) - set(CHOSEN_FIELDS)
        if extra:
            bad(f"target {n}: settings {sorted(extra)} are not chosen settings {CHOSEN_FIELDS}")
        try:
            SVDCacheConfig(interval=int(n), **t["settings"])
        except (TypeError, ValueError) as e:
            bad(f"target {n}: {e}")
        c = t.get("check_db")
        if not isinstance(c, dict) or not all(isinstance(c.get(k), (int, float)) for k in ("chosen", "safe")):
            bad(f"target {n}: needs 'check_db' with the measured 'chosen' and 'safe' dB")


def for_interval(choice: dict | None, interval: int) -> dict | None:
    """The stored target nearest ``interval`` (None without a choice)."""
    if not choice or not choice.get("targets"):
        return None
    keys = sorted(int(k) for k in choice["targets"])
    k = min(keys, key=lambda x: (abs(x - interval), x))
    return choice["targets"][str(k)]


def explicit_settings(config, overrides: dict) -> set[str]:
    """The settings the user gave: keyword overrides, and the fields of ``config`` that differ from the
    defaults (other than what a resolve or an earlier choice filled in)."""
    from dataclasses import fields

    from .config import SVDCacheConfig

    given = set(overrides)
    if config is not None:
        default = SVDCacheConfig()
        filled = set(config.resolved) | (set(CHOSEN_FIELDS) if config.chosen else set())
        given |= {f.name for f in fields(config) if getattr(config, f.name) != getattr(default, f.name)} - filled
    return given


def apply(cfg, basis, explicit: set[str]):
    """``cfg`` with the basis's choice for its interval in the settings the user did not set (``explicit``);
    unchanged where the basis holds no choice or ``cfg.choice`` is "off"."""
    if basis is None or cfg.choice == "off" or cfg.space != "svd":
        return cfg
    t = for_interval(basis.meta.get("choice"), cfg.interval)
    if t is None:
        return cfg
    changes = {k: v for k, v in t["settings"].items() if k in CHOSEN_FIELDS and k not in explicit}
    return cfg.replace(**changes, chosen=t["label"]) if changes else cfg


def describe(choice: dict | None, interval: int, label: str | None) -> str | None:
    """One line for ``stats``: what was chosen for this interval and what it measured on the checking part."""
    t = for_interval(choice, interval)
    if t is None or label is None:
        return None
    c, r = t["check_db"], t.get("check_ratio")
    if r is None or "safe at the chosen compute" not in c:  # a version-1 choice: made at the safe compute
        return (f"chosen at calibration for N={interval}: {label} ({c['chosen']:.2f} dB vs {c['safe']:.2f} dB for "
                f"the safe configuration on the checking prompts, {choice['guidance']})")
    return (f"chosen at calibration for N={interval}: {label} ({c['chosen']:.2f} dB at {r['chosen']:.2f}x vs "
            f"{c['safe at the chosen compute']:.2f} dB for the safe configuration at that FLOPs ratio on the "
            f"checking prompts, {choice['guidance']})")
