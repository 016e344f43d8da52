"""Multi-turn rollouts with tools (GRPO for agents).

Files: tools.py (plain functions as tools: schema, call parsing, timed execution),
environment.py (the protocol and the tool environment), episodes.py (an episode's tokens and
own-token mask; batch tensors; metrics), rollout.py (MultiTurnRollout over any RolloutBackend),
config.py (the `multiturn` config section), rewards.py (`env_reward`), build.py (from the
config: the environment factory, the MultiTurnRollout around the trainer's backend).

The package imports nothing on its own: config.py imports agents.config, and the rest imports
the rollout package, which imports config.
"""

