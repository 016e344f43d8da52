"""What `grpo-ds train` reads before it starts any rank, so bad input fails in seconds, named.

After the config is validated (grpo_ds/config.py), `preflight(cfg)`:
- reads the model's config and tokenizer (`model.path`); a tokenizer without an EOS token is
  refused: completions stop at EOS, and batches are padded with it when there is no pad token;
- reads, formats and tokenises the data files (`data.train_path`, `data.eval_path`) exactly as the
  ranks will, so a bad row, a missing column or a failing chat template is named with its file;
- imports every reward spec and checks its parameters against the columns the trainer will pass
  (TRL's keyword convention), so a reward asking for a column the data lacks fails naming it.

The ranks run `check_rewards` again on the rows they built (for runs launched without the CLI).
Errors are ValueErrors (ConfigError, DataError, RewardSpecError) whose message names the field,
file or column and the value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from grpo_ds.config import Config, ConfigError
from grpo_ds.rewards import check_reward_columns, load_reward_function

ARITHMETIC_COLUMNS = ("answer",)  # the built-in task's rows: prompt and answer
NOT_COLUMNS = ("prompt", "prompt_ids")  # row keys that do not reach rewards as columns


def preflight(cfg: Config) -> None:
    """Raise a ValueError naming the field/file/column and value of the first bad input."""
    tokenizer = check_model(cfg.model.path) if cfg.model.path else None
    if cfg.task.name == "dataset":
        from grpo_ds.data_source import prepared_rows

        train_rows, _ = prepared_rows(cfg, cfg.data.train_path, tokenizer)
        eval_rows = prepared_rows(cfg, cfg.data.eval_path, tokenizer)[0] if cfg.data.eval_path \
            else []
        columns = {cfg.data.train_path: row_columns(train_rows)}
        if eval_rows:
            columns[cfg.data.eval_path] = row_columns(eval_rows)
    else:
        columns = {"the built-in arithmetic task": ARITHMETIC_COLUMNS}
    specs = [s for s in cfg.rewards.functions if not s.startswith("model:")]
    functions = {spec: load_reward_function(spec) for spec in specs}
    check_rewards(cfg, functions, columns)


def row_columns(rows: Sequence[dict]) -> list[str]:
    return [k for k in rows[0] if k not in NOT_COLUMNS] if rows else []


def check_rewards(cfg: Config, functions: dict[str, Callable],
                  columns: dict[str, Sequence[str]]) -> None:
    """Every reward function's (and the process reward's) parameters against the columns of each
    file it is called on: all files for the first reward (it also scores the held-out set), the
    train file for the others. `functions` maps spec -> function (reward models left out)."""
    from grpo_ds.agents.build import MULTITURN_COLUMNS, multiturn_enabled

    if multiturn_enabled(cfg):  # the rollout adds these per episode
        columns = {where: [*names, *MULTITURN_COLUMNS] for where, names in columns.items()}
    files = list(columns)
    first = cfg.rewards.functions[0]
    for spec, function in functions.items():
        for where in files if spec == first else files[:1]:
            check_reward_columns(function, spec, columns[where], where)
    if cfg.grpo.process_reward:
        process = load_reward_function(cfg.grpo.process_reward)
        check_reward_columns(process, cfg.grpo.process_reward, columns[files[0]], files[0])


def check_model(path: str):
    """The tokenizer of the model at `path`, after its config and tokenizer have been read."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(path)
    except Exception as error:
        raise ConfigError(f"model.path={path!r}: its config.json cannot be read: "
                          f"{type(error).__name__}: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise ConfigError(f"model.path={path!r}: its tokenizer cannot be loaded: "
                          f"{type(error).__name__}: {error}") from error
    if tokenizer.eos_token_id is None:
        neither = "neither a pad token nor " if tokenizer.pad_token_id is None else "no "
        raise ConfigError(
            f"model.path={path!r}: the tokenizer has {neither}an EOS token (pad_token="
            f"{tokenizer.pad_token!r}, eos_token={tokenizer.eos_token!r}); completions end at EOS "
            "and batches are padded with it when there is no pad token: set eos_token in the "
            "model's tokenizer_config.json")
    return tokenizer
