"""One way to build a run: the config plan, the device, the prompts, the rewards, the engines and
the rollout that `grpo-ds train` uses.

train.py, the warm-up and the benchmarks all build through here, so a benchmark times exactly
the program `grpo-ds train` runs (same classes, same rollout settings, same DeepSpeed config).
A benchmark may bring its own prompts and reward (`source`, `reward_fns`) and its own model
(`LoadModel`: the memory benchmark builds random weights under `zero.Init` from a shape, as
there is no 7B directory to load): those are its workload, not its wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from grpo_ds.config import BatchPlan, Config, deepspeed_config, validate
from grpo_ds.device import Device, prepare_device
from grpo_ds.engine import build_policy, build_reference, load_sharded
from grpo_ds.lora_checks import lora_enabled
from grpo_ds.model import DTYPES
from grpo_ds.rewards import load_reward_function
from grpo_ds.rollout.select import build_rollout

Say = Callable[[str], None]
# A ZeRO-3 DeepSpeed config -> (HF causal LM, partitioned as it is made; its tokenizer).
LoadModel = Callable[[dict], tuple]
# A phase's name ("policy_build", "reference_build") -> a context around it (a bench's meter).
Phase = Callable[[str], AbstractContextManager]


@dataclass
class RunPlan:
    """What a run is, before any model exists: every `auto` resolved for this accelerator."""

    cfg: Config  # the resolved config: what the run uses
    plan: BatchPlan  # per-rank batch arithmetic
    device: Device  # the device decisions and the per-model kernel hook
    ds: dict  # the policy's DeepSpeed config, every `auto` filled


@dataclass
class Engines:
    """The models a GRPO run trains and samples with."""

    policy: object  # the ZeRO-3 DeepSpeed engine over model.CausalLMWithLogprobs
    reference: object | None  # the frozen reference; None when beta = 0
    rollout: object  # select.ColocatedRollout over the policy (agents.MultiTurnRollout for tools)
    tokenizer: object  # the model directory's tokenizer (left padding)
    adapters: object | None = None  # the PeftModel around the policy's lm when model.lora is on


@dataclass
class Inputs:
    """What feeds the loop: this rank's prompts and the reward functions."""

    source: object  # step_rows(step), eval_rows(): this rank's prompt rows
    tokenizer: object  # the task's tokenizer (the engines bring the model's own)
    reward_fns: list  # callables as TRL calls them, or rewards.model.RewardModel
    reward_names: list[str]  # metric names, unique


@dataclass
class Run:
    """Everything `trainer.run_grpo` needs from the builder."""

    setup: RunPlan
    inputs: Inputs
    engines: Engines


def plan_run(cfg: Config, world: int, say: Say = print) -> RunPlan:
    """Validate (errors name the field before anything is probed), resolve the device, plan."""
    validate(cfg, world)
    device = prepare_device(cfg, say)
    plan = validate(device.cfg, world)
    return RunPlan(device.cfg, plan, device, deepspeed_config(device.cfg, plan))


def make_source(cfg: Config, rank: int, world: int):
    """(prompts, tokenizer) of the task: a built-in arithmetic task or a dataset."""
    if cfg.task.name == "tool_arithmetic":
        from grpo_ds.tasks import tool_arithmetic as tool

        task = tool.ToolArithmeticTask(cfg.task.digits, cfg.task.carry_drop, cfg.task.eval_size,
                                       cfg.task.seed)
        return tool.ToolArithmeticSource(task, cfg.train.prompts_per_step, rank, world,
                                         cfg.train.seed), tool.build_tokenizer()
    if cfg.task.name == "arithmetic":
        from grpo_ds.tasks.arithmetic import ArithmeticSource, ArithmeticTask, build_tokenizer

        task = ArithmeticTask(cfg.task.digits, cfg.task.carry_drop, cfg.task.eval_size,
                              cfg.task.seed)
        return ArithmeticSource(task, cfg.train.prompts_per_step, rank, world,
                                cfg.train.seed), build_tokenizer()
    from transformers import AutoTokenizer

    from grpo_ds.data_source import DatasetSource

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    return DatasetSource.from_config(cfg, rank, world, tokenizer), tokenizer


