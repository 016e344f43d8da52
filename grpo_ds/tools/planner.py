"""Per-rank memory plan of a GRPO run on DeepSpeed ZeRO, before anything is launched.

Every figure is bytes per rank, split by where it lives (device, host RAM, NVMe) and by the phase
that holds it. Persistent memory (model states, reference, buffers) is held all the time; each
phase (generation, reference forward, update, optimizer step) adds its own transients, freed
before the next phase. So

    peak per rank = persistent + max over phases (phase transients)
    host per node = ranks_per_node x host per rank      (host RAM is shared by a node's ranks)

With N parameters, W ranks, p = bytes of the training dtype (2 bf16, 4 fp32), ZeRO stage 3 keeps
per rank (read off deepspeed/runtime/zero/stage3.py, DeepSpeed 0.19.8):
    params              p N/W   ds_tensor partitions       device | host (offload_param cpu) | nvme
    grads               p N/W   grad_partitions_flat_buffer (grad accum dtype = model dtype)
                                                           device | host when the optimizer is offloaded
    fp32 grads          4 N/W   offload cpu: subgroup_gradient_buffer (persistent, host);
                                offload nvme: swapped to nvme; no offload: made at the step by
                                _prepare_fp32_grad_for_sub_group (transient, device, <= sub_group_size)
    optimizer states   12 N/W   fp32 master + Adam exp_avg + exp_avg_sq; 8 N/W when the model is fp32
                                and not offloaded (the master then IS the param partition)
Stages 0-2 follow the ZeRO paper's counting (params full, grads / optimizer partitioned from stage
2 / 1); they are not calibrated.

DeepSpeed's own estimator (estimate_zero3_model_states_mem_needs; `deepspeed_estimate` below) assumes
16-bit params and fp32 Adam and returns device bytes per rank and host bytes per node. Against ours
(stage 3, bf16, model states only, `model_states_figure`):
    no offload          DS 18 N/W + 4 L      ours 16 N/W + 4 N/W step grads = 20 N/W
    offload optimizer   DS 2 N/W + 4 L       ours 2 N/W;  host DS 1.5 x 16 N/nodes, ours 18 N/nodes
    offload opt + param DS 4 L               ours 0;      host DS 1.5 x 18 N/nodes, ours 20 N/nodes
(L = largest layer's params; we count the working set of gathered layers separately, under the
update phase.) On host we add 2 B/param that DeepSpeed omits: the bf16 gradient partition lives on
host next to the fp32 gradient buffer when the optimizer is offloaded; and we leave out its 1.5x
safety factor. With an fp32 model the DS figures do not apply as such (they assume 16-bit
params); ours use p = 4: 16 N/W + 4 N/W (no offload), host 20 N/W with offload (param, grad,
fp32 grad, master, moments: 4 + 4 + 4 + 4 + 8).

Activations per token per Llama decoder layer (bytes autograd keeps; Korthikanti et al. 2022,
"Reducing Activation Recomputation", adapted from GPT to Llama: RMSNorm instead of LayerNorm,
SwiGLU MLP, no dropout, SDPA attention):
    A = 2 x (4h + p h)     two RMSNorms: fp32 upcast input + normalised output (= next matmul input)
      + 4 p h_q            q, k, v, attention output (HF repeats GQA k/v to h_q when a mask is given)
      + 4 a                SDPA logsumexp (fp32 per head)
      + 4 p I              gate out (SiLU input), SiLU out, up out, their product (down_proj input)
      [+ (4 + p) a s       eager attention only: fp32 softmax and its cast copy]
For GPT sizes (I = 4h, h_q = h, p = 2) this is 52h against the paper's 34h: SwiGLU keeps 4 I-sized
tensors instead of 2, and HF's RMSNorm keeps an fp32 copy of its input.
    no checkpointing    tokens x (L A + A backward working + nonlayer)
    checkpointing       tokens x (L p h + A recomputed + A backward working + nonlayer)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

from grpo_ds.config import PACKED_WEIGHT_CHOICES
from grpo_ds.model_spec import SAMPLING_BYTES_PER_LOGIT, ModelSpec, kv_cache_bytes

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


# ---- components -----------------------------------------------------------------------------


def _placed(name, phase, nbytes, where, note) -> Component:
    column = {"none": "device", "cpu": "host", "nvme": "nvme"}[where]
    return Component(name, phase, note=note, **{column: int(nbytes)})


def model_state_components(owner: str, spec: ModelSpec, zero: ZeroSettings, world: int,
                           p: int, step_temp: int = 0, step_phase: str = "step") -> list[Component]:
    """Params, grads, fp32 grads and Adam states of one trainable model, per rank.

    step_temp: bytes per param of one sub-group that the optimizer's step allocates
    (`optimizer_step_temp_bytes`); step_phase: the phase its step transients belong to.
    """
    n, s, opt = spec.total_params, zero.stage, zero.offload_optimizer
    param_n = n / world if s >= 3 else n
    grad_n = n / world if s >= 2 else n
    optim_n = n / world if s >= 1 else n
    master = 0 if p == 4 and opt == "none" and s in (0, 3) else MASTER_BYTES
    grad_where = "cpu" if opt != "none" else "none"
    fp32_grads = (_placed(f"{owner} fp32 grads", "persistent", FP32_GRAD_BYTES * optim_n, opt,
                          "4 B/param, optimizer's gradient buffer")
                  if opt != "none" else
                  _placed(f"{owner} fp32 grads", step_phase,
                          FP32_GRAD_BYTES * min(optim_n, zero.sub_group_size), "none",
                          "4 B/param of one sub-group, made at the step"))
    temps = ([Component(f"{owner} Adam step temporaries", step_phase,
                        device=int(step_temp * min(optim_n, zero.sub_group_size)),
                        note=f"{step_temp} B/param of one sub-group (torch Adam)")]
             if step_temp else [])
    return temps + [
        _placed(f"{owner} params", "persistent", p * param_n, zero.offload_param,
                f"{p} B/param" + (f" / {world}" if s >= 3 else "")),
        _placed(f"{owner} grads", "persistent", p * grad_n, grad_where,
                f"{p} B/param" + (f" / {world}" if s >= 2 else "")),
        fp32_grads,
        _placed(f"{owner} optimizer states", "persistent", (master + ADAM_MOMENT_BYTES) * optim_n,
                opt, f"{master + ADAM_MOMENT_BYTES} B/param (master {master} + Adam 8)"),
    ]


def optimizer_step_temp_bytes(ds_config: dict, zero: ZeroSettings, device_is_host: bool) -> int:
    """Bytes/param the step's optimizer allocates: torch Adam(W) on an un-offloaded optimizer."""
    optimizer = ds_config.get("optimizer") or {}
    torch_adam = (str(optimizer.get("type", "")).lower() in ("adam", "adamw")
                  and optimizer.get("params", {}).get("torch_adam"))
    if zero.offload_optimizer != "none" or not torch_adam:
        return 0
    return ADAM_TEMP_BYTES_CPU if device_is_host else ADAM_TEMP_BYTES_FOREACH


