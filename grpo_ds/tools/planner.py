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
import os
from dataclasses import asdict, dataclass, field

from grpo_ds.model_spec import ModelSpec
from grpo_ds.tools.planner_items import (
    buffer_components,
    generation_components,
    held_for_backward_numel,
    lora_state_components,
    model_state_components,
    optimizer_step_temp_bytes,
    packed_generation_bytes,
    reference_components,
    update_components,
)
from grpo_ds.tools.planner_shapes import (
    DEFAULT_DEVICE_MARGIN,
    DTYPE_BYTES,
    GIB,
    HEAP_RETAINED_GATHERS,
    PHASES,
    RUNTIME_DEVICE_BYTES,
    RUNTIME_HOST_BYTES,
    Budgets,
    Component,
    TrainingShape,
    ZeroSettings,
    training_shape_from_config,
    zero_settings,
)

# The planner's face: callers import these from here (the items and shapes live apart).
__all__ = [
    "DEFAULT_DEVICE_MARGIN", "DTYPE_BYTES", "GIB", "RUNTIME_DEVICE_BYTES", "RUNTIME_HOST_BYTES",
    "Budgets", "Component", "MemoryPlan", "TrainingShape", "ZeroSettings", "deepspeed_estimate",
    "held_for_backward_numel", "lora_state_components", "model_states_figure",
    "packed_generation_bytes", "plan_memory", "suggest_max_batch_rows",
    "training_shape_from_config", "zero_settings",
]

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
