"""The GPU check (README "GPU check"): skipped without CUDA."""
