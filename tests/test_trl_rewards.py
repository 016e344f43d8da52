"""TRL's documented reward functions run unchanged through grpo-ds's reward path: compute_rewards
on TRL's own example inputs, then the trainer's generate_and_score on completions a tiny Llama
really samples (standard and conversational rows), and correct_counts (evaluation) in a 1-rank
process group. Also: keyword binding can no longer misbind, async functions are awaited, and
`trainer_state` is a transformers.TrainerState."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, TrainerState

import tests.trl_examples as trl
from grpo_ds.config import load_config
from grpo_ds.data_source import prepared_rows
from grpo_ds.rewards import check_reward_columns, compute_rewards, trainer_state
from grpo_ds.rollout import HybridRollout
from grpo_ds.sample import generate_and_score
from tests.multirank import free_port
from tests.tiny_models import llama_config, text_tokenizer

REPO = Path(__file__).resolve().parents[1]


def scores(function, prompts, completions, **columns):
    """One function through compute_rewards, with what the trainer always adds."""
    rewards, _ = compute_rewards([function], ["f"], prompts, completions, columns,
                                 shared={"trainer_state": trainer_state(0, 10)})
    return [None if math.isnan(v) else v for v in rewards[:, 0].tolist()]


# ---------------------------------------------------------------------------------------------
# TRL's example inputs and outputs (docs/source/grpo_trainer.md, "You can test it as follows")


def test_trl_documented_examples_give_trl_documented_results():
    prompts = ["The sky is", "The sun is"]
    completions = [" blue.", " in the sky."]
    ids = [[6303, 13], [304, 279, 12884, 13]]
    assert scores(trl.reward_func_tokens, prompts, completions, completion_ids=ids) == [2.0, 4.0]
    assert scores(trl.reward_func_chars, prompts, completions, completion_ids=ids) == [6.0, 12.0]
    assert scores(trl.reward_len, prompts, completions, completion_ids=ids) == [-14.0, -8.0]

    chat_prompts = [[{"role": "assistant", "content": "What is the result of (1 + 2) * 4?"}],
                    [{"role": "assistant", "content": "What is the result of (3 + 1) * 2?"}]]
    chats = [[{"role": "assistant", "content": "<think>The sum of 1 and 2 is 3, which we multiply "
               "by 4 to get 12.</think><answer>(1 + 2) * 4 = 12</answer>"}],
             [{"role": "assistant", "content": "The sum of 3 and 1 is 4, which we multiply by 2 "
               "to get 8. So (3 + 1) * 2 = 8."}]]
    assert scores(trl.format_reward_func, chat_prompts, chats, completion_ids=ids) == [1.0, 0.0]

    problems = ["Problem: Solve the equation $2x + 3 = 7$. Solution:",
                "Problem: Solve the equation $3x - 5 = 10$."]
    solved = [r" The solution is \boxed{2}.", r" The solution is \boxed{6}."]
    for function in (trl.reward_func_reference, trl.reward_func_logging):
        assert scores(function, problems, solved, completion_ids=ids,
                      ground_truth=["2", "5"]) == [1.0, 0.0]


def test_trl_multi_task_example_returns_none_where_a_task_does_not_apply():
    prompts = ["What is 2+2?", "Write a function that returns the sum of two numbers.",
               "What is 3*4?", "Write a function that returns the product of two numbers."]
    completions = ["4", "def add(a, b): return a + b", "7", "a * b"]
    task = ["math", "coding", "math", "coding"]
    rewards, stats = compute_rewards([trl.math_reward_func, trl.coding_reward_func],
                                     ["math", "code"], prompts, completions, {"task": task})
    expected = [[1.0, None], [None, 1.0], [-1.0, None], [None, -1.0]]
    assert [[None if math.isnan(v) else v for v in row] for row in rewards.tolist()] == expected
    assert stats["rewards/math/mean"] == 0.0 and stats["rewards/code/mean"] == 0.0


def test_async_reward_functions_are_awaited_together():
    import asyncio
    import time

    async def slow(completions, **kwargs):
        await asyncio.sleep(0.3)
        return [0.5] * len(completions)

    start = time.perf_counter()
    rewards, _ = compute_rewards([trl.async_reward_func, slow, slow], ["a", "b", "c"],
                                 ["p", "p"], ["x", ""], {})
    assert rewards.tolist() == [[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]]
    assert time.perf_counter() - start < 0.55  # two 0.3 s waits overlap, as in TRL


def test_async_failure_is_located_per_sample():
    async def fragile(completions, **kwargs):
        if "bad" in completions:
            raise ValueError("cannot score")
        return [1.0] * len(completions)

    rewards, stats = compute_rewards([fragile], ["frag"], ["p"] * 3, ["a", "bad", "c"], {},
                                     on_error="skip")
    assert rewards[:, 0].tolist()[::2] == [1.0, 1.0] and stats["rewards/frag/errors"] == 1.0


def test_a_column_is_bound_by_name_never_by_position():
    """Before: fn(prompts, completions, **columns) gave `accuracy(completions, answer)` the
    prompts as completions and the completions as answers."""
    seen = {}

    def accuracy(completions, answer, **kwargs):
        seen.update(completions=completions, answer=answer)
        return [float(c == a) for c, a in zip(completions, answer)]

    assert scores(accuracy, ["Q1", "Q2"], ["4", "5"], answer=["4", "6"]) == [1.0, 0.0]
    assert seen == {"completions": ["4", "5"], "answer": ["4", "6"]}


def test_trainer_state_is_a_transformers_trainer_state():
    def curriculum(completions, trainer_state, **kwargs):
        assert isinstance(trainer_state, TrainerState)
        return [trainer_state.global_step / trainer_state.max_steps] * len(completions)

    rewards, _ = compute_rewards([curriculum], ["c"], ["p"], ["x"], {},
                                 shared={"trainer_state": trainer_state(3, 12)})
    assert rewards.tolist() == [[0.25]]


def test_a_column_the_data_lacks_is_named_before_training():
    with pytest.raises(ValueError) as info:
        check_reward_columns(trl.reward_func_reference, "ref.py:reward_func", ["answer", "task"],
                             "data/train.jsonl")
    assert ("needs column 'ground_truth', which data/train.jsonl does not have; the columns "
            "there are: answer, task") in str(info.value)
    for function in (trl.reward_len, trl.reward_func_tokens, trl.format_reward_func,
                     trl.async_reward_func, trl.reward_func_logging):
        check_reward_columns(function, "f", ["ground_truth", "task"])  # all accepted


# ---------------------------------------------------------------------------------------------
# the trainer's own path: generate_and_score on a tiny Llama's samples

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def tiny(one_thread):
    torch.manual_seed(0)
    tokenizer = text_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = LlamaForCausalLM(llama_config(tokenizer)).eval()
    return tokenizer, HybridRollout(model, tokenizer.pad_token_id, tokenizer=tokenizer)


def rows_from(tmp_path, tokenizer, records, *overrides):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(None, [f"--data.train_path={path}", "--rollout.group_size=2",
                             "--rollout.max_new_tokens=6", *overrides])
    return cfg, prepared_rows(cfg, str(path), tokenizer)[0]


def run(cfg, tiny, rows, functions, state=None):
    tokenizer, rollout = tiny
    names = [f"f{i}" for i in range(len(functions))]
    sampled = generate_and_score(cfg, rollout, tokenizer, rows, functions, names, seed=1,
                                 state=state)
    metrics = {k: m.value for k, m in sampled.metrics.items()}
    return sampled.batch, sampled.rewards, sampled.completions, metrics


def test_standard_rows_through_generate_and_score(tmp_path, tiny):
    records = [{"prompt": "What is 2+2?", "ground_truth": "4", "task": "math"},
               {"prompt": "Write a function.", "ground_truth": "x", "task": "coding"}]
    cfg, rows = rows_from(tmp_path, tiny[0], records)
    batch, _, texts, _ = run(cfg, tiny, rows, [trl.reward_len])
    lengths = batch.completion_mask.sum(1).tolist()
    examples = [(trl.reward_len, [-abs(20 - len(t)) for t in texts]),
                (trl.reward_func_tokens, lengths),
                (trl.reward_func_chars, [float(len(t)) for t in texts]),
                (trl.reward_func_reference, [0.0] * 4),  # no \boxed{} from a random model
                (trl.async_reward_func, [1.0 if t else 0.0 for t in texts]),
                (trl.reward_func_logging, [0.0] * 4)]
    for function, expected in examples:
        _, rewards, again, _ = run(cfg, tiny, rows, [function])
        assert again == texts and rewards.tolist() == pytest.approx(expected), function.__name__
    # Multi-task: the `task` column reaches each function aligned with its completions.
    _, rewards, _, metrics = run(cfg, tiny, rows, [trl.math_reward_func, trl.coding_reward_func])
    code = [1.0 if "def " in t else -1.0 for t in texts[2:]]
    math = [1.0 if "4" in t else -1.0 for t in texts[:2]]
    assert rewards.tolist() == pytest.approx(math + code)
    assert metrics["rewards/f0/mean"] == pytest.approx(sum(math) / 2)


def test_conversational_rows_through_generate_and_score(tmp_path, tiny):
    seen = {}

    def record(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [0.0] * len(completions)

    question = [{"role": "user", "content": "What is 2+2?"}]
    cfg, rows = rows_from(tmp_path, tiny[0], [{"prompt": question, "solution": "4"}] * 2,
                          "--data.system_prompt=Think first.")
    system = {"role": "system", "content": "Think first."}
    assert tiny[0].decode(rows[0]["prompt_ids"]) == (
        "[system] Think first.\n[user] What is 2+2?\n[assistant] ")
    batch, _, texts, _ = run(cfg, tiny, rows, [record], state=trainer_state(4, 8))
    assert seen["prompts"] == [[system, *question]] * 4
    assert seen["completions"] == [[{"role": "assistant", "content": t}] for t in texts]
    assert seen["solution"] == ["4"] * 4 and seen["trainer_state"].global_step == 4
    assert seen["completion_ids"] == [row[m.bool()].tolist() for row, m
                                      in zip(batch.completion_ids, batch.completion_mask)]
    _, rewards, _, _ = run(cfg, tiny, rows, [trl.format_reward_func])
    assert rewards.tolist() == [0.0] * 4  # content read as TRL's example reads it


def test_process_reward_is_called_by_keyword(tmp_path, tiny):
    spec_file = tmp_path / "steps.py"
    spec_file.write_text("def last_token(completion_ids, trainer_state, **kwargs):\n"
                         "    return [[(len(ids) - 1, 1.0)] for ids in completion_ids]\n")
    cfg, rows = rows_from(tmp_path, tiny[0], [{"prompt": "2+2=", "answer": "4"}] * 2,
                          f"--grpo.process_reward={spec_file}:last_token")
    batch, _, _, _ = run(cfg, tiny, rows, [trl.reward_len])
    lengths = batch.completion_mask.sum(1).long().tolist()
    assert batch.process_steps == [[(n - 1, 1.0)] for n in lengths]


# ---------------------------------------------------------------------------------------------
# evaluation: correct_counts needs a process group (its chunk count is agreed over ranks)

EVAL_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=sys.argv[1])
    import deepspeed, torch
    from transformers import LlamaForCausalLM
    from grpo_ds.config import load_config
    from grpo_ds.rollout import HybridRollout
    from grpo_ds.evaluate import correct_counts
    from tests.tiny_models import llama_config, text_tokenizer
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    tokenizer = text_tokenizer()
    rollout = HybridRollout(LlamaForCausalLM(llama_config(tokenizer)).eval(),
                            tokenizer.pad_token_id, tokenizer=tokenizer)
    cfg = load_config(None, ["--rollout.max_new_tokens=4"])
    ids = tokenizer("2+2=")["input_ids"]
    chat = [{"role": "user", "content": "2+2="}]
    seen = []

    async def assistant_reply(completions, answer, trainer_state, **kwargs):
        seen.append([trainer_state.global_step, answer, completions])
        return [float(c[0]["role"] == "assistant") for c in completions]

    rows = [{"prompt": chat, "prompt_ids": ids, "answer": "4"}] * 3
    counts = correct_counts(cfg, rollout, tokenizer, rows, assistant_reply, "cpu", group=2)
    print(json.dumps({"counts": counts, "seen": seen}))
""")


def test_correct_counts_calls_the_reward_as_trl_does(tmp_path):
    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(free_port())], check=False,
                            cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["counts"] == [2, 2, 2]  # every completion arrived as one assistant message
    (step, answers, completions), = out["seen"]
    assert step == 0 and answers == ["4"] * 6 and len(completions) == 6
