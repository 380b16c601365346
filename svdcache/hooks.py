"""diffusers ModelHooks: the root hook decides per transformer call (per cache context) whether the
step is computed or forecast; block hooks run the block or its forecast; capture hooks hand
module outputs of full steps to the feature caches (or to calibration)."""
from __future__ import annotations

import functools
import logging
import threading
import time
import warnings
import weakref

import torch
from diffusers.hooks import ModelHook

from .config import SVDCacheConfig
from .distributed import plain_feature, reduce_partial, sees_shards
from . import guidance
from .flops import count_flops
from .graphs import StepGraphs, pin_anchors
from .guards import CONTINUATION_TOL, concurrent_use_error, continuation_residual, refuse_foreign_cache
from .batched_update import capture_plan, defer_update, flush_updates, record_captured
from .deferred import DeferredSum
from .features import SubspaceCache, make_feature_cache
from .schedule import Schedule
from .state import ContextState, DefaultContextStateManager
from .stats import CacheStats, RunStats

logger = logging.getLogger("svdcache")

_MISSING = object()
ROOT_HOOK = "svdcache"
BLOCK_HOOK = "svdcache_block"
CAPTURE_HOOK = "svdcache_capture"
# the transformer's timestep argument: diffusers' name, and those of HiDream, Z-Image, Cosmos 3
_TIMESTEP_ARGS = ("timestep", "timesteps", "t", "vision_timesteps")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    return getattr(out, "sample", None)


