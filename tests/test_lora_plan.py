"""The planner under LoRA (grpo_ds/tools/lora_plan.py): adapter counts by hand and against PEFT, and
the plan's model states and reference with the base frozen and the reference as the base."""

import dataclasses
import json

import pytest
from transformers import LlamaForCausalLM

from grpo_ds import model_spec
from grpo_ds.config import LoraConfig, load_config
from grpo_ds.lora import adapter_numel as peft_adapter_numel
from grpo_ds.lora import add_adapters
from grpo_ds.tools import planner
from grpo_ds.tools.lora_plan import adapter_numel
from grpo_ds.tools.plan_cli import main
from tests.test_planner import PARAM_CPU, PER_RANK, SHAPE, SMALL, N, plan
from tests.tiny_models import llama_config, text_tokenizer


def test_adapter_count_by_hand():
    # SMALL: h=64, q 64 -> 64, k/v 64 -> 32, o 64 -> 64, gate/up 64 -> 128, down 128 -> 64.
    # r=2: q 2*128 + k, v 2*96 each + o 2*128 + gate, up, down 2*192 each = 2*(128+96+96+128+576)
    # = 2,048 per layer, 4,096 for 2 layers.
    spec = model_spec.llama_spec(SMALL, "small")
    assert adapter_numel(spec, 2) == 4_096
    assert adapter_numel(spec, 2, ("q_proj", "v_proj")) == 2 * 2 * (128 + 96)
    with pytest.raises(ValueError, match="lm_head"):
        adapter_numel(spec, 2, ("lm_head",))


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_adapter_count_equals_peft(targets):
    config = llama_config(text_tokenizer())
    lm = LlamaForCausalLM(config)
    add_adapters(lm, LoraConfig(rank=3, target_modules=targets), 0)
    spec = model_spec.llama_spec(config.to_dict(), "tiny")
    assert adapter_numel(spec, 3, tuple(targets)) == peft_adapter_numel(lm)


def test_lora_plan_by_hand():
    full = plan()
    lora = plan(shape=dataclasses.replace(SHAPE, lora_rank=2))
    by_name = {c.name: c for c in lora.components}
    # bf16 base: 2 B x 101,024 per rank, frozen; adapters 4,096 / 2 ranks = 2,048 per rank:
    # params + grads 2 B each, optimizer master 4 + Adam 8
    assert by_name["policy base params (frozen)"].device == 2 * PER_RANK
    assert by_name["policy adapters params"].device == 2 * 2_048
    assert by_name["policy adapters grads"].device == 2 * 2_048
    assert by_name["policy adapters optimizer states"].device == 12 * 2_048
    assert "policy grads" not in by_name and "policy optimizer states" not in by_name
    # no reference weights; its forward's transients remain (the policy with adapters off)
    assert "reference params" in {c.name for c in full.components}
    assert "reference params" not in by_name and "reference forward" in by_name
    assert lora.grpo.device_per_rank < full.grpo.device_per_rank
    dev, _ = planner.model_states_figure(lora)
    assert dev == 2 * PER_RANK + (2 + 2 + 12) * 2_048 + 4 * 2_048  # + the step's fp32 grads
    offloaded = plan(PARAM_CPU, shape=dataclasses.replace(SHAPE, lora_rank=2))
    base = next(c for c in offloaded.components if c.name == "policy base params (frozen)")
    assert (base.device, base.host) == (0, 2 * PER_RANK)
    assert N == 2 * PER_RANK


def test_config_and_cli_carry_the_rank(tmp_path, capsys):
    cfg = load_config(None, ["--model.lora.rank=8", "--model.lora.target_modules=q_proj",
                             "--model.dtype=bfloat16"])
    shape = planner.training_shape_from_config(cfg, 1)
    assert (shape.lora_rank, shape.lora_targets) == (8, ("q_proj",))
    model = tmp_path / "config.json"
    model.write_text(json.dumps(SMALL))
    code = main(["--model", str(model), "--world-size", "2", "--lora-rank", "2",
                 "--device-mem", "80", "--host-mem", "512"])
    out = capsys.readouterr().out
    assert code == 0 and "policy base params (frozen)" in out and "LoRA rank 2" in out
    assert "reference=base, adapters off" in out
