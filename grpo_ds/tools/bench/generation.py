"""Benchmark: generation throughput of HybridRollout vs the usual ways to sample under ZeRO-3.

    python -m grpo_ds.tools.bench.generation [--json] [--quick] [--dtype float32|bfloat16]
                                       [--ranks N] [--methods a,b,c,...]

starts `deepspeed --num_gpus N --module grpo_ds.tools.bench.generation --worker ...` (N = --ranks,
default 2) and prints a table (or, with --json, one JSON object on one line). --methods runs only
the named methods below (default: all; "ceiling" names f, k and f+k together); the GPU check
leaves out d, whose CUDA kernels would first compile for minutes, and the ceiling, which times
CPU matmul kernels.

Workload (full): 8 prompts per rank x G = 8, prompts of 128 random tokens, up to
128 new tokens, a Llama-style model of 24.1M parameters built from a config (vocab 8192, hidden
512, 6 layers, MLP 1024, 8 heads; random init, seed 0), float32 (--dtype bfloat16: every method
in bf16, ZeRO-3's bf16 mode), ZeRO-3 with
stage3_param_persistence_threshold 0 (every weight partitioned), 1 torch thread per rank.
Sampling: temperature 1, top_p 1, top_k 0.

Methods (same prompts, G and lengths):
  a  ours: HybridRollout, full gather once per call (and "a/layers": layer groups, 2 per group;
     "a/unpacked": full gather with rollout.packed_weights off, torch's default CPU matmuls)
  b  HF generate on gathered weights: GatheredParameters once + num_return_sequences=G; it
     prefills every prompt G times. DeepSpeed's forward hooks are suspended for it exactly as
     for ours (TRL does the same): with the hooks on, the gathered weights are re-partitioned
     after every submodule and every step all-gathers again.
  c  HF generate on sharded weights, synced_gpus=True: every decode step all-gathers every layer
  d  DeepSpeed HybridEngineRollout ("hybrid_engine" enabled). It injects CUDA inference kernels
     for Llama, which fail on CPU ("not implemented on CPU backend"), so d runs on a Qwen2 config
     of the same size, for which it falls back to HF generate on the ZeRO-3 engine (per-step
     gathers, EOS ignored). Row "d/llama" tries Llama and reports the error text.
Every method decodes the same number of new tokens (c and d are slow: most of the run is theirs).
  f  floor: a's weight matmuls alone (every Linear on the rows a's no-EOS call feeds it, on the
     gathered weights and a's kernels, both ranks at once), with their share of the dense
     matmul peak measured in the same run (mfu.py): no method running those matmuls on these
     kernels can be faster, and none on this CPU can be much faster than the share allows.
  k  KV reads: the keys and values a's decode forwards must read (prompt part once per prompt),
     read once at the rate torch.sum streams memory, both ranks at once.
  f+k  the two one after the other. ceiling.py says what each counts.

Scenarios:
  no_eos   no stop token: every method generates exactly N*G*max_new_tokens tokens.
  eos      random weights almost never emit EOS (p ~ 1/8192), so the EOS row of lm_head is scaled
           by 100: EOS then ends completions at varied lengths (about 40 of 128 on average).
           Only tokens up to and including the first EOS count ("useful tokens"); HF generate
           keeps computing finished rows (c: until every row of both ranks has finished), ours
           drops them from the batch. d does not run here: it ignores EOS.
Timing: wall time from a barrier before to a barrier after (the slowest rank), tokens summed over
ranks; each method runs `--repeats` interleaved rounds (default 2) and the best round counts.
The table also shows CPU seconds (the slowest rank's process CPU time) and the ratios computed
from them: on a machine shared with other jobs, wall time swings with their load (we saw the same
call take 25 s and 41 s), CPU time much less. CPU time does not count time spent blocked waiting
for the other rank, which is small here (both ranks do the same work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from grpo_ds.tools.bench.common import launch_workers
from grpo_ds.tools.bench.generation_report import METHODS, add_ratios, format_table

EOS_ID, PAD_ID, EOS_SCALE = 1, 0, 100.0


@dataclass(frozen=True)
class Workload:
    prompts_per_rank: int = 8
    group_size: int = 8
    prompt_len: int = 128
    new_tokens: int = 128
    vocab: int = 8192
    hidden: int = 512
    layers: int = 6
    mlp: int = 1024
    heads: int = 8


QUICK = Workload(prompts_per_rank=2, group_size=4, prompt_len=16, new_tokens=8,
                 vocab=512, hidden=64, layers=2, mlp=128, heads=4)


def build_model(w: Workload, dtype: str, arch: str = "llama"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dims = {"vocab_size": w.vocab, "hidden_size": w.hidden, "intermediate_size": w.mlp,
            "num_hidden_layers": w.layers, "num_attention_heads": w.heads,
            "num_key_value_heads": w.heads,
            "max_position_embeddings": 2 * (w.prompt_len + w.new_tokens)}
    config_cls, model_cls = ((LlamaConfig, LlamaForCausalLM) if arch == "llama"
                             else (Qwen2Config, Qwen2ForCausalLM))
    model = model_cls(config_cls(**dims)).to(getattr(torch, dtype))
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] *= EOS_SCALE  # make EOS a varied, realistic stop (docstring)
    return model


def make_engine(model, dtype: str, hybrid: bool = False):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        "bf16": {"enabled": dtype == "bfloat16"},
    }
    if hybrid:
        config["hybrid_engine"] = {"enabled": True, "max_out_tokens": 1024}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=model.parameters())
    return engine


def rank_prompts(w: Workload, rank: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(2, w.vocab, (w.prompts_per_rank, w.prompt_len), generator=g).tolist()


def hf_generate(module, prompts, w: Workload, new_tokens: int, eos: bool, gathered: bool):
    """HF generate with G return sequences; returns useful (through first EOS) token count."""
    import deepspeed
    import torch

    from grpo_ds.rollout.backend import mask_through_first_stop
    from grpo_ds.rollout.gather import eval_mode, suspend_zero3_hooks

    ids = torch.tensor(prompts, device=next(module.parameters()).device)  # on the GPU if any
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": True, "top_k": 0,
              "top_p": 1.0, "temperature": 1.0, "num_return_sequences": w.group_size,
              "max_new_tokens": new_tokens, "pad_token_id": PAD_ID,
              "eos_token_id": EOS_ID if eos else None}
    with torch.no_grad(), eval_mode(module):
        if gathered:
            with suspend_zero3_hooks(module), deepspeed.zero.GatheredParameters(
                    list(module.parameters())):
                out = module.generate(ids, synced_gpus=False, **kwargs)
        else:
            out = module.generate(ids, synced_gpus=True, **kwargs)
    completion = out[:, ids.shape[1]:]
    mask, _ = mask_through_first_stop(completion, (EOS_ID,) if eos else ())
    return int(mask.sum())


def timed(fn) -> dict:
    """Run a collective call; tokens summed over ranks, wall and CPU seconds of the slowest rank.

    CPU seconds (this process, all its threads) count the work a rank did, not the time other
    jobs on a shared machine held the cores: a load-robust second view of the same run.
    """
    import torch
    from deepspeed import comm as dist

    from grpo_ds.metrics import synchronized_time

    dist.barrier()
    start, cpu_start = synchronized_time(), time.process_time()
    tokens = fn()
    seconds, cpu = synchronized_time() - start, time.process_time() - cpu_start
    dist.barrier()
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor([float(tokens), seconds, cpu], dtype=torch.float64,
                     device=get_accelerator().current_device_name())  # NCCL: no host tensors
    every = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    tokens = int(sum(x[0] for x in every))
    return rates(tokens, max(float(x[1]) for x in every), max(float(x[2]) for x in every))


def rates(tokens: int, seconds: float, cpu: float) -> dict:
    """A result row: tokens, wall and CPU seconds, and the tokens per second of each."""
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "cpu_seconds": cpu, "tokens_per_cpu_second": tokens / cpu}


def hybrid_backend(w: Workload, dtype: str, arch: str):
    """DeepSpeed HybridEngineRollout on a fresh hybrid-engine ZeRO-3 engine, or the error text."""
    from types import SimpleNamespace

    from grpo_ds.rollout.ds_hybrid import DeepSpeedHybridBackend

    try:
        engine = make_engine(build_model(w, dtype, arch=arch), dtype, hybrid=True)
        tok = SimpleNamespace(pad_token_id=PAD_ID, eos_token_id=None)  # only the ids are read
        return DeepSpeedHybridBackend(engine, tok)
    except Exception as exc:  # noqa: BLE001 -- reported in the table instead of a number
        return f"{type(exc).__name__}: {exc}"


def _tokens_of(backend, prompts, group_size, params, seed):
    return lambda: backend.generate(prompts, group_size, params, seed=seed).metrics["tokens"]


def run_methods(engine, hybrids: dict, prompts, w: Workload, eos: bool, rank: int,
                repeats: int, chosen: set[str]) -> dict:
    from grpo_ds.rollout import HybridRollout, SamplingParams

    stop = (EOS_ID,) if eos else ()
    params = SamplingParams(max_new_tokens=w.new_tokens, stop_token_ids=stop)
    ours = HybridRollout(engine.module, PAD_ID, gather="full")
    layered = HybridRollout(engine.module, PAD_ID, gather="layers", layers_per_group=2)
    unpacked = HybridRollout(engine.module, PAD_ID, gather="full", packed_weights="off")
    methods = {
        "a": lambda: ours.generate(prompts, w.group_size, params, seed=rank).metrics["tokens"],
        "a/layers": lambda: layered.generate(prompts, w.group_size, params,
                                             seed=rank).metrics["tokens"],
        "a/unpacked": lambda: unpacked.generate(prompts, w.group_size, params,
                                                seed=rank).metrics["tokens"],
        "b": lambda: hf_generate(engine.module, prompts, w, w.new_tokens, eos, gathered=True),
    }
    methods["c"] = lambda: hf_generate(engine.module, prompts, w, w.new_tokens, eos,
                                       gathered=False)
    methods = {name: fn for name, fn in methods.items() if name in chosen}
    results = {}
    if not eos:  # d only in the no-EOS scenario: it ignores EOS
        for name, backend in hybrids.items():
            if name not in chosen:
                continue
            if isinstance(backend, str):
                results[name] = {"error": backend}
            else:
                methods[name] = _tokens_of(backend, prompts, w.group_size, params, rank)
    for round_ in range(repeats):  # interleaved rounds, best kept: load spikes hit one round
        for name, fn in methods.items():
            if "error" in results.get(name, {}):
                continue
            try:
                r = timed(fn)
            # e.g. CUDA-only kernels on CPU: the same error on every rank
            except Exception as exc:  # noqa: BLE001
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            if rank == 0:
                print(f"[bench] {'eos' if eos else 'no_eos'} round {round_ + 1} {name}: "
                      f"{r['tokens']} tokens in {r['seconds']:.1f}s ({r['cpu_seconds']:.1f} "
                      f"cpu-s)", flush=True)
            if r["tokens_per_second"] > results.get(name, {}).get("tokens_per_second", 0.0):
                results[name] = r
    return results


def worker(args) -> None:
    import torch
    from deepspeed import comm as dist

    from grpo_ds.engine import init_distributed
    from grpo_ds.rollout import HybridRollout, SamplingParams

    init_distributed()  # also unlinks DeepSpeed's /dev/shm buffer, which it would leak
    torch.set_num_threads(1)
    rank = dist.get_rank()
    w = QUICK if args.quick else Workload()
    model = build_model(w, args.dtype)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    engine = make_engine(model, args.dtype)
    chosen = set(args.methods.split(","))
    hybrids = {name: hybrid_backend(w, args.dtype, arch)
               for name, arch in (("d", "qwen2"), ("d/llama", "llama")) if name in chosen}
    prompts = rank_prompts(w, rank)
    HybridRollout(engine.module, PAD_ID).generate(prompts[:1], 1, SamplingParams(2), 0)  # warm-up
    report = {"workload": asdict(w), "params_millions": round(params_m, 2),
              "ranks": dist.get_world_size(), "dtype": args.dtype, "repeats": args.repeats,
              "methods": sorted(chosen), "scenarios": {}}
    for eos in (False, True):
        results = run_methods(engine, hybrids, prompts, w, eos, rank, args.repeats, chosen)
        report["scenarios"]["eos" if eos else "no_eos"] = results
    if "ceiling" in chosen:
        report["scenarios"]["no_eos"].update(measure_ceiling(engine, prompts, w, args.repeats))
    if args.profile:
        profile_ours(engine, prompts, w, f"{args.profile}.rank{rank}")
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)


def decode_shape(w: Workload, prompts: int):
    from grpo_ds.tools.bench.ceiling import DecodeShape

    return DecodeShape(prompts=prompts, group_size=w.group_size, prompt_len=w.prompt_len,
                       new_tokens=w.new_tokens, layers=w.layers, kv_dim=w.hidden)


def measure_ceiling(engine, prompts, w: Workload, repeats: int) -> dict:
    """ceiling.py's two parts of ours' no-EOS call, best of `repeats` rounds each, both ranks at
    once: {"floor": the weight matmuls on the weights held as ours holds them (full_gather,
    oneDNN copies where supported) with their fraction of the dense matmul peak, "kv_read": the
    KV cache bytes read at stream rate, "floor+kv": the two one after the other}."""
    from grpo_ds.cpu.packed_linear import packing_supported
    from grpo_ds.rollout.gather import full_gather, suspend_zero3_hooks
    from grpo_ds.tools.bench.ceiling import kv_read_bytes, stream_reads, weight_matmuls
    from grpo_ds.tools.bench.mfu import peak_all_ranks

    module, shape = engine.module, decode_shape(w, len(prompts))
    dtype = next(module.parameters()).dtype
    pack_rows = shape.rows if packing_supported(module) is None else None
    with suspend_zero3_hooks(module), full_gather(module, {}, pack_rows):
        run, flops = weight_matmuls(module, shape)
        floor = _best([timed(run) for _ in range(repeats)])
    kv_bytes = kv_read_bytes(shape, dtype.itemsize)
    read = stream_reads(kv_bytes, tokens=shape.rows * shape.new_tokens)
    kv = _best([timed(read) for _ in range(repeats)])
    peak = max(rank["flops"] for rank in peak_all_ranks(dtype, seconds_per_size=0.5))
    floor.update(flops_per_rank=flops, peak_flops=peak,
                 fraction_of_peak=flops / floor["seconds"] / peak)
    kv.update(bytes_per_rank=kv_bytes, bytes_per_second=2 * kv_bytes / kv["seconds"])
    both = rates(floor["tokens"], floor["seconds"] + kv["seconds"],
                 floor["cpu_seconds"] + kv["cpu_seconds"])
    return {"floor": floor, "kv_read": kv, "floor+kv": both}


def _best(rounds: list[dict]) -> dict:
    return max(rounds, key=lambda r: r["tokens_per_second"])


def profile_ours(engine, prompts, w: Workload, path: str) -> None:
    """One more no-EOS call of ours under torch.profiler; the op table to `path`."""
    from torch.profiler import ProfilerActivity, profile

    from grpo_ds.rollout import HybridRollout, SamplingParams

    ours = HybridRollout(engine.module, PAD_ID, gather="full")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours.generate(prompts, w.group_size, SamplingParams(max_new_tokens=w.new_tokens), seed=0)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40,
                                          max_name_column_width=60))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    parser.add_argument("--quick", action="store_true", help="tiny workload (for tests)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="every method's dtype (default float32)")
    parser.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods to run (default: all, {','.join(METHODS)})")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved rounds per method; the best round is reported")
    parser.add_argument("--profile", default="",
                        help="after the rounds, profile one call of ours; op tables to PROFILE.rankN")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.worker:
        from grpo_ds.engine import finish_rank  # not at the top: --json's parent stays quiet

        worker(args)
        finish_rank(0)
    passed = (["--repeats", str(args.repeats), "--dtype", args.dtype, "--methods", args.methods]
              + (["--quick"] if args.quick else []))
    passed += ["--profile", os.path.abspath(args.profile)] if args.profile else []
    report = add_ratios(launch_workers("grpo_ds.tools.bench.generation", args.ranks, passed,
                                       args.timeout))
    print(json.dumps(report) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
