"""Typed training configuration: YAML plus `--section.key=value` overrides, validated once.

This is the single place for batch arithmetic. One GRPO step samples `prompts_per_step` prompts x
`group_size` completions (the step's sequences), split evenly over ranks and then into micro-batches
of `micro_batch_size` sequences; the quotient is DeepSpeed's gradient-accumulation count.
`validate()` runs in the CLI before any rank starts, so a bad value fails in seconds with the field
and the value named, not minutes later inside a rank.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from grpo_ds.agents.config import MultiTurnConfig, validate_multiturn
from grpo_ds.config_bounds import bounds_problem
from grpo_ds.config_error import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


# Device-dependent choices: config names them, the device layer (grpo_ds/device.py) resolves
# every `auto` for the accelerator a rank runs on.
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
ATTN_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")
OPTIMIZER_CHOICES = ("auto", "torch_adamw", "fused_adam", "cpu_adam")
FUSED_LAYER_CHOICES = ("auto", "on", "off")
ROLLOUT_BACKENDS = ("hybrid",)  # grpo_ds/rollout/select.py
PACKED_WEIGHT_CHOICES = ("auto", "on", "off")
ONEDNN_LINEAR_CHOICES = ("auto", "on", "off")
HOST_ALLOCATORS = ("auto", "tcmalloc", "system")


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (grpo_ds/lora.py, through PEFT): only they train."""

    rank: int | None = None
    """Adapter rank r; 0 or null = LoRA off (full fine-tuning)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's update is (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (never in generation or the reference)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. q_proj,v_proj), or all-linear: every Linear but lm_head."""
    adapter_path: str | None = None
    """A PEFT adapter directory to start from (its rank, alpha and targets replace the above)."""

    @property
    def enabled(self) -> bool:
        return bool(self.rank)


@dataclass
class ModelConfig:
    path: str | None = None
    """Local Hugging Face model directory. None builds the embedded default task's tiny Llama."""
    dtype: str = "auto"
    """Training dtype: auto (bfloat16 on a GPU that supports it, float32 on CPU), float32 or
    bfloat16 (fp16 is unreliable on CPU and not offered)."""
    attn_implementation: str = "auto"
    """Attention of the policy, reference and reward model: auto (flash_attention_2 on a GPU
    where flash_attn is installed and the run is bf16, else sdpa), sdpa, eager, or
    flash_attention_2. The rollout's shared-prefix decode runs with sdpa and eager only."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    fused_layers: str = "auto"
    """CPU: decoder layers with fused matmuls, RMSNorm and rotary (grpo_ds/cpu/fused_layers.py):
    auto (Llama, Mistral, Qwen2 on CPU; HF's layers for other models and on a GPU), on (error
    if unsupported), off."""
    onednn_linears: str = "auto"
    """CPU: every Linear's forward and input gradient on oneDNN (grpo_ds/cpu/onednn_linear.py):
    auto (float32 on an AVX-512 CPU, where it is faster than torch's default MKL; off on a
    GPU), on (error if unsupported), off."""
    hidden_size: int = 128
    """Built-in model only: width of the Llama built for the default task."""
    num_layers: int = 2
    """Built-in model only: number of decoder layers."""
    num_heads: int = 4
    """Built-in model only: attention heads."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA: `--model.lora.rank=8` trains adapters on a frozen base, and the KL reference is the
    base itself (adapters off): no second model."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    """Built-in synthetic task (`arithmetic`) or `dataset` to train on `data`. Left unset, a
    `data.train_path` selects `dataset`; `arithmetic` set explicitly with one is an error."""
    digits: int = 2
    """arithmetic: operands have 1..digits digits."""
    carry_drop: float = 0.75
    """arithmetic: fraction of carrying problems whose demonstration drops the carry (bad SFT)."""
    eval_size: int = 512
    """arithmetic: held-out problems for greedy accuracy."""
    seed: int = 1234
    """arithmetic: seed of the problem generator (train and eval sets are disjoint)."""


@dataclass
class WarmupConfig:
    enabled: bool = True
    """Supervised warm-up on the task's (imperfect) demonstrations before GRPO."""
    max_steps: int = 1500
    """Upper bound on warm-up optimizer steps."""
    batch_size: int = 128
    """Demonstrations per warm-up optimizer step (global, all ranks)."""
    lr: float = 1e-3
    """Warm-up learning rate (AdamW)."""
    eval_every: int = 100
    """Evaluate held-out greedy accuracy every N warm-up steps (the plateau curve)."""
    patience: int = 3
    """Stop after this many evaluations without a gain of more than `min_gain`."""
    min_gain: float = 0.01
    """Accuracy gain that counts as progress for the plateau test."""
    zero_stage: int = 0
    """ZeRO stage of the warm-up engine. It stands in for a user's SFT model; plain data
    parallel (0) avoids ZeRO-3's per-layer gathers, which dominate a model this small."""


