"""Typed errors raised on bad input, before any compute.

Every user-facing validation in vdit-accel raises one of these, with a message that names the bad
value and the accepted range or set of values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


class VditAccelError(Exception):
    """Base class of every error vdit-accel raises on purpose."""


class ConfigError(VditAccelError, ValueError):
    """A configuration value is outside its accepted range or set."""


class PromptError(VditAccelError, ValueError):
    """A prompt does not follow the embedded model's caption grammar."""


class WeightsError(VditAccelError, OSError):
    """A weight or preset file is missing, corrupt or does not match its config."""


class VideoError(WeightsError):
    """A video file is missing, empty, truncated, of an unknown format, or not a square clip."""


class UnsupportedModelError(VditAccelError, TypeError):
    """No adapter knows this model class."""


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite real number with ``lo <= value <= hi`` (either bound
    may be ``None``). ``bool``, strings, ``None``, NaN and +-inf are refused.

    Example:
        >>> check_range("steps", 50, lo=1)
        >>> check_range("guidance", -1.0, lo=0.0)
        Traceback (most recent call last):
        ...
        vdit_accel.errors.ConfigError: guidance=-1.0 is out of range: accepted [0.0, inf)
        >>> check_range("w_alpha", float("inf"), lo=0.0)
        Traceback (most recent call last):
        ...
        vdit_accel.errors.ConfigError: w_alpha=inf is out of range: accepted finite values in [0.0, inf)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} is not accepted: expected a number")
    if not math.isfinite(value):
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ConfigError(f"{name}={value!r} is out of range: accepted finite values in "
                          f"{'(' if lo is None else '['}{lo_s}, {hi_s}{')' if hi is None else ']'}")
    bad = (lo is not None and value < lo) or (hi is not None and value > hi) or value != value
    if bad:
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        lb = "(" if lo is None else "["
        rb = ")" if hi is None else "]"
        raise ConfigError(f"{name}={value!r} is out of range: accepted {lb}{lo_s}, {hi_s}{rb}")


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``; return it.

    Example:
        >>> check_choice("norm", "l2", ["l1", "l2"])
        'l2'
    """
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not accepted: choose one of {choices}")
    return value


class CompositionError(VditAccelError, RuntimeError):
    """Two accelerations cannot act together in this order (the message names the order that works)."""


class NonFiniteError(VditAccelError, FloatingPointError):
    """A tensor holds NaN or inf: latents before sampling, or a model output during it.

    ``step`` is the denoising step whose model output was non-finite (``None`` before sampling), ``branch``
    its CFG branch and ``block`` the first module found to produce a non-finite output (``None`` if none was
    located).
    """

    def __init__(self, message: str, *, step: int | None = None, branch: str | None = None,
                 block: str | None = None) -> None:
        super().__init__(message)
        self.step, self.branch, self.block = step, branch, block


class ChecksumError(WeightsError):
    """A weights file does not match the SHA-256 recorded in its config."""


class OutputPathError(VditAccelError, OSError):
    """An output path cannot be written as given: empty, a directory, an unknown extension, an existing file
    without ``--overwrite``, or a folder that is missing or not writable."""
