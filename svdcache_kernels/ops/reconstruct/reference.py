"""Cached-step reconstruction, PyTorch reference: F_hat = P V^T + R (+ s dR), optional gated add.

``dR`` may also come quantized (``dR_codes`` + ``dR_scales``, the layout of
``svdcache.residual_cache.quantize_rows``): int8 codes, or 4-bit codes packed two per uint8 (element
2j in the low nibble, 2j+1 in the high one, each stored as value + 8; an odd D is padded by one
code), with one fp32 scale per row. The term is then ``dr_scale * codes * scale``, dequantized in
fp32 inside the op, so no full-size fp dR is formed.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..._checks import check_activation, check_basis, check_like, check_rows

MAX_TERMS = 3


def gate_rows_shape(R: torch.Tensor, gate: torch.Tensor) -> bool:
    """True if ``gate`` is (..., 1, D) (else it must be (..., D)); ``...`` are R's batch dims."""
    batch, D = tuple(R.shape[:-2]), R.shape[-1]
    if tuple(gate.shape) == (*batch, 1, D):
        return True
    if tuple(gate.shape) == (*batch, D):
        return False
    raise ValueError(f"gate must have shape {(*batch, 1, D)} or {(*batch, D)} to broadcast over tokens, got {tuple(gate.shape)}")