@dataclass
class DataConfig:
    train_path: str | None = None
    """Local JSON/JSONL/CSV/Parquet file (or a `datasets` name); setting it selects task=dataset."""
    eval_path: str | None = None
    """task=dataset: held-out file for periodic evaluation."""
    prompt_column: str = "prompt"
    """Column holding the prompt: text, or chat messages (TRL's conversational format), which
    the tokenizer's chat template formats."""
    answer_column: str = "answer"
    """Column holding the reference answer, passed to rewards as `answer` (if the data lacks
    it, only rewards that need `answer` fail, before launch)."""
    system_prompt: str | None = None
    """Conversational or chat-template prompts: a system message put first; plain-text
    prompts: text put before each prompt, separated by a blank line."""
    shuffle: bool = True
    """Shuffle the prompts each epoch (seeded by train.seed); false visits them in file order."""
    template: str | None = None
    """Prompt template using column names, e.g. `Question: {question}\\nAnswer:`."""
    use_chat_template: bool = False
    """Format plain-text prompts as one user message with the tokenizer's chat template."""
    max_prompt_length: int = 512
    """Longest prompt in tokens; longer ones are handled per `overlong_prompts`."""
    overlong_prompts: str = "truncate"
    """`truncate` (keep the end) or `drop`; either way they are counted."""


@dataclass
class RewardsConfig:
    functions: list[str] = field(default_factory=lambda: ["grpo_ds.tasks.arithmetic:exact_answer"])
    """Reward functions: built-in names, `pkg.module:fn`, `path/file.py:fn`, or `model:DIR`
    (a local HF sequence classifier with one label, placed like the reference)."""
    weights: list[float] | None = None
    """One weight per function (default all 1.0)."""
    on_error: str = "raise"
    """A reward function that raises: `raise` (stop, naming it) or `skip` (reward None, counted)."""


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: completions sampled per prompt."""
    max_new_tokens: int = 8
    """Longest completion in tokens."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    backend: str = "hybrid"
    """Generation engine: `hybrid` (HybridRollout over the live ZeRO-3 policy). The contract a
    colocated engine such as vLLM would implement: grpo_ds/rollout/backend.py."""
    min_new_tokens: int = 0
    """No completion ends before this many tokens: EOS is not drawn and stop strings are not
    checked until then (HF's min_new_tokens, vLLM's min_tokens). Training and evaluation."""
    ignore_eos: bool = False
    """EOS does not end a completion (it may still be sampled): every completion runs to
    max_new_tokens unless a stop string ends it (vLLM's ignore_eos). Training and evaluation."""
    stop: list[str] = field(default_factory=list)
    """Stop strings, matched on the decoded text across token boundaries: a completion ends with
    the token that completes the first one, and its mask and log-probs end there too (as TRL and
    vLLM's token ids). YAML list, or `--rollout.stop='["\\n\\n", "Question:"]'`."""
    repetition_penalty: float = 1.0
    """HF / vLLM repetition penalty on tokens already in the prompt or completion (> 1
    discourages them; 1.0 = off, at no cost). Changes the draw only: the log-probs stay the
    policy's, so with it on the samples are off-policy."""
    gather: str = "auto"
    """Weight gathering for generation: `auto` (from the budget), `full` or `layers`."""
    memory_budget_gb: float | None = None
    """Device memory the gathered weights may take; None means the full model fits."""
    max_batch_rows: int | None = None
    """Most sequences (prompts x group_size) one generation pass decodes at once: a rank's
    prompts run in as many passes as needed, whole groups per pass, so the KV cache and the
    sampler's logits are sized by one pass (for a run that does not fit, `grpo-ds plan` prints
    the largest value that would). None: on the CPU all of a rank's rows in one pass (the default
    run's 128 rows a rank are one pass); on a GPU as many rows as fit, KV cache and sampling
    buffers, in 80 % of the device memory free when the rollout starts (weights held). At least
    group_size."""
    packed_weights: str = "auto"
    """CPU: run the Linears on weights reordered for oneDNN once per rollout (per group gather with `layers`): faster decode matmuls; under ZeRO-3 with the full gather the copies replace the gathered Linears, otherwise they add to them. `auto` (where supported on CPU; off on a GPU), `on`, `off`."""


