"""A CPU rank's process set-up after it joined the process group: its threads and the shared
memory DeepSpeed's CPU all-reduce leaves behind. Called by engine.init_distributed on the CPU
accelerator only (grpo_ds/cpu/__init__.py)."""

from __future__ import annotations

import os

import torch


def unlink_shm_buffer() -> None:
    """Free DeepSpeed's CPU shared-memory all-reduce buffer when the ranks exit.

    On CPU, init_distributed creates one /dev/shm file per rank (~66 MiB, named after uid, master
    address, port and rank), maps every rank's, and never unlinks them: each run leaks that RAM
    until reboot. Once all ranks have mapped all buffers (init, then a barrier), unlinking our own
    name keeps the mappings working and lets the kernel free the memory at exit.
    """
    import deepspeed

    deepspeed.comm.barrier()
    env = os.environ
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), env.get("MASTER_ADDR", ""),
                     env.get("MASTER_PORT", ""), str(deepspeed.comm.get_rank())])
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # not all ranks local (no shm op), or not Linux
        pass


def set_threads_per_rank() -> None:
    """Give each local rank its share of the cores, so 2 ranks on 2 cores do not fight."""
    if "OMP_NUM_THREADS" in os.environ:  # the user's (or the launcher's) explicit choice
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        return
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
