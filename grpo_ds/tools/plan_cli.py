"""`grpo-ds plan`: per-rank memory plan of a GRPO run before launch (see grpo_ds/tools/planner.py).

    grpo-ds plan --model DIR_OR_CONFIG_JSON [--config run.yaml] [--ds-config PRESET]
                 [--world-size N] [--nodes K] [shape flags] [--device-mem GB] [--host-mem GB]
                 [--margin FRACTION] [--json] [--section.key=value ...]

Shape flags override the YAML (which overrides the built-in defaults of grpo_ds/config_schema.py).
GB means GiB (2^30 bytes). Budgets default to the accelerator's total memory and the host's RAM;
without an accelerator the device IS the host (one RAM pool per node), unless --device-mem is
given, which plans for a separate device of that size (e.g. a GPU cluster, from a laptop).
On a separate device the verdict keeps `--margin` of its memory free (default 0.10, the share
vLLM's gpu_memory_utilization=0.9 leaves): what the plan does not itemise, such as allocator
fragmentation and communication buffers, needs room. A run that does not fit is also told the
largest `rollout.max_batch_rows` under which it would.

Exit code: 0 fits, 3 does not fit, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

from grpo_ds import model_spec
from grpo_ds.tools import planner
from grpo_ds.tools.planner import GIB, Budgets, MemoryPlan

EXIT_FITS, EXIT_USAGE, EXIT_DOES_NOT_FIT = 0, 2, 3

SHAPE_FLAGS = {  # flag dest -> TrainingShape field
    "group_size": "group_size", "prompt_len": "prompt_len", "max_new_tokens": "max_new_tokens",
    "prompts_per_rank": "prompts_per_rank", "micro_batch": "micro_batch_size", "dtype": "dtype",
    "beta": "beta", "reference": "reference", "gradient_checkpointing": "gradient_checkpointing",
    "gather": "gather", "logprob_chunk": "logprob_chunk_size", "attention": "attention",
    "max_batch_rows": "max_batch_rows", "lora_rank": "lora_rank",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="grpo-ds plan", description=__doc__.splitlines()[0],
                                 epilog="Exit code: 0 fits, 3 does not fit, 2 usage error.")
    ap.add_argument("--model", help="local HF model dir or config.json (default: model.path, "
                                    "else the built-in task's tiny Llama)")
    ap.add_argument("--config", help="grpo-ds YAML (sections model/rollout/train/grpo/deepspeed)")
    ap.add_argument("--ds-config", help="DeepSpeed JSON preset (default: deepspeed.config)")
    ap.add_argument("--world-size", type=int, help="ranks in all (default: what train launches)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes; ranks per node = world / nodes")
    shape = ap.add_argument_group("training shape (override the YAML)")
    shape.add_argument("--group-size", type=int, help="G completions per prompt")
    shape.add_argument("--prompt-len", type=int, help="longest prompt in tokens")
    shape.add_argument("--max-new-tokens", type=int)
    shape.add_argument("--prompts-per-rank", type=int)
    shape.add_argument("--micro-batch", type=int, help="sequences per forward/backward")
    shape.add_argument("--dtype", choices=sorted(planner.DTYPE_BYTES))
    shape.add_argument("--beta", type=float, help="KL coefficient (0: no reference model)")
    shape.add_argument("--reference", choices=["cpu_offload", "sharded", "none"])
    shape.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction)
    shape.add_argument("--gather", choices=["full", "layers", "auto"])
    shape.add_argument("--gather-budget", type=float, help="GB of gathered weights (layers/auto)")
    shape.add_argument("--logprob-chunk", type=int, help="rows of logits per log-prob chunk")
    shape.add_argument("--attention", choices=["sdpa", "eager"])
    shape.add_argument("--max-batch-rows", type=int,
                       help="rows one generation pass decodes (rollout.max_batch_rows)")
    shape.add_argument("--lora-rank", type=int, help="model.lora.rank (0: full fine-tuning; "
                       "LoRA: frozen base, adapter states, no reference weights)")
    ap.add_argument("--device-mem", type=float, help="GB per device (default: detected)")
    ap.add_argument("--margin", type=float, default=planner.DEFAULT_DEVICE_MARGIN,
                    help="share of a separate device's memory the verdict keeps free "
                         "(default %(default)s)")
    ap.add_argument("--host-mem", type=float, help="GB of host RAM per node (default: detected)")
    ap.add_argument("--json", action="store_true", help="one JSON object, bytes, on one line")
    return ap


def host_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().total)


def detect_budgets(device_gb: float | None, host_gb: float | None,
                   margin: float = planner.DEFAULT_DEVICE_MARGIN) -> Budgets:
    host = int(host_gb * GIB) if host_gb is not None else host_ram_bytes()
    if device_gb is not None:
        return Budgets(int(device_gb * GIB), host, device_is_host=False, margin=margin)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return Budgets(host, host, device_is_host=True, margin=margin)
    return Budgets(int(accelerator.total_memory()), host, device_is_host=False, margin=margin)


def default_world_size(cfg) -> int:
    """What `grpo-ds train` launches: deepspeed.num_gpus, every GPU, or 2 ranks on CPU."""
    if cfg.deepspeed.num_gpus:
        return cfg.deepspeed.num_gpus
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return 2 if accelerator.device_name() == "cpu" else accelerator.device_count()


def builtin_model_spec(cfg) -> model_spec.ModelSpec:
    """The embedded default's tiny Llama (grpo_ds/model.py build_tiny_llama), from cfg.model."""
    from grpo_ds.tasks.arithmetic import build_tokenizer

    m = cfg.model
    return model_spec.llama_spec({
        "vocab_size": len(build_tokenizer()), "hidden_size": m.hidden_size,
        "intermediate_size": 4 * m.hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "tie_word_embeddings": False}, "built-in tiny llama")


