"""Held-out evaluation through the training rollout: greedy accuracy and unbiased pass@k."""

from __future__ import annotations

from grpo_ds.config import Config
from grpo_ds.reduce import global_max, global_sum
from grpo_ds.rewards import compute_rewards, trainer_state
from grpo_ds.rollout import RolloutBackend
from grpo_ds.sample import decode, prompt_token_ids, reward_inputs, rows_for, sampling_params


def correct_counts(cfg: Config, rollout: RolloutBackend, tokenizer, rows: list[dict], reward_fn,
                   device, group: int = 1, chunk: int = 256, state=None) -> list[int]:
    """Per held-out prompt of this rank: how many of its `group` completions score 1.0 (greedy
    when group is 1, else sampled at the rollout temperature).

    Generation is collective under ZeRO-3 (it gathers the weights), so every rank runs the same
    number of chunks; a rank out of rows decodes one throw-away prompt to keep in step.
    """
    counts: list[int] = []
    params = sampling_params(cfg, tokenizer, greedy=group == 1)
    rounds = int(global_max(-(-len(rows) // chunk), device))
    for start in range(0, rounds * chunk, chunk):
        part = rows[start:start + chunk]
        prompt_ids = [prompt_token_ids(tokenizer, r) for r in part] or [[tokenizer.eos_token_id]]
        out = rollout.generate(prompt_ids, group_size=group, params=params, seed=start + 1,
                               **rows_for(rollout, part))
        if not part:
            continue
        texts = decode(tokenizer, out.completion_ids, out.completion_mask)
        prompts, completions, columns = reward_inputs(part, texts, out.completion_ids,
                                                      out.completion_mask, group)
        columns.update(out.columns or {})  # multi-turn: env_reward, tool_calls, turns
        scores, _ = compute_rewards(
            [reward_fn], [getattr(reward_fn, "__name__", "reward")], prompts, completions,
            columns, on_error=cfg.rewards.on_error,
            shared={"trainer_state": state or trainer_state(0, cfg.train.steps)})
        hits = (scores[:, 0] >= 1.0).tolist()  # None (NaN) is not a hit
        counts += [sum(hits[i:i + group]) for i in range(0, len(hits), group)]
    return counts


def evaluate(cfg: Config, rollout: RolloutBackend, tokenizer, rows: list[dict], reward_fn,
             device, state=None) -> float:
    """Held-out greedy accuracy: the share of prompts whose greedy answer scores 1.0, all ranks."""
    correct = sum(correct_counts(cfg, rollout, tokenizer, rows, reward_fn, device, state=state))
    total = global_sum(len(rows), device)
    return global_sum(correct, device) / total if total else float("nan")


def evaluate_pass_at_k(cfg: Config, rollout: RolloutBackend, tokenizer, rows: list[dict],
                       reward_fn, device, state=None) -> dict[str, float]:
    """Unbiased pass@k (Chen et al. 2021) over G samples per held-out prompt, k = 1, 2, 4 .. G."""
    from grpo_ds.data import pass_at_k

    G = cfg.rollout.group_size
    counts = correct_counts(cfg, rollout, tokenizer, rows, reward_fn, device, group=G, state=state)
    ks = sorted({2**i for i in range(G.bit_length()) if 2**i <= G} | {G})
    total = global_sum(len(rows), device)
    return {f"eval/pass@{k}": global_sum(sum(pass_at_k(G, c, k) for c in counts), device)
            / max(total, 1) for k in ks}
