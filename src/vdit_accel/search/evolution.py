"""Astraea's evolutionary search of per-timestep token budgets (paper §4), generic over a batched fitness.

A genome is one budget per denoising step, ``θ_i`` on a grid (default ``0, 0.1, …, 1``); the first
``dense_steps`` genes are fixed at 1.0. Every candidate is *repaired* so that its mean budget lies in the band
``[target·(1 - tolerance), target·(1 + tolerance)]``. The loop follows the paper: an initial population of
``population`` candidates (the uniform schedule plus random repaired ones), then ``generations`` rounds in which
``children`` candidates are bred from tournament-selected parents by uniform or block crossover, mutation and repair,
and the best ``population`` of parents + children (lower fitness is better) survive. The model is not imported
here: the caller passes ``fitness(genomes [P, num_steps]) -> [P]`` (e.g. MSE to the dense output over 4 prompts).

Choices the paper leaves open: the mutation probability decays *geometrically*,
``p_g = p_start · (p_end / p_start) ** ((g - 1) / (G - 1))`` for ``g = 1..G`` (0.1 → 0.01 spans a decade; a geometric
ramp spends as many generations per halving, ×0.924 per generation for G = 30, where a linear one reaches ~0.01 only
at the end), and a mutated gene moves to one of the *other* grid values, so ``p`` is the true change rate. A genome
already evaluated is never re-evaluated (memoised by its bytes). All randomness comes from one
``np.random.default_rng(seed)`` whose ``bit_generator.state`` is checkpointed as JSON with the parents, cache and
history after every generation, so a resumed run ends bit-identical to an uninterrupted one. Feasibility is decided
exactly when the config is built, before any fitness call, and repair provably reaches the band for every accepted
config.

Why not pymoo or nevergrad (neither is a dependency)? Both could run this, neither would do it better:

- Genes are discrete grid values with a *repair* into a budget band. pymoo's ``GA`` takes integer variables and a
  ``Repair`` hook, but its stock operators (SBX, PM with rounding) are for ordered numbers; the paper's uniform/block
  crossover, grid mutation and repair would be custom operators anyway (most of this module), leaving a ~40-line
  loop to the library. nevergrad handles constraints by penalties (``tell(..., constraint_violation)``) or by
  rejection (``register_cheap_constraint``), not by repair, and its optimisers are not the paper's algorithm, which
  we reproduce before improving on it.
- Each evaluation is several video generations (~950 per search), so optimiser overhead is irrelevant; memoisation,
  batched evaluation and exact resume matter. pymoo checkpoints by pickling the algorithm (dill) and nevergrad by
  pickling the optimiser: tied to library/Python versions and not reviewable. Our JSON state doubles as a record.
- A library *could* win on sample efficiency (e.g. nevergrad's ``NGOpt`` over ``TransitionChoice`` parameters):
  worth an experiment behind an optional import, not a dependency now. :func:`greedy_schedule` is the cheap
  baseline for the paper's open question of whether the EA beats a marginal allocator.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from vdit_accel._faults import fault_point
from vdit_accel.errors import ConfigError

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is optional; only progress=True needs it
    tqdm = None

CROSSOVERS = ("uniform", "block")
DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TOURNAMENT_SIZE = 2  # binary tournament: the better of two uniformly drawn parents
CHECKPOINT_FORMAT = "vdit-accel/evolution-checkpoint"
CHECKPOINT_VERSION = 1
_EPS = 1e-9  # slack on mean-budget comparisons (float sums of grid values)

Fitness = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------------------- config
def _num(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    ok = ok and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:  # also rejects NaN
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{name}={value!r} is out of range: accepted {rng}")
    return float(value)


def _int(name: str, value, lo: int, hi: int | None = None) -> int:
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if not (ok and lo <= value and (hi is None or value <= hi)):
        top = "inf" if hi is None else hi
        raise ConfigError(f"{name}={value!r} is out of range: accepted an int in [{lo}, {top}]")
    return int(value)


@dataclass(frozen=True)
class EvolutionConfig:
    """Settings of :func:`evolve`; the paper's values are the defaults (K = 50, P = 30, 30 generations).

    Args:
        target (`float`): target mean budget ``Θ*`` (fraction of tokens computed), in ``(0, 1]``.
        num_steps (`int`): denoising steps = genes per genome, ``>= 1``.
        grid (`tuple[float, ...]`, *optional*, defaults to `(0.0, 0.1, ..., 1.0)`): allowed budgets, sorted, unique,
            in ``[0, 1]``.
        tolerance (`float`, *optional*, defaults to `0.1`): relative half-width of the budget band, in ``[0, 1)``.
        population (`int`, *optional*, defaults to `50`): initial population and surviving parents, ``>= 2``.
        children (`int`, *optional*, defaults to `30`): new candidates per generation, ``>= 1``.
        generations (`int`, *optional*, defaults to `30`): ``>= 0`` (0: evaluate the initial population only).
        p_mutation_start (`float`, *optional*, defaults to `0.1`): per-gene mutation probability at generation 1.
        p_mutation_end (`float`, *optional*, defaults to `0.01`): the same at the last generation (geometric decay).
        crossover (`tuple[str, ...]`, *optional*, defaults to `("uniform", "block")`): operators drawn uniformly per
            child, from ``CROSSOVERS``.
        dense_steps (`int`, *optional*, defaults to `1`): leading steps fixed at budget 1.0, in ``[0, num_steps)``.
        seed (`int`, *optional*, defaults to `0`): seed of the single random generator, ``>= 0``.

    Raises:
        ConfigError: a value is out of range, or no schedule on the grid has its mean in the band (the message gives
            the achievable range), or the band is narrower than a notch of a non-evenly spaced grid.

    Example:
        >>> EvolutionConfig(target=0.5, num_steps=50).band
        (0.45, 0.55)
        >>> EvolutionConfig(target=0.01, num_steps=50, dense_steps=5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vdit_accel.errors.ConfigError: target=0.01 is infeasible with dense_steps=5 of num_steps=50: ...
    """

    target: float
    num_steps: int
    grid: tuple[float, ...] = DEFAULT_GRID
    tolerance: float = 0.1
    population: int = 50
    children: int = 30
    generations: int = 30
    p_mutation_start: float = 0.1
    p_mutation_end: float = 0.01
    crossover: tuple[str, ...] = CROSSOVERS
    dense_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "target", _num("target", self.target, 0.0, 1.0, lo_open=True))
        put(self, "num_steps", _int("num_steps", self.num_steps, 1))
        grid = tuple(self.grid) if isinstance(self.grid, (tuple, list, np.ndarray)) else ()
        grid = tuple(_num(f"grid[{i}]", g, 0.0, 1.0) + 0.0 for i, g in enumerate(grid))  # + 0.0: no -0.0
        if not grid or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ConfigError(f"grid={self.grid!r} is not accepted: expected sorted unique values in [0, 1]")
        put(self, "grid", grid)
        put(self, "tolerance", _num("tolerance", self.tolerance, 0.0, 1.0, hi_open=True))
        put(self, "population", _int("population", self.population, 2))
        put(self, "children", _int("children", self.children, 1))
        put(self, "generations", _int("generations", self.generations, 0))
        put(self, "p_mutation_start", _num("p_mutation_start", self.p_mutation_start, 0.0, 1.0))
        put(self, "p_mutation_end", _num("p_mutation_end", self.p_mutation_end, 0.0, 1.0))
        ops = tuple(self.crossover) if isinstance(self.crossover, (tuple, list)) else (self.crossover,)
        if not ops or any(op not in CROSSOVERS for op in ops):
            raise ConfigError(f"crossover={self.crossover!r} is not accepted: choose from {list(CROSSOVERS)}")
        put(self, "crossover", ops)
        put(self, "dense_steps", _int("dense_steps", self.dense_steps, 0, self.num_steps - 1))
        put(self, "seed", _int("seed", self.seed, 0))
        self._check_feasible()

    @property
    def band(self) -> tuple[float, float]:
        """The accepted mean-budget interval ``(target·(1 - tolerance), target·(1 + tolerance))``."""
        return self.target * (1 - self.tolerance), self.target * (1 + self.tolerance)

    def _check_feasible(self) -> None:
        t, d, g = self.num_steps, self.dense_steps, self.grid
        m, (lo, hi), eps = t - d, self.band, _EPS * t
        s_min, s_max = d + m * g[0], d + m * g[-1]
        where = f"target={self.target!r} is infeasible with dense_steps={d} of num_steps={t}"
        band = f"band [{lo:.6g}, {hi:.6g}] (tolerance={self.tolerance!r})"
        if hi * t < s_min - eps or lo * t > s_max + eps:
            span = f"[{s_min / t:.6g}, {s_max / t:.6g}]"
            raise ConfigError(f"{where}: achievable mean budgets are {span}, outside the {band}")
        gaps = np.diff(g)
        if gaps.size == 0:
            return
        if not np.allclose(gaps, gaps[0], rtol=0.0, atol=_EPS):
            if (hi - lo) * t < gaps.max() - eps:
                raise ConfigError(
                    f"tolerance={self.tolerance!r} is too tight for the unevenly spaced grid {list(g)}: the {band} "
                    f"must be at least one grid notch wide ({gaps.max():.6g}/num_steps = {gaps.max() / t:.6g}) for "
                    "repair to reach it; widen it or use an evenly spaced grid"
                )
            return
        step = gaps[0]  # evenly spaced: achievable sums are s_min + k·step, k = 0..m·(len(grid) - 1)
        k_lo, k_hi = math.ceil((lo * t - s_min) / step - _EPS), math.floor((hi * t - s_min) / step + _EPS)
        if max(k_lo, 0) > min(k_hi, m * gaps.size):
            raise ConfigError(
                f"{where}: achievable mean budgets are the multiples of {step / t:.6g} in [{s_min / t:.6g}, "
                f"{s_max / t:.6g}] and none lies in the {band}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``EvolutionConfig.from_dict(cfg.to_dict()) == cfg``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvolutionConfig:
        """Build from a dict, rejecting unknown keys (values are validated as usual).

        Example:
            >>> EvolutionConfig.from_dict({"target": 0.5, "num_steps": 10, "grid": [0.0, 0.5, 1.0]}).grid
            (0.0, 0.5, 1.0)
        """
        if not isinstance(data, dict):
            raise ConfigError(f"an EvolutionConfig must be a JSON object (a dict of its fields), not {data!r:.60}")
        unknown = sorted(str(k) for k in set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"keys {unknown} are not accepted: fields are {[f.name for f in fields(cls)]}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise ConfigError(f"keys {missing} are missing: an EvolutionConfig needs them")
        return cls(**data)


# ------------------------------------------------------------------------------------------------------ operators
def _snap(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Grid index nearest to each value (ties go to the lower grid value)."""
    return np.abs(values[:, None] - grid[None, :]).argmin(axis=1)


def _to_genome(idx: np.ndarray, cfg: EvolutionConfig) -> np.ndarray:
    return np.concatenate([np.ones(cfg.dense_steps), np.asarray(cfg.grid)[idx]])


def repair(genome: np.ndarray, cfg: EvolutionConfig, rng: np.random.Generator) -> np.ndarray:
    """Snap a genome to the grid and move random genes one notch at a time until its mean is in the band.

    The dense genes are set to 1.0 and every other gene to its nearest grid value. While the mean is below
    (above) the band, one gene is drawn uniformly among those whose one-notch raise (lowering) brings the mean
    strictly closer to the band, and moved. For an evenly spaced grid every such move helps and the achievable sums
    form a lattice, so the walk ends in the band whenever the config is feasible; for other grids the config
    requires the band to be at least one notch wide, so a move never jumps over it. Deterministic given ``rng``.

    Args:
        genome (`np.ndarray` of shape `[num_steps]`): candidate budgets, any finite values.
        cfg (`EvolutionConfig`): grid, band and dense steps.
        rng (`np.random.Generator`): source of the random gene choices.

    Returns:
        `np.ndarray` of shape `[num_steps]`, float64 grid values (1.0 for dense steps), mean within ``cfg.band``.

    Example:
        >>> cfg = EvolutionConfig(target=0.3, num_steps=10, dense_steps=1)
        >>> g = repair(np.full(10, 0.93), cfg, np.random.default_rng(0))
        >>> bool(cfg.band[0] <= g.mean() <= cfg.band[1]), float(g[0])
        (True, 1.0)
    """
    g = np.asarray(genome, dtype=np.float64)
    if g.shape != (cfg.num_steps,) or not np.isfinite(g).all():
        raise ConfigError(f"genome of shape {g.shape} is not accepted: expected {cfg.num_steps} finite values")
    grid, d, t = np.asarray(cfg.grid), cfg.dense_steps, cfg.num_steps
    lo, hi = cfg.band[0] * t, cfg.band[1] * t
    eps = _EPS * t
    idx = _snap(g[d:], grid)
    while True:
        total = d + grid[idx].sum()
        if total < lo - eps:
            nxt, movable = np.minimum(idx + 1, grid.size - 1), idx < grid.size - 1
        elif total > hi + eps:
            nxt, movable = np.maximum(idx - 1, 0), idx > 0
        else:
            return _to_genome(idx, cfg)
        new_total = total + grid[nxt] - grid[idx]
        new_dist = np.maximum(np.maximum(lo - new_total, new_total - hi), 0.0)
        cand = np.flatnonzero(movable & (new_dist < max(lo - total, total - hi) - eps))
        if cand.size == 0:  # unreachable for a validated config
            raise ConfigError(f"repair cannot reach the band {cfg.band} from mean {total / t:.6g} on grid {cfg.grid}")
        j = cand[rng.integers(cand.size)]
        idx[j] = nxt[j]


def uniform_crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Child taking each gene from ``a`` or ``b`` with probability 1/2 (repair follows in :func:`evolve`).

    Args:
        a (`np.ndarray` of shape `[num_steps]`): first parent.
        b (`np.ndarray` of shape `[num_steps]`): second parent.
        rng (`np.random.Generator`): source of the gene choices.

    Returns:
        `np.ndarray` of shape `[num_steps]`.

    Example:
        >>> set(uniform_crossover(np.zeros(6), np.ones(6), np.random.default_rng(0)).tolist()) <= {0.0, 1.0}
        True
    """
    return np.where(rng.random(a.shape[0]) < 0.5, a, b)


def block_crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copy of ``a`` with one contiguous non-empty step range ``[i, j)`` taken from ``b`` (``i``, then ``j > i``,
    drawn uniformly): swaps a whole phase of the schedule, e.g. the early high-noise steps.

    Args:
        a (`np.ndarray` of shape `[num_steps]`): parent giving the genes outside the block.
        b (`np.ndarray` of shape `[num_steps]`): parent giving the block.
        rng (`np.random.Generator`): source of ``i`` and ``j``.

    Returns:
        `np.ndarray` of shape `[num_steps]`.

    Example:
        >>> block_crossover(np.zeros(6), np.ones(6), np.random.default_rng(0)).tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    """
    i = int(rng.integers(a.shape[0]))
    j = int(rng.integers(i + 1, a.shape[0] + 1))
    child = a.copy()
    child[i:j] = b[i:j]
    return child


_CROSSOVER_FNS = {"uniform": uniform_crossover, "block": block_crossover}


def mutate(genome: np.ndarray, p: float, cfg: EvolutionConfig, rng: np.random.Generator) -> np.ndarray:
    """Move each non-dense gene, with probability ``p``, to a uniformly drawn *other* grid value (snapped first).

    Args:
        genome (`np.ndarray` of shape `[num_steps]`): candidate budgets.
        p (`float`): per-gene mutation probability (:func:`mutation_probability`).
        cfg (`EvolutionConfig`): grid and dense steps (dense genes are reset to 1.0, never mutated).
        rng (`np.random.Generator`): source of the mutations.

    Returns:
        `np.ndarray` of shape `[num_steps]`, grid values; its mean may leave the band until :func:`repair`.

    Example:
        >>> cfg = EvolutionConfig(target=0.5, num_steps=4, dense_steps=0)
        >>> mutate(np.full(4, 0.5), 0.0, cfg, np.random.default_rng(0)).tolist()
        [0.5, 0.5, 0.5, 0.5]
    """
    grid, d = np.asarray(cfg.grid), cfg.dense_steps
    idx = _snap(np.asarray(genome, dtype=np.float64)[d:], grid)
    hit = rng.random(idx.size) < p
    other = rng.integers(max(grid.size - 1, 1), size=idx.size)
    other = other + (other >= idx)  # skip the current value
    return _to_genome(np.where(hit & (grid.size > 1), other, idx), cfg)


def mutation_probability(generation: int, cfg: EvolutionConfig) -> float:
    """Per-gene mutation probability at ``generation`` (1-based): geometric from ``p_mutation_start`` to ``_end``.

    Falls back to a linear ramp when either end is 0 (a geometric ramp cannot reach or leave 0).

    Example:
        >>> cfg = EvolutionConfig(target=0.5, num_steps=10, generations=3)
        >>> [round(mutation_probability(g, cfg), 4) for g in (1, 2, 3)]
        [0.1, 0.0316, 0.01]
    """
    p0, p1, n = cfg.p_mutation_start, cfg.p_mutation_end, cfg.generations
    frac = 0.0 if n <= 1 else min(max((generation - 1) / (n - 1), 0.0), 1.0)
    if p0 == 0.0 or p1 == 0.0:
        return p0 + (p1 - p0) * frac
    return p0 * (p1 / p0) ** frac


# ------------------------------------------------------------------------------------------------------ baselines
def uniform_schedule(cfg: EvolutionConfig) -> np.ndarray:
    """The same budget at every non-dense step, as close to the target mean as the grid allows.

    The ideal per-step value ``u = (target·T - dense_steps) / (T - dense_steps)`` is split between its two
    neighbouring grid values, the higher one spread evenly over the steps, then repaired (seeded by ``cfg.seed``).

    Returns:
        `np.ndarray` of shape `[num_steps]`.

    Example:
        >>> uniform_schedule(EvolutionConfig(target=0.5, num_steps=5, dense_steps=1)).tolist()
        [1.0, 0.3, 0.4, 0.4, 0.4]
    """
    grid, t, d = np.asarray(cfg.grid), cfg.num_steps, cfg.dense_steps
    m = t - d
    u = min(max((cfg.target * t - d) / m, grid[0]), grid[-1])
    j = int(np.searchsorted(grid, u - _EPS))
    if j == 0 or abs(grid[min(j, grid.size - 1)] - u) <= _EPS:
        values = np.full(m, grid[min(j, grid.size - 1)])
    else:
        a, b = grid[j - 1], grid[j]
        c = math.floor((u - a) / (b - a) * m + 0.5)  # genes at the higher value
        high = np.floor(np.arange(1, m + 1) * c / m) > np.floor(np.arange(m) * c / m)
        values = np.where(high, b, a)
    return repair(np.concatenate([np.ones(d), values]), cfg, np.random.default_rng(cfg.seed))


def greedy_schedule(step_cost: Callable[[int, float], float] | np.ndarray, cfg: EvolutionConfig) -> np.ndarray:
    """Marginal-analysis allocator: raise the step with the best error reduction per unit budget until the target.

    Starts with every non-dense step at the lowest grid value and repeatedly raises by one notch the step whose
    raise reduces the estimated error most per unit of budget, ``(err[i, j] - err[i, j+1]) / (grid[j+1] - grid[j])``
    (ties: lowest step), among raises that keep the mean within the band's upper edge, until the mean reaches the
    target. Raises are taken even when they do not reduce the error, since the budget is the constraint. The error
    of a schedule is assumed additive over steps; under that assumption, and with each row convex and decreasing
    in the budget, this greedy is optimal at every budget level (the classic resource-allocation result). A
    non-reachable band is closed by :func:`repair` (seeded by ``cfg.seed``).

    Args:
        step_cost (`Callable[[int, float], float]` or `np.ndarray` of shape `[num_steps, len(grid)]`): estimated
            error ``err[step, grid_index]`` of running ``step`` at budget ``grid[grid_index]`` with every other step
            dense (e.g. the measured MSE of skipping that share of tokens at that step). Dense rows are ignored.
        cfg (`EvolutionConfig`): target, grid and dense steps.

    Returns:
        `np.ndarray` of shape `[num_steps]`, mean within ``cfg.band``.

    Example:
        >>> cfg = EvolutionConfig(target=0.5, num_steps=3, dense_steps=0, grid=(0.0, 0.5, 1.0), tolerance=0.0)
        >>> err = np.array([[9.0, 1.0, 0.0], [1.0, 0.5, 0.0], [4.0, 2.0, 0.0]])
        >>> greedy_schedule(err, cfg).tolist()
        [0.5, 0.0, 1.0]
    """
    grid, t, d = np.asarray(cfg.grid), cfg.num_steps, cfg.dense_steps
    if callable(step_cost):
        err = np.zeros((t, grid.size))
        err[d:] = [[float(step_cost(i, float(v))) for v in grid] for i in range(d, t)]
    else:
        err = np.asarray(step_cost, dtype=np.float64)
    if err.shape != (t, grid.size) or not np.isfinite(err[d:]).all():
        raise ConfigError(f"step_cost of shape {err.shape} is not accepted: expected finite [{t}, {grid.size}]")
    idx = np.zeros(t - d, dtype=np.int64)
    rows = np.arange(d, t)
    eps = _EPS * t
    while (total := d + grid[idx].sum()) < cfg.target * t - eps:
        up = np.minimum(idx + 1, grid.size - 1)
        inc = grid[up] - grid[idx]
        ok = (idx < grid.size - 1) & (total + inc <= cfg.band[1] * t + eps)
        if not ok.any():
            break
        gain = np.where(ok, (err[rows, idx] - err[rows, up]) / np.where(ok, inc, 1.0), -np.inf)
        j = int(np.argmax(gain))
        idx[j] = up[j]
    return repair(_to_genome(idx, cfg), cfg, np.random.default_rng(cfg.seed))


# ------------------------------------------------------------------------------------------------------ the search
@dataclass(frozen=True)
class SearchResult:
    """Outcome of :func:`evolve`.

    Args:
        best_genome (`list[float]`): the lowest-fitness schedule found, one budget per step.
        best_fitness (`float`): its fitness.
        history (`list[dict]`): one record per generation (0 = initial population) with keys ``generation``,
            ``best`` and ``mean`` (fitness of the surviving parents) and ``evaluations`` (cumulative).
        evaluations (`int`): fitness evaluations made (memoised duplicates not counted).
        cfg (`EvolutionConfig`): the config searched with.
    """

    best_genome: list[float]
    best_fitness: float
    history: list[dict]
    evaluations: int
    cfg: EvolutionConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (e.g. a preset's ``record``)."""
        return {**asdict(self), "cfg": self.cfg.to_dict()}


class _Evaluator:
    """Batched, memoised fitness: each distinct genome is evaluated once per run (cache keyed by its bytes)."""

    def __init__(self, fitness: Fitness, cache: dict[bytes, float]):
        self.fitness, self.cache = fitness, cache

    def __call__(self, genomes: np.ndarray) -> np.ndarray:
        keys = [g.tobytes() for g in genomes]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            batch = np.stack([np.frombuffer(k, dtype=np.float64) for k in todo])  # [P, num_steps], a fresh copy
            values = np.asarray(self.fitness(batch), dtype=np.float64)
            if values.shape != (len(todo),):
                raise ConfigError(f"fitness returned shape {values.shape} for {len(todo)} genomes: expected [P]")
            if np.isnan(values).any() or np.isneginf(values).any():
                raise ConfigError(f"fitness returned {values.tolist()}: accepted finite values or +inf (lower wins)")
            self.cache.update(zip(todo, values.tolist()))
        return np.array([self.cache[k] for k in keys])


def _survivors(pool: np.ndarray, fit: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best distinct genomes, sorted by fitness (stable: earlier entries win ties)."""
    first: dict[bytes, int] = {}
    for i, g in enumerate(pool):
        first.setdefault(g.tobytes(), i)
    keep = np.fromiter(first.values(), dtype=np.int64)  # insertion order: ascending
    order = keep[np.argsort(fit[keep], kind="stable")[:n]]
    return pool[order], fit[order]


Repair = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _initial_population(cfg: EvolutionConfig, rng: np.random.Generator, fix: Repair,
                        seeds: list[np.ndarray] | None = None) -> np.ndarray:
    """Seed genomes (default: the uniform schedule) plus random repaired genomes, distinct, up to ``population``
    (fewer if the band is small)."""
    seeds = [uniform_schedule(cfg)] if seeds is None else [fix(np.asarray(g, dtype=np.float64), rng) for g in seeds]
    pop = {g.tobytes(): None for g in seeds}
    grid, d = np.asarray(cfg.grid), cfg.dense_steps
    for _ in range(20 * cfg.population):
        if len(pop) >= cfg.population:
            break
        idx = rng.integers(grid.size, size=cfg.num_steps - d)
        pop.setdefault(fix(_to_genome(idx, cfg), rng).tobytes(), None)
    return np.stack([np.frombuffer(k, dtype=np.float64) for k in pop])


def _child(parents: np.ndarray, p: float, cfg: EvolutionConfig, rng: np.random.Generator, fix: Repair) -> np.ndarray:
    a, b = (parents[rng.integers(len(parents), size=TOURNAMENT_SIZE).min()] for _ in range(2))  # parents are sorted
    op = cfg.crossover[int(rng.integers(len(cfg.crossover)))]
    return fix(mutate(_CROSSOVER_FNS[op](a, b, rng), p, cfg, rng), rng)


def _save(
    path: Path,
    cfg: EvolutionConfig,
    generation: int,
    rng: np.random.Generator,
    parents: np.ndarray,
    parent_fit: np.ndarray,
    history: list[dict],
    cache: dict[bytes, float],
    identity: dict | None = None,
) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "identity": identity,
        "generation": generation,
        "rng_state": rng.bit_generator.state,
        "parents": parents.tolist(),
        "parent_fitness": parent_fit.tolist(),
        "history": history,
        "cache": [[f, np.frombuffer(k, dtype=np.float64).tolist()] for k, f in cache.items()],
    }
    state["digest"] = _digest(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    fault_point("search_write")
    os.replace(tmp, path)


def _digest(state: dict) -> str:
    """SHA-256 of a checkpoint body without its own ``digest`` (canonical JSON): flipped bytes are detected."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load(path: Path, cfg: EvolutionConfig, identity: dict | None = None):
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
        ok = state["format"] == CHECKPOINT_FORMAT and state["version"] == CHECKPOINT_VERSION
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:  # ValueError: JSONDecodeError
        raise ConfigError(f"checkpoint {str(path)!r} is not a readable evolution checkpoint: {err!r}; delete it "
                          "to restart the search") from err
    if "digest" in state and state["digest"] != _digest(state):
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt (its SHA-256 does not match its content): delete it "
                          "to restart the search")
    if not ok:
        raise ConfigError(
            f"checkpoint {str(path)!r} has format/version {state['format']!r}/{state['version']!r}: "
            f"accepted {CHECKPOINT_FORMAT!r}/{CHECKPOINT_VERSION}"
        )
    saved = EvolutionConfig.from_dict(state["config"])
    if saved != cfg:
        diff = [
            f"{f.name}={getattr(saved, f.name)!r} there, {getattr(cfg, f.name)!r} here"
            for f in fields(cfg)
            if getattr(saved, f.name) != getattr(cfg, f.name)
        ]
        raise ConfigError(
            f"checkpoint {str(path)!r} was written for another config ({'; '.join(diff)}): "
            "delete it or pass the same config to resume"
        )
    if state.get("identity") != (None if identity is None else json.loads(json.dumps(identity))):
        raise ConfigError(
            f"checkpoint {str(path)!r} was written for another search problem (identity {state.get('identity')!r}, "
            f"here {identity!r}): delete it or pass the same problem to resume"
        )
    bit_gen = np.random.PCG64()
    bit_gen.state = state["rng_state"]
    cache = {np.asarray(g, dtype=np.float64).tobytes(): float(f) for f, g in state["cache"]}
    parents = np.asarray(state["parents"], dtype=np.float64).reshape(-1, cfg.num_steps)
    fit = np.asarray(state["parent_fitness"], dtype=np.float64)
    return state["generation"], np.random.Generator(bit_gen), parents, fit, state["history"], cache


def evolve(
    fitness: Fitness,
    cfg: EvolutionConfig,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    on_generation: Callable[[dict], None] | None = None,
    repair_fn: Repair | None = None,
    seed_genomes: list[np.ndarray] | None = None,
    identity: dict | None = None,
) -> SearchResult:
    """Search a per-step budget schedule minimising ``fitness`` under the mean-budget band (paper §4).

    Generation 0 evaluates the initial population (uniform schedule + random repaired genomes) and keeps the best
    ``population``. Each generation ``g >= 1`` breeds ``children`` candidates: two parents by binary tournament,
    uniform or block crossover (drawn per child from ``cfg.crossover``), mutation at
    :func:`mutation_probability` ``(g)``, repair. Parents and children are pooled, deduplicated, and the best
    ``population`` survive. Genomes already evaluated in this run (or in the checkpoint) are not re-evaluated.

    Args:
        fitness (`Callable[[np.ndarray], np.ndarray]`): maps genomes `[P, num_steps]` (float64, a copy) to fitness
            `[P]`, lower is better; finite or ``+inf``. Called at most once per generation, with the distinct genomes
            not evaluated before.
        cfg (`EvolutionConfig`): search settings (validated, feasibility included, before any fitness call).
        checkpoint (`str | Path`, *optional*): JSON file written (atomically) after every generation; if it exists,
            the search resumes from it and ends with the result an uninterrupted run would have had.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over generations.
        on_generation (`Callable[[dict], None]`, *optional*): called with each generation's history record after
            its checkpoint is written; an exception it raises stops the search (resumable).
        repair_fn (`Callable[[np.ndarray, np.random.Generator], np.ndarray]`, *optional*): replaces the mean-budget
            :func:`repair` everywhere (initial population and children), e.g. a latency-model repair of a
            choice-index genome (:class:`vdit_accel.search.joint.JointCoding`); must return grid values with the
            dense genes at 1.0. Default: ``repair(g, cfg, rng)``.
        seed_genomes (`list[np.ndarray]`, *optional*): genomes starting the initial population (repaired); default
            the uniform schedule.
        identity (`dict`, *optional*): JSON-able description of the problem beyond ``cfg`` (e.g. the latency model
            and target speedup), stored in the checkpoint; resuming with another identity raises.

    Returns:
        `SearchResult`.

    Example:
        >>> cfg = EvolutionConfig(target=0.5, num_steps=8, population=8, children=6, generations=5, seed=1)
        >>> best = np.array([1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0])
        >>> res = evolve(lambda g: ((g - best) ** 2).sum(axis=1), cfg, progress=False)
        >>> res.best_fitness <= res.history[0]["best"], len(res.history)
        (True, 6)
    """
    if not isinstance(cfg, EvolutionConfig):
        raise ConfigError(f"cfg={cfg!r} is not accepted: expected an EvolutionConfig")
    if progress and tqdm is None:
        raise ConfigError("progress=True needs tqdm (pip install tqdm); pass progress=False to run without it")
    path = None if checkpoint is None else Path(checkpoint)
    fix: Repair = repair_fn if repair_fn is not None else (lambda g, r: repair(g, cfg, r))
    if path is not None and path.exists():
        generation, rng, parents, parent_fit, history, cache = _load(path, cfg, identity)
        evaluate = _Evaluator(fitness, cache)
    else:
        rng = np.random.default_rng(cfg.seed)
        evaluate = _Evaluator(fitness, {})
        initial = _initial_population(cfg, rng, fix, seed_genomes)
        parents, parent_fit = _survivors(initial, evaluate(initial), cfg.population)
        generation, history = 0, []
    bar = tqdm(total=cfg.generations, initial=generation, desc="budget search", unit="gen") if progress else None
    try:
        while True:
            if generation == len(history):  # a generation just finished (or the initial population)
                record = {
                    "generation": generation,
                    "best": float(parent_fit[0]),
                    "mean": float(parent_fit.mean()),
                    "evaluations": len(evaluate.cache),
                }
                history.append(record)
                if path is not None:
                    _save(path, cfg, generation, rng, parents, parent_fit, history, evaluate.cache, identity)
                if bar is not None:
                    bar.set_postfix(best=f"{record['best']:.4g}", evals=record["evaluations"])
                if on_generation is not None:
                    on_generation(dict(record))
            if generation >= cfg.generations:
                break
            generation += 1
            p = mutation_probability(generation, cfg)
            kids = np.stack([_child(parents, p, cfg, rng, fix) for _ in range(cfg.children)])
            pool, pool_fit = np.concatenate([parents, kids]), np.concatenate([parent_fit, evaluate(kids)])
            parents, parent_fit = _survivors(pool, pool_fit, cfg.population)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return SearchResult(
        best_genome=parents[0].tolist(),
        best_fitness=float(parent_fit[0]),
        history=history,
        evaluations=len(evaluate.cache),
        cfg=cfg,
    )
