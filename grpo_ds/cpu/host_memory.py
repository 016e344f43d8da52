"""Host allocator for the ranks: tcmalloc, which keeps freed blocks for reuse, on the CPU accelerator.

On a CPU device every activation, logits chunk and gradient bucket is a host allocation, and a
training step frees and reallocates the same large blocks again and again. glibc serves a block
over its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free, so the next
block of that size arrives as untouched pages and pays a page fault per 4 KiB on first touch. On
the development VM that is ~10 us a page: 0.35 s for one [4096, 8192] float32 logits block, more
than the arithmetic on it. tcmalloc (gperftools) keeps freed spans and hands them out again, the
way CUDA's caching allocator does on a GPU. `grpo-ds bench step --compare allocator=system`
measures the difference (README "Host memory").

The allocator must be chosen before a process starts (LD_PRELOAD), so the launchers (`grpo-ds
train`, the benchmarks) put it in the ranks' environment. `deepspeed.host_allocator`:
  auto      tcmalloc on the CPU accelerator when it is installed, else glibc's malloc (with a note
            saying how to install it); glibc's malloc on GPUs, where activations are device memory
  tcmalloc  tcmalloc on any accelerator; an error before launch when it is not installed
  system    glibc's malloc
A malloc the user chose already (an allocator in LD_PRELOAD, MALLOC_* or GLIBC_TUNABLES variables)
is left as it is, like OMP_NUM_THREADS for threads.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys

from grpo_ds.config import HOST_ALLOCATORS  # config names the choices

INSTALL_HINT = ("apt install libgoogle-perftools4, dnf install gperftools-libs, or conda install "
                "gperftools")
# tcmalloc reports every allocation over 1 GiB on stderr; a 7B model's shards are bigger than that
QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}


class HostAllocatorError(RuntimeError):
    pass


def user_tuned_malloc(env: dict[str, str]) -> str | None:
    """The environment variable through which the user already chose malloc's behaviour, if any."""
    for name in sorted(env):
        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES":
            return name
    if "malloc" in env.get("LD_PRELOAD", ""):  # tcmalloc, jemalloc, mimalloc
        return "LD_PRELOAD"
    return None


def find_tcmalloc() -> str | None:
    """tcmalloc's shared library: the active environment's own (conda), else the system's."""
    for name in ("tcmalloc", "tcmalloc_minimal"):
        local = sorted(glob.glob(os.path.join(sys.prefix, "lib", f"lib{name}.so*")))
        if local:
            return local[0]
        found = ctypes.util.find_library(name)  # ldconfig's cache: a soname LD_PRELOAD resolves
        if found:
            return found
    return None


def expect_cpu_accelerator(env: dict[str, str]) -> bool:
    """Whether DeepSpeed will pick its CPU accelerator, without importing it (its import logs to
    stdout, which a --json benchmark must keep to one line): DS_ACCELERATOR, else no CUDA."""
    if env.get("DS_ACCELERATOR"):
        return env["DS_ACCELERATOR"] == "cpu"
    import torch

    return not torch.cuda.is_available()


def host_allocator_env(choice: str, cpu_accelerator: bool, env: dict[str, str],
                       find=None) -> tuple[dict[str, str], str]:
    """(variables to add to the ranks' environment, a line saying what the ranks will use)."""
    if choice not in HOST_ALLOCATORS:
        raise HostAllocatorError(f"deepspeed.host_allocator={choice!r}: choose one of "
                                 f"{', '.join(HOST_ALLOCATORS)}")
    if choice == "system":
        return {}, "host allocator: glibc malloc (deepspeed.host_allocator=system)"
    users = user_tuned_malloc(env)
    if users:
        return {}, f"host allocator: as set by {users}={env[users]!r}"
    if choice == "auto" and not cpu_accelerator:
        return {}, "host allocator: glibc malloc (activations live on the accelerator)"
    library = (find or find_tcmalloc)()
    if library is None:
        if choice == "tcmalloc":
            raise HostAllocatorError(
                f"deepspeed.host_allocator=tcmalloc: libtcmalloc not found ({INSTALL_HINT}), "
                "or set deepspeed.host_allocator=system")
        return {}, ("host allocator: glibc malloc; tcmalloc is not installed, and on the CPU "
                    f"accelerator it makes steps faster ({INSTALL_HINT}; README 'Host memory')")
    preload = f"{library}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else library
    extra = {"LD_PRELOAD": preload}
    extra.update({k: v for k, v in QUIET_LARGE_ALLOCATIONS.items() if k not in env})
    return extra, f"host allocator: tcmalloc ({library})"


def active_host_allocator() -> str:
    """What serves this process's malloc: 'tcmalloc', 'jemalloc', 'mimalloc' or 'glibc'."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"
