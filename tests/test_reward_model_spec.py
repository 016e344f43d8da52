"""A reward model path that is not a one-label sequence classifier fails before launch, with
the path and what was found."""

import pytest

from grpo_ds.config import load_config, validate
from grpo_ds.rewards import RewardSpecError
from tests.tiny_models import save_causal_lm, save_reward_model, text_tokenizer


def spec_error(path) -> str:
    with pytest.raises(RewardSpecError) as err:
        validate(load_config(None, [f"--rewards.functions=[exact_answer, 'model:{path}']"]), 2)
    return str(err.value)


def test_a_causal_lm_is_not_a_reward_model(tmp_path):
    path = save_causal_lm(tmp_path / "lm", text_tokenizer())
    message = spec_error(path)
    assert f"reward model '{path}' is not a sequence classifier" in message
    assert "LlamaForCausalLM" in message


def test_a_classifier_with_two_labels_is_not_a_reward_model(tmp_path):
    from transformers import LlamaForSequenceClassification

    from tests.tiny_models import llama_config

    tokenizer = text_tokenizer()
    LlamaForSequenceClassification(llama_config(tokenizer, num_labels=2)).save_pretrained(
        tmp_path / "two")
    assert "has 2 labels; a reward model has one score" in spec_error(tmp_path / "two")


def test_a_missing_directory_is_named(tmp_path):
    assert "no config.json there" in spec_error(tmp_path / "nowhere")


def test_a_one_label_classifier_passes(tmp_path):
    path = save_reward_model(tmp_path / "rm", text_tokenizer())
    load = load_config(None, [f"--rewards.functions=[exact_answer, 'model:{path}']"])
    assert validate(load, 2).world_size == 2
