"""Shared plumbing of the benchmarks: launch N ranks under the deepspeed launcher, collect rank 0's
JSON report, and time a collective phase as the slowest rank sees it.

A benchmark module `grpo_ds.tools.bench.X` has a `--worker --out FILE` mode that runs on every rank
and writes its report from rank 0; `launch_workers` starts it and returns that report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from grpo_ds.build_locks import build_lock_problem
from grpo_ds.cli import free_port
from grpo_ds.cpu.host_memory import expect_cpu_accelerator, host_allocator_env


def launch_workers(module: str, ranks: int, args: list[str], timeout: float,
                   host_allocator: str = "auto") -> dict:
    """Run `module --worker --out F *args` on `ranks` local ranks; rank 0's report from F.

    Progress lines starting with "[bench]" are echoed to stderr as they come. The launcher and
    its ranks run in their own process group, killed together if they overstay `timeout`. The
    ranks get the host allocator `grpo-ds train` would give them (host_memory.py).
    """
    problem = build_lock_problem()
    if problem:
        raise RuntimeError(problem)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        launcher = shutil.which("deepspeed") or "deepspeed"
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "--module", module, "--worker", "--out", out, *args]
        lines = []
        # No deepspeed import here: its accelerator detection logs to stdout, and --json output
        # must stay one line. The ranks detect the accelerator themselves.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        extra, _ = host_allocator_env(host_allocator, expect_cpu_accelerator(env), env)
        env.update(extra)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            for line in proc.stdout:
                lines.append(line.rstrip())
                if line.startswith("[bench]"):
                    print(line.rstrip(), file=sys.stderr, flush=True)
            code = proc.wait()
        finally:
            timer.cancel()
        if code != 0 or not os.path.exists(out):
            tail = "\n".join(lines[-60:])
            raise RuntimeError(f"benchmark workers failed (exit {code}):\n{tail}")
        with open(out) as f:
            return json.load(f)


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's list of floats (same length on all ranks), indexed [rank][i]."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    # on the accelerator: NCCL gathers no host tensors
    mine = torch.tensor(values, dtype=torch.float64, device=get_accelerator().current_device_name())
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


class Clock:
    """Wall time of a collective phase: barrier, run, barrier; the slowest rank's seconds.

    The clock reads synchronize the accelerator (metrics.synchronized_time), so a phase owns
    the device work it queued."""

    def __init__(self):
        self.start = self.start_cpu = 0.0

    def __enter__(self):
        from deepspeed import comm as dist

        from grpo_ds.metrics import synchronized_time

        dist.barrier()
        self.start, self.start_cpu = synchronized_time(), time.process_time()
        return self

    def __exit__(self, *exc):
        from deepspeed import comm as dist

        from grpo_ds.metrics import synchronized_time

        self.local = synchronized_time() - self.start  # this rank's own time
        # CPU time of this rank's threads: the work done, whatever else shares the cores
        self.cpu = time.process_time() - self.start_cpu
        dist.barrier()
        self.seconds = synchronized_time() - self.start  # includes waiting for the slowest rank
        return False


def say(rank: int, message: str) -> None:
    """A progress line the launcher's parent echoes (rank 0 only)."""
    if rank == 0:
        print(f"[bench] {message}", flush=True)


def collective_seconds(numel: int, dtype, reps: int = 3) -> dict[str, float]:
    """Wall seconds (slowest rank, mean of `reps`) of one all-gather and one reduce-scatter of
    `numel` elements in `dtype`, each rank holding numel / W: what ZeRO-3 does per full pass."""
    import torch
    from deepspeed import comm as dist

    world = dist.get_world_size()
    shard = torch.randn(numel // world).to(dtype)
    full = torch.empty(shard.numel() * world, dtype=dtype)
    ops = {"all_gather": lambda: dist.all_gather_into_tensor(full, shard),
           "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, full)}
    out = {}
    for name, op in ops.items():
        op()  # warm-up: connections and buffers
        with Clock() as clock:
            for _ in range(reps):
                op()
        out[name] = clock.seconds / reps
    return out


# ---- memory: peaks per phase and a guard for the shared machine (bench/memory.py) -------------


def memory_status() -> dict[str, int]:
    """This process's resident set now ("rss") and its high-water mark ("hwm"), in bytes.

    Linux: VmRSS and VmHWM of /proc/self/status. Elsewhere both are ru_maxrss (the peak).
    """
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {"rss": int(fields["VmRSS"].split()[0]) * 1024,
                "hwm": int(fields["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return {"rss": peak, "hwm": peak}


def restart_peaks() -> bool:
    """Start new high-water marks from here: the RSS's (Linux >= 4.0: write 5 to
    /proc/self/clear_refs) and the accelerator's peak allocation. False if RSS cannot restart."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_peak() -> int | None:
    """The accelerator's peak allocation since the last restart; None without an accelerator."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return None if accelerator.device_name() == "cpu" else int(accelerator.max_memory_allocated())


def available_ram() -> int:
    """MemAvailable of the machine, bytes (what can be allocated without swapping or OOM)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def start_memory_guard(min_available: int, rank: int, interval: float = 0.2) -> None:
    """Exit this rank (code 3) before the machine runs out of RAM.

    The kernel's OOM killer picks the largest process, which on a shared machine may be someone
    else's; a benchmark probing how large a model fits stops itself first instead.
    """
    def watch():
        while True:
            if available_ram() < min_available:
                print(f"[bench] rank {rank}: MemAvailable below {min_available / 2**30:.1f} GiB, "
                      "stopping (out of memory)", flush=True)
                os._exit(3)
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True).start()
