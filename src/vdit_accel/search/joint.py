"""Joint Astraea schedules (token budget and forecast order per step) under a *measured* latency budget.

A joint schedule is one :class:`~vdit_accel.search.latency.StepChoice` per denoising step: the token budget
(0 = whole-step reuse, every block takes its cache or forecast) and the Taylor order of the unselected rows. Its
constraint is time, not a mean budget: ``LatencyModel.speedup(choices) >= target_speedup``, with the per-choice
step costs measured by the step benchmark at the target geometry on the target hardware.

Four allocators share one calibration artifact, the **teacher-forced segment error table**:

- The dense trajectory is run once on the calibration prompts, keeping each step's latent ``x_k`` (and so the dense
  velocity ``v_k = (x_{k+1} - x_k) / dt_k``; the sampler is flow-matching Euler).
- For each start step ``i`` and choice ``c``, the transformer is run from the *dense* latents: full compute at
  ``i`` (preceded by ``order(c)`` full warm-up steps so a Taylor forecast has its history), then steps ``i+1 ..
  i+L-1`` at ``c``. Step ``k``'s error is ``mean((dt_k · (v̂_k − v_k))²)``, the squared displacement it adds to the
  latent under the sampler's update. The error of the segment "full at ``i``, ``c`` on ``i+1..j-1``, full at ``j``"
  is the sum over its steps (one run of ``L`` calls gives every segment starting at ``i``).
- Approximation (documented, as in LeMiCa/DPCache): inputs are the dense latents, so an error's propagation through
  later steps is ignored and errors of separate segments add; the forecast history comes from dense steps.

Allocators: :func:`dp_schedule` (shortest path over fully computed steps with a discretised cost axis; exact for the
table's additive segment model), :func:`greedy_schedule_joint` (marginal descent from the dense schedule),
:func:`uniform_joint` (one choice at every non-dense step, the costliest meeting the target) and the evolutionary
search of :mod:`vdit_accel.search.evolution` on a choice-index genome with a latency repair (:class:`JointCoding`).
:func:`run_joint_search` runs them, evaluates every schedule with full generations on :data:`SELECTION_PROMPTS`
(training-distribution prompts, disjoint from the calibration and the bench's held-out prompts) and keeps the best.

Example:
    >>> lm = LatencyModel(costs={(1.0, 0): 1.0, (0.0, 0): 0.05, (0.5, 0): 0.55}, kv_reuse=False, geometry={},
    ...                   hardware={}, dense_step_s=1.0)
    >>> choices = choice_set(lm, budgets=(0.0, 0.5, 1.0), orders=(0,))
    >>> [(c.budget, c.order) for c in choices]
    [(0.0, 0), (0.5, 0), (1.0, 0)]
    >>> table = ErrorTable.from_arrays(choices[:-1], np.full((4, 2, 3), 1.0), dense_steps=1)
    >>> sched = dp_schedule(table, lm, target_speedup=1.5)
    >>> round(lm.speedup(sched), 3) >= 1.5
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vdit_accel._faults import fault_point
from vdit_accel.errors import ConfigError
from vdit_accel.search.latency import LatencyModel, StepChoice

logger = logging.getLogger(__name__)

DEFAULT_BUDGETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
DEFAULT_ORDERS = (0, 1, 2)
DEFAULT_MAX_SEGMENT = 6
DP_RESOLUTION = 200  # cost bins per dense step in the DP
TABLE_FORMAT = "vdit-accel/segment-error-table"
TABLE_VERSION = 1
ALLOCATORS = ("dp", "greedy", "uniform", "evolution")
TABLE_ALLOCATORS = ("dp", "greedy")  # the allocators that need the segment-error table (embedded sampler only)
FULL = StepChoice(1.0, 0)
_EPS = 1e-9

# Training-distribution prompts for choosing between allocators: not in CALIBRATION_PROMPTS (the table and the
# evolution's fitness) and not held-out combinations (the bench). Checked in tests/test_search_joint.py.
SELECTION_PROMPTS = (  # drawn by instrument.dataset.sample_spec(np.random.default_rng(2026)), held-out ones skipped
    "a red triangle moves up and a green circle moves up on a gray gradient background",
    "a blue square moves down on a gray background",
    "a blue circle moves right on a brown textured background",
    "a green cross shrinks on a blue gradient background",
)


# --------------------------------------------------------------------------------------------- choices, schedules
def choice_set(latency: LatencyModel | None = None, budgets: Sequence[float] = DEFAULT_BUDGETS,
               orders: Sequence[int] = DEFAULT_ORDERS) -> tuple[StepChoice, ...]:
    """Budgets x orders (budget 1 only with order 0), restricted to what ``latency`` can cost, sorted by cost.

    Sorted by (predicted cost, budget, order) when a latency model is given, else by (budget, order); the dense
    choice ``(1.0, 0)`` is always last (the most expensive).
    """
    seen = {StepChoice(float(b), int(o)) for b in budgets for o in orders}
    seen.add(FULL)
    out = []
    for c in seen:
        if latency is not None:
            try:
                latency.cost(c)
            except ConfigError:
                continue
        out.append(c)
    key = (lambda c: (latency.cost(c), c.budget, c.order)) if latency is not None else (lambda c: (c.budget, c.order))
    out = sorted(out, key=key)
    if out[-1] != FULL:
        raise ConfigError(f"the dense step must be the costliest choice; got {out[-1]} last under the latency model")
    return tuple(out)


def schedule_to_config(choices: Sequence[StepChoice], base):
    """An ``AstraeaConfig`` (``budgets`` + per-step ``forecast``) running ``choices``; other fields from ``base``.

    Example:
        >>> from vdit_accel.methods.astraea import AstraeaConfig
        >>> cfg = schedule_to_config([StepChoice(1.0), StepChoice(0.0, 1)], AstraeaConfig(num_steps=2))
        >>> config_to_schedule(cfg) == [StepChoice(1.0), StepChoice(0.0, 1)]
        True
    """
    choices = list(choices)
    orders = tuple(c.order for c in choices)
    axis = base.forecast_axis if any(orders) else "step"  # no step extrapolates: the axis is moot (and refused)
    return dataclasses.replace(base, budgets=tuple(c.budget for c in choices), forecast=orders, target=None,
                               num_steps=len(choices), forecast_axis=axis)


def config_to_schedule(config) -> list[StepChoice]:
    """The per-step choices an ``AstraeaConfig`` runs (dense steps as ``(1.0, 0)``)."""
    return [StepChoice(b, o) for b, o in zip(config.schedule, config.orders)]


def _first_free(dense_steps: int) -> int:
    """Leading steps always computed in full: ``dense_steps``, and at least step 0 (nothing is cached before it)."""
    return max(1, int(dense_steps))


def check_target(latency: LatencyModel, choices: Sequence[StepChoice], num_steps: int, dense_steps: int,
                 target_speedup: float) -> float:
    """The time budget ``num_steps · cost(dense) / target`` (dense-step units); raises when even the cheapest
    schedule misses the target."""
    if not (isinstance(target_speedup, (int, float)) and target_speedup >= 1.0 and math.isfinite(target_speedup)):
        raise ConfigError(f"target_speedup={target_speedup!r} is out of range: accepted a finite float >= 1")
    d = _first_free(dense_steps)
    cheapest = [FULL] * d + [min(choices, key=latency.cost)] * (num_steps - d)
    best = latency.speedup(cheapest)
    if best < target_speedup - _EPS:
        raise ConfigError(f"target_speedup={target_speedup} is infeasible: with {d} dense step(s) of {num_steps} and "
                          f"the choices {[(c.budget, c.order) for c in choices]} the latency model allows at most "
                          f"{best:.3f}x")
    return num_steps * latency.cost(FULL) / target_speedup


# ------------------------------------------------------------------------------------------------------ the table
@dataclass
class ErrorTable:
    """Teacher-forced per-step errors ``step_err[i, c, l]``: error of step ``i + l`` run at ``choices[c]`` after a
    full step ``i`` (and ``choices[c]`` on ``i+1 .. i+l-1``); ``l`` in ``1 .. max_segment - 1`` (index 0 unused).
    NaN where not measured (``i + l >= num_steps`` or ``i`` before the last dense step).

    Args:
        choices (`tuple[StepChoice, ...]`): the non-dense choices, axis 1.
        step_err (`np.ndarray` of shape `[num_steps, len(choices), max_segment]`).
        dense_steps (`int`): leading steps always full.
    """

    choices: tuple[StepChoice, ...]
    step_err: np.ndarray
    dense_steps: int = 1

    @classmethod
    def from_arrays(cls, choices: Sequence[StepChoice], step_err: np.ndarray, dense_steps: int = 1) -> ErrorTable:
        step_err = np.asarray(step_err, dtype=np.float64)
        if step_err.ndim != 3 or step_err.shape[1] != len(choices) or step_err.shape[2] < 2:
            raise ConfigError(f"step_err of shape {step_err.shape} is not accepted: expected [steps, "
                              f"{len(choices)}, max_segment >= 2]")
        if FULL in choices:
            raise ConfigError("the table holds non-dense choices only: drop (1.0, 0)")
        return cls(tuple(choices), step_err, int(dense_steps))

    @property
    def num_steps(self) -> int:
        return self.step_err.shape[0]

    @property
    def max_segment(self) -> int:
        return self.step_err.shape[2]

    def segment_error(self, i: int, j: int, c: int) -> float:
        """Error of "full at ``i``, ``choices[c]`` on ``i+1..j-1``, full at ``j``" (``j == num_steps``: to the end);
        ``inf`` beyond ``max_segment`` or where not measured."""
        length = j - i
        if length <= 1:
            return 0.0
        if length > self.max_segment:
            return math.inf
        v = float(self.step_err[i, c, 1:length].sum())
        return v if math.isfinite(v) else math.inf

    def estimate(self, schedule: Sequence[StepChoice]) -> float:
        """Additive estimate of a schedule's error: each non-dense step ``k`` costs ``step_err[f, c_k, k - f]``, ``f``
        the last full step before it (exact for runs of one choice, an approximation for mixed runs)."""
        index = {c: n for n, c in enumerate(self.choices)}
        last, total = None, 0.0
        for k, c in enumerate(schedule):
            if c == FULL:
                last = k
                continue
            if last is None or k - last >= self.max_segment or c not in index:
                return math.inf
            total += float(self.step_err[last, index[c], k - last])
        return total if math.isfinite(total) else math.inf


def _json_digest(data: dict) -> str:
    """SHA-256 of a JSON checkpoint body without its own ``digest`` (canonical JSON)."""
    body = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _atomic_json(path: Path, data: dict) -> None:
    """Write ``data`` with its digest under a temporary name, then move it into place (a kill leaves the old file)."""
    data = {**data, "digest": _json_digest(data)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    fault_point("search_write")
    os.replace(tmp, path)


class CallCounter:
    """Counts a module's forward calls (a forward pre-hook) and wall seconds while active; use as a context."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.calls, self.seconds, self._handle, self._t0 = module, 0, 0.0, None, 0.0

    def _hook(self, *_):
        self.calls += 1

    def __enter__(self) -> CallCounter:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._t0
        self._handle.remove()

    def as_dict(self) -> dict:
        return {"transformer_calls": self.calls, "seconds": round(self.seconds, 2)}


