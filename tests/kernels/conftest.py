"""Kernel tests: tiny matmuls, where intra-op threads only contend (on a busy 2-core machine torch's
OpenMP/MKL threads made a 136x48 QR take 1 s). One torch thread per kernel test, restored after."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
