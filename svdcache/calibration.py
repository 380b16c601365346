"""The one-time SVD: Gram accumulation during a reference generation (offline); the basis built online
from the first full steps is svdcache.runtime.online_basis."""
from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState

import svdcache_kernels as K

from .basis import Basis, FeatureBasis, config_fingerprint
from .calibration_args import check_calibrate_args
from .hooks import CALIBRATION_HOOK
from .hooks.registry import install, plan, root_of, transformers, uninstall
from .runtime.gains import CHANGE_PREFIX, fit_gains
from .runtime.state import DefaultContextStateManager


class _StepCounter(BaseState):
    def __init__(self):
        self.step = 0

    def reset(self, *args, **kwargs):
        self.step = 0


class CalibrationHook(ModelHook):
    """Root hook during calibration: every call is computed in full; features of the selected
    steps (counted per pipeline cache context) are streamed into per-feature fp32 Gram matrices."""

    _is_stateful = True

    def __init__(self, steps=None, backend: str = "auto", sample_rows: int = 0):
        super().__init__()
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.backend = backend
        self.sample_rows = sample_rows  # rows per step kept (on the CPU) to fit forecast gains
        self.samples: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        self._where = ("default", 0)
        self.state_manager = DefaultContextStateManager(_StepCounter)
        self.grams: dict[str, torch.Tensor] = {}
        self.dgrams: dict[str, torch.Tensor] = {}  # of F_t - F_t-1, per context trajectory
        self._prev: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}
        self.shapes: dict[str, list[int]] = {}
        self.used_steps: set[int] = set()
        self.timesteps: dict[str, dict[int, float]] = {}  # per context: the timestep of each step
        self._active = False
        self._record_now = False

    def reset_state(self, module):
        self.state_manager.reset()
        return module

    # the controller protocol of the block hooks (svdcache.hooks.block): every call computed, features recorded
    feature_dims = None  # any feature a full step produces is recorded
    traced = None
    deferred_sum = None
    sink = None

    def mode(self):
        return "full" if self._active else None

    def declare(self, name: str, D) -> None:
        pass

    def forget(self, name: str) -> None:
        """A feature full steps no longer produce (the submodule level's late fusion decision)."""
        for d in (self.grams, self.dgrams, self.shapes):
            d.pop(name, None)

    def new_forward(self, module, *args, **kwargs):
        counter = self.state_manager.get_state()
        step = counter.step
        counter.step += 1
        self._where = (self.state_manager.context.name, step)
        t = kwargs.get("timestep")
        if isinstance(t, torch.Tensor) and t.numel():
            self.timesteps.setdefault(self._where[0], {})[step] = float(t.reshape(-1)[0])
        elif isinstance(t, (int, float)):
            self.timesteps.setdefault(self._where[0], {})[step] = float(t)
        self._record_now = self.steps is None or step in self.steps
        if self._record_now:
            self.used_steps.add(step)
        self._active = True
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._active = False

    def record(self, name: str, F: torch.Tensor | None) -> None:
        if F is None or not self._record_now:
            return
        if not bool(torch.isfinite(F).all()):
            raise ValueError(f"calibration feature {name!r} is not finite: the reference generation produced NaN/Inf")
        D = F.shape[-1]
        G = self.grams.get(name)
        if G is None:
            G = self.grams[name] = torch.zeros(D, D, dtype=torch.float32, device=F.device)
            self.shapes[name] = list(F.shape)
        K.gram_update(G, F.detach(), backend=self.backend)
        ctx, step = self._where
        prev = self._prev.get((ctx, name))
        if prev is not None and prev[0] == step - 1 and prev[1].shape == F.shape:
            dG = self.dgrams.get(name)
            if dG is None:
                dG = self.dgrams[name] = torch.zeros(D, D, dtype=torch.float32, device=F.device)
            K.gram_update(dG, (F - prev[1]).detach(), backend=self.backend)
        self._prev[(ctx, name)] = (step, F.detach())
        if self.sample_rows:
            X = F.detach().reshape(-1, D)
            X = X[:: max(1, -(-X.shape[0] // self.sample_rows))]
            self.samples.setdefault((ctx, name), {})[step] = X.float().cpu()

    def record_eager(self, name: str, F) -> None:
        self.record(name, F)  # (a subclass's record, e.g. bench/fidelity.py's recorder)

    def forecast(self, name, **kw):  # never called: calibration computes every step
        raise RuntimeError("forecast during calibration")

    def buffer(self, key, shape, dtype, device):  # never called: no cached step
        raise RuntimeError("buffer during calibration")


def basis_from_grams(grams: dict[str, torch.Tensor], tau: float, store_tau: float, progress: bool = True,
                     desc: str = "svdcache: one-time SVD"):
    from tqdm.auto import tqdm

    feats = {}
    for name, G in tqdm(grams.items(), desc=desc, disable=not progress, unit="feature"):
        # eigh where G lives (a GPU after a GPU calibration): FLUX's 95 features of D = 3072 take minutes
        # as float64 eigh on a CPU (about 9 s each on one core); the rank is chosen on the CPU copy
        V, sigma, _ = K.basis_from_gram(G, k=G.shape[0])
        V, sigma = V.cpu(), sigma.cpu()
        k = K.rank_for_energy(sigma, tau)
        r = max(k, K.rank_for_energy(sigma, max(store_tau, tau)))
        feats[name] = FeatureBasis(V=V[:, :r].contiguous(), sigma=sigma, k=k)
    return feats


def _model_identity(target) -> dict:
    from .hub import model_identity

    return model_identity(target)


def _resolved_granularity(model, requested: str) -> str:
    """The granularity the blocks got (so enable(granularity="auto") with this basis picks the same)."""
    from .adapters import last_plan

    p = last_plan(model)
    return p.granularity if p is not None and "+" not in p.granularity else requested


def calibrate(
    target,
    prompt: str | list[str] | None = None,
    *,
    num_inference_steps: int = 50,
    steps=None,
    tau: float = 0.99,
    store_tau: float = 0.999,
    granularity: str = "auto",
    run=None,
    progress: bool = True,
    backend: str = "auto",
    fit_gain_rows: int = 256,
    gain_warmup: int = 3,
    blocks=None,
    streams=None,
    schedule_tau: float = 0.85,
    sample_bytes: int = 2 << 30,
    choose: bool = True,
    choose_prompts: list[str] | None = None,
    choose_seeds: tuple = (7101, 7102, 7103, 7104),
    choose_intervals: tuple = (3, 4, 5, 6, 7),
    **pipe_kwargs,
) -> Basis:
    """Run one reference generation and compute the SVD basis of every cached feature.

    ``target``: a diffusers pipeline (``prompt`` and ``pipe_kwargs`` are passed to it) or a bare
    transformer (then ``run`` is a callable that runs a generation with it). ``steps``: the step
    indices whose features enter the basis (default all). ``tau`` picks k per feature (eq. 6); the
    basis keeps enough columns for any tau up to ``store_tau``, so k can be changed at ``enable``.
    With ``fit_gain_rows`` > 0, that many rows per step and feature are kept on the CPU to fit the
    forecast gains of ``enable(fitted_gains=True)`` (see :func:`fit_gains`), for warm-up ``gain_warmup``.
    The same rows price the calibrated schedules (``enable(schedule="calibrated")``, see
    :mod:`svdcache.schedule_search`; the SVD family with the change subspace at ``schedule_tau``).
    The rows kept are capped so that they take at most ``sample_bytes`` of host memory.

    With ``choose`` (pipelines only), the configuration for each interval of ``choose_intervals`` is then
    chosen closed loop on this model (:mod:`svdcache.choice`): every candidate generated with the cache on
    for ``choose_prompts`` (default: the reference prompt) x ``choose_seeds``, the pairs split alternately
    into a fitting and a checking part, against the uncached outputs; stored in the basis (``enable`` uses
    it), each candidate scored at matched compute (its dB above the safe configuration's curve at its own
    FLOPs ratio, :func:`svdcache.choose.choose`). Give prompts and seeds outside any set you evaluate on. It
    costs about (variants + 1) x intervals + 2 x (intervals + 2) generations of half the pairs each (with
    true CFG as two calls per step and calibrated plans: 18 variants; one call per step: 6).
    """
    check_calibrate_args(target, num_inference_steps, steps, granularity, run, tau, store_tau)  # before any work
    models = transformers(target)
    if len(models) != 1:
        raise ValueError(f"calibrate expects one transformer, found {len(models)}")
    model = models[0]
    if root_of(model) is not None:
        raise ValueError("the cache is enabled on this model: call svdcache.disable first, calibration runs uncached")
    if run is None:
        if model is target:
            raise ValueError("calibrating a bare transformer needs run=<callable that runs one generation>")
        if prompt is None:
            raise ValueError("calibrate(pipe, prompt=...) needs a reference prompt")

        def run():
            return target(prompt=prompt, num_inference_steps=num_inference_steps, **pipe_kwargs)

    hook = CalibrationHook(steps=steps, backend=backend, sample_rows=fit_gain_rows)
    planned, feature_dims = plan(model, granularity, blocks, streams)  # a user's block lists / stream names, as for enable
    install(model, hook, planned, root_name=CALIBRATION_HOOK)
    if fit_gain_rows and feature_dims:
        # rows x D x 4 bytes per feature, step and context (cond / uncond): stay within sample_bytes
        per_row = 4 * sum(feature_dims.values()) * 2 * max(1, num_inference_steps if steps is None else len(set(steps)))
        hook.sample_rows = max(1, min(fit_gain_rows, sample_bytes // per_row))
    from .runtime.distributed import all_gather_object, all_reduce_dict_, merge_samples, parallel_info

    parallel = parallel_info(model)
    if parallel is not None and parallel.shards == 1:
        parallel = None  # tensor parallelism: every rank sees all rows (replicated), nothing to combine
    if parallel is not None and hook.sample_rows:  # context parallelism: each rank sees its shard of the rows
        hook.sample_rows = max(1, -(-hook.sample_rows // parallel.shards))  # the ranks' rows make up one budget
    try:
        with torch.no_grad():
            run()
    finally:
        uninstall(model, root_name=CALIBRATION_HOOK)
    missing = [n for n in feature_dims if n not in hook.grams]
    if missing:
        raise RuntimeError(f"calibration saw no data for features {missing[:5]}: did the generation run?")
    if parallel is not None:
        # the Grams of all ranks' rows, so every rank's eigh sees what one process would (the sum over
        # rows splits over shards); the sampled rows (gains, schedules) are gathered once, so every
        # rank fits the same gains and schedules from the same rows
        all_reduce_dict_(hook.grams, parallel)
        all_reduce_dict_(hook.dgrams, parallel)
        if hook.samples:
            hook.samples = merge_samples(all_gather_object(hook.samples, parallel))
    feats = basis_from_grams(hook.grams, tau, store_tau, progress, desc="svdcache: one-time SVD of the features")
    changes = (basis_from_grams(hook.dgrams, tau, store_tau, progress, desc="svdcache: one-time SVD of the changes")
               if hook.dgrams else {})
    hook._prev.clear()
    import diffusers

    from . import __version__

    meta = {
        "model_class": type(model).__name__,
        "config_fingerprint": config_fingerprint(model),
        "granularity": _resolved_granularity(model, granularity),
        "tau": tau,
        "steps": sorted(hook.used_steps),
        "feature_shapes": hook.shapes,
        "prompt": prompt if isinstance(prompt, str) else repr(prompt),
        "library_version": __version__,
        "diffusers_version": diffusers.__version__,
    }
    meta.update(_model_identity(target))  # model_id / model_revision, where diffusers recorded them
    if hook.samples:
        gains = fit_gains(hook.samples, feats, warmup=gain_warmup)
        for name, g in fit_gains(hook.samples, changes, warmup=gain_warmup, prefix=CHANGE_PREFIX).items():
            gains.setdefault(name, {}).update(g)
        meta["gains"] = gains
        from .schedule_search import calibrated_schedules

        ts = next(iter(hook.timesteps.values()), {})
        timesteps = [ts[i] for i in sorted(ts)] if sorted(ts) == list(range(len(ts))) else None
        sched = calibrated_schedules(hook.samples, changes, schedule_tau, timesteps)
        if sched:
            meta["schedules"] = sched
    basis = Basis(features=feats, meta=meta, changes=changes)
    if choose and model is not target:
        from .choose import choose as choose_config

        prompts = list(choose_prompts) if choose_prompts else ([prompt] if isinstance(prompt, str) else list(prompt))
        pairs = [(p, s) for p in prompts for s in choose_seeds]
        call_kwargs = {k: v for k, v in pipe_kwargs.items() if k != "generator"}
        meta["choice"] = choose_config(target, basis, steps=num_inference_steps, fit=pairs[0::2], check=pairs[1::2],
                                       call_kwargs=call_kwargs, two_calls="uncond" in hook.timesteps,
                                       intervals=tuple(choose_intervals), progress=progress)
    return basis
