"""Runtime guards: another diffusers cache on the same model, a model that is no denoiser, concurrent use
from two threads, and whether a bare loop's next input continues the trajectory (or is a new generation)."""
from __future__ import annotations

import torch

# diffusers' step-skipping caches (their hook names in diffusers 0.42): stacked with SVD-Cache both
# would skip or forecast the same work, with each other's outputs as inputs (silently wrong images)
FOREIGN_CACHE_HOOK_PREFIXES = ("fbc_", "faster_cache", "mag_cache", "pyramid_attention_broadcast", "sea_cache",
                               "taylorseer")


def foreign_cache(model: torch.nn.Module) -> str | None:
    """The name of another cache enabled on ``model`` (``model.enable_cache(...)`` or a diffusers
    cache hook registered by hand on any submodule), or None."""
    cfg = getattr(model, "_cache_config", None)
    if cfg is not None:
        return type(cfg).__name__
    for m in model.modules():
        reg = m.__dict__.get("_diffusers_hook")  # a plain attribute: no Module.__getattr__ miss per module
        hooks = getattr(reg, "hooks", None)
        if not hooks:
            continue
        for name in hooks:
            if name.startswith(FOREIGN_CACHE_HOOK_PREFIXES):
                return f"diffusers hook {name!r}"
    return None


def refuse_foreign_cache(model: torch.nn.Module) -> None:
    found = foreign_cache(model)
    if found is not None:
        raise ValueError(
            f"svdcache: another cache ({found}) is enabled on this {type(model).__name__}; two caches on one "
            "transformer give wrong images: disable it first (transformer.disable_cache()) or use only one"
        )


def refuse_non_denoiser(model: torch.nn.Module) -> None:
    """A model of the transformers library (a pipeline's text encoder) is no denoiser: its calls carry no
    timestep and no generation, and its blocks would be planned as a transformer's."""
    if any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__):
        raise TypeError(
            f"svdcache: {type(model).__name__} is a transformers model (a text encoder), not a diffusion "
            "transformer: enable the pipeline or its denoiser (svdcache.enable(pipe) or pipe.transformer)")


def concurrent_use_error(model_class: str) -> RuntimeError:
    return RuntimeError(
        f"svdcache: this {model_class} is called from two threads at once; SVD-Cache keeps one state per model, "
        "so concurrent generations would mix: use one transformer per thread, or serialise the calls (a lock)"
    )


CONTINUATION_TOL = 0.2  # residual share of a new input that the last inputs/outputs cannot explain


def _rows(t: torch.Tensor, B: int, n: int) -> torch.Tensor | None:
    if not isinstance(t, torch.Tensor) or t.shape[0] != B:
        return None
    r = t.detach().reshape(B, -1)
    if r.shape[1] == 2 * n:  # models that also predict a variance (PixArt, DiT): the first half
        r = t.detach()[:, : t.shape[1] // 2].reshape(B, -1)
    return r if r.shape[1] == n else None


@torch.no_grad()
def continuation_residual(x_prev: torch.Tensor, outs: list[torch.Tensor], x: torch.Tensor) -> float | None:
    """How much of the new input ``x`` is NOT a linear combination (per sample) of the last input and
    the last two outputs of every sample (first- and second-order samplers, classifier-free guidance
    batched or not); 0 for a continuation of the trajectory, ~1 for fresh noise. None if unknown."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape != getattr(x_prev, "shape", None):
        return None
    B = x.shape[0]
    n = x[0].numel()
    cols = [_rows(o, B, n) for o in outs]
    cols = [c for c in cols if c is not None]
    if not cols or n < 4 * (1 + B * len(cols)):
        return None
    y = x.detach().reshape(B, -1).double()
    shared = torch.cat(cols, 0).double()  # (B * len(outs), n): any sample's outputs may enter (CFG)
    worst = 0.0
    for b in range(B):
        A = torch.cat([x_prev[b].reshape(1, -1).double(), shared], 0)  # (m, n)
        G = A @ A.T
        rhs = A @ y[b]
        c = torch.linalg.lstsq(G, rhs.unsqueeze(1)).solution.squeeze(1)
        res = y[b] - c @ A
        yn = float(y[b].norm())
        if yn > 0:
            worst = max(worst, float(res.norm()) / yn)
    return worst
