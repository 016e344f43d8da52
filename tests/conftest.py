"""Fixtures shared by test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """2 shared cores: OpenMP with 2 threads spins against other processes (ms per tiny matmul)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
