"""Which steps are computed in full and which are forecast."""
from __future__ import annotations

import math
import warnings


def is_full_step(step: int, *, interval: int, warmup: int, tail: int = 0, num_steps: int | None = None) -> bool:
    """Full compute for the first ``warmup`` steps, then every ``interval``-th step counted from the
    last warmup step (so ``interval - 1`` cached steps follow each full one), and for the last
    ``tail`` steps when ``num_steps`` is known."""
    if interval <= 1 or step < warmup:
        return True
    if tail and num_steps is not None and step >= num_steps - tail:
        return True
    return (step - warmup + 1) % interval == 0


def full_steps(num_steps: int, *, interval: int, warmup: int, tail: int = 0) -> list[int]:
    return [i for i in range(num_steps) if is_full_step(i, interval=interval, warmup=warmup, tail=tail, num_steps=num_steps)]


def spread_steps(num_steps: int, count: int, *, warmup: int = 1, tail: int = 0) -> list[int]:
    """``count`` full steps spread evenly over ``num_steps`` (the first ``warmup`` and last ``tail`` among
    them): the uniform rule for a number of full steps instead of an interval (``count = num_steps /
    interval`` gives the interval's steps where it divides)."""
    count = max(1, min(int(count), num_steps))
    warmup = max(1, min(warmup, num_steps))
    fixed = set(range(warmup)) | set(range(max(0, num_steps - tail), num_steps))
    free = max(0, count - len(fixed))
    span = (num_steps - tail) - (warmup - 1)  # as the interval rule: full steps every span / (free + 1) from warmup - 1
    rest = {warmup - 1 + round((i + 1) * span / (free + 1)) for i in range(free)}
    return sorted(fixed | {s for s in rest if 0 <= s < num_steps})


def transfer_plan(plan, cal_steps: int, run_steps: int, count: int) -> list[int]:
    """``count`` full steps of a run of ``run_steps`` steps placed where ``plan`` (full-step indices made for
    ``cal_steps`` steps) places its own, as fractions of the run: the k-th of them at the plan's position
    interpolated at k / (count - 1) of the way through its full steps, on the nearest free step. For
    diffusers' schedulers, whose sigmas are a fixed function of step / steps at a given resolution (the
    flow-matching ones, static or resolution-shifted), the same fraction is the same sampler time."""
    count = max(1, min(int(count), run_steps))
    u = [s / cal_steps for s in sorted(set(int(s) for s in plan))] or [0.0]
    if count == 1 or len(u) == 1:
        targets = [u[0]] * count if count == 1 else [k / count for k in range(count)]
    else:
        targets = []
        for k in range(count):
            x = k * (len(u) - 1) / (count - 1)
            i = min(int(x), len(u) - 2)
            targets.append(u[i] + (x - i) * (u[i + 1] - u[i]))
    chosen: set[int] = {0}
    for tgt in targets[1:]:
        want = tgt * run_steps
        free = [j for j in range(run_steps) if j not in chosen]
        if free:
            chosen.add(min(free, key=lambda j: (abs(j - want), j)))
    return sorted(chosen)


