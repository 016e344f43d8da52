"""The step benchmark's rank side: the workload, one timed GRPO step phase by phase, the
per-rank report. `grpo-ds bench step` (step.py) launches it and prints the table; its docstring
describes the workload and what is timed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace

from grpo_ds.tools.bench.common import Clock, gather_floats, say

ROWS = ("generation", "rewards", "reference", "old_logprobs", "update", "update/forward",
        "update/backward", "update/optimizer_step", "step")

@dataclass(frozen=True)
class Workload:
    prompts: int = 8  # all ranks together
    group_size: int = 8
    prompt_len: int = 128
    new_tokens: int = 128
    vocab: int = 8192
    hidden: int = 512
    layers: int = 6
    mlp: int = 1024
    heads: int = 8
    micro_batch: int = 32  # sequences per forward/backward on a rank
    steps: int = 2  # timed steps after the warm-up steps
    warmup_steps: int = 2


QUICK = Workload(prompts=4, group_size=4, prompt_len=16, new_tokens=8, vocab=512, hidden=64,
                 layers=2, mlp=128, heads=4, micro_batch=4, steps=1, warmup_steps=1)


def build_lm(w: Workload):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # No pad_token_id in the config: the reference is loaded inside zero.Init (see DESIGN.md).
    config = LlamaConfig(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.mlp,
                         num_hidden_layers=w.layers, num_attention_heads=w.heads,
                         num_key_value_heads=w.heads,
                         max_position_embeddings=2 * (w.prompt_len + w.new_tokens),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def build_tokenizer(vocab: int):
    """Word-level tokens t0 .. t{vocab-1}, pad = t0, and an EOS with id `vocab`: outside the
    model's logits, so it is never sampled and every completion runs to max_new_tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    words["<eos>"] = vocab
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", eos_token="<eos>",
                                   padding_side="left")


def even_share(prompts, completions, **_) -> list[float]:
    """Share of a completion's tokens with an even id: cheap, and varied within a group."""
    return [sum(int(word[1:]) % 2 == 0 for word in text.split()) / max(1, len(text.split()))
            for text in completions]


def overrides(w: Workload, args) -> list[str]:
    return [f"--train.prompts_per_step={w.prompts}", f"--rollout.group_size={w.group_size}",
            f"--rollout.max_new_tokens={w.new_tokens}", f"--train.micro_batch_size={w.micro_batch}",
            "--grpo.beta=0.04", f"--grpo.num_iterations={args.mu}", f"--model.dtype={args.dtype}",
            f"--model.fused_layers={args.fused_layers}",
            f"--model.onednn_linears={args.onednn_linears}",
            "--rollout.gather=full", "--deepspeed.config=ds_configs/zero3.json",
            "--deepspeed.reference_placement=cpu_offload"]


