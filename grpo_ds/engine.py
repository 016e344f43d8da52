"""DeepSpeed engines: the ZeRO-3 policy (the only `deepspeed.initialize` with an optimizer) and the
frozen reference (ZeRO-3, parameters offloaded to CPU, no optimizer).

Both load a local Hugging Face directory under a live `HfDeepSpeedConfig`, so transformers builds
the model inside `zero.Init` and a model larger than one device arrives already sharded.
"""

from __future__ import annotations

import atexit
import copy
import datetime
import os
import sys
from collections.abc import Callable

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers.integrations import HfDeepSpeedConfig

from grpo_ds.build_locks import build_lock_problem
from grpo_ds.model import CausalLMWithLogprobs, load_pretrained


def collective_timeout(minutes: float | None) -> datetime.timedelta:
    """How long a rank waits for the others (rendezvous and every collective) before failing:
    `deepspeed.timeout_minutes`, or None for DeepSpeed's default (DEEPSPEED_TIMEOUT minutes, 10
    when unset)."""
    from deepspeed.constants import default_pg_timeout

    return default_pg_timeout if minutes is None else datetime.timedelta(minutes=minutes)


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Join the launcher's process group; a single process without a launcher runs as world 1.
    `timeout_minutes`: see collective_timeout."""
    if "RANK" not in os.environ:
        # Without these, init_distributed falls back to mpi4py discovery.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    refuse_stale_build_locks()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=collective_timeout(timeout_minutes))
    atexit.register(leave_process_group)
    if get_accelerator().device_name() == "cpu":
        from grpo_ds.cpu import prepare_process

        prepare_process()


def refuse_stale_build_locks() -> None:
    """Stop before DeepSpeed loads its ops if a killed build left a lock that every rank would
    wait on forever (build_locks.py; `grpo-ds train` checks the same before it launches, this
    covers ranks started by the user's own launcher). Local rank 0 looks."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    problem = build_lock_problem()
    if problem:
        raise RuntimeError(problem)


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


def load_sharded(path: str, ds_config: dict, dtype: str, attn_implementation: str = "sdpa"):
    """Load a HF model from `path`, partitioned at load time when `ds_config` is ZeRO stage 3."""
    # transformers consults the most recent HfDeepSpeedConfig through a weak reference:
    # it must stay alive until from_pretrained returns.
    live = HfDeepSpeedConfig(ds_config)
    model, tokenizer = load_pretrained(path, dtype, attn_implementation)
    del live
    return model, tokenizer


def build_policy(lm: torch.nn.Module, ds_config: dict, chunk_size: int, gradient_checkpointing: bool):
    """Wrap the HF model and hand it to DeepSpeed; returns the engine (optimizer inside).
    CPU kernels (Device.prepare_model) must be applied to `lm` before: initialize sets the
    hooks."""
    # from_pretrained returns a model in eval mode, where HF skips gradient checkpointing
    # (it checks self.training): the policy trains, so it is in train mode from here on.
    lm.train()
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CausalLMWithLogprobs(lm, chunk_size=chunk_size)
    # Only trainable parameters get an optimizer (with LoRA: the adapters; the base is frozen).
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=trainable, config=ds_config)
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


PrepareModel = Callable[[torch.nn.Module], object]  # Device.prepare_model: CPU kernels or nothing


def build_reference(load_lm: Callable[[dict], torch.nn.Module], policy_ds: dict, placement: str,
                    chunk_size: int, prepare_model: PrepareModel | None = None):
    """The frozen reference: a separate engine, never stepped; None when placement is 'none'.
    `load_lm(ds_config)` makes the start model partitioned under the reference's config;
    `prepare_model(lm)` gives it the policy's kernels (the device layer's hook)."""
    if placement == "none":
        return None
    ds_config = reference_ds_config(policy_ds, placement)
    lm = load_lm(ds_config).requires_grad_(False)
    if prepare_model is not None:
        prepare_model(lm)
    module = CausalLMWithLogprobs(lm, chunk_size=chunk_size)
    engine, *_ = deepspeed.initialize(model=module, config=ds_config)
    engine.eval()
    return engine
