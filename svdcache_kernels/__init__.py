"""SVD-Cache compute core: fused Triton kernels and their PyTorch reference ops (no diffusers import).

Ops (each ``op(...)`` dispatches; ``op_reference`` and ``op_triton`` share its signature):

- :func:`split`: full-compute step, coefficients C = F V, residual, predictor-state updates.
- :func:`reconstruct`: cached step, F_hat = P V^T + R (+ s dR), optional fused ``x + gate * F_hat``.
- :func:`reconstruct_sum`: ``x + sum_f gate_f * F_hat_f`` over many features (a whole cached stack).
- :func:`residual_codes`: full step of ``residual="int8"/"int4"``: ``(F - F_prev) / h - D1 V^T`` as per-row codes.
- :func:`quantize_rows` / :func:`dequantize_codes`: the int8 / int4 row codes (the one definition of the
  format that ops, runtime and benchmarks share).
- :func:`gram_update`: calibration, G += F^T F (fp32); :func:`basis_from_gram`: eigh -> V, sigma, k.
- :class:`SplitPlan`, :class:`ReconstructPlan`: the same ops for a fixed layout, validated once
  (the runtime's per-feature hot path).
"""
from .dispatch import resolve_backend
from .ops.gram import basis_from_gram, gram_update, gram_update_reference, rank_for_energy
from .ops.reconstruct import reconstruct, reconstruct_reference
from .ops.reconstruct_sum import SumTerm, reconstruct_stacked, reconstruct_sum, reconstruct_sum_reference
from .ops.reconstruct.reference import dequantize_codes
from .ops.residual_codes import quantize_rows, quantize_rows_into, residual_codes, residual_codes_reference
from .ops.split import split, split_reference
from .plan import ReconstructPlan, ReconstructSumPlan, SplitPlan

__all__ = [
    "split",
    "split_reference",
    "reconstruct",
    "reconstruct_reference",
    "gram_update",
    "gram_update_reference",
    "basis_from_gram",
    "rank_for_energy",
    "resolve_backend",
    "ReconstructPlan",
    "ReconstructSumPlan",
    "SumTerm",
    "reconstruct_sum",
    "reconstruct_stacked",
    "reconstruct_sum_reference",
    "SplitPlan",
    "residual_codes",
    "residual_codes_reference",
    "quantize_rows",
    "quantize_rows_into",
    "dequantize_codes",
]
