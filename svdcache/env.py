"""The environment variables svdcache reads, all here (the kernels' own are read in svdcache_kernels.env)."""
from __future__ import annotations

import os

BACKENDS = ("auto", "triton", "torch")


def backend() -> str | None:
    """``SVDCACHE_BACKEND``: what ``backend="auto"`` means (auto / triton / torch); None if unset."""
    v = os.environ.get("SVDCACHE_BACKEND", "")
    if v in ("", "auto"):
        return None
    if v not in BACKENDS:
        raise ValueError(f"SVDCACHE_BACKEND={v!r} must be auto, triton or torch")
    return v


def embedded_dir(default: str) -> str:
    """``SVDCACHE_EMBEDDED_DIR``: another trained FLUX folder for the embedded model (e.g. a checkpoint under test)."""
    return os.environ.get("SVDCACHE_EMBEDDED_DIR") or default


def video_dir(default: str) -> str:
    """``SVDCACHE_VIDEO_DIR``: another trained Wan folder for the embedded video model."""
    return os.environ.get("SVDCACHE_VIDEO_DIR") or default
