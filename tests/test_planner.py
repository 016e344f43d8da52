"""Memory planner: parameter counts against real models, per-component arithmetic by hand,
DeepSpeed's estimator, budgets and the `grpo-ds plan` CLI."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from grpo_ds import model_spec
from grpo_ds.tools import planner
from grpo_ds.tools.plan_cli import main
from grpo_ds.tools.planner import Budgets, TrainingShape

GIB = 2**30

# The small made-up model of the hand-worked tests: V=1000, h=64, I=128, 2 layers, 4 heads of
# 16 dims, 2 kv heads, untied.
#   embed 1000*64 = 64,000; head 64,000
#   layer: norms 2*64 + q 64*64 (4,096) + k, v 64*32 (2,048 each) + o 4,096
#          + gate, up, down 64*128 (8,192 each) = 36,992
#   N = 64,000 + 2*36,992 + 64 (final norm) + 64,000 = 202,048; over W=2 ranks: 101,024 each
SMALL = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False}
N, PER_RANK = 202_048, 101_024

# prefetch 500 params, reuse distance 0 (nothing held for the backward), no persistent params
DS_BASE = {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 500,
           "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 10**9,
           "stage3_max_reuse_distance": 0}
OPT_CPU = {"offload_optimizer": {"device": "cpu"}}
PARAM_CPU = {"offload_param": {"device": "cpu"}}
# 2 prompts/rank x G=4 = 8 sequences of 8 + 8 tokens; micro-batch 2
SHAPE = TrainingShape(group_size=4, prompt_len=8, max_new_tokens=8, prompts_per_rank=2,
                      micro_batch_size=2, dtype="bfloat16", gather="full")
ROOMY = Budgets(device_bytes=80 * GIB, host_bytes=512 * GIB, device_is_host=False)


def ds(**extra):
    return {"zero_optimization": {**DS_BASE, **extra}}


def plan(zero_extra=None, shape=SHAPE, budgets=ROOMY, world=2, nodes=1):
    spec = model_spec.llama_spec(SMALL, "small")
    return planner.plan_memory(spec, ds(**(zero_extra or {})), world, nodes, shape, budgets)


def by_name(p):
    return {c.name: c for c in p.components}


# ---- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {"tie_word_embeddings": False},
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 1, "tie_word_embeddings": True},  # GQA, 4 query heads share 1
    {"attention_bias": True, "mlp_bias": True, "head_dim": 8},
])
def test_llama_param_count_equals_transformers(extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {**SMALL, **extra}
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    spec = model_spec.llama_spec(config)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    assert spec.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())


def test_small_model_count_by_hand():
    spec = model_spec.llama_spec(SMALL)
    assert spec.layer_params == 36_992 and spec.total_params == N and spec.largest_leaf == 64_000


def test_other_architectures_counted_on_meta_device(tmp_path):
    """Qwen2 (q/k/v biases, no Llama formula) goes through AutoModelForCausalLM on meta."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = {"model_type": "qwen2", "vocab_size": 500, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = model_spec.load_model_spec(tmp_path)
    real = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in config.items() if k != "model_type"}))
    assert spec.total_params == sum(p.numel() for p in real.parameters())
    assert spec.tie_word_embeddings and spec.head_params == 0 and spec.num_kv_heads == 2


# ---- model states by hand and against DeepSpeed's estimator ----------------------------------


def test_stage3_plain_by_hand():
    c = by_name(plan())
    assert c["policy params"].device == 2 * PER_RANK == 202_048  # bf16 partition
    assert c["policy grads"].device == 202_048  # grads accumulate in the model dtype
    assert (c["policy fp32 grads"].phase, c["policy fp32 grads"].device) == ("step", 404_096)
    assert c["policy optimizer states"].device == 12 * PER_RANK == 1_212_288  # master + 2 moments
    assert c["reduce bucket"].device == 2 * 1000
    assert c["reference params"].host == 202_048  # cpu_offload: 1/W of it on host


