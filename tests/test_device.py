"""The device layer's resolution (grpo_ds/device.py): every `auto` for a CPU and a CUDA machine,
from plain facts, so both are tested here without a GPU."""

import json

import pytest

from grpo_ds.config import ConfigError, deepspeed_config, load_config, resolve_path, validate
from grpo_ds.device import (
    GPU_PRESETS,
    Choices,
    DeviceFacts,
    choices_of,
    describe,
    gpu_preset,
    resolve,
    resolved_config,
)

CPU = DeviceFacts("cpu", cpu_capability="AVX512")
CPU_AVX2 = DeviceFacts("cpu", cpu_capability="AVX2")
H100 = DeviceFacts("cuda", cpu_capability="AVX512", device_bf16=True, flash_attn=False,
                   fused_adam=True)
H100_FLASH = DeviceFacts("cuda", device_bf16=True, flash_attn=True, fused_adam=True)
V100 = DeviceFacts("cuda", device_bf16=False, fused_adam=True)  # no bf16
NO_NVCC = DeviceFacts("cuda", device_bf16=True, fused_adam=False)


def test_cpu_defaults_are_todays_run():
    got = resolve(Choices(), CPU)
    assert (got.dtype, got.attn_implementation, got.optimizer, got.preset, got.tf32) == (
        "float32", "sdpa", "torch_adamw", "ds_configs/zero3.json", False)
    # kernels stay `auto`: the CPU modules decide per model (type, dtype)
    assert (got.fused_layers, got.onednn_linears, got.packed_weights) == ("auto",) * 3


def test_onednn_auto_follows_the_cpu_and_the_dtype():
    got = resolve(Choices(), CPU_AVX2)
    assert got.onednn_linears == "off" and "AVX2" in got.notes[0]
    assert resolve(Choices(dtype="bfloat16"), CPU).onednn_linears == "off"
    with pytest.raises(ConfigError, match="onednn_linears=on needs model.dtype=float32"):
        resolve(Choices(dtype="bfloat16", onednn_linears="on"), CPU)
    assert resolve(Choices(onednn_linears="on"), CPU_AVX2).onednn_linears == "on"


def test_cuda_resolves_every_auto_to_the_plain_path():
    got = resolve(Choices(), H100)
    assert (got.dtype, got.attn_implementation, got.optimizer, got.tf32) == (
        "bfloat16", "sdpa", "fused_adam", True)
    assert (got.fused_layers, got.onednn_linears, got.packed_weights) == ("off",) * 3
    assert got.preset == "ds_configs/gpu/zero3.json"
    line = describe(got)
    assert line.startswith("device cuda: bfloat16, TF32 matmuls") and "CPU kernels off" in line
    assert "\n" not in line


@pytest.mark.parametrize("field", ["fused_layers", "onednn_linears", "packed_weights"])
def test_a_cpu_kernel_asked_for_on_a_gpu_is_an_error(field):
    with pytest.raises(ConfigError, match=f"{field}=on: a CPU kernel"):
        resolve(Choices(**{field: "on"}), H100)


def test_dtype_auto_without_gpu_bf16_is_float32_and_says_so():
    got = resolve(Choices(), V100)
    assert got.dtype == "float32" and any("no bf16" in n for n in got.notes)
    assert resolve(Choices(dtype="float32"), H100).dtype == "float32"  # an explicit choice stays


def test_flash_attention_where_installed_on_cuda_in_bf16():
    assert resolve(Choices(), H100_FLASH).attn_implementation == "flash_attention_2"
    assert resolve(Choices(dtype="float32"), H100_FLASH).attn_implementation == "sdpa"
    assert resolve(Choices(), CPU).attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="flash_attn package is not installed"):
        resolve(Choices(attn_implementation="flash_attention_2"), H100)
    with pytest.raises(ConfigError, match="needs CUDA and bfloat16"):
        resolve(Choices(attn_implementation="flash_attention_2"), DeviceFacts("cpu", flash_attn=True))
    # the rollout's shared-prefix decode does not take flash_attention_2: the line says so
    assert "keys repeated per sample" in describe(resolve(Choices(), H100_FLASH))
    assert "rollout: shared-prefix decode" in describe(resolve(Choices(), H100))


