"""The reward functions of TRL's GRPOTrainer documentation (docs/source/grpo_trainer.md, and the
quick start's `reward_len`), written out as TRL shows them, unchanged, so the tests can check
that grpo-ds calls them as TRL does. TRL's own example inputs and outputs are in
tests/test_trl_rewards.py."""

import asyncio
import re


# Quick start: rewards completions close to 20 characters.
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


# Example 1: Reward longer completions
def reward_func_tokens(completion_ids, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of token count)."""
    return [float(len(ids)) for ids in completion_ids]


# Example 1.1: Reward longer completions (based on the number of characters)
def reward_func_chars(completions, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of character count)."""
    return [float(len(completion)) for completion in completions]


# Example 2: Reward completions with a specific format (conversational format)
def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


# Example 3: Reward completions based on a reference (a `ground_truth` column)
def reward_func_reference(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


# Example 4: Multi-task reward functions. TRL leaves the two checkers to the reader; these
# stand-ins are ours: a math answer is right when it holds the prompt's expected number.
def check_math_solution(prompt, completion):
    return {"What is 2+2?": "4", "What is 3*4?": "12"}.get(prompt, "?") in completion


def test_code_solution(prompt, completion):
    return "def " in completion


test_code_solution.__test__ = False  # TRL's name, not a pytest test


def math_reward_func(prompts, completions, task, **kwargs):
    rewards = []
    for prompt, completion, t in zip(prompts, completions, task):
        if t == "math":
            # Calculate math-specific reward
            correct = check_math_solution(prompt, completion)
            reward = 1.0 if correct else -1.0
            rewards.append(reward)
        else:
            # Return None for non-math tasks
            rewards.append(None)
    return rewards


def coding_reward_func(prompts, completions, task, **kwargs):
    rewards = []
    for prompt, completion, t in zip(prompts, completions, task):
        if t == "coding":
            # Calculate coding-specific reward
            works = test_code_solution(prompt, completion)
            reward = 1.0 if works else -1.0
            rewards.append(reward)
        else:
            # Return None for non-coding tasks
            rewards.append(None)
    return rewards


# Example 5: Asynchronous reward functions
async def async_reward_func(prompts, completions, **kwargs):
    # Simulate an I/O-bound call (e.g., HTTP request, database lookup)
    await asyncio.sleep(0.01)
    # Simple toy reward: 1.0 if the completion is non-empty, else 0.0
    return [1.0 if completion else 0.0 for completion in completions]


# Example 6: Logging extra columns and metrics (grpo-ds passes neither, so both stay None)
def reward_func_logging(completions, ground_truth, log_extra=None, log_metric=None, **kwargs):
    extracted = [re.search(r"\\boxed\{(.*?)\}", c) for c in completions]
    extracted = [m.group(1) if m else None for m in extracted]
    rewards = [1.0 if e == gt else 0.0 for e, gt in zip(extracted, ground_truth)]

    if log_extra:
        log_extra("golden_answer", list(ground_truth))
        log_extra("extracted_answer", [e or "[none]" for e in extracted])

    if log_metric:
        log_metric("accuracy", sum(rewards) / len(rewards))

    return rewards