def test_fp32_model_shares_master_with_params():
    c = by_name(plan(shape=TrainingShape(**{**SHAPE.__dict__, "dtype": "float32"})))
    assert c["policy params"].device == c["policy grads"].device == 4 * PER_RANK == 404_096
    assert c["policy optimizer states"].device == 8 * PER_RANK == 808_192  # moments only


def test_optimizer_offload_by_hand():
    c = by_name(plan(OPT_CPU))
    assert (c["policy params"].device, c["policy params"].host) == (202_048, 0)
    assert (c["policy grads"].device, c["policy grads"].host) == (0, 202_048)
    assert (c["policy fp32 grads"].phase, c["policy fp32 grads"].host) == ("persistent", 404_096)
    assert c["policy optimizer states"].host == 1_212_288


def test_optimizer_and_param_offload_by_hand():
    c = by_name(plan({**OPT_CPU, **PARAM_CPU}))
    assert (c["policy params"].device, c["policy params"].host) == (0, 202_048)
    assert sum(c[k].device for k in ("policy params", "policy grads", "policy fp32 grads",
                                     "policy optimizer states")) == 0


def test_nvme_offload_moves_states_to_nvme_and_adds_swap_buffers():
    nvme = {"device": "nvme", "nvme_path": "/tmp", "buffer_count": 4}
    c = by_name(plan({"offload_optimizer": nvme, "offload_param": {**nvme, "buffer_size": 1000}}))
    assert c["policy params"].nvme == 202_048 and c["policy optimizer states"].nvme == 1_212_288
    assert c["nvme optimizer swap buffers"].host == 4 * PER_RANK * 4  # count x sub-group x fp32
    assert c["nvme param swap buffers"].host == 4 * 1000 * 2  # count x buffer_size x bf16


@pytest.mark.parametrize("zero_extra, relation", [
    # ours = 20 N/W (16 persistent + 4 step grads); DS = 18 N/W + 4 x largest layer
    ({}, lambda ours, ds, L: ours[0] == ds["device_per_rank"] - 4 * L + 2 * PER_RANK),
    # device: ours 2 N/W, DS 2 N/W + 4 L; host/node: ours 18 N, DS 1.5 x 16 N
    (OPT_CPU, lambda ours, ds, L: ours[0] == ds["device_per_rank"] - 4 * L
     and ours[1] == ds["host_per_node"] / 1.5 + 2 * N),
    # device: ours 0, DS 4 L; host/node: ours 20 N, DS 1.5 x 18 N
    ({**OPT_CPU, **PARAM_CPU}, lambda ours, ds, L: ours[0] == 0 == ds["device_per_rank"] - 4 * L
     and ours[1] == ds["host_per_node"] / 1.5 + 2 * N),
])
def test_model_states_against_deepspeed_estimator(zero_extra, relation):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    p = plan(zero_extra)
    est = p.deepspeed_estimate
    offload = zero_extra.get("offload_optimizer") is not None
    host, device, _ = estimate_zero3_model_states_mem_needs(
        N, 64_000, num_gpus_per_node=2, num_nodes=1, cpu_offload=offload,
        cpu_offload_params="offload_param" in zero_extra)
    assert (est["device_per_rank"], est["host_per_node"]) == (device, int(host))
    assert relation(planner.model_states_figure(p), est, 64_000)


# ---- transients by hand ----------------------------------------------------------------------