def test_optimizer_follows_offload_and_op_availability():
    assert resolve(Choices(), H100).optimizer == "fused_adam"
    got = resolve(Choices(), NO_NVCC)
    assert got.optimizer == "torch_adamw" and "FusedAdam" in got.notes[0]
    for facts in (CPU, H100):
        assert resolve(Choices(offload_optimizer="cpu"), facts).optimizer == "cpu_adam"
    with pytest.raises(ConfigError, match="offloads the optimizer"):
        resolve(Choices(optimizer="torch_adamw", offload_optimizer="cpu"), H100)
    with pytest.raises(ConfigError, match="fused_adam: DeepSpeed's FusedAdam op cannot be built"):
        resolve(Choices(optimizer="fused_adam"), CPU)
    with pytest.raises(ConfigError, match="cpu_adam is for an offloaded optimizer"):
        resolve(Choices(optimizer="cpu_adam"), CPU)
    with pytest.raises(ConfigError, match="cpu_adam op cannot be built"):
        resolve(Choices(offload_optimizer="nvme"), DeviceFacts("cpu", cpu_adam=False))


def test_gpu_preset_twins():
    assert gpu_preset("ds_configs/zero3_offload_all.json", "cuda") == \
        "ds_configs/gpu/zero3_offload_all.json"
    assert gpu_preset("ds_configs/zero3.json", "cpu") == "ds_configs/zero3.json"
    assert gpu_preset("/my/own.json", "cuda") == "/my/own.json"  # the user's file is kept
    assert gpu_preset("ds_configs/gpu/zero3.json", "cuda") == "ds_configs/gpu/zero3.json"


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_each_gpu_preset_mirrors_its_cpu_preset(name):
    cpu = json.loads(resolve_path(f"ds_configs/{name}.json").read_text())["zero_optimization"]
    gpu = json.loads(resolve_path(f"ds_configs/gpu/{name}.json").read_text())["zero_optimization"]
    assert gpu["stage"] == cpu["stage"] == 3
    for part in ("offload_optimizer", "offload_param"):  # same devices, pinned host memory
        assert cpu.get(part, {}).get("device") == gpu.get(part, {}).get("device")
        if part in gpu and gpu[part]["device"] != "none":
            assert gpu[part]["pin_memory"] is True
    assert gpu["overlap_comm"] is True
    assert 1e5 <= gpu["stage3_param_persistence_threshold"] <= 1e6


def test_the_resolved_config_fills_deepspeed_for_each_optimizer():
    cfg = load_config(None, ["--deepspeed.config=ds_configs/zero3_offload_optimizer.json"])
    plan = validate(cfg, 2)
    assert choices_of(cfg).offload_optimizer == "cpu"
    for facts, bf16, torch_adam in ((CPU, False, None), (H100, True, None)):
        ds = deepspeed_config(resolved_config(cfg, resolve(choices_of(cfg), facts)), plan)
        assert ds["bf16"]["enabled"] is bf16  # offloaded: DeepSpeedCPUAdam, chosen by DeepSpeed
        assert ds["optimizer"]["params"].get("torch_adam") is torch_adam
    plain = load_config()
    on_gpu = resolved_config(plain, resolve(choices_of(plain), H100))
    ds = deepspeed_config(on_gpu, plan)
    assert "torch_adam" not in ds["optimizer"]["params"]  # DeepSpeed builds FusedAdam
    assert ds["zero_optimization"]["overlap_comm"] is True  # the GPU twin of zero3.json
    on_cpu = resolved_config(plain, resolve(choices_of(plain), CPU))
    assert deepspeed_config(on_cpu, plan)["optimizer"]["params"]["torch_adam"] is True
    assert on_cpu.model.dtype == "float32" and plain.model.dtype == "auto"  # a copy


def test_grpo_ds_train_refuses_an_unresolvable_choice_before_launch(monkeypatch, capsys):
    from grpo_ds import cli

    started = []
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: started.append(a))
    # this machine is a CPU: fused_adam cannot be built here, and nothing is launched
    assert cli.main(["train", "--train.optimizer=fused_adam"]) == 2
    assert not started
    assert "train.optimizer=fused_adam" in capsys.readouterr().err