def layer_activation_bytes(spec: ModelSpec, p: int, seq_len: int, attention: str) -> int:
    """A: bytes autograd keeps per token for one decoder layer (module docstring)."""
    h, h_q, a = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_heads
    per_token = (2 * (NORM_FP32_BYTES * h + p * h) + 4 * p * h_q + SDPA_LSE_BYTES * a
                 + 4 * p * spec.intermediate_size)
    if attention == "eager":
        per_token += (4 + p) * a * seq_len
    return per_token


def activation_bytes(spec: ModelSpec, p: int, tokens: int, seq_len: int, checkpointing: bool,
                     attention: str = "sdpa") -> int:
    """Activations of one micro-batch's forward + backward (module docstring)."""
    a_layer = layer_activation_bytes(spec, p, seq_len, attention)
    nonlayer = NORM_FP32_BYTES * spec.hidden_size + p * spec.hidden_size  # final RMSNorm
    if checkpointing:  # HF checkpoints each decoder layer: keeps its input, recomputes one layer
        kept = spec.num_layers * p * spec.hidden_size + a_layer
    else:
        kept = spec.num_layers * a_layer
    return int(tokens * (kept + BACKWARD_WORKING_LAYERS * a_layer + nonlayer))


def inference_token_bytes(spec: ModelSpec, p: int) -> int:
    """Working bytes per token of a no-grad forward (one layer's tensors alive at a time)."""
    return p * (3 * spec.hidden_size + 3 * spec.intermediate_size) + NORM_FP32_BYTES * spec.hidden_size


