"""Reference placements (`deepspeed.reference_placement`): `cpu_offload` and `sharded` build a
frozen ZeRO-3 engine, partitioned over the ranks, that scores exactly like the policy loaded from
the same directory; `none` builds nothing.

The test launches this very file on 2 ranks (`deepspeed --num_gpus 2 tests/test_reference_placement.py
OUT`); each rank writes what it saw to OUT/rank{r}.json, and the test reads both.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def rank_main(out_dir: Path) -> None:
    import deepspeed.comm as dist
    import torch

    from grpo_ds.config import deepspeed_config, load_config, validate
    from grpo_ds.device import resolve_config
    from grpo_ds.engine import build_policy, build_reference, init_distributed, load_sharded
    from grpo_ds.tools.bench.common import memory_status
    from tests.tiny_models import save_causal_lm, text_tokenizer

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, ["--train.prompts_per_step=2", "--rollout.group_size=2",
                             "--train.micro_batch_size=2", "--model.dtype=float32"])
    cfg, _ = resolve_config(cfg)  # every `auto` for this accelerator, as train.py
    ds = deepspeed_config(cfg, validate(cfg, world))
    model_dir = out_dir / "model"
    if rank == 0:
        save_causal_lm(model_dir, text_tokenizer())
    dist.barrier()
    lm, tokenizer = load_sharded(str(model_dir), ds, "float32")
    policy = build_policy(lm, ds, chunk_size=8, gradient_checkpointing=False)
    prompt = tokenizer(["2+2=", "10-3="], padding=True, return_tensors="pt")
    completion = torch.tensor([[5, 6, 7], [8, 9, 10]])
    input_ids = torch.cat([prompt["input_ids"], completion], dim=1)
    mask = torch.cat([prompt["attention_mask"], torch.ones_like(completion)], dim=1)
    with torch.no_grad():
        policy_logprobs, _ = policy(input_ids, mask, completion)
    report = {}
    for placement in ("cpu_offload", "sharded", "none"):
        before = memory_status()["rss"]
        reference = build_reference(lambda d: load_sharded(str(model_dir), d, "float32")[0], ds,
                                    placement, chunk_size=8)
        if reference is None:
            report[placement] = None
            continue
        params = list(reference.module.parameters())
        with torch.no_grad():
            ref_logprobs, _ = reference(input_ids, mask, completion)
        report[placement] = {
            "offload_param": str(getattr(reference.zero_offload_param(), "device", None)),
            "stage": reference.zero_optimization_stage(),
            "trainable": sum(p.requires_grad for p in params),
            "local_fraction": sum(p.ds_tensor.numel() for p in params)
            / sum(p.ds_numel for p in params),
            "max_abs_diff_vs_policy": (ref_logprobs - policy_logprobs).abs().max().item(),
            "rss_added_bytes": memory_status()["rss"] - before,
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()


@pytest.mark.multirank
def test_reference_placements_build_partitioned_frozen_engines_and_none_skips(tmp_path):
    from tests.multirank import free_port

    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
               "--master_port", str(free_port()), __file__, str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # Own process group: on a timeout the launcher AND its ranks are killed, not orphaned.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["none"] is None  # beta = 0: no reference engine at all
        offload = {"cpu_offload": "OffloadDeviceEnum.cpu", "sharded": "None"}
        for placement, device in offload.items():
            r = report[placement]
            assert r["offload_param"] in (device, device.split(".")[-1]), placement
            assert r["stage"] == 3 and r["trainable"] == 0
            # each of the 2 ranks holds about half (the tiny model's partitions round up)
            assert 0.4 < r["local_fraction"] < 0.6, placement
            # same weights as the policy: the same log-probs
            assert r["max_abs_diff_vs_policy"] < 1e-5, placement


if __name__ == "__main__":
    rank_main(Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))))
