"""Fixtures shared by test modules."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """2 shared cores: OpenMP with 2 threads spins against other processes (ms per tiny matmul)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """One gloo rank in this process, for code that runs collectives (the trainer, refill)."""
    import deepspeed

    store = tmp_path_factory.mktemp("store") / "rendezvous"
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0,
                                         world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()
    # Left set, they would tell a later test's child process that it is a launched rank.
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
