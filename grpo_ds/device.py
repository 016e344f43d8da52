"""The device layer: resolves every `auto` in the config for the accelerator this rank runs on.

Config names the choices (grpo_ds/config.py); this module decides. `resolve` is a pure function of
(the config's choices, the accelerator's facts), so each decision is tested on CPU for both a CPU
and a CUDA machine (tests/test_device.py). `prepare_device` probes the facts, resolves, enables
TF32 on CUDA, and returns a config with every `auto` replaced by what this run uses, plus the hook
that gives a loaded model its CPU kernels. The CPU kernels (grpo_ds/cpu/) are entered only when the
accelerator is the CPU: on a GPU every `auto` is the plain Hugging Face / PyTorch path, since none of
them was measured there.

    choice                   cpu                               cuda (any non-CPU accelerator)
    model.dtype              float32                           bfloat16 where supported
    model.attn_implementation sdpa                             flash_attention_2 if installed
                                                               (and bf16), else sdpa
    model.fused_layers       auto: per model (cpu/fused_layers) off (proven on CPU only)
    model.onednn_linears     auto: float32 on AVX-512          off (a CPU kernel)
    rollout.packed_weights   auto: per model (cpu/packed_linear) off (a CPU kernel)
    train.optimizer          torch AdamW; DeepSpeedCPUAdam     FusedAdam where its op builds;
                             when the optimizer is offloaded   DeepSpeedCPUAdam when offloaded
    deepspeed.config         ds_configs/NAME.json              ds_configs/gpu/NAME.json
    TF32 matmuls             -                                 on
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from grpo_ds.config import Config, ConfigError, load_ds_preset

# CPU presets with a GPU twin in ds_configs/gpu/ (same name, same offload devices)
GPU_PRESETS = ("zero3", "zero3_lean", "zero3_nvme", "zero3_offload_all",
               "zero3_offload_optimizer", "zero3_lora_offload")
CPU_KERNELS = ("model.fused_layers", "model.onednn_linears", "rollout.packed_weights")
OPTIMIZER_NAMES = {"torch_adamw": "torch AdamW", "fused_adam": "DeepSpeed FusedAdam",
                   "cpu_adam": "DeepSpeedCPUAdam"}


@dataclass(frozen=True)
class DeviceFacts:
    """What the resolution needs to know about this machine (probed by `probe_facts`)."""

    accelerator: str  # DeepSpeed's device name: "cpu", "cuda", ...
    cpu_capability: str = ""  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", ...
    device_bf16: bool = False  # the (non-CPU) accelerator runs bf16
    flash_attn: bool = False  # the flash_attn package is importable
    fused_adam: bool = False  # DeepSpeed's FusedAdam op is prebuilt or can be JIT-built here
    cpu_adam: bool = True  # DeepSpeed's CPU Adam op is prebuilt or can be JIT-built here


@dataclass(frozen=True)
class Choices:
    """The config's device-dependent choices, as the user wrote them."""

    dtype: str = "auto"
    attn_implementation: str = "auto"
    fused_layers: str = "auto"
    onednn_linears: str = "auto"
    packed_weights: str = "auto"
    optimizer: str = "auto"
    preset: str = "ds_configs/zero3.json"
    offload_optimizer: str = "none"  # the preset's zero_optimization.offload_optimizer.device


@dataclass(frozen=True)
class Resolved:
    """What this run uses. The kernel fields stay `auto` on CPU: the model decides there."""

    accelerator: str
    dtype: str
    attn_implementation: str
    fused_layers: str
    onednn_linears: str
    packed_weights: str
    optimizer: str
    preset: str
    tf32: bool
    notes: tuple[str, ...] = ()  # why an `auto` went the way it did


def choices_of(cfg: Config) -> Choices:
    offload = load_ds_preset(cfg.deepspeed.config).get("zero_optimization", {})
    return Choices(cfg.model.dtype, cfg.model.attn_implementation, cfg.model.fused_layers,
                   cfg.model.onednn_linears, cfg.rollout.packed_weights, cfg.train.optimizer,
                   cfg.deepspeed.config,
                   offload.get("offload_optimizer", {}).get("device", "none"))


def gpu_preset(path: str, accelerator: str) -> str:
    """A shipped CPU preset (`ds_configs/NAME.json`) becomes its GPU twin off the CPU; any other
    path (the user's own file, or an explicit ds_configs/gpu/ one) is kept."""
    name = path.removeprefix("./").removeprefix("ds_configs/").removesuffix(".json")
    if accelerator == "cpu" or path.removeprefix("./") != f"ds_configs/{name}.json":
        return path
    return f"ds_configs/gpu/{name}.json" if name in GPU_PRESETS else path


