"""Prompts from a user's dataset (task.name = dataset), in the shape the loop consumes.

The dataset is loaded, validated, formatted and tokenised once, before the first step, so bad
input fails before any GPU time is spent; then each step takes this rank's slice of a seeded,
per-epoch shuffle. Rows carry their token ids (`prompt_ids`) and every dataset column, which
reward functions receive as keyword arguments.
"""

from __future__ import annotations

from grpo_ds.config import Config
from grpo_ds.data import PromptSampler, load_prompt_dataset, prepare_prompts


def _prepared_rows(cfg: Config, path: str, tokenizer) -> tuple[list[dict], dict]:
    d = cfg.data
    dataset = load_prompt_dataset(path, prompt_column=d.prompt_column,
                                  required_columns=[d.answer_column])
    prepared = prepare_prompts(dataset, tokenizer, max_prompt_length=d.max_prompt_length,
                               overflow=d.overlong_prompts, template=d.template,
                               use_chat_template=d.use_chat_template,
                               prompt_column=d.prompt_column)
    rows = []
    for row, text, ids in zip(prepared.rows, prepared.texts, prepared.input_ids):
        columns = {k: v for k, v in row.items() if k != "prompt"}
        if d.answer_column != "answer":
            columns["answer"] = row[d.answer_column]
        rows.append({**columns, "prompt": text, "prompt_ids": ids})
    counts = {"data/truncated_prompts": prepared.num_truncated,
              "data/dropped_prompts": prepared.num_dropped}
    return rows, counts


class DatasetSource:
    def __init__(self, train_rows: list[dict], eval_rows: list[dict], sampler: PromptSampler,
                 rank: int, world: int, counts: dict):
        self.train_rows, self._eval_rows, self.sampler = train_rows, eval_rows, sampler
        self.rank, self.world, self.counts = rank, world, counts

    @classmethod
    def from_config(cls, cfg: Config, rank: int, world: int, tokenizer) -> DatasetSource:
        train_rows, counts = _prepared_rows(cfg, cfg.data.train_path, tokenizer)
        eval_rows = []
        if cfg.data.eval_path:
            eval_rows, _ = _prepared_rows(cfg, cfg.data.eval_path, tokenizer)
        sampler = PromptSampler(len(train_rows), cfg.train.prompts_per_step, seed=cfg.train.seed,
                                rank=rank, world_size=world)
        return cls(train_rows, eval_rows, sampler, rank, world, counts)

    def step_rows(self, step: int) -> list[dict]:
        """This rank's prompts for the next step (the sampler keeps the position)."""
        return [self.train_rows[i] for i in self.sampler.next_batch()]

    def eval_rows(self) -> list[dict]:
        """This rank's share of the held-out rows (ranks together cover all of them)."""
        return self._eval_rows[self.rank::self.world]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
