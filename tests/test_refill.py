"""DAPO dynamic sampling with refill (grpo_ds/refill.py): the keep/draw arithmetic on hand-worked
cases, the assembly of rounds of different widths, the refill loop on scripted rounds in a
1-rank gloo group, and the sources' refill draws (deterministic, saved with the data position).
The 2-rank ZeRO-3 lockstep is tests/test_multirank_refill.py."""

import dataclasses
import json

import pytest
import torch

from grpo_ds.batch import RolloutBatch, join, left_pad, right_pad
from grpo_ds.config import ConfigError, load_config, validate
from grpo_ds.reduce import Metric
from grpo_ds.refill import (
    another_round,
    choose_groups,
    concat_batches,
    group_ties,
    groups_needed,
    refill_groups,
    refill_seed,
    take,
)
from grpo_ds.sample import Sampled


def test_groups_needed_and_another_round():
    assert groups_needed(4, 1) == 3
    assert groups_needed(4, 6) == 0  # more than enough: nothing more
    assert another_round(0, 3, most_needed=2)
    assert not another_round(3, 3, most_needed=2)  # rounds spent
    assert not another_round(1, 3, most_needed=0)  # every rank full
    assert not another_round(0, 0, most_needed=5)  # refill off


def test_choose_groups_keeps_the_first_non_tied_groups_in_draw_order():
    # Round 0 [T, F, T, F], round 1 [F, F, T, F]; target 4: non-tied 1, 3, 4, 5 (7 is surplus).
    assert choose_groups([True, False, True, False, False, False, True, False], 4) == [1, 3, 4, 5]


def test_choose_groups_fills_with_the_earliest_tied_groups_when_short():
    # Non-tied only 2 and 5: the step is 2 short, and tied groups 0 and 1 fill it.
    assert choose_groups([True, True, False, True, True, False, True, True], 4) == [0, 1, 2, 5]
    assert choose_groups([True, True], 2) == [0, 1]  # nothing non-tied: round 0 as it was
    with pytest.raises(ValueError, match="fewer than the target"):
        choose_groups([False], 2)


def test_group_ties_and_refill_seeds():
    # G = 2: [1, 1] ties, [0, 1] does not, [nan, 1] has one valid reward: tied (the filter's rule)
    assert group_ties(torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 1.0]), 2) == [True, False,
                                                                                      True]
    assert refill_seed(5, 0) == 5
    assert len({refill_seed(5, r) for r in range(4)}) == 4


def make_batch(prompts: list[list[int]], completions: list[list[int]]) -> RolloutBatch:
    """A batch as generate_and_score builds it: prompts left-, completions right-padded."""
    prompt_ids, prompt_mask = left_pad(prompts, 0)
    completion_ids, completion_mask = right_pad(completions, 0)
    input_ids, attention_mask = join(prompt_ids, prompt_mask, completion_ids, completion_mask)
    n = len(prompts)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask,
                        completion_ids=completion_ids, completion_mask=completion_mask.float(),
                        advantages=torch.zeros(n),
                        sampled_logprobs=completion_mask.float() * -0.5)


def test_rounds_of_different_widths_join_with_completions_at_one_column():
    wide_prompt = make_batch([[5, 6, 7], [8]], [[9], [10, 11]])  # Tp 3, Tc 2
    long_completion = make_batch([[12]], [[13, 14, 15, 16]])  # Tp 1, Tc 4
    joined = concat_batches([wide_prompt, long_completion], pad_id=0)
    assert joined.input_ids.tolist() == [[5, 6, 7, 9, 0, 0, 0],
                                         [0, 0, 8, 10, 11, 0, 0],
                                         [0, 0, 12, 13, 14, 15, 16]]
    assert joined.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0],
                                              [0, 0, 1, 1, 1, 1, 1]]
    assert joined.completion_mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert joined.sampled_logprobs[1].tolist() == [-0.5, -0.5, 0.0, 0.0]
    # Keeping rows 0 and 1 trims the columns only row 2 used: round 0's batch exactly.
    kept = take(joined, torch.tensor([0, 1]))
    for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask",
                 "sampled_logprobs"):
        assert torch.equal(getattr(kept, name), getattr(wide_prompt, name)), name
    assert take(joined, torch.tensor([2])).input_ids.tolist() == [[12, 13, 14, 15, 16]]