def check_quantized_dR(R, dR, dR_codes, dR_scales, dR_bits, rows: bool = True) -> None:
    """A quantized residual difference: int codes of R's row shape (4 bits: packed, last dim ceil(D/2))
    and one fp32 scale per row, (..., N, 1)."""
    if dR_codes is None and dR_scales is None:
        return
    if dR is not None:
        raise ValueError("pass either dR or its quantized form (dR_codes, dR_scales), not both")
    if dR_codes is None or dR_scales is None:
        raise ValueError("dR_codes and dR_scales go together: int codes and their per-row fp32 scales "
                         "(as svdcache.residual_cache.quantize_rows returns them)")
    if dR_bits not in (4, 8):
        raise ValueError(f"dR_bits must be 8 (int8 codes) or 4 (two 4-bit codes per uint8), got {dR_bits!r}")
    D = R.shape[-1]
    want, cols = (torch.int8, D) if dR_bits == 8 else (torch.uint8, (D + 1) // 2)
    if isinstance(dR_codes, torch.Tensor) and dR_codes.dtype != want:
        raise TypeError(f"dR_codes with dR_bits={dR_bits} must be {str(want).replace('torch.', '')}, got "
                        f"{str(dR_codes.dtype).replace('torch.', '')} (int8 codes: dR_bits=8; packed 4-bit: dR_bits=4)")
    check_like("dR_codes", dR_codes, (*R.shape[:-1], cols), want, R.device, rows)
    check_like("dR_scales", dR_scales, (*R.shape[:-1], 1), torch.float32, R.device, rows)


def is_device_scalar(v) -> bool:
    """A weight or ``dr_scale`` given as a tensor: read by the op when it runs, not when it is launched (a
    CUDA graph captures the op once and replays it with the values then in the tensor)."""
    return isinstance(v, torch.Tensor)


def check_device_weights(weights, device, dr_scale=0.0) -> None:
    """``weights``: floats, or one 1-D fp32 tensor on ``device``; ``dr_scale``: a float or a one-element fp32
    tensor on ``device`` (device weights, see :func:`is_device_scalar`)."""
    for what, w, dim in (("weights", weights, 1), ("dr_scale", dr_scale, None)):
        if not is_device_scalar(w):
            continue
        if w.dtype != torch.float32 or w.device != device or (w.dim() != 1 if dim else w.numel() != 1):
            want = "a 1-D" if dim else "a one-element"
            raise ValueError(f"{what} given as a tensor must be {want} float32 tensor on {device}, "
                             f"got {tuple(w.shape)} {w.dtype} on {w.device}")


def check_reconstruct_args(V, R, *, terms, weights, dR, x, gate, out, dR_codes=None, dR_scales=None,
                           dR_bits=8, rows: bool = True) -> None:
    """``rows=False``: (..., N, D) tensors need not flatten to rows as views (torch ops that read them
    as they are; the kernels need rows)."""
    check_activation("R", R)
    if rows:
        check_rows("R", R)
    k = check_basis(V, R.shape[-1], "R")
    if V.device != R.device:
        raise ValueError(f"V is on {V.device} but R is on {R.device}")
    check_device_weights(weights, R.device)
    if len(terms) != len(weights):
        raise ValueError(f"got {len(terms)} terms but {len(weights)} weights")
    if len(terms) > MAX_TERMS:
        raise ValueError(f"at most {MAX_TERMS} coefficient terms, got {len(terms)}")
    for i, t in enumerate(terms):
        check_like(f"terms[{i}]", t, (*R.shape[:-1], k), torch.float32, R.device, rows)
    check_like("dR", dR, R.shape, R.dtype, R.device, rows)
    check_quantized_dR(R, dR, dR_codes, dR_scales, dR_bits, rows)
    if x is not None:
        check_activation("x", x)
        check_like("x", x, R.shape, x.dtype, R.device)
    if gate is not None:
        if x is None:
            raise ValueError("gate needs x (out = x + gate * F_hat)")
        if not isinstance(gate, torch.Tensor):
            raise TypeError(f"gate must be a torch.Tensor, got {type(gate).__name__}")
        if gate.device != R.device:
            raise ValueError(f"gate is on {gate.device} but R is on {R.device}")
        gate_rows_shape(R, gate)
        if gate.stride(-1) != 1:
            raise ValueError(f"gate must be contiguous in its last dim, got strides {gate.stride()}")
    if out is not None:
        want = x.dtype if x is not None else R.dtype
        check_like("out", out, R.shape, want, R.device)


@torch.no_grad()
def reconstruct_reference(
    V: torch.Tensor,
    R: torch.Tensor,
    *,
    terms: Sequence[torch.Tensor] = (),
    weights: Sequence[float] | torch.Tensor = (),
    dR: torch.Tensor | None = None,
    dr_scale: float | torch.Tensor = 0.0,
    x: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    dR_codes: torch.Tensor | None = None,
    dR_scales: torch.Tensor | None = None,
    dR_bits: int = 8,
) -> torch.Tensor:
    """Forecast of a cached feature and, optionally, its gated residual add.

    ``F_hat = (sum_i weights[i] * terms[i]) @ V^T + R + dr_scale * dR`` with ``terms`` (..., N, k) fp32
    coefficient states (the forecast P is formed in k dims: Taylor terms, or EMA minus last
    coefficients), ``R`` (..., N, D). With ``x``: ``out = x + gate * F_hat`` (``gate`` (..., 1, D) or
    (..., D), broadcast over tokens; no gate means 1). ``out`` may be ``x`` itself (in place) or a
    new tensor; ``None`` allocates one. Returns the result (dtype of x, else of R).

    Instead of ``dR``, ``dR_codes`` and ``dR_scales`` give it quantized (``dR_bits`` 8 or 4, see the
    module docstring): the term is ``code * (scale * dr_scale)``, formed in fp32 in one pass (the values of
    ``dequantize_rows`` times ``dr_scale`` to a few fp32 ulp, without rounding them to R's dtype).

    Device weights: ``weights`` may be one 1-D fp32 tensor (len(terms) values) and ``dr_scale`` a
    one-element fp32 tensor, on R's device; the op reads them when it runs (CUDA-graph replays).
    """
    check_reconstruct_args(V, R, terms=terms, weights=weights, dR=dR, x=x, gate=gate, out=out,
                           dR_codes=dR_codes, dR_scales=dR_scales, dR_bits=dR_bits)
    check_device_weights((), R.device, dr_scale)
    dRq = (dR_codes, dR_scales, dR_bits) if dR_codes is not None else None
    return reconstruct_compute(V, R, terms, weights, dR, dr_scale, x, gate, out, dRq)


_NIBBLES: dict = {}


def nibble_table(device) -> torch.Tensor:
    """(256, 2) fp32: the two 4-bit code values (low nibble, high nibble, each minus 8) of each byte."""
    t = _NIBBLES.get(device)
    if t is None:
        b = torch.arange(256)
        t = _NIBBLES[device] = torch.stack([(b & 0xF) - 8, (b >> 4) - 8], dim=1).float().to(device)
    return t


def code_values(codes: torch.Tensor, D: int, bits: int) -> torch.Tensor:
    """The integer code values as fp32 (..., N, D) (for 4 bits a strided view when D is odd); int8
    codes are returned as they are (torch promotes them in the fp32 ops that read them)."""
    if bits == 8:
        return codes
    # one gather through the 256 x 2 table of a byte's two values (embedding: any index shape, 3 ops)
    v = torch.nn.functional.embedding(codes.int(), nibble_table(codes.device)).view(*codes.shape[:-1], -1)
    return v if v.shape[-1] == D else v[..., :D]


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, D: int, bits: int) -> torch.Tensor:
    """fp32 dR of quantized codes (..., N, D): code value times its row's scale."""
    v = code_values(codes, D, bits)
    return (v.float() if bits == 8 else v) * scales


