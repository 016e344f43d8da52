"""Model FLOPs of a GRPO step's phases, and the dense matmul peak they are divided by (MFU).

Model FLOPs count the work the model needs, not what an implementation happens to run:
recomputation (activation or log-prob chunk checkpointing) is not counted, and neither are
element-wise ops (norms, softmax, rotary, the optimizer). For a decoder with L layers, width d,
`body` = weights of the decoder matmuls (q, k, v, o, gate, up, down of every layer: no
embedding, which is a lookup, no norms) and `head` = d x V of the lm_head:

    forward of one sequence, T tokens of which Tc are scored (log-probs only on completions):
        2 * body * T  +  2 * head * Tc  +  2 * L * T^2 * d
    the last term is causal attention: Q K^T and A V each take T^2/2 * d multiply-adds.
    forward + backward = 3 x forward (backward computes input and weight gradients: 2 x).

    generation of G completions of Tc tokens from a prompt of Tp tokens (shared prefill):
        prefill  2 * body * Tp + 2 * L * Tp^2 * d                      once per prompt
        decode   per sample: Tc tokens through lm_head (2 * head each), Tc - 1 tokens fed
                 back through the body (2 * body each), and attention over the context c
                 (Q K^T and A V: 4 * c * d per layer) for c = Tp + 1 .. Tp + Tc - 1.

Peak: a square matmul in the training dtype, timed on every rank at once, in the same run as the
phases it divides, on the device the run trains on (matmul_peak dispatches on the accelerator).
On CPU: with the rank's own thread count (2 ranks on 2 cores: one thread each), several sizes and
both of torch's CPU matmul libraries (torch.mm, which runs MKL in float32, and oneDNN on a
reordered operand, as generation runs it: packed_linear.py); the fastest is the peak, so an MFU is
never flattered by a slow size or kernel choice. oneDNN's float32 matmul ran about 1.2x MKL's on
an AVX-512 AMD CPU (Zen4), and no faster than MKL's on an AVX2-only one (Zen3).
On a GPU: torch.mm (cuBLAS) in bfloat16, the figure GPU MFUs are usually quoted against, and in
the run's dtype (float32 follows the run's TF32 setting), at larger sizes, after warm-up calls,
timed with the accelerator's events over enough repetitions to fill the time asked for. oneDNN is
a CPU library and is never timed there. The run's dtype's peak is the one MFU divides by.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

PEAK_SIZES = (512, 1024, 2048)  # CPU: a 2048 float32 matmul is 17 GFLOP, seconds on one core
# GPU: an H100's bf16 cuBLAS rate still climbs up to thousands per side; 16384 takes 1.5 GiB in
# bf16, 3 GiB in float32, freed (empty_cache) before the run needs them.
DEVICE_PEAK_SIZES = (4096, 8192, 16384)
DEVICE_WARMUP_CALLS = 3


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    mlp: int
    vocab: int
    heads: int
    kv_heads: int

    @property
    def body(self) -> int:
        """Decoder matmul weights: q, o (d x d), k, v (d x d_kv), gate, up, down (d x mlp)."""
        d, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        return self.layers * (2 * d * d + 2 * d * kv + 3 * d * self.mlp)

    @property
    def head(self) -> int:
        return self.hidden * self.vocab


def forward_flops(shape: ModelShape, seq_len: int, scored: int) -> float:
    """One sequence's forward: T = seq_len tokens through the body, `scored` through lm_head."""
    return (2.0 * shape.body * seq_len + 2.0 * shape.head * scored
            + 2.0 * shape.layers * seq_len ** 2 * shape.hidden)


def train_flops(shape: ModelShape, seq_len: int, scored: int) -> float:
    """Forward + backward of one sequence (backward = 2 x forward)."""
    return 3.0 * forward_flops(shape, seq_len, scored)


def generation_flops(shape: ModelShape, prompt_len: int, new_tokens: int, group: int) -> float:
    """Shared prefill of one prompt, then `group` samples of `new_tokens` tokens each."""
    d, L = shape.hidden, shape.layers
    prefill = 2.0 * shape.body * prompt_len + 2.0 * L * prompt_len ** 2 * d
    contexts = sum(range(prompt_len + 1, prompt_len + new_tokens))  # c for the Tc - 1 fed tokens
    per_sample = (2.0 * shape.head * new_tokens + 2.0 * shape.body * (new_tokens - 1)
                  + 4.0 * L * d * contexts)
    return prefill + group * per_sample