def logprob_chunk_bytes(spec: ModelSpec, rows: int, chunk_size: int) -> int:
    return LOGPROB_CHUNK_FACTOR * min(chunk_size, rows) * spec.vocab_size * 4


def persistent_numel(spec: ModelSpec, zero: ZeroSettings) -> int:
    """Params ZeRO-3 never partitions: modules <= param_persistence_threshold (norms)."""
    unique = dict(spec.leaves_in_forward_order())
    small = [n for n in unique.values() if n <= zero.param_persistence_threshold]
    return min(sum(small), zero.model_persistence_threshold)


def held_for_backward_numel(spec: ModelSpec, zero: ZeroSettings) -> int:
    """Non-persistent ZeRO-3 params left gathered after their forward, waiting for the backward.

    The trace covers forward and backward. A module's params are not released after its forward
    when their reuse comes within max_reuse_distance params of trace
    (partitioned_param_coordinator.__params_to_release): about 2 x the params used after it.
    With the preset's 1e9, every model below ~500M params stays whole through the update.
    """
    leaves = [(pid, n) for pid, n in spec.leaves_in_forward_order()
              if n > zero.param_persistence_threshold]
    kept, after = {}, 0
    for pid, n in reversed(leaves):
        if 2 * after < zero.max_reuse_distance:
            kept[pid] = n
        after += n
    return sum(kept.values())


def live_update_numel(spec: ModelSpec, zero: ZeroSettings) -> int:
    """Gathered params during forward+backward: held + the module computing + prefetch bucket."""
    held = held_for_backward_numel(spec, zero)
    prefetch = min(zero.prefetch_bucket_size, max(0, zero.max_live_parameters - held))
    partitioned = spec.total_params - persistent_numel(spec, zero)
    return min(partitioned, held + spec.largest_leaf + prefetch)


def gathered_generation_bytes(spec: ModelSpec, p: int, shape: TrainingShape
                              ) -> tuple[int, str, int | None]:
    """Weights held while decoding: a full copy, or two neighbouring layer groups of k layers.

    `auto` picks layers iff the full copy exceeds the gather budget (as rollout/engine.py does).
    Returns (bytes, note, k), k None for the full copy.
    """
    full, budget = p * spec.total_params, shape.gather_budget_bytes
    if shape.gather == "full" or (shape.gather == "auto" and (budget is None or full <= budget)):
        return full, f"full copy, {p} B/param", None
    from grpo_ds.rollout.gather import plan_layers_per_group

    layer = p * spec.layer_params
    embed = p * spec.embed_params
    head = p * (spec.final_norm_params + (spec.embed_params if spec.tie_word_embeddings
                                          else spec.head_params))
    k = plan_layers_per_group(layer, max(embed, head), shape.gather_budget_bytes)
    k = min(k, spec.num_layers)
    pairs = [embed + k * layer, k * layer + head]
    if spec.num_layers > k:
        pairs.append(2 * k * layer)
    return max(pairs), f"layer groups of {k}: two neighbours gathered", k


def packed_generation_bytes(spec: ModelSpec, p: int, k: int | None, zero3: bool) -> int:
    """What the oneDNN copies of the Linears (packed_linear.py) add to the gathered weights.

    ZeRO-3 full gather: each Linear is gathered, copied and partitioned again, so the copies
    replace the gathered Linears; only a tied lm_head's copy adds (the embedding stays gathered).
    Layer groups of k: one group's copies at a time. Without ZeRO-3 the weights are whole all
    along and every Linear is copied. (Norms are counted with the layers: negligible.)
    """
    head = spec.head_params or spec.embed_params  # a tied lm_head is a Linear on the embedding
    if k is not None:
        return p * max(k * spec.layer_params, head)
    if zero3:
        return p * spec.embed_params if spec.tie_word_embeddings else 0
    return p * (spec.num_layers * spec.layer_params + head)


