"""One numeric checker (``vdit_accel.validate``) serves flags, ``GenerationConfig`` and every config dataclass
(``config_io``'s checks narrow its accepted types to what a config writes to JSON): the same value gets the same
message wherever it is checked, and no number makes either raise anything but a ``ConfigError``."""

from __future__ import annotations

import numpy as np
import pytest

from vdit_accel import config_io, validate
from vdit_accel.errors import ConfigError


@pytest.mark.parametrize("value", [-1, 0, 0.0, 50.5, float("nan"), float("inf"), -float("inf"), 10**400,
                                   -(10**400), 1e30, True, "3", None])
def test_config_and_flag_checks_give_the_same_message(value):
    messages = []
    for check in (validate.check_float, config_io.check_float):
        with pytest.raises(ConfigError) as info:
            check("x", value, 0.0, 50.0, lo_open=True)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("x=")
    assert messages[0].endswith(("accepted finite values in (0.0, 50.0]", "expected a finite number in (0.0, 50.0]"))


@pytest.mark.parametrize("value", [-1, 11, 2**70, 2.0, 0.9, True, "3", None])
def test_int_checks_give_the_same_message(value):
    messages = []
    for check in (validate.check_int, config_io.check_int):
        with pytest.raises(ConfigError) as info:
            check("x", value, 0, 10)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and messages[0].startswith(f"x={value!r} is ")
    assert messages[0].endswith("an int in [0, 10]")


def test_huge_ints_are_out_of_range_not_an_overflow():
    with pytest.raises(ConfigError, match=r"guidance=10{400} is out of range: accepted finite values in \[0.0, "):
        validate.check_float("guidance", 10**400, 0.0, 50.0)
    assert validate.check_float("t", 10**400, 0.0, allow_inf=True) == float("inf")


def test_config_checks_accept_only_json_types():
    assert validate.check_int("seed", np.int64(7), 0) == 7 and type(validate.check_int("seed", np.int64(7))) is int
    assert validate.check_float("g", np.float32(0.5), 0.0) == 0.5
    with pytest.raises(ConfigError, match=r"num_steps=np.int64\(7\) is not accepted: expected an int in \[1, inf\)"):
        config_io.check_int("num_steps", np.int64(7), 1)
    with pytest.raises(ConfigError, match=r"w_alpha=np.float32\(0.5\) is not accepted: expected a finite number"):
        config_io.check_float("w_alpha", np.float32(0.5), 0.0)
    assert config_io.check_float("w", np.float64(0.5), 0.0) == 0.5  # a float subclass, JSON-writable


def test_str_choices_message_is_check_choice():
    with pytest.raises(ConfigError, match=r"variant='x' is not accepted: choose one of \['a', 'b'\]"):
        config_io.check_str("variant", "x", ["a", "b"])
