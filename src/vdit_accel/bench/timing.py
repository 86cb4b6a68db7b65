"""Pure timing statistics of an interleaved bench run: paired speedups, their dispersion, dense drift, run order.

The harness runs every operating point on each (prompt, seed) job in turn, dense among them, so a job's dense
and method latencies were measured minutes apart at most. A point's speedup is the median over jobs of the
paired ratio ``dense_latency(job) / method_latency(job)``; the quartiles and extremes of those ratios say how
far to trust it. Slow drift of the machine shows in the dense latencies: :func:`latency_drift` compares the
second half of the run with the first, and :func:`drift_flagged` marks a drift beyond ``DRIFT_TOLERANCE``.

Example:
    >>> s = paired_speedups([2.0, 2.0, 4.0], [1.0, 0.5, 4.0])
    >>> s["speedup"], s["speedup_min"], s["speedup_max"]
    (2.0, 1.0, 4.0)
    >>> latency_drift([1.0, 1.0, 1.2, 1.2]), drift_flagged(1.2)
    (1.2, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vdit_accel.errors import ConfigError

DRIFT_TOLERANCE = 0.10  # dense latency may move by 10% between the halves of a run before it is flagged


def _positive(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"{name} must be a non-empty list of latencies: got shape {arr.shape}")
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ConfigError(f"{name}={arr.tolist()} has a value out of range: accepted latencies in (0.0, inf)")
    return arr


def paired_speedups(dense_latencies: Sequence[float], method_latencies: Sequence[float]) -> dict:
    """Speedup of a point as the median of per-job paired ratios, with their dispersion.

    Args:
        dense_latencies (`Sequence[float]` of length `J`): dense seconds per job, in job order.
        method_latencies (`Sequence[float]` of length `J`): the point's seconds for the same jobs.

    Returns:
        `dict`: ``speedup`` (median ratio), ``speedup_q25`` and ``speedup_q75`` (quartiles, numpy's linear
        interpolation), ``speedup_min``, ``speedup_max`` and ``speedup_ratios`` (the `J` ratios in job order).

    Raises:
        ConfigError: if the lengths differ, a list is empty, or a latency is not a positive finite number.

    Example:
        >>> paired_speedups([1.0, 3.0], [1.0, 1.0])["speedup_ratios"]
        [1.0, 3.0]
    """
    d = _positive("dense_latencies", dense_latencies)
    m = _positive("method_latencies", method_latencies)
    if d.shape != m.shape:
        raise ConfigError(f"paired latencies need one value per job each: got {d.size} dense and {m.size} method")
    r = d / m
    q25, med, q75 = np.percentile(r, [25, 50, 75])
    return {"speedup": float(med), "speedup_q25": float(q25), "speedup_q75": float(q75),
            "speedup_min": float(r.min()), "speedup_max": float(r.max()), "speedup_ratios": r.tolist()}


def latency_drift(latencies: Sequence[float]) -> float | None:
    """Median latency of the run's second half over its first half (the middle job of an odd count is left out).

    Args:
        latencies (`Sequence[float]` of length `J`): one point's latencies in the order they were run.

    Returns:
        `float | None`: the ratio (1.0: no drift; 1.2: 20% slower at the end), or ``None`` for fewer than
        2 latencies (no halves to compare).

    Raises:
        ConfigError: if a latency is not a positive finite number.

    Example:
        >>> latency_drift([1.0, 9.0, 2.0]), latency_drift([3.0])
        (2.0, None)
    """
    arr = _positive("latencies", latencies)
    half = arr.size // 2
    if half == 0:
        return None
    return float(np.median(arr[-half:]) / np.median(arr[:half]))


def drift_flagged(drift: float | None, tolerance: float = DRIFT_TOLERANCE) -> bool:
    """Whether a drift ratio is further than ``tolerance`` from 1 (either way); ``None`` (no halves) is not flagged.

    Example:
        >>> drift_flagged(1.1), drift_flagged(0.85), drift_flagged(None)
        (False, True, False)
    """
    if not tolerance >= 0:
        raise ConfigError(f"tolerance={tolerance!r} is out of range: accepted [0.0, inf)")
    return drift is not None and abs(drift - 1.0) > tolerance + 1e-12


def round_robin_order(labels: Sequence[str], n_jobs: int) -> list[list[str]]:
    """The order points run in, per job: every label once, the start rotated by one each job.

    Rotating keeps any one point from always running right after the warm-up or right after the same neighbour.

    Example:
        >>> round_robin_order(["dense", "a", "b"], 2)
        [['dense', 'a', 'b'], ['a', 'b', 'dense']]
    """
    labels = list(labels)
    if not labels or n_jobs < 1:
        raise ConfigError(f"round_robin_order needs labels and n_jobs >= 1: got {len(labels)} labels, n_jobs={n_jobs}")
    return [labels[j % len(labels):] + labels[:j % len(labels)] for j in range(n_jobs)]


__all__ = ["DRIFT_TOLERANCE", "drift_flagged", "latency_drift", "paired_speedups", "round_robin_order"]
