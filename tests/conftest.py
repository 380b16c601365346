"""Test-wide setup. Kept generic: per-area fixtures live beside their tests."""
import os

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when a kernel module is imported: switch
# the interpreter on before any test imports one (CPU-only machines run the kernels through it).
os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter runs tl.dot as numpy.matmul; on a busy 2-core machine OpenBLAS's spinning worker
# threads make each small matmul ~1000x slower (16 ms instead of 15 us). numpy is not imported yet.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (use: ``pytestmark =
    pytest.mark.usefixtures("one_thread")``): their threads only add sync overhead, and on a busy
    2-core machine the spinning makes such a file ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
