"""Load a prompt dataset and validate it before training, with errors that point at the bad row.

Sources (`load_prompt_dataset(source, ...)`):
- a local file: `.jsonl` (JSON Lines), `.json` (an array of objects, or JSON Lines), `.csv`,
  `.parquet`; the `datasets` builder is chosen by extension. A single file is the "train" split.
- a local directory: its data files whose names start with `split` (`train.jsonl`,
  `train-00000-of-00002.parquet`); without `split` the directory must hold one split only.
- otherwise a Hugging Face Hub dataset name (`openai/gsm8k`, with `config_name="main"`), read
  from the local `datasets` cache when offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1).

Checks, all before the first step, all raising DataError (a ValueError):
- JSON Lines are pre-scanned with `json.loads` line by line (streaming, about 0.1 s for GSM8K's
  7473 rows): a malformed line is reported with file, 1-based line number and a snippet.
- `columns={"prompt": "question"}` renames column "question" to "prompt" (new name: old name).
- a missing column is named, with the columns that exist.
- a prompt is a non-empty string (standard format) or a non-empty list of chat messages
  `{"role": ..., "content": ...}` (TRL's conversational format); an empty, whitespace-only or null
  prompt, or anything else, is reported with file and row (and line, for JSON Lines).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import datasets

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SNIPPET_CHARS = 120


class DataError(ValueError):
    """A prompt dataset that cannot be used, with the file, line or row and column at fault."""


class _RowLocator:
    """Maps a row index of the loaded dataset back to 'file: line L (row N)' for error messages."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, int, array | None, str]] = []  # (where, rows, lines, unit)

    def add(self, where: str, num_rows: int, lines: array | None = None, unit: str = "row") -> None:
        self._parts.append((where, num_rows, lines, unit))

    def __call__(self, index: int) -> str:
        for where, num_rows, lines, unit in self._parts:
            if index < num_rows and lines is not None:
                return f"{where}: line {lines[index]} ({unit} {index + 1})"
            if index < num_rows:
                return f"{where}: {unit} {index + 1}"
            index -= num_rows
        raise IndexError(index)


def load_prompt_dataset(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    columns: dict[str, str] | None = None,
    prompt_column: str = "prompt",
    required_columns: Sequence[str] = (),
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """A validated `datasets.Dataset` with `prompt_column` and `required_columns` (after renames).

    `split` picks files in a directory or a hub split (default "train"); a single file IS the
    "train" split, so only None or "train" is accepted for it.
    """
    source = str(source)
    files = _local_files(source, split)
    if files is None:
        dataset, locate = _load_from_hub(source, split, config_name, cache_dir)
    else:
        dataset, locate = _load_files(files, cache_dir)
    where = source if files is None else ", ".join(str(f) for f in files)
    if len(dataset) == 0:
        raise DataError(f"{where}: the dataset has no rows")
    dataset = _rename_columns(dataset, columns or {}, where)
    check_columns(dataset.column_names, [prompt_column, *required_columns], where)
    _check_prompts(dataset, prompt_column, locate)
    return dataset


def check_columns(existing: Sequence[str], needed: Sequence[str], where: str) -> None:
    """DataError naming the first needed column that is missing, and listing those that exist."""
    for column in needed:
        if column not in existing:
            raise DataError(
                f"{where}: column {column!r} not found; the columns are: {', '.join(existing)} "
                "(rename one with columns={" + repr(column) + ": '<existing name>'})"
            )


def _local_files(source: str, split: str | None) -> list[Path] | None:
    """The data files `source` names, or None when it should be looked up on the hub."""
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.suffix.lower() in BUILDERS
    if path.is_dir():
        return _files_in_directory(path, split)
    if path.is_file():
        if split not in (None, "train"):
            raise DataError(
                f"{source}: split={split!r} given for a single file, which is the 'train' split; "
                "point at a directory of split files or at the file you want"
            )
        if path.suffix.lower() not in BUILDERS:
            raise DataError(
                f"{source}: unsupported file type {path.suffix!r}; supported: {', '.join(BUILDERS)}"
            )
        return [path]
    if looks_local:
        raise DataError(f"{source}: no such file or directory (current directory: {os.getcwd()})")
    return None


def _files_in_directory(directory: Path, split: str | None) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise DataError(f"{directory}: no data files ({', '.join(BUILDERS)}) in this directory")
    splits = sorted({_split_of(p) for p in files})
    if split is None and len(splits) > 1:
        raise DataError(f"{directory} holds several splits ({', '.join(splits)}); pass split=")
    chosen = [p for p in files if split is None or _split_of(p) == split]
    if not chosen:
        raise DataError(
            f"{directory}: no files for split {split!r}; splits here: {', '.join(splits)}"
        )
    if len({BUILDERS[p.suffix.lower()] for p in chosen}) > 1:
        raise DataError(
            f"{directory}: split {split!r} mixes file types: {[p.name for p in chosen]}"
        )
    return chosen


def _split_of(path: Path) -> str:
    """The split a data file belongs to: train.jsonl and train-00001-of-00002.parquet -> train."""
    return path.name.split(".")[0].split("-")[0]


def _load_files(files: list[Path], cache_dir: str | None):
    """Each file checked and loaded on its own (so rows map back to files), then concatenated."""
    locate = _RowLocator()
    parts = []
    for path in files:
        suffix = path.suffix.lower()
        lines, unit = _prescan_json(path) if suffix in (".json", ".jsonl") else (None, "row")
        unit = "data row" if suffix == ".csv" else unit  # counted after the header line
        builder = BUILDERS[suffix]
        try:
            part = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache_dir
            )
        except Exception as error:
            raise DataError(
                f"{path}: the datasets {builder!r} loader failed (an empty file fails so): {error}"
            ) from error
        locate.add(str(path), len(part), lines, unit)
        parts.append(part)
    if len(parts) == 1:
        return parts[0], locate
    try:
        return datasets.concatenate_datasets(parts), locate
    except Exception as error:
        described = "; ".join(f"{f.name}: {p.column_names}" for f, p in zip(files, parts))
        raise DataError(f"files do not share columns and types ({described}): {error}") from error