class ScriptedRounds:
    """Generation stand-in for the loop test: round r returns the batch and rewards scripted for
    it, and every call is recorded (the real rollout runs in the device audit and the 2-rank
    test)."""

    def __init__(self, rounds):
        self.rounds, self.calls, self.draws, self.idles = rounds, [], [], []

    def sample(self, rows, seed):
        batch, rewards = self.rounds[len(self.calls) + 1]
        self.calls.append((rows, seed))
        texts = [f"{row}-{i}" for row in rows for i in range(2)]
        return Sampled(batch, rewards, [f"p{row}" for row in rows for _ in range(2)], texts,
                       {"rewards/r/errors": Metric(1.0, "sum"),
                        "rewards/r/mean": Metric(9.0, "mean")})

    def draw(self, round_number):
        self.draws.append(round_number)
        return [10 * round_number, 10 * round_number + 1]


def first_round():
    batch = make_batch([[5, 6], [5, 6], [7], [7]], [[1], [1, 2], [3], [3]])
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])  # group 0 ties, group 1 does not
    return Sampled(batch, rewards, ["p0", "p0", "p1", "p1"], ["a", "b", "c", "d"],
                   {"rewards/r/errors": Metric(0.0, "sum"), "rewards/r/mean": Metric(0.75, "mean")})


def values(metrics: dict) -> dict:
    return {name: metric.value for name, metric in metrics.items()}


def refill_config(rounds: int):
    return load_config(None, ["--rollout.group_size=2", "--grpo.filter_tied_groups=true",
                              f"--grpo.refill_max_rounds={rounds}"])


def test_refill_replaces_a_tied_group_with_the_next_rounds_first_non_tied_one(process_group):
    second = make_batch([[8], [8], [9, 9, 9], [9, 9, 9]], [[4], [4], [5, 5, 5], [6]])
    script = ScriptedRounds({1: (second, torch.tensor([0.0, 0.0, 1.0, 0.0]))})
    out = refill_groups(refill_config(3), first_round(), script.sample, script.draw,
                        script.idles.append, seed=7, pad_id=0)
    batch, rewards, prompts, texts = out.batch, out.rewards, out.prompts, out.completions
    metrics = values(out.metrics)
    # One round filled the step: round 0's group 1, then round 1's group 1 (its group 0 ties).
    assert script.draws == [1] and script.calls == [([10, 11], refill_seed(7, 1))]
    assert rewards.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert prompts == ["p1", "p1", "p11", "p11"] and texts == ["c", "d", "11-0", "11-1"]
    assert batch.input_ids.tolist() == [[0, 0, 7, 3, 0, 0], [0, 0, 7, 3, 0, 0],
                                        [9, 9, 9, 5, 5, 5], [9, 9, 9, 6, 0, 0]]
    assert batch.completion_mask.sum(1).tolist() == [1.0, 1.0, 3.0, 1.0]
    assert metrics == {"rewards/r/errors": 1.0, "rewards/r/mean": 0.75,  # round 0's, errors summed
                       "refill/rounds": 1.0, "refill/prompts_sampled": 2.0,
                       "refill/missing_groups": 0.0, "refill/tied_fraction": 0.5}