def test_generation_update_and_reference_by_hand():
    c = by_name(plan())
    # full gather: 2 B x 202,048
    assert c["generation gathered weights"].device == 404_096
    # KV: 2 x 2 layers x 2 kv heads x 16 dims x 2 B x 8 seqs x 16 tokens = 32,768, + 1 layer 16,384
    assert c["generation KV cache"].device == 49_152
    # sampling 8 rows x 1000 x 32 B = 256,000 > prefill 2x8 tokens x (2(3*64 + 3*128) + 4*64)
    # = 22,528 + 2 prompts x 32,000
    assert c["generation working"].device == 256_000
    # A = 2(4*64 + 2*64) + 4*2*64 + 4*4 + 4*2*128 = 768 + 512 + 16 + 1024 = 2,320 B/token/layer
    # 2 x 16 = 32 tokens x (2 layers x A + A backward + final norm 4*64 + 2*64) = 32 x 7,344
    assert c["update activations"].device == 235_008
    # 3 x min(4096, 2 seqs x 8 completion tokens) x 1000 x 4 B
    assert c["update log-prob chunk"].device == 192_000
    # reuse distance 0: nothing held; largest module 64,000 + prefetch 500, x 2 B
    assert c["update gathered params"].device == 129_000
    p = plan()
    persistent = 202_048 + 202_048 + 1_212_288 + 2_000 + planner.RUNTIME_DEVICE_BYTES
    # generation 404,096 + 49,152 + 256,000 = 709,248 beats update 556,008 and step 404,096
    assert p.grpo.peak_phase == "generation"
    assert p.grpo.device_per_rank == persistent + 709_248
    assert p.grpo.host_per_node == 2 * (202_048 + planner.RUNTIME_HOST_BYTES)


def test_generation_in_passes_by_hand():
    # max_batch_rows=4 (and 7) hold 1 group of 4: 2 prompts run in 2 passes of 4 rows
    for rows in (4, 7):
        c = by_name(plan(shape=TrainingShape(**{**SHAPE.__dict__, "max_batch_rows": rows})))
        # KV per sequence and token: 2 x 2 layers x 2 kv heads x 16 dims x 2 B = 256 B;
        # 4 seqs x 16 tokens x 256 = 16,384, + 1 layer 8,192
        assert c["generation KV cache"].device == 24_576
        assert "(largest of 2 passes)" in c["generation KV cache"].note
        # sampling 4 rows x 1000 x 32 B = 128,000 > prefill 8 tokens x 1,408 + 1 x 32,000
        assert c["generation working"].device == 128_000
        assert c["generation gathered weights"].device == 404_096  # held for all passes
    one = TrainingShape(**{**SHAPE.__dict__, "max_batch_rows": 8})  # both groups: one pass
    assert by_name(plan(shape=one))["generation KV cache"].device == 49_152
    # 5 prompts at 4 a pass (16 rows) run as 3 + 2: the largest pass has 12 rows, not 16
    five = TrainingShape(**{**SHAPE.__dict__, "prompts_per_rank": 5, "max_batch_rows": 16})
    assert five.prompts_per_pass == 3
    assert by_name(plan(shape=five))["generation KV cache"].device == 12 * 16 * 256 * 3 // 2
    with pytest.raises(ValueError, match="max_batch_rows=3: must be at least group_size=4"):
        TrainingShape(**{**SHAPE.__dict__, "max_batch_rows": 3})


# persistent device bytes of plan(): params 202,048 + grads 202,048 + optimizer 1,212,288
# + reduce bucket 2,000 + the 512 MiB runtime
PERSISTENT = 1_618_384 + 512 * 2**20


def test_gpu_verdict_keeps_the_margin_free():
    need = PERSISTENT + 709_248  # + generation, the peak phase: 539,198,544 B
    assert plan().grpo.device_per_rank == need == 539_198_544
    tight = Budgets(device_bytes=580_000_000, host_bytes=512 * GIB, device_is_host=False)
    # the default 10% margin leaves 522,000,000 B usable: less than the need
    p = plan(budgets=tight)
    assert not p.fits and tight.usable_device_bytes == 522_000_000
    assert "budget 0.49 GiB (0.54 GiB less a 10% margin" in p.verdict
    # a 5% margin leaves 551,000,000 B: it fits, and the verdict says with which margin
    p = plan(budgets=Budgets(580_000_000, 512 * GIB, device_is_host=False, margin=0.05))
    assert p.verdict == "fits with a 5% margin: device 0.50 GiB of 0.51 GiB usable (0.54 GiB less 5%)"
    # the CPU pool keeps no margin: there the planner was calibrated against measured peaks
    cpu = Budgets(device_bytes=8 * GIB, host_bytes=8 * GIB, device_is_host=True)
    assert cpu.usable_device_bytes == 8 * GIB
    with pytest.raises(ValueError, match="margin=1.0"):
        Budgets(GIB, GIB, device_is_host=False, margin=1.0)