def planned_config(cfg, separate_device: bool):
    """`cfg` with its `auto` choices (dtype, preset, kernels) resolved as a run on the planned
    machine would resolve them: this one, or a bf16 GPU when --device-mem plans for one."""
    from grpo_ds.device import DeviceFacts, choices_of, probe_facts, resolve, resolved_config

    choices = choices_of(cfg)
    facts = (DeviceFacts("cuda", device_bf16=True, fused_adam=True) if separate_device
             else probe_facts(choices.offload_optimizer != "none"))
    return resolved_config(cfg, resolve(choices, facts))


def make_plan(args, overrides: list[str]) -> MemoryPlan:
    from grpo_ds.config import load_config, load_ds_preset

    cfg = planned_config(load_config(args.config, overrides), args.device_mem is not None)
    world = args.world_size or default_world_size(cfg)
    if args.prompts_per_rank is not None:  # only the per-rank split matters here
        cfg.train.prompts_per_step = args.prompts_per_rank * world
    shape = planner.training_shape_from_config(cfg, world)
    flags = {field: getattr(args, dest) for dest, field in SHAPE_FLAGS.items()
             if getattr(args, dest) is not None}
    if args.gather_budget is not None:
        flags["gather_budget_bytes"] = int(args.gather_budget * GIB)
    shape = dataclasses.replace(shape, **flags)
    model_path = args.model or cfg.model.path
    spec = model_spec.load_model_spec(model_path) if model_path else builtin_model_spec(cfg)
    ds_config = load_ds_preset(args.ds_config or cfg.deepspeed.config)
    budgets = detect_budgets(args.device_mem, args.host_mem, args.margin)
    return planner.plan_memory(spec, ds_config, world, args.nodes, shape, budgets)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:9.3f}"


def _row(label: str, phase: str, device: int, host: int, nvme: int, note: str = "") -> str:
    return f"{label:<30} {phase:<11}{_gib(device)} {_gib(host)} {_gib(nvme)}   {note}"


