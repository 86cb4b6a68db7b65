"""Config dataclasses <-> JSON-able dicts, one rule for all: unknown keys raise, values are re-validated.

Also the typed checks every config's ``__post_init__`` uses on values that may come from JSON (a preset, a model's
``config.json``) or from Python: each raises :class:`~vdit_accel.errors.ConfigError` naming the field, the bad value
and what is accepted, never a ``TypeError`` from a comparison deep inside. The numeric ones are
:mod:`vdit_accel.validate`'s (one checker, one message format), narrowed to the Python types a config writes to JSON.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class C:
    ...     a: int = 1
    >>> config_from_dict(C, {"a": 2})
    C(a=2)
    >>> check_int("num_steps", 2.5, lo=1)
    Traceback (most recent call last):
    ...
    vdit_accel.errors.ConfigError: num_steps=2.5 is not accepted: expected an int in [1, inf)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from vdit_accel import validate
from vdit_accel.errors import ConfigError, check_choice


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """:func:`vdit_accel.validate.check_int` for a config field (written to JSON): a Python ``int`` only, not a
    NumPy int (not a bool, not a float such as 2.0 or 0.9), in ``[lo, hi]``; returned."""
    return validate.check_int(name, value, lo, hi, types=int)


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                allow_inf: bool = False) -> float:
    """:func:`vdit_accel.validate.check_float` for a config field (written to JSON): a Python ``int`` or ``float``
    only (not a bool, not a NumPy float32), not NaN, finite unless ``allow_inf``, in ``[lo, hi]`` (``(lo, hi]``
    with ``lo_open``); returned as a float."""
    return validate.check_float(name, value, lo, hi, lo_open=lo_open, allow_inf=allow_inf, types=(int, float))


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not accepted: expected true or false")
    return value


def check_str(name: str, value: Any, choices: Iterable[str] | None = None) -> str:
    """``value`` must be a string (one of ``choices`` when given)."""
    if not isinstance(value, str):
        extra = f" (one of {list(choices)})" if choices is not None else ""
        raise ConfigError(f"{name}={value!r} is not accepted: expected a string{extra}")
    return value if choices is None else check_choice(name, value, choices)


def check_sequence(name: str, value: Any, *, max_len: int | None = None) -> tuple:
    """``value`` must be a list or tuple (not a string, a dict or a number); returned as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}={value!r} is not accepted: expected a list")
    if max_len is not None and len(value) > max_len:
        raise ConfigError(f"{name} has {len(value)} entries: accepted at most {max_len}")
    return tuple(value)


def find_non_finite(data: Any, path: str = "") -> str | None:
    """The path (``config.w_alpha``, ``budgets[3]``) of the first NaN or infinite float in nested JSON data."""
    if isinstance(data, float) and not math.isfinite(data):
        return path or "<value>"
    if isinstance(data, dict):
        for k, v in data.items():
            found = find_non_finite(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    if isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found = find_non_finite(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def config_from_dict(cls: type, d: Any) -> Any:
    """``cls(**d)`` after checking that ``d`` is a dict whose every key is a field of ``cls`` (:class:`ConfigError`
    naming the rest); the values are then validated by ``cls`` itself."""
    if not isinstance(d, dict):
        raise ConfigError(f"a {cls.__name__} must be a JSON object (a dict of its fields), not {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(d) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no fields {unknown}: accepted {sorted(known)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{cls.__name__} needs the fields {missing}: they are missing")
    return cls(**d)


def config_to_dict(config: Any) -> dict:
    """``dataclasses.asdict`` with tuples turned into lists (JSON arrays)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
