"""CPU-only kernels and host tuning, behind the device layer (grpo_ds/device.py)."""
