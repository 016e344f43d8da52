"""A second device on a CPU-only machine: `meta` stands in for CUDA, with real data behind it.

Inside `second_device()`, a tensor created on or moved to "meta" is a `OnSecondDevice`: it
reports `device='meta'` and keeps a real CPU tensor inside, so values, `.item()`, autograd and
optimizers work. Every aten op checks its operands the way CUDA does and raises the CUDA error
("Expected all tensors to be on the same device") when a meta tensor meets a CPU tensor. The
exceptions are CUDA's own: 0-dim CPU tensors act as scalars, and CPU index tensors may index.

Collectives are held to NCCL's rule instead of gloo's: `audited_collectives` refuses a CPU
tensor in all_reduce / all_gather (NCCL takes device tensors only), then runs the real gloo
collective on the data behind the stand-in.

Why not real `meta` tensors: they hold no data, so a trainer step (which reads counts with
`.item()` and samples tokens) could not run at all.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
CPU = torch.device("cpu")

# Ops that accept CPU operands next to CUDA ones on a real GPU (indices are moved for you;
# copies between devices are what `.to()` is for).
_MIXING_ALLOWED = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.copy_.default,
}


class DeviceMismatch(RuntimeError):
    """Two operands on different devices, as CUDA would refuse them."""


class OnSecondDevice(torch.Tensor):
    """A tensor on the stand-in device: `.device` is meta, the data is the CPU tensor `inner`."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=DEVICE, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnSecondDevice({self.inner!r})"

    def tolist(self):  # CUDA tensors allow it (a sync); the subclass machinery does not
        return self.inner.tolist()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_target(device) -> bool:
    # str(), not torch.device(): constructing a device re-enters the function mode.
    return device is not None and str(device).split(":")[0] == DEVICE.type


def _run(func, args, kwargs):
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    on_device = any(isinstance(t, OnSecondDevice) for t in tensors)
    host = [t for t in tensors if not isinstance(t, OnSecondDevice) and t.dim() > 0]
    if on_device and host and func not in _MIXING_ALLOWED:
        raise DeviceMismatch(
            f"{func}: Expected all tensors to be on the same device, but found at least two "
            f"devices, meta (standing in for cuda) and {host[0].device}! (shapes "
            f"{[tuple(t.shape) for t in tensors]})")
    target = kwargs.get("device")
    args, kwargs = tree_map(lambda x: x.inner if isinstance(x, OnSecondDevice) else x,
                            (args, kwargs))
    if _is_target(target):
        kwargs["device"] = CPU
    out = func(*args, **kwargs)
    if func is torch.ops.aten._local_scalar_dense.default:  # .item(): a python number
        return out
    leaves_device = target is not None and not _is_target(target)
    if (on_device or _is_target(target)) and not leaves_device:
        return tree_map(lambda x: OnSecondDevice(x) if type(x) is torch.Tensor else x, out)
    return out


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _Factories(TorchFunctionMode):
    """`torch.tensor(..., device="meta")` and friends build real meta tensors without passing
    through the dispatcher: build them on the CPU and wrap them instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_target(kwargs.get("device")) and func in (torch.tensor, torch.as_tensor):
            made = func(*args, **{**kwargs, "device": CPU})
            return OnSecondDevice(made)
        return func(*args, **kwargs)


_REAL_GENERATOR = torch.Generator


def _host_generator(device="cpu"):
    """A torch.Generator asked for on the stand-in device draws on the CPU (the same stream)."""
    return _REAL_GENERATOR(CPU if _is_target(device) else device)


@contextlib.contextmanager
def second_device():
    """Run the block with `meta` as a second, data-holding device (see the module docstring)."""
    torch.Generator = _host_generator
    try:
        with _Factories(), _Dispatch():
            yield DEVICE
    finally:
        torch.Generator = _REAL_GENERATOR


def on_device(t: torch.Tensor) -> bool:
    return isinstance(t, OnSecondDevice)


@contextlib.contextmanager
def audited_collectives(monkeypatch_setattr):
    """deepspeed.comm collectives that refuse host tensors as NCCL does, then run gloo on the data.

    monkeypatch_setattr: pytest's `monkeypatch.setattr`, so the patches end with the test.
    """
    import deepspeed.comm as dist

    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def device_tensor(t, what):
        if not on_device(t):
            raise DeviceMismatch(f"{what}: NCCL takes tensors on the GPU, got one on {t.device}")
        return t.inner

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        return real_all_reduce(device_tensor(tensor, "all_reduce"), op=op, group=group)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        return real_all_gather([device_tensor(t, "all_gather (output)") for t in tensor_list],
                               device_tensor(tensor, "all_gather"), group=group)

    monkeypatch_setattr(dist, "all_reduce", all_reduce)
    monkeypatch_setattr(dist, "all_gather", all_gather)
    yield