def reference_components(spec, shape: TrainingShape, zero: ZeroSettings, world, p) -> list:
    """Frozen reference: ZeRO-3 partitions on host (cpu_offload) or device (sharded)."""
    placement = shape.reference_placement
    if placement == "none":
        return []
    live = min(spec.total_params, spec.largest_leaf + zero.prefetch_bucket_size)
    rows = shape.micro_batch_size
    forward = (rows * shape.seq_len * inference_token_bytes(spec, p)
               + logprob_chunk_bytes(spec, rows * shape.max_new_tokens, shape.logprob_chunk_size))
    return [
        _placed("reference params", "persistent", p * spec.total_params / world,
                "cpu" if placement == "cpu_offload" else "none", f"{p} B/param / {world}, {placement}"),
        Component("reference gathered params", "reference", device=p * live,
                  note="largest module + prefetch bucket"),
        Component("reference forward", "reference", device=forward,
                  note=f"{rows} seqs no-grad forward + log-prob chunk"),
    ]


def generation_components(spec, shape: TrainingShape, zero: ZeroSettings, p,
                          device_is_host: bool) -> list:
    """Weights held for the whole rollout; the KV cache and working memory of its largest pass."""
    from grpo_ds.rollout.passes import plan_passes

    prompts = shape.prompts_per_pass
    rows = prompts * shape.group_size
    passes = len(plan_passes(shape.prompts_per_rank, shape.group_size, shape.max_batch_rows))
    if zero.stage >= 3:
        gathered, note, k = gathered_generation_bytes(spec, p, shape)
    else:
        gathered, note, k = 0, "stage < 3: params are already whole", None
    packed = 0
    if device_is_host and shape.packed_weights != "off":
        packed = packed_generation_bytes(spec, p, k, zero.stage >= 3)
    kv = kv_cache_bytes(spec, p, rows, shape.seq_len)
    prefill_tokens = prompts * shape.prompt_len  # shared prefill: each prompt once
    prefill = prefill_tokens * inference_token_bytes(spec, p)
    if shape.attention == "eager":
        prefill += prompts * spec.num_heads * shape.prompt_len ** 2 * (4 + p)
    sampling = spec.vocab_size * SAMPLING_BYTES_PER_LOGIT
    working = max(prefill + prompts * sampling, rows * sampling)
    per_pass = f" (largest of {passes} passes)" if passes > 1 else ""
    return [
        Component("generation gathered weights", "generation", device=gathered, note=note),
        Component("generation packed weights", "generation", device=packed,
                  note="oneDNN copies of the Linears beyond the gathered weights (CPU)"),
        Component("generation KV cache", "generation", device=kv + kv // spec.num_layers,
                  note=f"{rows} seqs x {shape.seq_len} tokens{per_pass}, + 1 layer copied "
                       "on compaction"),
        Component("generation working", "generation", device=working,
                  note="prefill activations / sampling over the vocab"),
    ]


def update_components(spec, shape: TrainingShape, zero: ZeroSettings, p) -> list:
    tokens = shape.micro_batch_size * shape.seq_len
    ckpt = "checkpointed" if shape.gradient_checkpointing else "no checkpointing"
    out = [
        Component("update activations", "update", note=f"{tokens} tokens, {ckpt}",
                  device=activation_bytes(spec, p, tokens, shape.seq_len,
                                          shape.gradient_checkpointing, shape.attention)),
        Component("update log-prob chunk", "update", note="3 x chunk x vocab x 4 B",
                  device=logprob_chunk_bytes(spec, shape.micro_batch_size * shape.max_new_tokens,
                                             shape.logprob_chunk_size)),
    ]
    if zero.stage >= 3:
        out.append(Component("update gathered params", "update", device=p * live_update_numel(spec, zero),
                             note="kept for backward (max_reuse_distance) + prefetch"))
    return out


