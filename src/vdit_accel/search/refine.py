"""Final-video refinement of joint Astraea schedules: a local search scored on whole generations.

Why a second stage: the segment error table of :mod:`vdit_accel.search.joint` is teacher-forced at a proxy
geometry without CFG, so it cannot see how a reuse early in the trajectory derails one prompt (bench-v3: the joint
presets matched TaylorSeer's mean PSNR, but their worst prompt was 15 dB worse). This stage scores every candidate by
what the user sees: the final video of a full generation (the model's geometry and CFG) on the calibration prompts,
against the dense video, per prompt.

Search space. A schedule is one :class:`~vdit_accel.search.latency.StepChoice` per denoising step.

- Seeds: TaylorSeer's own cadences (:func:`taylorseer_cadence`: ``warmup`` computed steps, then every
  ``interval``-th, first-order forecasts between) that reach the target — our whole-step forecast reproduces
  diffusers' TaylorSeer output exactly (``tests/test_search_refine.py``), so the search starts where that peer
  stands — and *spread* schedules (:func:`spread_schedule`): the most computed steps the latency budget affords,
  the ``warmup`` leading ones and the others at ``warmup - 1 + round((steps - warmup) * (j / m) ** gamma)``.
- Moves keep the number of computed steps (so the latency barely moves; every candidate is checked against the
  target): shift one computed step by -2..+2 to a free step, or set the forecast order of one gap (a run of reused
  steps). Leading ``dense_steps`` stay computed.

Acceptance: first improvement of ``objective = mean(psnr) + min_weight * min(psnr)`` over the prompts (default
``min_weight = 1``: the worst prompt weighs as much as the average), moves tried in a seeded random order; the search
stops after ``max_evals`` objective calls (seeds included) or a full pass without improvement.

Why our own search rather than a library optimiser: each evaluation is a few full generations (tens of seconds on
a CPU), so the whole search affords ~50-100 of them; the space is discrete with a hard latency constraint, and every
evaluation must be checkpointed and replayed exactly. A first-improvement climb over two move types is ~40 lines,
deterministic for a seed and easy to audit; population methods (our evolution in :mod:`.evolution`) need an order of
magnitude more evaluations to move at all (bench-v3's joint search: the evolution was 5-7 dB behind greedy at equal
cost).

Checkpoint: every evaluation goes to ``workdir/evals.json`` (schedule key -> per-prompt PSNR), written atomically; a
rerun with the same identity (prompts, generation settings, base config) replays them without compute, and a
different identity is refused.

Example:
    >>> sched = spread_schedule(10, n_full=4, warmup=2, order=1)
    >>> schedule_key(sched)
    'FF111F111F'
    >>> parse_key('FF111F111F') == sched
    True
    >>> schedule_key(taylorseer_cadence(12, interval=4))
    'FFF1F111F111'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from vdit_accel._faults import fault_point
from vdit_accel.errors import ConfigError, WeightsError
from vdit_accel.search.latency import MAX_ORDER, LatencyModel, StepChoice

EVALS_FORMAT = "vdit-accel/refine-evals"
DEFAULT_MAX_EVALS = 60
DEFAULT_GAMMAS = (0.8, 1.0, 1.25)
FULL = StepChoice(1.0, 0)


# ------------------------------------------------------------------------------------------ schedules and keys
def _evals_digest(data: dict) -> str:
    """SHA-256 of an ``evals.json`` body without its own ``digest`` (canonical JSON): flipped bytes are detected."""
    body = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def schedule_key(schedule: Sequence[StepChoice]) -> str:
    """A compact, exact text key: ``F`` computed step, ``0``-``2`` whole-step reuse of that forecast order,
    ``[b:o]`` a partial token budget ``b`` with order ``o``."""
    out = []
    for c in schedule:
        if c.budget >= 1.0:
            out.append("F")
        elif c.budget == 0.0:
            out.append(str(c.order))
        else:
            out.append(f"[{c.budget!r}:{c.order}]")
    return "".join(out)


def parse_key(key: str) -> list[StepChoice]:
    """Inverse of :func:`schedule_key`.

    Raises:
        ConfigError: on a malformed key, naming the position.
    """
    out: list[StepChoice] = []
    i = 0
    while i < len(key):
        ch = key[i]
        if ch == "F":
            out.append(FULL)
        elif ch.isdigit():
            out.append(StepChoice(0.0, int(ch)))
        elif ch == "[":
            end = key.find("]", i)
            try:
                b, o = key[i + 1:end].split(":")
                out.append(StepChoice(float(b), int(o)))
            except ValueError as e:
                raise ConfigError(f"schedule key {key!r} is malformed at position {i}: expected [budget:order]") from e
            i = end
        else:
            raise ConfigError(f"schedule key {key!r} is malformed at position {i}: expected F, 0-2 or [budget:order]")
        i += 1
    return out


def spread_schedule(steps: int, n_full: int, warmup: int, order: int, gamma: float = 1.0) -> list[StepChoice]:
    """``n_full`` computed steps: the first ``warmup``, the rest spread over the remaining steps, denser early for
    ``gamma > 1`` and denser late for ``gamma < 1``; every other step a whole-step forecast of ``order``.

    Positions after the warm-up are ``warmup + round((steps - warmup) * (j / m) ** gamma)`` for ``j = 1..m``
    (``m = n_full - warmup``), shifted down to the last step if they overflow and made distinct.

    Raises:
        ConfigError: if the counts do not fit (``1 <= warmup <= n_full <= steps``) or the order is unknown.

    Example:
        >>> schedule_key(spread_schedule(12, n_full=5, warmup=3, order=1))
        'FFF111F1111F'
    """
    if not (1 <= warmup <= n_full <= steps):
        raise ConfigError(f"spread_schedule needs 1 <= warmup <= n_full <= steps; got warmup={warmup}, "
                          f"n_full={n_full}, steps={steps}")
    if order not in range(MAX_ORDER + 1):
        raise ConfigError(f"order={order!r} is out of range: accepted an int in [0, {MAX_ORDER}]")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"gamma={gamma!r} is out of range: accepted (0, inf)")
    full = set(range(warmup))
    m = n_full - warmup
    span = steps - warmup
    pos = sorted({min(steps - 1, warmup - 1 + max(1, round(span * (j / m) ** gamma))) for j in range(1, m + 1)})
    free = [k for k in range(warmup, steps) if k not in pos]
    while len(pos) < m:  # collisions at the end: take the latest free steps
        pos.append(free.pop())
    full |= set(pos)
    return [FULL if k in full else StepChoice(0.0, order) for k in range(steps)]


def taylorseer_cadence(steps: int, interval: int, warmup: int = 3, order: int = 1) -> list[StepChoice]:
    """diffusers' TaylorSeer cadence as a schedule: steps ``< warmup`` and every ``k`` with
    ``(k - warmup - 1) % interval == 0`` computed (``TaylorSeerCacheConfig(cache_interval=interval,
    disable_cache_before_step=warmup)``), whole-step forecasts of ``order`` between."""
    if not (isinstance(interval, int) and interval >= 1):
        raise ConfigError(f"interval={interval!r} is out of range: accepted an int >= 1")
    if not (isinstance(warmup, int) and 1 <= warmup <= steps):
        raise ConfigError(f"warmup={warmup!r} is out of range: accepted an int in [1, {steps}]")
    return [FULL if k < warmup or (k - warmup - 1) % interval == 0 else StepChoice(0.0, order) for k in range(steps)]


def gaps(schedule: Sequence[StepChoice]) -> list[tuple[int, int]]:
    """``(start, stop)`` of every maximal run of non-computed steps."""
    out, start = [], None
    for k, c in enumerate(list(schedule) + [FULL]):
        if c.budget < 1.0 and start is None:
            start = k
        elif c.budget >= 1.0 and start is not None:
            out.append((start, k))
            start = None
    return out


def neighbours(schedule: Sequence[StepChoice], dense_steps: int, orders: Sequence[int] = (0, 1, 2),
               shifts: Sequence[int] = (-2, -1, 1, 2)) -> Iterator[tuple[str, list[StepChoice]]]:
    """Every move of the local search: ``(description, new schedule)``.

    - ``shift i->j``: the computed step ``i`` (not one of the leading ``dense_steps``) moves to the free step ``j``;
      ``i`` takes the forecast order of the step it now borders (its left neighbour if reused, else its right).
    - ``order a:b=o``: every step of the gap ``[a, b)`` forecasts with order ``o``.
    """
    sched = list(schedule)
    n = len(sched)
    lead = max(1, int(dense_steps))
    for i, c in enumerate(sched):
        if c.budget < 1.0 or i < lead:
            continue
        for d in shifts:
            j = i + d
            if not (lead <= j < n) or sched[j].budget >= 1.0:
                continue
            new = list(sched)
            new[i], new[j] = sched[j], FULL
            left = new[i - 1] if new[i - 1].budget < 1.0 else None
            right = new[i + 1] if i + 1 < n and new[i + 1].budget < 1.0 else None
            new[i] = StepChoice(0.0, (left or right or sched[j]).order)
            yield f"shift {i}->{j}", new
    for a, b in gaps(sched):
        current = {c.order for c in sched[a:b]}
        for o in orders:
            if current != {o}:
                yield f"order {a}:{b}={o}", sched[:a] + [StepChoice(0.0, o)] * (b - a) + sched[b:]


def max_full_steps(latency: LatencyModel, steps: int, warmup: int, order: int, target_speedup: float) -> int:
    """The most computed steps a spread schedule may have and still reach ``target_speedup`` under ``latency``.

    Raises:
        ConfigError: when even ``warmup`` computed steps miss the target.
    """
    best = None
    for n in range(warmup, steps + 1):
        if latency.speedup(spread_schedule(steps, n, warmup, order)) >= target_speedup:
            best = n
    if best is None:
        raise ConfigError(f"target_speedup={target_speedup!r} is out of reach with warmup={warmup} computed steps "
                          f"under this latency model: accepted at most "
                          f"{latency.speedup(spread_schedule(steps, warmup, warmup, order)):.3g}")
    return best


# ------------------------------------------------------------------------------------------ the objective
class FinalVideoObjective:
    """Per-prompt PSNR of a schedule's final videos against the dense videos (full generations), checkpointed.

    Args:
        sampler (`Sampler`): the model.
        prompts (`list[str]`): calibration prompts; prompt ``n`` uses noise seed ``n`` (as the joint search).
        gen (`GenerationConfig`): steps, geometry and CFG of every generation.
        base (`AstraeaConfig`): method settings besides the schedule.
        min_weight (`float`, defaults 1): weight of the worst prompt in the objective.
        workdir (`Path | None`): checkpoint folder (``evals.json``); ``None`` keeps nothing on disk.
    """

    def __init__(self, sampler, prompts: list[str], gen, base, *, min_weight: float = 1.0,
                 workdir: str | Path | None = None) -> None:
        if not prompts:
            raise ConfigError("prompts=[] is not accepted: the objective needs at least one calibration prompt")
        if not (math.isfinite(min_weight) and min_weight >= 0):
            raise ConfigError(f"min_weight={min_weight!r} is out of range: accepted [0, inf)")
        self.sampler, self.prompts, self.gen, self.base = sampler, list(prompts), gen, base
        self.min_weight = float(min_weight)
        self.path = None if workdir is None else Path(workdir) / "evals.json"
        self.identity = {"prompts": self.prompts, "generation": dataclasses.asdict(gen),
                         "guidance": sampler.guidance(gen), "base": base.to_dict(),
                         "model_id": getattr(sampler.model.config, "model_id", None)}
        self.evals: dict[str, list[float]] = self._load()
        self.evaluations = 0  # fresh ones, this run
        self.seconds = 0.0
        self._dense: torch.Tensor | None = None

    def _load(self) -> dict[str, list[float]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"refine checkpoint {self.path} is corrupt ({e}): delete it to start over") from e
        if not isinstance(data, dict) or data.get("format") != EVALS_FORMAT:
            raise WeightsError(f"refine checkpoint {self.path} is not a {EVALS_FORMAT} file")
        if data.get("identity") != json.loads(json.dumps(self.identity)):
            raise ConfigError(f"refine checkpoint {self.path} was made with other settings (prompts, generation or "
                              "base config): use another --checkpoint folder")
        evals = data.get("evals")
        if not isinstance(evals, dict) or ("digest" in data and data["digest"] != _evals_digest(data)):
            raise WeightsError(f"refine checkpoint {self.path} is corrupt (its SHA-256 does not match its content): "
                               "delete it to start over")
        try:
            return {k: [float(x) for x in v] for k, v in evals.items()}
        except (TypeError, ValueError) as e:
            raise WeightsError(f"refine checkpoint {self.path} is corrupt ({e}): delete it to start over") from e

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {"format": EVALS_FORMAT, "identity": self.identity, "evals": self.evals}
        tmp.write_text(json.dumps({**data, "digest": _evals_digest(data)}))
        fault_point("search_write")
        tmp.replace(self.path)

    def _generate(self, config) -> torch.Tensor:
        from vdit_accel.search.joint import _generate

        return _generate(self.sampler, self.prompts, self.gen, config)

    def dense(self) -> torch.Tensor:
        """The dense videos `[P, C, F, H, W]` of the prompts: generated once, kept in ``workdir/dense.safetensors``
        (beside the evaluations, so under the same identity); a file that does not load or does not match the
        prompts' shape is regenerated."""
        if self._dense is not None:
            return self._dense
        path = None if self.path is None else self.path.with_name("dense.safetensors")
        if path is not None and path.exists():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                video = load_file(path)["video"]
            except (SafetensorError, OSError, KeyError):
                video = None  # corrupt or cut short: regenerate below
            if video is not None and video.shape[0] == len(self.prompts) and torch.isfinite(video).all():
                self._dense = video
                return video
        video = self._generate(None)
        if not torch.isfinite(video).all():
            raise ConfigError("the dense reference videos hold non-finite values: refusing to score against them")
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"video": video.contiguous()}, tmp)
            tmp.replace(path)
            self._save()  # the identity, written with the reference it guards
        self._dense = video
        return video

    def psnr(self, schedule: Sequence[StepChoice]) -> list[float]:
        """Per-prompt PSNR (dB) of the schedule's videos against dense; computed once, then replayed."""
        from vdit_accel.search.joint import _psnr, schedule_to_config

        key = schedule_key(schedule)
        if key not in self.evals:
            t0 = time.perf_counter()
            ps = _psnr(self.dense(), self._generate(schedule_to_config(schedule, self.base)))
            if not all(math.isfinite(p) for p in ps):
                raise ConfigError(f"schedule {key} gave a non-finite PSNR {ps}: refusing to record it")
            self.evals[key] = ps
            self.evaluations += 1
            self.seconds += time.perf_counter() - t0
            self._save()
        return self.evals[key]

    def score(self, psnr: Sequence[float]) -> float:
        return float(np.mean(psnr) + self.min_weight * np.min(psnr))

    def __call__(self, schedule: Sequence[StepChoice]) -> float:
        return self.score(self.psnr(schedule))


