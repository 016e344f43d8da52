"""The memory planner's inputs and calibration: what it reads off a DeepSpeed config and a
training config, the byte constants measured against real peaks, and the item it sums
(`Component`). The formulas are in planner_items.py; planner.py sums them into a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo_ds.config import PACKED_WEIGHT_CHOICES

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

# ---- calibration constants (the memory benchmark compares against measured peaks) ----------
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32 (torch Adam and DeepSpeedCPUAdam)
MASTER_BYTES = 4  # fp32 master partition (stage3._create_fp32_partitions)
FP32_GRAD_BYTES = 4  # fp32 gradient the optimizer reads (see module docstring)
NORM_FP32_BYTES = 4  # LlamaRMSNorm upcasts its input to fp32; autograd keeps it
SDPA_LSE_BYTES = 4  # SDPA saves one fp32 logsumexp per head and query
BACKWARD_WORKING_LAYERS = 1.0  # activation gradients of the layer being back-propagated
LOGPROB_CHUNK_FACTOR = 3  # grpo_ds/logprobs.py: peak about 3 x chunk x V x 4 bytes
# measured (grpo-ds bench memory --quick): peak RSS per rank of 2 CPU ranks running GRPO steps on a
# 0.1M-param model: torch + DeepSpeed + gloo + the shm all-reduce buffers, the engines' objects
RUNTIME_HOST_BYTES = 470 * 2**20
# torch's Adam/AdamW step on one fp32 sub-group (DeepSpeed's torch_adam, optimizer not offloaded):
# the single-tensor CPU path makes sqrt(exp_avg_sq) and its quotient by the bias correction
# (2 x 4 B/param, measured: the step's transient is 12 B/param with the 4 B fp32 gradient);
# the foreach path of CUDA makes only the sqrt (not measured here). DeepSpeedCPUAdam: in place.
ADAM_TEMP_BYTES_CPU = 8
ADAM_TEMP_BYTES_FOREACH = 4
# CPU only: the host allocator keeps freed memory resident. glibc keeps the freed pieces of
# gathered weights in its heap (blocks below its 32 MiB mmap ceiling are not returned to the OS),
# and the step's large fp32 blocks are fresh mappings that cannot reuse them. Measured (grpo-ds
# bench memory, 25M-300M, every preset): the resting RSS after the first step stays 1.5-2.0 x
# the largest set of gathered weights above the clean one. tcmalloc (the ranks' default on CPU,
# host_memory.py) caches freed spans instead; with this item the plan was 0.92-1.10 of its
# measured peak (zero3 and zero3_offload_optimizer, 24M and 297M). MALLOC_MMAP_THRESHOLD_=65536
# (glibc returning every freed block) removes it.
HEAP_RETAINED_GATHERS = 1.75
RUNTIME_DEVICE_BYTES = 512 * 2**20  # accelerator context + allocator slack; typical CUDA, not measured


# ---- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a DeepSpeed config that decide memory, with DeepSpeed's own defaults."""

    stage: int
    offload_optimizer: str  # none | cpu | nvme
    offload_param: str  # none | cpu | nvme (stage 3 only)
    reduce_bucket_size: int
    allgather_bucket_size: int
    prefetch_bucket_size: int
    max_live_parameters: int
    max_reuse_distance: int
    param_persistence_threshold: int
    model_persistence_threshold: int
    sub_group_size: int
    optimizer_buffer_count: int  # nvme optimizer swap buffers
    param_buffer_count: int  # nvme param swap buffers
    param_buffer_size: int


