"""The rank side of `grpo-ds bench memory` (grpo_ds/tools/bench/memory.py launches it).

    deepspeed --num_gpus 2 --module grpo_ds.tools.bench.memory_worker --worker --out F --run '{json Run}'

A rank builds its engines with build.build_engines, as `grpo-ds train` does, from a model made
inside `zero.Init` (random init, seed 0, so no rank ever holds a whole model), then runs real GRPO
steps with the trainer's own functions: `generate_and_score` (the configured rollout),
`forward_logprobs` on the reference, `score_advantages`, `update`. With `critic`, a value model
of the policy's shape (grpo_ds/tools/critic.py: body + scalar head, its own AdamW, the same ZeRO
config) is built next and the same steps run again with the critic's forward before the update
and its forward+backward+step after it: the PPO-style step that GRPO avoids. Rank 0 writes every rank's peaks, phases and losses to F.

Peak per rank = the kernel's RSS high-water mark (VmHWM), restarted at every phase boundary
(/proc/self/clear_refs) and folded into a per-phase maximum, so the maximum over phases is the
process's peak; on an accelerator also max_memory_allocated.

`--logprob-worker` (one plain process) measures the log-prob working set instead: forward,
forward+backward, and forward+backward with entropy over a large vocabulary, naive full logits vs
grpo_ds.logprobs chunks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from grpo_ds.tools.bench.common import (
    device_peak,
    memory_status,
    restart_peaks,
    say,
    start_memory_guard,
)

if TYPE_CHECKING:  # the launcher imports this module; the builder loads deepspeed
    from grpo_ds.build import LoadModel

GIB = 2**30
GUARD_BYTES = 1 * GIB  # a rank exits when the machine has less than this available
SIZES = {  # Llama-style shapes: vocab, hidden, layers, MLP, heads, kv heads
    "tiny": (512, 64, 2, 128, 4, 4),
    "25M": (8192, 512, 6, 1024, 8, 8),
    "125M": (32000, 768, 12, 2048, 12, 12),
    "300M": (32000, 1024, 18, 2816, 16, 16),
    "570M": (32000, 1280, 24, 3584, 20, 20),
    "1.1B": (32000, 2048, 22, 5632, 32, 4),  # TinyLlama's shape
    "2.1B": (32000, 2560, 28, 6912, 20, 4),
    "3.0B": (32000, 2560, 42, 6912, 20, 4),
    "4.0B": (32000, 3072, 40, 8192, 24, 4),
    "7B": (32000, 4096, 32, 11008, 32, 32),  # Llama-2-7B's shape (6.74B parameters)
}
NVME_PLACEHOLDER = "/local_nvme"


@dataclass(frozen=True)
class Run:
    """One launch: model, preset, workload and knobs."""

    preset: str = "zero3"
    size: str = "25M"
    dtype: str = "bfloat16"
    prompts_per_rank: int = 2
    group_size: int = 4
    prompt_len: int = 32
    new_tokens: int = 16
    micro_batch: int = 4
    steps: int = 2
    beta: float = 0.04
    reference: str = "cpu_offload"
    gather: str = "full"
    checkpointing: bool = False
    chunk: int = 4096
    critic: bool = True
    zero: dict = field(default_factory=dict)  # overrides of the preset's zero_optimization
    nvme_path: str = ""
    malloc: str = "default"  # glibc: default | mmap (MALLOC_MMAP_THRESHOLD_=65536)
    lora_rank: int = 0  # model.lora.rank (all-linear); 0 = full fine-tuning


def llama_config(size: str):
    from transformers import LlamaConfig

    vocab, hidden, layers, mlp, heads, kv = SIZES[size]
    # No pad_token_id: transformers' init would index the already partitioned embedding.
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=kv,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def fill_nvme_path(ds: dict, path: str) -> dict:
    """Put `path` where a preset says /local_nvme (the optimizer's and params' swap folders)."""
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("nvme_path") == NVME_PLACEHOLDER:
            zero[key]["nvme_path"] = path
    return ds


def run_config(run: Run, world: int):
    """build.RunPlan of a run as grpo-ds train would make it, its DeepSpeed config filled."""
    from grpo_ds.build import plan_run
    from grpo_ds.config import load_config

    cfg = load_config(None, [
        f"--train.prompts_per_step={run.prompts_per_rank * world}",
        f"--rollout.group_size={run.group_size}", f"--rollout.max_new_tokens={run.new_tokens}",
        f"--data.max_prompt_length={run.prompt_len}", f"--train.micro_batch_size={run.micro_batch}",
        f"--grpo.beta={run.beta}", f"--model.dtype={run.dtype}", f"--rollout.gather={run.gather}",
        f"--model.gradient_checkpointing={run.checkpointing}",
        f"--train.logprob_chunk_size={run.chunk}", f"--deepspeed.config=ds_configs/{run.preset}.json",
        f"--deepspeed.reference_placement={run.reference}", f"--model.lora.rank={run.lora_rank}"])
    setup = plan_run(cfg, world, say=lambda _: None)  # train.py's plan and device resolution
    ds = fill_nvme_path(setup.ds, run.nvme_path)
    ds["zero_optimization"].update(run.zero)
    return dataclasses.replace(setup, ds=ds)


def planned(run: Run, cfg, ds: dict, world: int) -> dict:
    """The planner's per-rank peak for this exact run (RAM per rank on CPU, device on GPU)."""
    from grpo_ds import model_spec
    from grpo_ds.tools import planner
    from grpo_ds.tools.plan_cli import detect_budgets

    spec = model_spec.llama_spec(llama_config(run.size).to_dict(), run.size)
    shape = planner.training_shape_from_config(cfg, world)
    plan = planner.plan_memory(spec, ds, world, 1, shape, detect_budgets(None, None))
    key = "ram_per_rank" if plan.budgets.device_is_host else "device_per_rank"
    return {"params": spec.total_params, "grpo": getattr(plan.grpo, key),
            "with_critic": getattr(plan.ppo, key), "grpo_phase": plan.grpo.peak_phase,
            "fits": plan.fits}