def buffer_components(spec, zero: ZeroSettings, world, p, device_is_host) -> list:
    out = []
    if zero.stage >= 3:
        out.append(Component("zero3 persistent params", "persistent",
                             device=p * persistent_numel(spec, zero),
                             note=f"modules <= {zero.param_persistence_threshold} params, whole"))
        # allocated with torch.empty: on a CPU host only the part gradients fill is resident
        bucket = min(zero.reduce_bucket_size, spec.total_params) if device_is_host \
            else zero.reduce_bucket_size
        out.append(Component("reduce bucket", "persistent", device=p * bucket,
                             note="reduce_bucket_size x dtype"))
    else:
        out.append(Component("reduce + allgather buckets", "persistent",
                             device=p * (zero.reduce_bucket_size + zero.allgather_bucket_size)))
    if zero.offload_optimizer == "nvme":
        # a sub-group holds whole params: the largest partition may exceed sub_group_size
        largest = min(max(zero.sub_group_size, math.ceil(spec.largest_leaf / world)),
                      math.ceil(spec.total_params / world))
        out.append(Component("nvme optimizer swap buffers", "persistent",
                             host=zero.optimizer_buffer_count * largest * 4,
                             note="buffer_count x sub-group x 4 B"))
    if zero.offload_param == "nvme":
        out.append(Component("nvme param swap buffers", "persistent",
                             host=zero.param_buffer_count * zero.param_buffer_size * p,
                             note="buffer_count x buffer_size x dtype"))
    out.append(Component("runtime", "persistent", host=RUNTIME_HOST_BYTES,
                         device=0 if device_is_host else RUNTIME_DEVICE_BYTES,
                         note="process: torch, DeepSpeed, comm"))
    return out


# ---- plan -----------------------------------------------------------------------------------


def _peak(components: list, columns: tuple[str, ...]) -> tuple[int, str]:
    """persistent + the largest phase, summed over `columns`; returns (bytes, peak phase)."""
    def total(phase):
        return sum(getattr(c, col) for c in components if c.phase == phase for col in columns)
    phase = max(PHASES, key=total)
    return total("persistent") + total(phase), phase


@dataclass
class Totals:
    device_per_rank: int
    host_per_rank: int
    nvme_per_rank: int
    ram_per_rank: int  # device + host, one pool (what a CPU-only node holds per rank)
    host_per_node: int
    ram_per_node: int
    peak_phase: str


def totals(components: list, ranks_per_node: int, device_is_host: bool) -> Totals:
    device, dphase = _peak(components, ("device",))
    host, _ = _peak(components, ("host",))
    ram, rphase = _peak(components, ("device", "host"))
    nvme = sum(c.nvme for c in components)
    return Totals(device, host, nvme, ram, ranks_per_node * host, ranks_per_node * ram,
                  rphase if device_is_host else dphase)


@dataclass
class MemoryPlan:
    """All figures in bytes. `components` are per rank; PPO adds `critic` to them."""

    model: str
    params: int
    world_size: int
    nodes: int
    ranks_per_node: int
    zero: ZeroSettings
    shape: TrainingShape
    budgets: Budgets
    components: list
    critic: list
    grpo: Totals
    ppo: Totals
    deepspeed_estimate: dict | None
    reasons: list = field(default_factory=list)
    suggested_max_batch_rows: int | None = None  # does not fit: the largest bound that would

    @property
    def fits(self) -> bool:
        return not self.reasons

    @property
    def verdict(self) -> str:
        if not self.fits:
            return "does not fit: " + "; ".join(self.reasons)
        b = self.budgets
        if b.device_is_host:
            return "fits"
        return (f"fits with a {b.margin:.0%} margin: device {_gib(self.grpo.device_per_rank)} of "
                f"{_gib(b.usable_device_bytes)} usable ({_gib(b.device_bytes)} less {b.margin:.0%})")

    @property
    def ppo_diff_bytes(self) -> int:
        """Extra per-rank memory (device + host) of PPO's critic over GRPO."""
        return (self.ppo.device_per_rank + self.ppo.host_per_rank
                - self.grpo.device_per_rank - self.grpo.host_per_rank)

    @property
    def ppo_diff_pct(self) -> float:
        return 100.0 * self.ppo_diff_bytes / (self.grpo.device_per_rank + self.grpo.host_per_rank)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("model", "params", "world_size", "nodes",
                                               "ranks_per_node", "deepspeed_estimate",
                                               "suggested_max_batch_rows")}
        out.update(zero=asdict(self.zero), training=asdict(self.shape), budgets=asdict(self.budgets),
                   components={c.name: asdict(c) for c in self.components},
                   critic={c.name: asdict(c) for c in self.critic},
                   **asdict(self.grpo), ppo=asdict(self.ppo), ppo_diff_bytes=self.ppo_diff_bytes,
                   ppo_diff_pct=round(self.ppo_diff_pct, 2), fits=self.fits, verdict=self.verdict)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _largest(components: list, columns: tuple[str, ...], phase: str) -> str:
    used = [c for c in components if c.phase in ("persistent", phase)]
    big = max(used, key=lambda c: sum(getattr(c, col) for col in columns))
    return f"largest component: {big.name} {_gib(sum(getattr(big, col) for col in columns))}"


