"""Cluster launch: the GPUs SLURM or CUDA_VISIBLE_DEVICES assign are the ones the ranks get,
per-rank CPU binding, and the collective timeout from the config.

No GPU here: the assignment logic is a pure function of the environment and of what the machine
shows (device name and count), tested with those given; the launcher's own parser
(deepspeed.launcher.runner) checks the arguments we build. The multinode test runs the real script
with a stand-in interpreter that answers the one GPU question (`-m grpo_ds.launch_devices`) with
the real function on an 8-GPU machine, and passes everything else to Python.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grpo_ds.cli import launcher_command
from grpo_ds.config import ConfigError, load_config, validate
from grpo_ds.launch_devices import LaunchError, assigned_devices, launch_devices
from tests.multirank import free_port

ROOT = Path(__file__).resolve().parents[1]


def parsed_resources(pool: dict[str, int], include: str) -> dict[str, list[int]]:
    """What DeepSpeed's runner makes of an --include over a machine/hostfile pool."""
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    return dict(parse_inclusion_exclusion(pool, include, ""))


# ---- which GPUs -------------------------------------------------------------------------------


def test_cuda_visible_devices_are_kept_not_renumbered():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert launch_devices(env, "cuda", 4, None) == [4, 5, 6, 7]
    assert launch_devices(env, "cuda", 4, 2) == [4, 5]  # deepspeed.num_gpus=2: the first two
    command = launcher_command(None, [], 4, 29500, [4, 5, 6, 7])
    include = command[command.index("--include") + 1]
    assert include == "localhost:4,5,6,7" and "--num_gpus" not in command
    # The runner, which sees all 8 GPUs once it has dropped CUDA_VISIBLE_DEVICES, keeps them.
    assert parsed_resources({"localhost": 8}, include) == {"localhost": [4, 5, 6, 7]}


def test_no_assignment_or_a_cpu_run_numbers_ranks_0_to_n():
    assert launch_devices({}, "cuda", 8, None) is None
    assert launch_devices({"CUDA_VISIBLE_DEVICES": "2,3"}, "cpu", 1, None) is None
    command = launcher_command("my.yaml", ["--train.steps=2"], 2, 29500, None)
    assert command[1:3] == ["--num_gpus", "2"]
    assert command[-2:] == ["my.yaml", "--train.steps=2"]


def test_slurm_job_gpus_are_global_unless_the_cgroup_shows_only_them():
    env = {"SLURM_JOB_GPUS": "4,5"}
    assert assigned_devices(env, visible_count=8) == ("SLURM_JOB_GPUS", [4, 5])  # unconstrained
    assert assigned_devices(env, visible_count=2) == ("SLURM_JOB_GPUS", [0, 1])  # constrained
    with pytest.raises(LaunchError, match="sees 3 GPUs"):
        assigned_devices(env, visible_count=3)
    # CUDA_VISIBLE_DEVICES, the step's own numbering, comes first
    both = {"SLURM_JOB_GPUS": "4,5", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert assigned_devices(both, visible_count=2) == ("CUDA_VISIBLE_DEVICES", [0, 1])


@pytest.mark.parametrize("value, message", [
    ("GPU-8a1b2c3d", "by index"), ("MIG-1/2/0", "by index"), ("1,1", "distinct"), ("-1", ">= 0")])
def test_unusable_assignments_are_refused_naming_the_variable(value, message):
    with pytest.raises(LaunchError, match=message) as err:
        launch_devices({"CUDA_VISIBLE_DEVICES": value}, "cuda", 2, None)
    assert f"CUDA_VISIBLE_DEVICES={value!r}" in str(err.value)


def test_more_ranks_than_assigned_gpus_is_an_error():
    with pytest.raises(LaunchError, match=r"4 ranks asked for, but CUDA_VISIBLE_DEVICES='2,3'"):
        launch_devices({"CUDA_VISIBLE_DEVICES": "2,3"}, "cuda", 2, 4)


LAUNCH_DEVICES_ON_8_GPUS = textwrap.dedent("""\
    #!/bin/bash
    # Stand-in interpreter: grpo_ds.launch_devices answers as on a node with 8 GPUs, with the
    # real function; everything else is the real Python.
    if [[ $1 == -m && $2 == grpo_ds.launch_devices ]]; then
        shift 2
        exec "{python}" -c '
    import os, sys
    from grpo_ds.launch_devices import launch_devices
    n = int(sys.argv[2]) if len(sys.argv) > 2 else None
    print(",".join(map(str, launch_devices(os.environ, "cuda", 8, n) or [])))' "$@"
    fi
    exec "{python}" "$@"
""")


def run_multinode(tmp_path, env: dict) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "python"
    wrapper.write_text(LAUNCH_DEVICES_ON_8_GPUS.replace("{python}", sys.executable))
    wrapper.chmod(0o755)
    full = {**os.environ, "PYTHON": str(wrapper), "DRY_RUN": "1", "NNODES": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **env}
    full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full['PATH']}"
    return subprocess.run([ROOT / "launch" / "multinode.sh", "--train.prompts_per_step=8",
                           "--train.micro_batch_size=8"],
                          cwd=ROOT, env=full, capture_output=True, text=True, timeout=120,
                          check=False)


