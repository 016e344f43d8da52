"""The memory planner's items: the bytes per rank of every model state, buffer and phase
transient, with the formulas planner.py's docstring derives. Pure functions of the shapes.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from grpo_ds.model_spec import SAMPLING_BYTES_PER_LOGIT, ModelSpec, kv_cache_bytes
from grpo_ds.tools.planner_shapes import (
    ADAM_MOMENT_BYTES,
    ADAM_TEMP_BYTES_CPU,
    ADAM_TEMP_BYTES_FOREACH,
    BACKWARD_WORKING_LAYERS,
    FP32_GRAD_BYTES,
    LOGPROB_CHUNK_FACTOR,
    MASTER_BYTES,
    NORM_FP32_BYTES,
    RUNTIME_DEVICE_BYTES,
    RUNTIME_HOST_BYTES,
    SDPA_LSE_BYTES,
    Component,
    TrainingShape,
    ZeroSettings,
)

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