@dataclass
class GRPOConfig:
    beta: float = 0.04
    """KL coefficient. 0 skips the reference model entirely."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (unbiased, >= 0)."""
    kl_in_reward: bool = False
    """PPO-style: subtract beta x KL from the reward instead of adding it to the loss."""
    epsilon_low: float = 0.2
    """Lower clip range: ratio >= 1 - epsilon_low."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO clip-higher); None means epsilon_low."""
    loss_aggregation: str = "grpo"
    """`grpo` (per-sequence mean), `token_mean` (DAPO), `dr_grpo`, or `bnpo` (TRL's: the mean of
    each micro-batch's token mean; depends on train.micro_batch_size and the rank count)."""
    policy_loss: str = "clip"
    """Per-token objective: `clip` (PPO/GRPO clipped surrogate) or `cispo` (MiniMax-M1:
    -sg[clip(ratio)] * A * log pi, every token keeps a gradient; the clip range is
    [1 - epsilon_low, 1 + epsilon_high], MiniMax uses no lower bound: epsilon_low=1)."""
    ratio_level: str = "token"
    """Importance ratio: `token` (GRPO), `sequence` (GSPO: exp of the length-normalised sum of
    log-ratios, clipped per sequence; use epsilons near 3e-4/4e-4) or `sequence_token`
    (GSPO-token: the sequence ratio's value, each token's own gradient)."""
    clip_ratio_c: float | None = None
    """Dual clip (verl, Ye et al. 2019): for A < 0 the loss is capped at clip_ratio_c * |A|, so a
    ratio above it no longer pushes. Must be > 1 (verl uses 3); None = off; `clip` only."""
    importance_sampling: str = "none"
    """Rollout correction by the detached ratio pi_old(trainer) / pi(sampler) of the sampled
    log-probs: `none`, `token_truncate` (TIS), `token_mask` (MIS), `sequence_truncate`,
    `sequence_mask` (sequence = product over tokens); multiplies the policy term, not the KL."""
    importance_sampling_cap: float = 2.0
    """C for `importance_sampling`: truncate modes use min(ratio, C), mask modes zero ratios > C."""
    scale_rewards: str = "group"
    """Advantage std scaling: `group`, `batch` or `none` (Dr. GRPO)."""
    num_iterations: int = 1
    """mu: optimizer steps per batch of samples (old log-probs are needed when > 1)."""
    filter_tied_groups: bool = False
    """Drop groups whose rewards all tie (DAPO dynamic sampling); their advantage is 0 anyway."""
    refill_max_rounds: int = 0
    """DAPO dynamic sampling with refill (needs filter_tied_groups): while a rank has fewer
    non-tied groups than its prompts_per_step / world share, all ranks sample one more batch of
    prompts from the data source, at most this many extra rounds a step (every rank runs the
    same number). Rounds spent, the step trains on the non-tied groups it has, padded with tied
    (masked) ones, and logs `refill/missing_groups` (verl raises instead). 0 = off: extra
    rounds multiply the step's generation time, so it is opt-in."""
    std: str = "sample"
    """Std of the advantage normaliser: `sample` (n-1, as TRL/OpenRLHF/verl) or `population`."""
    process_reward: str | None = None
    """Process supervision (DeepSeekMath 4.1.3): a function spec returning, per completion, a
    list of (step_end_token, reward); replaces the outcome advantage. Outcome rewards are still
    computed and logged."""


