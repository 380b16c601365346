"""Backend choice: the Triton kernel for CUDA tensors, the PyTorch reference elsewhere.

``backend`` argument > ``SVDCACHE_BACKEND`` environment variable > "auto". "triton" on CPU tensors
runs the kernel under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before the kernel modules are imported.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency on Linux
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, ref: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op whose main operand is ``ref``."""
    choice = backend or os.environ.get("SVDCACHE_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if ref.is_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton is not importable")
        if not ref.is_cuda and not interpreter_on():
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing svdcache_kernels"
            )
    return choice
