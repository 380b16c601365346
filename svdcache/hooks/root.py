"""The root hook on the transformer: one transformer call is begin -> decide -> run -> end.

- begin: one call at a time (a second thread is refused), the adapters' refusals, the step decision
  (svdcache.runtime.decider: context, generation, full or cached);
- run: the model's forward (counted once per kind of call for the FLOPs table), or a cached call replayed
  from a CUDA graph (svdcache.fastpath.graphs);
- end: a cached call's output checked (a non-finite one is recomputed in full), a full call's features
  recorded (svdcache.runtime.store; in bulk where a capture plan holds: svdcache.fastpath.batched_update),
  the call accounted (svdcache.runtime.accounting).

Under torch.compile the model's own compute is traced; the decision, the bookkeeping and the cache ops run
eagerly behind graph breaks, so no per-step Python value (step offsets, weights) is baked into a graph.
"""
from __future__ import annotations

import logging
import threading
import warnings
import weakref

import torch
from diffusers.hooks import ModelHook

from svdcache_kernels import resolve_backend

from .. import choice
from ..fastpath.batched_update import capture_plan, flush_updates, record_captured
from ..fastpath.deferred import DeferredSum
from ..fastpath.graphs import StepGraphs, pin_anchors
from ..runtime.accounting import Accounting
from ..runtime import decider as step
from ..runtime.decider import StepDecider
from ..runtime.flops import count_flops
from ..runtime.guards import concurrent_use_error
from ..runtime.schedule import Schedule
from ..runtime.state import ContextState, DefaultContextStateManager
from ..runtime.stats import CacheStats
from ..runtime.store import FeatureStore
from . import ROOT_HOOK
from .registry import children_clock, feature_dims, replan, watch_of

logger = logging.getLogger("svdcache")


