"""The one-time SVD: Gram accumulation during a reference generation (offline), or a randomized
low-rank SVD of the first full steps (online, zero setup)."""
from __future__ import annotations

import time

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState

import svdcache_kernels as K

from .basis import Basis, FeatureBasis, config_fingerprint
from .config import SVDCacheConfig
from .state import DefaultContextStateManager


CHANGE_PREFIX = "change/"  # fitted-gain keys of the change subspace


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

    def mode(self):
        return "full" if self._active else None

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

    def forecast(self, name, **kw):  # never called: calibration computes every step
        raise RuntimeError("forecast during calibration")


def basis_from_grams(grams: dict[str, torch.Tensor], tau: float, store_tau: float, progress: bool = True):
    from tqdm.auto import tqdm

    feats = {}
    for name, G in tqdm(grams.items(), desc="svdcache: one-time SVD", disable=not progress, unit="feature"):
        # eigh where G lives (a GPU after a GPU calibration): FLUX's 95 features of D = 3072 take minutes
        # as float64 eigh on a CPU (about 9 s each on one core); the rank is chosen on the CPU copy
        V, sigma, _ = K.basis_from_gram(G, k=G.shape[0])
        V, sigma = V.cpu(), sigma.cpu()
        k = K.rank_for_energy(sigma, tau)
        r = max(k, K.rank_for_energy(sigma, max(store_tau, tau)))
        feats[name] = FeatureBasis(V=V[:, :r].contiguous(), sigma=sigma, k=k)
    return feats


def fit_gains(samples, feats, *, warmup: int = 3, intervals=range(2, 13), orders=(1, 2), prefix: str = "") -> dict:
    """Least-squares gains of the principal Taylor increment, per feature, order and interval.

    Teacher-forced on the calibration trajectory (its own features, row-subsampled): at each step the
    schedule would forecast, the increment P - C_last of gain 1 is compared with the true C_t - C_last
    in k dims, and g = sum <dP, dC> / sum |dP|^2 (clipped to [0, 2]). No extra model run."""
    from .features import newton_weights
    from .schedule import full_steps

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
                a = acc.setdefault((name, f"{prefix}o{order}_N{N}_w{warmup}"), [0.0, 0.0])
                a[0] += num
                a[1] += den
    gains: dict[str, dict[str, float]] = {}
    for (name, key), (num, den) in acc.items():
        gains.setdefault(name, {})[key] = round(min(2.0, max(0.0, num / den)), 4) if den > 0 else 1.0
    return gains


def _model_identity(target) -> dict:
    from .hub import model_identity

    return model_identity(target)


