"""Honest metrics on an asynchronous device: synchronized phase clocks, reserved memory, and the
GPU's matmul peak for MFU.

No GPU here. The CPU branches run on DeepSpeed's real CPU accelerator; the GPU branches run
their real code on CPU tensors through `HostDevice`, a stand-in accelerator whose only invented
parts are a device name and clock-based events, so every figure is a real measurement. The
test marked `cuda` runs the real thing wherever CUDA is present.
"""

import math
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from grpo_ds.metrics import peak_memory_bytes, peak_reserved_bytes, synchronized_time
from grpo_ds.tools.bench.mfu import device_peak_dtypes, matmul_peak


class HostEvent:
    """An event with the accelerator Event's interface, stamped by the host's clock."""

    def __init__(self, enable_timing: bool = False):
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.at - self.at) * 1000.0  # milliseconds, as CUDA events report


class HostDevice:
    """A device named like a GPU that computes on the CPU (see the module docstring).

    `pending` is work "queued on the device": synchronize() waits for it, as CUDA's does."""

    Event = HostEvent

    def __init__(self):
        self.pending: list[threading.Thread] = []
        self.peaks = {"allocated": 3 * 2**30, "reserved": 5 * 2**30}  # bytes
        self.emptied = 0

    def device_name(self):
        return "cuda"

    def current_device_name(self):
        return "cpu"

    def synchronize(self):
        for work in self.pending:
            work.join()
        self.pending.clear()

    def empty_cache(self):
        self.emptied += 1

    def max_memory_allocated(self):
        return self.peaks["allocated"]

    def max_memory_reserved(self):
        return self.peaks["reserved"]


def test_synchronized_time_waits_for_the_queued_device_work():
    device = HostDevice()
    work = threading.Thread(target=time.sleep, args=(0.2,))
    start = time.perf_counter()
    work.start()
    device.pending.append(work)  # a kernel queued, still running
    unsynchronized = time.perf_counter() - start
    assert unsynchronized < 0.2  # a plain clock read does not see the work
    assert synchronized_time(device) - start >= 0.2
    assert not work.is_alive()


def test_synchronized_time_on_the_cpu_accelerator_is_the_clock():
    before = time.perf_counter()
    stamp = synchronized_time()
    assert before <= stamp <= time.perf_counter()


def test_reserved_memory_is_read_on_a_gpu_and_absent_on_cpu():
    device = HostDevice()
    assert peak_memory_bytes(device) == 3 * 2**30  # the allocation, as before
    assert peak_reserved_bytes(device) == 5 * 2**30
    # CPU: the field is absent (ru_maxrss counts everything), the peak is the resident set
    assert peak_reserved_bytes() is None
    assert peak_memory_bytes() >= 50 * 2**20  # this interpreter with torch loaded


PEAK_METRICS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=sys.argv[1])
    import deepspeed
    from grpo_ds.metrics import peak_memory_metrics
    from tests.test_gpu_metrics import HostDevice
    deepspeed.init_distributed(dist_backend="gloo")
    print(json.dumps({"cpu": peak_memory_metrics("cpu"),
                      "gpu": peak_memory_metrics("cpu", HostDevice())}))
""")


def test_peak_memory_metrics_gather_reserved_only_where_the_accelerator_has_it():
    from tests.multirank import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", PEAK_METRICS_SCRIPT, str(free_port())],
                          capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out["cpu"]) == ["memory/peak_bytes_rank0"]
    assert out["cpu"]["memory/peak_bytes_rank0"] > 50 * 2**20
    assert out["gpu"] == {"memory/peak_bytes_rank0": 3 * 2**30,
                          "memory/peak_reserved_bytes_rank0": 5 * 2**30}


def test_gpu_peak_dtypes_are_bf16_and_the_runs():
    assert device_peak_dtypes(torch.float32) == (torch.bfloat16, torch.float32)
    assert device_peak_dtypes(torch.bfloat16) == (torch.bfloat16,)


def test_cpu_peak_times_the_cpu_kernels_in_the_runs_dtype(one_thread):
    from grpo_ds.tools.bench.mfu import peak_kernels

    peak = matmul_peak(torch.float32, seconds_per_size=0.01)  # the CPU accelerator
    assert peak["device"] == "cpu" and "bf16_flops" not in peak
    kernels = peak_kernels(torch.float32)
    assert set(peak["by_size"]) == {f"{k}/{n}" for k in kernels for n in (512, 1024, 2048)}
    assert peak["flops_per_cpu_second"] > 0


def test_gpu_peak_path_times_torch_mm_in_bf16_and_the_runs_dtype_never_onednn(one_thread):
    device = HostDevice()
    start = time.perf_counter()
    peak = matmul_peak(torch.float32, seconds_per_size=0.05, sizes=(32, 64), accelerator=device)
    elapsed = time.perf_counter() - start
    # Only torch.mm, in both dtypes, at the sizes asked: no oneDNN kernel on a GPU.
    assert set(peak["by_size"]) == {f"mm/{d}/{n}" for d in ("bfloat16", "float32")
                                    for n in (32, 64)}
    assert peak["flops"] == max(peak["by_size"][f"mm/float32/{n}"] for n in (32, 64)) > 0
    assert peak["bf16_flops"] == max(peak["by_size"][f"mm/bfloat16/{n}"] for n in (32, 64)) > 0
    assert peak["device"] == "gpu" and math.isnan(peak["flops_per_cpu_second"])
    assert device.emptied == 1  # the operands' cache is handed back
    # each of the 4 (dtype, size) timings filled its 0.05 s with events around whole batches
    assert elapsed >= 4 * 0.05
    # A real rate: the 64-size float32 matmul on one CPU thread, 2*64^3 FLOP a call, runs at
    # 0.1 to 1000 GFLOP/s (a rate from a clock that saw no work would be far outside).
    assert 1e8 < peak["by_size"]["mm/float32/64"] < 1e12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_peak_on_a_real_gpu():
    peak = matmul_peak(torch.bfloat16, seconds_per_size=0.3)
    assert peak["device"] == "gpu"
    assert peak["bf16_flops"] == peak["flops"] > 20e12  # any data-centre GPU of the last years
