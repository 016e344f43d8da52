"""A reward that varies within every group from the first step (longer completions score more),
so the checkpoint tests train on real, non-zero gradients even with a barely warmed-up model."""


def length_reward(prompts, completions, **columns):
    return [len(c) / 8 for c in completions]
