"""The per-rank training entry point: `deepspeed [launcher args] --module grpo_ds.train [CONFIG] [--section.key=value ...]`.

`grpo-ds train` starts exactly this under the `deepspeed` launcher; users with their own hostfile
or SLURM script launch it themselves. It wires the parts together and hands over to the loop in
`trainer.py`.
"""

from __future__ import annotations

if __name__ == "__main__":  # a rank: tie it to its job before the slow imports (lifeline.py)
    from grpo_ds.lifeline import tie_rank_to_job

    tie_rank_to_job()

import json  # after the tie: a kill during these imports ends the rank too
import math
import os
import sys
import time
from pathlib import Path

import deepspeed.comm as dist

from grpo_ds.build import Run, build_engines, build_inputs
from grpo_ds.checkpoint import Checkpointer, RunState, checkpoint_root, prepare_resume, resume_point
from grpo_ds.config import Config, load_config, validate
from grpo_ds.cpu.host_memory import active_host_allocator
from grpo_ds.engine import finish_rank, init_distributed
from grpo_ds.failures import PREEMPTED_EXIT_CODE, run_rank
from grpo_ds.faults import install_from_env
from grpo_ds.metrics import RunLogger
from grpo_ds.model import save_hf_model
from grpo_ds.preflight import ARITHMETIC_COLUMNS, check_rewards, row_columns
from grpo_ds.run_lock import RunDirError, rank_lock
from grpo_ds.trainer import run_grpo, summary_path
from grpo_ds.warmup import warm_start


def parse_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] [--section.key=value ...]; drops the launcher's --local_rank."""
    args = [a for a in argv if not a.startswith("--local_rank")]
    config = args[0] if args and not args[0].startswith("--") else None
    return config, args[1:] if config else args


def source_columns(cfg: Config, source) -> dict[str, list[str]]:
    """The columns reward functions get, per file (for check_rewards)."""
    if cfg.task.name in ("arithmetic", "tool_arithmetic"):
        return {f"the built-in {cfg.task.name} task": list(ARITHMETIC_COLUMNS)}
    columns = {cfg.data.train_path: row_columns(source.train_rows)}
    if cfg.data.eval_path and source.eval_rows():
        columns[cfg.data.eval_path] = row_columns(source.eval_rows())
    return columns


def strict_json(value):
    """`value` with NaN and inf floats as None: summary.json is strict JSON (null = no value)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_argv(sys.argv[1:] if argv is None else argv)
    cfg = load_config(config_path, overrides)
    init_distributed(cfg.deepspeed.timeout_minutes)
    install_from_env()  # GRPO_DS_FAULT: the failure tests' faults; unset, nothing
    try:  # launched without `grpo-ds train`: rank 0 holds the run dir (nothing is written first)
        lock = rank_lock(cfg.output.run_dir, dist.get_rank())  # noqa: F841 - held until exit
    except RunDirError as err:
        print(f"grpo-ds: {err}", file=sys.stderr, flush=True)
        os._exit(2)
    # An exception on any rank is printed once and ends this rank at once; the launcher then
    # stops the others.
    return run_rank(lambda: train(cfg), dist.get_rank(), cfg.output.run_dir)


def train(cfg: Config) -> int:
    """One rank's run: warm-up or resume, the engines, the GRPO loop, the model and summary."""
    rank, world = dist.get_rank(), dist.get_world_size()
    validate(cfg, world)
    start = time.time()
    run_dir = Path(cfg.output.run_dir)
    resume_from, state = resume_point(cfg)
    logger = RunLogger(run_dir, rank, cfg.train.steps, cfg.output.quiet)
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    # every `auto` resolved for this accelerator; from here on cfg holds what the run uses
    setup, inputs = build_inputs(cfg, rank, world, say=logger.print)
    cfg, source = setup.cfg, inputs.source
    counts = getattr(source, "counts", {})  # prompts truncated / dropped for length
    if counts:
        logger.print(", ".join(f"{k.split('/')[-1].replace('_', ' ')}: {v}"
                               for k, v in counts.items()))
        logger.scalars(0, counts)
    check_rewards(cfg, {s: f for s, f in zip(cfg.rewards.functions, inputs.reward_fns)
                        if not s.startswith("model:")}, source_columns(cfg, source))

    model_path, warmup_curve, ds = cfg.model.path, None, setup.ds
    if state is not None:  # resuming: no warm-up; the start model is also the reference
        model_path, warmup_curve = cfg.model.path or state.model_path, state.warmup_curve
        ds = prepare_resume(resume_from, state, dict(ds), logger.print)
    elif model_path is None:
        model_path, warmup_curve = warm_start(setup, source, inputs.tokenizer, logger,
                                              inputs.reward_fns[0])
    engines = build_engines(setup, model_path, ds, say=logger.print)
    adapters = engines.adapters
    checkpointer = Checkpointer(engines.policy, checkpoint_root(cfg), cfg.checkpoint.keep_last, source,
                                logger.print)
    if state is not None:
        checkpointer.load(resume_from, state)
    else:
        state = RunState(model_path=str(Path(model_path).resolve()), world_size=world,
                         warmup_curve=warmup_curve)
    if adapters is not None:
        from grpo_ds.lora import adapter_config_dict

        state.adapter_config = adapter_config_dict(adapters)

    result = run_grpo(Run(setup, inputs, engines), logger, state, checkpointer)
    if result["preempted"]:
        logger.close()
        return PREEMPTED_EXIT_CODE
    save_model(cfg, engines, run_dir)
    # Accuracies are null when there is no held-out set (the evaluation of nothing is NaN).
    summary = {"accuracy_before": result["accuracy_before"],
               "accuracy_after": result["accuracy_after"], "steps": cfg.train.steps,
               "wall_seconds": round(time.time() - start, 1), "world_size": world,
               "host_allocator": active_host_allocator(),
               "eval_curve": result["eval_curve"], "warmup_curve": warmup_curve}
    if rank == 0:
        write_summary(cfg.output.run_dir, summary, logger)
    logger.close()
    dist.barrier()
    return 0


def save_model(cfg: Config, engines, run_dir: Path) -> None:
    """The trained model as a HF directory; with LoRA the PEFT adapter and the merged model."""
    if not cfg.output.save_model:
        return
    if engines.adapters is not None:
        from grpo_ds.lora import save_adapter_and_merged

        save_adapter_and_merged(engines.policy, engines.adapters, engines.tokenizer, run_dir,
                                cfg.model.dtype)
    else:
        save_hf_model(engines.policy, engines.tokenizer, run_dir / "model", cfg.model.dtype)


def write_summary(run_dir: str, summary: dict, logger) -> None:
    """summary.json as strict JSON (NaN and inf as null), and its scalars on the console."""
    summary = strict_json(summary)
    summary_path(run_dir).write_text(json.dumps(summary, indent=2, allow_nan=False))
    logger.print(json.dumps({k: v for k, v in summary.items() if not k.endswith("curve")}))

if __name__ == "__main__":
    finish_rank(main())
