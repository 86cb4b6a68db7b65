"""A measured latency model: the cost of one denoising step for each per-step choice, relative to a dense step.

Joint schedules (budget and forecast order per step) are searched under a *time* constraint, not a mean budget:
each choice ``(budget, order)`` has a relative step cost measured by the real-width step benchmark
(``vdit-accel bench-step``) at a stated geometry and hardware, and a schedule's predicted speedup is
``num_steps / sum(cost(choice_i))``. The model is a versioned JSON artifact (``vdit-accel/latency-model``)
that records where its numbers came from; presets searched with it copy that record.

Example:
    >>> lm = LatencyModel(costs={(1.0, 0): 1.0, (0.5, 0): 0.55, (0.0, 0): 0.01, (0.0, 1): 0.012},
    ...                   kv_reuse=True, geometry={"grid": [4, 24, 40]}, hardware={"cpu": "x"}, dense_step_s=2.0)
    >>> round(lm.cost(StepChoice(0.25, 0)), 3)  # linear between measured budgets of the same order
    0.28
    >>> round(lm.speedup([StepChoice(1.0), StepChoice(0.0, 1)]), 3)
    1.976
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdit_accel.errors import ConfigError, WeightsError

LATENCY_FORMAT = "vdit-accel/latency-model"
LATENCY_VERSION = 1
MAX_ORDER = 2


@dataclass(frozen=True, order=True)
class StepChoice:
    """What one denoising step does: the token ``budget`` computed per block and the forecast ``order``
    (0: unselected rows take the cached block output; 1 or 2: its Taylor extrapolation)."""

    budget: float
    order: int = 0

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0:
            raise ConfigError(f"budget={b!r} is out of range: accepted [0.0, 1.0]")
        if isinstance(self.order, bool) or self.order not in range(MAX_ORDER + 1):
            raise ConfigError(f"order={self.order!r} is out of range: accepted an int in [0, {MAX_ORDER}]")
        object.__setattr__(self, "budget", float(b))
        if b >= 1.0:
            object.__setattr__(self, "order", 0)  # nothing is forecast when every row is computed


@dataclass(frozen=True)
class LatencyModel:
    """Relative step cost per :class:`StepChoice`, measured at one geometry on one machine.

    Args:
        costs (`dict[tuple[float, int], float]`): ``(budget, order) -> step time / dense step time``; must hold
            ``(1.0, 0)``. Budgets between measured ones of the same order are interpolated linearly.
        kv_reuse (`bool`): whether the measured Astraea steps reused cached K/V rows.
        geometry (`dict`): model width, layers, token grid, dtype and device the costs were measured at.
        hardware (`dict`): machine description.
        dense_step_s (`float`): seconds of one dense step at that geometry (for reference).
        command (`str`): the command that measured it.
    """

    costs: dict
    kv_reuse: bool
    geometry: dict
    hardware: dict
    dense_step_s: float
    command: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        costs = {}
        for key, value in self.costs.items():
            choice = StepChoice(*key)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ConfigError(f"cost of {key}={value!r} is out of range: accepted a finite float > 0")
            costs[(choice.budget, choice.order)] = float(value)
        if (1.0, 0) not in costs:
            raise ConfigError("a latency model must measure the dense step (budget 1.0, order 0)")
        object.__setattr__(self, "costs", costs)

    def orders(self) -> list[int]:
        return sorted({o for _, o in self.costs})

    def cost(self, choice: StepChoice) -> float:
        """Relative cost of one step.

        Budgets between measured ones of the same order are interpolated linearly (every order meets the dense
        step at budget 1). Where an order was measured at budget 0 only, its forecast overhead is taken as
        proportional to the unselected share: ``cost(b, o) = cost(b, 0) + (1 - b)·(cost(0, o) - cost(0, 0))``.

        Raises:
            ConfigError: the order was not measured, or the budget lies outside its measured range.
        """
        if choice.budget >= 1.0:
            return self.costs[(1.0, 0)]
        pts = sorted((b, c) for (b, o), c in self.costs.items() if o == choice.order and b < 1.0)
        if not pts:
            raise ConfigError(f"the latency model measured no step of order {choice.order}: measured orders "
                              f"{self.orders()}")
        if choice.order > 0 and [b for b, _ in pts] == [0.0] and (0.0, 0) in self.costs:
            extra = self.costs[(0.0, choice.order)] - self.costs[(0.0, 0)]
            return self.cost(StepChoice(choice.budget, 0)) + (1.0 - choice.budget) * extra
        pts.append((1.0, self.costs[(1.0, 0)]))
        xs, ys = zip(*pts)
        if not xs[0] - 1e-9 <= choice.budget <= xs[-1] + 1e-9:
            raise ConfigError(f"budget={choice.budget} of order {choice.order} is outside the measured budgets "
                              f"[{xs[0]}, {xs[-1]}]")
        return float(np.interp(choice.budget, xs, ys))

    def total(self, choices: list[StepChoice]) -> float:
        """Predicted time of a schedule in dense-step units."""
        return float(sum(self.cost(c) for c in choices))

    def speedup(self, choices: list[StepChoice]) -> float:
        """Predicted speedup of a schedule against the dense schedule of the same length."""
        return len(choices) * self.costs[(1.0, 0)] / self.total(choices)

    def to_dict(self) -> dict:
        return {
            "format": LATENCY_FORMAT, "version": LATENCY_VERSION, "kv_reuse": self.kv_reuse,
            "geometry": self.geometry, "hardware": self.hardware, "dense_step_s": self.dense_step_s,
            "command": self.command, "extra": self.extra,
            "costs": [{"budget": b, "order": o, "relative_cost": c} for (b, o), c in sorted(self.costs.items())],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: dict) -> LatencyModel:
        if not isinstance(d, dict) or d.get("format") != LATENCY_FORMAT or d.get("version") != LATENCY_VERSION:
            raise WeightsError(f"not a {LATENCY_FORMAT} v{LATENCY_VERSION} document")
        try:
            costs = {(float(c["budget"]), int(c["order"])): c["relative_cost"] for c in d["costs"]}
            return cls(costs=costs, kv_reuse=bool(d["kv_reuse"]), geometry=dict(d["geometry"]),
                       hardware=dict(d["hardware"]), dense_step_s=float(d["dense_step_s"]),
                       command=str(d.get("command", "")), extra=dict(d.get("extra", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"malformed {LATENCY_FORMAT} document: {e!r}") from e

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"latency model {str(path)!r} cannot be read: {e}") from e
        return cls.from_dict(data)
