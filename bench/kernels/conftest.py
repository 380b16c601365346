"""Kernel microbenchmarks: on a CPU-only machine the kernels run under Triton's interpreter."""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: see tests/conftest.py

import torch  # noqa: E402  (importing torch does not define any @triton.jit kernel yet)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
