"""The config's schema: one typed dataclass per section, a docstring per field.

Loading (YAML and overrides) is in config_load.py, validation and the batch arithmetic in
config_validate.py, the DeepSpeed config fill in config_deepspeed.py; grpo_ds/config.py is the
face all of them are imported through.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from grpo_ds.agents.config import MultiTurnConfig

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


@dataclass(frozen=True)
class BatchPlan:
    """How one GRPO step's sequences divide over ranks and micro-batches."""

    world_size: int
    prompts_per_rank: int
    sequences_per_step: int  # prompts_per_step x group_size, all ranks
    sequences_per_rank: int
    micro_batch_size: int  # sequences per forward/backward
    grad_accum: int  # micro-batches per optimizer step on each rank