class SegmentErrorMeter:
    """Measures an :class:`ErrorTable` on a batch of prompts, resumable from a JSON checkpoint in ``workdir``.

    Args:
        sampler (`Sampler`): the model.
        prompts (`list[str]`): calibration prompts (prompt ``n`` uses noise seed ``n``); run as one batch.
        gen (`GenerationConfig`): steps, geometry and guidance of the measurement (e.g. a proxy geometry, no CFG).
        base (`AstraeaConfig`): the method settings the segments run with (all but budgets and forecast).
        choices (`Sequence[StepChoice]`): choices to measure (the dense one is skipped).
        max_segment (`int`, defaults 6): longest segment ``j - i`` (so at most ``max_segment - 1`` steps in a row
            are not fully computed).
        workdir (`Path | None`): checkpoint folder (``table.json``, written after every (start, choice) row).
    """

    def __init__(self, sampler, prompts: list[str], gen, base, choices: Sequence[StepChoice],
                 max_segment: int = DEFAULT_MAX_SEGMENT, workdir: str | Path | None = None) -> None:
        if isinstance(max_segment, bool) or not isinstance(max_segment, int) or max_segment < 2:
            raise ConfigError(f"max_segment={max_segment!r} is out of range: accepted an int >= 2")
        self.sampler, self.prompts, self.gen, self.base = sampler, list(prompts), gen, base
        self.choices = tuple(c for c in choices if c != FULL)
        self.max_segment = max_segment
        self.workdir = None if workdir is None else Path(workdir)
        self.counter = CallCounter(sampler.model.transformer)

    def spec(self) -> dict:
        """What the table depends on; a checkpoint with another spec is refused."""
        return {"model_id": self.sampler.model.config.model_id, "prompts": self.prompts,
                "gen": dataclasses.asdict(self.gen), "base": self.base.to_dict(), "max_segment": self.max_segment,
                "choices": [[c.budget, c.order] for c in self.choices]}

    def _load(self) -> dict[str, list[float]]:
        path = self.workdir / "table.json" if self.workdir is not None else None
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError
            raise ConfigError(f"error-table checkpoint {str(path)!r} is not valid JSON ({e}): remove it") from e
        if not isinstance(data, dict) or ("digest" in data and data["digest"] != _json_digest(data)):
            raise ConfigError(f"error-table checkpoint {str(path)!r} is corrupt (its SHA-256 does not match its "
                              "content): remove it")
        if data.get("format") != TABLE_FORMAT or data.get("version") != TABLE_VERSION:
            raise ConfigError(f"{str(path)!r} is not a {TABLE_FORMAT} v{TABLE_VERSION} file: remove it")
        if data.get("spec") != json.loads(json.dumps(self.spec())):
            raise ConfigError(f"error-table checkpoint {str(path)!r} was measured for another model, prompt set, "
                              "geometry or choice set: give another --checkpoint folder or remove it")
        return {k: [math.nan if v is None else float(v) for v in row] for k, row in data["rows"].items()}

    def _save(self, rows: dict[str, list[float]]) -> None:
        if self.workdir is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        clean = {k: [None if not math.isfinite(v) else v for v in row] for k, row in rows.items()}
        _atomic_json(self.workdir / "table.json", {"format": TABLE_FORMAT, "version": TABLE_VERSION,
                                                   "spec": self.spec(), "rows": clean})

    def _setup(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sampler, gen = self.sampler, self.gen
        noise = torch.cat([sampler.initial_noise(gen.replace(seed=n)) for n in range(len(self.prompts))])
        xs: list[torch.Tensor] = [noise.clone()]
        with self.counter:
            sampler(self.prompts, gen, progress=False, latents=noise, on_step=lambda i, x: xs.append(x.clone()))
        sched = FlowMatchEulerDiscreteScheduler(shift=sampler.flow_shift(gen))
        sched.set_timesteps(gen.steps)
        self.xs, self.timesteps, self.sigmas = xs, sched.timesteps, [float(s) for s in sched.sigmas]
        self.cond = sampler.model.encode_prompts(self.prompts)
        self.guidance = sampler.guidance(gen)
        self.uncond = sampler.model.encode_prompts([""] * len(self.prompts)) if self.guidance > 1.0 else None

    def _velocity(self, k: int) -> torch.Tensor:
        """The guided model output at step ``k`` on the dense latent (the sampler's loop, one step)."""
        tr, x, t = self.sampler.model.transformer, self.xs[k], self.timesteps[k]
        ctx = dict(step_index=k, num_inference_steps=self.gen.steps, timestep=t, sigma=self.sigmas[k])
        with tr.cache_context("cond", **ctx):
            pred = tr(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=self.cond,
                      return_dict=False)[0]
        if self.uncond is not None:
            with tr.cache_context("uncond", **ctx):
                pu = tr(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=self.uncond,
                        return_dict=False)[0]
            pred = pu + self.guidance * (pred - pu)
        return pred

    def _row(self, i: int, c: StepChoice) -> list[float]:
        """Errors of steps ``i+1 .. i+max_segment-1`` at ``c`` after full compute at ``i`` (index 0: unused)."""
        from vdit_accel.methods.astraea import apply_astraea

        n, d = self.gen.steps, self.base.dense_steps
        stop = min(n, i + self.max_segment)
        warm = max(0, i - c.order)
        choices = [FULL] * n
        for k in range(i + 1, stop):
            choices[k] = c
        cfg = schedule_to_config(choices, dataclasses.replace(self.base, dense_steps=min(d, i + 1)))
        tr = self.sampler.model.transformer
        row = [math.nan] * self.max_segment
        handle = apply_astraea(tr, cfg)
        tr._reset_stateful_cache()
        try:
            with self.counter, torch.no_grad():
                for k in range(warm, stop):
                    v_hat = self._velocity(k)
                    if k > i:
                        dt = self.sigmas[k + 1] - self.sigmas[k]
                        row[k - i] = float(((self.xs[k] + dt * v_hat - self.xs[k + 1]) ** 2).mean())
        finally:
            tr._reset_stateful_cache()
            handle.remove()
        return row

    def measure(self, progress: bool = False, on_row: Callable[[int], None] | None = None) -> ErrorTable:
        """Measure (or resume) the table. ``on_row(rows_done)`` is called after each checkpointed row; an exception
        it raises stops the run, which a later call resumes."""
        rows = self._load()
        n = self.gen.steps
        first = _first_free(self.base.dense_steps) - 1
        todo = [(i, ci) for i in range(first, n - 1) for ci in range(len(self.choices)) if f"{i},{ci}" not in rows]
        if todo:
            self._setup()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        it = tqdm(todo, desc="segment errors") if progress and tqdm is not None else todo
        for i, ci in it:
            rows[f"{i},{ci}"] = self._row(i, self.choices[ci])
            self._save(rows)
            if on_row is not None:
                on_row(len(rows))
        err = np.full((n, len(self.choices), self.max_segment), np.nan)
        for key, row in rows.items():
            i, ci = map(int, key.split(","))
            err[i, ci] = row
        return ErrorTable.from_arrays(self.choices, err, self.base.dense_steps)


# ------------------------------------------------------------------------------------------------------ allocators
def _costs(latency: LatencyModel, choices: Sequence[StepChoice]) -> np.ndarray:
    return np.array([latency.cost(c) for c in choices])


def dp_schedule(table: ErrorTable, latency: LatencyModel, target_speedup: float,
                resolution: int = DP_RESOLUTION) -> list[StepChoice]:
    """Minimum-error schedule of the table's segment model under the latency budget (LeMiCa/DPCache-style DP).

    Nodes are the fully computed steps (``dense_steps - 1`` first, a virtual node ``num_steps`` last); an edge
    ``i -> j`` with choice ``c`` runs ``c`` on ``i+1..j-1`` and full at ``j``, costs their latency-model time and
    adds :meth:`ErrorTable.segment_error`. Costs are rounded *up* to ``1/resolution`` of a dense step, so every
    returned schedule meets the target under the unrounded model; within that rounding the result is optimal.

    Returns:
        `list[StepChoice]` of length ``num_steps``.
    """
    n, d, cands = table.num_steps, _first_free(table.dense_steps), table.choices
    full = latency.cost(FULL)
    budget_total = check_target(latency, list(cands) + [FULL], n, table.dense_steps, target_speedup)
    q = full / resolution
    cap = int(math.floor((budget_total - d * full) / q + 1e-6))
    if cap < 0:
        raise ConfigError(f"target_speedup={target_speedup} leaves no time after the {d} dense step(s)")
    costs = _costs(latency, cands)
    s = d - 1
    err = np.full((n + 1, cap + 1), np.inf)
    err[s, 0] = 0.0
    back_i = np.full((n + 1, cap + 1), -1, dtype=np.int64)
    back_c = np.full((n + 1, cap + 1), -1, dtype=np.int64)
    for j in range(s + 1, n + 1):
        end = full if j < n else 0.0
        for length in range(1, min(table.max_segment, j - s) + 1):
            i = j - length
            options = [(-1, 0.0, end)] if length == 1 else [
                (c, table.segment_error(i, j, c), (length - 1) * costs[c] + end) for c in range(len(cands))]
            for c, e, cost in options:
                if not math.isfinite(e):
                    continue
                w = int(math.ceil(cost / q - 1e-6))
                if w > cap:
                    continue
                cand = err[i, : cap + 1 - w] + e
                better = cand < err[j, w:]
                if better.any():
                    err[j, w:][better] = cand[better]
                    back_i[j, w:][better] = i
                    back_c[j, w:][better] = c
    b = int(np.argmin(err[n]))
    if not math.isfinite(err[n, b]):
        raise ConfigError(f"no schedule meets target_speedup={target_speedup} with segments of at most "
                          f"{table.max_segment} steps: raise max_segment or lower the target")
    out = [FULL] * n
    j = n
    while j > s:
        i, c = int(back_i[j, b]), int(back_c[j, b])
        length = j - i
        w = int(math.ceil(((length - 1) * (costs[c] if c >= 0 else 0.0) + (full if j < n else 0.0)) / q - 1e-6))
        for k in range(i + 1, j):
            out[k] = cands[c]
        j, b = i, b - w
    return out


def greedy_schedule_joint(table: ErrorTable, latency: LatencyModel, target_speedup: float) -> list[StepChoice]:
    """Marginal descent: from the dense schedule, repeatedly move one step to a cheaper choice with the smallest
    increase of :meth:`ErrorTable.estimate` per unit of time saved (ties: earliest step, cheapest choice) until the
    target is met; then spend any time left on the upgrades that lower the estimate most per unit of time."""
    n, d = table.num_steps, _first_free(table.dense_steps)
    opts = list(table.choices) + [FULL]
    cost = _costs(latency, opts)
    total_max = check_target(latency, opts, n, table.dense_steps, target_speedup)
    idx = [len(opts) - 1] * n

    def est(ix):
        return table.estimate([opts[x] for x in ix])

    cur_err = 0.0
    while cost[idx].sum() > total_max + _EPS:
        best = None
        for k in range(d, n):
            for c in range(len(opts)):
                saved = cost[idx[k]] - cost[c]
                if saved <= _EPS:
                    continue
                trial = idx.copy()
                trial[k] = c
                e = est(trial)
                if not math.isfinite(e):
                    continue
                key = ((e - cur_err) / saved, k, cost[c])
                if best is None or key < best[0]:
                    best = (key, k, c, e)
        if best is None:
            raise ConfigError(f"greedy cannot reach target_speedup={target_speedup} with segments of at most "
                              f"{table.max_segment} steps")
        _, k, c, cur_err = best
        idx[k] = c
    while True:  # refill: upgrades that fit in the time left and lower the estimate
        left = total_max - cost[idx].sum()
        best = None
        for k in range(d, n):
            for c in range(len(opts)):
                extra = cost[c] - cost[idx[k]]
                if extra <= _EPS or extra > left + _EPS:
                    continue
                trial = idx.copy()
                trial[k] = c
                e = est(trial)
                if e < cur_err - 1e-15:
                    key = ((e - cur_err) / extra, k, cost[c])
                    if best is None or key < best[0]:
                        best = (key, k, c, e)
        if best is None:
            break
        _, k, c, cur_err = best
        idx[k] = c
    return [opts[x] for x in idx]


def uniform_candidates(choices: Sequence[StepChoice], latency: LatencyModel, num_steps: int, dense_steps: int,
                       target_speedup: float) -> list[list[StepChoice]]:
    """Uniform schedules (one choice at every non-dense step) meeting the target: per forecast order, the one with
    the highest budget (the costliest feasible); empty orders are skipped. Sorted by predicted cost, costliest
    first."""
    d = _first_free(dense_steps)
    out = []
    for order in sorted({c.order for c in choices if c != FULL}):
        ok = [c for c in choices if c != FULL and c.order == order
              and latency.speedup([FULL] * d + [c] * (num_steps - d)) >= target_speedup - _EPS]
        if ok:
            c = max(ok, key=lambda c: c.budget)
            out.append([FULL] * d + [c] * (num_steps - d))
    if not out:
        raise ConfigError(f"no uniform schedule meets target_speedup={target_speedup}")
    return sorted(out, key=lambda s: -latency.total(s))


def uniform_joint(choices: Sequence[StepChoice], latency: LatencyModel, num_steps: int, dense_steps: int,
                  target_speedup: float, fitness: Callable[[list[StepChoice]], float] | None = None
                  ) -> list[StepChoice]:
    """The uniform baseline: among :func:`uniform_candidates`, the lowest ``fitness`` (or the costliest without)."""
    cands = uniform_candidates(choices, latency, num_steps, dense_steps, target_speedup)
    if fitness is None or len(cands) == 1:
        return cands[0]
    return cands[int(np.argmin([fitness(s) for s in cands]))]


class JointCoding:
    """Choice-index genome for :func:`vdit_accel.search.evolution.evolve`: gene ``g`` is choice ``round(g·(K-1))``
    of the cost-sorted choice set (the dense choice is index ``K-1``, so the evolution's dense genes 1.0 stay dense);
    :meth:`repair` moves random genes one choice (cost notch) at a time until the predicted time lies in
    ``[budget·(1 - tolerance), budget]``.
    """

    def __init__(self, choices: Sequence[StepChoice], latency: LatencyModel, num_steps: int, dense_steps: int,
                 target_speedup: float, tolerance: float = 0.05) -> None:
        self.choices = tuple(choices)
        if self.choices[-1] != FULL:
            raise ConfigError("the choice set must end with the dense choice (use choice_set)")
        self.cost = _costs(latency, self.choices)
        if np.any(np.diff(self.cost) < -_EPS):
            raise ConfigError("the choice set must be sorted by latency cost (use choice_set)")
        self.n, self.d = num_steps, _first_free(dense_steps)
        self.budget = check_target(latency, self.choices, num_steps, dense_steps, target_speedup)
        self.lo = self.budget * (1 - tolerance)
        self.grid = tuple(k / (len(self.choices) - 1) for k in range(len(self.choices)))

    def evolution_config(self, **kw):
        """An ``EvolutionConfig`` over the index grid (its mean-budget ``target`` is unused here: 1.0)."""
        from vdit_accel.search.evolution import EvolutionConfig

        return EvolutionConfig(target=1.0, tolerance=0.0, num_steps=self.n, dense_steps=self.d, grid=self.grid, **kw)

    def indices(self, genome: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(genome, dtype=np.float64) * (len(self.choices) - 1)).astype(np.int64)

    def decode(self, genome: np.ndarray) -> list[StepChoice]:
        return [self.choices[k] for k in self.indices(genome)]

    def encode(self, schedule: Sequence[StepChoice]) -> np.ndarray:
        return np.array([self.grid[self.choices.index(c)] for c in schedule])

    def repair(self, genome: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        idx = np.clip(self.indices(genome), 0, len(self.choices) - 1)
        idx[: self.d] = len(self.choices) - 1
        free = np.arange(self.d, self.n)
        while self.cost[idx].sum() > self.budget + _EPS:
            cand = free[idx[free] > 0]
            j = cand[rng.integers(cand.size)]
            idx[j] -= 1
        while (total := self.cost[idx].sum()) < self.lo - _EPS:
            up = np.minimum(idx[free] + 1, len(self.choices) - 1)
            fits = total + self.cost[up] - self.cost[idx[free]] <= self.budget + _EPS
            ok = (idx[free] < len(self.choices) - 1) & fits
            cand = free[ok]
            if cand.size == 0:
                break
            j = cand[rng.integers(cand.size)]
            idx[j] += 1
        return np.asarray(self.grid)[idx]


# --------------------------------------------------------------------------------------------------- the search
def _name(target_speedup: float) -> str:
    """``3.0 -> 'astraea-3x'``, ``2.5 -> 'astraea-2.5x'``."""
    return f"astraea-{target_speedup:g}x"


def preset_name(target_speedup: float) -> str:
    """File stem of a joint preset: named by its target speedup (``astraea-3x``), never by a mean budget."""
    return _name(float(target_speedup))


def _psnr(ref: torch.Tensor, out: torch.Tensor) -> list[float]:
    """Per-prompt PSNR of videos in [-1, 1] (data range 2, as ``bench.metrics.psnr``); identical -> 10·log10(4e20)."""
    mse = ((out.double() - ref.double()) ** 2).flatten(1).mean(1).clamp_min(1e-20)
    return [float(v) for v in (10 * torch.log10(4.0 / mse))]


def _generate(sampler, prompts: list[str], gen, config=None) -> torch.Tensor:
    from vdit_accel.methods.astraea import apply_astraea

    noise = torch.cat([sampler.initial_noise(gen.replace(seed=n)) for n in range(len(prompts))])
    handle = apply_astraea(sampler.model.transformer, config) if config is not None else None
    try:
        return sampler(prompts, gen, progress=False, latents=noise)
    finally:
        if handle is not None:
            handle.remove()


def check_table_support(sampler, gen) -> None:
    """Raise ``UnsupportedModelError`` unless ``sampler`` can re-run single denoising steps from outside, as the
    segment-error table (:class:`SegmentErrorMeter`) does: its own step loop (``on_step``), its scheduler shift
    (``flow_shift``) and the transformer's call signature. The embedded ``Sampler`` can; a
    :class:`~vdit_accel.pipelines.PipelineSampler` cannot (its ``flow_shift`` raises the error, naming the
    allocators that run on a pipeline)."""
    sampler.flow_shift(gen)


def table_calls(steps: int, dense_steps: int, choices: Sequence[StepChoice], max_segment: int,
                cfg_branches: int) -> int:
    """Transformer calls of a full :class:`SegmentErrorMeter` run (the dense pass plus every row with its warm-up)."""
    first = _first_free(dense_steps) - 1
    rows = sum(min(steps, i + max_segment) - max(0, i - c.order)
               for i in range(first, steps - 1) for c in choices if c != FULL)
    return (steps + rows) * cfg_branches


def run_joint_search(sampler, latency: LatencyModel, target_speedup: float, calib_prompts: list[str], *,
                     steps: int = 50, selection_prompts: Sequence[str] = SELECTION_PROMPTS,
                     allocators: Sequence[str] = ALLOCATORS, base=None, proxy=None, selection_guidance=None,
                     max_segment: int = DEFAULT_MAX_SEGMENT, choices: Sequence[StepChoice] | None = None,
                     population: int = 50, children: int = 30, generations: int | None = None, seed: int = 0,
                     workdir: str | Path | None = None, progress: bool = False):
    """Run the allocators under the latency budget and keep the one with the best PSNR on the selection prompts.

    Args:
        sampler (`Sampler`): the model.
        latency (`LatencyModel`): measured step costs at the target geometry/hardware.
        target_speedup (`float`): predicted speedup every schedule must reach, >= 1.
        calib_prompts (`list[str]`): calibration prompts (error table, uniform's and evolution's fitness).
        steps (`int`, defaults 50): denoising steps of the schedule.
        selection_prompts (`Sequence[str]`): prompts of the final comparison (full generations, full fidelity).
        allocators (`Sequence[str]`): any of ``ALLOCATORS``.
        base (`AstraeaConfig | None`): method settings besides the schedule (default ``AstraeaConfig``).
        proxy (`Fidelity | None`): fidelity of the table and of the fitness (default 8x32x32, no CFG).
        selection_guidance (`float | None`): CFG of the selection (None: the model's).
        max_segment (`int`, defaults 6): longest segment between fully computed steps (table, DP, greedy).
        choices: the choice set (default :func:`choice_set` of ``latency``).
        population, children (`int`): evolution sizes; generations (`int | None`): None = match the table's
            transformer calls (equal calibration cost).
        workdir (`Path | None`): checkpoints, resumable: ``table/`` (independent of the target, so one folder serves
            every target speedup) and ``evolution/`` (dense reference, one EA checkpoint per target).

    Raises:
        UnsupportedModelError: "dp" or "greedy" on a sampler that cannot re-run single steps (a diffusers
            pipeline's ``PipelineSampler``; see :func:`check_table_support`), before any compute.

    Returns:
        `(AstraeaConfig, dict)`: the winner's config and the record (candidates, costs, winner, margin).
    """
    from vdit_accel.instrument.sampler import GenerationConfig
    from vdit_accel.methods.astraea import AstraeaConfig
    from vdit_accel.search.astraea_search import Fidelity, ScheduleFitness
    from vdit_accel.search.evolution import evolve

    unknown = sorted(set(allocators) - set(ALLOCATORS))
    if unknown or not allocators:
        raise ConfigError(f"allocators={list(allocators)!r} is not accepted: choose from {list(ALLOCATORS)}")
    base = base or AstraeaConfig(num_steps=steps)
    if "kv_reuse" in {f.name for f in dataclasses.fields(base)}:
        base = dataclasses.replace(base, kv_reuse=latency.kv_reuse)  # the costs hold for this setting only
    base = dataclasses.replace(base, num_steps=steps, budgets=None, target=1.0)
    choices = tuple(choices) if choices is not None else choice_set(latency)
    check_target(latency, choices, steps, base.dense_steps, target_speedup)
    proxy = dataclasses.replace(proxy or Fidelity((8, 32, 32), 1.0, steps), steps=steps)
    workdir = None if workdir is None else Path(workdir)
    sub = (lambda name: None) if workdir is None else (lambda name: workdir / name)
    f, h, w = proxy.geometry or sampler.geometry(GenerationConfig())
    proxy_gen = GenerationConfig(steps=steps, guidance=proxy.guidance, frames=f, height=h, width=w)
    branches = 2 if sampler.guidance(proxy_gen) > 1.0 else 1
    coding = JointCoding(choices, latency, steps, base.dense_steps, target_speedup)
    schedules: dict[str, list[StepChoice]] = {}
    cost: dict[str, dict] = {}
    failed: dict[str, str] = {}

    need_table = set(TABLE_ALLOCATORS) & set(allocators)
    if need_table:
        check_table_support(sampler, proxy_gen)  # before any compute
    tcalls = table_calls(steps, base.dense_steps, choices, max_segment, branches)
    if need_table:
        meter = SegmentErrorMeter(sampler, list(calib_prompts), proxy_gen, base, choices, max_segment,
                                  sub("table"))
        table = meter.measure(progress=progress)
        t_cost = {"transformer_calls": tcalls, "seconds_this_run": round(meter.counter.seconds, 2),
                  "what": "segment error table (shared by dp and greedy)"}
        for name, fn in (("dp", dp_schedule), ("greedy", greedy_schedule_joint)):
            if name in allocators:
                t0 = time.perf_counter()
                try:
                    schedules[name] = fn(table, latency, target_speedup)
                except ConfigError as e:  # e.g. greedy stuck on the segment bound: recorded, the others go on
                    failed[name] = str(e)
                    continue
                cost[name] = {**t_cost, "allocator_seconds": round(time.perf_counter() - t0, 3),
                              "table_estimate": table.estimate(schedules[name])}
    per_eval = steps * branches
    fit = None
    if {"uniform", "evolution"} & set(allocators):
        fit = ScheduleFitness(sampler, list(calib_prompts), proxy, base, sub("evolution"),
                              to_config=lambda g: schedule_to_config(coding.decode(g), base))
    if "uniform" in allocators:
        before, t0 = fit.evaluations, time.perf_counter()
        schedules["uniform"] = uniform_joint(choices, latency, steps, base.dense_steps, target_speedup,
                                             fitness=lambda s: fit.one(coding.encode(s)))
        n_eval = fit.evaluations - before
        cost["uniform"] = {"transformer_calls": (n_eval + 1) * per_eval, "evaluations": n_eval,
                           "seconds_this_run": round(time.perf_counter() - t0, 2)}
    if "evolution" in allocators:
        if generations is None:
            budget_evals = max(2, tcalls // per_eval - 1)
            population = min(population, budget_evals)
            generations = max(0, (budget_evals - population) // children)
        evo_cfg = coding.evolution_config(population=population, children=children, generations=generations,
                                          seed=seed)
        t0 = time.perf_counter()
        seed_g = coding.encode(uniform_candidates(choices, latency, steps, base.dense_steps, target_speedup)[0])
        ident = {"latency": latency.to_dict(), "target_speedup": target_speedup,
                 "choices": [[c.budget, c.order] for c in choices], "base": base.to_dict()}
        ck = None if workdir is None else workdir / "evolution" / f"{_name(target_speedup)}.json"
        res = evolve(fit, evo_cfg, checkpoint=ck,
                     progress=progress, repair_fn=coding.repair, seed_genomes=[seed_g], identity=ident)
        schedules["evolution"] = coding.decode(np.asarray(res.best_genome))
        cost["evolution"] = {"transformer_calls": (res.evaluations + 1) * per_eval, "evaluations": res.evaluations,
                             "population": population, "children": children, "generations": generations,
                             "best_fitness_proxy_mse": res.best_fitness,
                             "seconds_this_run": round(time.perf_counter() - t0, 2)}

    # selection: full generations on prompts neither the table nor the fitness saw
    sel_gen = GenerationConfig(steps=steps, guidance=selection_guidance)
    sel_prompts = list(selection_prompts)
    overlap = sorted(set(sel_prompts) & set(calib_prompts))
    if overlap:
        raise ConfigError(f"selection prompts {overlap} are also calibration prompts: the selection must be held out")
    dense = _generate(sampler, sel_prompts, sel_gen)
    candidates = {}
    for name, sched in schedules.items():
        cfg = schedule_to_config(sched, base)
        ps = _psnr(dense, _generate(sampler, sel_prompts, sel_gen, cfg))
        candidates[name] = {"predicted_speedup": round(latency.speedup(sched), 4), "psnr_mean": float(np.mean(ps)),
                            "psnr": ps, "budgets": [c.budget for c in sched], "forecast": [c.order for c in sched],
                            "calibration_cost": cost[name]}
    if not candidates:
        raise ConfigError(f"every allocator failed: {failed}")
    ranked = sorted(candidates, key=lambda k: -candidates[k]["psnr_mean"])
    winner = ranked[0]
    margin = candidates[winner]["psnr_mean"] - candidates[ranked[1]]["psnr_mean"] if len(ranked) > 1 else None
    record = {
        "target_speedup": target_speedup, "allocator": winner, "runner_up": ranked[1] if len(ranked) > 1 else None,
        "margin_db": margin, "candidates": candidates, "failed": failed, "calibration_prompts": list(calib_prompts),
        "selection_prompts": sel_prompts, "selection_guidance": sampler.guidance(sel_gen),
        "proxy": dataclasses.asdict(proxy), "max_segment": max_segment,
        "choices": [[c.budget, c.order] for c in choices],
        "selection_cost": {"transformer_calls": (len(schedules) + 1) * steps * (2 if sampler.guidance(sel_gen) > 1
                                                                                  else 1)},
        "latency_model": {k: v for k, v in latency.to_dict().items() if k != "costs"} | {
            "costs": latency.to_dict()["costs"]},
    }
    return schedule_to_config(schedules[winner], base), record
