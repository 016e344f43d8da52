"""Tools around the trainer: benchmarks (bench/), the memory planner (planner.py, plan_cli.py) and
the critic counterfactual (critic.py). They build a run with the trainer's own builder
(grpo_ds/build.py); the trainer and train.py never import from here."""