def _resolved_granularity(model, requested: str) -> str:
    """The granularity the blocks got (so enable(granularity="auto") with this basis picks the same)."""
    from .adapters import last_plan

    plan = last_plan(model)
    return plan.granularity if plan is not None and "+" not in plan.granularity else requested


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
    """
    from .apply import _install, _is_enabled, _transformers, _uninstall

    models = _transformers(target)
    if len(models) != 1:
        raise ValueError(f"calibrate expects one transformer, found {len(models)}")
    model = models[0]
    if _is_enabled(model):
        raise ValueError("the cache is enabled on this model: call svdcache.disable first, calibration runs uncached")
    if run is None:
        if model is target:
            raise ValueError("calibrating a bare transformer needs run=<callable that runs one generation>")
        if prompt is None:
            raise ValueError("calibrate(pipe, prompt=...) needs a reference prompt")

        def run():
            return target(prompt=prompt, num_inference_steps=num_inference_steps, **pipe_kwargs)

    hook = CalibrationHook(steps=steps, backend=backend, sample_rows=fit_gain_rows)
    planned = None
    if blocks is not None or streams is not None:  # a user's block lists / stream names, as for enable
        from .adapters import find_blocks

        planned = find_blocks(model, granularity, blocks=blocks, streams=streams)
    feature_dims = _install(model, hook, granularity, root_name="svdcache_calibration", blocks=planned)
    if fit_gain_rows and feature_dims:
        # rows x D x 4 bytes per feature, step and context (cond / uncond): stay within sample_bytes
        per_row = 4 * sum(feature_dims.values()) * 2 * max(1, num_inference_steps if steps is None else len(set(steps)))
        hook.sample_rows = max(1, min(fit_gain_rows, sample_bytes // per_row))
    from .distributed import all_gather_object, all_reduce_dict_, merge_samples, parallel_info

    parallel = parallel_info(model)
    if parallel is not None and parallel.shards == 1:
        parallel = None  # tensor parallelism: every rank sees all rows (replicated), nothing to combine
    if parallel is not None and hook.sample_rows:  # context parallelism: each rank sees its shard of the rows
        hook.sample_rows = max(1, -(-hook.sample_rows // parallel.shards))  # the ranks' rows make up one budget
    try:
        with torch.no_grad():
            run()
    finally:
        _uninstall(model, root_name="svdcache_calibration")
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
    feats = basis_from_grams(hook.grams, tau, store_tau, progress)
    changes = basis_from_grams(hook.dgrams, tau, store_tau, progress) if hook.dgrams else {}
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
    return Basis(features=feats, meta=meta, changes=changes)


class OnlineBasisBuilder:
    """Zero-setup basis: rows of the first ``online_steps`` full steps of each feature, then a
    randomized low-rank SVD (torch.svd_lowrank) of their Gram matrix G = A^T A, whose energy
    fractions are taken against the exact total energy trace(G).

    Through the Gram the basis is a function of a sum over rows, so under context parallelism
    (rows sharded over ranks) one all-reduce of G per feature gives every rank the basis of all
    the rows, the same as one process would build; ``parallel`` (set by ``enable``) returns the
    model's :class:`svdcache.distributed.ParallelInfo` or None."""

    MAX_ROWS_PER_STEP = 2048

    def __init__(self, cfg: SVDCacheConfig):
        self.cfg = cfg
        self.parallel = lambda: None
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.diffs: dict[str, list[torch.Tensor]] = {}  # change subspace: X_t - X_t-1 per context
        self._last: dict[tuple[str, str], torch.Tensor] = {}
        self.seconds = 0.0
        self.flops = 0
        self.built: set[str] = set()

    @property
    def done(self) -> bool:
        return bool(self.built) and not self.rows

    @torch.no_grad()
    def collect(self, name: str, F: torch.Tensor, ctx: str = "default") -> FeatureBasis | None:
        t0 = time.perf_counter()
        X = F.detach().reshape(-1, F.shape[-1])
        info = self.parallel()
        shards = info.shards if info is not None else 1
        # the row budget is per step of the whole sequence: a shard keeps its share of it
        stride = max(1, -(-X.shape[0] * shards // self.MAX_ROWS_PER_STEP))
        X = X[::stride].float()
        self.rows.setdefault(name, []).append(X)
        change = self.cfg.subspace == "change"
        if change:
            last = self._last.get((ctx, name))
            if last is not None and last.shape == X.shape:
                self.diffs.setdefault(name, []).append(X - last)
            self._last[(ctx, name)] = X
        # at most ``warmup`` steps (config doc): more would force scheduled-cached steps to run in full
        if len(self.rows[name]) < min(self.cfg.online_steps, self.cfg.warmup) or (change and name not in self.diffs):
            self.seconds += time.perf_counter() - t0
            return None
        A = torch.cat(self.diffs.pop(name) if change else self.rows[name])
        del self.rows[name]
        G = A.T @ A  # (D, D) fp32, the sum over rows: shards add up
        if info is not None and info.shards > 1:
            from .distributed import all_reduce_

            all_reduce_(G, info)  # the one collective of the zero-setup basis (per feature, once)
        q = max(1, min(self.cfg.online_rank, G.shape[0]))
        with torch.random.fork_rng(devices=[G.device] if G.is_cuda else []):  # leave the user's RNG alone
            torch.manual_seed(0)
            _, S, V = torch.svd_lowrank(G, q=q, niter=2)  # G symmetric PSD: S = sigma^2 of the rows
        total = float(torch.diagonal(G).double().sum())
        rest = max(total - float(S.double().sum()), 0.0)
        sigma = torch.cat([S.double().clamp_min(0).sqrt().float().cpu(), torch.tensor([rest**0.5])])
        V = V.float().cpu()
        k = max(1, min(K.rank_for_energy(sigma, self.cfg.tau) if self.cfg.tau else self.cfg.rank, q))
        D = G.shape[0]
        self.flops += 2 * A.shape[0] * D * D + 2 * D * D * q * 6  # Gram, then about 6 passes over G
        self.built.add(name)
        if A.is_cuda:
            torch.cuda.synchronize(A.device)
        self.seconds += time.perf_counter() - t0
        return FeatureBasis(V=V, sigma=sigma, k=k)
