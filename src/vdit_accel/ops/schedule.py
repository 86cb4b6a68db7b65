"""Per-step schedules over normalised denoising time: resampling a schedule made for ``n`` steps to ``m``.

A schedule value ``v[i]`` of an ``n``-step generation covers the normalised time interval ``[i/n, (i+1)/n)``.
Resampling to ``m`` steps gives each new step the overlap-weighted mean of the old values over its interval
(:func:`resample_mean`, for continuous settings such as budgets: the mean over the whole generation is kept
exactly) or the old value at its interval's midpoint (:func:`resample_nearest`, for discrete settings such as a
forecast order). Both are pure functions of plain sequences.

Example:
    >>> resample_mean([1.0, 0.0, 0.5, 0.5], 2)
    [0.5, 0.5]
    >>> resample_nearest([0, 1, 2, 2], 2)
    [1, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

from vdit_accel.errors import ConfigError

MAX_STEPS = 1000


def _check(values: Sequence, m: int) -> int:
    n = len(values)
    if n < 1:
        raise ConfigError("a schedule with no steps cannot be resampled: accepted at least 1 value")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_STEPS:
        raise ConfigError(f"steps={m!r} is out of range: accepted an int in [1, {MAX_STEPS}]")
    return n


def resample_mean(values: Sequence[float], m: int) -> list[float]:
    """Overlap-weighted mean of ``values`` (an ``n``-step schedule) on each of ``m`` equal time intervals.

    Args:
        values (`Sequence[float]` of length `n`): one value per step.
        m (`int`): steps of the new schedule, in [1, 1000].

    Returns:
        `list[float]` of length `m`; ``mean(result) == mean(values)`` up to rounding.

    Example:
        >>> resample_mean([0.0, 1.0], 4)
        [0.0, 0.0, 1.0, 1.0]
    """
    n = _check(values, m)
    out = []
    for j in range(m):
        lo, hi = j / m, (j + 1) / m
        acc = 0.0
        for i in range(int(lo * n), min(n, int(hi * n) + 1)):
            overlap = min(hi, (i + 1) / n) - max(lo, i / n)
            if overlap > 0:
                acc += overlap * float(values[i])
        out.append(acc * m)
    return out


def resample_nearest(values: Sequence, m: int) -> list:
    """The value of the old step whose interval holds each new step's midpoint.

    Example:
        >>> resample_nearest([0, 1], 3)
        [0, 1, 1]
    """
    n = _check(values, m)
    return [values[min(n - 1, int((j + 0.5) * n / m))] for j in range(m)]