def _prescan_json(path: Path) -> tuple[array | None, str]:
    """(line number of each record, "row") for JSON Lines; (None, "record") for a JSON array."""
    with open(path, "rb") as file:
        head = file.read(4096).lstrip()
    if head.startswith(b"["):
        _check_json_array(path)
        return None, "record"
    return _scan_json_lines(path), "row"


def _scan_json_lines(path: Path) -> array:
    lines = array("L")
    hint = (
        " (a .json file holds an array of objects, or one object per line)"
        if path.suffix == ".json"
        else ""
    )
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue  # the datasets json loader skips blank lines too
            try:
                record = json.loads(raw)
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
                snippet = raw.decode("utf-8", "replace").strip()[:_SNIPPET_CHARS]
                raise DataError(
                    f"{path}: line {number} is not valid JSON ({error}){hint}: {snippet}"
                ) from error
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}: line {number} holds a JSON {type(record).__name__}, "
                    f'expected an object such as {{"prompt": "..."}}{hint}'
                )
            lines.append(number)
    if not lines:
        raise DataError(f"{path}: the file holds no records")
    return lines


def _check_json_array(path: Path) -> None:
    try:
        with open(path, "rb") as file:
            records = json.load(file)
    except ValueError as error:
        line = getattr(error, "lineno", None)
        raise DataError(f"{path}: not valid JSON (line {line}): {error}") from error
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON array of objects")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: record {index + 1} is a JSON {type(record).__name__}, expected an object"
            )


def _load_from_hub(source: str, split: str | None, config_name: str | None, cache_dir: str | None):
    split = split or "train"
    try:
        dataset = datasets.load_dataset(source, config_name, split=split, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        offline = datasets.config.HF_HUB_OFFLINE
        reason = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the "
            "datasets cache"
            if offline
            else "the Hugging Face Hub is not reachable or has no such "
            "dataset (set HF_HUB_OFFLINE=1 to fail fast without network)"
        )
        raise DataError(
            f"could not find {source!r} locally (no such file or directory in {os.getcwd()}), "
            f"and {reason}: {error}"
        ) from error
    locate = _RowLocator()
    locate.add(f"hub dataset {source!r} split {split!r}", len(dataset))
    return dataset, locate


def _rename_columns(dataset: datasets.Dataset, columns: dict[str, str], where: str):
    """Apply a {new name: existing name} mapping."""
    renames = {old: new for new, old in columns.items() if new != old}
    if not renames:
        return dataset
    check_columns(dataset.column_names, list(columns.values()), where)
    if len(renames) != len([old for new, old in columns.items() if new != old]):
        raise DataError(f"{where}: columns={columns} maps one column to several names")
    for old, new in renames.items():
        if new in dataset.column_names and new not in renames:
            raise DataError(
                f"{where}: columns={columns} renames {old!r} to {new!r}, which already exists"
            )
    return dataset.rename_columns(renames)


def _check_prompts(dataset: datasets.Dataset, prompt_column: str, locate: _RowLocator) -> None:
    row = 0
    for batch in dataset.select_columns([prompt_column]).iter(batch_size=4096):
        for prompt in batch[prompt_column]:
            if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
                raise DataError(
                    f"{locate(row)}: empty prompt in column {prompt_column!r}: {prompt!r}"
                )
            if isinstance(prompt, list):
                problem = message_list_problem(prompt)
                if problem:
                    raise DataError(f"{locate(row)}: column {prompt_column!r}: {problem}")
            elif not isinstance(prompt, str):
                raise DataError(
                    f"{locate(row)}: column {prompt_column!r} holds a {type(prompt).__name__} "
                    f"({str(prompt)[:_SNIPPET_CHARS]}), expected a string or a list of chat "
                    "messages"
                )
            row += 1


def message_list_problem(messages: list) -> str | None:
    """What is wrong with a conversational prompt, or None: [{"role": str, "content": str}, ...]."""
    if not messages:
        return "an empty list of chat messages"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return (f"chat message {number} is {str(message)[:_SNIPPET_CHARS]}; expected "
                    '{"role": "<string>", "content": "<string>"}')
    return None