def format_table(plan: MemoryPlan) -> str:
    """The human-readable plan: per-rank components, totals, PPO comparison, verdict."""
    z, s, g, ppo = plan.zero, plan.shape, plan.grpo, plan.ppo
    title = (f"grpo-ds plan: {plan.model}, {plan.params / 1e6:.1f}M params, {s.dtype}, "
             f"ZeRO-{z.stage} (offload optimizer={z.offload_optimizer}, param={z.offload_param}), "
             f"{plan.world_size} ranks = {plan.nodes} node(s) x {plan.ranks_per_node}")
    checkpointing = "on" if s.gradient_checkpointing else "off"
    bound = (f", passes of <= {s.prompts_per_pass * s.group_size} rows"
             if s.max_batch_rows is not None else "")
    shape = (f"rollout: {s.prompts_per_rank} prompts/rank x G={s.group_size}{bound}, {s.prompt_len}+"
             f"{s.max_new_tokens} tokens, gather={s.gather} | update: micro-batch "
             f"{s.micro_batch_size}, checkpointing={checkpointing} | "
             f"reference={'base, adapters off' if s.lora_rank and s.beta else s.reference_placement}"
             + (f" | LoRA rank {s.lora_rank} on {','.join(s.lora_targets)}" if s.lora_rank else ""))
    lines = [title, shape, "",
             f"{'per rank (GiB)':<30} {'phase':<11}{'device':>9} {'host':>9} {'nvme':>9}   note"]
    for c in plan.components:
        lines.append(_row(c.name, c.phase, c.device, c.host, c.nvme, c.note))
    lines += [
        _row(f"total per rank (peak: {g.peak_phase})", "", g.device_per_rank, g.host_per_rank,
             g.nvme_per_rank, "persistent + largest phase"),
        _row(f"host per node ({plan.ranks_per_node} ranks)", "", 0, g.host_per_node, 0),
    ]
    if plan.budgets.device_is_host:
        lines.append(_row("RAM per node (device = host)", "", 0, g.ram_per_node, 0,
                          f"{plan.ranks_per_node} ranks x (device + host)"))
    if plan.deepspeed_estimate:
        est = plan.deepspeed_estimate
        dev, host = planner.model_states_figure(plan)
        lines.append(f"model states: ours {dev / GIB:.3f} GiB device/rank, {host / GIB:.3f} GiB "
                     f"host/node; DeepSpeed {est['function']}: {est['device_per_rank'] / GIB:.3f}"
                     f" / {est['host_per_node'] / GIB:.3f} (16-bit params, 1.5x host factor)")
    lines += ["", "PPO with a critic the size of the policy (GRPO has none):"]
    for c in plan.critic:
        lines.append(_row(c.name, c.phase, c.device, c.host, c.nvme, c.note))
    lines += [
        _row(f"PPO total per rank ({ppo.peak_phase})", "", ppo.device_per_rank, ppo.host_per_rank,
             ppo.nvme_per_rank),
        _row("PPO host per node", "", 0, ppo.host_per_node, 0),
        (f"PPO - GRPO per rank (device + host): {plan.ppo_diff_bytes / GIB:+.3f} GiB "
         f"({plan.ppo_diff_pct:+.1f}%)"),
        "",
        (f"budgets: device {plan.budgets.device_bytes / GIB:.2f} GiB per rank, host "
         f"{plan.budgets.host_bytes / GIB:.2f} GiB per node"
         + (" (CPU-only: device = host)" if plan.budgets.device_is_host else
            f" (device: {plan.budgets.margin:.0%} kept free)")),
        f"verdict: {plan.verdict}",
    ]
    if plan.suggested_max_batch_rows is not None:
        lines.append(f"it would fit with --rollout.max_batch_rows={plan.suggested_max_batch_rows}"
                     " (generation in passes)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the plan; return 0 when it fits, 3 when it does not, 2 on bad input."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0])]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from grpo_ds.config import ConfigError

    try:
        # DeepSpeed logs to stdout (e.g. "Setting accelerator to CPU"); keep stdout for the plan.
        with contextlib.redirect_stdout(sys.stderr):
            plan = make_plan(args, rest)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as err:
        print(f"grpo-ds plan: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(plan.to_json() if args.json else format_table(plan))
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
