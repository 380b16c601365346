"""Test-wide setup. Kept generic: per-area fixtures live beside their tests."""
import os

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when a kernel module is imported: switch
# the interpreter on before any test imports one (CPU-only machines run the kernels through it).
os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter runs tl.dot as numpy.matmul; on a busy 2-core machine OpenBLAS's spinning worker
# threads make each small matmul ~1000x slower (16 ms instead of 15 us). numpy is not imported yet.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