def test_rounds_spent_the_step_trains_on_what_it_has(process_group):
    tied = make_batch([[8], [8], [9], [9]], [[4], [4], [5], [5]])
    all_tied = torch.tensor([1.0, 1.0, 0.0, 0.0])
    script = ScriptedRounds({1: (tied, all_tied), 2: (tied, all_tied)})
    first = first_round()
    out = refill_groups(refill_config(2), first, script.sample, script.draw,
                        script.idles.append, seed=7, pad_id=0)
    batch, rewards, metrics = out.batch, out.rewards, values(out.metrics)
    assert script.draws == [1, 2] and len(script.calls) == 2
    # Still one group short: the non-tied group and the earliest tied one, round 0 as sampled.
    assert torch.equal(batch.input_ids, first.batch.input_ids)
    assert rewards.tolist() == first.rewards.tolist()
    assert (out.prompts, out.completions) == (first.prompts, first.completions)
    assert metrics["refill/rounds"] == 2.0 and metrics["refill/prompts_sampled"] == 4.0
    assert metrics["refill/missing_groups"] == 1.0
    assert metrics["refill/tied_fraction"] == pytest.approx(5 / 6)


def test_a_full_first_round_draws_nothing(process_group):
    first = dataclasses.replace(first_round(), rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    script = ScriptedRounds({})  # no group ties above
    out = refill_groups(refill_config(3), first, script.sample, script.draw,
                        script.idles.append, seed=7, pad_id=0)
    assert out.batch is first.batch and script.draws == [] and script.idles == []
    metrics = values(out.metrics)
    assert metrics["refill/rounds"] == 0.0 and metrics["refill/prompts_sampled"] == 0.0


def test_config_needs_the_filter_and_refuses_kl_in_reward():
    with pytest.raises(ConfigError, match="grpo.filter_tied_groups=true"):
        validate(load_config(None, ["--grpo.refill_max_rounds=2"]), world_size=1)
    with pytest.raises(ConfigError, match="kl_in_reward"):
        validate(load_config(None, ["--grpo.refill_max_rounds=2", "--grpo.kl_in_reward=true",
                                    "--grpo.filter_tied_groups=true"]), world_size=1)
    with pytest.raises(ConfigError, match="refill_max_rounds"):
        validate(load_config(None, ["--grpo.refill_max_rounds=-1"]), world_size=1)
    validate(refill_config(2), world_size=1)


def test_arithmetic_refill_draws_are_fresh_and_a_function_of_step_and_round():
    from grpo_ds.tasks.arithmetic import ArithmeticSource, ArithmeticTask

    def source(rank):
        return ArithmeticSource(ArithmeticTask(digits=2, eval_size=8), 4, rank, 2, seed=3)

    a, b = source(0), source(0)
    assert a.refill_rows(5, 1) == b.refill_rows(5, 1)  # a resumed run draws the same
    assert a.refill_rows(5, 1) != a.refill_rows(5, 2) != a.step_rows(5)
    assert a.refill_rows(5, 1) != source(1).refill_rows(5, 1)  # each rank its own slice
    assert len(a.refill_rows(5, 1)) == 2


def test_dataset_refill_draws_advance_the_saved_position(tmp_path):
    from grpo_ds.data_source import DatasetSource
    from tests.tiny_models import text_tokenizer

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n"
                            for i in range(12)))
    cfg = load_config(None, [f"--data.train_path={path}", "--data.shuffle=false",
                             "--train.prompts_per_step=2"])
    run = DatasetSource.from_config(cfg, rank=0, world=1, tokenizer=text_tokenizer())
    answers = [r["answer"] for r in run.step_rows(1) + run.refill_rows(1, 1)
               + run.refill_rows(1, 2)]
    assert answers == ["0", "1", "2", "3", "4", "5"]  # refill takes the next prompts in order
    resumed = DatasetSource.from_config(cfg, rank=0, world=1, tokenizer=text_tokenizer())
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))  # as the checkpoint
    assert [r["answer"] for r in resumed.step_rows(2)] == ["6", "7"]
    assert [r["answer"] for r in run.step_rows(2)] == ["6", "7"]
