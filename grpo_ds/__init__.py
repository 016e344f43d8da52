"""grpo-ds: GRPO (Group Relative Policy Optimization) for large language models on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