# ------------------------------------------------------------------------------------------ the search
def refine_schedule(objective: Callable[[Sequence[StepChoice]], float], latency: LatencyModel,
                    target_speedup: float, seeds: dict[str, Sequence[StepChoice]], *, dense_steps: int = 1,
                    max_evals: int = DEFAULT_MAX_EVALS, seed: int = 0, orders: Sequence[int] = (0, 1, 2),
                    progress: Callable[[str], None] | None = None) -> tuple[list[StepChoice], dict]:
    """Best seed, then first-improvement local search under ``latency.speedup(s) >= target_speedup``.

    Args:
        objective: schedule -> score (higher is better), e.g. a :class:`FinalVideoObjective`.
        seeds: named start schedules; those missing the target are dropped (recorded).
        max_evals: budget of objective calls, seeds included (a call replayed from a checkpoint counts too, so a
            resumed search takes exactly the path of an uninterrupted one).
        seed: order of the moves tried.

    Returns:
        `(schedule, record)`: record has every seed's score, the accepted moves and the evaluation count.
    """
    if max_evals < 1:
        raise ConfigError(f"max_evals={max_evals!r} is out of range: accepted [1, inf)")
    calls = [0]  # objective calls so far, replays included

    def score(s):
        calls[0] += 1
        return objective(s)

    seed_scores, dropped = {}, {}
    for name, s in seeds.items():
        sp = latency.speedup(list(s))
        if sp < target_speedup:
            dropped[name] = round(sp, 4)
            continue
        seed_scores[name] = score(s)
        if progress:
            progress(f"seed {name}: {seed_scores[name]:.3f}")
    if not seed_scores:
        raise ConfigError(f"no seed schedule reaches target_speedup={target_speedup}: {dropped}")
    start = max(seed_scores, key=seed_scores.get)
    best, best_score = list(seeds[start]), seed_scores[start]
    rng = np.random.default_rng(seed)
    accepted = []
    improved = True
    while improved and calls[0] < max_evals:
        improved = False
        moves = [m for m in neighbours(best, dense_steps, orders) if latency.speedup(m[1]) >= target_speedup]
        for k in rng.permutation(len(moves)):
            if calls[0] >= max_evals:
                break
            what, cand = moves[k]
            s = score(cand)
            if s > best_score + 1e-9:
                accepted.append({"move": what, "score": s, "evaluations": calls[0]})
                if progress:
                    progress(f"accept {what}: {best_score:.3f} -> {s:.3f} ({calls[0]} evaluations)")
                best, best_score, improved = cand, s, True
                break
    record = {"seeds": seed_scores, "seeds_below_target": dropped, "start": start, "accepted": accepted,
              "score": best_score, "converged": not improved, "max_evals": max_evals,
              "predicted_speedup": round(latency.speedup(best), 4), "key": schedule_key(best)}
    return best, record


def cadence_seeds(latency: LatencyModel, steps: int, target_speedup: float, *, warmups: Sequence[int] = (3, 4),
                  orders: Sequence[int] = (1,), gammas: Sequence[float] = DEFAULT_GAMMAS
                  ) -> dict[str, list[StepChoice]]:
    """Seeds for :func:`refine_schedule`: TaylorSeer cadences that reach the target (at most 25% faster than it),
    and spread schedules with the most computed steps the target affords, for each warm-up, order and spacing."""
    out = {}
    for i in range(2, steps):
        s = taylorseer_cadence(steps, i)
        if target_speedup <= latency.speedup(s) <= 1.25 * target_speedup:
            out[f"taylorseer-i{i}"] = s
    for w in warmups:
        for o in orders:
            if w > steps or latency.speedup(spread_schedule(steps, w, w, o)) < target_speedup:
                continue  # this warm-up alone misses the target
            n = max_full_steps(latency, steps, w, o, target_speedup)
            for g in gammas:
                s = spread_schedule(steps, n, w, o, g)
                if latency.speedup(s) >= target_speedup:
                    out[f"spread-w{w}-o{o}-g{g:g}"] = s
    return out