class Schedule:
    """The run-time schedule of one cache: uniform (``interval``, ``warmup``, ``tail``), explicit
    (``cfg.schedule`` a list of full-step indices), or calibrated (``cfg.schedule="calibrated"``, or
    "auto" which is the same where the basis has a plan and silently uniform elsewhere: the
    positions the basis's calibration chose for this predictor and number of full steps, see
    :mod:`svdcache.schedule_search`). A calibrated schedule needs the step count of the run to be the
    one it was made for; otherwise (or when the step count is unknown, or the basis has none) the
    uniform schedule is used, with one warning."""

    def __init__(self, cfg, basis=None):
        from ..schedule_search import check_schedules, family_key

        cfg = self.cfg = cfg.resolve()
        self.explicit = None if isinstance(cfg.schedule, str) else frozenset(int(s) for s in cfg.schedule)
        self.plans: dict[str, list[int]] = {}
        self.shared_plans: dict[str, list[int]] = {}  # for runs that share the unconditional branch
        self.num_steps = None
        self.family = family_key(cfg.space, cfg.predictor, cfg.order, cfg.residual)
        self.shared_family = family_key(cfg.space, cfg.predictor, cfg.order, cfg.residual, cfg.uncond_interval)
        self._warned: set[str] = set()
        self._resolved: dict[int | None, frozenset | None] = {}
        if cfg.schedule == "calibrated":
            entry = (basis.meta.get("schedules") if basis is not None else None) or {}
            check_schedules(entry or None)
            plans = entry.get("plans", {})
            self.plans = plans.get(self.family) or {}
            self.shared_plans = plans.get(self.shared_family) or {} if self.shared_family != self.family else {}
            self.num_steps = entry.get("num_steps")
            if not self.plans and cfg.schedule == "calibrated":
                why = "the cache has no basis file" if basis is None else (
                    f"the basis holds no calibrated schedule for {self.family!r}" + (
                        f" (it has {sorted(plans)})" if plans else " (calibrate with svdcache >= 0.2)"))
                self._warn("none", f"svdcache: schedule='calibrated' but {why}; using the uniform schedule")

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=5)

    def uniform(self, num_steps: int) -> list[int]:
        c = self.cfg
        return full_steps(num_steps, interval=c.interval, warmup=c.warmup, tail=c.tail)

    def count(self, num_steps: int, shared: bool = True) -> int:
        """Full steps per generation of ``num_steps``: ``num_full_steps``, else the uniform rule's times
        ``full_steps_scale`` (which only a run that shares the unconditional branch takes: it buys the extra
        full steps with the unconditional calls it skips; a run of one call per step keeps the interval's)."""
        c = self.cfg
        scale = c.full_steps_scale if shared or c.uncond_interval <= 1 else 1.0
        return c.num_full_steps or max(1, math.floor(len(self.uniform(num_steps)) * scale + 1e-9))

    def full_set(self, num_steps: int | None, shared: bool = False) -> frozenset | None:
        """The full steps of a run of ``num_steps`` steps, or None for the uniform rule. ``shared``: the
        run shares the unconditional branch (true CFG, ``uncond_interval`` > 1): the basis's plans of
        that family where it has them, else the uniform rule (plans made for two calls per full step
        placed the shared run worse on the development set at 25 full steps of 50)."""
        key = (num_steps, shared)
        if key in self._resolved:
            return self._resolved[key]
        res = None
        plans = self.shared_plans if shared else self.plans
        c = self.cfg
        if self.explicit is not None:
            res = self.explicit
        elif plans:
            strict = c.schedule == "calibrated"
            if num_steps is None:
                if strict:
                    self._warn("unknown", "svdcache: schedule='calibrated' needs the number of steps of the run "
                               "(pass num_inference_steps=... to enable for a bare transformer); using the uniform schedule")
            elif num_steps != self.num_steps and self.num_steps:
                # a plan made for another step count: the one of the nearest share of full steps, moved to this run
                m = self.count(num_steps, shared)
                key = min(plans, key=lambda k: (abs(int(k) / self.num_steps - m / num_steps), int(k)))
                res = frozenset(transfer_plan(plans[key], self.num_steps, num_steps, m))
            elif c.interval > 1 or c.num_full_steps:
                m = self.count(num_steps, shared)
                plan = plans.get(str(m))
                if plan is None:  # another M would change the compute asked for: keep the uniform rule
                    if strict:
                        self._warn(f"m{m}", f"svdcache: the basis has no calibrated schedule with {m} full steps "
                                   f"(it has {sorted(int(k) for k in plans)}); using the uniform schedule")
                else:
                    res = frozenset(int(s) for s in plan)
        if res is None and num_steps and (c.num_full_steps or self.count(num_steps, shared) != len(self.uniform(num_steps))):
            # a number of full steps, not an interval: spread evenly (also where a plan was asked for but is missing)
            res = frozenset(spread_steps(num_steps, self.count(num_steps, shared), warmup=c.warmup, tail=c.tail))
        self._resolved[key] = res
        return res

    def is_full(self, step: int, num_steps: int | None, shared: bool = False) -> bool:
        fs = self.full_set(num_steps, shared)
        if fs is None:
            c = self.cfg
            return is_full_step(step, interval=c.interval, warmup=c.warmup, tail=c.tail, num_steps=num_steps)
        return step in fs or step == 0