@dataclass
class TrainConfig:
    steps: int = 60
    """GRPO steps (one batch of samples each)."""
    prompts_per_step: int = 32
    """Prompts per GRPO step, all ranks together."""
    micro_batch_size: int = 64
    """Sequences per rank per forward/backward."""
    lr: float = 1e-3
    """Policy learning rate (AdamW, constant after warm-up)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optimizer: str = "auto"
    """AdamW's implementation: auto (DeepSpeed's FusedAdam on a GPU where its op builds;
    DeepSpeedCPUAdam when the preset offloads the optimizer; torch AdamW on CPU), torch_adamw,
    fused_adam, or cpu_adam (offloaded optimizer only)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    seed: int = 0
    """Seed for model init, sampling and data order."""
    eval_every: int = 10
    """Held-out greedy evaluation every N GRPO steps (0 = only at start and end)."""
    eval_pass_at_k: bool = False
    """At each evaluation also sample G completions per held-out prompt and log pass@k."""
    logprob_chunk_size: int = 4096
    """Rows of the logits computed at once for log-probs (memory = chunk x vocab)."""


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON preset (ZeRO stage, offload, buckets). Batch fields are filled from `train`.
    On a GPU a shipped preset `ds_configs/NAME.json` runs as its GPU twin `ds_configs/gpu/NAME.json`."""
    reference_placement: str = "cpu_offload"
    """Reference model: `cpu_offload` (ZeRO-3, params on CPU), `sharded`, or `none` (needs beta=0)."""
    num_gpus: int | None = None
    """Local ranks `grpo-ds train` launches: default every GPU, or 2 on a machine without GPUs."""
    master_port: int | None = None
    """Rendezvous port for `grpo-ds train` (default: a free one)."""
    host_allocator: str = "auto"
    """Ranks' malloc: `auto` (tcmalloc on the CPU accelerator if installed), `tcmalloc`, `system`."""
    timeout_minutes: float | None = None
    """Minutes a rank waits for the others, at the rendezvous and in every collective, before it
    fails (init_distributed's `timeout`). None: DeepSpeed's default, the DEEPSPEED_TIMEOUT
    environment variable or 10. Keep it above the longest time one rank can run ahead of another
    (a long generation pass, a checkpoint write)."""


@dataclass
class OutputConfig:
    run_dir: str = "runs/default"
    """Where event files, metrics.jsonl, summary.json and the model go."""
    save_model: bool = True
    """Write a Hugging Face model directory (safetensors + tokenizer) at the end."""
    log_samples_every: int = 10
    """Log text samples to TensorBoard every N steps (0 = never)."""
    quiet: bool = False
    """Batch jobs: no per-step progress line or progress bars; milestones and summary print."""


@dataclass
class CheckpointConfig:
    save_every: int = 50
    """Save a checkpoint every N GRPO steps (0 = only at the end and when preempted)."""
    keep_last: int = 3
    """Keep the newest K checkpoints; older ones are deleted once `latest` has moved (0 = keep all)."""
    resume: str | None = None
    """`auto` (the latest checkpoint if there is one), `latest` (must exist) or a checkpoint path."""
    max_bad_steps: int = 3
    """Abort after this many GRPO steps in a row skipped for a NaN/inf loss or gradient."""
    dir: str | None = None
    """Where checkpoints go (default `<output.run_dir>/checkpoints`), e.g. a larger scratch disk."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    multiturn: MultiTurnConfig = field(default_factory=MultiTurnConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# loading


def _coerce(value, annotation: str, where: str):
    """Turn a YAML value or a command-line string into the field's declared type."""
    kind = annotation.replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    if isinstance(value, str) and value.lower() in ("none", "null") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
        if kind.startswith("list["):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
            if not isinstance(value, list):
                raise ValueError
            inner = kind[5:-1]
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def _apply(cfg: Config, section: str, key: str, value, source: str, prefix: str = "") -> str:
    if not hasattr(cfg, section) or section.startswith("_"):
        names = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(f"{source}: unknown section '{section}' (sections: {names})")
    sub = getattr(cfg, section)
    head = key.split(".", 1)[0]  # a nested section (model.lora.rank): descend into it
    hints = {f.name: f.type for f in dataclasses.fields(sub)}
    if head not in hints:
        raise ConfigError(
            f"{source}: unknown field '{prefix}{section}.{key}' (fields: {', '.join(hints)})"
        )
    if dataclasses.is_dataclass(getattr(sub, head)):
        if "." in key:
            return _apply(sub, head, key.split(".", 1)[1], value, source, f"{prefix}{section}.")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{section}.{key}' must be a mapping of fields")
        for inner, item in value.items():
            _apply(sub, head, inner, item, source, f"{prefix}{section}.")
        return f"{prefix}{section}.{key}"
    if "." in key:
        raise ConfigError(f"{source}: '{section}.{head}' has no fields (got '{section}.{key}')")
    setattr(sub, key, _coerce(value, str(hints[key]), f"{prefix}{section}.{key}"))
    return f"{prefix}{section}.{key}"


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (None = the embedded default) and apply `section.key=value` overrides."""
    cfg = Config()
    given: set[str] = set()  # the fields the YAML or an override sets
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            for key, value in values.items():
                given.add(_apply(cfg, section, key, value, path))
    for item in overrides:
        text = item.removeprefix("--")
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise ConfigError(f"override '{item}': expected --section.key=value")
        dotted, value = text.split("=", 1)
        section, key = dotted.split(".", 1)
        given.add(_apply(cfg, section, key, value, f"override '{item}'"))
    if cfg.data.train_path and "task.name" not in given:
        cfg.task.name = "dataset"  # a dataset given is the dataset to train on
    if cfg.task.name == "tool_arithmetic":  # the task's own reward and call format by default
        from grpo_ds.tasks.tool_arithmetic import task_defaults

        for dotted, value in task_defaults().items():
            if dotted not in given:
                section, key = dotted.split(".", 1)
                setattr(getattr(cfg, section), key, value)
    return cfg


def resolve_path(path: str) -> Path:
    """A relative path is taken from the working directory, else from the package (the presets:
    `ds_configs/zero3.json` is grpo_ds/ds_configs/zero3.json, shipped with the package)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    for base in (REPO_ROOT, PACKAGE_CONFIGS.parent):
        if (base / path).exists():
            return base / path
    return candidate


