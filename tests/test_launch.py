"""launch/ scripts: the commands they build, and launch failures that must end fast with a reason.

The scripts run for real. SLURM is not installed here, so the sbatch test puts two small stand-ins
for `srun` and `scontrol` on PATH: srun runs the task once per node with SLURM_NODEID set, as
Slurm does, and the per-node commands are printed (DRY_RUN=1), not launched.
"""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def run(command, env=None, timeout=120):
    """Run a launch script from the repo root with extra environment variables."""
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def last_line(text: str) -> list[str]:
    return shlex.split(text.strip().splitlines()[-1])


@pytest.fixture
def busy_port():
    """A port with a live listener on it, as another job's rendezvous would be."""
    with socket.socket() as listener:
        listener.bind(("", 0))
        listener.listen(1)
        yield listener.getsockname()[1]


def test_local_sh_runs_the_default_with_no_arguments():
    result = run([LAUNCH / "local.sh"], env={"DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == ["grpo-ds", "train"]


def test_local_sh_maps_environment_to_overrides_and_passes_arguments_on():
    env = {"DRY_RUN": "1", "NPROC": "4", "CONFIG": "my.yaml", "DS_CONFIG": "ds.json",
           "MASTER_PORT": "29999"}
    result = run([LAUNCH / "local.sh", "--train.steps=3", "--output.run_dir=/tmp/a b"], env=env)
    assert last_line(result.stdout) == [
        "grpo-ds", "train", "my.yaml", "--deepspeed.num_gpus=4", "--deepspeed.config=ds.json",
        "--deepspeed.master_port=29999", "--train.steps=3", "--output.run_dir=/tmp/a b"]


def test_multinode_no_ssh_mode_builds_one_launcher_per_node():
    port = str(free_port())
    env = {"DRY_RUN": "1", "NNODES": "2", "MASTER_ADDR": "10.0.0.5", "NPROC_PER_NODE": "1",
           "MASTER_PORT": port}
    commands = []
    for node_rank in ("0", "1"):
        result = run([LAUNCH / "multinode.sh", "--train.steps=2"],
                     env={**env, "NODE_RANK": node_rank})
        assert result.returncode == 0, result.stderr
        assert "preflight: 2 nodes (node0, node1), 2 ranks, config OK" in result.stdout
        commands.append(last_line(result.stdout))
    for node_rank, command in enumerate(commands):
        flags = " ".join(command)
        assert f"--no_ssh --node_rank {node_rank} --master_addr 10.0.0.5" in flags
        assert f"--master_port {port}" in flags and "--num_gpus 1" in flags
        assert "--num_nodes 2" in flags
        assert command[-3:] == ["--module", "grpo_ds.train", "--train.steps=2"]


def test_sbatch_starts_the_no_ssh_launcher_on_every_node_with_its_rank(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The first host must resolve here (the preflight checks MASTER_ADDR): localhost.
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'localhost\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n# stand-in: one task per node, in turn, with the node's SLURM_NODEID\n"
        "echo \"srun options: ${*%%bash*}\"\n"
        "while [[ $1 == -* ]]; do shift; done\n"
        "for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n \"$@\" || exit $?; done\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "localhost,gpu-b", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT), "NPROC_PER_NODE": "1",
           "SLURM_CPUS_PER_TASK": "6",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = run(["bash", LAUNCH / "slurm" / "grpo.sbatch", "--train.steps=2"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    launches = [line for line in result.stdout.splitlines() if "deepspeed.launcher.runner" in line]
    assert len(launches) == 2
    # each node's task gets the job's CPUs per task, bound to cores (srun does not inherit them)
    assert "srun options: --ntasks-per-node=1 --cpus-per-task=6 --cpu-bind=cores" in result.stdout
    # The generated hostfile names the allocation's hosts, in scontrol's order.
    assert result.stdout.count("preflight: 2 nodes (localhost, gpu-b), 2 ranks, config OK") == 2
    for node_rank, line in enumerate(launches):
        # Rendezvous on the first host of the allocation, at a port derived from the job id.
        assert f"--no_ssh --node_rank {node_rank} --master_addr localhost" in line
        assert "--master_port 24242" in line  # 20000 + 4242 % 20000
        assert line.rstrip().endswith("--module grpo_ds.train --train.steps=2")


def test_busy_master_port_fails_fast_naming_the_port(busy_port):
    start = time.time()
    result = run([shutil.which("grpo-ds") or "grpo-ds", "train",
                  f"--deepspeed.master_port={busy_port}"], timeout=60)
    assert result.returncode == 2
    assert f"master port {busy_port} is already in use" in result.stderr
    assert time.time() - start < 30  # before any rank starts: no hang, no long traceback


def test_tcmalloc_asked_for_and_missing_fails_before_launch(monkeypatch, capsys):
    from grpo_ds import cli
    from grpo_ds.cpu import host_memory

    monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    started = []
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: started.append(a))
    assert cli.main(["train", "--deepspeed.host_allocator=tcmalloc"]) == 2
    assert not started
    assert "deepspeed.host_allocator=tcmalloc: libtcmalloc not found" in capsys.readouterr().err


def test_busy_master_port_fails_node_0_of_a_multinode_launch(busy_port):
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1",
           "MASTER_PORT": str(busy_port)}
    result = run([LAUNCH / "multinode.sh"], env=env, timeout=60)
    assert result.returncode == 2
    assert f"master port {busy_port} is already in use" in result.stderr


def test_bad_hostfile_entry_fails_before_launch(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=1\nworker-1 slots=one\n")
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1",
           "HOSTFILE": str(hostfile)}
    result = run([LAUNCH / "multinode.sh"], env=env, timeout=60)
    assert result.returncode == 2
    assert "bad entry: worker-1 slots=one" in result.stderr  # DeepSpeed's parser, named line


def test_unresolvable_master_address_fails_before_launch():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "no-such-host.invalid",
           "NPROC_PER_NODE": "1"}
    result = run([LAUNCH / "multinode.sh"], env=env, timeout=60)
    assert result.returncode == 2
    # Otherwise node 1 would wait for a rendezvous that never comes, DEEPSPEED_TIMEOUT long.
    assert "MASTER_ADDR='no-such-host.invalid' does not resolve" in result.stderr


def test_node_rank_outside_the_node_count_is_refused():
    env = {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1"}
    result = run([LAUNCH / "multinode.sh"], env=env, timeout=60)
    assert result.returncode == 2
    assert "NODE_RANK=2 is outside 0..1" in result.stderr


def test_a_config_that_does_not_divide_over_the_nodes_fails_before_launch():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "2"}
    result = run([LAUNCH / "multinode.sh", "--train.prompts_per_step=6"], env=env, timeout=60)
    assert result.returncode == 2
    # 6 prompts over 2 nodes x 2 ranks = 4 ranks: the preflight names the world size and field.
    assert "for 4 ranks on 2 nodes" in result.stderr
    assert "train.prompts_per_step=6" in result.stderr
