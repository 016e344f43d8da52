"""Turn dataset rows into prompt text and prompt token ids, within a maximum prompt length.

Formatting (`format_prompts`), in this order:
1. a conversational row (its prompt column holds chat messages, `[{"role", "content"}, ...]`, as
   in TRL's conversational format) is rendered by the tokenizer's chat template
   (`apply_chat_template(..., add_generation_prompt=True, tokenize=False)`), with the system
   prompt, if any, prepended as a system message (`conversation_messages`);
2. otherwise the user text is `template.format(**row)` when a template is given (any column may
   be used, e.g. "Question: {question}\\nAnswer:"; write literal braces as {{ }}), else the
   prompt column;
3. with `use_chat_template=True` it becomes one user message (after an optional system message)
   rendered by the chat template; without it, a system prompt is put before the text, separated
   by a blank line.

Tokenisation (`tokenize_prompts`): a prompt longer than `max_prompt_length` tokens is either
truncated FROM THE LEFT (the end is kept: the question's last words and the chat template's
generation prompt are what the model must continue from; the start, possibly BOS and the system
prompt, is lost) or dropped, as `overflow` says. Both are counted.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import datasets

from grpo_ds.data.loading import DataError, check_columns

OVERFLOW_CHOICES = ("truncate", "drop")


def template_columns(template: str) -> list[str]:
    """The columns a template reads: "Q: {question} ({meta[id]})" -> ["question", "meta"]."""
    names = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            raise DataError(
                f"template {template!r} has a positional field {{{field}}}; fields must name a "
                "column, and literal braces are written {{ and }}"
            )
        names.append(name)
    return names


def format_prompts(
    rows: datasets.Dataset | Sequence[Mapping],
    *,
    template: str | None = None,
    tokenizer=None,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    prompt_column: str = "prompt",
    tools: Sequence | None = None,
) -> list[str]:
    """One prompt string per row (see the module docstring for the order of the steps)."""
    if isinstance(rows, datasets.Dataset):
        column_names = rows.column_names
    else:
        column_names = list(rows[0]) if len(rows) else []
    needed = template_columns(template) if template is not None else [prompt_column]
    check_columns(column_names, needed, "prompt formatting")
    conversational = is_conversational(rows, prompt_column)
    if conversational and template is not None:
        raise DataError(
            f"data.template formats plain text, but column {prompt_column!r} holds chat "
            "messages: leave data.template unset, and the chat template formats them"
        )
    if use_chat_template or conversational:
        _check_chat_template(tokenizer, prompt_column if conversational else None)
    texts = []
    for index, row in enumerate(rows):  # a Dataset yields one dict per row, like a list
        if conversational:
            messages = conversation_messages(row[prompt_column], system_prompt, index)
            texts.append(_apply_chat_template(tokenizer, messages, index, tools))
            continue
        text = template.format(**row) if template is not None else row[prompt_column]
        if use_chat_template:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            text = _apply_chat_template(tokenizer, [*messages, {"role": "user", "content": text}],
                                        index, tools)
        elif system_prompt:
            text = f"{system_prompt}\n\n{text}"
        texts.append(text)
    return texts


def is_conversational(rows: datasets.Dataset | Sequence[Mapping], prompt_column: str) -> bool:
    """Whether the prompts are chat messages (TRL's conversational format), from the first row."""
    return len(rows) > 0 and prompt_column in rows[0] and isinstance(rows[0][prompt_column], list)


def conversation_messages(messages: list[dict], system_prompt: str | None, index: int) -> list:
    """A row's chat messages as the model sees them: the system prompt first, when one is set."""
    # Keys other rows' messages have are null here (one Arrow type per column): leave them out.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if not system_prompt:
        return messages
    if messages and messages[0]["role"] == "system":
        raise DataError(
            f"row {index + 1} already starts with a system message and data.system_prompt is "
            "set: drop one of them"
        )
    return [{"role": "system", "content": system_prompt}, *messages]


def _check_chat_template(tokenizer, conversational_column: str | None) -> None:
    why = (f"column {conversational_column!r} holds chat messages" if conversational_column
           else "data.use_chat_template is true")
    if tokenizer is None:
        raise ValueError(f"{why}: formatting needs a tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{why}, but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
            "template; use plain-text prompts with data.template instead, or give the tokenizer "
            "a chat_template"
        )


def _apply_chat_template(tokenizer, messages: list[dict], index: int, tools=None) -> str:
    # tools: plain functions; the template renders their JSON schemas (as TRL passes them)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             tools=list(tools) if tools else None)
    except Exception as error:  # e.g. templates that reject a system message
        raise DataError(
            f"the tokenizer's chat template failed on row {index + 1}: "
            f"{type(error).__name__}: {error}"
        ) from error


@dataclass
class TokenizedPrompts:
    """Prompt token ids after applying the maximum prompt length."""

    input_ids: list[
        list[int]
    ]  # one list per kept prompt, each <= max_prompt_length ids, no padding
    kept_indices: list[int]  # position in the input texts of each kept prompt
    num_truncated: int  # kept, but cut from the left to max_prompt_length
    num_dropped: int  # longer than max_prompt_length with overflow="drop"


def tokenize_prompts(
    texts: Sequence[str],
    tokenizer,
    *,
    max_prompt_length: int,
    overflow: str = "truncate",
    add_special_tokens: bool = True,
    batch_size: int = 1024,
) -> TokenizedPrompts:
    """Token ids of each prompt, truncated from the left or dropped when too long.

    Pass add_special_tokens=False for chat-template text, which already holds BOS, so it is not
    doubled.
    """
    if overflow not in OVERFLOW_CHOICES:
        raise ValueError(f"overflow must be one of {OVERFLOW_CHOICES}, got {overflow!r}")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    result = TokenizedPrompts(input_ids=[], kept_indices=[], num_truncated=0, num_dropped=0)
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        encoded = tokenizer(batch, add_special_tokens=add_special_tokens)["input_ids"]
        for offset, ids in enumerate(encoded):
            if len(ids) > max_prompt_length:
                if overflow == "drop":
                    result.num_dropped += 1
                    continue
                ids = ids[-max_prompt_length:]  # keep the end: see the module docstring
                result.num_truncated += 1
            result.input_ids.append(list(ids))
            result.kept_indices.append(start + offset)
    return result


@dataclass
class PreparedPrompts:
    """A dataset's prompts ready for rollout: rows, text and token ids, aligned by position."""

    rows: datasets.Dataset  # the kept rows, all columns (the answer column feeds rewards)
    texts: list[str]  # formatted prompt per kept row, before truncation
    input_ids: list[list[int]]  # token ids per kept row, at most max_prompt_length
    num_truncated: int
    num_dropped: int
    messages: list[list[dict]] | None = None  # conversational rows: chat messages per kept row


def prepare_prompts(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_prompt_length: int,
    overflow: str = "truncate",
    template: str | None = None,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    prompt_column: str = "prompt",
    tools: Sequence | None = None,
) -> PreparedPrompts:
    """format_prompts then tokenize_prompts over a whole dataset, once, before training."""
    texts = format_prompts(
        dataset,
        template=template,
        tokenizer=tokenizer,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
        prompt_column=prompt_column,
        tools=tools,
    )
    conversational = template is None and is_conversational(dataset, prompt_column)
    tokenized = tokenize_prompts(
        texts,
        tokenizer,
        max_prompt_length=max_prompt_length,
        overflow=overflow,
        add_special_tokens=not (use_chat_template or conversational),
    )
    if not tokenized.kept_indices:
        raise DataError(
            f"all {len(texts)} prompts are longer than max_prompt_length={max_prompt_length} "
            "tokens and overflow='drop' dropped them"
        )
    kept = tokenized.kept_indices
    messages = None
    if conversational:
        prompts = dataset[prompt_column]
        messages = [conversation_messages(prompts[i], system_prompt, i) for i in kept]
    return PreparedPrompts(
        rows=dataset.select(kept) if len(kept) < len(dataset) else dataset,
        texts=[texts[i] for i in kept],
        input_ids=tokenized.input_ids,
        num_truncated=tokenized.num_truncated,
        num_dropped=tokenized.num_dropped,
        messages=messages,
    )
