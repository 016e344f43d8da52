"""The local GPUs the ranks run on: the ones SLURM or CUDA_VISIBLE_DEVICES assigned, not 0..N-1.

DeepSpeed's launcher sets every rank's CUDA_VISIBLE_DEVICES itself: to the ids of `--include
host:ids`, or to 0..N-1 with `--num_gpus N`. Its runner honours an inherited
CUDA_VISIBLE_DEVICES only when given neither flag and no hostfile (deepspeed 0.19.8,
launcher/runner.py), and `grpo-ds train` passes `--num_gpus`: a job given GPUs 4-7 of a shared
node would run on GPUs 0-3, another job's. So the assigned ids become `--include`
(`grpo-ds train`; launch/multinode.sh in no-ssh mode, which SLURM uses, per node).

Where the assignment comes from, first found:
- CUDA_VISIBLE_DEVICES: device indices as this process's driver numbers them. SLURM sets it for a
  job step with GPUs (relative to the job's device cgroup where the cluster constrains devices).
- SLURM_JOB_GPUS (batch and interactive jobs): the node's global GPU indices. Where the cluster
  constrains devices the job sees only its own GPUs, numbered 0..n-1, so the global indices are
  used only when this process sees more GPUs than it was assigned.
A CPU run ignores both: the ranks are CPU processes, numbered by `--num_gpus`.

    python -m grpo_ds.launch_devices [--num_gpus N]   # prints the ids ("4,5"), or nothing
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

SOURCES = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS")


class LaunchError(ValueError):
    """The GPU assignment cannot be honoured. The message names the variable and its value."""


def assigned_devices(env: Mapping[str, str], visible_count: int) -> tuple[str, list[int]] | None:
    """(variable, device indices) of the first assignment in SOURCES, or None if there is none.

    `visible_count`: the GPUs this process sees (with the assignment in force).
    """
    for name in SOURCES:
        value = env.get(name, "").strip()
        if value:
            break
    else:
        return None
    try:
        ids = [int(part) for part in value.split(",")]
    except ValueError:
        raise LaunchError(
            f"{name}={value!r}: the DeepSpeed launcher selects GPUs by index; give indices "
            "(not UUIDs or MIG names), or unset it and set deepspeed.num_gpus") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise LaunchError(f"{name}={value!r}: indices must be distinct and >= 0")
    if name == "SLURM_JOB_GPUS" and visible_count == len(ids):
        return name, list(range(len(ids)))  # constrained: this process sees exactly its GPUs
    if name == "SLURM_JOB_GPUS" and max(ids) >= visible_count:
        raise LaunchError(f"{name}={value!r}: this process sees {visible_count} GPUs, so these "
                          "global indices name none of them; set CUDA_VISIBLE_DEVICES")
    return name, ids


def launch_devices(env: Mapping[str, str], device_name: str, visible_count: int,
                   requested: int | None) -> list[int] | None:
    """The device ids to pass as `--include localhost:ids`, or None for `--num_gpus` (no
    assignment, or a CPU run). `requested` (deepspeed.num_gpus, NPROC_PER_NODE) takes the first
    that many of the assigned GPUs; more than were assigned is an error."""
    if device_name == "cpu":
        return None
    found = assigned_devices(env, visible_count)
    if found is None:
        return None
    name, ids = found
    if requested is not None and requested > len(ids):
        raise LaunchError(f"{requested} ranks asked for, but {name}={env[name]!r} assigns "
                          f"{len(ids)} GPUs")
    return ids[:requested] if requested is not None else ids


def include_spec(host: str, ids: list[int]) -> str:
    """The launcher's `--include` value for one host: 'localhost:4,5'."""
    return f"{host}:{','.join(map(str, ids))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_gpus", type=int, default=None, help="ranks on this node")
    args = parser.parse_args(argv)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    try:
        ids = launch_devices(os.environ, accelerator.device_name(), accelerator.device_count(),
                             args.num_gpus)
    except LaunchError as err:
        print(f"launch: {err}", file=sys.stderr)
        return 2
    print(",".join(map(str, ids or [])), flush=True)  # last line: DeepSpeed may log before
    return 0


if __name__ == "__main__":
    sys.exit(main())