# ---------------------------------------------------------------------------------------------
# validation and batch arithmetic

CHOICES = {
    "model.dtype": DTYPE_CHOICES,
    "model.attn_implementation": ATTN_CHOICES,
    "train.optimizer": OPTIMIZER_CHOICES,
    "task.name": ("arithmetic", "tool_arithmetic", "dataset"),
    "data.overlong_prompts": ("truncate", "drop"),
    "rewards.on_error": ("raise", "skip"),
    "rollout.backend": ROLLOUT_BACKENDS,
    "rollout.gather": ("auto", "full", "layers"),
    "rollout.packed_weights": PACKED_WEIGHT_CHOICES,
    "grpo.kl_estimator": ("k1", "k2", "k3"),
    "grpo.loss_aggregation": ("grpo", "token_mean", "dr_grpo", "bnpo"),
    "grpo.policy_loss": ("clip", "cispo"),
    "grpo.ratio_level": ("token", "sequence", "sequence_token"),
    "grpo.importance_sampling": ("none", "token_truncate", "token_mask", "sequence_truncate",
                                 "sequence_mask"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "grpo.std": ("sample", "population"),
    "deepspeed.reference_placement": ("cpu_offload", "sharded", "none"),
    "deepspeed.host_allocator": HOST_ALLOCATORS,
    "model.fused_layers": FUSED_LAYER_CHOICES,
    "model.onednn_linears": ONEDNN_LINEAR_CHOICES,
}

POSITIVE = (
    "rollout.group_size", "rollout.max_new_tokens", "rollout.temperature", "train.steps",
    "train.prompts_per_step", "train.micro_batch_size", "train.lr", "grpo.num_iterations",
    "train.logprob_chunk_size", "warmup.batch_size", "warmup.eval_every", "task.digits",
    "checkpoint.max_bad_steps",
)


@dataclass(frozen=True)
class BatchPlan:
    """How one GRPO step's sequences divide over ranks and micro-batches."""

    world_size: int
    prompts_per_rank: int
    sequences_per_step: int  # prompts_per_step x group_size, all ranks
    sequences_per_rank: int
    micro_batch_size: int  # sequences per forward/backward
    grad_accum: int  # micro-batches per optimizer step on each rank


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    prompts, group = cfg.train.prompts_per_step, cfg.rollout.group_size
    micro = cfg.train.micro_batch_size
    if prompts % world_size:
        raise ConfigError(
            f"train.prompts_per_step={prompts} does not divide over {world_size} ranks: "
            f"each rank samples whole groups, use a multiple of {world_size}"
        )
    per_rank = prompts // world_size * group
    if per_rank % micro:
        options = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        raise ConfigError(
            f"train.micro_batch_size={micro} does not divide the {per_rank} sequences each rank "
            f"gets per step (train.prompts_per_step={prompts} x rollout.group_size={group} "
            f"/ {world_size} ranks); valid values: {options}"
        )
    return BatchPlan(world_size, prompts // world_size, prompts * group, per_rank, micro,
                     per_rank // micro)


def validate(cfg: Config, world_size: int) -> BatchPlan:
    """Check every field once, before any rank starts. Raises ConfigError naming field and value."""
    problem = bounds_problem(cfg)  # finite floats, ints in range: driven by the fields' types
    if problem:
        raise ConfigError(problem)
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r}: must be one of {', '.join(allowed)}")
    for dotted in POSITIVE:
        if not _get(cfg, dotted) > 0:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)!r}: must be > 0")
    if cfg.rollout.group_size < 2:
        raise ConfigError(
            f"rollout.group_size={cfg.rollout.group_size}: GRPO needs at least 2 samples per "
            "prompt (a group of one has advantage 0)"
        )
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p}: must be in (0, 1]")
    if cfg.rollout.top_k < 0:
        raise ConfigError(f"rollout.top_k={cfg.rollout.top_k}: must be >= 0")
    rows = cfg.rollout.max_batch_rows
    if rows is not None and rows < cfg.rollout.group_size:
        raise ConfigError(f"rollout.max_batch_rows={rows}: must be at least rollout.group_size="
                          f"{cfg.rollout.group_size} (a generation pass holds whole groups)")
    if not 0 <= cfg.rollout.min_new_tokens <= cfg.rollout.max_new_tokens:
        raise ConfigError(f"rollout.min_new_tokens={cfg.rollout.min_new_tokens}: must be in "
                          f"[0, rollout.max_new_tokens={cfg.rollout.max_new_tokens}]")
    if not cfg.rollout.repetition_penalty > 0:
        raise ConfigError(f"rollout.repetition_penalty={cfg.rollout.repetition_penalty}: "
                          "must be > 0 (1.0 = off)")
    if any(not s for s in cfg.rollout.stop):
        raise ConfigError(f"rollout.stop={cfg.rollout.stop!r}: stop strings must not be empty")
    for dotted in ("checkpoint.save_every", "checkpoint.keep_last"):
        if _get(cfg, dotted) < 0:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)}: must be >= 0")
    timeout = cfg.deepspeed.timeout_minutes
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"deepspeed.timeout_minutes={timeout!r}: must be > 0 (or null for "
                          "DeepSpeed's default)")
    if cfg.grpo.beta < 0:
        raise ConfigError(f"grpo.beta={cfg.grpo.beta}: must be >= 0")
    if cfg.grpo.epsilon_low < 0 or (cfg.grpo.epsilon_high or 0) < 0:
        raise ConfigError("grpo.epsilon_low / grpo.epsilon_high: must be >= 0")
    _validate_loss_variant(cfg.grpo)
    if cfg.grpo.beta > 0 and cfg.deepspeed.reference_placement == "none":
        raise ConfigError(
            f"deepspeed.reference_placement='none' needs grpo.beta=0 (got {cfg.grpo.beta}): "
            "the KL term needs the reference model"
        )
    if cfg.grpo.process_reward and (cfg.grpo.kl_in_reward or cfg.grpo.filter_tied_groups):
        raise ConfigError("grpo.process_reward: cannot be combined with grpo.kl_in_reward or "
                          "grpo.filter_tied_groups (both act on outcome rewards)")
    _validate_refill(cfg.grpo)
    if cfg.model.onednn_linears == "on" and cfg.model.dtype == "bfloat16":
        raise ConfigError(f"model.onednn_linears='on' needs model.dtype=float32 (got "
                          f"{cfg.model.dtype!r}): torch already runs bf16 matmuls on oneDNN")
    if not 0 <= cfg.task.carry_drop <= 1:
        raise ConfigError(f"task.carry_drop={cfg.task.carry_drop}: must be in [0, 1]")
    weights = cfg.rewards.weights
    if weights is not None and len(weights) != len(cfg.rewards.functions):
        raise ConfigError(
            f"rewards.weights has {len(weights)} entries but rewards.functions has "
            f"{len(cfg.rewards.functions)}"
        )
    for spec in cfg.rewards.functions:
        if spec.startswith("model:"):
            from grpo_ds.rewards.model import check_classifier

            check_classifier(spec.removeprefix("model:"))
    if cfg.task.name == "dataset" and not cfg.data.train_path:
        raise ConfigError("data.train_path: required when task.name='dataset'")
    given = [f for f in ("data.train_path", "data.eval_path") if _get(cfg, f)]
    validate_multiturn(cfg.multiturn, ConfigError)
    if cfg.task.name in ("arithmetic", "tool_arithmetic") and given:
        raise ConfigError(
            f"task.name={cfg.task.name!r} trains on the built-in synthetic task, which does not read "
            f"{' or '.join(given)}={_get(cfg, given[0])!r}: set task.name=dataset (or leave "
            "task.name unset, and data.train_path selects the dataset)")
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r}: no config.json there (a local HF model dir)")
    if cfg.task.name == "dataset" and cfg.model.path is None:
        raise ConfigError("model.path: required when task.name='dataset' (a local HF model dir)")
    load_ds_preset(cfg.deepspeed.config)
    from grpo_ds.lora_checks import validate_lora

    validate_lora(cfg)
    return batch_plan(cfg, world_size)


