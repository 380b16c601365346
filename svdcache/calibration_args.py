"""``svdcache.calibrate``'s arguments, checked before any work: each refusal is one line naming the
argument and the fix (a calibration that cannot give a usable basis is refused here, not by ``enable``
after the reference generation ran)."""
from __future__ import annotations

import numbers

from .hooks.registry import transformers
from .runtime.guards import refuse_foreign_cache, refuse_non_denoiser

GRANULARITIES = ("auto", "module", "submodule", "block")


def _bad(what: str) -> ValueError:
    return ValueError(f"svdcache.calibrate: {what}")


def _fraction(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 < float(v) <= 1.0:
        raise _bad(f"{name} must be a number in (0, 1], got {v!r}")


def check_calibrate_args(target, num_inference_steps=50, steps=None, granularity="auto", run=None, tau=0.99,
                         store_tau=0.999) -> None:
    """Raise (one line) before any work where ``calibrate`` could not give a usable basis.

    - the model: a denoiser (not a pipeline's text encoder) without another diffusers cache on it (its
      skipped or forecast steps would be calibrated as computed ones);
    - ``granularity``: one of :data:`GRANULARITIES`; ``tau`` / ``store_tau`` in (0, 1];
    - the steps: the change subspace (what ``enable`` forecasts with by default) is learned from the
      differences of consecutive steps, so a pipeline run needs ``num_inference_steps >= 2`` and ``steps``
      (the step indices whose features enter the basis) two consecutive indices, each within the run
      (``num_inference_steps`` calls per context, times the scheduler's order; with ``run=``, the
      run's own length is not known before it runs and only the indices' form is checked).
    """
    for model in transformers(target):
        refuse_non_denoiser(model)
        refuse_foreign_cache(model)
    if granularity not in GRANULARITIES:
        raise _bad(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    _fraction("tau", tau)
    _fraction("store_tau", store_tau)
    calls = None
    if run is None:
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
            raise _bad(f"num_inference_steps must be an integer >= 2 (the change subspace is learned from "
                       f"consecutive steps), got {n!r}")
        order = getattr(getattr(target, "scheduler", None), "order", 1)
        calls = int(n) * (order if isinstance(order, int) and not isinstance(order, bool) and order > 0 else 1)
    if steps is None:
        return
    try:
        idx = sorted(set(steps))
    except TypeError:
        raise _bad(f"steps must be step indices (integers >= 0), got {steps!r}") from None
    if not idx or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in idx):
        raise _bad(f"steps must be step indices (integers >= 0), got {steps!r}")
    if calls is not None and idx[-1] >= calls:
        raise _bad(f"steps holds index {idx[-1]}, past the run's last step {calls - 1} "
                   f"(num_inference_steps={num_inference_steps}, indices from 0)")
    if not any(b == a + 1 for a, b in zip(idx, idx[1:])):
        raise _bad(f"steps={idx} holds no two consecutive indices: the change subspace is learned from "
                   "consecutive steps; add the step after one of them")
