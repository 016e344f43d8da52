"""Reading a config: the YAML file (or the embedded default) and `--section.key=value`
overrides, each value coerced to its field's declared type, errors naming the field."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from grpo_ds.config_error import ConfigError
from grpo_ds.config_schema import Config


def _coerce(value, annotation: str, where: str):
    """Turn a YAML value or a command-line string into the field's declared type."""
    kind = annotation.replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    if isinstance(value, str) and value.lower() in ("none", "null") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
        if kind.startswith("list["):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
            if not isinstance(value, list):
                raise ValueError
            inner = kind[5:-1]
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def _apply(cfg: Config, section: str, key: str, value, source: str, prefix: str = "") -> str:
    if not hasattr(cfg, section) or section.startswith("_"):
        names = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(f"{source}: unknown section '{section}' (sections: {names})")
    sub = getattr(cfg, section)
    head = key.split(".", 1)[0]  # a nested section (model.lora.rank): descend into it
    hints = {f.name: f.type for f in dataclasses.fields(sub)}
    if head not in hints:
        raise ConfigError(
            f"{source}: unknown field '{prefix}{section}.{key}' (fields: {', '.join(hints)})"
        )
    if dataclasses.is_dataclass(getattr(sub, head)):
        if "." in key:
            return _apply(sub, head, key.split(".", 1)[1], value, source, f"{prefix}{section}.")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{section}.{key}' must be a mapping of fields")
        for inner, item in value.items():
            _apply(sub, head, inner, item, source, f"{prefix}{section}.")
        return f"{prefix}{section}.{key}"
    if "." in key:
        raise ConfigError(f"{source}: '{section}.{head}' has no fields (got '{section}.{key}')")
    setattr(sub, key, _coerce(value, str(hints[key]), f"{prefix}{section}.{key}"))
    return f"{prefix}{section}.{key}"


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (None = the embedded default) and apply `section.key=value` overrides."""
    cfg = Config()
    given: set[str] = set()  # the fields the YAML or an override sets
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            for key, value in values.items():
                given.add(_apply(cfg, section, key, value, path))
    for item in overrides:
        text = item.removeprefix("--")
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise ConfigError(f"override '{item}': expected --section.key=value")
        dotted, value = text.split("=", 1)
        section, key = dotted.split(".", 1)
        given.add(_apply(cfg, section, key, value, f"override '{item}'"))
    if cfg.data.train_path and "task.name" not in given:
        cfg.task.name = "dataset"  # a dataset given is the dataset to train on
    if cfg.task.name == "tool_arithmetic":  # the task's own reward and call format by default
        from grpo_ds.tasks.tool_arithmetic import task_defaults

        for dotted, value in task_defaults().items():
            if dotted not in given:
                section, key = dotted.split(".", 1)
                setattr(getattr(cfg, section), key, value)
    return cfg