class Peaks:
    """This rank's peak memory by phase. The RSS high-water mark restarts at each phase boundary
    and is folded into the phase that just ended (time between phases goes to "between")."""

    def __init__(self):
        self.host = {"startup": memory_status()["hwm"]}
        self.device, self.seconds = {}, {}
        self.timeline = []  # (phase, RSS at its start, its peak), in order
        self.start_rss = memory_status()["rss"]
        restart_peaks()

    def _fold(self, name: str) -> None:
        status = memory_status()
        self.host[name] = max(self.host.get(name, 0), status["hwm"])
        self.timeline.append((name, self.start_rss, status["hwm"]))
        self.start_rss = status["rss"]
        if (device := device_peak()) is not None:
            self.device[name] = max(self.device.get(name, 0), device)
        restart_peaks()

    @contextmanager
    def phase(self, name: str):
        from grpo_ds.metrics import synchronized_time

        self._fold("between")
        start = synchronized_time()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + synchronized_time() - start
        self._fold(name)

    def overall(self) -> int:
        self._fold("between")
        return max(self.host.values())


def made_in_zero_init(size: str) -> LoadModel:
    """build.LoadModel of a size's shape: random weights (seed 0, so the reference starts as the
    policy) made inside zero.Init, so no rank ever holds the whole model; the bench tokenizer."""
    from grpo_ds.tools.bench.step_worker import build_tokenizer

    tokenizer = build_tokenizer(SIZES[size][0])  # EOS outside the vocab

    def load(ds: dict):
        import deepspeed
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=ds):
            return LlamaForCausalLM(llama_config(size)), tokenizer

    return load


