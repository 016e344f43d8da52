"""Benchmark: a multi-turn rollout with the KV cache extended between turns vs re-encoded.

    python -m grpo_ds.tools.bench.multiturn --model RUN_DIR/sft_model [--prompts 32]
        [--group 8] [--repeats 3] [--threads 1] [--json]

On the built-in `tool_arithmetic` task (its held-out prompts, its tool, call format and limits,
as `grpo-ds train --task.name=tool_arithmetic` sets them), one process, no DeepSpeed: the same
MultiTurnRollout over HybridRollout runs with `kv_cache=extend` and `kv_cache=reencode`,
interleaved, `--repeats` rounds, best round each; the two must give the same tokens (checked,
else it exits 1). A model that never calls its tool runs one turn and measures nothing, so give
it a model that calls (the warm-up's `sft_model`, or an exported GRPO checkpoint).
Reports wall seconds of each, their ratio (re-encode / extend), the tool-call rate and turns.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(model_dir: str, kv_cache: str, cfg, model, tokenizer):
    from grpo_ds.agents.build import build_multiturn
    from grpo_ds.rollout import HybridRollout

    cfg.multiturn.kv_cache = kv_cache
    backend = HybridRollout(model, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                            packed_weights=cfg.rollout.packed_weights)
    return build_multiturn(cfg, backend, tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory (safetensors)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from grpo_ds.build import make_source
    from grpo_ds.config import load_config
    from grpo_ds.model import load_pretrained
    from grpo_ds.sample import prompt_token_ids, rows_for, sampling_params

    cfg = load_config(None, ["--task.name=tool_arithmetic"])
    source, _ = make_source(cfg, 0, 1)
    model, tokenizer = load_pretrained(args.model, "float32")
    rows = source.eval_rows()[:args.prompts]
    prompt_ids = [prompt_token_ids(tokenizer, r) for r in rows]
    params = sampling_params(cfg, tokenizer)
    best, outs = {}, {}
    for _ in range(args.repeats):
        for mode in ("extend", "reencode"):
            rollout = build(args.model, mode, cfg, model, tokenizer)
            start = time.perf_counter()
            outs[mode] = rollout.generate(prompt_ids, args.group, params, seed=7,
                                          **rows_for(rollout, rows))
            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - start)
    same = all(torch.equal(getattr(outs["extend"], k), getattr(outs["reencode"], k))
               for k in ("completion_ids", "completion_mask", "loss_mask"))
    episodes = outs["extend"].metrics["episode_metrics"]
    result = {"extend_seconds": round(best["extend"], 3),
              "reencode_seconds": round(best["reencode"], 3),
              "reencode_over_extend": round(best["reencode"] / best["extend"], 3),
              "same_tokens": same, "episodes": len(prompt_ids) * args.group,
              "tool_call_rate": episodes["tools/episodes_with_call"],
              "turns_mean": episodes["multiturn/turns_mean"],
              "tokens": int(outs["extend"].completion_mask.sum())}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}  {value}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
