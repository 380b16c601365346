"""SVD-Cache configuration: what is cached, when steps are computed, and how cached steps are forecast."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

DEFAULT_TAU = 0.85  # residual reused: k carries the forecast
DEFAULT_TAU_KEPT_RESIDUAL = 0.15  # residual difference kept (int4 / int8): k = 1-2, the top change directions
SPACES = ("svd", "full")
SUBSPACES = ("feature", "change")
PREDICTORS = ("taylor", "hermite", "ema", "reuse")
POLYNOMIAL = ("taylor", "hermite")  # predictors of divided differences (a kept residual is one of their terms)
RESIDUALS = ("reuse", "taylor", "damped", "int8", "int4")
GRANULARITIES = ("auto", "module", "submodule", "block")
TIME_AXES = ("step", "timestep")
FAST_PATHS = ("deferred_sum", "arenas", "batched_update")
FAST_PATH_MODES = ("auto", "on", "off")
_AUTO = ("tau", "order", "uncond_interval")
_INTEGERS = ("interval", "warmup", "tail", "num_inference_steps", "num_full_steps", "uncond_interval", "order", "rank",
             "online_steps", "online_rank")  # None: chosen by resolve() from the other settings


@dataclass(frozen=True)
class SVDCacheConfig:
    """How SVD-Cache runs. Where the basis holds a configuration chosen at calibration for this model
    (:mod:`svdcache.choice`: closed loop among candidates on the calibration's own prompts), ``enable``
    uses it for the settings not given; elsewhere the defaults are those that lost nowhere measured: the
    top directions of the feature changes (change subspace at tau 0.15: k = 1-2) and the rest of the
    change kept at 4 bits (``residual="int4"``), all at Taylor order 1 (full-space TaylorSeer order 1 within
    0.05 dB at 1.15-1.35 copies of memory instead of 2), one warm-up step, the uniform schedule, both
    guidance branches at every full step. Cache memory is per model and dtype: 1 + k/D + 1/8 copies of
    fp32 features (1.15 measured on the embedded model), 1 + 2k/D + 1/4 of bf16 ones; ``stats`` reports
    it. The paper's EMA measured worse; ``subspace="feature"`` is the paper's subspace,
    ``residual="reuse"`` its residual (about one copy, 3-7 dB lower there).

    Schedule
        interval: a full-compute step every ``interval`` steps (1 = never cache).
        warmup: the first ``warmup`` steps of a generation are computed in full (>= 1; TaylorSeer's 3).
        tail: the last ``tail`` steps are computed in full (needs the number of steps: from the
            pipeline's cache context or ``num_inference_steps``).
        num_inference_steps: number of steps per generation, when the pipeline does not say (inside a
            pipeline the step count is read from its scheduler; a different value here is warned about).
        schedule: "auto" (what the basis's choice says, else uniform), "uniform" (the rule above), "calibrated" (the full-step positions the basis's
            calibration chose for this predictor, as many full steps as the uniform rule would compute
            or ``num_full_steps``; uniform with a warning where the basis has none or the step count
            differs from the calibrated one), or a list of the full-step indices.
        num_full_steps: the number of full steps per generation (spread evenly with "uniform").
        full_steps_scale: the uniform rule's number of full steps times this (a choice that shares the
            unconditional branch gets the full steps that cost what the interval's do without sharing).
        uncond_interval: with true classifier-free guidance (the pipeline calls the transformer in
            the cache contexts "cond" and "uncond" each step), the unconditional branch is computed
            only at every ``uncond_interval``-th full step of the conditional one; at the others it
            is forecast as the conditional branch's features of that step plus their difference's
            forecast (see :mod:`svdcache.runtime.guidance`). 1 computes both branches at every full step.
            None (default): the basis's choice, else 1 (sharing won 3 dB on the embedded model and lost
            4-10 dB on others). With 2 a full step costs 1.5 transformer calls instead of 2 on average, so the
            FLOPs ratio at a given ``interval`` is about 4/3 of it; pipelines with one call per step
            (FLUX.1-dev's distilled guidance) are not affected.

    What is cached
        granularity: "module" (FLUX: pre-gate attention / MLP / proj_out outputs, gates recomputed on
            cached steps), "submodule" (any block: the outputs of its attention / feed-forward
            submodules; the block's norms, gates and residual adds run every step), "block" (each
            block's output minus input, per stream) or "auto" (module where the model has an
            adapter, else submodule where a block holds attention / feed-forward modules, else block).
        space: "svd" (forecast the principal subspace, treat the residual by ``residual``) or "full"
            (forecast the whole feature: FORA with ``predictor="reuse"``, TaylorSeer with "taylor").

    Forecast
        predictor: principal-subspace predictor in coefficient space: "taylor" (Newton divided
            differences over the actual step distances, order 1 or 2), "hermite" (the same divided
            differences weighted by scaled Hermite polynomials, HiCache's forecast; ``hermite_scale``),
            "ema" (the paper's eq. 11 as written, ``beta``), "reuse".
        hermite_scale: HiCache's scale sigma: the k-th term is weighted by H_k(sigma s) sigma^k / k!
            (sigma = 1/sqrt(2) gives Taylor's first-order weight; smaller damps the extrapolation).
        order: Taylor order (1 or 2) of the principal part. None (default): the basis's choice, else 1.
            The residual's own forecast is order 1 either way, so with k = 1-2 only the top change
            directions are extrapolated at order 2: on the embedded model's development set +0.4 / +1.0 /
            +0.9 / +1.2 dB at N = 4 / 5 / 6 / 7 over order 1, -1.6 / -2.1 dB at N = 2 / 3 (short gaps make
            the second difference mostly noise), within -0.35..+0.64 dB of order 1 on a model it was not
            tuned on.
        gain: multiplies the Taylor increment (1 = plain extrapolation).
        fitted_gains: use the per-feature gains the basis fitted during calibration for this order,
            interval and warm-up (least squares on the reference trajectory), times ``gain``.
        residual: "reuse" (the paper), "taylor" (order 1 on the residual), "damped" (order 1 times
            ``residual_gain`` < 1), "int8" / "int4" (order 1 on the residual with its difference held
            at 8 / 4 bits, per-token scaled: the change outside the subspace is kept for 1/4 / 1/8 copy
            of fp32 features; see svdcache.features.quantized). Only with space="svd" and predictor="taylor":
            elsewhere (FORA, TaylorSeer, EMA) it is taken as "reuse".
        time_axis: the variable the divided differences are taken over: the "step" index, or the
            "timestep" the model is called with (the ODE time; uneven with shifted schedules).

    Basis
        subspace: "feature" (the paper: the principal subspace of the features F) or "change" (the
            principal subspace of their step-to-step changes F_t - F_t-1: what the forecast has to
            carry; the residual then holds what barely moves). Both come from the same calibration.
        tau: energy threshold choosing k per feature (eq. 6, on the energy of that subspace's data);
            ``rank`` fixes k instead. None (default): 0.15 with a kept residual difference ("int4" /
            "int8": k = 1-2 on the embedded model; at order 1 tau .15 / .3 / .7 give the same PSNR
            within 0.06 dB on the development set and a smaller k costs fewer cache FLOPs, +2.5% FLOPs
            ratio from .7 to .15; at order 2 the smaller k is also the better forecast: +0.7-0.9 dB
            from .3 to .15 at N = 4-7), 0.85 otherwise (the residual is reused: k carries the forecast).
        memory_budget: cache memory per feature in copies of that feature (space="svd", taylor): the
            rank (k by ``tau`` / ``rank``, capped to fit) and the bits of the kept residual difference
            (8, 4 or none) are chosen per feature to fit; ``residual`` is then ignored. The last
            full feature is the one copy every budget includes; ``stats`` reports what is held.
        online_steps: with no basis given, the number of first full steps whose features build one
            (randomized SVD), at most ``warmup``.
        online_rank: the randomized SVD's rank (k is then chosen by ``tau`` within it).

    Runtime
        backend: "auto" (Triton kernels on CUDA, PyTorch reference elsewhere), "triton", "torch".
        check_finite: fall back to a full step, with one warning, if a cached step's output is not
            finite (one host sync per cached call).
        sync_free: on CUDA, make no host sync per call, so the CPU can queue the cheap cached steps
            while the GPU still runs a full one: the timestep is not read (a new generation is then
            recognised by the pipeline's reset, its cache context's step index, ``num_inference_steps``,
            an input change or :func:`svdcache.reset`; not by the timestep going up) and
            ``check_finite`` is off. Ignored for ``time_axis="timestep"``, which reads the timestep.
        count_flops: count transformer FLOPs (torch.utils.flop_counter, eager only) for ``stats``.
        cuda_graphs: on CUDA, replay cached steps from CUDA graphs (one launch for the whole call instead
            of a few hundred): captured at a cached call whose forecasts all go through the deferred sum
            (FLUX-style models), replayed while the states and input layouts stay where they were; any
            other call runs eagerly. Off CUDA it does nothing. See :mod:`svdcache.fastpath.graphs`.
        choice: "auto" (use the basis's choice, :mod:`svdcache.choice`, for the settings not given) or "off".
        fast_paths: "auto", or a dict naming some of ``deferred_sum`` (a cached call's gated forecasts
            summed at once at the last block: FLUX-style adapters), ``arenas`` (small features' states
            stacked, one op per kind of state) and ``batched_update`` (an arena's full-step updates in one
            pass) with "auto" (where it applies and pays: ``arenas`` for streams of at most 2^15 elements,
            ``batched_update`` for fp32 features), "on" (``arenas``: whatever the size) or "off" (the
            per-feature path). The outputs are the same either way (up to fp32 rounding and int4 code
            flips); see :mod:`svdcache.fastpath`.

    The config is frozen: ``replace(**changes)`` makes a changed copy (settings left automatic are chosen
    again), ``resolve()`` the copy with every automatic setting chosen (what the runtime uses and
    ``enable`` returns); ``None`` (tau, order, uncond_interval) means automatic.
    """

    interval: int = 5
    warmup: int = 1
    tail: int = 0
    num_inference_steps: int | None = None
    schedule: str | tuple = "auto"
    num_full_steps: int | None = None
    uncond_interval: int | None = None
    granularity: str = "auto"
    space: str = "svd"
    predictor: str = "taylor"
    order: int | None = None
    gain: float = 1.0
    fitted_gains: bool = False
    beta: float = 0.9
    residual: str = "int4"
    residual_gain: float = 0.5
    hermite_scale: float = 0.7
    time_axis: str = "step"
    subspace: str = "change"
    tau: float | None = None
    memory_budget: float | None = None
    rank: int | None = None
    online_steps: int = 3
    online_rank: int = 64
    backend: str = "auto"
    check_finite: bool = True
    sync_free: bool = False
    count_flops: bool = True
    cuda_graphs: bool = False
    fast_paths: str | dict = "auto"
    full_steps_scale: float = 1.0
    choice: str = "auto"
    #: the label of the basis's choice ``enable`` applied (set by enable; None: none applied)
    chosen: str | None = None
    #: the settings ``resolve`` chose automatically (empty on a config not resolved yet)
    resolved: frozenset = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self):
        _validate(self)
        for name in _INTEGERS:  # 5.0 from a JSON file is 5
            v = getattr(self, name)
            if v is not None and type(v) is not int:
                object.__setattr__(self, name, int(v))
        if not isinstance(self.schedule, str):  # a list of full steps: kept sorted and unique
            object.__setattr__(self, "schedule", tuple(sorted({int(x) for x in self.schedule})))
        if isinstance(self.fast_paths, dict):
            object.__setattr__(self, "fast_paths", tuple(sorted(self.fast_paths.items())))

    def resolve(self) -> "SVDCacheConfig":
        """This config with every automatic setting chosen (idempotent): the values the runtime uses."""
        if self.resolved:
            return self
        auto, ch = set(), {}
        if self.uncond_interval is None:
            # both branches at every full step: sharing lost 4-10 dB on models it was not chosen for (a basis's
            # choice shares where the calibration measured it to win: svdcache.choice)
            ch["uncond_interval"] = 1
        residual = self.residual
        if residual in ("int8", "int4") and (self.space != "svd" or self.predictor not in POLYNOMIAL):
            residual = ch["residual"] = "reuse"  # the kept difference is a Taylor term: other forecasts reuse the residual
        if self.order is None:
            ch["order"] = 1  # order 2 where a basis's choice measured it to win (svdcache.choice)
        if self.tau is None and self.rank is None and self.space == "svd":
            ch["tau"] = DEFAULT_TAU_KEPT_RESIDUAL if residual in ("int8", "int4") else DEFAULT_TAU
        auto = frozenset(k for k in ch if k in _AUTO) | frozenset(["resolved"])
        return replace(self, **ch, resolved=auto)

    def replace(self, **changes) -> "SVDCacheConfig":
        """A copy with ``changes``; settings that were chosen automatically are chosen again."""
        if self.resolved:
            for k in self.resolved - {"resolved"}:
                changes.setdefault(k, None)
            changes.setdefault("resolved", frozenset())
        return replace(self, **changes)

    def fast_path(self, name: str) -> str:
        """"auto", "on" or "off" for one of :data:`FAST_PATHS`."""
        return self.fast_paths if isinstance(self.fast_paths, str) else dict(self.fast_paths).get(name, "auto")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("resolved")
        return d

    @property
    def label(self) -> str:
        """A short name for tables: the method and its settings."""
        c = self.resolve()
        if c.space == "full":
            name = {"reuse": "FORA", "taylor": f"TaylorSeer-o{c.order}", "hermite": f"HiCache-o{c.order}-s{c.hermite_scale:g}",
                    "ema": "full-EMA"}[c.predictor]
        else:
            p = {"taylor": f"taylor{c.order}", "hermite": f"hermite{c.order}-s{c.hermite_scale:g}", "ema": "ema",
                 "reuse": "reuse"}[c.predictor]
            r = {"reuse": "reuse", "taylor": "taylor", "damped": f"damped{c.residual_gain:g}", "int8": "int8", "int4": "int4"}[c.residual]
            k = f"tau{c.tau:g}" if c.rank is None else f"k{c.rank}"
            sub = "|dF" if c.subspace == "change" else ""
            name = f"SVD[{p}|R:{r}|{k}{sub}]"
        sched = {"uniform": "", "auto": " auto", "calibrated": " cal"}.get(c.schedule, " explicit") if isinstance(
            c.schedule, str) else " explicit"
        share = f" U{c.uncond_interval}" if c.uncond_interval > 1 else ""
        return f"{name} N={c.interval}{sched}{share}"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(c: SVDCacheConfig) -> None:
    """Every field's type and range, checked at construction: a one-line error naming the field."""
    def bad(name, want):
        raise ValueError(f"SVDCacheConfig.{name} must be {want}, got {getattr(c, name)!r}")

    def one_of(name, allowed):
        if not isinstance(getattr(c, name), str) or getattr(c, name) not in allowed:
            bad(name, f"one of {allowed}")

    def integer(name, lo, none=False):
        v = getattr(c, name)
        if v is None and none:
            return
        if not _is_number(v) or not math.isfinite(v) or int(v) != v or v < lo:
            bad(name, f"an integer >= {lo}" + (" or None" if none else ""))

    def number(name, lo, hi, lo_open=False, hi_open=False, none=False):
        v = getattr(c, name)
        if v is None and none:
            return
        if (not _is_number(v) or not math.isfinite(v) or (v <= lo if lo_open else v < lo)
                or (v >= hi if hi_open else v > hi)):
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            bad(name, f"a finite number in {rng}" + (" or None" if none else ""))

    def flag(name):
        if not isinstance(getattr(c, name), bool):
            bad(name, "True or False")

    for name, allowed in (("space", SPACES), ("predictor", PREDICTORS), ("residual", RESIDUALS),
                          ("granularity", GRANULARITIES), ("time_axis", TIME_AXES), ("subspace", SUBSPACES),
                          ("backend", ("auto", "triton", "torch"))):
        one_of(name, allowed)
    integer("interval", 1)
    if not _is_number(c.warmup) or not math.isfinite(c.warmup) or int(c.warmup) != c.warmup or c.warmup < 1:
        bad("warmup", "an integer >= 1 (a cached step needs a computed one)")
    integer("tail", 0)
    integer("num_inference_steps", 1, none=True)
    integer("num_full_steps", 1, none=True)
    integer("uncond_interval", 1, none=True)
    integer("order", 1, none=True)
    if c.order is not None and c.order > 2:
        bad("order", "1, 2 or None")
    integer("rank", 1, none=True)
    integer("online_steps", 1)
    integer("online_rank", 1)
    number("tau", 0.0, 1.0, lo_open=True, none=True)
    number("gain", 0.0, 16.0)
    number("beta", 0.0, 1.0, hi_open=True)
    number("residual_gain", 0.0, 1.0, hi_open=True)
    number("hermite_scale", 0.0, 2.0, lo_open=True)
    number("full_steps_scale", 0.0, 4.0, lo_open=True)
    one_of("choice", ("auto", "off"))
    if c.chosen is not None and not isinstance(c.chosen, str):
        bad("chosen", "None or a label (set by enable)")
    if c.memory_budget is not None:
        number("memory_budget", 1.0, 16.0, lo_open=True, hi_open=True)
        if c.space != "svd" or c.predictor not in POLYNOMIAL:
            raise ValueError("SVDCacheConfig.memory_budget needs space='svd' and predictor='taylor' or 'hermite'")
    for name in ("fitted_gains", "check_finite", "sync_free", "count_flops", "cuda_graphs"):
        flag(name)
    if isinstance(c.schedule, str):
        one_of("schedule", ("auto", "uniform", "calibrated"))
    else:
        try:
            steps = list(c.schedule)
        except TypeError:
            steps = None
        if steps is None:
            bad("schedule", "'auto', 'uniform', 'calibrated' or a list of full-step indices")
        if not steps or not all(_is_number(x) and math.isfinite(x) and int(x) == x and x >= 0 for x in steps):
            bad("schedule", "a non-empty list of integer full-step indices >= 0")
    fp = c.fast_paths
    if isinstance(fp, str):
        if fp not in FAST_PATH_MODES:
            bad("fast_paths", f"'auto' or a dict of {FAST_PATHS} -> {FAST_PATH_MODES}")
    else:
        items = fp.items() if isinstance(fp, dict) else fp if isinstance(fp, tuple) else None
        if items is None or not all(k in FAST_PATHS and v in FAST_PATH_MODES for k, v in items):
            bad("fast_paths", f"'auto' or a dict of {FAST_PATHS} -> {FAST_PATH_MODES}")
        if dict(items).get("batched_update") == "on":
            bad("fast_paths", "batched_update 'auto' or 'off' (it applies to fp32 features only)")


def fora(interval: int = 5, **kw) -> SVDCacheConfig:
    """FORA: reuse the whole cached feature (full space); both guidance branches computed at every
    full step, as FORA does (pass ``uncond_interval`` to share them)."""
    kw.setdefault("uncond_interval", 1)
    return SVDCacheConfig(interval=interval, space="full", predictor="reuse", **kw)


def taylorseer(interval: int = 5, order: int = 1, **kw) -> SVDCacheConfig:
    """TaylorSeer: Taylor forecast of the whole feature (full space), divided differences; both
    guidance branches computed at every full step, as TaylorSeer does."""
    kw.setdefault("uncond_interval", 1)
    return SVDCacheConfig(interval=interval, space="full", predictor="taylor", order=order, **kw)
