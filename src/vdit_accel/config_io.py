"""Config dataclasses <-> JSON-able dicts, one rule for all: unknown keys raise, values are re-validated.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class C:
    ...     a: int = 1
    >>> config_from_dict(C, {"a": 2})
    C(a=2)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vdit_accel.errors import ConfigError


def config_from_dict(cls: type, d: dict) -> Any:
    """``cls(**d)`` after checking that every key is a field of ``cls`` (:class:`ConfigError` naming the rest)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no fields {unknown}: accepted {sorted(known)}")
    return cls(**d)


def config_to_dict(config: Any) -> dict:
    """``dataclasses.asdict`` with tuples turned into lists (JSON arrays)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