def test_multinode_no_ssh_node_keeps_its_assigned_gpus(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8\n")
    result = run_multinode(tmp_path, {"NODE_RANK": "1", "HOSTFILE": str(hostfile),
                                      "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert result.returncode == 0, result.stderr
    assert "preflight: 2 nodes (node-a, node-b), 8 ranks, config OK" in result.stdout
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    include = command[command.index("--include") + 1]
    assert include == "node-a:0,1,2,3@node-b:4,5,6,7"
    assert "--num_gpus" not in command and "--num_nodes" not in command  # exclusive with it
    # DeepSpeed's own parser over the hostfile: node 1's launcher sets CUDA_VISIBLE_DEVICES=4..7
    assert parsed_resources({"node-a": 8, "node-b": 8}, include) == {
        "node-a": [0, 1, 2, 3], "node-b": [4, 5, 6, 7]}


def test_multinode_generated_hostfile_has_slots_for_the_assigned_gpus(tmp_path):
    # NPROC_PER_NODE unset: the node's 2 assigned GPUs are its ranks
    result = run_multinode(tmp_path, {"NODE_RANK": "0", "CUDA_VISIBLE_DEVICES": "6,7"})
    assert result.returncode == 0, result.stderr
    assert "preflight: 2 nodes (node0, node1), 4 ranks, config OK" in result.stdout
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[command.index("--include") + 1] == "node0:6,7@node1:0,1"


def test_multinode_refuses_a_gpu_uuid_before_launch(tmp_path):
    result = run_multinode(tmp_path, {"NODE_RANK": "0", "CUDA_VISIBLE_DEVICES": "GPU-1234"})
    assert result.returncode != 0
    assert "CUDA_VISIBLE_DEVICES='GPU-1234'" in result.stderr


# ---- CPUs -------------------------------------------------------------------------------------


def test_per_rank_core_binding_follows_numactl(tmp_path):
    env = {"NODE_RANK": "0", "NPROC_PER_NODE": "1"}
    if shutil.which("numactl"):
        result = run_multinode(tmp_path, {**env, "BIND_CORES_TO_RANK": "1"})
        assert result.returncode == 0, result.stderr
        command = shlex.split(result.stdout.strip().splitlines()[-1])
        cores = command[command.index("--bind_core_list") + 1]
        assert cores == ",".join(map(str, sorted(os.sched_getaffinity(0))))
        assert "--bind_cores_to_rank" in command
    else:
        result = run_multinode(tmp_path, {**env, "BIND_CORES_TO_RANK": "1"})
        assert result.returncode == 2 and "needs numactl" in result.stderr
        result = run_multinode(tmp_path, {**env, "BIND_CORES_TO_RANK": "auto"})
        assert result.returncode == 0 and "ranks are not bound to cores" in result.stdout
        assert "--bind_cores_to_rank" not in result.stdout
    result = run_multinode(tmp_path, {**env, "BIND_CORES_TO_RANK": "yes"})
    assert result.returncode == 2 and "must be 0, 1 or auto" in result.stderr


# ---- collective timeout -----------------------------------------------------------------------


TIMEOUT_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import grpo_ds.train as train

    def report(cfg):
        import torch.distributed as dist
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        with open(sys.argv[1], "w") as f:
            json.dump({"seconds": backend.options._timeout.total_seconds()}, f)
        return 0

    train.train = report  # the rank's work after init_distributed: read the process group
    sys.exit(train.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("override, seconds", [("--deepspeed.timeout_minutes=2.5", 150.0),
                                                (None, 600.0)])
def test_timeout_minutes_reaches_the_process_group(tmp_path, override, seconds):
    out = tmp_path / "timeout.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port())}
    env.pop("DEEPSPEED_TIMEOUT", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", TIMEOUT_SCRIPT, str(out),
                           *([override] if override else [])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["seconds"] == seconds  # None: DeepSpeed's 10 minutes


@pytest.mark.parametrize("value", ["0", "-1"])
def test_timeout_minutes_must_be_positive(value):
    cfg = load_config(None, [f"--deepspeed.timeout_minutes={value}"])
    with pytest.raises(ConfigError, match=f"deepspeed.timeout_minutes={float(value)!r}"):
        validate(cfg, 2)