def resolve_dtype(choice: str, facts: DeviceFacts) -> str:
    if choice != "auto":
        return choice
    return "bfloat16" if facts.accelerator != "cpu" and facts.device_bf16 else "float32"


def resolve_attention(choice: str, dtype: str, facts: DeviceFacts) -> str:
    """sdpa by default; flash_attention_2 on a GPU where flash_attn is installed and the run is
    bf16 (FlashAttention-2 has no float32 kernels)."""
    usable = facts.accelerator == "cuda" and facts.flash_attn and dtype == "bfloat16"
    if choice == "auto":
        return "flash_attention_2" if usable else "sdpa"
    if choice == "flash_attention_2" and not usable:
        why = ("the flash_attn package is not installed" if not facts.flash_attn
               else f"it needs CUDA and bfloat16 (accelerator {facts.accelerator}, dtype {dtype})")
        raise ConfigError(f"model.attn_implementation=flash_attention_2: {why}; use sdpa or auto")
    return choice


def resolve_optimizer(choice: str, offload: str, facts: DeviceFacts) -> tuple[str, str | None]:
    """(optimizer, a note when `auto` could not take the fast one). DeepSpeed runs an offloaded
    optimizer as DeepSpeedCPUAdam, so offload and cpu_adam go together."""
    offloaded = offload != "none"
    if choice == "auto":
        if offloaded:
            choice = "cpu_adam"
        elif facts.accelerator == "cpu":
            return "torch_adamw", None
        elif facts.fused_adam:
            return "fused_adam", None
        else:
            return "torch_adamw", ("torch AdamW: DeepSpeed's FusedAdam op is not prebuilt and "
                                   "cannot be JIT-built here (is_compatible, ninja, nvcc)")
    if (choice == "cpu_adam") != offloaded:
        raise ConfigError(f"train.optimizer={choice}: " + (
            "the preset offloads the optimizer, which DeepSpeed runs as DeepSpeedCPUAdam; use "
            "auto or cpu_adam" if offloaded else
            "cpu_adam is for an offloaded optimizer (zero_optimization.offload_optimizer)"))
    if choice == "cpu_adam" and not facts.cpu_adam:
        raise ConfigError("train.optimizer=cpu_adam: DeepSpeed's cpu_adam op cannot be built "
                          "here (needs a C++ compiler and ninja)")
    if choice == "fused_adam" and (facts.accelerator == "cpu" or not facts.fused_adam):
        raise ConfigError("train.optimizer=fused_adam: DeepSpeed's FusedAdam op cannot be built "
                          f"on this machine (accelerator {facts.accelerator}); use auto")
    return choice, None


def resolve_kernel(field: str, choice: str, dtype: str, facts: DeviceFacts) -> tuple[str, str | None]:
    """(choice for a CPU kernel, a note when `auto` turned it off)."""
    if facts.accelerator != "cpu":
        if choice == "on":
            raise ConfigError(f"{field}=on: a CPU kernel (grpo_ds/cpu/), proven on CPU only; "
                              f"this run's accelerator is {facts.accelerator}: use auto or off")
        return "off", None
    if field != "model.onednn_linears":
        return choice, None
    if choice == "on" and dtype != "float32":
        raise ConfigError(f"model.onednn_linears=on needs model.dtype=float32 (got {dtype}): "
                          "torch already runs bf16 matmuls on oneDNN")
    if choice == "auto" and dtype != "float32":
        return "off", None  # torch runs bf16 matmuls on oneDNN already
    from grpo_ds.cpu.onednn_linear import auto_choice  # the one AVX-512 rule

    slower = auto_choice(facts.cpu_capability) if choice == "auto" else None
    return ("off", f"oneDNN Linears off: {slower}") if slower else (choice, None)


def resolve(choices: Choices, facts: DeviceFacts) -> Resolved:
    """Every `auto` of `choices` for the machine `facts` describes (table in the docstring)."""
    dtype = resolve_dtype(choices.dtype, facts)
    attn = resolve_attention(choices.attn_implementation, dtype, facts)
    optimizer, note = resolve_optimizer(choices.optimizer, choices.offload_optimizer, facts)
    notes = [note] if note else []
    kernels = {}
    for field in CPU_KERNELS:
        kernels[field], note = resolve_kernel(field, getattr(choices, field.split(".")[1]),
                                              dtype, facts)
        notes += [note] if note else []
    if choices.dtype == "auto" and facts.accelerator != "cpu" and dtype == "float32":
        notes.append(f"float32: this {facts.accelerator} device reports no bf16 support")
    return Resolved(facts.accelerator, dtype, attn, kernels["model.fused_layers"],
                    kernels["model.onednn_linears"], kernels["rollout.packed_weights"], optimizer,
                    gpu_preset(choices.preset, facts.accelerator),
                    tf32=facts.accelerator == "cuda", notes=tuple(notes))


