"""Turn a reward spec from the config into a reward function, with errors that say what is wrong.

A spec is one of:
- a built-in short name: `math_answer`, or `format` (`<think>...</think><answer>...</answer>`);
- `package.module:function`: imported with importlib, so the module must be importable
  (installed, or on PYTHONPATH);
- `path/to/file.py:function`: the file runs as a fresh module (a relative path starts from the
  current directory; the file's own directory is NOT added to sys.path).

`function` may be dotted (`module:Class.method`) and may name any callable, for example one a
factory built at import time (`strict = format_reward(r"...")` in the user's file). The callable
must accept `(prompts, completions, **columns)`; this is checked when it is loaded, before training.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

from grpo_ds.rewards.format import format_reward
from grpo_ds.rewards.math_answer import math_answer

BUILTIN_REWARDS: dict[str, Callable] = {
    "math_answer": math_answer,
    "format": format_reward(),
}


class RewardSpecError(ValueError):
    """A reward spec that cannot be turned into a reward function."""


def load_reward_function(spec: str) -> Callable:
    """The reward function a spec names: built-in name, `module:function` or `file.py:function`."""
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise RewardSpecError(
            f"reward spec {spec!r} is not a built-in reward ({', '.join(sorted(BUILTIN_REWARDS))}) "
            "and not of the form 'package.module:function' or 'path/to/file.py:function'"
        )
    target, attribute = spec.rsplit(":", 1)  # rsplit keeps a Windows drive letter in the path
    if not target or not attribute:
        raise RewardSpecError(
            f"reward spec {spec!r}: both the module/file and the function name are needed"
        )
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _module_from_file(spec, target) if is_file else _module_from_import(spec, target)
    function = _resolve_attribute(spec, module, attribute)
    _check_signature(spec, function)
    return function


def _module_from_import(spec: str, module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise RewardSpecError(
                f"reward spec {spec!r}: module {module_name!r} not found "
                f"(no module named {error.name!r}; is it installed or on PYTHONPATH?)"
            ) from error
        raise RewardSpecError(
            f"reward spec {spec!r}: importing module {module_name!r} failed because "
            f"it imports {error.name!r}, which is not installed"
        ) from error
    except Exception as error:
        raise RewardSpecError(
            f"reward spec {spec!r}: importing module {module_name!r} raised "
            f"{type(error).__name__}: {error}"
        ) from error


def _module_from_file(spec: str, file_name: str) -> ModuleType:
    path = Path(file_name).expanduser().resolve()
    if not path.is_file():
        raise RewardSpecError(f"reward spec {spec!r}: file not found: {path}")
    # One module per file path, so loading the same spec twice returns the same function.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_grpo_ds_reward_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise RewardSpecError(f"reward spec {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = module  # registered first, as importlib does, for pickling
    try:
        import_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RewardSpecError(
            f"reward spec {spec!r}: running {path} raised {type(error).__name__}: {error}"
        ) from error
    return module


def _resolve_attribute(spec: str, module: ModuleType, attribute: str) -> Callable:
    value = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            available = sorted(
                name
                for name, obj in vars(module).items()
                if callable(obj) and not name.startswith("_") and not isinstance(obj, type)
            )
            raise RewardSpecError(
                f"reward spec {spec!r}: {module.__name__!r} has no attribute {attribute!r} "
                f"(callables defined there: {', '.join(available) or 'none'})"
            )
        value = getattr(value, part)
    if not callable(value):
        raise RewardSpecError(
            f"reward spec {spec!r}: {attribute!r} is a {type(value).__name__}, not callable"
        )
    return value


def _check_signature(spec: str, function: Callable) -> None:
    """Fail at load time, not at step 1, when `function(prompts, completions, ...)` cannot bind."""
    signature = _signature(function)
    if signature is None:
        return
    try:
        signature.bind_partial(["prompt"], ["completion"])
    except TypeError as error:
        raise RewardSpecError(
            f"reward spec {spec!r}: {_name(function)} cannot be called as "
            f"fn(prompts, completions, **columns): {error}"
        ) from error


def check_reward_columns(function: Callable, name: str, columns: Iterable[str]) -> None:
    """Check before training that `function` accepts exactly what the trainer will pass.

    `columns` are the keyword arguments every call gets (the dataset's columns plus what the
    trainer adds, such as `completion_ids`). A required parameter that is not among them, or a
    column the function does not accept (no `**kwargs`), is a RewardSpecError naming both.
    """
    signature = _signature(function)
    if signature is None:
        return
    columns = sorted(columns)
    try:
        signature.bind(["prompt"], ["completion"], **{column: [] for column in columns})
    except TypeError as error:
        raise RewardSpecError(
            f"reward {name!r} ({_name(function)}) cannot be called with the columns the trainer "
            f"passes ({', '.join(columns) or 'none'}): {error}. A reward function takes "
            "(prompts, completions, **kwargs) and names the columns it needs as parameters."
        ) from error


def _signature(function: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # some builtins and C callables have no signature: trust them
        return None


def _name(function: Callable) -> str:
    return repr(getattr(function, "__qualname__", None) or getattr(function, "__name__", function))
