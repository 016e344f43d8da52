"""Loading checkpoint files without running code from them.

A `.pt` file is a pickle, and unpickling calls whatever callables the file names: a crafted
`mp_rank_00_model_states.pt` handed to `grpo-ds export` or `--resume` would run arbitrary code.
torch's `weights_only=True` unpickler only rebuilds tensors, containers and plain values, plus
the globals on an allow-list. DeepSpeed's loaders (engine.load_checkpoint, zero_to_fp32,
ds_to_universal) pass `weights_only=False` explicitly, so `safe_checkpoint_loading()` swaps
`torch.load` for `safe_torch_load` while they run (they all call it as `torch.load`).

The allow-list is what real checkpoints hold (found with
`torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO-3 checkpoints of fp32 and bf16
runs, with and without offload and an LR scheduler, and on their universal conversion): only
DeepSpeed's optimizer files need anything, namely the loss scaler object and the ZeRO stage
enum. Both are plain data classes rebuilt from their fields; neither runs code when unpickled.
Anything else is refused with an error naming the file and the type.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle

import torch

# The real torch.load, kept before any swap so that the guard itself never recurses.
_TORCH_LOAD = torch.load


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs a type outside the allow-list (it could run code): not loaded."""


def allowed_globals() -> list:
    """The non-tensor types DeepSpeed's ZeRO checkpoints contain (see the module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


def _name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def refused_types(f, extra: tuple = ()) -> list[str]:
    """The globals `f` names that are not allowed (empty if it is not a readable checkpoint)."""
    allowed = {_name(g) for g in [*allowed_globals(), *extra]}
    try:
        if isinstance(f, io.IOBase):
            f.seek(0)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:  # noqa: BLE001 - an unreadable file: the load error itself says why
        return []
    return [name for name in found if name not in allowed]


def _unpickler_complaint(err: Exception) -> str:
    """The line of torch's weights-only error that names what it refused."""
    lines = [line.strip() for line in str(err).splitlines()]
    named = [line for line in lines if "Unsupported global" in line or "but got" in line]
    return (named or [lines[0] if lines else type(err).__name__])[0]


def safe_torch_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None,
                    extra_globals: tuple = (), **pickle_load_args):
    """torch.load that never unpickles code: weights_only=True whatever the caller asked.

    Same signature as torch.load (so it can stand in for it); `weights_only` and
    `pickle_module` are ignored on purpose. Raises UnsafeCheckpointError naming the file and
    every type outside the allow-list (plus `extra_globals`).
    """
    del weights_only, pickle_module  # the point of this function
    try:
        with torch.serialization.safe_globals([*allowed_globals(), *extra_globals]):
            return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap,
                               **pickle_load_args)
    except pickle.UnpicklingError as err:
        where = os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f)
        types = refused_types(f, extra_globals) or [_unpickler_complaint(err)]
        raise UnsafeCheckpointError(
            f"{where}: refused to load: it names {', '.join(types)}, which is not a type "
            "grpo-ds or DeepSpeed checkpoints contain (unpickling it could run code). Only load "
            "checkpoints you trust; this one was not loaded.") from None


@contextlib.contextmanager
def safe_checkpoint_loading():
    """Within: every `torch.load` (DeepSpeed's too) is `safe_torch_load`.

    DeepSpeed 0.19 hard-codes `weights_only=False` in its checkpoint engine, zero_to_fp32 and
    ds_to_universal; patching the module attribute they call is the one place that covers them
    all. Restored on exit, so nothing outside checkpoint loading is affected.
    """
    previous = torch.load
    torch.load = safe_torch_load
    try:
        yield
    finally:
        torch.load = previous