def resolved_config(cfg: Config, resolved: Resolved) -> Config:
    """A copy of `cfg` with the resolved values in place of the choices."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype=resolved.dtype,
                                  attn_implementation=resolved.attn_implementation,
                                  fused_layers=resolved.fused_layers,
                                  onednn_linears=resolved.onednn_linears),
        rollout=dataclasses.replace(cfg.rollout, packed_weights=resolved.packed_weights),
        train=dataclasses.replace(cfg.train, optimizer=resolved.optimizer),
        deepspeed=dataclasses.replace(cfg.deepspeed, config=resolved.preset))


def rollout_attention(attn_implementation: str) -> str:
    """What the rollout's decode attention is under `attn_implementation`."""
    from grpo_ds.rollout.attention import SUPPORTED

    if attn_implementation in SUPPORTED:
        return "shared-prefix decode"
    return (f"HF's {attn_implementation} with each prompt's keys repeated per sample (the "
            f"shared-prefix decode supports {', '.join(SUPPORTED)})")


def describe(resolved: Resolved) -> str:
    """The one line a run prints about its device choices."""
    if resolved.accelerator == "cpu":
        kernels = (f"CPU kernels: fused layers {resolved.fused_layers}, oneDNN Linears "
                   f"{resolved.onednn_linears}, packed generation weights {resolved.packed_weights}")
    else:
        kernels = "CPU kernels off (HF / PyTorch path)"
    attention = (f"attention {resolved.attn_implementation} (rollout: "
                 f"{rollout_attention(resolved.attn_implementation)})")
    parts = [resolved.dtype + (", TF32 matmuls" if resolved.tf32 else ""), attention,
             OPTIMIZER_NAMES[resolved.optimizer], f"preset {resolved.preset}", kernels]
    notes = f" [{'; '.join(resolved.notes)}]" if resolved.notes else ""
    return f"device {resolved.accelerator}: {', '.join(parts)}{notes}"


# ---------------------------------------------------------------------------------------------
# the machine


def op_builds(builder_name: str) -> bool:
    """Whether DeepSpeed's op can be loaded here: prebuilt, or compatible (`is_compatible()`) and
    JIT-buildable (ninja, and nvcc for a CUDA op)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils import cpp_extension

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not builder.is_compatible(verbose=False):
        return False
    if installed_ops.get(builder.NAME):
        return True
    needs_nvcc = get_accelerator().device_name() == "cuda"
    return cpp_extension.is_ninja_available() and (not needs_nvcc
                                                   or cpp_extension.CUDA_HOME is not None)


def probe_facts(optimizer_offloaded: bool) -> DeviceFacts:
    """This machine's facts. Op builders are asked only where the resolution reads them."""
    import torch
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    on_cpu = name == "cpu"
    return DeviceFacts(
        accelerator=name, cpu_capability=torch.backends.cpu.get_cpu_capability(),
        device_bf16=not on_cpu and bool(get_accelerator().is_bf16_supported()),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        fused_adam=not on_cpu and not optimizer_offloaded and op_builds("FusedAdamBuilder"),
        cpu_adam=not optimizer_offloaded or op_builds("CPUAdamBuilder"))


def resolve_config(cfg: Config) -> tuple[Config, Resolved]:
    """`cfg` with every `auto` resolved for this machine (tools use it; train.py uses
    prepare_device, which also sets the process up)."""
    choices = choices_of(cfg)
    resolved = resolve(choices, probe_facts(choices.offload_optimizer != "none"))
    return resolved_config(cfg, resolved), resolved


def enable_tf32() -> None:
    """float32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs, float32
    accumulation): what a float32 run on an Ampere+ GPU should use."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


@dataclass
class Device:
    """The run's device decisions: the resolved config, and the hook for each loaded model."""

    cfg: Config
    resolved: Resolved

    def prepare_model(self, lm) -> list[str]:
        """Give a loaded HF model its CPU kernels (before deepspeed.initialize); nothing on a GPU.
        Returns lines saying what runs."""
        if self.resolved.accelerator != "cpu":
            return []
        from grpo_ds.cpu import apply_kernels

        return apply_kernels(lm, self.resolved.fused_layers, self.resolved.onednn_linears)


def prepare_device(cfg: Config, say: Callable[[str], None] = print) -> Device:
    """The one call train.py makes: resolve, say what was chosen, set TF32 on CUDA."""
    cfg, resolved = resolve_config(cfg)
    if resolved.tf32:
        enable_tf32()
    say(describe(resolved))
    return Device(cfg, resolved)
