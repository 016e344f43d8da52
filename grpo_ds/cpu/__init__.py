"""CPU-only kernels and host tuning. A GPU run never enters this package.

The device layer (grpo_ds/device.py) decides; this package does:
- onednn_linear.py   float32 training Linears on oneDNN (forward and input gradient)
- packed_linear.py   generation's Linears on weights reordered once for oneDNN
- fused_layers.py    Llama/Mistral/Qwen2 decoder layers with fused matmuls, RMSNorm, rotary
                     (proven on CPU only; on a GPU `auto` keeps HF's layers)
- host_memory.py     the ranks' host allocator (tcmalloc), chosen by the launcher
- process.py         threads per rank and DeepSpeed's shared-memory buffer
Two entry points: `prepare_process()` once a CPU rank joined the process group
(engine.init_distributed), and `apply_kernels(lm, ...)` for each loaded model (Device.prepare_model).
"""

from __future__ import annotations


def prepare_process() -> None:
    """Threads and shared memory of a CPU rank, right after it joined the process group."""
    from grpo_ds.cpu.process import set_threads_per_rank, unlink_shm_buffer

    unlink_shm_buffer()
    set_threads_per_rank()


def apply_kernels(lm, fused_layers: str, onednn_linears: str) -> list[str]:
    """Fused decoder layers and oneDNN Linears on a loaded HF model, before deepspeed.initialize.
    Returns one line for each saying what runs."""
    from grpo_ds.cpu.fused_layers import apply_fused_layers
    from grpo_ds.cpu.onednn_linear import apply_onednn_linears

    return [apply_fused_layers(lm, fused_layers), apply_onednn_linears(lm, onednn_linears)]