def check_budgets(components: list, t: Totals, budgets: Budgets, ranks_per_node: int) -> list:
    """Reasons the plan does not fit (empty list: it fits)."""
    if budgets.device_is_host:
        if t.ram_per_node <= budgets.host_bytes:
            return []
        why = _largest(components, ("device", "host"), t.peak_phase)
        return [(f"RAM per node (device = host, {ranks_per_node} ranks x {_gib(t.ram_per_rank)}) "
                 f"needs {_gib(t.ram_per_node)} > budget {_gib(budgets.host_bytes)} "
                 f"(peak in {t.peak_phase}; {why})")]
    reasons = []
    if t.device_per_rank > budgets.usable_device_bytes:
        why = _largest(components, ("device",), t.peak_phase)
        reasons.append(f"device memory per rank needs {_gib(t.device_per_rank)} > budget "
                       f"{_gib(budgets.usable_device_bytes)} ({_gib(budgets.device_bytes)} less a "
                       f"{budgets.margin:.0%} margin; peak in {t.peak_phase}; {why})")
    if t.host_per_node > budgets.host_bytes:
        why = _largest(components, ("host",), "persistent")
        reasons.append(f"host memory per node ({ranks_per_node} ranks) needs {_gib(t.host_per_node)} "
                       f"> budget {_gib(budgets.host_bytes)} ({why})")
    return reasons


def heap_kept_component(components: list) -> Component:
    """CPU host: freed gathered weights stay resident in the allocator (HEAP_RETAINED_GATHERS)."""
    gathered = max(c.device for c in components
                   if c.name in ("generation gathered weights", "update gathered params"))
    return Component("heap kept by the allocator", "persistent", host=int(HEAP_RETAINED_GATHERS * gathered),
                     note=f"{HEAP_RETAINED_GATHERS} x the largest gathered set, freed but resident")


