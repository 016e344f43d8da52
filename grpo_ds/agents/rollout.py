"""Multi-turn rollouts: model turns and environment turns alternate over any RolloutBackend.

    turn 0   backend.generate(prompts, G)       each prompt prefilled once for its G episodes
             env.step(conversation) per episode  -> observation tokens appended (not own), or done
    turn k   backend.generate(live contexts, 1)  only the episodes still going; finished ones
                                                 have left the batch
    ...      until no episode is live anywhere, or max_turns model turns

A model turn stops at EOS (the episode ends), at the end marker of a tool call or at
`max_new_tokens`; then the environment answers with an observation (the episode goes on) or says
it is done. The token budget `max_total_tokens` bounds each episode's completion (model and
observation tokens together): a turn or observation that reaches it is cut and ends the episode.
An episode is `truncated` when its last model turn was cut (by the budget or max_new_tokens).

ZeRO-3: every generate call gathers the partitioned weights, a collective. Before each turn the
ranks agree (all-reduce MAX) whether any rank still has a live episode; a rank with none calls
generate with no prompts, which joins the gathers and decodes nothing. So all ranks run the same
number of generate calls, however differently their episodes end.

KV cache (`kv_cache`): "extend" keeps each episode's keys and values between turns and prefills
only the new tokens (the turn's last token and the observation; grpo_ds/rollout/turns.py), over
weights gathered once for the whole rollout; "reencode" runs each turn as a fresh generate that
re-prefills the episode's whole context. Both give the same tokens (tests/test_multiturn_kv.py):
observations are appended as tokens and no chat template re-renders earlier turns, so every
template this rollout builds allows extension. What can refuse it is the backend or the model:
a backend without a multi-turn session, sliding-window cache layers, or more episodes than one
pass of the engine may hold. "auto" then re-encodes and says why in a log line (all ranks
re-encode if one must: the choice decides the collectives); "extend" raises instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace

import torch

from grpo_ds.agents.config import KV_CACHE_MODES
from grpo_ds.agents.environment import Environment
from grpo_ds.agents.episodes import Episode, episode_metrics, episode_tensors
from grpo_ds.rollout.backend import RolloutOutput, SamplingParams

logger = logging.getLogger(__name__)


def _local_max(value: int) -> int:
    return value


def world_max(device=None) -> Callable[[int], int]:
    """All-reduce MAX over all ranks when torch.distributed runs, else the value itself.

    device: where the reduced tensor lives, the policy's device (NCCL takes device tensors
    only); None = the accelerator's current device."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return _local_max
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    device = device if device is not None else get_accelerator().current_device_name()

    def rank_max(value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    return rank_max


class MultiTurnRollout:
    """A RolloutBackend whose completions are whole episodes (model turns + observations).

    backend: generates one model turn (HybridRollout, or ColocatedRollout around it).
    make_env: () -> Environment, called once per episode.
    tokenizer: encodes observations (no special tokens added) and decodes model turns.
    call_end: the tool-call end marker; a model turn stops there (a stop token when it is one
        token, a stop string otherwise).
    max_turns: most model turns per episode (1 = single-turn: the environment is still asked
        for its reward, its observation is dropped).
    max_total_tokens: most completion tokens per episode, observations included.
    rank_max: the all-reduce MAX that keeps ranks in step (world_max(); identity on one process).
    device: the policy's device, where that all-reduce's tensor lives (None: the accelerator's).
    kv_cache: "auto" | "extend" | "reencode" (module docstring).
    """

    takes_rows = True  # the trainer passes dataset rows to generate (the environment gets them)

    def __init__(self, backend, make_env: Callable[[], Environment], tokenizer, call_end: str,
                 max_turns: int, max_total_tokens: int, rank_max: Callable[[int], int] | None = None,
                 device=None, kv_cache: str = "auto"):
        if kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {kv_cache!r}")
        self.kv_cache, self.said_why = kv_cache, False
        if max_turns < 1 or max_total_tokens < 1:
            raise ValueError(f"max_turns and max_total_tokens must be >= 1, got {max_turns}, "
                             f"{max_total_tokens}")
        self.backend, self.make_env, self.tokenizer = backend, make_env, tokenizer
        self.max_turns, self.budget = max_turns, max_total_tokens
        self.rank_max = rank_max or world_max(device)
        end_ids = tokenizer(call_end, add_special_tokens=False)["input_ids"]
        self.stop_ids = tuple(end_ids) if len(end_ids) == 1 else ()
        self.stop_strings = () if len(end_ids) == 1 else (call_end,)

    def generate(self, prompt_ids: Sequence[Sequence[int]], group_size: int,
                 params: SamplingParams, seed: int, rows: Sequence[dict] | None = None
                 ) -> RolloutOutput:
        start = time.perf_counter()
        episodes = []
        for i, prompt in enumerate(prompt_ids):
            text = self.tokenizer.decode(list(prompt), skip_special_tokens=True)
            for _ in range(group_size):
                episodes.append(Episode(list(prompt), None if rows is None else rows[i],
                                        messages=[{"role": "user", "content": text}]))
        envs = [self.make_env() for _ in episodes]
        turn_params = params
        if self.max_turns > 1:  # a call ends the turn only where a next turn can follow
            turn_params = replace(params,
                                  stop_token_ids=tuple(params.stop_token_ids) + self.stop_ids,
                                  stop_strings=tuple(params.stop_strings) + self.stop_strings)
        device, calls = None, 0
        capacity = max((len(p) for p in prompt_ids), default=0) + self.budget
        extend = self.max_turns > 1 and self._extend(len(episodes), group_size, capacity)
        with (self.backend.turns(len(episodes)) if extend else nullcontext()) as session:
            for turn in range(self.max_turns):
                live = [i for i, e in enumerate(episodes) if not e.done]
                if not self.rank_max(int(bool(live))):
                    break
                room = max((self.budget - len(episodes[i].completion) for i in live), default=1)
                step_params = replace(turn_params,
                                      max_new_tokens=max(1, min(params.max_new_tokens, room)),
                                      min_new_tokens=min(params.min_new_tokens, max(1, room)))
                # turn 0 samples as a single-turn rollout with this seed would (max_turns=1 is one)
                turn_seed = seed if turn == 0 else (seed * 1_000_003 + turn * 7_919) % (2**63)
                out = self._model_turn(session, turn, prompt_ids, group_size, episodes, live,
                                       step_params, turn_seed)
                device, calls = out.completion_ids.device, calls + 1
                self._take_turn(out, live, episodes, envs, turn, params)
        return self._output(episodes, device, start, calls, group_size)

    def _model_turn(self, session, turn, prompt_ids, group_size, episodes, live, params, seed):
        """One model turn of the live episodes: on the kept caches (session) or re-encoded."""
        contexts = [episodes[i].context() for i in live]
        if session is not None:
            if turn == 0:  # the G episodes of a prompt share its prefill
                return session.first_turn(prompt_ids, group_size, params, seed)
            return session.next_turn(live, contexts, params, seed)
        if turn == 0:
            return self.backend.generate(prompt_ids, group_size, params, seed)
        return self.backend.generate(contexts, 1, params, seed)

    def _extend(self, rows: int, group_size: int, capacity: int) -> bool:
        """Whether this rollout keeps its KV cache between turns; the same answer on all ranks."""
        if self.kv_cache == "reencode":
            return False
        ask = getattr(self.backend, "kv_extension_unsupported", None)
        reason = (f"{type(self.backend).__name__} has no multi-turn session" if ask is None
                  else ask(rows, group_size, capacity))
        if not self.rank_max(int(reason is not None)):
            return True
        reason = reason or "another rank cannot keep it"
        if self.kv_cache == "extend":
            raise RuntimeError(f"multiturn.kv_cache='extend': the KV cache cannot be carried "
                               f"between turns: {reason}. Use kv_cache='auto' or 'reencode'.")
        if not self.said_why:
            logger.warning("multiturn.kv_cache=auto: each turn re-encodes the whole episode "
                           "(KV cache not extended) because %s", reason)
            self.said_why = True
        return False

    def _take_turn(self, out: RolloutOutput, live: list[int], episodes: list[Episode], envs,
                   turn: int, params: SamplingParams) -> None:
        """Append each live episode's model turn; ask its environment what comes next."""
        ids, mask = out.completion_ids.cpu(), out.completion_mask.cpu().bool()
        logprobs = out.sampled_logprobs
        logprobs = torch.zeros(ids.shape) if logprobs is None else logprobs.float().cpu()
        eos = set(params.stop_token_ids)
        for row, index in enumerate(live):
            e = episodes[index]
            tokens = ids[row][mask[row]].tolist()
            cut = e.add_model_turn(tokens, logprobs[row][mask[row]].tolist(), self.budget)
            e.messages.append({"role": "assistant",
                               "content": self.tokenizer.decode(tokens, skip_special_tokens=True)})
            reply = envs[index].step(e.messages, e.row)
            e.tool_calls += reply.tool_calls
            e.tool_failures += reply.tool_failures
            e.env_reward = reply.reward
            ended = bool(tokens) and tokens[-1] in eos and not cut
            # truncated: the episode's last model turn was cut (budget or max_new_tokens)
            e.truncated = cut or bool(out.truncated[row])
            e.done = (cut or ended or reply.done or reply.observation is None
                      or turn + 1 >= self.max_turns)
            if e.done:
                continue
            e.messages.append({"role": "tool", "content": reply.observation})
            observed = self.tokenizer(reply.observation, add_special_tokens=False)["input_ids"]
            if e.add_observation(observed, self.budget) or len(e.completion) >= self.budget:
                e.truncated, e.done = True, True

    def _output(self, episodes, device, start, calls, group_size) -> RolloutOutput:
        pad = self.tokenizer.pad_token_id
        t = episode_tensors(episodes, pad, device if device is not None else torch.device("cpu"))
        tokens = int(t["completion_mask"].sum())
        seconds = time.perf_counter() - start
        metrics = {"tokens": tokens, "seconds": seconds,
                   "tokens_per_second": tokens / max(seconds, 1e-9), "generate_calls": calls,
                   "episode_metrics": episode_metrics(episodes)}
        columns = {"env_reward": [e.env_reward for e in episodes],
                   "tool_calls": [e.tool_calls for e in episodes],
                   "turns": [e.turns for e in episodes]}
        return RolloutOutput(
            prompt_ids=t["prompt_ids"], prompt_mask=t["prompt_mask"],
            completion_ids=t["completion_ids"], completion_mask=t["completion_mask"],
            sampled_logprobs=t["sampled_logprobs"], truncated=t["truncated"], metrics=metrics,
            loss_mask=t["own_mask"], columns=columns)

    def sync_weights(self, policy) -> None:
        self.backend.sync_weights(policy)

    def sleep(self) -> None:
        self.backend.sleep()

    def wake(self) -> None:
        self.backend.wake()