def build_critic(ctx: dict, peaks: Peaks):
    """The PPO critic engine: the policy's body + a value head, own optimizer, same ZeRO config."""
    import os

    import deepspeed
    import torch

    from grpo_ds.tools.critic import build_value_model

    ds = json.loads(json.dumps(ctx["ds"]))
    zero = ds["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):  # its own swap folders
        if zero.get(key, {}).get("device") == "nvme":
            zero[key]["nvme_path"] = os.path.join(zero[key]["nvme_path"], "critic")
    with peaks.phase("critic_build"):
        torch.manual_seed(1)
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = build_value_model(llama_config(ctx["run"].size))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds)
    return engine, sum(p.ds_numel for p in model.parameters())


def grpo_step(ctx: dict, peaks: Peaks, step: int, critic=None) -> dict:
    """One GRPO step through the trainer's functions (plus the critic's work when given)."""
    import dataclasses

    from grpo_ds.sample import generate_and_score, sample_seed
    from grpo_ds.tools.bench.step_worker import even_share
    from grpo_ds.tools.critic import critic_update, critic_values
    from grpo_ds.trainer import score_advantages
    from grpo_ds.update import forward_logprobs, update

    cfg, plan, e = ctx["cfg"], ctx["plan"], ctx["engines"]
    with peaks.phase("generation"):
        sampled = generate_and_score(
            cfg, e.rollout, e.tokenizer, ctx["rows"], [even_share], ["even_share"],
            sample_seed(cfg.train.seed, step, ctx["rank"]))
        batch, rewards = sampled.batch.slice(0, len(sampled.batch)), sampled.rewards
    if e.reference is not None:
        with peaks.phase("reference"):
            batch = dataclasses.replace(batch, ref_logprobs=forward_logprobs(
                e.reference, batch, plan.micro_batch_size, cfg.rollout.temperature))
        ctx["reference_rss"].setdefault("after_forward", memory_status()["rss"])
    if critic is not None:
        with peaks.phase("critic_values"):
            old_values = critic_values(critic, batch, plan.micro_batch_size)
    scored = score_advantages(cfg, batch, rewards)
    batch = dataclasses.replace(batch, advantages=scored.advantages,
                                completion_mask=scored.completion_mask)
    with peaks.phase("update"):
        metrics = {k: m.value for k, m in update(e.policy, batch, cfg, plan).metrics.items()}
    if critic is not None:
        with peaks.phase("critic_update"):
            critic_update(critic, batch, old_values, rewards, plan.micro_batch_size,
                          plan.world_size)
    return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}


def setup(run: Run, peaks: Peaks) -> dict:
    """The run's engines through build.build_engines, as `grpo-ds train` builds them (the model
    made from the size's shape), and this rank's prompts."""
    import torch
    from deepspeed import comm as dist

    from grpo_ds.build import build_engines

    rank, world = dist.get_rank(), dist.get_world_size()
    setup_plan = run_config(run, world)
    cfg, plan, ds = setup_plan.cfg, setup_plan.plan, setup_plan.ds
    ctx = {"run": run, "cfg": cfg, "plan": plan, "ds": ds, "rank": rank, "world": world,
           "planned": planned(run, cfg, ds, world) if rank == 0 else None, "reference_rss": {}}

    @contextmanager
    def metered(name: str):  # each build phase's peak; the RSS before a reference is built
        with peaks.phase(name):
            yield
        if name == "policy_build":
            ctx["reference_rss"]["before_build"] = memory_status()["rss"]

    ctx["engines"] = e = build_engines(setup_plan, made_in_zero_init(run.size),
                                       say=lambda _: None, phase=metered)
    ctx["reference_rss"]["after_build"] = memory_status()["rss"]
    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(1, SIZES[run.size][0], (plan.prompts_per_rank, run.prompt_len),
                        generator=g).tolist()
    ctx["rows"] = [{"prompt": e.tokenizer.decode(p), "prompt_ids": p} for p in ids]
    return ctx


def live_models() -> dict:
    """Counted in this process after the steps: DeepSpeed engines besides the policy's (the
    reference engines the run built) and whole HF causal LMs (policy, reference)."""
    import gc

    from deepspeed import DeepSpeedEngine
    from transformers import LlamaForCausalLM

    objects = gc.get_objects()
    return {"reference_engines": sum(isinstance(o, DeepSpeedEngine) for o in objects) - 1,
            "causal_lms": sum(isinstance(o, LlamaForCausalLM) for o in objects)}