def _validate_refill(g: GRPOConfig) -> None:
    if g.refill_max_rounds and not g.filter_tied_groups:
        raise ConfigError(f"grpo.refill_max_rounds={g.refill_max_rounds}: refills the groups "
                          "grpo.filter_tied_groups drops; set grpo.filter_tied_groups=true")
    if g.refill_max_rounds and g.kl_in_reward:
        raise ConfigError(f"grpo.refill_max_rounds={g.refill_max_rounds}: cannot be combined "
                          "with grpo.kl_in_reward (the KL-penalised rewards the filter sees "
                          "almost never tie, so refill and filter would disagree on the groups)")


def _validate_loss_variant(g: GRPOConfig) -> None:
    if g.clip_ratio_c is not None and not g.clip_ratio_c > 1:
        raise ConfigError(f"grpo.clip_ratio_c={g.clip_ratio_c}: must be > 1 (it caps the ratio "
                          "for negative advantages; verl uses 3), or none")
    if g.clip_ratio_c is not None and g.policy_loss != "clip":
        raise ConfigError(f"grpo.clip_ratio_c={g.clip_ratio_c}: dual clip applies to "
                          f"grpo.policy_loss=clip only, got {g.policy_loss!r}")
    if not g.importance_sampling_cap >= 1:
        raise ConfigError(f"grpo.importance_sampling_cap={g.importance_sampling_cap}: must be >= 1")


