"""A rank of `grpo_ds.train` that also writes its accelerator's memory peaks (tests/gpu).

Launched as `deepspeed --num_gpus 1 --module tests.gpu.record_memory CONFIG --k=v ...`, it runs
the training rank unchanged, then writes {"max_memory_reserved", "max_memory_allocated"} in bytes
(0 without CUDA) to $GRPO_DS_DEVICE_MEMORY.rank{RANK}.json: the peak that the planner's device
estimate is compared with, as torch's caching allocator held it (reserved >= allocated).
"""

import json
import os

import torch

from grpo_ds import train
from grpo_ds.engine import finish_rank


def main() -> int:
    code = train.main()
    cuda = torch.cuda.is_available()
    peaks = {"max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else 0,
             "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else 0}
    path = f"{os.environ['GRPO_DS_DEVICE_MEMORY']}.rank{os.environ.get('RANK', '0')}.json"
    with open(path, "w") as f:
        json.dump(peaks, f)
    return code


if __name__ == "__main__":
    finish_rank(main())
