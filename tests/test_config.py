"""Config loading, overrides and validation: errors name the field and the value."""

import json

import pytest

from grpo_ds.config import ConfigError, batch_plan, deepspeed_config, load_config, validate


def test_embedded_default_is_valid_and_fills_the_deepspeed_batch():
    cfg = load_config()
    plan = validate(cfg, world_size=2)
    # 32 prompts x 8 samples = 256 sequences; 128 per rank; micro-batches of 64 -> 2 accumulation.
    assert (plan.sequences_per_step, plan.sequences_per_rank, plan.grad_accum) == (256, 128, 2)
    with pytest.raises(ValueError, match="resolve_config first"):  # dtype, optimizer are auto
        deepspeed_config(cfg, plan)
    cfg.model.dtype, cfg.train.optimizer = "float32", "torch_adamw"  # the device layer's job
    ds = deepspeed_config(cfg, plan)
    assert ds["train_batch_size"] == 64 * 2 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  group_size: 4\ngrpo:\n  beta: 0.0\n")
    cfg = load_config(str(path), ["--grpo.epsilon_high=0.28", "--rewards.weights=[1, 0.5]",
                                  "--rewards.functions=a:f,b:g", "--model.path=none"])
    assert cfg.rollout.group_size == 4 and cfg.grpo.beta == 0.0
    assert cfg.grpo.epsilon_high == 0.28 and cfg.rewards.weights == [1.0, 0.5]
    assert cfg.rewards.functions == ["a:f", "b:g"] and cfg.model.path is None


@pytest.mark.parametrize("override, message", [
    ("--train.micro_batch_size=7",
     "train.micro_batch_size=7 does not divide the 128 sequences each rank gets per step"),
    ("--train.prompts_per_step=33", "train.prompts_per_step=33 does not divide over 2 ranks"),
    ("--rollout.group_size=1", "rollout.group_size=1: GRPO needs at least 2 samples"),
    ("--grpo.loss_aggregation=mean", "grpo.loss_aggregation='mean': must be one of grpo,"),
    ("--grpo.kl_estimator=k4", "grpo.kl_estimator='k4': must be one of k1, k2, k3"),
    ("--rollout.top_p=1.5", "rollout.top_p=1.5: must be in (0, 1]"),
    ("--deepspeed.reference_placement=none",
     "deepspeed.reference_placement='none' needs grpo.beta=0 (got 0.04)"),
    ("--task.name=dataset", "data.train_path: required when task.name='dataset'"),
    ("--model.path=/nonexistent", "model.path='/nonexistent': no config.json there"),
    ("--deepspeed.config=missing.json", "deepspeed.config='missing.json': file not found"),
    ("--deepspeed.host_allocator=jemalloc",
     "deepspeed.host_allocator='jemalloc': must be one of auto, tcmalloc, system"),
    ("--rewards.weights=[1,2]", "rewards.weights has 2 entries but rewards.functions has 1"),
    ("--rollout.packed_weights=yes", "rollout.packed_weights='yes': must be one of auto, on, off"),
    ("--grpo.ratio_level=seq", "grpo.ratio_level='seq': must be one of token, sequence,"),
    ("--grpo.policy_loss=ppo", "grpo.policy_loss='ppo': must be one of clip, cispo"),
    ("--grpo.importance_sampling=tis", "grpo.importance_sampling='tis': must be one of none,"),
    ("--grpo.clip_ratio_c=0.9", "grpo.clip_ratio_c=0.9: must be > 1"),
    ("--grpo.importance_sampling_cap=0.5", "grpo.importance_sampling_cap=0.5: must be >= 1"),
])
def test_invalid_values_name_the_field_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, [override]), world_size=2)
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("--train.steps=ten", "train.steps: expected int, got 'ten'"),
    ("--train.bogus=1", "unknown field 'train.bogus'"),
    ("--nosection.key=1", "unknown section 'nosection'"),
    ("--train.steps", "expected --section.key=value"),
])
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_deepspeed_auto_values_are_refused(tmp_path):
    preset = tmp_path / "ds.json"
    preset.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        validate(load_config(None, [f"--deepspeed.config={preset}"]), world_size=2)


def test_batch_plan_counts_world_size():
    cfg = load_config(None, ["--train.prompts_per_step=8", "--train.micro_batch_size=8"])
    assert batch_plan(cfg, 4).grad_accum == 2  # 8 x 8 / 4 ranks = 16 per rank, 2 micro-batches


def test_onednn_linears_on_needs_float32_before_launch():
    with pytest.raises(ConfigError, match="model.onednn_linears='on' needs model.dtype=float32"):
        validate(load_config(None, ["--model.onednn_linears=on", "--model.dtype=bfloat16"]), 2)
    with pytest.raises(ConfigError, match="model.onednn_linears='fast': must be one of"):
        validate(load_config(None, ["--model.onednn_linears=fast"]), 2)
    validate(load_config(None, ["--model.onednn_linears=auto", "--model.dtype=bfloat16"]), 2)


def test_a_train_path_selects_the_dataset_task_unless_arithmetic_is_asked_for(tmp_path):
    cfg = load_config(None, ["--data.train_path=train.jsonl"])
    assert cfg.task.name == "dataset"
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train_path: train.jsonl\n")
    assert load_config(str(path)).task.name == "dataset"
    assert load_config(None).task.name == "arithmetic"  # no dataset: the built-in task
    explicit = load_config(str(path), ["--task.name=arithmetic"])
    with pytest.raises(ConfigError) as err:
        validate(explicit, world_size=2)
    assert ("task.name='arithmetic' trains on the built-in synthetic task, which does not read "
            "data.train_path='train.jsonl'") in str(err.value)
    with pytest.raises(ConfigError, match="does not read data.eval_path='test.jsonl'"):
        validate(load_config(None, ["--data.eval_path=test.jsonl"]), world_size=2)


def test_dual_clip_needs_the_clipped_surrogate():
    cfg = load_config(None, ["--grpo.clip_ratio_c=3", "--grpo.policy_loss=cispo"])
    with pytest.raises(ConfigError, match="grpo.clip_ratio_c=3.0: dual clip applies to "
                                          "grpo.policy_loss=clip only"):
        validate(cfg, world_size=2)
