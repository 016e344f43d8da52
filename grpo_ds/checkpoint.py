"""Checkpoints a run can resume from exactly, and the `latest` pointer that only moves when one is whole.

Layout, one directory per step (`checkpoint.dir`, default `<run_dir>/checkpoints`):
    latest                      the name of the newest complete checkpoint ("step_000010")
    step_000010/                DeepSpeed's own files: ZeRO-3 shards of weights and Adam moments,
                                LR scheduler, engine counters (`engine.save_checkpoint`)
    step_000010/grpo_rank_001.json per rank: RNG states (python, numpy, torch, accelerator), data
                                   position (the source's state_dict, when it has one); JSON, so
                                   reading it can run no code
    step_000010/grpo_state.json    the loop's state (`RunState`); written last, after every rank
                                   finished its files, so its presence marks a complete checkpoint

Save order: DeepSpeed files -> rank files -> barrier -> rank 0 fsyncs, writes grpo_state.json,
then moves `latest` by an atomic rename (tmp file, fsync, os.replace) -> barrier. A kill at any
point leaves `latest` on the previous complete checkpoint. DeepSpeed's own `latest` is not used
(`save_latest=False`); ours has the same format, so DeepSpeed's tools (zero_to_fp32.py) follow it.

Resume is a fresh process (ZeRO-3 cannot load into the engine that saved it). The built-in task's
warm-up does not rerun: the state records the model the run started from (`run_dir/sft_model`),
which also rebuilds the reference. With another number of ranks, the ZeRO-3 shards are first
converted to DeepSpeed's universal checkpoint (`ds_to_universal`), which carries weights and Adam
moments to any world size; RNG states then restart per rank (sampling seeds derive from the step).

Every `.pt` file is read through `safe_load.safe_checkpoint_loading()`: pickles that name any type
outside a small allow-list are refused, so a crafted checkpoint cannot run code on resume.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from grpo_ds import hooks
from grpo_ds.checkpoint_files import (
    STATE_FILE,
    fsync_file,
    latest_name,
    point_latest,
    prune,
    set_aside_newer,
    step_name,
    trim_metrics,
    write_durably,
)
from grpo_ds.safe_load import safe_checkpoint_loading, safe_torch_load


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or written. The message says what to do."""


@dataclass
class RunState:
    """What a resumed run needs besides DeepSpeed's weights and optimizer (the same on all ranks)."""

    step: int = 0  # GRPO steps completed
    model_path: str = ""  # the model the run started from: reloaded as the frozen reference
    world_size: int = 1  # ranks that wrote the checkpoint
    accuracy_before: float | None = None  # held-out accuracy before GRPO
    history: list = field(default_factory=list)  # [{step, accuracy}] held-out evaluations
    warmup_curve: list | None = None  # the built-in task's warm-up curve, for the summary
    nan_skipped_steps: int = 0  # steps skipped for a NaN/inf loss or gradient, in total
    bad_steps_in_a_row: int = 0  # ... and in a row up to `step`
    adapter_config: dict | None = None  # model.lora: the PEFT adapter config (export writes it)


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.output.run_dir) / "checkpoints")


def read_state(path: Path) -> RunState:
    fields = {f.name for f in dataclasses.fields(RunState)}
    raw = json.loads((path / STATE_FILE).read_text())
    return RunState(**{k: v for k, v in raw.items() if k in fields})


def find_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint from a step directory, a checkpoints directory or a run directory."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        for pointer_dir in (path, path / "checkpoints"):
            if latest_name(pointer_dir):
                path = pointer_dir / latest_name(pointer_dir)
                break
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a complete grpo-ds checkpoint (no {STATE_FILE}): an interrupted save "
            "leaves one like this. Use the checkpoint that `latest` names, or a run directory.")
    return path


def find_resume(spec: str | None, root: Path) -> Path | None:
    """The checkpoint `checkpoint.resume` asks for: auto | latest | PATH; None to start fresh."""
    if spec is None or spec.lower() in ("", "none", "no", "false"):
        return None
    if spec.lower() in ("auto", "latest"):
        if latest_name(root) is not None:
            return find_checkpoint(root)
        if spec.lower() == "latest":
            raise CheckpointError(f"checkpoint.resume=latest: no checkpoint in {root} "
                                  "(no `latest` file); use auto to start fresh when there is none")
        return None
    return find_checkpoint(spec)


