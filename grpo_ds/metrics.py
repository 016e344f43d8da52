"""Rank-0 outputs of a run: TensorBoard scalars, text and histograms, `metrics.jsonl`, console.

Every rank calls these methods (so call sites need no `if rank == 0`); only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch


class RunLogger:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, quiet: bool = False):
        self.rank, self.total_steps, self.quiet = rank, total_steps, quiet
        self.start = time.time()
        self.writer = None
        self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run)

    def print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        if self.rank == 0 and values.numel():
            self.writer.add_histogram(tag, values.float().cpu(), step)

    def samples(self, step: int, prompts, completions, rewards) -> None:
        if self.rank != 0:
            return
        rows = ["| prompt | completion | reward |", "|---|---|---|"]
        for p, c, r in zip(prompts, completions, rewards):
            rows.append(f"| `{p}` | `{c}` | {r:.3f} |")
        self.writer.add_text("samples", "\n".join(rows), step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """One line per step: step, reward, KL, step time and ETA (the quiet mode prints none)."""
        if step == 1:
            self.start = time.time() - values.get("time/step", 0.0)
        if self.rank != 0 or self.quiet:
            return
        elapsed = time.time() - self.start
        eta = elapsed / step * (self.total_steps - step)
        kl = values.get("kl", math.nan)
        print(f"step {step}/{self.total_steps}  reward {values.get('reward', math.nan):.3f}  "
              f"kl {kl:.4f}  {values.get('time/step', math.nan):.2f}s/step  "
              f"eta {eta:.0f}s", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.rank == 0:
            self.writer.close()
            self.jsonl.close()
