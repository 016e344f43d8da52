"""Two "nodes" on this machine: two launch/multinode.sh invocations in no_ssh mode, node rank 0
and node rank 1, one rank each, rendezvous at 127.0.0.1. They train GRPO steps with ZeRO-3
across the two launchers, exactly as two SLURM nodes would, and the DeepSpeed config enables
DeepSpeed's csv monitor, which must receive our scalars.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multirank import free_port

pytestmark = pytest.mark.multirank

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--warmup.max_steps=20", "--warmup.eval_every=10", "--warmup.batch_size=32",
        "--train.steps=2", "--train.eval_every=0", "--task.eval_size=64",
        "--train.prompts_per_step=8", "--rollout.group_size=4", "--train.micro_batch_size=16",
        "--output.save_model=false", "--output.log_samples_every=1"]


def start_node(node_rank: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHON": sys.executable, "NNODES": "2", "NODE_RANK": str(node_rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NPROC_PER_NODE": "1",
           "DEEPSPEED_TIMEOUT": "3",  # minutes: a lost peer fails the other node, not hangs it
           "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([ROOT / "launch" / "multinode.sh", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_nodes")
    preset = json.loads((ROOT / "grpo_ds" / "ds_configs" / "zero3.json").read_text())
    preset["csv_monitor"] = {"enabled": True, "output_path": str(tmp / "csv"), "job_name": "grpo"}
    (tmp / "ds.json").write_text(json.dumps(preset))
    args = [*TINY, f"--output.run_dir={tmp / 'run'}", f"--deepspeed.config={tmp / 'ds.json'}"]
    port = free_port()
    start = time.time()
    nodes = [start_node(rank, port, args, tmp / f"node{rank}.log") for rank in (0, 1)]
    try:
        codes = [node.wait(timeout=400) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    logs = [(tmp / f"node{rank}.log").read_text() for rank in (0, 1)]
    return {"codes": codes, "logs": logs, "run": tmp / "run", "csv": tmp / "csv" / "grpo",
            "seconds": time.time() - start}


def test_two_node_launch_trains_grpo_steps_on_zero3(two_nodes):
    for code, log in zip(two_nodes["codes"], two_nodes["logs"]):
        assert code == 0, log[-4000:]
    summary = json.loads((two_nodes["run"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    rows = [json.loads(line) for line in (two_nodes["run"] / "metrics.jsonl").read_text().split("\n")
            if line]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    # One rank per node: each launcher saw a 2-node world and started only its own rank.
    assert "nnodes=2, num_local_procs=1, node_rank=0" in two_nodes["logs"][0]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in two_nodes["logs"][1]
    assert all(f"memory/peak_bytes_rank{r}" in steps[0] for r in (0, 1))
    print(f"two-node launch took {two_nodes['seconds']:.0f} s")


def test_only_rank_0_speaks(two_nodes):
    node0, node1 = two_nodes["logs"]
    for line in ("step 1/2", "step 2/2", "GRPO start"):
        assert node0.count(line) == 1
        assert line not in node1
    assert "warm-up step" not in node1
    assert "Warning" not in node1  # Python warnings of the non-zero rank are silenced


def test_deepspeed_csv_monitor_receives_our_scalars(two_nodes):
    rows = [json.loads(line) for line in (two_nodes["run"] / "metrics.jsonl").read_text().split("\n")
            if line]
    by_step = {row["step"]: row for row in rows if "loss" in row}
    lines = (two_nodes["csv"] / "reward.csv").read_text().split()
    assert lines[0] == "step,reward"
    logged = {int(step): float(value) for step, value in (line.split(",") for line in lines[1:])}
    assert logged == {step: by_step[step]["reward"] for step in (1, 2)}
    assert (two_nodes["csv"] / "completions_mean_length.csv").is_file()
    # csv is not TensorBoard: our own event file is still written.
    assert list((two_nodes["run"] / "tensorboard").glob("events.out.tfevents.*"))
