"""SVD-Cache configuration: what is cached, when steps are computed, and how cached steps are forecast."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

DEFAULT_TAU = 0.85  # residual reused: k carries the forecast
DEFAULT_TAU_KEPT_RESIDUAL = 0.15  # residual difference kept (int4 / int8): k = 1-2, the top change directions
ORDER2_MIN_INTERVAL = 4  # the default order with a kept residual: 2 from this interval on, else 1
SPACES = ("svd", "full")
SUBSPACES = ("feature", "change")
PREDICTORS = ("taylor", "ema", "reuse")
RESIDUALS = ("reuse", "taylor", "damped", "int8", "int4")
GRANULARITIES = ("auto", "module", "submodule", "block")
TIME_AXES = ("step", "timestep")


@dataclass
class SVDCacheConfig:
    """How SVD-Cache runs. The defaults were chosen on a development set of the embedded model
    (prompts and seeds outside the benchmark's; bench/results/fidelity.md has the evaluated table):
    the top directions of the feature changes (change subspace at tau 0.15: k = 1-2) forecast at
    Taylor order 2 from interval 4 on (order 1 below), the rest of the change at order 1 kept at 4
    bits (``residual="int4"``), one warm-up step, the basis's calibrated schedule where it has one,
    and with true classifier-free guidance the unconditional branch computed at every second full
    step only (``uncond_interval=2``, the largest single gain). Cache memory is per model and
    dtype: 1 + k/D + 1/8 copies of fp32 features (1.15 measured on the embedded model), 1 + 2k/D +
    1/4 of bf16 ones; ``stats`` reports it. The paper's EMA measured worse; ``subspace="feature"``
    is the paper's subspace, ``residual="reuse"`` its residual (about one copy, 3-7 dB lower there).

    Schedule
        interval: a full-compute step every ``interval`` steps (1 = never cache).
        warmup: the first ``warmup`` steps of a generation are computed in full (>= 1; TaylorSeer's 3).
        tail: the last ``tail`` steps are computed in full (needs the number of steps: from the
            pipeline's cache context or ``num_inference_steps``).
        num_inference_steps: number of steps per generation, when the pipeline does not say (inside a
            pipeline the step count is read from its scheduler; a different value here is warned about).
        schedule: "auto" (calibrated where the basis holds a plan for this step count and predictor,
            else uniform, silently), "uniform" (the rule above), "calibrated" (the full-step positions the basis's
            calibration chose for this predictor, as many full steps as the uniform rule would compute
            or ``num_full_steps``; uniform with a warning where the basis has none or the step count
            differs from the calibrated one), or a list of the full-step indices.
        num_full_steps: with a calibrated schedule, the number of full steps per generation.
        uncond_interval: with true classifier-free guidance (the pipeline calls the transformer in
            the cache contexts "cond" and "uncond" each step), the unconditional branch is computed
            only at every ``uncond_interval``-th full step of the conditional one; at the others it
            is forecast as the conditional branch's features of that step plus their difference's
            forecast (see :mod:`svdcache.guidance`). 1 computes both branches at every full step.
            None (default): 2, but 1 where every step is computed (``interval=1`` with the uniform or
            auto schedule: no caching at all). With 2 a full step costs 1.5 transformer calls instead of 2 on average, so the FLOPs
            ratio at a given ``interval`` is about 4/3 of it; pipelines with one call per step
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
            differences over the actual step distances, order 1 or 2), "ema" (the paper's eq. 11 as
            written, ``beta``), "reuse".
        order: Taylor order (1 or 2) of the principal part. None (default): 2 with a kept residual
            difference at ``interval`` >= 4 (or that many steps per full step by ``num_full_steps``),
            else 1. The residual's own forecast is order 1 either way, so with k = 1-2 only the top
            change directions are extrapolated at order 2: on the development set +0.4 / +1.0 /
            +0.9 / +1.2 dB at N = 4 / 5 / 6 / 7 over order 1, -1.6 / -2.1 dB at N = 2 / 3 (short
            gaps make the second difference mostly noise); at rank 2 it already loses, and full-space
            order 2 (TaylorSeer o2) is 2.7-3 dB below order 1 at N = 5-7.
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
            other call runs eagerly. Off CUDA it does nothing. See :mod:`svdcache.graphs`.
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

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def one_of(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"SVDCacheConfig.{name} must be one of {allowed}, got {value!r}")

        one_of("space", self.space, SPACES)
        one_of("predictor", self.predictor, PREDICTORS)
        one_of("residual", self.residual, RESIDUALS)
        one_of("granularity", self.granularity, GRANULARITIES)
        one_of("time_axis", self.time_axis, TIME_AXES)
        one_of("subspace", self.subspace, SUBSPACES)
        one_of("backend", self.backend, ("auto", "triton", "torch"))
        if int(self.interval) != self.interval or self.interval < 1:
            raise ValueError(f"SVDCacheConfig.interval must be an integer >= 1, got {self.interval!r}")
        if self.warmup < 1:
            raise ValueError(f"SVDCacheConfig.warmup must be >= 1 (a cached step needs a computed one), got {self.warmup}")
        if isinstance(self.schedule, str):
            one_of("schedule", self.schedule, ("auto", "uniform", "calibrated"))
        else:
            try:
                steps = [int(x) for x in self.schedule]
            except (TypeError, ValueError):
                raise ValueError(f"SVDCacheConfig.schedule must be 'uniform', 'calibrated' or a list of step indices, "
                                 f"got {self.schedule!r}") from None
            if not steps or min(steps) < 0 or any(int(x) != x for x in self.schedule):
                raise ValueError(f"SVDCacheConfig.schedule: full-step indices must be integers >= 0, got {self.schedule!r}")
            self.schedule = tuple(sorted(set(steps)))
        if self.num_full_steps is not None and (int(self.num_full_steps) != self.num_full_steps or self.num_full_steps < 1):
            raise ValueError(f"SVDCacheConfig.num_full_steps must be an integer >= 1, got {self.num_full_steps!r}")
        if self.uncond_interval is None:
            # interval 1 with the uniform / auto schedule means "compute every step": nothing shared
            # either (an explicit uncond_interval=2 still shares the unconditional branch)
            every = self.interval == 1 and self.num_full_steps is None and self.schedule in ("auto", "uniform")
            self.uncond_interval = 1 if every else 2
            self._uncond_auto = True  # replace() re-chooses it (e.g. for another interval)
        if int(self.uncond_interval) != self.uncond_interval or self.uncond_interval < 1:
            raise ValueError(f"SVDCacheConfig.uncond_interval must be an integer >= 1, got {self.uncond_interval!r}")
        if self.tail < 0:
            raise ValueError(f"SVDCacheConfig.tail must be >= 0, got {self.tail}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"SVDCacheConfig.cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.order is None:
            per_full = self.interval
            if self.num_full_steps is not None and self.num_inference_steps is not None:
                per_full = self.num_inference_steps / self.num_full_steps
            kept = self.space == "svd" and self.predictor == "taylor" and self.residual in ("int8", "int4")
            self.order = 2 if kept and per_full >= ORDER2_MIN_INTERVAL else 1
            self._order_auto = True  # replace() re-chooses it (e.g. for another interval)
        if self.order not in (1, 2):
            raise ValueError(f"SVDCacheConfig.order must be 1 or 2, got {self.order}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"SVDCacheConfig.beta must lie in [0, 1), got {self.beta}")
        if self.residual in ("int8", "int4") and (self.space != "svd" or self.predictor != "taylor"):
            self.residual = "reuse"  # the kept difference is a Taylor term: other forecasts reuse the residual
        if self.residual == "damped" and not 0.0 <= self.residual_gain < 1.0:
            raise ValueError(f"a damped residual needs 0 <= residual_gain < 1, got {self.residual_gain}")
        if self.tau is None and self.rank is None and self.space == "svd":
            self.tau = DEFAULT_TAU_KEPT_RESIDUAL if self.residual in ("int8", "int4") else DEFAULT_TAU
            self._tau_auto = True  # replace() re-chooses it (e.g. for another residual)
        if self.tau is not None and not 0.0 < self.tau <= 1.0:
            raise ValueError(f"SVDCacheConfig.tau must lie in (0, 1], got {self.tau}")
        if self.memory_budget is not None:
            if not (isinstance(self.memory_budget, (int, float)) and 1.0 < self.memory_budget < 16):
                raise ValueError(f"SVDCacheConfig.memory_budget must be a number of copies in (1, 16), got "
                                 f"{self.memory_budget!r} (the last full feature itself is one copy)")
            if self.space != "svd" or self.predictor != "taylor":
                raise ValueError("memory_budget needs space='svd' and predictor='taylor'")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"SVDCacheConfig.rank must be >= 1, got {self.rank}")
        if self.online_steps < 1 or self.online_rank < 1:
            raise ValueError("online_steps and online_rank must be >= 1")

    def replace(self, **changes) -> "SVDCacheConfig":
        if getattr(self, "_tau_auto", False) and "tau" not in changes:
            changes["tau"] = None
        if getattr(self, "_order_auto", False) and "order" not in changes:
            changes["order"] = None
        if getattr(self, "_uncond_auto", False) and "uncond_interval" not in changes:
            changes["uncond_interval"] = None
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """A short name for tables: the method and its settings."""
        if self.space == "full":
            name = "FORA" if self.predictor == "reuse" else (
                f"TaylorSeer-o{self.order}" if self.predictor == "taylor" else "full-EMA")
        else:
            p = {"taylor": f"taylor{self.order}", "ema": "ema", "reuse": "reuse"}[self.predictor]
            r = {"reuse": "reuse", "taylor": "taylor", "damped": f"damped{self.residual_gain:g}", "int8": "int8", "int4": "int4"}[self.residual]
            k = f"tau{self.tau:g}" if self.rank is None else f"k{self.rank}"
            sub = "|dF" if self.subspace == "change" else ""
            name = f"SVD[{p}|R:{r}|{k}{sub}]"
        sched = {"uniform": "", "auto": " auto", "calibrated": " cal"}.get(self.schedule, " explicit") if isinstance(
            self.schedule, str) else " explicit"
        share = f" U{self.uncond_interval}" if self.uncond_interval > 1 else ""
        return f"{name} N={self.interval}{sched}{share}"


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