def matmul_rate(size: int, dtype: torch.dtype, seconds: float,
                kernel: str = "mm") -> tuple[float, float]:
    """(FLOP per wall second, FLOP per CPU second of this process) of repeated
    [size, size] @ [size, size] in `dtype` on this process's threads, with `kernel` "mm"
    (torch.mm) or "onednn" (oneDNN's linear on a reordered operand)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    if kernel == "mm":
        out = torch.empty(size, size, dtype=dtype)
        run = lambda: torch.mm(a, b, out=out)
    else:
        from grpo_ds.cpu.onednn_linear import onednn_linear

        packed = torch.ops.mkldnn._reorder_linear_weight(b, size)
        run = lambda: onednn_linear(a, packed)
    run()  # warm-up: first call picks and packs kernels
    reps, start, start_cpu = 0, time.perf_counter(), time.process_time()
    while True:
        run()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            flops = 2.0 * size ** 3 * reps
            return flops / elapsed, flops / max(time.process_time() - start_cpu, 1e-9)


def peak_kernels(dtype: torch.dtype) -> tuple[str, ...]:
    """The matmul kernels timed for the peak: torch.mm, and oneDNN where this CPU runs it."""
    from grpo_ds.cpu.packed_linear import packing_supported

    probe = torch.nn.Linear(1, 1).to(dtype)
    return ("mm",) if packing_supported(probe) else ("mm", "onednn")


def device_peak_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes a GPU's torch.mm peak is timed in: bfloat16 (the reference figure) and the
    run's own dtype, the one its MFU divides by."""
    return tuple(dict.fromkeys((torch.bfloat16, dtype)))


def device_matmul_rate(size: int, dtype: torch.dtype, seconds: float, accelerator) -> float:
    """FLOP per second of repeated [size, size] @ [size, size] in `dtype` on the accelerator's
    current device, timed by its events (device time, not the host's queueing of kernels)."""
    device = accelerator.current_device_name()
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(DEVICE_WARMUP_CALLS):  # cuBLAS picks its kernel; clocks ramp up
        torch.mm(a, b, out=out)
    accelerator.synchronize()
    start, end = accelerator.Event(enable_timing=True), accelerator.Event(enable_timing=True)
    reps = 1
    while True:
        start.record()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1000.0  # events count milliseconds
        if elapsed >= seconds:
            return 2.0 * size ** 3 * reps / elapsed
        reps = max(2 * reps, math.ceil(reps * seconds / max(elapsed, 1e-6)))


def device_matmul_peak(dtype: torch.dtype, seconds_per_size: float, sizes: tuple[int, ...],
                       accelerator) -> dict:
    """A GPU's peak (see matmul_peak): torch.mm in bfloat16 and in `dtype`, best over sizes."""
    by_size = {f"mm/{str(d).removeprefix('torch.')}/{size}":
               device_matmul_rate(size, d, seconds_per_size, accelerator)
               for d in device_peak_dtypes(dtype) for size in sizes}
    accelerator.empty_cache()  # the operands' blocks are no memory the run itself needs

    def best(d: torch.dtype) -> float:
        name = str(d).removeprefix("torch.")
        return max(v for k, v in by_size.items() if k.split("/")[1] == name)

    # A CPU-time MFU means nothing on a GPU: the host mostly waits for the device.
    return {"flops": best(dtype), "bf16_flops": best(torch.bfloat16),
            "flops_per_cpu_second": math.nan, "by_size": by_size, "device": "gpu",
            "threads": torch.get_num_threads()}


def cpu_matmul_peak(dtype: torch.dtype, seconds_per_size: float, sizes: tuple[int, ...]) -> dict:
    """A CPU's peak (see matmul_peak): torch.mm and oneDNN in `dtype`, best over sizes."""
    rates = {f"{kernel}/{size}": matmul_rate(size, dtype, seconds_per_size, kernel)
             for kernel in peak_kernels(dtype) for size in sizes}
    return {"flops": max(wall for wall, _ in rates.values()),
            "flops_per_cpu_second": max(cpu for _, cpu in rates.values()),
            "by_size": {key: wall for key, (wall, _) in rates.items()}, "device": "cpu",
            "threads": torch.get_num_threads()}


def matmul_peak(dtype: torch.dtype, seconds_per_size: float = 1.0,
                sizes: tuple[int, ...] | None = None, accelerator=None) -> dict:
    """This rank's peak on the device it trains on: {"flops": best FLOP/s in `dtype`,
    "flops_per_cpu_second": best FLOP per CPU second (the rate of a core while it runs, whatever
    else shares it; NaN on a GPU), "by_size": {"kernel[/dtype]/size": FLOP/s}, "device": "cpu"
    or "gpu", "threads": n}, plus "bf16_flops" on a GPU. Sizes default by device.

    Under several ranks every rank calls this at the same time (after a barrier), so the ranks
    compete for caches and memory bandwidth as they do in training.
    """
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return cpu_matmul_peak(dtype, seconds_per_size, sizes or PEAK_SIZES)
    return device_matmul_peak(dtype, seconds_per_size, sizes or DEVICE_PEAK_SIZES, accelerator)


def peak_all_ranks(dtype: torch.dtype, seconds_per_size: float) -> list[dict]:
    """Every rank's matmul_peak, measured at the same time (one barrier before), for all ranks."""
    from deepspeed import comm as dist

    from grpo_ds.tools.bench.common import gather_floats

    dist.barrier()
    mine = matmul_peak(dtype, seconds_per_size)
    ranks = gather_floats([mine["flops"], mine["flops_per_cpu_second"], mine["threads"],
                           mine.get("bf16_flops", math.nan)])
    return [{"flops": f, "flops_per_cpu_second": c, "threads": int(t), "bf16_flops": b}
            for f, c, t, b in ranks]