def reconstruct_compute(V, R, terms, weights, dR, dr_scale, x, gate, out, dRq=None) -> torch.Tensor:
    """The body of :func:`reconstruct_reference` for arguments already checked (plans call it);
    ``dRq``: ``(codes, scales, bits)`` of a quantized dR, or None."""
    # fp32 throughout; fused torch calls (addmm, in-place adds on fresh tensors) keep the CPU path,
    # which the runtime uses off-GPU, at a few passes over the feature
    D = R.shape[-1]
    fh = R.float()
    fresh = fh is not R  # may be modified in place
    if terms:
        k = V.shape[1]
        if is_device_scalar(weights):  # no float() of a device value: no host sync, nothing baked in
            P = terms[0].reshape(-1, k) * weights[0]
            for i in range(1, len(terms)):
                P.addcmul_(terms[i].reshape(-1, k), weights[i])
        else:
            P = terms[0].reshape(-1, k) * float(weights[0])
            for w, t in zip(weights[1:], terms[1:]):
                P.add_(t.reshape(-1, k), alpha=float(w))
        fh = torch.addmm(fh.reshape(-1, D), P, V.float().T).view(R.shape)
        fresh = True
    dev_s = is_device_scalar(dr_scale)
    if (dR is not None or dRq is not None) and (dev_s or dr_scale):
        if dR is None:  # codes times (row scale x dr_scale) in one pass: no dequantized dR formed
            sc = dRq[1].float() * (dr_scale.reshape(()) if dev_s else float(dr_scale))
            v = code_values(dRq[0], D, dRq[2])
            fh = fh.addcmul_(v, sc) if fresh else torch.addcmul(fh, v, sc)
        elif dev_s:
            s = dr_scale.reshape(())
            fh = fh.addcmul_(dR.float(), s) if fresh else torch.addcmul(fh, dR.float(), s)
        else:
            fh = fh.add_(dR.float(), alpha=float(dr_scale)) if fresh else fh.add(dR.float(), alpha=float(dr_scale))
        fresh = True
    if x is not None:
        if gate is not None:
            g = gate.float() if gate_rows_shape(R, gate) else gate.float().unsqueeze(-2)
            fh = fh.mul_(g) if fresh else fh * g
            fresh = True
        if out is x and x.dtype == torch.float32:
            return x.add_(fh)
        fh = fh.add_(x.float()) if fresh else fh + x.float()
        fresh = True
    dtype = x.dtype if x is not None else R.dtype
    if out is None:
        return fh.to(dtype) if fresh else fh.clone()
    out.copy_(fh)
    return out
