"""Prompts from a user's dataset (task.name = dataset), in the shape the loop consumes.

The dataset is loaded, validated, formatted and tokenised once, before the first step, so bad
input fails before any GPU time is spent; then each step takes this rank's slice of a seeded,
per-epoch shuffle (or file order). Rows carry their token ids (`prompt_ids`), the prompt as reward
functions get it (`prompt`: the formatted text, or the chat messages of a conversational row) and
every other dataset column, which reward functions receive as keyword arguments.
"""

from __future__ import annotations

from grpo_ds.config import Config
from grpo_ds.data import DataError, PromptSampler, load_prompt_dataset, prepare_prompts
from grpo_ds.rewards import RESERVED_KEYWORDS

# Row keys the trainer sets itself; a dataset column of one of these names would be overwritten.
OWN_KEYS = ("prompt_ids", *RESERVED_KEYWORDS)


def tool_functions(cfg: Config) -> list:
    """multiturn.tools as functions, whose schemas chat templates render into the prompt."""
    from grpo_ds.agents.build import load_callable

    return [load_callable(spec) for spec in cfg.multiturn.tools]


def prepared_rows(cfg: Config, path: str, tokenizer) -> tuple[list[dict], dict]:
    """The rows of one file as the loop consumes them, and counts of truncated/dropped prompts."""
    d = cfg.data
    alias = d.answer_column != "answer"  # the answer column reaches rewards as `answer`
    dataset = load_prompt_dataset(path, prompt_column=d.prompt_column,
                                  required_columns=[d.answer_column] if alias else [])
    _check_column_names(dataset.column_names, path, alias)
    prepared = prepare_prompts(dataset, tokenizer, max_prompt_length=d.max_prompt_length,
                               overflow=d.overlong_prompts, template=d.template,
                               use_chat_template=d.use_chat_template,
                               system_prompt=d.system_prompt, prompt_column=d.prompt_column,
                               tools=tool_functions(cfg))
    messages = prepared.messages or [None] * len(prepared.texts)
    rows = []
    for row, text, chat, ids in zip(prepared.rows, prepared.texts, messages, prepared.input_ids):
        columns = {k: v for k, v in row.items() if k != "prompt"}
        if alias:
            columns["answer"] = row[d.answer_column]
        rows.append({**columns, "prompt": text if chat is None else chat, "prompt_ids": ids})
    counts = {"data/truncated_prompts": prepared.num_truncated,
              "data/dropped_prompts": prepared.num_dropped}
    return rows, counts


def _check_column_names(columns: list[str], path: str, alias: bool) -> None:
    clash = [c for c in columns if c in OWN_KEYS]
    if clash:
        raise DataError(f"{path}: column {clash[0]!r} has the name of an argument the trainer "
                        f"passes to reward functions ({', '.join(OWN_KEYS)}); rename it")
    if alias and "answer" in columns:
        raise DataError(f"{path}: data.answer_column names another column, but there is a column "
                        "'answer' too, which it would hide from reward functions; rename one")


class DatasetSource:
    def __init__(self, train_rows: list[dict], eval_rows: list[dict], sampler: PromptSampler,
                 rank: int, world: int, counts: dict):
        self.train_rows, self._eval_rows, self.sampler = train_rows, eval_rows, sampler
        self.rank, self.world, self.counts = rank, world, counts

    @classmethod
    def from_config(cls, cfg: Config, rank: int, world: int, tokenizer) -> DatasetSource:
        train_rows, counts = prepared_rows(cfg, cfg.data.train_path, tokenizer)
        eval_rows = []
        if cfg.data.eval_path:
            eval_rows, _ = prepared_rows(cfg, cfg.data.eval_path, tokenizer)
        sampler = PromptSampler(len(train_rows), cfg.train.prompts_per_step, seed=cfg.train.seed,
                                rank=rank, world_size=world, shuffle=cfg.data.shuffle)
        return cls(train_rows, eval_rows, sampler, rank, world, counts)

    def step_rows(self, step: int) -> list[dict]:
        """This rank's prompts for the next step (the sampler keeps the position)."""
        return [self.train_rows[i] for i in self.sampler.next_batch()]

    def refill_rows(self, step: int, round_number: int) -> list[dict]:
        """This rank's prompts for refill round `round_number` of `step` (grpo.refill_max_rounds):
        the sampler's next batch, so the position the checkpoint saves includes the draw."""
        return self.step_rows(step)

    def epoch(self) -> float:
        """Epochs of prompts handed out so far (TrainerState.epoch for reward functions)."""
        return self.sampler.epoch + self.sampler.index / self.sampler.num_prompts

    def eval_rows(self) -> list[dict]:
        """This rank's share of the held-out rows (ranks together cover all of them)."""
        return self._eval_rows[self.rank::self.world]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
