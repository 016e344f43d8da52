"""RunLogger: the console line, metrics.jsonl and TensorBoard, DeepSpeed's monitors, peak memory."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grpo_ds.metrics import RunLogger, format_seconds, peak_memory_bytes


def events(log_dir):
    """Everything TensorBoard's own reader finds under log_dir."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                                "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_progress_line_names_step_reward_kl_length_time_and_eta(tmp_path, capsys):
    logger = RunLogger(tmp_path, rank=0, total_steps=10)
    capsys.readouterr()  # importing DeepSpeed may log its accelerator choice
    values = {"reward": 0.5, "kl": 0.01, "completions/mean_length": 3.0, "time/step": 2.0}
    logger.progress(1, values)
    # First line: the step's own 2.0 s is the only interval; 9 steps left -> 18 s.
    assert capsys.readouterr().out == \
        "step 1/10  reward 0.500  kl 0.0100  len 3.0  2.00s/step  eta 18s\n"
    logger.last_progress = time.time() - 4.0  # step 2 came 4 s after step 1 (an eval, say)
    logger.progress(2, {**values, "eval/accuracy": 0.25})
    # Mean interval (2 + 4) / 2 = 3 s, times 8 steps left = 24 s; the eval shows at the end.
    assert capsys.readouterr().out.endswith("eta 24s  eval 0.250\n")
    logger.close()


@pytest.fixture
def restore_library_logging():
    """A rank-1 RunLogger quiets transformers, datasets and DeepSpeed process-wide: undo it."""
    import logging

    import datasets.utils.logging as datasets_logging
    import transformers.utils.logging as hf_logging

    saved = (hf_logging.get_verbosity(), datasets_logging.get_verbosity(),
             logging.getLogger("DeepSpeed").level, hf_logging.is_progress_bar_enabled(),
             datasets_logging.is_progress_bar_enabled())
    yield
    hf_logging.set_verbosity(saved[0])
    datasets_logging.set_verbosity(saved[1])
    logging.getLogger("DeepSpeed").setLevel(saved[2])
    if saved[3]:
        hf_logging.enable_progress_bar()
    if saved[4]:
        datasets_logging.enable_progress_bar()


def test_quiet_mode_and_other_ranks_print_nothing(tmp_path, capsys, restore_library_logging):
    quiet = RunLogger(tmp_path / "quiet", rank=0, total_steps=5, quiet=True)
    capsys.readouterr()  # importing DeepSpeed may log its accelerator choice
    quiet.progress(1, {"reward": 1.0, "time/step": 1.0})
    quiet.close()
    import transformers.utils.logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()  # no "Writing model shards" bars in job logs
    other = RunLogger(tmp_path / "rank1", rank=1, total_steps=5)
    other.print("hello")
    other.progress(1, {"reward": 1.0, "time/step": 1.0})
    other.scalars(1, {"reward": 1.0})
    other.close()
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "rank1").exists()  # rank 1 writes no files either


def test_format_seconds():
    assert format_seconds(7.2) == "7s"
    assert format_seconds(95) == "1m35s"  # 60 + 35
    assert format_seconds(3725) == "1h02m05s"  # 3600 + 2 * 60 + 5


def test_scalars_reach_jsonl_and_tensorboard_once_per_step(tmp_path):
    logger = RunLogger(tmp_path, rank=0, total_steps=2)
    for step in (1, 2):
        logger.scalars(step, {"reward": 0.5 * step, "kl": 0.1, "kl/sum": 9.0,
                              "clip_ratio/low_sum": 3.0})
    logger.histogram(1, "rewards", torch.tensor([0.0, 1.0, 1.0]))
    logger.samples(1, ["1+1="], ["2"], [1.0])
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "reward": 0.5, "kl": 0.1}, {"step": 2, "reward": 1.0, "kl": 0.1}]
    tb = events(tmp_path / "tensorboard")
    assert sorted(tb.Tags()["scalars"]) == ["kl", "reward"]  # merge state left out
    assert [(e.step, e.value) for e in tb.Scalars("reward")] == [(1, 0.5), (2, 1.0)]
    assert tb.Tags()["histograms"] == ["rewards"]
    assert tb.Tags()["tensors"] == ["samples/text_summary"]


def test_peak_memory_bytes_sees_a_256_mib_allocation():
    with open("/proc/self/statm") as statm:
        rss_before = int(statm.read().split()[1]) * 4096
    block = torch.ones(64 * 2**20)  # 64 Mi float32 = 256 MiB, every page touched
    peak = peak_memory_bytes()
    del block
    # The peak includes the moment both the old pages and the block were resident.
    assert peak >= rss_before + 250 * 2**20


# DeepSpeed's MonitorMaster needs deepspeed.comm, so this runs in a fresh 1-rank process.
MONITOR_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=sys.argv[2])
    import deepspeed
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster
    from grpo_ds.metrics import RunLogger
    deepspeed.init_distributed(dist_backend="gloo")
    root = Path(sys.argv[1])
    for kind in ("tensorboard", "csv_monitor"):
        monitor = MonitorMaster(get_monitor_config(
            {kind: {"enabled": True, "output_path": str(root / kind), "job_name": "job"}}))
        logger = RunLogger(root / ("run_" + kind), rank=0, total_steps=2)
        logger.attach_monitor(monitor)
        for step in (1, 2):
            logger.scalars(step, {"reward": 0.25 * step, "time/step": 1.5})
            logger.histogram(step, "rewards", torch.tensor([0.0, 1.0]))
        logger.samples(2, ["1+1="], ["2"], [1.0])
        logger.close()
""")


@pytest.fixture(scope="module")
def monitor_runs(tmp_path_factory):
    from tests.multirank import free_port

    root = tmp_path_factory.mktemp("monitors")
    result = subprocess.run([sys.executable, "-c", MONITOR_SCRIPT, str(root), str(free_port())],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_deepspeed_tensorboard_monitor_is_the_only_event_writer(monitor_runs):
    tb = events(monitor_runs / "tensorboard" / "job")
    # Every scalar exactly once per step, plus our histograms and text, in DeepSpeed's directory.
    assert [(e.step, e.value) for e in tb.Scalars("reward")] == [(1, 0.25), (2, 0.5)]
    assert [e.step for e in tb.Scalars("time/step")] == [1, 2]
    assert [e.step for e in tb.Histograms("rewards")] == [1, 2]
    assert tb.Tags()["tensors"] == ["samples/text_summary"]
    run_dir = monitor_runs / "run_tensorboard"
    assert not (run_dir / "tensorboard").exists()
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 2


def test_deepspeed_csv_monitor_gets_every_scalar(monitor_runs):
    csv_dir = monitor_runs / "csv_monitor" / "job"
    # DeepSpeed's csv monitor: one file per tag, '/' -> '_', header "step,<last part of tag>".
    assert (csv_dir / "reward.csv").read_text().split() == ["step,reward", "1,0.25", "2,0.5"]
    assert (csv_dir / "time_step.csv").read_text().split() == ["step,step", "1,1.5", "2,1.5"]
    # csv is not TensorBoard, so our own event file still holds the scalars and histograms.
    tb = events(monitor_runs / "run_csv_monitor" / "tensorboard")
    assert [e.step for e in tb.Scalars("reward")] == [1, 2]
    assert [e.step for e in tb.Histograms("rewards")] == [1, 2]
