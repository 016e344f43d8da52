"""Run under `deepspeed --num_gpus 2`: two GRPO steps with grpo.refill_max_rounds=3 on the real
ZeRO-3 engine, where the ranks need different numbers of refill rounds.

The reward is scripted per rank by its call count (one call per sampled round):
- rank 0 ties on its calls 1 and 2, then never: step 1 needs 2 refill rounds, step 2 none;
- rank 1 ties from its call 2 on: step 1 needs none, step 2 runs out of its 3 rounds.
So in each step one rank samples while the other is full; the full one must still join every
round's (collective) generation, or the launch hangs. Writes OUT_DIR/rank{r}.json with, per step,
the rank's generate calls and what grpo_step returned."""

import json
import sys
from functools import partial
from pathlib import Path

import deepspeed.comm as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for tests.tiny_models

from grpo_ds.build import build_run
from grpo_ds.config import load_config
from grpo_ds.engine import finish_rank, init_distributed
from grpo_ds.tasks.arithmetic import ArithmeticSource, ArithmeticTask
from grpo_ds.trainer import grpo_step
from tests.tiny_models import save_arithmetic_lm

GROUP = 4
CALLS = [0]


def scripted(prompts, completions, **kwargs):
    """All 0 (every group ties) on the calls this rank is scripted to tie, else one 1.0 per
    group (no group ties)."""
    CALLS[0] += 1
    rank, call = dist.get_rank(), CALLS[0]
    tie = call in (1, 2) if rank == 0 else call >= 2
    return [0.0 if tie else float(i % GROUP == 0) for i in range(len(completions))]


class CountingRollout:
    """The real rollout backend, with its generate calls counted."""

    def __init__(self, backend):
        self.backend, self.calls = backend, 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.backend.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def main() -> None:
    out_dir = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, [f"--output.run_dir={out_dir}", "--train.steps=2",
                             "--train.prompts_per_step=4", f"--rollout.group_size={GROUP}",
                             "--train.micro_batch_size=4", "--grpo.beta=0.0",
                             "--rollout.max_new_tokens=6", "--grpo.filter_tied_groups=true",
                             "--grpo.refill_max_rounds=3", "--train.lr=0.01"])
    model_dir = out_dir / "init_model"
    if rank == 0:
        save_arithmetic_lm(model_dir)
    dist.barrier()
    source = ArithmeticSource(ArithmeticTask(digits=2, eval_size=8), cfg.train.prompts_per_step,
                              rank, world, seed=0)
    # the builder `grpo-ds train` uses: plan, device, engines, rollout
    run = build_run(cfg, rank, world, str(model_dir), source=source, reward_fns=[scripted],
                    say=lambda _: None)
    cfg, plan, policy = run.setup.cfg, run.setup.plan, run.engines.policy
    tokenizer, rollout = run.engines.tokenizer, CountingRollout(run.engines.rollout)
    steps = []
    for step in (1, 2):
        before = rollout.calls
        print(f"PHASE rank {rank} step {step}", flush=True)
        result = grpo_step(
            cfg, plan, policy, None, rollout, tokenizer, source.step_rows(step), [scripted],
            ["scripted"], step, refill_rows=partial(source.refill_rows, step))
        batch, rewards, metrics = result.batch, result.rewards, result.metrics
        steps.append({"generate_calls": rollout.calls - before,
                      "rows": len(batch), "trained_rows": int((batch.completion_mask.sum(1) > 0)
                                                                .sum()),
                      "rewards": rewards.tolist(),
                      **{k: v for k, v in metrics.items()
                         if k.startswith("refill/") or k in ("loss", "filtered_groups_fraction")}})
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"world": world, "steps": steps}))
    dist.barrier()


if __name__ == "__main__":
    main()
    finish_rank(0)