def test_suggested_max_batch_rows_is_the_largest_that_fits():
    # 8 prompts x G=4 = 32 rows in one pass. With k groups a pass, generation holds the weights
    # 404,096 + KV 256 B x 4k seqs x 16 tokens x 1.5 (24,576 k) + sampling 4k x 32,000 (128,000 k)
    # = 404,096 + 152,576 k; the update (556,008) and step (404,096) stay below it for k >= 1.
    shape = TrainingShape(**{**SHAPE.__dict__, "prompts_per_rank": 8})
    need = [PERSISTENT + 404_096 + 152_576 * k for k in (3, 4, 8)]
    assert need == [539_351_120, 539_503_696, 540_114_000]
    budget = Budgets(539_400_000, 512 * GIB, device_is_host=False, margin=0.0)  # k = 3 fits, 4 not
    p = plan(shape=shape, budgets=budget)
    assert p.grpo.device_per_rank == need[2] and not p.fits
    assert p.suggested_max_batch_rows == 12
    fitting = plan(shape=TrainingShape(**{**shape.__dict__, "max_batch_rows": 12}), budgets=budget)
    assert fitting.fits and fitting.grpo.device_per_rank == need[0]
    assert fitting.suggested_max_batch_rows is None
    # nothing helps when even the persistent states do not fit
    assert plan(shape=shape, budgets=Budgets(10**6, 512 * GIB, False)).suggested_max_batch_rows is None


def test_gradient_checkpointing_by_hand():
    shape = TrainingShape(**{**SHAPE.__dict__, "gradient_checkpointing": True})
    # 32 tokens x (2 layers x 2 B x 64 + A recomputed 2,320 + A backward 2,320 + 384) = 32 x 5,280
    assert by_name(plan(shape=shape))["update activations"].device == 168_960


def test_layer_groups_gather_two_neighbours():
    shape = TrainingShape(**{**SHAPE.__dict__, "gather": "layers"})
    # 1 layer per group (no budget): max(embed 128,000 + layer 73,984, layer + norm 128 + head
    # 128,000, 2 layers 147,968) = 202,112
    assert by_name(plan(shape=shape))["generation gathered weights"].device == 202_112


def test_held_for_backward_follows_reuse_distance():
    spec = model_spec.llama_spec(SMALL)
    zero = planner.zero_settings(ds(stage3_max_reuse_distance=10**9))
    assert planner.held_for_backward_numel(spec, zero) == N  # the preset keeps everything
    zero = planner.zero_settings(ds(stage3_max_reuse_distance=1))
    assert planner.held_for_backward_numel(spec, zero) == 64_000  # only the last module (head)


def test_beta_zero_drops_the_reference():
    names = by_name(plan(shape=TrainingShape(**{**SHAPE.__dict__, "beta": 0.0})))
    assert not [n for n in names if n.startswith("reference")]


# ---- PPO comparison, budgets, CLI -------------------------------------------------------------


def test_ppo_critic_difference_equals_critic_components():
    # long sequences: the update phase is the peak in both plans, so the critic's activations count
    shape = TrainingShape(**{**SHAPE.__dict__, "prompt_len": 64, "max_new_tokens": 64})
    p = plan(shape=shape)
    assert p.grpo.peak_phase == p.ppo.peak_phase == "update"
    critic = {c.name: c for c in p.critic}
    persistent = sum(c.device + c.host for c in p.critic if c.phase == "persistent")
    assert p.ppo_diff_bytes == persistent + critic["critic activations"].device > 0
    assert p.ppo.device_per_rank > p.grpo.device_per_rank
    assert critic["critic optimizer states"].device == 1_212_288


