"""grpo-ds: GRPO (Group Relative Policy Optimization) for large language models on DeepSpeed ZeRO-3.

The layers, top to bottom (an import goes only downwards; tests/test_layout.py checks it):

    face      cli.py, train.py                 commands; the per-rank entry
    tools     tools/                           benchmarks, memory planner, critic counterfactual
    trainer   trainer.py, sample.py, update.py, evaluate.py, reduce.py
                                               the loop; phases that return values
    builder   build.py                         one way to build a run (train, warm-up, benches)
    config    config.py                        typed, validated before launch
    engines   engine.py, model.py, lora.py, checkpoint.py
                                               the ZeRO-3 policy, frozen reference, adapters
    rollout   rollout/, agents/                generation over the live policy; multi-turn tools
    math      advantages.py, loss.py, loss_variants.py, logprobs.py   pure torch
    inputs    rewards/, data/, data_source.py, tasks/, warmup.py   rewards, datasets, tasks
    device    device.py, cpu/                  every `auto` resolved; CPU-only kernels
    test hooks  hooks.py, faults.py            named points a test may step into (no-ops)

The trainer and train.py never import tools/; the math imports neither DeepSpeed nor config.
"""

__version__ = "0.1.0"
