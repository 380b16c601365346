"""True classifier-free guidance: the unconditional branch forecast from the conditional one.

Pipelines with true CFG call the transformer twice per step, in the cache contexts "cond" and then
"uncond" (diffusers' FLUX true-CFG, Wan, Qwen-Image, ... pipelines). The branches see the same
latent, and the difference of their features moves far less between full steps than either
feature does (on the embedded model its order-1 forecast error is 3-17x smaller than the
unconditional feature's own over the same distance, image stream). So with ``uncond_interval=m`` the
unconditional branch is computed only at every m-th full step of the conditional one: its feature
caches hold the difference D = F_uncond - F_cond (F_cond: the conditional feature of the same step,
computed or forecast), and its forecast is F_cond of the step plus D's forecast. A full step of the
conditional branch alone costs one transformer call instead of two.

Safe by construction: a feature is held as a difference only when the conditional branch ran the same
step just before with a feature of the same shape; otherwise (another call order, a batch-1 negative
prompt stream, no "cond" context) it is cached on its own, and an unconditional call is forecast from
the conditional branch only when every one of its features is held as a difference.
"""
from __future__ import annotations

PRIMARY, SECONDARY = "cond", "uncond"


def decide(st, ctx_name: str, m: int, primary) -> bool:
    """After the schedule set ``st.mode`` for this call: book the conditional branch's full calls, find
    the unconditional branch's partner (``primary``: the conditional context's state) and turn its full
    call into a forecast where due. True where the unconditional branch found its partner (the run
    shares it)."""
    st.partner = None
    if ctx_name == PRIMARY:
        if st.mode == "full":
            st.full_calls += 1
            st.last_full = st.step
        return False
    if m <= 1 or ctx_name != SECONDARY:
        return False
    p = primary
    if p is None or p.step != st.step or not p.ready or _latent(p.signature) != _latent(st.signature):
        return False  # the conditional branch did not run this step first (or not on a latent of this layout)
    st.partner = p
    if st.mode != "full" or not st.ready or p.last_full != st.step:
        return True
    if (p.full_calls - 1) % m == 0:
        return True  # this full step computes both branches (and renews the differences)
    if st.features and all(getattr(fc, "relative", False) or fc is None for fc in st.features.values()):
        st.mode = "cached"
        st.shared = True
    return True


def _latent(sig):
    # (shape, dtype, device) of hidden_states: the text stream may differ (a batch-1 negative prompt)
    return None if sig is None else (sig[0], sig[2], sig[3])


def difference(st, name: str, F):
    """What the unconditional branch's cache stores for ``F``: (F - F_cond, True) where the conditional
    branch holds the same feature of this step, else (F, False)."""
    p = st.partner
    pc = None if p is None else p.features.get(name)
    if pc is None or pc.shape is None or tuple(pc.shape) != tuple(F.shape) or p.step != st.step:
        return F, False
    return F - conditional(pc, p.t), True


def conditional(pc, t: float):
    """The conditional feature at its step ``t``: the computed one at a full step, else its forecast
    (the same values the conditional call used). Never written to: it may be the cache's anchor."""
    return pc.forecast(t)


def forecast(st, name: str, fc, x, gate, out):
    """The unconditional forecast x + gate * (F_cond_hat + D_hat) of a difference-form feature in two
    passes and one k-dim matmul: both caches hold their forecasts in the coefficients of the same
    basis, so the conditional branch's and the difference's Taylor terms are summed in k dims and
    reconstructed once (the conditional call's forecast is not recomputed in full). Returns (output,
    cache FLOPs), or None where the two are not of that form (the caller then forecasts F_cond apart)."""
    from ..features import SubspaceCache
    from svdcache_kernels.ops.reconstruct.reference import MAX_TERMS

    p = st.partner
    pc = None if p is None else p.features.get(name)
    if pc is None or p.step != st.step or not isinstance(pc, SubspaceCache) or not isinstance(fc, SubspaceCache):
        return None
    if pc.V is not fc.V:
        return None
    a, b = pc.forecast_terms(p.t), fc.forecast_terms(st.t)
    if a is None or b is None:
        return None
    terms = [u for u, w in zip(a[0], a[1]) if w != 0.0]  # at the conditional branch's full step: none
    weights = [w for w in a[1] if w != 0.0]
    own = len(terms)
    bt = [(u, w) for u, w in zip(b[0], b[1]) if w != 0.0]
    if own + len(bt) > MAX_TERMS:  # both at order 2: D's terms summed first (k <= 2 values per token)
        P = bt[0][0] * bt[0][1]
        for u, w in bt[1:]:
            P.add_(u, alpha=w)
        bt = [(P, 1.0)]
    terms += [u for u, _ in bt]
    weights += [w for _, w in bt]
    a_q = a[2] if a[2] is not None and a[3] != 0.0 else None
    b_q = b[2] if b[2] is not None and b[3] != 0.0 else None
    g, o = (gate, out) if x is not None else (None, None)  # no x: the feature itself, in new tensors
    # pass 1: x + gate * (D_last + s * dR_D), no matmul
    y = fc.R if x is None and b_q is None else fc.reconstruct((), (), None, b[3] if b_q is not None else 0.0,
                                                              x, g, o, dRq=b_q)
    # pass 2: + gate * (F_cond_last + (summed terms) V^T + s * dR_cond)
    if not terms and a_q is None:  # the conditional feature is its anchor (its full step)
        return (y + pc.R if x is None else pc.reconstruct((), (), None, 0.0, y, g, o)), 0
    res = pc.reconstruct(terms, weights, None, a[3] if a_q is not None else 0.0, y, g, o,
                          dRq=a_q, foreign=tuple(terms[own:]))
    return res, (pc.reconstruct_flops() if terms else 0)


def base_input(st, name: str, fc, x, gate, out):
    """The unconditional forecast of a difference-form feature is x + gate * (F_cond + D_hat): fold
    x + gate * F_cond into the input the feature's own forecast then adds gate * D_hat to (with no
    ``x``: F_cond itself). Returns (input, forecast FLOPs of F_cond), or (None, 0) where the
    conditional feature is missing."""
    p = st.partner
    pc = None if p is None else p.features.get(name)
    if pc is None or p.step != st.step:
        return None, 0
    Fc = conditional(pc, p.t)
    flops = pc.forecast_flops
    if x is None:  # the feature itself is asked for: F_cond + D_hat
        return Fc.clone(), flops
    g = gate.unsqueeze(-2) if gate is not None and gate.dim() == x.dim() - 1 else gate
    y = x + (Fc if g is None else g * Fc)
    if out is not None:
        out.copy_(y)
        return out, flops
    return y, flops