def test_too_small_device_budget_names_need_and_largest_component():
    p = plan(budgets=Budgets(device_bytes=10**6, host_bytes=512 * GIB, device_is_host=False))
    assert not p.fits and p.verdict.startswith("does not fit: device memory per rank needs")
    assert "largest component: runtime" in p.verdict  # the 512 MiB accelerator context


def test_cpu_only_uses_one_ram_pool_per_node():
    budget = 800 * 2**20  # less than the two ranks' 2 x 470 MiB runtime
    p = plan(budgets=Budgets(device_bytes=budget, host_bytes=budget, device_is_host=True))
    g = p.grpo
    # device states 202,048 + 202,048 + 1,212,288 + reduce 2,000, no accelerator context;
    # host: reference 202,048 + runtime + heap kept by the allocator 1.75 x the larger gathered set
    # (generation's 404,096) = 707,168; + generation 709,248 (the oneDNN copies of the Linears
    # replace their gathered weights under ZeRO-3: + 0)
    assert g.ram_per_rank == (1_618_384 + 202_048 + planner.RUNTIME_HOST_BYTES + 707_168
                              + 709_248)
    assert by_name(p)["generation packed weights"].device == 0
    assert g.ram_per_node == 2 * g.ram_per_rank  # 2 ranks on the node
    assert "RAM per node" in p.verdict and not p.fits
    roomy = plan(budgets=Budgets(device_bytes=8 * GIB, host_bytes=8 * GIB, device_is_host=True))
    assert roomy.fits and roomy.verdict == "fits"


def test_packed_copies_add_only_where_they_do_not_replace_gathered_weights():
    spec = model_spec.llama_spec(SMALL)  # layers 36,992 each, head 64,000, embedding 64,000
    assert planner.packed_generation_bytes(spec, 2, None, zero3=True) == 0
    assert planner.packed_generation_bytes(spec, 2, None, zero3=False) == 2 * (2 * 36_992 + 64_000)
    # layer groups of 1: one group's copies at a time, the largest the head's
    assert planner.packed_generation_bytes(spec, 2, 1, zero3=True) == 2 * 64_000
    tied = model_spec.llama_spec({**SMALL, "tie_word_embeddings": True})
    assert planner.packed_generation_bytes(tied, 2, None, zero3=True) == 2 * 64_000
    cpu = Budgets(device_bytes=8 * GIB, host_bytes=8 * GIB, device_is_host=True)
    layers = TrainingShape(**{**SHAPE.__dict__, "gather": "layers"})
    packed = by_name(plan(shape=layers, budgets=cpu))["generation packed weights"].device
    assert packed == 2 * 64_000
    off = TrainingShape(**{**layers.__dict__, "packed_weights": "off"})
    assert by_name(plan(shape=off, budgets=cpu))["generation packed weights"].device == 0
    assert by_name(plan(shape=layers))["generation packed weights"].device == 0  # GPU: no packing


@pytest.fixture
def small_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    (tmp_path / "ds.json").write_text(json.dumps(ds()))
    return tmp_path


def cli(small_model_dir, *extra):
    return ["--model", str(small_model_dir), "--ds-config", str(small_model_dir / "ds.json"),
            "--world-size", "2", "--group-size", "4", "--prompt-len", "8", "--max-new-tokens", "8",
            "--prompts-per-rank", "2", "--micro-batch", "2", "--dtype", "bfloat16", *extra]