def worker(run: Run, out: str) -> None:
    from deepspeed import comm as dist

    from grpo_ds.engine import init_distributed

    init_distributed()
    rank = dist.get_rank()
    start_memory_guard(GUARD_BYTES, rank)
    peaks = Peaks()
    ctx = setup(run, peaks)
    say(rank, f"{run.preset}/{run.size}: engines built")
    steps = [grpo_step(ctx, peaks, s) for s in range(1, run.steps + 1)]
    mine = {"grpo_peak": peaks.overall(), **live_models(), "grpo_phases": dict(peaks.host),
            "grpo_seconds": dict(peaks.seconds), "reference_rss": ctx["reference_rss"],
            "device_phases": dict(peaks.device), "steps": steps, "timeline": peaks.timeline}
    say(rank, f"{run.preset}/{run.size}: GRPO steps done, peak {mine['grpo_peak'] / GIB:.2f} GiB")
    if run.critic:
        critic, mine["critic_params"] = build_critic(ctx, peaks)
        peaks.seconds = {}
        for s in range(run.steps + 1, 2 * run.steps + 1):
            grpo_step(ctx, peaks, s, critic)
        mine.update(critic_peak=peaks.overall(), critic_phases=dict(peaks.host),
                    critic_seconds=dict(peaks.seconds))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"run": asdict(run), "planned": ctx["planned"], "ranks": everyone}, f)
    dist.barrier()


def logprob_worker(out: str, rows_list: list[int], vocab: int, hidden: int,
                   chunks: list[int]) -> None:
    """Peak extra RSS of per-token log-probs over a `vocab` head, bf16, for each number of rows:
    naive full logits vs token_logprobs per chunk size; forward only (as the reference runs),
    forward+backward (log-probs only), forward+backward with entropy (as the update asks)."""
    import torch

    from grpo_ds.logprobs import logits_to_token_logprobs, token_logprobs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).bfloat16()
    report = {"vocab": vocab, "hidden": hidden, "dtype": "bfloat16", "rows": {}}
    modes = {"forward": (False, False), "backward": (True, False), "backward_entropy": (True, True)}
    for rows in rows_list:
        x = torch.randn(1, rows, hidden, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, vocab, (1, rows))
        results = report["rows"][str(rows)] = {}
        for name, chunk in [("warm-up", None), ("naive", None), *((str(c), c) for c in chunks)]:
            for mode, (grad, entropy) in modes.items():
                head.zero_grad(set_to_none=False)  # the grads exist: only the working set counts
                restart_peaks()
                base = memory_status()["rss"]
                with torch.set_grad_enabled(grad):
                    logprobs, _ = (
                        logits_to_token_logprobs(head(x), targets, with_entropy=entropy)
                        if chunk is None else
                        token_logprobs(x, head, targets, chunk_size=chunk, with_entropy=entropy))
                    if grad:
                        logprobs.sum().backward()
                extra = memory_status()["hwm"] - base
                del logprobs
                unit = min(chunk or rows, rows) * vocab * 4
                if name != "warm-up":
                    results.setdefault(name, {})[mode] = {"peak_extra_bytes": extra,
                                                          "over_chunk_x_vocab_x_4": extra / unit}
    with open(out, "w") as f:
        json.dump(report, f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--run", help="a Run as JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--logprob-worker", action="store_true")
    parser.add_argument("--logprob-shape", help="rows[+rows...],vocab,hidden")
    parser.add_argument("--chunks", help="chunk sizes, comma-separated")
    args = parser.parse_args(argv)
    if args.logprob_worker:
        rows, vocab, hidden = args.logprob_shape.split(",")
        logprob_worker(args.out, [int(r) for r in rows.split("+")], int(vocab), int(hidden),
                       [int(c) for c in args.chunks.split(",")])
    else:
        from grpo_ds.engine import finish_rank

        worker(Run(**json.loads(args.run)), args.out)
        finish_rank(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