# ---------------------------------------------------------------------------------------------
# per-rank state


def _bytes_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng() -> dict:
    """Every RNG's state as JSON-able values (lists, numbers, base64 strings)."""
    from deepspeed.accelerator import get_accelerator

    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt_state), gauss],
            "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": _bytes_to_text(torch.get_rng_state()),
            "accelerator": _bytes_to_text(get_accelerator().get_rng_state())}


def restore_rng(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    get_accelerator().set_rng_state(_text_to_bytes(state["accelerator"]))


def read_rank_state(path: Path) -> dict:
    """A rank file: JSON; a `.pt` one from before JSON is read with numpy's array types allowed."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    from numpy._core.multiarray import _reconstruct

    numpy_types = (_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)  # the MT19937 keys
    state = safe_torch_load(path, extra_globals=numpy_types)
    rng = state["rng"]
    state["rng"] = {"python": list(rng["python"]), "numpy": list(rng["numpy"]),
                    "torch": _bytes_to_text(rng["torch"]),
                    "accelerator": _bytes_to_text(rng["accelerator"])}
    return state


def universal_ds_config(ds_config: dict, state: RunState, world: int) -> dict:
    """The policy's DeepSpeed config for resuming `state`: universal loading if the world changed."""
    if state.world_size != world:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}),
                                                 "load_universal": True}}
    return ds_config


def convert_to_universal(path: Path, log) -> Path:
    """ZeRO-3 shards of `world_size` ranks -> DeepSpeed's universal checkpoint in `path/universal`
    (any world size can load it). Runs on one process; the result is kept for the next resume."""
    out = path / "universal"
    if (out / "zero" / "optimizer_state.pt").is_file():
        return out
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    log(f"converting {path} to a universal checkpoint (the number of ranks changed)")
    shutil.rmtree(out, ignore_errors=True)
    with safe_checkpoint_loading():  # ds_to_universal unpickles with weights_only=False
        ds_to_universal(Namespace(input_folder=str(path), output_folder=str(out),
                                  num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=False))
    return out


# ---------------------------------------------------------------------------------------------
# save and load


