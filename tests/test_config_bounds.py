"""The generic numeric check: driven by field types, so a new field is covered without a new if."""

from dataclasses import dataclass, field

import pytest

from grpo_ds.config_bounds import Bound, bound_problem, bounds_problem


@dataclass
class NewSection:
    rate: float = 0.5
    count: int = 3
    scales: list[float] = field(default_factory=lambda: [1.0, -2.0])
    optional: int | None = None
    flag: bool = False


@dataclass
class FakeConfig:
    new: NewSection = field(default_factory=NewSection)


@pytest.mark.parametrize("name, value, message", [
    ("rate", float("inf"), "new.rate=inf: must be a finite number"),
    ("rate", float("nan"), "new.rate=nan: must be a finite number"),
    ("count", -1, "new.count=-1: must be in [0, 2147483647]"),
    ("count", 2**40, f"new.count={2**40}: must be in [0, 2147483647]"),
    ("scales", [1.0, float("-inf")], "new.scales[1]=-inf: must be a finite number"),
])
def test_a_field_nobody_listed_is_still_checked_by_its_type(name, value, message):
    cfg = FakeConfig()
    setattr(cfg.new, name, value)
    assert bounds_problem(cfg) == message


def test_sound_values_unset_optionals_and_bools_pass():
    assert bounds_problem(FakeConfig()) is None  # negative floats pass unless a bound says not


def test_bounds_read_as_ranges():
    assert str(Bound(1, 65535)) == "in [1, 65535]"
    assert str(Bound(0, float("inf"), low_open=True)) == "> 0"
    assert bound_problem("deepspeed.master_port", "deepspeed.master_port", 65536) == (
        "deepspeed.master_port=65536: must be in [1, 65535]")
    assert bound_problem("deepspeed.master_port", "deepspeed.master_port", 29500) is None