class SVDCacheHook(ModelHook):
    """Root hook on the transformer; the controller its block hooks report to (see hooks.block)."""

    _is_stateful = True

    def __init__(self, config, basis, feature_dims: dict[str, int], model_class: str,
                 granularity: str = "auto", schedule_basis=None):
        super().__init__()
        self.cfg = config
        self.granularity = granularity
        self.model_class = model_class
        self.state_manager = DefaultContextStateManager(ContextState)
        self._warned: set[str] = set()
        self.store = FeatureStore(config, basis, feature_dims, model_class, self.warn_once)
        self.acct = Accounting(config.count_flops, granularity)
        schedule = Schedule(config, basis if schedule_basis is None else schedule_basis)  # full space: plans only
        choice = (basis.meta.get("choice") or {}) if basis is not None and config.chosen else {}
        self.decider = StepDecider(config, schedule, self.acct, self.state_manager, self.warn_once, ROOT_HOOK,
                                   choice_form=choice.get("guidance"))
        self.state: ContextState | None = None  # the context state of the call in progress
        # gated forecasts of the cached call in progress, summed at its last block (fast paths: svdcache.fastpath)
        self.deferred_sum = DeferredSum(config.fast_path("deferred_sum") != "off", config.fast_path("arenas"))
        self.traced: list = []  # (block hook, feature, F) recorded inside a compiled graph, for the end of the call
        self.captures: list = []  # the capture hooks pointing here (hooks.registry.install)
        self.sink: list | None = None  # [capture hook, output, ...] of the eager full call in progress
        self.call_checks: list = []  # adapters that refuse some calls (check_call), run at the start of a call
        self._children = children_clock()  # child modules set anywhere (see _follow_model)
        self._children_seen = self._children[0]
        self._lock = threading.Lock()  # held for the length of a call: a second thread's call is refused
        self._owner = None  # the thread holding it
        # cached steps replayed from CUDA graphs (svdcache.fastpath.graphs); None: eager (off CUDA, or not asked for)
        self.graphs = StepGraphs() if config.cuda_graphs and torch.cuda.is_available() else None
        if config.cuda_graphs and self.graphs is None:
            logger.info("svdcache: cuda_graphs=True needs CUDA; cached steps run eagerly")

    # -- what the rest of the runtime reads --------------------------------------------------------------
    @property
    def feature_dims(self) -> dict:
        return self.store.feature_dims

    @property
    def basis(self):
        return self.store.basis

    @property
    def cur(self):
        """The counts of the generation in progress."""
        return self.acct.cur

    @property
    def total(self):
        return self.acct.total

    @property
    def generations(self) -> int:
        return self.acct.generations

    def stats(self) -> CacheStats:
        s = self.acct.stats(self.cfg.label, self.store.ranks, self.store.online, self.graphs)
        basis = self.store.basis
        s.choice = choice.describe(basis.meta.get("choice") if basis is not None else None, self.cfg.interval,
                                   self.cfg.chosen)
        return s

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=5)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def initialize_hook(self, module):
        # the model's own FLOPs per kind of call: kept on the model, so a re-enable does not count again
        self.acct.bind_model(module)
        self.decider.model = weakref.ref(module)  # to see another cache added after enable
        return module

    def reset_state(self, module):
        self.decider.finish_generation()
        self.state_manager.reset()
        return module

    def new_generation(self) -> None:
        """Forget every context's state: the next call starts a new generation."""
        self.decider.new_generation()

    def begin_explicit(self) -> None:
        """``with svdcache.generation(model)``: one generation from here until :meth:`end_explicit`."""
        self.decider.new_generation()
        self.decider.finish_generation()
        self.decider.explicit += 1

    def end_explicit(self) -> None:
        self.decider.explicit -= 1
        self.decider.new_generation()  # the next call, inside or outside a block, starts a new generation
        self.decider.finish_generation()

    @property
    def busy(self) -> bool:
        """A call is in progress (its lock is held)."""
        return self._lock.locked()

    def mode(self):
        st = self.state
        return None if st is None else st.mode

    # -- what block hooks call ------------------------------------------------------------------------
    @torch.compiler.disable
    def declare(self, name: str, D: int | None) -> None:
        self.store.declare(name, D)

    @torch.compiler.disable
    def forget(self, name: str) -> None:
        """A feature declared earlier that full steps no longer produce (see FeatureStore.forget)."""
        self.store.forget(name, self.state_manager.states())

    def record_eager(self, name: str, F) -> None:
        self.store.record(self.state, name, F, self.state.name)

    record = torch.compiler.disable(record_eager)  # a graph break under torch.compile

    def forecast(self, name: str, *, x=None, gate=None, out=None):
        return self.store.forecast(self.state, name, x=x, gate=gate, out=out)

    def buffer(self, key: str, shape, dtype, device) -> torch.Tensor:
        return self.store.buffer(key, shape, dtype, device)

    # -- the call ------------------------------------------------------------------------------------
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
        # at the end of the call, where the state's capture plan holds (svdcache.fastpath.batched_update)
        self.sink = [] if st.mode == "full" and st.capture_plan is not None and st.partner is None else None
        try:
            # a cached call replayed (or captured) from a CUDA graph; None: run eagerly
            out = self.graphs.run(self, st, args, kwargs) if self.graphs is not None and st.mode == "cached" else None
            if out is not None:
                pass
            elif self.acct.wants_count(st):
                out, counted = count_flops(self.fn_ref.original_forward, *args, **kwargs)
                self.acct.store_count(st, counted, self._backend_is_torch(args, kwargs))
            else:
                out = self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self._abort(st)
            raise
        return self._end(st, out, args, kwargs)

    @torch.compiler.disable
    def _begin(self, args, kwargs) -> ContextState:
        if not self._lock.acquire(blocking=False):
            if self._owner != threading.get_ident():
                raise concurrent_use_error(self.model_class)
            if self.state is not None:  # this thread's last call raised without cleaning up (compiled)
                self.state.new_generation()
                self.state = None
            self.traced.clear()
        self._owner = threading.get_ident()
        try:
            for a in self.call_checks:
                a.check_call(kwargs)
            st = self.decider.decide(args, kwargs)
            if st.mode == "full" or self._children[0] != self._children_seen:  # (every generation starts full)
                self._follow_model(st)
            if st.mode != "cached":
                st.sum_bound = None  # the states change: no view of the old ones is kept through the step
            self.deferred_sum.clear()
            self.state = st
            return st
        except BaseException:
            self._lock.release()
            raise

    def _follow_model(self, st: ContextState) -> None:
        """Modules the hooks sit on or the adapters read were replaced since install (a LoRA layer loaded
        or unloaded after enable, a block swapped): the hooks go onto the model as it is now, every
        context's history starts over (it holds features of the old modules), this call is computed in
        full and the model's FLOPs per kind of call are counted again. Checked at every full call and at
        any call after a child module was set anywhere (a few dict reads)."""
        self._children_seen = self._children[0]
        model = self.decider.model() if self.decider.model is not None else None
        watch = None if model is None else watch_of(model)
        if watch is None or not watch.changed():
            return
        logger.info("svdcache: modules of %s were replaced since enable: its hooks are installed again", self.model_class)
        store = self.store

        def unread(blocks):
            store.unread = {f"{n}.{loc}" for n, b, a in blocks for loc in a.unread_features(b)}
            return store.unread if store.online is None else set()  # (a basis built online learns them all)

        blocks = replan(model, self, unread)
        store.feature_dims.clear()  # features learned on a full step are declared again at this one
        store.feature_dims.update(feature_dims(blocks))
        self.acct.table.clear()
        self.decider.restart_histories()
        if st.mode == "cached":
            st.mode, st.shared = "full", False

    @torch.compiler.disable
    def _eager_forward(self, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs)

    @torch.compiler.disable
    def _abort(self, st: ContextState) -> None:
        """A call that raised (another hook, a bad input, an interrupt) leaves nothing behind: its
        context starts over on the next call."""
        st.new_generation()
        st.mode = None
        self.state = None
        self.sink = None
        self.traced.clear()
        self.deferred_sum.clear()
        self._lock.release()

    @torch.compiler.disable
    def _end(self, st: ContextState, out, args, kwargs):
        decider, acct = self.decider, self.acct
        try:
            if self.traced:  # features a compiled full step handed out
                items = list(self.traced)
                self.traced.clear()
                for bh, local, F in items:
                    bh.record(local, F)
            pending = bool(self.deferred_sum.items)
            self.deferred_sum.clear()  # first: a full forward below must see the model as it is
            if st.mode == "cached" and pending:
                # terms deferred to a last block that never summed them: the output lacks them
                decider.fall_back(st, "the model's forward did not reach the block that sums the deferred forecasts;"
                                  " this step is computed in full", key="deferred")
                st.call_cache_flops = st.call_torch_flops = 0
                out = self.fn_ref.original_forward(*args, **kwargs)
            if st.mode == "cached":
                o = step.first_tensor(out)
                # a GPU output is not read back per step: its states were checked at the full step
                o = o if decider.checks_output(o) else None
                if o is None or bool(torch.isfinite(o).all()):
                    acct.cur.cached_steps += 1
                    acct.cur.shared_steps += st.shared
                    acct.account(st)
                    decider.track(st, out)
                    if st.capture_plan is None and st.sum_arena and not st.plan_tried and self.store.batched:
                        # the arenas exist from the first cached call: the next full step records in bulk
                        st.plan_tried = True
                        st.capture_plan = capture_plan(st, self.captures)
                    return out
                decider.fall_back(st, "a forecast")
                st.call_cache_flops = st.call_torch_flops = 0
                out = self.fn_ref.original_forward(*args, **kwargs)
            sink, self.sink = self.sink, None
            if sink:
                record_captured(self, st, sink)
            if st.pending_updates:  # the held updates of small features, batched per arena
                if flush_updates(self, st) and sink is None:
                    st.capture_plan = capture_plan(st, self.captures)
            if self.graphs is not None:
                pin_anchors(st)  # where the next interval's graph finds them
            acct.cur.full_steps += 1
            st.plan_tried = False  # (one try at the next cached call, where the plan was not learnt here)
            acct.account(st)
            st.hist = min(st.hist + 1, 3)
            st.ready = self.store.all_updated(st)
            st.finite_flag = None
            if st.ready and self.cfg.check_finite and not self.cfg.sync_free and decider.device_side(step.first_tensor(out)):
                st.finite_flag = decider.states_finite(st)
            acct.measure_memory(self.state_manager.states())
            decider.track(st, out)
            return out
        except BaseException:
            st.new_generation()  # e.g. the fallback's full forward raised: no partial state is kept
            raise
        finally:
            self.deferred_sum.clear()  # nothing an adapter changed for the call outlives it
            self.sink = None
            self.state = None
            st.mode = None
            self._lock.release()

    def _backend_is_torch(self, args, kwargs) -> bool:
        hs = kwargs.get("hidden_states", args[0] if args else None)
        return not isinstance(hs, torch.Tensor) or resolve_backend(self.cfg.backend, hs) == "torch"