def plan_memory(model_spec: ModelSpec, ds_config: dict, world_size: int, nodes: int,
                training: TrainingShape, budgets: Budgets, suggest: bool = True) -> MemoryPlan:
    """The per-rank memory plan of a GRPO run (and the same run as PPO with a critic).

    suggest: when it does not fit, also find the largest rollout.max_batch_rows that would.
    """
    if world_size % nodes:
        raise ValueError(f"world_size={world_size} does not divide over nodes={nodes}")
    zero, p, rpn = zero_settings(ds_config), DTYPE_BYTES[training.dtype], world_size // nodes
    spec, w = model_spec, world_size
    step_temp = optimizer_step_temp_bytes(ds_config, zero, budgets.device_is_host)
    policy_states = model_state_components("policy", spec, zero, w, p, step_temp)
    reference = reference_components(spec, training, zero, w, p)
    if training.lora_rank:  # frozen base + adapter states; the reference is the base itself
        from grpo_ds.tools.lora_plan import adapter_numel

        policy_states = lora_state_components(
            spec, adapter_numel(spec, training.lora_rank, training.lora_targets), zero, w, p,
            step_temp)
        reference = [c for c in reference if c.phase != "persistent"]
    components = (policy_states + reference
                  + generation_components(spec, training, zero, p, budgets.device_is_host)
                  + update_components(spec, training, zero, p)
                  + buffer_components(spec, zero, w, p, budgets.device_is_host))
    if budgets.device_is_host and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        components.append(heap_kept_component(components))
    critic_act = next(c for c in components if c.name == "update activations")
    critic = model_state_components("critic", spec, zero, w, p, step_temp, "critic step") + [
        Component("critic activations", "update", device=critic_act.device,
                  note="same size as the policy's")] + [
        Component(f"critic {c.name}", c.phase, c.device, c.host, c.nvme, "its own engine's")
        for c in components if c.name == "reduce bucket" or c.name.startswith("nvme ")]
    grpo = totals(components, rpn, budgets.device_is_host)
    ppo = totals(components + critic, rpn, budgets.device_is_host)
    plan = MemoryPlan(spec.name, spec.total_params, w, nodes, rpn, zero, training, budgets,
                      components, critic, grpo, ppo, deepspeed_estimate(spec, zero, w, nodes),
                      check_budgets(components, grpo, budgets, rpn))
    if suggest and not plan.fits:
        plan.suggested_max_batch_rows = suggest_max_batch_rows(model_spec, ds_config, world_size,
                                                               nodes, training, budgets)
    return plan


def suggest_max_batch_rows(model_spec: ModelSpec, ds_config: dict, world_size: int, nodes: int,
                           training: TrainingShape, budgets: Budgets) -> int | None:
    """The largest max_batch_rows (whole groups, fewer than the largest pass has now) under which
    the plan fits; None when even one group per pass does not. Binary search: memory grows with
    the groups per pass."""
    from dataclasses import replace

    group = training.group_size

    def fits(groups: int) -> bool:
        shape = replace(training, max_batch_rows=groups * group)
        return plan_memory(model_spec, ds_config, world_size, nodes, shape, budgets,
                           suggest=False).fits

    low, high = 0, training.prompts_per_pass - 1  # low: groups known to fit (0: none yet)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low * group if low else None


def model_states_figure(plan: MemoryPlan) -> tuple[int, int]:
    """Policy params + grads + fp32 grads + optimizer states: (device per rank, host per node)."""
    states = [c for c in plan.components if c.name.startswith("policy ")]
    return sum(c.device for c in states), plan.ranks_per_node * sum(c.host for c in states)


def deepspeed_estimate(spec: ModelSpec, zero: ZeroSettings, world: int, nodes: int) -> dict | None:
    """DeepSpeed's own model-states estimator for the same setup (16-bit params + fp32 Adam)."""
    rpn, offload_opt = world // nodes, zero.offload_optimizer != "none"
    if zero.stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, device, _ = estimate_zero3_model_states_mem_needs(
            total_params=spec.total_params, largest_layer_params=spec.largest_leaf,
            num_gpus_per_node=rpn, num_nodes=nodes, cpu_offload=offload_opt,
            cpu_offload_params=zero.offload_param != "none", zero_init=True)
        name = "estimate_zero3_model_states_mem_needs"
    elif zero.stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, device = estimate_zero2_model_states_mem_needs(
            total_params=spec.total_params, num_gpus_per_node=rpn, num_nodes=nodes,
            cpu_offload=offload_opt)
        name = "estimate_zero2_model_states_mem_needs"
    else:
        return None
    return {"function": name, "device_per_rank": int(device), "host_per_node": int(host)}


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


def lora_state_components(spec: ModelSpec, adapters: int, zero, world: int, p: int,
                          step_temp: int) -> list:
    """The policy's model states under LoRA: the frozen base's partitions plus the adapters'
    full model states (named "policy ..." so planner.model_states_figure counts them)."""
    base = _placed("policy base params (frozen)", "persistent",
                   p * spec.total_params / world if zero.stage >= 3 else p * spec.total_params,
                   zero.offload_param, f"{p} B/param / {world}, no grads or optimizer")
    states = model_state_components("policy adapters", SimpleNamespace(total_params=adapters),
                                    zero, world, p, step_temp)
    return [base, *states]
