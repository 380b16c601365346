"""Argument checks shared by the reference ops and the kernels: bad input fails here, before a launch."""
from __future__ import annotations

import torch

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fmt(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def check_activation(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACT_DTYPES:
        raise TypeError(f"{name} must be bf16, fp16 or fp32, got {_fmt(t)}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., N, D), got {_fmt(t)}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()} for {_fmt(t)}")


def check_rows(name: str, t: torch.Tensor) -> None:
    """The kernels walk (..., N, D) as M rows of a fixed stride: the leading dims must flatten as a view."""
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name} {_fmt(t)} with strides {t.stride()} cannot be flattened to rows without a copy; "
            "pass a contiguous tensor"
        ) from None


def check_basis(V: torch.Tensor, D: int, feat_name: str = "F") -> int:
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"V must be a torch.Tensor, got {type(V).__name__}")
    if V.dim() != 2:
        raise ValueError(f"V must have shape (D, k), got {_fmt(V)}")
    if V.shape[0] != D:
        raise ValueError(f"V has D={V.shape[0]} rows but {feat_name} has D={D} channels: V {_fmt(V)}")
    if V.shape[1] < 1:
        raise ValueError(f"V must hold at least one basis vector, got {_fmt(V)}")
    if V.dtype not in ACT_DTYPES:
        raise TypeError(f"V must be bf16, fp16 or fp32, got {_fmt(V)}")
    return V.shape[1]


def check_like(name: str, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device,
               rows: bool = True) -> None:
    """``rows``: the leading dims must flatten to rows as a view (the kernels' layout; see check_rows)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {_fmt(t)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).replace('torch.', '')}, got {_fmt(t)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {_fmt(t)}")
    if rows:
        check_rows(name, t)
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
