"""Host allocator: the launchers' choice (auto / tcmalloc / system, the user's own malloc wins), and
that tcmalloc really reuses a freed block where glibc's malloc maps fresh pages."""

import json
import os
import subprocess
import sys

import pytest

from grpo_ds.cpu.host_memory import (
    QUIET_LARGE_ALLOCATIONS,
    HostAllocatorError,
    find_tcmalloc,
    host_allocator_env,
    user_tuned_malloc,
)

PAGES = 16384  # a 64 MiB block: above glibc's largest mmap threshold (32 MiB)

# Allocate a block, touch it, free it; count the minor page faults of doing it again.
PROBE = f"""
import json, resource, torch
from grpo_ds.cpu.host_memory import active_host_allocator
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty({PAGES} * 1024).fill_(1.0)
before = faults()
torch.empty({PAGES} * 1024).fill_(2.0)
print(json.dumps({{"allocator": active_host_allocator(), "faults": faults() - before}}))
"""


def probe(choice: str) -> dict:
    env = {k: v for k, v in os.environ.items() if user_tuned_malloc({k: v}) is None}
    extra, _ = host_allocator_env(choice, True, env)
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **extra}, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc not installed (.ci/run installs it)")
def test_tcmalloc_reuses_a_freed_block_where_glibc_maps_fresh_pages():
    system, tcmalloc = probe("system"), probe("tcmalloc")
    # glibc: the second 64 MiB block is a fresh mapping, every page faults again
    assert system["allocator"] == "glibc" and system["faults"] > 0.9 * PAGES
    # tcmalloc: the freed span comes back, already touched
    assert tcmalloc["allocator"] == "tcmalloc" and tcmalloc["faults"] < 0.05 * PAGES


def found(path="/usr/lib/libtcmalloc.so.4"):
    return lambda: path


def test_choices():
    base = {"PATH": "/bin"}
    # auto: tcmalloc on the CPU accelerator, quiet about large allocations
    extra, note = host_allocator_env("auto", True, base, find=found())
    assert extra == {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4", **QUIET_LARGE_ALLOCATIONS}
    assert "tcmalloc" in note
    # auto on a GPU: glibc; asked for explicitly: tcmalloc everywhere
    assert host_allocator_env("auto", False, base, find=found())[0] == {}
    assert host_allocator_env("tcmalloc", False, base, find=found())[0]["LD_PRELOAD"]
    assert host_allocator_env("system", True, base, find=found())[0] == {}
    # another preloaded library stays, after tcmalloc
    extra, _ = host_allocator_env("auto", True, {"LD_PRELOAD": "libfoo.so"}, find=found())
    assert extra["LD_PRELOAD"] == "/usr/lib/libtcmalloc.so.4:libfoo.so"


def test_missing_tcmalloc():
    extra, note = host_allocator_env("auto", True, {}, find=lambda: None)
    assert extra == {} and "not installed" in note and "apt install" in note
    with pytest.raises(HostAllocatorError, match="host_allocator=tcmalloc: libtcmalloc not found"):
        host_allocator_env("tcmalloc", True, {}, find=lambda: None)
    with pytest.raises(HostAllocatorError, match="choose one of"):
        host_allocator_env("jemalloc", True, {}, find=found())


def test_the_users_malloc_wins():
    assert user_tuned_malloc({"PATH": "/bin", "OMP_NUM_THREADS": "1"}) is None
    assert user_tuned_malloc({"LD_PRELOAD": "/usr/lib/libasan.so"}) is None
    for env in ({"MALLOC_MMAP_THRESHOLD_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.x=0"},
                {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}):
        (name,) = env
        assert user_tuned_malloc(env) == name
        extra, note = host_allocator_env("tcmalloc", True, env, find=found())
        assert extra == {} and name in note
