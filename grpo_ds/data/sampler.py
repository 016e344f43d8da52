"""Which prompts each rank trains on at each step: a seeded shuffle per epoch, split over ranks.

Epoch e visits the prompts in the order of a permutation drawn with seed + e (numpy's PCG64), so
runs are reproducible and every epoch has a new order. The order is cut into global batches of
`prompts_per_step` prompts. Rank r of `world_size` w takes the r-th contiguous slice of
`prompts_per_step / w` prompts: slices are disjoint and together are exactly the global batch.
The last `num_prompts % prompts_per_step` prompts of each epoch's order are skipped, so every
step has a full batch (the order is reshuffled, so a different few are skipped each epoch).
With `shuffle=False` every epoch visits the prompts in file order (the same last few skipped).

`state_dict()` is the position (epoch, index), where index counts the prompts of this epoch
already handed out over all ranks. It does not depend on the rank, so every rank saves the same
state, and a run may resume on a different number of ranks. `load_state_dict` refuses a state
from another dataset size, batch size, seed or shuffle setting: that would silently change the
data order.
"""

from __future__ import annotations

import numpy as np


class PromptSampler:
    """Endless iterator of this rank's prompt indices: prompts_per_step / world_size per step."""

    def __init__(
        self,
        num_prompts: int,
        prompts_per_step: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if prompts_per_step < 1 or prompts_per_step % world_size:
            raise ValueError(
                f"prompts_per_step={prompts_per_step} must be a positive multiple of "
                f"world_size={world_size}, so that every rank gets the same number of prompts"
            )
        if num_prompts < prompts_per_step:
            raise ValueError(
                f"the dataset has {num_prompts} prompts, "
                f"fewer than prompts_per_step={prompts_per_step}"
            )
        self.num_prompts = num_prompts
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # prompts of this epoch already handed out, over all ranks
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_prompts // self.prompts_per_step

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all prompt indices used in `epoch` (seed + epoch), or file order."""
        if epoch != self._order_epoch:
            self._order = (np.random.default_rng(self.seed + epoch).permutation(self.num_prompts)
                           if self.shuffle else np.arange(self.num_prompts))
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> list[int]:
        """This rank's prompt indices for the next step; moves to the next epoch when one ends."""
        if self.index + self.prompts_per_step > self.num_prompts:
            self.epoch, self.index = self.epoch + 1, 0
        global_batch = self.epoch_order(self.epoch)[self.index : self.index + self.prompts_per_step]
        self.index += self.prompts_per_step
        per_rank = self.prompts_per_step // self.world_size
        return global_batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_prompts": self.num_prompts,
            "prompts_per_step": self.prompts_per_step,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        state = {"shuffle": True, **state}  # checkpoints from before the option always shuffled
        for key in ("seed", "num_prompts", "prompts_per_step", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the prompt order: the checkpoint has {key}={state[key]}, "
                    "this run "
                    f"has {key}={getattr(self, key)}; the same data and batch size are needed"
                )
        if not 0 <= state["index"] <= self.num_prompts or state["epoch"] < 0:
            raise ValueError(
                f"invalid sampler position: epoch={state['epoch']}, index={state['index']}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