def _timestep_value(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None  # one host sync per call
    return float(t)


class _Inert:
    """What a detached capture still wrapped by another forward wrapper points at: it records nothing."""

    active_sink = active_record = None


class CaptureHook:
    """On a submodule: during a full step of its block, record the listed outputs as features.

    Attached as a thin wrapper of the submodule's ``forward`` (one frame per call), not a diffusers registry
    hook (four frames and the packing of the arguments per call): every captured module runs at every full
    step, and on a dispatch-bound model those frames are a measurable share of it (issue 12)."""

    def __init__(self, block_hook: "BlockHook", outputs: list[tuple[str, int | None]]):
        self.block_hook = block_hook
        self.outputs = outputs
        self._attached = None  # (module, our forward, the instance forward it replaced or None)

    def record_output(self, module, output):
        """The per-feature path: each listed output recorded now (the wrapper's bulk path hands the output
        to the call's sink instead, recorded with the others at the end of the call: record_captured)."""
        record = self.block_hook.active_record
        if record is not None:
            if type(output) is not torch.Tensor and type(output) is not tuple:
                output = reduce_partial(output)  # tensor parallelism: a row-parallel linear's partial sum
            for name, idx in self.outputs:
                record(name, output if idx is None else output[idx])
        return output

    def attach(self, module: torch.nn.Module) -> None:
        inner, own = module.forward, module.__dict__.get("forward")
        post = self.record_output

        @functools.wraps(inner)  # inspect.signature (torch.export) follows __wrapped__ to the real one
        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            bh = self.block_hook
            sink = bh.active_sink
            if sink is not None and (type(out) is torch.Tensor or type(out) is tuple):
                sink += (self, out)  # recorded with the others at the end of the call (record_captured)
                return out
            return out if bh.active_record is None else post(module, out)

        forward._svdcache_capture, forward._svdcache_own = self, own
        module.forward = forward
        self._attached = (module, forward, own)

    def detach(self) -> None:
        if self._attached is None:
            return
        module, forward, own = self._attached
        self._attached = None
        self.block_hook = _Inert()
        if module.__dict__.get("forward") is not forward:
            return  # another wrapper took ours in: it stays in that chain, recording nothing
        while getattr(own, "_svdcache_capture", None) is not None and own._svdcache_capture._attached is None:
            own = own._svdcache_own  # an inert capture under ours goes too
        if own is None:
            del module.forward
        else:
            module.forward = own


class BlockHook(ModelHook):
    """On a transformer block: full forward (features recorded) or cached forward (forecasts)."""

    def __init__(self, controller, name: str, adapter):
        super().__init__()
        self.controller = controller
        self.name = name
        self.adapter = adapter
        self.active_record = None
        self.active_sink = None  # a bulk full call's list of (capture hook, output) (_bypass_plain_blocks)
        self.active_forecast = None  # set during a cached forward (submodule hooks read it)
        self.prefix = name + "."
        self._forecast = Forecaster(controller, self.prefix)
        self._sum = getattr(controller, "deferred_sum", None)
        self._names: dict[str, str] = {}  # local -> full feature name (no string concatenation per call)
        self._rec = self._record  # one bound method, not one per call
        self._plain = getattr(adapter, "plain_full_forward", False)  # its full forward is the block's own
        self.block = self.wrapper = None  # the block and the registry's wrapper of it (apply._install)

    def _record(self, local: str, F) -> None:
        compiling = torch.compiler.is_compiling()
        if compiling:
            deferred = getattr(self.controller, "_deferred", None)
            if deferred is not None:
                # traced: hand the feature out of the graph, the root hook's _end records it eagerly
                # (no graph break inside the blocks, no per-feature guard, one graph per kind of call)
                deferred.append((self, local, F))
                return
        name = self._names.get(local)
        if name is None:
            name = self._names[local] = self.prefix + local
        ctl = self.controller
        dims = getattr(ctl, "feature_dims", None)
        if dims is None or name not in dims:
            # adapters that learn their features on the first full step (submodule, generic block
            # level) declare them then
            declare = getattr(ctl, "declare", None)
            if declare is not None:
                declare(name, None if F is None else F.shape[-1])
        if compiling:
            ctl.record(name, F)  # behind a graph break
        else:  # the same, without the compiler-disable wrapper per feature
            (getattr(ctl, "_record_eager", None) or ctl.record)(name, F)

    def new_forward(self, module, *args, **kwargs):
        mode = self.controller.mode()
        if mode == "cached":
            ds = self._sum
            if ds is not None and ds.until is not None and ds.until is not module:
                # a whole-stack cached call: this block's terms were deferred by the first block
                return self.adapter.passthrough(module, args, kwargs)
            if torch.compiler.is_compiling():
                return self._cached_forward(module, args, kwargs)
            return self._cached_forward_eager(module, args, kwargs)
        if mode is None:  # called outside a managed transformer call
            return self.fn_ref.original_forward(*args, **kwargs)
        # (a bulk full call runs plain blocks without this hook: SVDCacheHook._bypass_plain_blocks; one
        # that still comes here, under another wrapper, records feature by feature)
        self.active_record = rec = self._rec
        try:
            if self._plain:
                return self.fn_ref.original_forward(*args, **kwargs)
            return self.adapter.full_forward(module, self.fn_ref.original_forward, args, kwargs, rec)
        finally:
            self.active_record = None

    def _cached_forward_eager(self, module, args, kwargs):
        if getattr(self.adapter, "needs_forward", False):  # the block's own forward runs (submodule level)
            self.active_forecast = self._forecast
            try:
                return self.adapter.cached_forward(module, args, kwargs, self._forecast,
                                                   forward=self.fn_ref.original_forward)
            finally:
                self.active_forecast = None
        return self.adapter.cached_forward(module, args, kwargs, self._forecast)

    _cached_forward = torch.compiler.disable(_cached_forward_eager)  # under torch.compile: a graph break


class Forecaster:
    """What a block's cached forward calls: ``forecast(local_name, x=, gate=, out=)``, plus
    ``buffer(key, shape, dtype, device)``, a work tensor owned by the runtime and reused every
    cached call (adapters write block outputs into it instead of allocating, or concatenating), and
    ``defer_all(items, until=, undo=)`` / ``flush(x, out)``: gated forecasts added to the stream later,
    all in one batched sum (svdcache.deferred)."""

    __slots__ = ("controller", "prefix", "names")

    def __init__(self, controller, prefix: str):
        self.controller = controller
        self.prefix = prefix
        self.names: dict[str, str] = {}

    def __call__(self, local: str, **kw):
        name = self.names.get(local)
        if name is None:
            name = self.names[local] = self.prefix + local
        return self.controller.forecast(name, **kw)

    def buffer(self, key: str, shape, dtype, device):
        return self.controller.buffer(key, shape, dtype, device)

    def defer_all(self, items, until=None, undo=None) -> None:
        """Deferred terms of any blocks of the call: ``(full feature name, gate, rows)``; ``until``: the
        block module that will flush them (the blocks called before it pass their inputs on); ``undo``: a
        callable run when the call ends, however it ends (an adapter's change to the model for this call)."""
        ds = self.controller.deferred_sum
        ds.items.extend(items)
        ds.until = until
        if undo is not None:
            ds.undo.append(undo)

    def flush(self, x, out=None):
        return self.controller.deferred_sum.flush(self.controller, x, out)


class SVDCacheHook(ModelHook):
    """Root hook on the transformer: schedule, per-context state, fallbacks, statistics."""

    _is_stateful = True

    def __init__(self, config: SVDCacheConfig, basis, feature_dims: dict[str, int], model_class: str,
                 granularity: str = "auto", schedule_basis=None):
        super().__init__()
        self.cfg = config
        self.granularity = granularity
        self.basis = basis
        self.feature_dims = feature_dims
        self.model_class = model_class
        self.state_manager = DefaultContextStateManager(ContextState)
        self.total = RunStats()  # finished generations
        self.last = RunStats()  # the last finished generation
        self.cur = RunStats()  # the generation in progress (all contexts)
        self._cur_contexts: set[str] = set()
        self._shares = False
        self.generations = 0
        self.bases = {n: basis.subspace(config.subspace)[n] for n in feature_dims} if basis else {}
        self.ranks = {n: fb.rank(config.tau, config.rank) for n, fb in self.bases.items()}
        self.gains = self._fitted_gains(basis) if config.fitted_gains else {}
        self._V: dict[str, torch.Tensor] = {}
        self._flops: dict[tuple, int] = {}  # replaced by the model's own table in initialize_hook
        self._warned: set[str] = set()
        self._state: ContextState | None = None  # state of the call in progress
        self._pending: dict[str, list] = {}  # zero-setup: features held until their basis exists
        self._buffers: dict[str, torch.Tensor] = {}  # cached forwards' output buffers (see buffer)
        self._plans: dict[str, dict] = {}  # per feature: prepared split / reconstruct calls by layout
        self.deferred_sum = DeferredSum()  # gated forecasts of the cached call in progress, summed at its last block
        self.unread: set[str] = set()  # features no cached step forecasts (adapters' unread_features): not captured, no cache
        self.online = None
        self.schedule = Schedule(config, basis if schedule_basis is None else schedule_basis)  # full space: plans only
        self._bits: dict[str, int] = {}  # residual bits per feature chosen by a memory budget
        self.scheduler = None  # the pipeline's scheduler (set by enable): the step count of each run
        self._lock = threading.Lock()  # held for the length of a call: a second thread's call is refused
        self._deferred: list = []  # (block hook, feature, F) recorded inside a compiled graph, for _end
        self.captures: list = []  # the capture hooks pointing here (apply._install)
        self.sink: list | None = None  # [capture hook, output, ...] of the eager full call in progress
        self.plain_blocks: list = []  # block hooks of plain_full_forward adapters (apply._install)
        self.call_checks: list = []  # adapters that refuse some calls (check_call), run in _begin
        self._bypassed: list = []  # those the call in progress runs without their hook (_bypass_plain_blocks)
        self._owner = None  # the thread holding it
        self.explicit = 0  # > 0 inside ``with svdcache.generation(model)``: one generation, no guessing
        self._model = None
        # cached steps replayed from CUDA graphs (svdcache.graphs); None: eager (off CUDA, or not asked for)
        self.graphs = StepGraphs() if config.cuda_graphs and torch.cuda.is_available() else None
        if config.cuda_graphs and self.graphs is None:
            logger.info("svdcache: cuda_graphs=True needs CUDA; cached steps run eagerly")
        if basis is None and config.space == "svd":
            from .calibration import OnlineBasisBuilder

            self.online = OnlineBasisBuilder(config)

    def initialize_hook(self, module):
        # The model's own FLOPs per kind of call (input signature, full or cached, granularity) do not
        # depend on the cache's settings (its ops are counted apart): keep them on the model, so a
        # re-enable does not count again (torch's FLOP counter slows the calls it watches).
        self._flops = module.__dict__.setdefault("_svdcache_flop_table", {})
        self._model = weakref.ref(module)  # to see another cache added after enable
        return module

    def _fitted_gains(self, basis) -> dict[str, float]:
        cfg = self.cfg
        from .calibration import CHANGE_PREFIX

        key = f"{CHANGE_PREFIX if cfg.subspace == 'change' else ''}o{cfg.order}_N{cfg.interval}_w{cfg.warmup}"
        table = (basis.meta.get("gains") if basis is not None else None) or {}
        gains = {n: table[n][key] * cfg.gain for n in self.feature_dims if key in table.get(n, {})}
        if len(gains) < len(self.feature_dims):
            warnings.warn(f"svdcache: the basis has no fitted gains for {key} on {len(self.feature_dims) - len(gains)} "
                          f"features; those use gain {cfg.gain}", stacklevel=4)
        return gains

    # -- lifecycle ---------------------------------------------------------------------------
    def reset_state(self, module):
        self._finish_generation()
        self.state_manager.reset()
        return module

    def _finish_generation(self) -> None:
        if self.cur.calls:
            self.total.add(self.cur)
            self.last = self.cur
            self.generations += 1
        self.cur = RunStats()
        self._cur_contexts = set()
        self._shares = False  # the unconditional branch found the conditional one this generation (guidance)

    def _start_generation(self, st: ContextState, ctx_name: str) -> None:
        """A context starts a generation; when one that already took part in the current generation
        starts again, the current generation is over (cond and uncond share one generation)."""
        st.new_generation()
        if ctx_name in self._cur_contexts:
            self._finish_generation()
        self._cur_contexts.add(ctx_name)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=4)

    # -- per-call decision --------------------------------------------------------------------
    @torch.compiler.disable
    def _begin(self, args, kwargs) -> ContextState:
        if not self._lock.acquire(blocking=False):
            if self._owner != threading.get_ident():
                raise concurrent_use_error(self.model_class)
            if self._state is not None:  # this thread's last call raised without cleaning up (compiled)
                self._state.new_generation()
                self._state = None
            self._deferred.clear()
        self._owner = threading.get_ident()
        try:
            return self._begin_locked(args, kwargs)
        except BaseException:
            self._lock.release()
            raise

    def _begin_locked(self, args, kwargs) -> ContextState:
        for a in self.call_checks:
            a.check_call(kwargs)
        cfg = self.cfg
        st = self.state_manager.get_state()
        ctx = self.state_manager.context
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ehs = kwargs.get("encoder_hidden_states")
        sig = (
            tuple(hs.shape) if isinstance(hs, torch.Tensor) else None,
            tuple(ehs.shape) if isinstance(ehs, torch.Tensor) else None,
            getattr(hs, "dtype", None),
            getattr(hs, "device", None),
        )
        timestep = next((kwargs[k] for k in _TIMESTEP_ARGS if kwargs.get(k) is not None), None)
        num_steps = ctx.num_inference_steps or self._scheduler_steps() or cfg.num_inference_steps
        skip_read = cfg.time_axis == "step" and self._skip_timestep_read(timestep, hs, ctx, num_steps)
        t_raw = None if skip_read else _timestep_value(timestep)
        bare = self.state_manager._context is None and isinstance(hs, torch.Tensor) and not skip_read
        if st.signature is not None and sig != st.signature:
            logger.info("svdcache: input shape/dtype/device changed (%s -> %s): state reset, computing in full", st.signature, sig)
            new = True
        elif self.explicit:  # inside svdcache.generation(): the user says where generations start
            new = st.step < 0
        elif ctx.step_index is not None:
            new = ctx.step_index <= st.step
        else:  # timesteps only go down within a generation; a repeat of its first one restarts it
            # (two steps may round to the same bf16 timestep mid-generation: that is no restart)
            new = st.step < 0 or (t_raw is not None and st.last_t is not None
                                  and (t_raw > st.last_t or t_raw == st.last_t == st.first_t))
            new = new or (num_steps is not None and st.step + 1 >= num_steps)
            if not new and bare and st.traj_x is not None and not self._input_is_shard():
                # a bare loop restarted at an equal or lower timestep (an interrupted generation, img2img):
                # its input is not the continuation of the last inputs and outputs
                r = continuation_residual(st.traj_x, st.traj_out, hs)
                if r is not None and r > CONTINUATION_TOL:
                    logger.info("svdcache: the input does not continue the trajectory (residual %.2f): new generation", r)
                    new = True
        if new:
            model = self._model() if self._model is not None else None
            if model is not None:
                refuse_foreign_cache(model)  # e.g. model.enable_cache(FirstBlockCacheConfig()) after enable
            self._start_generation(st, ctx.name)
            st.first_t = t_raw
        st.traj_x = hs.detach().clone() if bare and not self.explicit else None
        st.signature = sig
        st.last_t = t_raw
        st.step = ctx.step_index if ctx.step_index is not None else st.step + 1
        if cfg.time_axis == "timestep" and t_raw is not None:
            st.t = t_raw
        else:
            st.t = float(st.step)
        # a run that shares the unconditional branch (it has appeared in this generation) has its own plans
        shared = cfg.uncond_interval > 1 and self._shares
        full = self.schedule.is_full(st.step, num_steps, shared)
        st.mode = "full" if (full or not st.ready) else "cached"
        st.shared = False
        if cfg.uncond_interval > 1:  # true CFG: the unconditional branch from the conditional one
            guidance.decide(self, st, ctx.name)
        st.updated = set()
        st.call_cache_flops = 0
        st.call_torch_flops = 0  # the share of call_cache_flops that ran as PyTorch ops on the Triton backend
        if st.mode == "cached" and getattr(st, "finite_flag", None) is not None:
            self._check_state_flag(st)
        if st.mode != "cached":
            st.sum_bound = None  # the states change: no view of the old ones is kept through the step
        self.deferred_sum.clear()
        self._state = st
        return st

    # -- host syncs: none per step on a GPU ------------------------------------------------------
    @staticmethod
    def _device_side(t) -> bool:
        """Reading ``t`` on the host would wait for the device (a GPU tensor)."""
        return isinstance(t, torch.Tensor) and t.device.type != "cpu"

    def _skip_timestep_read(self, timestep, hs, ctx, num_steps) -> bool:
        """The timestep is read (restart detection) where it is free: a CPU value. On a GPU it is
        read only when nothing else says where a generation starts: no step index, no step count
        (config or the pipeline's scheduler) and no pipeline context (pipelines reset the cache at
        the end of each call). ``sync_free`` never reads it."""
        if self.cfg.sync_free and self._device_side(hs):
            return True
        if not self._device_side(timestep):
            return False
        return ctx.step_index is not None or num_steps is not None or self.state_manager._context is not None

    def _states_finite(self, st: ContextState):
        """On a GPU, at a full step: one device-side flag, all k-dim states finite (a non-finite
        feature makes them non-finite), read at the next cached step instead of a sync per step."""
        ts = [u for fc in st.features.values() if fc is not None for u in fc.state_tensors()]
        if not ts:
            return None
        norms = torch._foreach_norm(ts, float("inf"))  # max |.|: NaN and inf survive, no overflow
        return torch.isfinite(torch.stack(norms)).all()

    def _check_state_flag(self, st: ContextState) -> None:
        ok = bool(st.finite_flag)  # the one host read per full-step interval on a GPU
        st.finite_flag = None
        if not ok:
            self._fall_back(st, "a cached state")

    def _fall_back(self, st: ContextState, what: str, key: str = "fallback") -> None:
        """A non-finite forecast or state (or another reason, ``key``): drop the context's caches and
        compute this step in full."""
        msg = f"svdcache: {what} is not finite; this step is computed in full" if key == "fallback" else f"svdcache: {what}"
        self._warn_once(key, msg + " (warned once)")
        self.cur.fallbacks += 1
        st.drop_caches()
        st.ready = False
        st.hist = 0
        st.mode = "full"

    def _scheduler_steps(self) -> int | None:
        """Transformer calls per context in this run, from the pipeline's scheduler (host-side, no sync)."""
        sched = self.scheduler() if self.scheduler is not None else None
        ts = getattr(sched, "timesteps", None)
        if ts is None:
            return None
        n = len(ts) - int(getattr(sched, "begin_index", None) or 0)
        want = self.cfg.num_inference_steps
        if want is not None and n > 0 and want != n:
            self._warn_once("steps", f"svdcache: num_inference_steps={want} in the config, but the pipeline runs "
                            f"{n} steps; using {n} (warned once)")
        return n if n > 0 else None

    def _input_is_shard(self) -> bool:
        """Context parallelism split the input before this hook (a value-based decision would then
        differ between ranks and desynchronise their collectives): see svdcache.distributed."""
        model = self._model() if self._model is not None else None
        return model is not None and getattr(model, "_parallel_config", None) is not None and sees_shards(model, ROOT_HOOK)

    def _sync_free(self, t) -> bool:
        return self.cfg.sync_free and isinstance(t, torch.Tensor) and t.is_cuda

    def new_generation(self) -> None:
        """Forget every context's state: the next call starts a new generation."""
        for st in self.state_manager.states():
            st.new_generation()

    def mode(self):
        st = self._state
        return None if st is None else st.mode

    # -- the call --------------------------------------------------------------------------------
    # Under torch.compile the model's own compute is traced; the decision (_begin), the bookkeeping
    # (_end) and the cache ops (record / cached block forwards) run eagerly behind graph breaks, so
    # no per-step Python value (step offsets, weights) is baked into a graph and forces a recompile.
    def new_forward(self, module, *args, **kwargs):
        st = self._begin(args, kwargs)
        if torch.compiler.is_compiling():
            # no try block here: a graph break inside one makes dynamo run the whole frame eagerly; a
            # compiled call that raised is cleaned up by the next call's _begin (same thread).
            # A full step is one graph (features leave it as outputs); a cached step runs eagerly:
            # its blocks are forecasts behind the cache's own ops, and a graph break per block would
            # compile every block's hook frame apart (diffusers' one new_forward code object for all).
            if st.mode == "cached":
                out = self._eager_forward(*args, **kwargs)
            else:
                out = self.fn_ref.original_forward(*args, **kwargs)
            return self._end(st, out, args, kwargs)
        # small features of an eager full step are handed over by their capture hooks and recorded in bulk
        # at the end of the call, where the state's capture plan holds (svdcache.batched_update)
        self.sink = [] if st.mode == "full" and st.capture_plan is not None and st.partner is None else None
        if self.sink is not None:
            self._bypass_plain_blocks(self.sink)
        try:
            # a cached call replayed (or captured) from a CUDA graph; None: run eagerly
            out = self.graphs.run(self, st, args, kwargs) if self.graphs is not None and st.mode == "cached" else None
            if out is not None:
                pass
            elif self._wants_count(st):
                out, counted = count_flops(self.fn_ref.original_forward, *args, **kwargs)
                self._store_count(st, counted, args, kwargs)
            else:
                out = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self._abort(st)
            raise
        return self._end(st, out, args, kwargs)

    def _bypass_plain_blocks(self, sink: list) -> None:
        """For an eager full call that records in bulk: blocks whose full forward is the block's own
        (plain_full_forward) run the forward our hook wraps straight (the registry's wrapper, our hook and its
        frames left out for the call: the block calls cost what they cost uncached), their captures handed the
        call's sink. Swapped only where the block's forward is still the registry's wrapper of our hook."""
        for bh in self.plain_blocks:
            d = bh.block.__dict__
            if bh.wrapper is not None and d.get("forward") is bh.wrapper:
                d["forward"] = bh.fn_ref.original_forward
                bh.active_record, bh.active_sink = bh._rec, sink
                self._bypassed.append(bh)

    def _restore_plain_blocks(self) -> None:
        """The bulk call undone: its sink dropped, the bypassed blocks' forwards (and hooks) back."""
        self.sink = None
        for bh in self._bypassed:
            bh.block.__dict__["forward"] = bh.wrapper
            bh.active_record = bh.active_sink = None
        self._bypassed.clear()

    @torch.compiler.disable
    def _eager_forward(self, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs)

    @torch.compiler.disable
    def _abort(self, st: ContextState) -> None:
        """A call that raised (another hook, a bad input, an interrupt) leaves nothing behind: its
        context starts over on the next call."""
        st.new_generation()
        st.mode = None
        self._state = None
        self._restore_plain_blocks()
        self._deferred.clear()
        self.deferred_sum.clear()
        self._lock.release()

    def _track(self, st: ContextState, out) -> None:
        if st.traj_x is not None:  # bare loop: keep the last two outputs for continuation_residual
            o = _first_tensor(out)
            st.traj_out = (st.traj_out + [o.detach().clone()])[-2:] if isinstance(o, torch.Tensor) else []

    @torch.compiler.disable
    def _end(self, st: ContextState, out, args, kwargs):
        try:
            if self._deferred:  # features a compiled full step handed out
                items = list(self._deferred)
                self._deferred.clear()
                for bh, local, F in items:
                    bh._record(local, F)
            pending = bool(self.deferred_sum.items)
            self.deferred_sum.clear()  # first: a full forward below must see the model as it is
            if st.mode == "cached" and pending:
                # terms deferred to a last block that never summed them: the output lacks them
                self._fall_back(st, "the model's forward did not reach the block that sums the deferred forecasts;"
                                " this step is computed in full", key="deferred")
                st.call_cache_flops = st.call_torch_flops = 0
                out = self.fn_ref.original_forward(*args, **kwargs)
            if st.mode == "cached":
                o = _first_tensor(out)
                # a GPU output is not read back per step: its states were checked at the full step
                check = self.cfg.check_finite and not self._sync_free(o) and not self._device_side(o)
                o = o if check else None
                if o is None or bool(torch.isfinite(o).all()):
                    self.cur.cached_steps += 1
                    self.cur.shared_steps += st.shared
                    self._account(st)
                    self._track(st, out)
                    if st.capture_plan is None and st.sum_arena and not st.plan_tried:
                        # the arenas exist from the first cached call: the next full step records in bulk
                        st.plan_tried = True
                        st.capture_plan = capture_plan(st, self.captures)
                    return out
                self._fall_back(st, "a forecast")
                st.call_cache_flops = st.call_torch_flops = 0
                out = self.fn_ref.original_forward(*args, **kwargs)
            sink = self.sink
            self._restore_plain_blocks()
            if sink:
                record_captured(self, st, sink)
            if st.pending_updates:  # the held updates of small features, batched per arena
                if flush_updates(self, st) and sink is None:
                    st.capture_plan = capture_plan(st, self.captures)
            if self.graphs is not None:
                pin_anchors(st)  # where the next interval's graph finds them
            self.cur.full_steps += 1
            st.plan_tried = False  # (one try at the next cached call, where the plan was not learnt here)
            self._account(st)
            st.hist = min(st.hist + 1, 3)
            st.ready = self._all_updated(st)
            st.finite_flag = None
            if st.ready and self.cfg.check_finite and not self.cfg.sync_free and self._device_side(_first_tensor(out)):
                st.finite_flag = self._states_finite(st)
            self._measure_memory()
            self._track(st, out)
            return out
        except BaseException:
            st.new_generation()  # e.g. the fallback's full forward raised: no partial state is kept
            raise
        finally:
            self.deferred_sum.clear()  # nothing an adapter changed for the call outlives it
            self._restore_plain_blocks()
            self._state = None
            st.mode = None
            self._lock.release()

    def _measure_memory(self) -> None:
        cache = feats = 0
        for s in self.state_manager.states():
            m = s.mem
            if m is None:
                fcs = [fc for fc in s.features.values() if fc is not None]
                m = (sum(fc.nbytes() for fc in fcs), sum(fc.feature_nbytes for fc in fcs))
                if all(fc.n >= 3 for fc in fcs):  # every state allocated (D2, codes): sizes fixed from here on
                    s.mem = m
            cache += m[0]
            feats += m[1]
        if cache > self.cur.cache_bytes:
            self.cur.cache_bytes, self.cur.feature_bytes = cache, feats

    @torch.compiler.disable
    def _wants_count(self, st: ContextState) -> bool:
        return self.cfg.count_flops and self._flop_key(st) not in self._flops

    @torch.compiler.disable
    def _store_count(self, st: ContextState, counted: int, args, kwargs) -> None:
        # cache ops that ran as PyTorch ops were seen by torch's counter too: keep only the model's own
        torch_ops = st.call_cache_flops if self._backend_is_torch(args, kwargs) else st.call_torch_flops
        self._flops[self._flop_key(st)] = counted - torch_ops  # the model's own FLOPs

    def _flop_key(self, st: ContextState, mode: str | None = None) -> tuple:
        return (st.signature, mode or st.mode, self.granularity)

    def _account(self, st: ContextState) -> None:
        model = self._flops.get(self._flop_key(st), 0)
        full = self._flops.get(self._flop_key(st, "full"), 0)
        self.cur.flops += model + st.call_cache_flops
        self.cur.cache_op_flops += st.call_cache_flops
        self.cur.flops_uncached += full

    def _backend_is_torch(self, args, kwargs) -> bool:
        from svdcache_kernels import resolve_backend

        hs = kwargs.get("hidden_states", args[0] if args else None)
        return not isinstance(hs, torch.Tensor) or resolve_backend(self.cfg.backend, hs) == "torch"

    def _all_updated(self, st: ContextState) -> bool:
        if self.feature_dims.keys() - st.updated <= self.unread:  # the common case, in set operations
            return True
        missing = [n for n in self.feature_dims if n not in st.updated and n not in self.unread]
        if missing and (self.online is None or self.online.done):
            self._warn_once("missing", f"svdcache: features {missing[:3]} were not produced by a full step; "
                            "every step is computed in full")
        return not missing

    # -- feature callbacks (from block and capture hooks) ----------------------------------------
    @torch.compiler.disable
    def declare(self, name: str, D: int | None) -> None:
        """A feature first seen on a full step (adapters that learn their features from the first
        full step's outputs): it joins the features every full step must produce."""
        if name in self.feature_dims:
            return
        self.feature_dims[name] = D
        if self.basis is not None and self.cfg.space == "svd" and self.online is None:  # a calibrated basis
            sub = self.basis.subspace(self.cfg.subspace)
            if name not in sub:
                raise ValueError(f"the basis has no feature {name!r} (it holds {len(sub)} features, e.g. "
                                 f"{next(iter(sub), None)!r}); calibrate this model with the same granularity")
            self.bases[name] = sub[name]
            self.ranks[name] = sub[name].rank(self.cfg.tau, self.cfg.rank)
            if self.cfg.fitted_gains:  # as _fitted_gains does for the features known at enable
                from .calibration import CHANGE_PREFIX

                c = self.cfg
                key = f"{CHANGE_PREFIX if c.subspace == 'change' else ''}o{c.order}_N{c.interval}_w{c.warmup}"
                g = ((self.basis.meta.get("gains") or {}).get(name) or {}).get(key)
                if g is None:
                    self._warn_once("gains", f"svdcache: the basis has no fitted gains for {key} on some "
                                    f"features; those use gain {c.gain}")
                else:
                    self.gains[name] = g * c.gain

    def _basis_V(self, name: str, F: torch.Tensor) -> torch.Tensor:
        V = self._V.get(name)
        if V is not None and V.device == F.device and V.dtype == F.dtype:
            return V
        fb = self.bases[name]
        if fb.D != F.shape[-1]:
            raise ValueError(f"feature {name!r}: basis has D={fb.D} but the model produced D={F.shape[-1]}")
        if self.cfg.memory_budget is not None:  # rank and residual bits from the budget (per row of F)
            from .features import plan_for_budget

            self.ranks[name], self._bits[name] = plan_for_budget(
                self.cfg.memory_budget, fb.D, fb.rank(self.cfg.tau, self.cfg.rank), F.element_size())
        V = fb.V[:, : self.ranks[name]].to(device=F.device, dtype=F.dtype).contiguous()
        self._V[name] = V
        return V

    def _record_eager(self, name: str, F: torch.Tensor | None) -> None:
        st = self._state
        if F is None:
            st.features[name] = None
            st.updated.add(name)
            return
        if type(F) is not torch.Tensor:  # tensor parallelism: a pending all-reduce or a DTensor
            F = plain_feature(name, F)
        fc = st.features.get(name)
        if fc is not None and st.partner is None and defer_update(st, fc, F, st.t):
            st.updated.add(name)  # with its arena's batched update at the end of the call
            return
        if self.cfg.space == "svd" and name not in self.bases:
            # zero-setup: hold the feature until its online basis exists, then replay it, so the
            # first generation's caches start with the whole warm-up history
            self._pending.setdefault(name, []).append((st, st.generation, F, st.t))
            built = self.online.collect(name, F, self.state_manager.context.name)
            if built is None:
                return
            self._adopt(name, built)
            for s, gen, Fp, tp in self._pending.pop(name):
                if s.generation == gen:
                    self._update(s, name, Fp, tp)
            return
        self._update(st, name, F, st.t)

    record = torch.compiler.disable(_record_eager)  # a graph break under torch.compile

    def _update(self, st: ContextState, name: str, F: torch.Tensor, t: float) -> None:
        if name in self.unread:  # recorded (a basis built online holds it) but never forecast: no state kept
            st.features[name] = None
            st.updated.add(name)
            return
        fc = st.features.get(name)
        relative = False
        if st.partner is not None or getattr(fc, "relative", False):
            # the unconditional branch (guidance): the difference to the conditional feature of the step
            F, relative = guidance.difference(st, name, F)
            if fc is not None and fc.relative != relative:
                fc = None  # one form per history: the other starts over
        held = getattr(fc, "R", None) if isinstance(fc, SubspaceCache) else getattr(fc, "F", None)
        if held is not None and held.dtype != F.dtype:
            # e.g. autocast turned on or off mid-generation: this feature's history starts over (its
            # forecasts reuse the new feature until it has two), instead of mixing dtypes
            logger.info("svdcache: feature %s changed dtype (%s -> %s): its history starts over", name, held.dtype, F.dtype)
            fc = None
            st.capture_plan = None  # the plan holds the old cache
        if fc is None:
            V = self._basis_V(name, F) if self.cfg.space == "svd" else None
            fc = st.features[name] = make_feature_cache(name, self.cfg, V, self.gains.get(name), self._bits.get(name))
            st.mem = None  # measured again (_measure_memory)
            fc.plans = self._plans.setdefault(name, {})  # validated kernel calls outlive a generation
            fc.relative = relative
        elif isinstance(fc, SubspaceCache) and (fc.V.dtype != F.dtype or fc.V.device != F.device):
            fc.V = self._basis_V(name, F)
        try:
            fc.update(F, t)
        except (ValueError, TypeError) as e:
            raise type(e)(f"svdcache feature {name!r}: {e}") from None
        st.updated.add(name)
        self._add_cache_flops(self._state, fc, getattr(fc, "update_flops", 0))

    @staticmethod
    def _add_cache_flops(st: ContextState, fc, flops: int) -> None:
        # the kernels cover every k, so on the Triton backend torch's FLOP counter sees none of these
        st.call_cache_flops += flops

    def _adopt(self, name, fb) -> None:
        """A feature's basis, built online from the first full steps, joins the model's basis."""
        from .basis import Basis

        self.bases[name] = fb
        self.ranks[name] = fb.rank(self.cfg.tau, self.cfg.rank)
        if self.basis is None and set(self.bases) >= set(self.feature_dims):
            meta = {"model_class": self.model_class, "source": "online", "tau": self.cfg.tau}
            if self.cfg.subspace == "change":  # the online SVD of changes stands for both
                self.basis = Basis(dict(self.bases), meta, changes=dict(self.bases))
            else:
                self.basis = Basis(dict(self.bases), meta)

    def forecast(self, name: str, *, x=None, gate=None, out=None):
        st = self._state
        fc = st.features.get(name, _MISSING)
        if fc is _MISSING:  # ready implies every feature was updated (or is unread: none held)
            if name in self.unread:
                return None
            raise RuntimeError(f"svdcache: no cached state for feature {name!r} on a cached step")
        if fc is None:
            return None
        if x is not None and fc.shape is not None and x.shape != fc.shape:
            # a stream that enters a block with batch 1 and leaves it broadcast to the batch (FLUX's
            # text stream with one negative prompt for a batch of images)
            if out is not None and out is not x and tuple(out.shape) == fc.shape:
                x = out.copy_(x)  # broadcast into the output buffer, then in place
            else:
                x = x.expand(fc.shape).contiguous()
        if fc.relative:  # the unconditional branch: F_cond of the step + D_hat
            merged = guidance.forecast(st, name, fc, x, gate, out)
            if merged is not None:
                st.call_cache_flops += merged[1]
                return merged[0]
            xc, flops = guidance.base_input(st, name, fc, x, gate, out)
            if xc is None:
                raise RuntimeError(f"svdcache: the conditional branch holds no feature {name!r} for this step")
            if x is None:
                gate = out = None
            x = xc
            st.call_cache_flops += flops
        res = fc.forecast(st.t, x=x, gate=gate, out=out)
        st.call_cache_flops += fc.forecast_flops
        return res

    def buffer(self, key: str, shape, dtype, device) -> torch.Tensor:
        """A work tensor for cached block outputs, reused by every cached call (one per key; replaced
        when the shape, dtype or device changes). Only cached forwards write it, and what they
        return from it is consumed by the next block of the same call."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    # -- statistics --------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        total = RunStats()
        total.add(self.total)
        total.add(self.cur)
        running = bool(self.cur.calls)
        return CacheStats(
            config=self.cfg.label,
            last_generation=self.cur if running else self.last,
            total=total,
            generations=self.generations + running,
            ranks=dict(self.ranks),
            online_basis_seconds=self.online.seconds if self.online else 0.0,
            online_basis_flops=self.online.flops if self.online else 0,
            graphs=self.graphs.stats.as_dict() if self.graphs is not None else None,
        )
