"""DeepSpeed engines: the ZeRO-3 policy (the only `deepspeed.initialize` with an optimizer) and the
frozen reference (ZeRO-3, parameters offloaded to CPU, no optimizer).

Both load a local Hugging Face directory under a live `HfDeepSpeedConfig`, so transformers builds
the model inside `zero.Init` and a model larger than one device arrives already sharded.
"""

from __future__ import annotations

import atexit
import copy
import glob
import os
import sys
import time

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers.integrations import HfDeepSpeedConfig

from grpo_ds.cpu.fused_layers import apply_fused_layers
from grpo_ds.model import CausalLMWithLogprobs, load_pretrained
from grpo_ds.cpu.onednn_linear import apply_onednn_linears


def init_distributed() -> None:
    """Join the launcher's process group; a single process without a launcher runs as world 1."""
    if "RANK" not in os.environ:
        # Without these, init_distributed falls back to mpi4py discovery.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    atexit.register(leave_process_group)
    unlink_shm_buffer()
    set_threads_per_rank()


def leave_process_group() -> None:
    """Destroy the process group at exit while Python still runs. Left to C++ static destructors,
    gloo's threads now and then abort a finished rank ("terminate called without an active
    exception", exit code 250). Local: no rank waits for another."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def finish_rank(code: int = 0) -> None:
    """End a rank whose work is done and written, with exit code `code`, skipping C++ static
    destructors and the rest of interpreter teardown.

    Even after leave_process_group, gloo's and DeepSpeed's background threads now and then
    abort a finished rank in those destructors ("terminate called without an active exception",
    SIGABRT; seen in the two-step GRPO test), which fails the whole launch after all the work is
    done. The process group is destroyed first, so no peer is left waiting."""
    leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def clear_stale_build_locks(max_age_seconds: float = 1800.0) -> None:
    """Remove JIT build locks left behind by a killed DeepSpeed op build.

    DeepSpeed builds its CPU ops (shm all-reduce, cpu_adam, async_io) on first use, guarded by a
    `lock` file in torch's extension directory. A build killed mid-way leaves that file, and every
    later run then waits on it forever. A real build takes minutes, so a lock older than
    `max_age_seconds` is stale. Only local rank 0 looks, before any rank starts a build.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    for lock in glob.glob(os.path.join(root, "*", "*", "lock")) + glob.glob(
            os.path.join(root, "*", "lock")):
        try:
            if time.time() - os.path.getmtime(lock) > max_age_seconds:
                os.unlink(lock)
                print(f"[grpo-ds] removed a stale op-build lock left by a killed build: {lock}",
                      flush=True)
        except FileNotFoundError:  # another process removed it first
            pass


def unlink_shm_buffer() -> None:
    """Free DeepSpeed's CPU shared-memory all-reduce buffer when the ranks exit.

    On CPU, init_distributed creates one /dev/shm file per rank (~66 MiB, named after uid, master
    address, port and rank), maps every rank's, and never unlinks them: each run leaks that RAM
    until reboot. Once all ranks have mapped all buffers (init, then a barrier), unlinking our own
    name keeps the mappings working and lets the kernel free the memory at exit.
    """
    if get_accelerator().device_name() != "cpu":
        return
    deepspeed.comm.barrier()
    env = os.environ
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), env.get("MASTER_ADDR", ""),
                     env.get("MASTER_PORT", ""), str(deepspeed.comm.get_rank())])
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # not all ranks local (no shm op), or not Linux
        pass


def set_threads_per_rank() -> None:
    """Give each local rank its share of the cores, so 2 ranks on 2 cores do not fight."""
    if "OMP_NUM_THREADS" in os.environ:  # the user's (or the launcher's) explicit choice
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        return
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if get_accelerator().device_name() == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def load_sharded(path: str, ds_config: dict, dtype: str):
    """Load a HF model from `path`, partitioned at load time when `ds_config` is ZeRO stage 3."""
    # transformers consults the most recent HfDeepSpeedConfig through a weak reference:
    # it must stay alive until from_pretrained returns.
    live = HfDeepSpeedConfig(ds_config)
    model, tokenizer = load_pretrained(path, dtype)
    del live
    return model, tokenizer


def build_policy(lm: torch.nn.Module, ds_config: dict, chunk_size: int, gradient_checkpointing: bool):
    """Wrap the HF model and hand it to DeepSpeed; returns the engine (optimizer inside).
    Fused layers and oneDNN Linears (apply_fused_layers, apply_onednn_linears) must be applied
    to `lm` before: initialize sets the hooks."""
    # from_pretrained returns a model in eval mode, where HF skips gradient checkpointing
    # (it checks self.training): the policy trains, so it is in train mode from here on.
    lm.train()
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CausalLMWithLogprobs(lm, chunk_size=chunk_size)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                      config=ds_config)
    return engine


def reference_ds_config(policy_ds: dict, placement: str) -> dict:
    """An inference-only ZeRO-3 config: same precision and partitioning knobs, no optimizer."""
    zero = copy.deepcopy(policy_ds.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    if placement == "cpu_offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": get_accelerator().is_available()
                                 and get_accelerator().device_name() != "cpu"}
    else:
        zero.pop("offload_param", None)
    return {
        "train_micro_batch_size_per_gpu": policy_ds["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "train_batch_size": policy_ds["train_micro_batch_size_per_gpu"]
        * deepspeed.comm.get_world_size(),
        "zero_optimization": zero,
        "bf16": policy_ds.get("bf16", {"enabled": False}),
        "steps_per_print": 10**9,
    }


def build_reference(path: str, policy_ds: dict, placement: str, dtype: str, chunk_size: int,
                    fused_layers: str = "off", onednn_linears: str = "off"):
    """The frozen reference: a separate engine, never stepped; None when placement is 'none'."""
    if placement == "none":
        return None
    ds_config = reference_ds_config(policy_ds, placement)
    lm, _ = load_sharded(path, ds_config, dtype)
    return reference_engine(lm, ds_config, chunk_size, fused_layers, onednn_linears)


def reference_engine(lm: torch.nn.Module, ds_config: dict, chunk_size: int,
                     fused_layers: str = "off", onednn_linears: str = "off"):
    """Freeze `lm` (built or loaded under `ds_config`, a reference_ds_config) and wrap it as the
    reference engine. The memory benchmark builds `lm` in zero.Init directly, without a file."""
    lm.requires_grad_(False)
    apply_fused_layers(lm, fused_layers)
    apply_onednn_linears(lm, onednn_linears)
    module = CausalLMWithLogprobs(lm, chunk_size=chunk_size)
    engine, *_ = deepspeed.initialize(model=module, config=ds_config)
    engine.eval()
    return engine
