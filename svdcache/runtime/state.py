"""Per-context state (one per pipeline ``cache_context``: "cond", "uncond", or a default one)."""
from __future__ import annotations

from diffusers.hooks.hooks import BaseState, CacheContext, StateManager


DEFAULT_CONTEXT = CacheContext("default")


class DefaultContextStateManager(StateManager):
    """A StateManager that also serves a bare transformer called outside any ``cache_context``."""

    @property
    def context(self) -> CacheContext:
        return self._context if self._context is not None else DEFAULT_CONTEXT

    @property
    def context_is_set(self) -> bool:
        """A pipeline's ``cache_context`` is active (else the call is a bare transformer's)."""
        return self._context is not None

    def states(self):
        return list(self._state_cache.values())

    def state_of(self, name: str):
        """The state of context ``name``, None if it has none yet."""
        return self._state_cache.get(name)

    def named_state(self, name: str):
        """The state of context ``name``, made if it has none (a bare loop's second branch)."""
        st = self._state_cache.get(name)
        if st is None:
            st = self._state_cache[name] = self._state_cls(*self._init_args, **self._init_kwargs)
        return st

    def contexts(self) -> dict:
        """Context name -> state, for every context with a state."""
        return dict(self._state_cache)


class ContextState(BaseState):
    def __init__(self):
        self.name = "default"  # its context's name (a bare loop's second branch: "default#2"), set at each call
        self.signature = None
        self.generation = 0
        self._new_generation()

    def _new_generation(self) -> None:
        self.step = -1
        self.last_t = None
        self.first_t = None
        self.t = 0.0
        self.mode = None  # "full" | "cached" while a call runs
        self.shared = False  # this call is the unconditional branch forecast at a full step (guidance)
        self.finite_flag = None  # a device-side "states finite" flag of the last full step (read lazily)
        self.call_torch_flops = 0  # the share of call_cache_flops that ran as PyTorch ops (Triton backend)
        self.ready = False  # every feature holds state from a full step
        self.updated: set[str] = set()
        self.hist = 0  # full steps so far in this generation (caps at 3)
        self.traj_x = None  # bare loop: the last input and outputs, to tell a continuation from a restart
        self.traj_out: list = []
        self.call_cache_flops = 0
        self.last_full = -1  # step index of this context's last full call
        self.full_calls = 0  # full calls so far in this generation
        self.partner = None  # the conditional branch's state, while the unconditional one runs (guidance)
        self.drop_caches()

    def drop_caches(self) -> None:
        """Forget every feature's state and what is built on them (a new generation, a fallback to full
        compute)."""
        self.features = {}  # feature name -> FeatureCache (None: the stream is absent)
        self.graphs: dict = {}  # input layout -> captured cached step (svdcache.graphs): read these states
        self.graph_fruitless = 0  # captures in a row that were never replayed
        self.sum_bound = None  # what the deferred sum of a cached call reads (svdcache.deferred), until a full step
        self.sum_arena: dict = {}  # stacked storage of small features' states (svdcache.deferred)
        self.sum_arena_of: dict = {}  # id(cache) -> (its arena, its slot)
        self.pending_updates: list = []  # arenas holding full-step updates for their batch (svdcache.batched_update)
        self.capture_plan = None  # capture hook -> where its features go in the arenas (svdcache.batched_update)
        self.plan_tried = False  # a cached call since the last full step looked for a capture plan
        self.mem = None  # (cache bytes, feature bytes) once no state grows any more (hooks._measure_memory)

    def new_generation(self) -> None:
        self.generation += 1
        self._new_generation()

    def reset(self, *args, **kwargs) -> None:
        self.new_generation()
