"""One episode's tokens as they grow turn by turn, and the batch tensors built from episodes.

An episode's completion is everything after the prompt: model turns and observations in order.

    completion_ids  [Tc]  model turn 1 | observation 1 | model turn 2 | ...
    own             [Tc]  1 on the model's own tokens, 0 on observation tokens
    logprobs        [Tc]  the sampler's log-prob of each own token, 0 on observation tokens

The whole completion is attended to (the model read the observations), but only `own` tokens
enter the loss, the KL and the log-prob gap: the model did not choose the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpo_ds import batch


@dataclass
class Episode:
    prompt: list[int]  # prompt token ids, no padding
    row: dict | None = None
    messages: list[dict] = field(default_factory=list)
    completion: list[int] = field(default_factory=list)
    own: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0  # model turns taken
    tool_calls: int = 0
    tool_failures: int = 0
    env_reward: float | None = None
    truncated: bool = False  # ran out of turns or tokens without ending
    done: bool = False

    def context(self) -> list[int]:
        """Prompt and completion so far: what the next model turn is conditioned on."""
        return self.prompt + self.completion

    def add_model_turn(self, tokens: list[int], logprobs: list[float], budget: int) -> bool:
        """Append a model turn, cut to the token budget; True when it had to be cut."""
        room = budget - len(self.completion)
        cut = len(tokens) > room
        tokens, logprobs = tokens[:room], logprobs[:room]
        self.completion += tokens
        self.own += [1] * len(tokens)
        self.logprobs += logprobs
        self.turns += 1
        return cut

    def add_observation(self, tokens: list[int], budget: int) -> bool:
        """Append environment tokens (not the model's own), cut to the budget; True when cut."""
        room = budget - len(self.completion)
        cut = len(tokens) > room
        tokens = tokens[:room]
        self.completion += tokens
        self.own += [0] * len(tokens)
        self.logprobs += [0.0] * len(tokens)
        return cut


def episode_tensors(episodes: list[Episode], pad_id: int, device) -> dict[str, torch.Tensor]:
    """The RolloutOutput tensors of the episodes, rows in episode order.

    prompt_ids/prompt_mask [E, Tp] left-padded; completion_ids/completion_mask [E, Tc]
    right-padded (mask 1 on every completion token); own_mask [E, Tc]; sampled_logprobs
    [E, Tc] float32; truncated [E] bool. No episodes (a rank with no prompts): Tp = Tc = 0."""
    if not episodes:
        empty = torch.zeros((0, 0), dtype=torch.long, device=device)
        return {"prompt_ids": empty, "prompt_mask": empty, "completion_ids": empty,
                "completion_mask": empty, "own_mask": empty,
                "sampled_logprobs": empty.float(),
                "truncated": torch.zeros(0, dtype=torch.bool, device=device)}
    prompt_ids, prompt_mask = batch.left_pad([e.prompt for e in episodes], pad_id)
    completion_ids, completion_mask = batch.right_pad([e.completion for e in episodes], pad_id)
    width = completion_ids.shape[1]
    own = torch.zeros((len(episodes), width), dtype=torch.long)
    logprobs = torch.zeros((len(episodes), width), dtype=torch.float32)
    for row, e in enumerate(episodes):
        own[row, :len(e.own)] = torch.tensor(e.own, dtype=torch.long)
        logprobs[row, :len(e.logprobs)] = torch.tensor(e.logprobs, dtype=torch.float32)
    tensors = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
               "completion_ids": completion_ids, "completion_mask": completion_mask,
               "own_mask": own, "sampled_logprobs": logprobs,
               "truncated": torch.tensor([e.truncated for e in episodes], dtype=torch.bool)}
    return {k: v.to(device) for k, v in tensors.items()}


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Per-rank means over episodes; TRL's names for the tool metrics: `tools/call_frequency`
    (calls per episode) and `tools/failure_frequency` (failed calls / calls)."""
    if not episodes:
        return {}
    calls = sum(e.tool_calls for e in episodes)
    own = sum(sum(e.own) for e in episodes)
    total = sum(len(e.own) for e in episodes)
    return {
        "tools/call_frequency": calls / len(episodes),
        "tools/failure_frequency": sum(e.tool_failures for e in episodes) / calls if calls else 0.0,
        "tools/episodes_with_call": sum(e.tool_calls > 0 for e in episodes) / len(episodes),
        "multiturn/turns_mean": sum(e.turns for e in episodes) / len(episodes),
        "multiturn/own_token_fraction": own / total if total else 1.0,
    }