def load_ds_preset(path: str) -> dict:
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"deepspeed.config={path!r}: file not found")
    try:
        preset = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config={path!r}: not valid JSON: {err}") from None
    autos = [k for k, v in _flatten(preset) if v == "auto"]
    if autos:
        raise ConfigError(
            f"deepspeed.config={path!r}: 'auto' values are only resolved by the HF Trainer and "
            f"DeepSpeed drops them silently; set {', '.join(autos)} explicitly"
        )
    return preset


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def deepspeed_config(cfg: Config, plan: BatchPlan) -> dict:
    """The preset with the batch, precision, clipping and optimizer filled from the training config."""
    ds = load_ds_preset(cfg.deepspeed.config)
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = plan.micro_batch_size * plan.grad_accum * plan.world_size
    if "auto" in (cfg.model.dtype, cfg.train.optimizer):
        raise ValueError("deepspeed_config needs a resolved config: pass it through "
                         "grpo_ds.device.resolve_config first (model.dtype, train.optimizer)")
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = ds["optimizer"].setdefault("params", {})
    params.update(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    params.setdefault("betas", [0.9, 0.999])
    # DeepSpeed builds "AdamW" as torch's with torch_adam, as DeepSpeedCPUAdam when the
    # optimizer is offloaded, and as FusedAdam otherwise (runtime/engine.py)
    if cfg.train.optimizer == "torch_adamw":
        params.setdefault("torch_adam", True)
    if cfg.train.lr_warmup_steps:
        ds["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.train.lr,
            "warmup_num_steps": cfg.train.lr_warmup_steps, "warmup_type": "linear"}}
    ds.setdefault("steps_per_print", 10**9)
    return ds
