"""Turn a reward spec from the config into a reward function, with errors that say what is wrong.

A spec is one of:
- a built-in short name: `math_answer`, or `format` (`<think>...</think><answer>...</answer>`);
- `package.module:function`: imported with importlib, so the module must be importable
  (installed, or on PYTHONPATH);
- `path/to/file.py:function`: the file runs as a fresh module (a relative path starts from the
  current directory; the file's own directory is NOT added to sys.path).

`function` may be dotted (`module:Class.method`) and may name any callable, for example one a
factory built at import time (`strict = format_reward(r"...")` in the user's file).

The trainer calls it as TRL does, by keyword: `prompts`, `completions`, `completion_ids`,
`trainer_state` and every dataset column. So its parameters must be nameable by keyword, and it
must name every keyword it is passed or take `**kwargs`; this is checked when it is loaded.
`check_reward_columns` then checks, before launch, that every parameter it requires is a column
the dataset has, so `accuracy(completions, solution, **kwargs)` on a dataset without `solution`
fails naming `solution` and the columns there are, instead of being bound to something else.
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

from grpo_ds.rewards.conversation import reads_text
from grpo_ds.rewards.format import format_reward
from grpo_ds.rewards.math_answer import math_answer

# Built-ins take standard (string) and conversational (message list) completions alike.
BUILTIN_REWARDS: dict[str, Callable] = {
    "math_answer": reads_text(math_answer),
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
    """Fail at load time, not at step 1, when the function cannot take TRL's keyword call."""
    signature = _signature(function)
    if signature is None:
        return
    _, unexpected, positional_only = _binding_problems(signature, TRAINER_KEYWORDS)
    if positional_only or unexpected:
        raise RewardSpecError(
            f"reward spec {spec!r}: {_name(function)} cannot be called by keyword as TRL calls "
            f"reward functions, fn(prompts=..., completions=..., completion_ids=..., "
            f"trainer_state=..., **columns): "
            + _problem_text(unexpected, positional_only)
        )


def check_reward_columns(function: Callable, name: str, columns: Iterable[str],
                         where: str = "the dataset") -> None:
    """Check before training that `function` takes exactly what the trainer will pass.

    `columns` are the dataset columns every call gets as keywords (the trainer adds `prompts`,
    `completions`, `completion_ids` and `trainer_state`). A required parameter that is none of
    them is a RewardSpecError naming it and the columns `where` has; so is a keyword the function
    does not accept (no `**kwargs`).
    """
    signature = _signature(function)
    if signature is None:
        return
    columns = sorted(set(columns) - set(TRAINER_KEYWORDS))
    missing, unexpected, positional_only = _binding_problems(
        signature, (*TRAINER_KEYWORDS, *columns))
    if missing:
        hint = (" (data.answer_column names the column that reaches rewards as `answer`)"
                if "answer" in missing else "")
        raise RewardSpecError(
            f"reward {name!r} ({_name(function)}) needs column "
            f"{', '.join(repr(m) for m in missing)}, which {where} does not have; the columns "
            f"there are: {', '.join(columns) or 'none'}{hint}"
        )
    if positional_only or unexpected:
        raise RewardSpecError(
            f"reward {name!r} ({_name(function)}) cannot be called with what the trainer passes "
            f"(prompts, completions, completion_ids, trainer_state and the columns of {where}: "
            f"{', '.join(columns) or 'none'}): " + _problem_text(unexpected, positional_only)
        )


TRAINER_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state")


def _binding_problems(signature: inspect.Signature, keywords: Iterable[str]):
    """(required parameters not passed, passed keywords not accepted, positional-only required)."""
    keywords = list(keywords)
    params = signature.parameters.values()
    by_keyword = {p.name for p in params
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    missing = [p.name for p in params if p.name in by_keyword and p.default is p.empty
               and p.name not in keywords]
    unexpected = [] if takes_any else [k for k in keywords if k not in by_keyword]
    positional_only = [p.name for p in params
                       if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
    return missing, unexpected, positional_only


def _problem_text(unexpected: list[str], positional_only: list[str]) -> str:
    if positional_only:
        return (f"parameter {', '.join(repr(p) for p in positional_only)} is positional-only; "
                "name the parameters prompts, completions, ... (or take **kwargs)")
    return (f"it does not accept the keyword {', '.join(repr(k) for k in unexpected)}; add "
            "**kwargs to its parameters (every dataset column is passed, as in TRL)")


def _signature(function: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # some builtins and C callables have no signature: trust them
        return None


def _name(function: Callable) -> str:
    return repr(getattr(function, "__qualname__", None) or getattr(function, "__name__", function))