class Checkpointer:
    """Saves and loads the policy engine plus the trainer's state; every rank calls every method."""

    def __init__(self, engine, root: Path, keep_last: int, source, log):
        import deepspeed.comm as dist

        self.engine, self.root, self.keep_last, self.source, self.log = (
            engine, Path(root), keep_last, source, log)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # frozen parameters (a LoRA base) are reloaded from the model path, not checkpointed
        self.has_frozen = any(not p.requires_grad for p in engine.module.parameters())

    def latest(self) -> Path | None:
        name = latest_name(self.root)
        return self.root / name if name else None

    def _rank_file(self, path: Path, rank: int) -> Path:
        """This rank's JSON file; a checkpoint written before JSON has `.pt` ones instead."""
        own = path / f"grpo_rank_{rank:03d}.json"
        legacy = own.with_suffix(".pt")
        return legacy if legacy.is_file() and not own.is_file() else own

    def save(self, state: RunState) -> Path:
        import deepspeed.comm as dist

        name = step_name(state.step)
        path = self.root / name
        if latest_name(self.root) == name:
            return path  # already saved (resumed here and stopped before another step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # a failed save's leftovers; DeepSpeed's first barrier orders this
        started = time.time()
        try:
            # With LoRA the frozen base is not saved: it is the model at state.model_path.
            self.engine.save_checkpoint(str(self.root), tag=name, save_latest=False,
                                        exclude_frozen_parameters=self.has_frozen)
            rank_state = {"rng": capture_rng(), "source": self.source.state_dict()
                          if hasattr(self.source, "state_dict") else None}
            write_durably(path / f"grpo_rank_{self.rank:03d}.json",
                          json.dumps(rank_state).encode())
            hooks.files_written(state.step, self.rank, self.root)  # tests' faults only
            dist.barrier()  # every rank's files are written
            if self.rank == 0:
                self._commit(path, state)
            dist.barrier()  # no rank leaves (and perhaps exits) before `latest` moved
        except Exception as err:
            raise CheckpointError(self._failed_message(path, err)) from err
        self.log(f"checkpoint {path} saved in {time.time() - started:.1f}s")
        return path

    def _failed_message(self, path: Path, err: Exception) -> str:
        previous = latest_name(self.root)
        kept = (f"The previous checkpoint {self.root / previous} is intact and `latest` still "
                "names it" if previous else "There is no earlier checkpoint")
        try:  # torch.save reports a full disk as "unexpected pos ...": say what is free
            free = f"{shutil.disk_usage(self.root).free / 2**20:.0f} MiB free on its disk"
        except OSError:
            free = "free space unknown"
        return (f"saving checkpoint {path} failed ({free}): {err}\n{kept}. Fix the cause, then "
                "rerun with --checkpoint.resume=auto.")

    def _commit(self, path: Path, state: RunState) -> None:
        """Rank 0, once every rank's files exist: make them durable, mark complete, move `latest`."""
        for file in path.rglob("*"):
            if file.is_file():
                fsync_file(file)
        hooks.before_commit(state.step, self.rank)  # tests' faults only
        write_durably(path / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=1).encode())
        fsync_file(path)
        point_latest(self.root, path.name)
        prune(self.root, self.keep_last, state.step)

    def load(self, path: Path, state: RunState) -> None:
        """Weights, Adam moments, LR schedule, RNG and data position from `path` into this run."""
        elastic = state.world_size != self.world
        if elastic:
            load_dir, tag = path, "universal"  # converted by `prepare_resume`
        else:
            load_dir, tag = path.parent, path.name
        with safe_checkpoint_loading():  # DeepSpeed's loaders ask for weights_only=False
            loaded, _ = self.engine.load_checkpoint(str(load_dir), tag=tag,
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=True,
                                                    load_module_strict=not self.has_frozen)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {load_dir / tag}")
        own = self._rank_file(path, self.rank)
        rank_state = read_rank_state(own if own.is_file() and not elastic
                                     else self._rank_file(path, 0))
        if not elastic:
            restore_rng(rank_state["rng"])
        if rank_state["source"] is not None and hasattr(self.source, "load_state_dict"):
            # The data position is rank-independent, so any rank's state serves another world size.
            self.source.load_state_dict(rank_state["source"])
        note = (f", moved from {state.world_size} to {self.world} ranks (weights and Adam moments "
                "carried; RNG restarted)" if elastic else "")
        self.log(f"resumed from {path} at step {state.step}{note}")
        state.world_size = self.world


def resume_point(cfg) -> tuple[Path | None, RunState | None]:
    """Every rank: the checkpoint `checkpoint.resume` names and its state, or (None, None) to start
    fresh. Rank 0 then tidies the run: newer checkpoints set aside, metrics.jsonl trimmed."""
    import deepspeed.comm as dist

    root, run_dir = checkpoint_root(cfg), Path(cfg.output.run_dir)
    path = find_resume(cfg.checkpoint.resume, root)
    state = read_state(path) if path else None
    if state is not None and state.step > cfg.train.steps:
        raise CheckpointError(f"{path} is at step {state.step}, past train.steps="
                              f"{cfg.train.steps}: raise train.steps to train on")
    if state is not None and not cfg.model.path and not Path(state.model_path).is_dir():
        raise CheckpointError(f"{path} started from the model {state.model_path}, which is gone "
                              "(it is also the KL reference): pass --model.path=DIR")
    dist.barrier()  # every rank has read `latest` before rank 0 moves anything
    if dist.get_rank() == 0:
        (run_dir / "failure.txt").unlink(missing_ok=True)
        set_aside_newer(root, state.step if state else 0, print)
        if state is not None:
            trim_metrics(run_dir, state.step)
    dist.barrier()
    return path, state


def prepare_resume(path: Path, state: RunState, ds_config: dict, log) -> dict:
    """Before the policy engine exists: convert for another world size if needed (rank 0, others
    wait); returns the DeepSpeed config to build the policy with."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    if state.world_size != world and state.adapter_config is not None:
        # The universal conversion has not been proven on a checkpoint without the frozen base.
        raise CheckpointError(f"{path}: a LoRA checkpoint written by {state.world_size} ranks "
                              f"cannot be resumed on {world}; resume on {state.world_size} ranks, "
                              "or export the adapter (grpo-ds export) and start from it with "
                              "--model.lora.adapter_path")
    if state.world_size != world and dist.get_rank() == 0:
        convert_to_universal(path, log)
    dist.barrier()
    return universal_ds_config(ds_config, state, world)