def names_of_rewards(specs: list[str]) -> list[str]:
    """Metric names: the function's name (a reward model's directory name), made unique."""
    names = [Path(s.removeprefix("model:")).name if s.startswith("model:")
             else s.rsplit(":", 1)[-1] for s in specs]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def load_rewards(cfg: Config, policy_ds: dict) -> list:
    """Reward functions by spec; `model:PATH` is a frozen classifier placed like the reference."""
    from grpo_ds.engine import reference_ds_config
    from grpo_ds.rewards.model import PREFIX, RewardModel

    placement = cfg.deepspeed.reference_placement
    placement = "cpu_offload" if placement == "none" else placement
    return [RewardModel(spec.removeprefix(PREFIX), reference_ds_config(policy_ds, placement),
                        cfg.train.micro_batch_size, DTYPES[cfg.model.dtype],
                        cfg.model.attn_implementation)
            if spec.startswith(PREFIX) else load_reward_function(spec)
            for spec in cfg.rewards.functions]


def from_directory(path: str, cfg: Config) -> LoadModel:
    """The model directory at `path`, partitioned at load under the config it is given."""
    return lambda ds: load_sharded(path, ds, cfg.model.dtype, cfg.model.attn_implementation)


def build_engines(setup: RunPlan, model: str | LoadModel, ds: dict | None = None,
                  say: Say = print, phase: Phase = nullcontext) -> Engines:
    """Policy (from `model`, a directory or a LoadModel, sharded as it is made, with LoRA
    adapters when model.lora is on), reference (when beta > 0: the same start model, or with
    LoRA the policy with its adapters off) and the configured rollout. `ds`: the policy's
    DeepSpeed config when it differs from the plan's (a resumed run's)."""
    cfg, ds = setup.cfg, ds or setup.ds
    load = from_directory(model, cfg) if isinstance(model, str) else model
    adapters = None
    with phase("policy_build"):
        lm, tokenizer = load(ds)
        if lora_enabled(cfg):
            from grpo_ds.lora import add_adapters

            adapters = add_adapters(lm, cfg.model.lora, cfg.train.seed)
        for line in setup.device.prepare_model(lm):
            say(line)
        policy = build_policy(lm, ds, cfg.train.logprob_chunk_size,
                              cfg.model.gradient_checkpointing)
    reference = None
    if cfg.grpo.beta > 0 and adapters is not None:  # the base, adapters off: no second model
        from grpo_ds.lora import AdapterFreeReference

        reference = AdapterFreeReference(policy, adapters)
    elif cfg.grpo.beta > 0:
        with phase("reference_build"):
            reference = build_reference(lambda ref_ds: load(ref_ds)[0], ds,
                                        cfg.deepspeed.reference_placement,
                                        cfg.train.logprob_chunk_size, setup.device.prepare_model)
    return Engines(policy, reference, build_rollout(cfg, policy, tokenizer), tokenizer,
                   adapters)


def build_inputs(cfg: Config, rank: int, world: int, source=None,
                 reward_fns: list | None = None, say: Say = print) -> tuple[RunPlan, Inputs]:
    """The run's plan, prompts and rewards; a benchmark passes its own `source` and
    `reward_fns` (its workload), named by their __name__."""
    setup = plan_run(cfg, world, say)
    tokenizer = None
    if source is None:
        source, tokenizer = make_source(setup.cfg, rank, world)
    if reward_fns is None:
        reward_fns = load_rewards(setup.cfg, setup.ds)
        names = names_of_rewards(setup.cfg.rewards.functions)
    else:
        names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(reward_fns)]
    return setup, Inputs(source, tokenizer, reward_fns, names)


def build_run(cfg: Config, rank: int, world: int, model_path: str | None = None,
              source=None, reward_fns: list | None = None, say: Say = print) -> Run:
    """A whole run from its config: plan, prompts, rewards, engines, rollout. `model_path`
    defaults to cfg.model.path."""
    setup, inputs = build_inputs(cfg, rank, world, source, reward_fns, say)
    engines = build_engines(setup, model_path or setup.cfg.model.path, say=say)
    return Run(setup, inputs, engines)
