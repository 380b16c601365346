"""The step decision of one transformer call: which context and generation it belongs to, and whether it
is computed in full or forecast (the schedule, readiness, true-CFG sharing, fallbacks)."""
from __future__ import annotations

import logging
import sys
import weakref

import torch

from . import guidance
from .accounting import Accounting
from .distributed import sees_shards
from .guards import CONTINUATION_TOL, continuation_residual, refuse_foreign_cache
from .schedule import Schedule
from .state import ContextState, DefaultContextStateManager

logger = logging.getLogger("svdcache")

BARE, BARE_SECOND = "default", "default#2"  # a bare loop's states: its first and its second call of a step
# the transformer's timestep argument: diffusers' name, and those of HiDream, Z-Image, Cosmos 3
TIMESTEP_ARGS = ("timestep", "timesteps", "t", "vision_timesteps")


def _version(t: torch.Tensor):
    """The tensor's version counter (bumped by every in-place change), None where it has none (inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _differs(a, b) -> bool:
    """Two calls' conditions differ (another tensor of other values; a missing one differs from nothing)."""
    if a is b or a is None or b is None:
        return a is not b and not (a is None and b is None)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return True
    return a.shape != b.shape or not bool(torch.equal(a, b))


def first_tensor(out):
    """The call's main output tensor (a tensor, the first of a tuple, or ``.sample``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    return getattr(out, "sample", None)


def timestep_value(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None  # one host sync per call
    return float(t)


class StepDecider:
    """Per call: the context's state, its generation (new or continued) and the call's mode, "full" or
    "cached" (``st.mode``). Also what ends a generation, and the fallback to full compute."""

    def __init__(self, cfg, schedule: Schedule, acct: Accounting, states: DefaultContextStateManager, warn_once,
                 root_name: str, choice_form: str | None = None):
        self.cfg = cfg
        # the guidance form the applied choice was made for ("two calls per step" / "one call per step"):
        # a run of the other form is told once (the choice may lose there: calibrate the way you generate)
        self.choice_form = choice_form
        self.schedule = schedule
        self.acct = acct
        self.states = states
        self.warn_once = warn_once
        self.root_name = root_name  # the root hook's name in the model's registry (what sees_shards looks for)
        self.pipeline = None  # weakref to the pipeline enable was given (its scheduler: the step count of each run)
        self.caller = None  # weakref to the pipeline whose call is in progress (found at a context's first call)
        self.model = None  # weakref to the transformer (to see another cache added after enable)
        self.explicit = 0  # > 0 inside ``with svdcache.generation(model)``: one generation, no guessing
        self.shares = False  # the unconditional branch found the conditional one this generation (guidance)
        self._last_bare = None  # (state name, input, its version, timestep) of the last call outside a cache_context

    # -- generations -----------------------------------------------------------------------------------
    def finish_generation(self) -> None:
        self.acct.finish_generation()
        self.shares = False

    def start_generation(self, st: ContextState, ctx_name: str) -> None:
        """A context starts a generation; when one that already took part in the current generation
        starts again, the current generation is over (cond and uncond share one generation)."""
        st.new_generation()
        if ctx_name in self.acct.contexts:
            self.finish_generation()
        self.acct.contexts.add(ctx_name)

    def new_generation(self) -> None:
        """Forget every context's state: the next call starts a new generation."""
        for st in self.states.states():
            st.new_generation()

    # -- the decision ----------------------------------------------------------------------------------
    def decide(self, args, kwargs) -> ContextState:
        cfg = self.cfg
        st = self.states.get_state()
        ctx = self.states.context
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ehs = kwargs.get("encoder_hidden_states")
        sig = (
            tuple(hs.shape) if isinstance(hs, torch.Tensor) else None,
            tuple(ehs.shape) if isinstance(ehs, torch.Tensor) else None,
            getattr(hs, "dtype", None),
            getattr(hs, "device", None),
            # states made under torch.inference_mode cannot be updated in place outside it: a switch
            # starts the context over, as a shape change does
            torch.is_inference_mode_enabled(),
        )
        timestep = next((kwargs[k] for k in TIMESTEP_ARGS if kwargs.get(k) is not None), None)
        if st.step < 0:  # a context's first call (a pipeline call starts: pipelines reset the states at their end)
            self.caller = self.calling_pipeline()
        num_steps = ctx.num_inference_steps or self.scheduler_steps() or cfg.num_inference_steps
        skip_read = cfg.time_axis == "step" and self._skip_timestep_read(timestep, hs, ctx, num_steps)
        t_raw = None if skip_read else timestep_value(timestep)
        bare = not self.states.context_is_set and isinstance(hs, torch.Tensor) and not skip_read
        ctx_name = ctx.name
        if not self.states.context_is_set and isinstance(hs, torch.Tensor):
            st, ctx_name = self._bare_branch(st, hs, ehs, t_raw)
        st.name = ctx_name
        if st.signature is not None and sig != st.signature:
            logger.info("svdcache: input shape/dtype/device/inference mode changed (%s -> %s): state reset, computing in full",
                        st.signature, sig)
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
            model = self.model() if self.model is not None else None
            if model is not None:
                refuse_foreign_cache(model)  # e.g. model.enable_cache(FirstBlockCacheConfig()) after enable
            self.start_generation(st, ctx_name)
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
        shared = cfg.uncond_interval > 1 and self.shares
        full = self.schedule.is_full(st.step, num_steps, shared)
        st.mode = "full" if (full or not st.ready) else "cached"
        st.shared = False
        if cfg.uncond_interval > 1:  # true CFG: the unconditional branch from the conditional one
            if guidance.decide(st, ctx_name, cfg.uncond_interval, self.states.state_of(guidance.PRIMARY)):
                self.shares = True  # from the next step on, the schedule of a shared run (its own plans)
        if self.choice_form is not None:
            self._check_form(ctx_name, st.step)
        st.updated = set()
        st.call_cache_flops = 0
        st.call_torch_flops = 0  # the share of call_cache_flops that ran as PyTorch ops on the Triton backend
        if st.mode == "cached" and st.finite_flag is not None:
            self._check_state_flag(st)
        return st

    def _check_form(self, ctx_name: str, step: int) -> None:
        """Warn once where the run's guidance form is not the one the choice was made for: a second branch
        (the "uncond" context, or a bare loop's second call of a step) under a one-call choice, or none by
        the third step under a two-call choice."""
        second = ctx_name == guidance.SECONDARY or ctx_name.endswith("#2")
        two = self.choice_form.startswith("two")
        if second and two:
            self.choice_form = None  # the run's form is the choice's: nothing more to check
            return
        if second:
            run = "two calls per step (true CFG)"
        elif two and step >= 2:
            run = "one call per step"
        else:
            return
        self.warn_once("guidance form", f"svdcache: the basis's configuration was chosen for {self.choice_form}, but this "
                       f"run makes {run}: it may lose to the safe configuration here; calibrate the way you generate "
                       "(or choice='off')")
        self.choice_form = None  # told once: no more checks

    def _bare_branch(self, st: ContextState, hs: torch.Tensor, ehs, t_raw) -> tuple[ContextState, str]:
        """A loop calling the transformer twice per step outside any ``cache_context`` (classifier-free
        guidance as two calls): the second call of a step - the same latent as the call just before it
        (the same tensor, or, where the timestep is read, the same timestep and values) with another
        condition (text) - gets a state of its own, as a pipeline's "uncond" context does; mixed into one
        history the two branches would be forecast from each other (a 24 dB image where either branch
        alone gives 45). The same latent with the same condition is a repeat (a new generation), as before."""
        last = self._last_bare
        version = _version(hs)
        second = False
        if last is not None and last[0] == BARE:
            prev, prev_version, prev_t, prev_ehs = last[1], last[2], last[3], last[4]
            if t_raw is not None:  # the timestep read: the same one, and the same values
                second = prev_t == t_raw and (
                    (hs is prev and version is not None and version == prev_version)
                    or (st.traj_x is not None and st.traj_x.shape == hs.shape and bool(torch.equal(st.traj_x, hs))))
            else:  # not read (no host sync on a GPU): the same tensor, not changed in place since
                second = hs is prev and version is not None and version == prev_version
            second = second and _differs(ehs, prev_ehs)
        name = BARE_SECOND if second else BARE
        self._last_bare = (name, hs, version, t_raw, ehs)
        return (self.states.named_state(name) if second else st), name

    def track(self, st: ContextState, out) -> None:
        """A bare loop's call ended: keep its last two outputs (see continuation_residual)."""
        if st.traj_x is not None:
            o = first_tensor(out)
            o = o.detach().clone() if isinstance(o, torch.Tensor) else None
            # a loop of two calls per step steps its latent with both branches' outputs: each branch's
            # continuation check sees both (the other branch's state gets this output too)
            first, second = self.states.state_of(BARE), self.states.state_of(BARE_SECOND)
            other = second if st is first else first if st is second else None
            for s in (st, other) if other is not None and other.traj_x is not None else (st,):
                s.traj_out = (s.traj_out + [o])[-2:] if o is not None else []

    def restart_histories(self) -> None:
        """Every context's feature histories start over (they hold features of modules since replaced):
        from the full call in progress on, as after a fallback."""
        for st in self.states.states():
            st.drop_caches()
            st.ready = False
            st.hist = 0

    # -- fallbacks -------------------------------------------------------------------------------------
    def fall_back(self, st: ContextState, what: str, key: str = "fallback") -> None:
        """A non-finite forecast or state (or another reason, ``key``): drop the context's caches and
        compute this step in full."""
        msg = f"svdcache: {what} is not finite; this step is computed in full" if key == "fallback" else f"svdcache: {what}"
        self.warn_once(key, msg + " (warned once)")
        self.acct.cur.fallbacks += 1
        st.drop_caches()
        st.ready = False
        st.hist = 0
        st.mode = "full"

    @staticmethod
    def device_side(t) -> bool:
        """Reading ``t`` on the host would wait for the device (a GPU tensor)."""
        return isinstance(t, torch.Tensor) and t.device.type != "cpu"

    @staticmethod
    def states_finite(st: ContextState):
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
            self.fall_back(st, "a cached state")

    def checks_output(self, o) -> bool:
        """A cached call's output is read back for the finiteness check (CPU outputs; on a GPU the
        states were checked at the full step)."""
        return self.cfg.check_finite and not self.sync_free(o) and not self.device_side(o)

    def sync_free(self, t) -> bool:
        return self.cfg.sync_free and isinstance(t, torch.Tensor) and t.is_cuda

    # -- what the call says about itself -----------------------------------------------------------------
    def _skip_timestep_read(self, timestep, hs, ctx, num_steps) -> bool:
        """The timestep is read (restart detection) where it is free: a CPU value. On a GPU it is
        read only when nothing else says where a generation starts: no step index, no step count
        (config or the pipeline's scheduler) and no pipeline context (pipelines reset the cache at
        the end of each call). ``sync_free`` never reads it."""
        if self.cfg.sync_free and self.device_side(hs):
            return True
        if not self.device_side(timestep):
            return False
        return ctx.step_index is not None or num_steps is not None or self.states.context_is_set

    def calling_pipeline(self, depth: int = 48):
        """A weakref to the pipeline whose call this is: the nearest caller frame whose ``self`` holds this
        transformer as a component and has a scheduler (a second pipeline sharing the transformer, e.g.
        ``FluxPipeline(**pipe.components)``, runs with its own scheduler); None where there is none."""
        model = self.model() if self.model is not None else None
        f = sys._getframe(1)
        for _ in range(depth):
            f = f.f_back
            if f is None or model is None:
                return None
            co = f.f_code
            if not co.co_argcount or co.co_varnames[0] != "self":
                continue
            obj = f.f_locals.get("self")
            if isinstance(obj, torch.nn.Module) or getattr(obj, "scheduler", None) is None:
                continue
            for name in ("transformer", "transformer_2"):
                tr = getattr(obj, name, None)
                if tr is not None and getattr(tr, "_orig_mod", tr) is model:  # (torch.compile's wrapper)
                    try:
                        return weakref.ref(obj)
                    except TypeError:
                        return lambda obj=obj: obj
        return None

    def scheduler_steps(self) -> int | None:
        """Transformer calls per context in this run, from the scheduler of the pipeline running it (or of
        the one enable was given), read at each call: a scheduler replaced after enable is the one used
        (host-side, no sync)."""
        ref = self.caller or self.pipeline
        sched = getattr(ref() if ref is not None else None, "scheduler", None)
        ts = getattr(sched, "timesteps", None)
        if ts is None:
            return None
        n = len(ts) - int(getattr(sched, "begin_index", None) or 0)
        want = self.cfg.num_inference_steps
        if want is not None and n > 0 and want != n:
            self.warn_once("steps", f"svdcache: num_inference_steps={want} in the config, but the pipeline runs "
                           f"{n} steps; using {n} (warned once)")
        return n if n > 0 else None

    def _input_is_shard(self) -> bool:
        """Context parallelism split the input before this hook (a value-based decision would then
        differ between ranks and desynchronise their collectives): see svdcache.runtime.distributed."""
        model = self.model() if self.model is not None else None
        return model is not None and getattr(model, "_parallel_config", None) is not None and sees_shards(model, self.root_name)

