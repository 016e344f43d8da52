"""Run outputs: TensorBoard scalars, text and histograms, `metrics.jsonl`, the console, peak memory.

Every rank calls these methods (so call sites need no `if rank == 0`); only rank 0 writes or
prints. Scalars go to `metrics.jsonl` always, and to TensorBoard either through our own
SummaryWriter in `run_dir/tensorboard` or, when the DeepSpeed config enables monitors
(`tensorboard`, `csv_monitor`, `wandb`, `comet`), through `engine.monitor.write_events`. When
DeepSpeed's own TensorBoard monitor is on, it is the only event writer, so no scalar is written
twice. The tags are listed in docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

# Merge state of the loss metrics (grpo_ds.loss.merge_loss_metrics: "kl/sum",
# "clip_ratio/low_sum", "advantage/sq_sum", ...): their means are what is logged.
INTERNAL_SUFFIXES = ("/sum", "_sum")


class RunLogger:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, quiet: bool = False):
        self.run_dir, self.rank, self.total_steps, self.quiet = Path(run_dir), rank, total_steps, quiet
        self.start = time.time()
        self.last_progress: float | None = None  # wall time of the previous progress line
        self.seconds_per_step: list[float] = []  # wall time between progress lines, evals included
        self.monitor = None  # DeepSpeed's MonitorMaster, when the DS config enables one
        self.writer = None  # created on first use, unless DeepSpeed's TensorBoard monitor owns it
        self.jsonl = None
        quiet_libraries(rank, quiet)
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run)

    def attach_monitor(self, monitor) -> None:
        """Honour the DeepSpeed config's monitors: scalars go through `monitor.write_events`.

        If its TensorBoard monitor is on, its writer also takes our histograms and text, and we
        open no event file of our own (one TensorBoard run, no duplicated scalars).
        """
        if monitor is not None and monitor.enabled:
            self.monitor = monitor

    def _event_writer(self):
        """The SummaryWriter for our histograms, text, and scalars not sent to DeepSpeed's."""
        tb = getattr(self.monitor, "tb_monitor", None)
        if tb is not None and tb.summary_writer is not None:
            return tb.summary_writer
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        return self.writer

    def print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        values = {k: float(v) for k, v in values.items() if not k.endswith(INTERNAL_SUFFIXES)}
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.monitor is not None:
            self.monitor.write_events([(k, v, step) for k, v in values.items()])
        if getattr(self.monitor, "tb_monitor", None) is None:
            writer = self._event_writer()
            for key, value in values.items():
                writer.add_scalar(key, value, step)

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        values = values[torch.isfinite(values)]  # a skipped NaN step: TensorBoard refuses all-NaN
        if self.rank == 0 and values.numel():
            self._event_writer().add_histogram(tag, values.float().cpu(), step)

    def samples(self, step: int, prompts, completions, rewards) -> None:
        if self.rank != 0:
            return
        rows = ["| prompt | completion | reward |", "|---|---|---|"]
        for p, c, r in zip(prompts, completions, rewards):
            rows.append(f"| `{p}` | `{c}` | {r:.3f} |")
        self._event_writer().add_text("samples", "\n".join(rows), step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """One line per step: step, reward, KL, completion length, step time, ETA (none if quiet).

        The ETA is the mean wall time between progress lines (evaluations included) times the
        steps left; the first interval is the step's own time, so warm-up does not count.
        """
        now = time.time()
        interval = values.get("time/step", 0.0) if self.last_progress is None \
            else now - self.last_progress
        self.last_progress = now
        self.seconds_per_step.append(interval)
        if self.rank != 0 or self.quiet:
            return
        eta = sum(self.seconds_per_step) / len(self.seconds_per_step) * (self.total_steps - step)
        line = (f"step {step}/{self.total_steps}  reward {values.get('reward', math.nan):.3f}  "
                f"kl {values.get('kl', math.nan):.4f}  "
                f"len {values.get('completions/mean_length', math.nan):.1f}  "
                f"{values.get('time/step', math.nan):.2f}s/step  eta {format_seconds(eta)}")
        if "eval/accuracy" in values:
            line += f"  eval {values['eval/accuracy']:.3f}"
        print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.rank == 0:
            if self.writer is not None:
                self.writer.close()
            tb = getattr(self.monitor, "tb_monitor", None)
            if tb is not None and tb.summary_writer is not None:
                tb.summary_writer.flush()
            self.jsonl.close()


def format_seconds(seconds: float) -> str:
    """3725 -> '1h02m05s', 95 -> '1m35s', 7.2 -> '7s'."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def quiet_libraries(rank: int, quiet: bool) -> None:
    """Console hygiene: only rank 0 speaks; errors and tracebacks still print on every rank."""
    # DeepSpeed's ZeRO-3 calls torch collectives that torch has renamed; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    import datasets.utils.logging as datasets_logging
    import transformers.utils.logging as hf_logging
    from deepspeed.utils import logger as ds_logger

    if quiet or rank != 0:
        hf_logging.disable_progress_bar()
        datasets_logging.disable_progress_bar()
    if rank != 0:
        warnings.simplefilter("ignore")
        hf_logging.set_verbosity_error()
        datasets_logging.set_verbosity_error()
        ds_logger.setLevel(logging.ERROR)


def synchronized_time(accelerator=None) -> float:
    """`time.perf_counter()` once the accelerator has finished the work queued so far.

    CUDA runs kernels asynchronously: a plain clock read after a phase stamps the moment its
    kernels were queued, and bills their run time to whichever later phase first waits for them.
    Every phase timer reads this instead. On CPU, synchronize() is a no-op.
    """
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    accelerator.synchronize()
    return time.perf_counter()


def peak_memory_bytes(accelerator=None) -> int:
    """This process's peak memory since it started: the accelerator's peak allocation on a GPU,
    the kernel's peak resident set size (ru_maxrss) on CPU."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return int(accelerator.max_memory_allocated())
    # The CPU accelerator's own figure only samples RSS when asked; ru_maxrss is the true peak.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def peak_reserved_bytes(accelerator=None) -> int | None:
    """The accelerator's peak reserved memory: what its caching allocator held from the driver
    at most (live tensors, cached free blocks, fragmentation). This, not the allocation, is what
    runs out. None on CPU, where there is no caching allocator (ru_maxrss already counts all)."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return None
    return int(accelerator.max_memory_reserved())


def peak_memory_metrics(device, accelerator=None) -> dict[str, float]:
    """Per rank r: {"memory/peak_bytes_rank{r}": peak_memory_bytes} and, on an accelerator,
    {"memory/peak_reserved_bytes_rank{r}": peak_reserved_bytes}. One all-gather: call on all
    ranks (they share one accelerator type, so every rank sends the same fields)."""
    import deepspeed.comm as dist

    reserved = peak_reserved_bytes(accelerator)
    values = [peak_memory_bytes(accelerator)] + ([] if reserved is None else [reserved])
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    out = {f"memory/peak_bytes_rank{r}": float(t[0].item()) for r, t in enumerate(gathered)}
    if reserved is not None:
        out.update({f"memory/peak_reserved_bytes_rank{r}": float(t[1].item())
                    for r, t in enumerate(gathered)})
    return out
