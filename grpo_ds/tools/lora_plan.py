"""What LoRA (model.lora) changes in the memory plan (planner.py), per rank: the adapters' sizes here,
their states in planner.lora_state_components.

With N base parameters, n adapter parameters, W ranks and p bytes of the training dtype:
    base params        p N/W      frozen ZeRO-3 partitions (device, or host/NVMe with offload_param);
                                  no gradient, no fp32 copy, no Adam moments
    adapter states     the model states of a trainable model of n parameters (planner's
                       model_state_components: params, grads, fp32 grads, master + Adam)
    reference          no persistent weights: it is the base, the adapters switched off; its
                       forward's transients (gathered layers, activations) stay as they are
An adapted Linear d_in -> d_out of rank r adds r (d_in + d_out) parameters (A [r, d_in] and
B [d_out, r]); `all-linear` adapts every Linear of the decoder layers (not lm_head).
"""

from __future__ import annotations

from grpo_ds.model_spec import ModelSpec


def linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each Linear of one Llama-family decoder layer, by module name."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    i = spec.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def adapter_numel(spec: ModelSpec, rank: int, targets: tuple[str, ...] = ("all-linear",)) -> int:
    """Parameters of rank-`rank` adapters on `targets` (names of linear_shapes, or all-linear)
    over every decoder layer. Unknown names raise ValueError."""
    shapes = linear_shapes(spec)
    names = list(shapes) if tuple(targets) == ("all-linear",) else list(targets)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"lora target {unknown[0]!r}: the planner knows {', '.join(shapes)} "
                         "(Llama-family Linears) or all-linear")
    return spec.num_layers * sum(rank * (shapes[n][0] + shapes[n][1]) for n in names)