class TimedEngine:
    """The policy engine with its forward, backward and step timed (the update's split)."""

    def __init__(self, engine):
        self._engine = engine
        self.seconds = {"forward": 0.0, "backward": 0.0, "optimizer_step": 0.0}

    def _timed(self, key, fn, *args, **kwargs):
        import torch

        from grpo_ds.metrics import synchronized_time

        start = synchronized_time()
        with torch.profiler.record_function(f"update/{key}"):  # a range in --profile's trace
            result = fn(*args, **kwargs)
        self.seconds[key] += synchronized_time() - start
        return result

    def __call__(self, *args, **kwargs):
        return self._timed("forward", self._engine, *args, **kwargs)

    def backward(self, *args, **kwargs):
        return self._timed("backward", self._engine.backward, *args, **kwargs)

    def step(self, *args, **kwargs):
        return self._timed("optimizer_step", self._engine.step, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


PHASES = ("generation", "rewards", "reference", "old_logprobs", "update")
UPDATE_PARTS = ("forward", "backward", "optimizer_step")


def run_step(ctx: dict, step: int) -> dict:
    """One GRPO step through the trainer's functions; seconds per phase (slowest rank)."""
    import dataclasses

    from grpo_ds.sample import generate_and_score, sample_seed
    from grpo_ds.trainer import score_advantages
    from grpo_ds.update import forward_logprobs, update

    cfg, plan, rank = ctx["cfg"], ctx["plan"], ctx["rank"]
    with Clock() as whole:
        with Clock() as scored_clock:
            sampled = generate_and_score(
                cfg, ctx["rollout"], ctx["tokenizer"], ctx["rows"], [even_share], ["even_share"],
                sample_seed(cfg.train.seed, step, rank))
        batch = sampled.batch.slice(0, len(sampled.batch))
        generated = int(batch.completion_mask.sum())
        assert generated == len(batch) * cfg.rollout.max_new_tokens, "the workload must be fixed"
        with Clock() as reference:
            batch = dataclasses.replace(batch, ref_logprobs=forward_logprobs(
                ctx["reference"], batch, plan.micro_batch_size, cfg.rollout.temperature))
        scored = score_advantages(cfg, batch, sampled.rewards)
        batch = dataclasses.replace(batch, advantages=scored.advantages,
                                    completion_mask=scored.completion_mask)
        engine = TimedEngine(ctx["policy"])
        with Clock() as updated, ctx.get("update_profiler") or contextlib.nullcontext():
            update(engine, batch, cfg, plan)
    cpu = [scored_clock.cpu, reference.cpu, updated.cpu, whole.cpu]
    # rewards: what a rank's own generate_and_score took beyond its own generation. The slowest
    # rank's scored wall time minus another rank's generation mixes two ranks' clocks, and with
    # the ranks leaving the first barrier at different moments it could come out at 0.
    generation = sampled.metrics["time/generation"].value  # the rollout's own seconds
    own_rewards = scored_clock.local - generation
    local = [generation, *(engine.seconds[k] for k in UPDATE_PARTS), *cpu,
             own_rewards]
    ranks = gather_floats(local)
    seconds = {"generation": max(r[0] for r in ranks), "rewards": max(r[-1] for r in ranks),
               "reference": reference.seconds, "old_logprobs": 0.0, "update": updated.seconds,
               "step": whole.seconds}
    for i, key in enumerate(UPDATE_PARTS, start=1):
        # ranks wait for each other inside the collectives: a part's max over ranks would
        # count one rank's wait as another's work, so the split is the mean over ranks
        seconds[f"update/{key}"] = sum(r[i] for r in ranks) / len(ranks)
    for i, key in enumerate(("generate_and_score", "reference", "update", "step"), start=4):
        seconds[f"cpu/{key}"] = sum(r[i] for r in ranks) / len(ranks)  # mean CPU s per rank
    return seconds


class FixedPrompts:
    """The bench's prompts as a run's source: the same rows every step, no held-out set."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def step_rows(self, step: int) -> list[dict]:
        return self.rows

    def eval_rows(self) -> list[dict]:
        return []


def bench_rows(w: Workload, tokenizer, prompts_per_rank: int, rank: int) -> list[dict]:
    """This rank's random prompts of w.prompt_len tokens (seeded per rank)."""
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(1, w.vocab, (prompts_per_rank, w.prompt_len), generator=g).tolist()
    return [{"prompt": tokenizer.decode(p), "prompt_ids": p} for p in ids]


def setup(args, w: Workload) -> dict:
    """The run `grpo-ds train` would build for this config (grpo_ds.build.build_run: device,
    DeepSpeed config, policy loaded from a directory, reference, rollout), with the bench's
    model, prompts and reward as its workload."""
    from deepspeed import comm as dist

    from grpo_ds.build import build_run
    from grpo_ds.config import load_config
    from grpo_ds.cpu.fused_layers import is_fused
    from grpo_ds.cpu.onednn_linear import uses_onednn

    rank, world = dist.get_rank(), dist.get_world_size()
    chunk = [f"--train.logprob_chunk_size={args.chunk}"] if args.chunk else []
    cfg = load_config(None, overrides(w, args) + chunk)
    tokenizer = build_tokenizer(w.vocab)
    model_dir = args.out + ".model"  # policy and reference load it as training does
    if rank == 0:
        build_lm(w).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    dist.barrier()
    prompts = FixedPrompts(bench_rows(w, tokenizer, cfg.train.prompts_per_step // world, rank))
    run = build_run(cfg, rank, world, model_dir, source=prompts, reward_fns=[even_share],
                    say=lambda line: say(rank, line))
    e, lm = run.engines, run.engines.policy.module.lm
    return {"cfg": run.setup.cfg, "plan": run.setup.plan, "rank": rank, "world": world,
            "policy": e.policy, "reference": e.reference, "rollout": e.rollout,
            "tokenizer": e.tokenizer, "rows": prompts.rows, "run": run,
            "fused_layers": is_fused(lm), "onednn_linears": uses_onednn(lm.lm_head)}


def phase_flops(w: Workload, mu: int) -> dict:
    """Model FLOPs of each phase, all ranks together (formulas in mfu.py)."""
    from grpo_ds.tools.bench.mfu import ModelShape, forward_flops, generation_flops, train_flops

    shape = ModelShape(w.layers, w.hidden, w.mlp, w.vocab, w.heads, w.heads)
    seqs, seq_len = w.prompts * w.group_size, w.prompt_len + w.new_tokens
    update_fwd = seqs * forward_flops(shape, seq_len, w.new_tokens) * mu
    return {"generation": w.prompts * generation_flops(shape, w.prompt_len, w.new_tokens,
                                                       w.group_size),
            "rewards": 0.0, "old_logprobs": 0.0,
            "reference": seqs * forward_flops(shape, seq_len, w.new_tokens),
            "update": seqs * train_flops(shape, seq_len, w.new_tokens) * mu,
            "update/forward": update_fwd, "update/backward": 2 * update_fwd,
            "update/optimizer_step": 0.0,
            "body_params": shape.body, "head_params": shape.head}


def phase_tokens(w: Workload, mu: int) -> dict:
    """Tokens each phase processes, all ranks: generated, scored, or forwarded."""
    seqs, seq_len = w.prompts * w.group_size, w.prompt_len + w.new_tokens
    return {"generation": seqs * w.new_tokens, "rewards": seqs * w.new_tokens,
            "reference": seqs * seq_len, "old_logprobs": 0, "update": seqs * seq_len * mu,
            "update/forward": seqs * seq_len * mu, "update/backward": seqs * seq_len * mu,
            "update/optimizer_step": seqs * seq_len * mu, "step": seqs * seq_len}


def summarise(w: Workload, args, steps: list[dict], peaks: list[list[dict]], extra: dict) -> dict:
    """Mean seconds per phase, tokens/s and MFU against the aggregate (all ranks) peak."""
    per_rank_peak = [max(p[r]["flops"] for p in peaks) for r in range(len(peaks[0]))]
    aggregate = sum(per_rank_peak)
    flops, tokens = phase_flops(w, args.mu), phase_tokens(w, args.mu)
    flops["step"] = sum(flops[p] for p in PHASES)
    mean = {key: sum(s[key] for s in steps) / len(steps) for key in steps[0]}
    phases = {}
    for key in ROWS:
        seconds = mean[key]
        phases[key] = {"seconds": seconds, "tokens_per_second": tokens[key] / seconds
                       if seconds else 0.0, "flops": flops[key],
                       "mfu": flops[key] / (seconds * aggregate) if seconds else 0.0}
    # Diagnostic, not the headline: the same FLOPs over each rank's CPU seconds (its threads'
    # busy time) against the matmul's FLOP per CPU second, i.e. about the MFU the code reaches
    # when nothing else competes for the cores; wall time on a shared machine also counts the
    # time other processes ran. (Spinning threads and waits that burn CPU count as busy.)
    cpu = {k[4:]: v for k, v in mean.items() if k.startswith("cpu/")}
    cpu_flops = {"generate_and_score": flops["generation"], "reference": flops["reference"],
                 "update": flops["update"], "step": flops["step"]}
    cpu_peak = sum(max(p[r]["flops_per_cpu_second"] for p in peaks)
                   for r in range(len(per_rank_peak)))  # FLOP per CPU second, summed over ranks
    # (On a GPU the peak has no FLOP per CPU second: NaN, and no CPU-time MFU.)
    mfu_cpu = {k: cpu_flops[k] / (v * cpu_peak) for k, v in cpu.items()
               if v and not math.isnan(cpu_peak)}
    return {"workload": asdict(w), "ranks": len(per_rank_peak), "dtype": args.dtype, "mu": args.mu,
            "params_millions": round(extra.pop("params") / 1e6, 2),
            "body_params": flops["body_params"], "head_params": flops["head_params"],
            "peak_flops_per_rank": per_rank_peak, "peak_flops_aggregate": aggregate,
            "peak_measurements": peaks, "phases": phases,
            "mfu_update": phases["update"]["mfu"], "mfu_step": phases["step"]["mfu"],
            "step_seconds": phases["step"]["seconds"],
            "cpu_seconds_per_rank": cpu, "mfu_cpu": mfu_cpu, **extra}


def profile_step(ctx: dict, path: str) -> None:
    """One more step with its update under torch.profiler; op tables to PATH.rankN."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    run_step({**ctx, "update_profiler": prof}, 10**6)
    # by input shape: a [tokens, hidden] mul and a [rows, vocab] mul are different problems
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=50,
        max_shapes_column_width=70)
    with open(f"{path}.rank{ctx['rank']}", "w") as f:
        f.write(table)
    prof.export_chrome_trace(f"{path}.rank{ctx['rank']}.trace.json")


def communication(ctx: dict, params: int, args) -> dict:
    """Measured all-gather / reduce-scatter of every parameter, and the step's ZeRO-3 traffic
    from them: (1 + A + 2 mu A) all-gathers (rollout, reference, update forward and backward)
    and mu A reduce-scatters (gradients), A = micro-batches per rank (see the README)."""
    from grpo_ds.model import DTYPES
    from grpo_ds.tools.bench.common import collective_seconds

    seconds = collective_seconds(params, DTYPES[args.dtype])
    accum, mu = ctx["plan"].grad_accum, args.mu
    gathers, scatters = 1 + accum + 2 * mu * accum, mu * accum
    return {**seconds, "all_gathers_per_step": gathers, "reduce_scatters_per_step": scatters,
            "estimated_seconds_per_step": gathers * seconds["all_gather"]
            + scatters * seconds["reduce_scatter"]}


def worker(args) -> None:
    import torch
    from deepspeed.accelerator import get_accelerator

    from grpo_ds.cpu.host_memory import active_host_allocator
    from grpo_ds.engine import init_distributed
    from grpo_ds.metrics import peak_memory_metrics
    from grpo_ds.model import DTYPES
    from grpo_ds.tools.bench.mfu import peak_all_ranks

    init_distributed()  # gives each rank cores / LOCAL_SIZE threads
    threads_by_launcher = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    w = QUICK if args.quick else Workload()
    w = replace(w, micro_batch=args.micro or w.micro_batch, steps=args.steps or w.steps)
    ctx = setup(args, w)
    rank = ctx["rank"]
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                 for p in ctx["policy"].module.parameters())
    peak_seconds = 0.2 if args.quick else 1.0
    peaks = [peak_all_ranks(DTYPES[args.dtype], peak_seconds)]
    say(rank, f"peak {[round(p['flops'] / 1e9, 1) for p in peaks[0]]} GFLOP/s per rank; warm-up")
    if get_accelerator().device_name() != "cpu":
        # the peak's large operands stay in the allocator's high-water marks: the memory
        # reported is the steps', from here
        get_accelerator().reset_peak_memory_stats()
    for step in range(w.warmup_steps):
        run_step(ctx, -step)  # untimed; step ids 0, -1, ... keep the timed ones' seeds as before
    steps = []
    for step in range(1, w.steps + 1):
        steps.append(run_step(ctx, step))
        say(rank, f"step {step}: " + ", ".join(f"{k} {v:.2f}s" for k, v in steps[-1].items()))
    if args.profile:
        profile_step(ctx, args.profile)
    memory = peak_memory_metrics(ctx["policy"].device)  # before the second peak's operands
    peaks.append(peak_all_ranks(DTYPES[args.dtype], peak_seconds))
    comm = communication(ctx, params, args) if ctx["world"] > 1 else {}
    extra = {"params": params, "threads_per_rank": torch.get_num_threads(),
             "host_allocator": active_host_allocator(), "fused_layers": ctx["fused_layers"],
             "onednn_linears": ctx["onednn_linears"],
             "threads_set_by_init_distributed": threads_by_launcher,
             "local_size_env": os.environ.get("LOCAL_SIZE"), "cpu_count": os.cpu_count(),
             "logprob_chunk_size": ctx["cfg"].train.logprob_chunk_size,
             "peak_memory_bytes_per_rank": [memory[f"memory/peak_bytes_rank{r}"]
                                            for r in range(ctx["world"])],
             # GPU only (None on CPU): the caching allocator's peak reserve, what runs out
             "peak_reserved_bytes_per_rank": [memory.get(f"memory/peak_reserved_bytes_rank{r}")
                                              for r in range(ctx["world"])],
             "load_average": os.getloadavg(), "communication": comm}
    report = summarise(w, args, steps, peaks, extra)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