def test_cli_json_has_documented_keys_and_exit_codes(small_model_dir, capsys):
    assert main(cli(small_model_dir, "--json", "--device-mem", "4", "--host-mem", "4")) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    data = json.loads(out)
    for key in ("params", "components", "critic", "device_per_rank", "host_per_rank",
                "host_per_node", "ram_per_node", "peak_phase", "ppo", "ppo_diff_bytes",
                "ppo_diff_pct", "deepspeed_estimate", "fits", "verdict"):
        assert key in data, key
    assert data["params"] == N and data["fits"] is True
    assert data["verdict"].startswith("fits with a 10% margin: device ")
    assert data["budgets"]["margin"] == 0.1 and data["suggested_max_batch_rows"] is None
    assert data["components"]["generation KV cache"]["device"] == 49_152
    assert main(cli(small_model_dir, "--json", "--device-mem", "0.0001", "--host-mem", "4")) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and "device memory per rank" in data["verdict"]


def test_cli_table_and_yaml_config(small_model_dir, capsys):
    (small_model_dir / "run.yaml").write_text(
        "rollout: {group_size: 4, max_new_tokens: 8}\ntrain: {prompts_per_step: 4, "
        "micro_batch_size: 2}\ndata: {max_prompt_length: 8}\nmodel: {dtype: bfloat16}\n")
    argv = ["--model", str(small_model_dir), "--config", str(small_model_dir / "run.yaml"),
            "--ds-config", str(small_model_dir / "ds.json"), "--world-size", "2",
            "--device-mem", "4", "--host-mem", "4", "--rollout.gather=full"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "generation KV cache" in table and "PPO - GRPO" in table and "verdict: fits" in table
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"]["generation KV cache"]["device"] == 49_152


def test_cli_max_batch_rows_and_margin(small_model_dir, capsys):
    argv = cli(small_model_dir, "--json", "--device-mem", "4", "--host-mem", "4")
    assert main([*argv, "--max-batch-rows", "4", "--margin", "0.25"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["components"]["generation KV cache"]["device"] == 24_576  # 1 group a pass
    assert data["budgets"]["margin"] == 0.25 and "25% margin" in data["verdict"]
    assert main([*argv, "--max-batch-rows", "3"]) == 2  # less than one group of 4
    assert "max_batch_rows=3" in capsys.readouterr().err


def test_cli_bad_config_exits_2(small_model_dir, capsys):
    assert main(cli(small_model_dir, "--train.no_such_field=1")) == 2
    assert "no_such_field" in capsys.readouterr().err


# ---- the reuse-distance claim, checked against a real ZeRO-3 engine ---------------------------

ENGINE_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import LlamaConfig, LlamaForCausalLM
    config, reuse = json.loads(sys.argv[1]), float(sys.argv[2])
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                "stage3_prefetch_bucket_size": 0,
                                "stage3_max_reuse_distance": reuse}}
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    held = []
    def count(module, inputs, output):  # runs after DeepSpeed's own release hook
        held.append(sum(p.ds_numel for p in engine.module.parameters()
                        if p.ds_status == ZeroParamStatus.AVAILABLE))
    engine.module.lm_head.register_forward_hook(count)
    ids = torch.randint(0, config["vocab_size"], (1, 8))
    for _ in range(2):  # the first step records the trace; the second follows it
        held.clear()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    print("HELD", held[-1])
""")


def test_held_for_backward_matches_deepspeed(tmp_path):
    """After the whole forward, ZeRO-3 still holds exactly the params the planner says it holds."""
    script = tmp_path / "held.py"
    script.write_text(ENGINE_SCRIPT)
    spec = model_spec.llama_spec(SMALL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    # 1e9: everything; 200,000: the head, the final norm and the last layer's modules down to its
    # q_proj (2 x params after each module < 200,000: see held_for_backward_numel):
    # 64,000 + 64 + 3 x 8,192 + 64 + 4,096 + 2,048 + 2,048 + 4,096 = 100,992
    for reuse, expected in ((10**9, N), (200_000, 100_992)):
        zero = planner.zero_settings(ds(stage3_max_reuse_distance=reuse))
        assert planner.held_for_backward_numel(spec, zero) == expected
        out = subprocess.run([sys.executable, str(script), json.dumps(SMALL), str(reuse)], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert int(out.stdout.split("HELD")[-1]) == expected, reuse