def zero_settings(ds_config: dict) -> ZeroSettings:
    """Parse `zero_optimization` with DeepSpeed's pydantic model, so the defaults are its own."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))

    def device(offload) -> str:  # an enum, or its value (the model stores enum values)
        return str(getattr(offload.device, "value", offload.device)) if offload else "none"

    opt, param = device(z.offload_optimizer), device(z.offload_param) if z.stage == 3 else "none"
    return ZeroSettings(
        int(z.stage), opt, param, int(z.reduce_bucket_size), int(z.allgather_bucket_size),
        int(z.prefetch_bucket_size), int(z.max_live_parameters), int(z.max_reuse_distance),
        int(z.param_persistence_threshold), int(z.model_persistence_threshold),
        int(z.sub_group_size),
        z.offload_optimizer.buffer_count if z.offload_optimizer else 0,
        z.offload_param.buffer_count if z.offload_param else 0,
        z.offload_param.buffer_size if z.offload_param else 0)


@dataclass(frozen=True)
class TrainingShape:
    """Per-rank batch shapes and choices of one GRPO step."""

    group_size: int  # G completions per prompt
    prompt_len: int  # longest prompt (tokens)
    max_new_tokens: int
    prompts_per_rank: int
    micro_batch_size: int  # sequences per forward/backward
    dtype: str = "bfloat16"
    beta: float = 0.04  # 0 skips the reference model
    reference: str = "cpu_offload"  # cpu_offload | sharded | none
    gradient_checkpointing: bool = False
    gather: str = "full"  # full | layers | auto
    gather_budget_bytes: int | None = None  # layers: sizes the layer groups (rollout.memory_budget_gb)
    logprob_chunk_size: int = 4096
    attention: str = "sdpa"  # sdpa | eager
    packed_weights: str = "auto"  # auto | on | off: oneDNN copies of the Linears (CPU ranks)
    max_batch_rows: int | None = None  # rows one generation pass decodes (rollout.max_batch_rows)
    lora_rank: int = 0  # model.lora.rank; 0 = full fine-tuning (grpo_ds/tools/lora_plan.py)
    lora_targets: tuple[str, ...] = ("all-linear",)  # model.lora.target_modules

    def __post_init__(self):
        for name, allowed in (("dtype", tuple(DTYPE_BYTES)), ("gather", ("full", "layers", "auto")),
                              ("reference", ("cpu_offload", "sharded", "none")),
                              ("attention", ("sdpa", "eager")),
                              ("packed_weights", PACKED_WEIGHT_CHOICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank}: must be >= 0 (0 = no LoRA)")
        for name in ("group_size", "prompt_len", "max_new_tokens", "prompts_per_rank",
                     "micro_batch_size", "logprob_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.max_batch_rows is not None and self.max_batch_rows < self.group_size:
            raise ValueError(f"max_batch_rows={self.max_batch_rows}: must be at least group_size="
                             f"{self.group_size} (a generation pass holds whole groups)")

    @property
    def prompts_per_pass(self) -> int:
        """Prompts of the largest generation pass (rollout/passes.py splits them evenly)."""
        from grpo_ds.rollout.passes import largest_pass_rows

        return largest_pass_rows(self.prompts_per_rank, self.group_size,
                                 self.max_batch_rows) // self.group_size

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    @property
    def reference_placement(self) -> str:
        return "none" if self.beta == 0 else self.reference


# Share of a GPU's memory the verdict leaves free: the caching allocator's fragmentation, the
# NCCL buffers and the CUDA context beyond RUNTIME_DEVICE_BYTES are not itemised above. The same
# default as vLLM's gpu_memory_utilization=0.9.
DEFAULT_DEVICE_MARGIN = 0.10


@dataclass(frozen=True)
class Budgets:
    device_bytes: int  # per rank
    host_bytes: int  # per node
    device_is_host: bool  # CPU-only: device memory is host RAM, one pool per node
    margin: float = DEFAULT_DEVICE_MARGIN  # share of device_bytes kept free (separate device only)

    def __post_init__(self):
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin={self.margin}: must be in [0, 1)")

    @property
    def usable_device_bytes(self) -> int:
        """What the plan may fill on a separate device: device_bytes less the margin."""
        return self.device_bytes if self.device_is_host else int(self.device_bytes
                                                                 * (1.0 - self.margin))


@dataclass
class Component:
    name: str
    phase: str  # persistent | generation | reference | update | step
    device: int = 0
    host: int = 0
    nvme: int = 0
    note: str = ""


PHASES = ("generation", "reference", "update", "step", "critic step")


def training_shape_from_config(cfg, world_size: int) -> TrainingShape:
    """TrainingShape from a grpo_ds.config.Config (prompts split evenly over ranks)."""
    prompts = cfg.train.prompts_per_step
    if prompts % world_size:
        raise ValueError(f"train.prompts_per_step={prompts} does not divide over {world_size} ranks")
    budget = cfg.rollout.memory_budget_gb
    return TrainingShape(
        group_size=cfg.rollout.group_size, prompt_len=cfg.data.max_prompt_length,
        max_new_tokens=cfg.rollout.max_new_tokens, prompts_per_rank=prompts // world_size,
        micro_batch_size=cfg.train.micro_batch_size, dtype=cfg.model.dtype, beta=cfg.grpo.beta,
        reference=cfg.deepspeed.reference_placement,
        gradient_checkpointing=cfg.model.gradient_checkpointing, gather=cfg.rollout.gather,
        gather_budget_bytes=None if budget is None else int(budget * GIB),
        logprob_chunk_size=cfg.train.logprob_chunk_size,
        packed_weights=cfg.rollout.packed_weights, max_batch_rows=cfg.rollout.max_batch_rows,
        lora_rank=planned_lora_rank(cfg), lora_targets=tuple(cfg.model.lora.target_modules))


def planned_lora_rank(cfg) -> int:
    """model.lora.rank, or the rank of the adapter it starts from (0: no LoRA)."""
    lora = cfg.model.lora
    if lora.adapter_path and not lora.rank:
        from grpo_ds.lora_checks import check_adapter_dir

        return int(check_adapter_dir(lora.adapter_path)["r"])
    return lora.rank or 0
