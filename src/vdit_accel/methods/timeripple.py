"""TimeRipple: channel-wise partial attention-score reuse inside video self-attention.

Four named parts, as every method here: :class:`TimeRippleConfig`, :class:`TimeRippleStats` (the
per-generation record), :class:`TimeRippleProcessor` (the replacement self-attention processor) and
:func:`apply_timeripple` returning a removable :class:`TimeRippleHandle`.

The processor computes projections, QK-norm and RoPE exactly as the stock processor (through the model
adapter), builds the reuse masks of post-RoPE Q and K on the token grid published by the root context
hook, substitutes reused elements (Q̃/K̃, exactly equal to reusing partial scores) and runs ordinary
attention. At a step whose threshold is 0 (dense steps, or threshold 0 everywhere) it hands the call to
the original processor untouched, so the output is bit-identical to the unpatched model. Only video
self-attention is replaced; cross-attention keeps its processor.

What is saved is reported as "QK savings" (the fraction of Q·Kᵀ channel products that reuse makes
unnecessary), never as a speedup: this implementation simulates the reuse exactly and runs dense
attention; it is not faster.

Under ``torch.compile`` (``docs/compile.md``) the root context hook's planner decides θ on the host and hands it to
the processors as a device tensor; "exact_sim" then traces without graph breaks (``COMPILED_VARIANTS`` graphs) and
leaves its stats as integer counts that :meth:`TimeRippleStats.flush` records. The row-removing variants have
data-dependent row counts: a compiled call runs them as one opaque custom op (``ops.timeripple_compile``) whose output
has the query's shape, so they trace without breaks into the same ``COMPILED_VARIANTS`` graphs.

Example:
    >>> from vdit_accel.testing import tiny_model, TINY_PROMPT
    >>> from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    >>> model = tiny_model()
    >>> handle = apply_timeripple(model.transformer, TimeRippleConfig(theta_min=0.5, theta_max=1.0, i_min=1,
    ...                                                                i_max=2, num_steps=4))
    >>> _ = Sampler(model)(TINY_PROMPT, GenerationConfig(steps=4, guidance=1.0), progress=False)
    >>> 0.0 < handle.stats.summary()["qk_savings_active"] <= 1.0
    True
    >>> handle.remove()
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vdit_accel.adapters import ModelAdapter, resolve_adapter
from vdit_accel.config_io import (
    check_bool,
    check_float,
    check_int,
    check_sequence,
    check_str,
    config_from_dict,
    config_to_dict,
)
from vdit_accel.context import ContextHook, acquire_context, release_context
from vdit_accel.errors import ConfigError, UnsupportedModelError
from vdit_accel.ops.attention import row_subset_attention
from vdit_accel.ops.schedule import MAX_STEPS
from vdit_accel.ops.timeripple import (
    AXES,
    MIN_DELTA,
    THRESHOLD_MODES,
    ReuseStats,
    RopeGroup,
    ThresholdSchedule,
    _build_stats,
    group_elements,
    group_sum,
    mode_thresholds,
    qk_savings,
    resolve_reuse,
    reuse_masks,
    timeripple_attention,
)
from vdit_accel.ops.timeripple_compile import group_masks, timeripple_rows_attention, unpack_stats
from vdit_accel.ops.timeripple_structured import (
    DEFAULT_ROW_FRACTION,
    VARIANTS,
    check_row_fraction,
    row_masks,
    structured_timeripple_attention,
)
from vdit_accel.ops.timeripple_tokens import (
    KEY_MERGES,
    TokenDecisions,
    substitute_keys,
    token_decisions,
    tokens_timeripple_attention,
)
from vdit_accel.registry import Method, register_method
from vdit_accel.search.presets import preset_operating_point
from vdit_accel.transaction import drop_empty_created, transactional

logger = logging.getLogger(__name__)

MAX_PENDING_SLOTS = 4096  # compiled calls whose stats wait on the device for flush()
COMPILED_VARIANTS = 2
"""Graphs a compiled block compiles for any variant (per block shape): a dense step and a reuse step. θ reaches the
graph as a device tensor and the step, CFG branch and layer not at all, so neither the ramp nor the branch
recompiles; the row-removing variants' removed counts stay inside an opaque op (``docs/compile.md``)."""
MAX_WINDOW = 64  # window size K along an axis; larger than any latent axis of a supported model
MAX_LAYER = 1023  # block indices (the largest supported models have tens of blocks)


@dataclass(frozen=True)
class TimeRippleConfig:
    """TimeRipple settings; validated on construction (every bad value raises :class:`ConfigError`).

    Args:
        theta_min (`float`, defaults 0.2), theta_max (`float`, defaults 0.5): threshold ramp ends (>= 0).
        i_min (`int`, defaults 10), i_max (`int`, defaults 20): 0-based ramp steps (dense before ``i_min``).
        num_steps (`int`, defaults 50): denoising steps of the generation (the last step is dense).
        literal_schedule (`bool`, defaults False): Eq. 4 as printed (no ``+theta_min``) instead of the coherent ramp.
        fixed_threshold (`float | None`, defaults None): if set, this threshold at every step (no dense steps);
            the "fixed threshold" ablation.
        window (`int`, defaults 2): window size K along each axis (>= 2).
        axes (`tuple[str, ...]`, defaults ("t", "h", "w")): axes checked (any non-empty subset).
        priority (`str`, defaults "thw"): reuse source when several axes pass: an axis order, or "min_delta".
        threshold_mode (`str`, defaults "shared"): "shared" (one θ), "per_axis" (θ times ``axis_scale``), or
            "per_channel" (θ times each channel's mean |value| relative to the head mean, per call).
        axis_scale (`tuple[float, float, float]`, defaults (1, 1, 1)): per-axis multipliers (t, h, w) for "per_axis".
        layers (`tuple[int, ...] | None`, defaults None): block indices to accelerate (None = all).
        reuse_q (`bool`, defaults True), reuse_k (`bool`, defaults True): which side may reuse.
        variant (`str`, defaults "exact_sim"): how reuse is executed (``ops.timeripple_structured.VARIANTS``):
            "exact_sim" (element decisions, Q̃/K̃ then dense attention; bit-identical to earlier releases),
            "exact_rows" (same decisions and output up to float rounding, rows/keys entirely equal to their anchor
            are removed), "token_rows" (whole-row decisions, rows/keys removed; approximates "exact_sim") or
            "tokens" (one decision per token for every head and for q and k together, from the *relative* windowed
            spread, so θ is scale free in [0, 1]; unique query tokens and merged keys; the fast variant, see
            ``ops.timeripple_tokens``; threshold_mode must be "shared").
        row_fraction (`float | None`, defaults None): for "token_rows", the share of a row's channels that must
            pass along an axis for the whole row to reuse, in (0, 1]; None means 0.9. Rejected for other variants.
        key_merge (`str`, defaults "root"): for "tokens" with ``reuse_k``, the key a group of merged keys attends
            with: "root" (the root's key, TimeRipple's K̃ substitution) or "mean" (the group's mean key, centroid
            merging: the first-order logit error cancels; ``ops.timeripple_tokens.token_dedup_attention``).
            "mean" is rejected where it would do nothing (another variant, or no key reuse).
        decision_interval (`int`, defaults 1): for "tokens", the per-token decisions (which tokens merge into which
            root) a layer takes at a reuse step of a CFG branch are kept for the reuse calls of the next
            ``decision_interval - 1`` denoising steps (counted in steps, not in reuse calls: under a whole-step
            Astraea cadence that computes every 4th step, 4 keeps nothing); the merge still sums the current keys
            and values; 1 decides on every call. Decisions are also taken afresh whenever θ, the grid or the shape
            changes, and at every new generation. Rejected (> 1) for other variants, where nothing would be kept.
    """

    theta_min: float = 0.2
    theta_max: float = 0.5
    i_min: int = 10
    i_max: int = 20
    num_steps: int = 50
    literal_schedule: bool = False
    fixed_threshold: float | None = None
    window: int = 2
    axes: tuple[str, ...] = AXES
    priority: str = "thw"
    threshold_mode: str = "shared"
    axis_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layers: tuple[int, ...] | None = None
    reuse_q: bool = True
    reuse_k: bool = True
    variant: str = "exact_sim"
    row_fraction: float | None = None
    key_merge: str = "root"
    decision_interval: int = 1

    def __post_init__(self) -> None:
        for name in ("theta_min", "theta_max"):
            check_float(name, getattr(self, name), lo=0.0)
        check_int("num_steps", self.num_steps, lo=1, hi=MAX_STEPS)
        check_int("i_min", self.i_min, lo=0, hi=self.num_steps - 1)
        check_int("i_max", self.i_max, lo=0, hi=self.num_steps - 1)
        for name in ("literal_schedule", "reuse_q", "reuse_k"):
            check_bool(name, getattr(self, name))
        if isinstance(self.axes, str):  # "thw" is read as ("t", "h", "w")
            object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "axes", check_sequence("axes", self.axes, max_len=len(AXES)))
        for a in self.axes:
            check_str("axis", a, AXES)
        scale = check_sequence("axis_scale", self.axis_scale)
        if len(scale) != 3:
            raise ConfigError(f"axis_scale={self.axis_scale!r} is not accepted: three values >= 0 (t, h, w)")
        object.__setattr__(self, "axis_scale", tuple(check_float(f"axis_scale[{i}]", x, lo=0.0)
                                                     for i, x in enumerate(scale)))
        if self.layers is not None:
            layers = check_sequence("layers", self.layers)
            object.__setattr__(self, "layers", tuple(check_int(f"layers[{i}]", x, lo=0, hi=MAX_LAYER)
                                                     for i, x in enumerate(layers)))
        _ = self.schedule  # validates the ramp (theta_min <= theta_max, i_min <= i_max)
        if self.fixed_threshold is not None:  # inf is accepted: every candidate reuses (the 7/8 oracle)
            check_float("fixed_threshold", self.fixed_threshold, lo=0.0, allow_inf=True)
        check_int("window", self.window, lo=2, hi=MAX_WINDOW)
        if not self.axes or len(set(self.axes)) != len(self.axes):
            raise ConfigError(f"axes={self.axes!r} is not accepted: a non-empty subset of {list(AXES)}")
        check_str("priority", self.priority)
        if self.priority != MIN_DELTA and sorted(self.priority) != sorted("".join(AXES)):
            raise ConfigError(f"priority={self.priority!r} is not accepted: a permutation of 'thw' or 'min_delta'")
        check_str("threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        if not (self.reuse_q or self.reuse_k):
            raise ConfigError("reuse_q=False and reuse_k=False reuse nothing: enable at least one")
        check_str("variant", self.variant, VARIANTS)
        if self.row_fraction is not None:
            if self.variant != "token_rows":
                raise ConfigError(f"row_fraction={self.row_fraction!r} is not accepted with variant={self.variant!r}: "
                                  "only 'token_rows' takes row decisions")
            check_row_fraction(self.row_fraction)
        check_str("key_merge", self.key_merge, KEY_MERGES)
        if self.key_merge != "root" and (self.variant != "tokens" or not self.reuse_k):
            raise ConfigError(f"key_merge={self.key_merge!r} is not accepted with variant={self.variant!r}, "
                              f"reuse_k={self.reuse_k}: only the 'tokens' variant with key reuse merges keys")
        check_int("decision_interval", self.decision_interval, lo=1, hi=MAX_STEPS)
        if self.decision_interval > 1 and self.variant != "tokens":
            raise ConfigError(f"decision_interval={self.decision_interval} is not accepted with variant="
                              f"{self.variant!r}: only the 'tokens' variant keeps its decisions between steps")
        if self.variant == "tokens" and self.threshold_mode != "shared":
            raise ConfigError(f"threshold_mode={self.threshold_mode!r} is not accepted with variant='tokens': its "
                              "one relative threshold is shared by every axis and channel ('shared')")

    def resampled(self, num_steps: int) -> TimeRippleConfig:
        """This config over normalised denoising time, for ``num_steps`` steps.

        The ramp steps scale by ``num_steps / self.num_steps`` with rounding (``i_min`` and ``i_max`` each
        ``round(i * num_steps / self.num_steps)``), thresholds and ``fixed_threshold`` are unchanged. Raises
        :class:`ConfigError` when the ramp cannot fit: a schedule (no ``fixed_threshold``) needs
        ``round(i_max * r) < num_steps - 1`` so that at least one reuse step precedes the dense last step.

        Example:
            >>> c = TimeRippleConfig().resampled(25)
            >>> (c.i_min, c.i_max, c.num_steps)
            (5, 10, 25)
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ConfigError(f"num_steps={num_steps!r} is not accepted: an int >= 1")
        if num_steps == self.num_steps:
            return self
        r = num_steps / self.num_steps
        i_min, i_max = round(self.i_min * r), round(self.i_max * r)
        if self.fixed_threshold is None and i_max >= num_steps - 1:
            raise ConfigError(f"this schedule (i_min={self.i_min}, i_max={self.i_max} of {self.num_steps} steps) "
                              f"cannot be resampled to num_steps={num_steps}: the ramp ends at step {i_max}, "
                              f"which leaves no reuse step before the dense last step {num_steps - 1}")
        i_max = min(i_max, num_steps - 1)
        return dataclasses.replace(self, i_min=min(i_min, i_max), i_max=i_max, num_steps=num_steps)

    @property
    def schedule(self) -> ThresholdSchedule:
        return ThresholdSchedule(self.theta_min, self.theta_max, self.i_min, self.i_max, self.num_steps,
                                 literal=self.literal_schedule)

    def threshold_at(self, step: int) -> float:
        """θ at a 0-based step (0 = dense)."""
        if self.fixed_threshold is not None:
            return self.fixed_threshold
        return self.schedule.at(step)

    @classmethod
    def hunyuan_video(cls, num_steps: int = 50) -> TimeRippleConfig:
        """The paper's published HunyuanVideo values (0.2 / 0.5 / 10 / 20 at 50 steps)."""
        s = ThresholdSchedule.hunyuan_video(num_steps)
        return cls(theta_min=s.theta_min, theta_max=s.theta_max, i_min=s.i_min, i_max=s.i_max, num_steps=num_steps)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TimeRippleConfig:
        return config_from_dict(cls, d)


@dataclass
class TimeRippleStats:
    """Per-call reuse records, keyed by (branch, step, layer); :meth:`summary` aggregates them."""

    calls: dict[tuple[str, int, int], ReuseStats] = field(default_factory=dict)
    dense_calls: int = 0
    generations: int = 0
    _sums: dict = field(default_factory=lambda: defaultdict(list))
    _pending: list = field(default_factory=list)  # _StatsSlot of compiled calls, resolved by flush()

    def flush(self) -> None:
        """Turn the compiled calls' device-side mask counts into records (one host sync; :meth:`summary` calls it).

        A compiled processor cannot build :class:`ReuseStats` (floats need a sync): it leaves integer counts in a
        slot that the root hook's planner made for its (branch, step, layer), and they are converted here, to
        exactly the numbers an eager call records.
        """
        pending, self._pending = self._pending, []
        for slot in pending:
            if slot.dense:
                self.dense_calls += 1
            elif slot.sums is not None:
                q_sums, k_sums = slot.sums
                self.record(slot.branch, slot.step, slot.layer,
                            _stats_from_sums(q_sums, k_sums, slot.shape, slot.axes, slot.groups))
            elif slot.packed is not None:  # a row-removing variant: ops.timeripple_compile's packed ReuseStats
                self.record(slot.branch, slot.step, slot.layer,
                            unpack_stats(slot.packed, slot.axes, tuple(slot.groups), slot.shape[2]))

    def record(self, branch: str, step: int, layer: int, stats: ReuseStats) -> None:
        self.calls[(branch, step, layer)] = stats
        self._sums["qk"].append(stats.qk_savings)
        self._sums["q"].append(stats.q_reuse)
        self._sums["k"].append(stats.k_reuse)
        self._sums["step"].append(step)
        for g, v in stats.q_reuse_per_group.items():
            self._sums[f"q_{g}"].append(v)
        for g, v in stats.k_reuse_per_group.items():
            self._sums[f"k_{g}"].append(v)
        for a, v in stats.q_reuse_per_axis.items():
            self._sums[f"qa_{a}"].append(v)
        self._sums["rows_removed"].append(stats.rows_removed)
        self._sums["keys_removed"].append(stats.keys_removed)
        self._sums["attn_work"].append(stats.attn_work)

    def reset(self) -> None:
        self.calls.clear()
        self._sums.clear()
        self._pending.clear()
        self.dense_calls = 0
        self.generations = 0

    def per_step_savings(self) -> dict[int, float]:
        """Mean QK savings per step over layers, branches and generations (dense steps absent)."""
        self.flush()
        by: dict[int, list[float]] = defaultdict(list)
        for s, v in zip(self._sums["step"], self._sums["qk"]):
            by[s].append(v)
        return {s: float(np.mean(v)) for s, v in sorted(by.items())}

    def summary(self) -> dict:
        """JSON-able aggregate: QK savings over reuse-active calls and over all self-attention calls.

        ``rows_removed_active`` / ``keys_removed_active`` are the mean fractions of query rows / keys a structured
        variant did not compute (0 for "exact_sim"); ``attn_work_active`` the mean share of dense score work run.
        """
        self.flush()
        active = len(self._sums["qk"])
        total = active + self.dense_calls

        def mean(key: str) -> float:
            return round(float(np.mean(self._sums[key])), 4) if self._sums.get(key) else 0.0

        out = {
            "qk_savings_active": mean("qk"),
            "qk_savings_all": round(float(np.sum(self._sums["qk"]) / total), 4) if total else 0.0,
            "q_reuse_active": mean("q"),
            "k_reuse_active": mean("k"),
            "rows_removed_active": mean("rows_removed"),
            "keys_removed_active": mean("keys_removed"),
            "attn_work_active": mean("attn_work") if active else 1.0,
            "active_calls": active,
            "dense_calls": self.dense_calls,
        }
        for g in AXES:
            if self._sums.get(f"q_{g}"):
                out[f"q_reuse_group_{g}"] = mean(f"q_{g}")
                out[f"k_reuse_group_{g}"] = mean(f"k_{g}")
            if self._sums.get(f"qa_{g}"):
                out[f"q_pass_axis_{g}"] = mean(f"qa_{g}")
        return out


@dataclass
class _StatsSlot:
    """Where a compiled call leaves its stats: made on the host per (branch, step, layer), filled in the graph."""

    branch: str
    step: int
    layer: int
    axes: tuple[str, ...]
    groups: dict[str, RopeGroup]
    dense: bool = False
    sums: tuple | None = None  # (q sums, k sums) of _mask_sums, device tensors
    packed: torch.Tensor | None = None  # a row-removing variant's stats (ops.timeripple_compile.pack_stats)
    shape: tuple[int, ...] = ()


@dataclass
class _CallPlan:
    """One processor's host-side decisions for one transformer call (made by :class:`_Planner`).

    ``theta`` (float) decides dense vs reuse; ``theta_t`` is the same θ as a 0-d float64 tensor on the model's
    device, which is what a compiled call compares against (a float would be a constant of the graph: one recompile
    per ramp value). ``grid`` is the token grid, ``slot`` where a compiled call leaves its stats.
    """

    theta: float
    theta_t: torch.Tensor | None
    grid: tuple[int, int, int]
    branch: str
    step: int
    text_prefix: int
    text_suffix: int
    slot: _StatsSlot | None = None


def _mask_sums(masks, groups: dict[str, RopeGroup]) -> dict | None:
    """Integer counts of a side's masks, computed in the graph: everything :func:`_stats_from_sums` needs."""
    if masks is None:
        return None
    reused = masks.any  # [B, S, H, D]
    return {"any": reused.sum(), "axis": {a: m.sum() for a, m in masks.per_axis.items()},
            "group": {g: group_sum(reused, sel) for g, sel in groups.items()}, "rate": reused.sum(1)}


def _side_from_sums(sums: dict | None, shape: tuple[int, ...], axes, groups: dict[str, RopeGroup]):
    """Host twin of ``ops.timeripple._side_stats`` from :func:`_mask_sums` counts (identical numbers)."""
    if sums is None:
        rate = torch.zeros(shape[0], shape[2], shape[3], dtype=torch.float64)
        return 0.0, dict.fromkeys(axes, 0.0), dict.fromkeys(groups, 0.0), rate
    n = int(np.prod(shape))
    per_axis = {a: int(v) / n for a, v in sums["axis"].items()}
    per_group = {g: int(sums["group"][g]) / group_elements(sel, shape) for g, sel in groups.items()}
    return int(sums["any"]) / n, per_axis, per_group, sums["rate"].cpu().double() / shape[1]


def _stats_from_sums(q_sums, k_sums, shape, axes, groups) -> ReuseStats:
    q_all, q_axis, q_group, rq = _side_from_sums(q_sums, shape, axes, groups)
    k_all, k_axis, k_group, rk = _side_from_sums(k_sums, shape, axes, groups)
    per_head = qk_savings(rq, rk).mean(0)  # [H]
    return ReuseStats(q_all, k_all, q_axis, k_axis, q_group, k_group, float(per_head.mean()), per_head.tolist())


class _Planner:
    """TimeRipple's host side: after the root context hook publishes a call, decide θ for every processor (raising
    the schedule mismatch here, before any block runs) and give each a :class:`_CallPlan` and a stats slot."""

    def __init__(self, transformer: torch.nn.Module, config: TimeRippleConfig, stats: TimeRippleStats) -> None:
        self.transformer = transformer
        self.config = config
        self.stats = stats
        self.processors: list[TimeRippleProcessor] = []
        self._theta_tensors: dict[tuple, torch.Tensor] = {}

    def __call__(self, ctx) -> None:
        if not self.processors:
            return
        stats = self.stats
        stats._pending = [s for s in stats._pending  # eager calls fill none
                          if s.dense or s.sums is not None or s.packed is not None]
        if len(stats._pending) > MAX_PENDING_SLOTS:
            stats.flush()  # bounded device memory when summary() is never asked (one sync, outside the graph)
        theta = self.processors[0]._theta(ctx)
        theta_t = None
        if theta != 0.0:
            device = next(self.transformer.parameters()).device
            key = (device, theta)
            if key not in self._theta_tensors:
                self._theta_tensors[key] = torch.tensor(theta, dtype=torch.float64, device=device)
            theta_t = self._theta_tensors[key]
        for proc in self.processors:
            slot = _StatsSlot(ctx.branch, ctx.step_index, proc.layer, self.config.axes, proc.rope_groups)
            self.stats._pending.append(slot)
            proc.plan = _CallPlan(theta, theta_t, ctx.grid.as_tuple(), ctx.branch, ctx.step_index, ctx.text_prefix,
                                  ctx.text_suffix, slot)


class TimeRippleProcessor:
    """Replacement processor for one video self-attention module, any family: the model adapter splits the stock
    call into post-RoPE q/k/v and the output step (``ModelAdapter.qkv`` / ``attention_output``), so the processor
    takes the stock processor's arguments whatever they are (installed by ``ModelAdapter.install_processor``)."""

    _attention_backend = None

    @property
    def _parallel_config(self):
        return self.__dict__.get("_cp_config")

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        """diffusers' ``enable_parallelism`` sets it on the installed processor only: the stock processor this one
        calls at dense steps (and restores on removal) must run under the same context parallelism."""
        self.__dict__["_cp_config"] = config
        if hasattr(self.original, "_parallel_config"):
            self.original._parallel_config = config

    def __init__(self, layer: int, original, config: TimeRippleConfig, context: ContextHook,
                 rope_groups: dict[str, RopeGroup], stats: TimeRippleStats,
                 adapter: ModelAdapter | None = None) -> None:
        self.layer = layer
        self.original = original
        self.config = config
        self.context = context
        self.rope_groups = rope_groups
        self.stats = stats
        self.adapter = adapter
        self.decision_log: dict | None = None  # set by TimeRippleHandle.record_decisions ("tokens" variant)
        self.plan: _CallPlan | None = None  # set before every transformer call by the planner (host side)
        self._kept: dict = {}  # "tokens" decisions kept between steps (decision_interval): key -> (step, state, dec)

    def _token_decisions(self, key: tuple, ctx: _CallPlan, shape: tuple[int, int], compute) -> TokenDecisions:
        """The "tokens" decisions of a call with ``[B, S]`` tokens: the ones kept for ``key`` (branch and path) when
        they were taken fewer than ``decision_interval`` steps ago at the same θ, grid and shape, else ``compute()``
        (kept for the next calls); a step index that went back (a new generation) decides afresh."""
        interval = self.config.decision_interval
        if interval == 1:
            return compute()
        state = (ctx.theta, tuple(ctx.grid), tuple(shape))
        kept = self._kept.get(key)
        if kept is not None and 0 <= ctx.step - kept[0] < interval and kept[1] == state:
            return kept[2]
        dec = compute()
        self._kept[key] = (ctx.step, state, dec)
        return dec

    def _theta(self, ctx) -> float:
        cfg = self.config
        if cfg.fixed_threshold is None and ((ctx.num_steps is not None and ctx.num_steps != cfg.num_steps)
                                            or ctx.step_index >= cfg.num_steps):
            steps = ctx.num_steps if ctx.num_steps is not None else f"> {ctx.step_index}"
            raise ConfigError(f"this TimeRipple schedule was made for num_steps={cfg.num_steps}, the sampler runs "
                              f"{steps} steps: resample it (config.resampled(num_steps), or load_preset(..., "
                              "steps=N)) or use fixed_threshold")
        return cfg.threshold_at(ctx.step_index)

    def _current_plan(self) -> _CallPlan:
        """The planner's plan for this call; a processor used without one (built by hand) plans from its context."""
        if self.plan is not None:
            return self.plan
        ctx = getattr(self.context, "current", None)
        if ctx is None:
            raise ConfigError("TimeRipple needs the root context hook: call the transformer as a whole model")
        return _CallPlan(self._theta(ctx), None, ctx.grid.as_tuple(), ctx.branch, ctx.step_index, ctx.text_prefix,
                         ctx.text_suffix)

    def _thresholds(self, theta: float, q: torch.Tensor, heads=None):
        """θ as the ops take it; ``heads`` (``parallel.timeripple.HeadGroup``): ``q`` holds one rank's share of the
        heads (Ulysses), and the "per_channel" mean |q| is taken over every rank's heads."""
        cfg = self.config
        return mode_thresholds(theta, q, cfg.threshold_mode, cfg.axes, cfg.axis_scale,
                               None if heads is None else heads.mean)

    def __call__(self, attn, *args, **kwargs):
        """The stock processor's call ``(attn, *args, **kwargs)``: reuse at a step with θ > 0, else the stock call.

        Under diffusers' Ulysses context parallelism the reuse runs inside the attention op, where the whole token
        grid is visible (``parallel.timeripple``).

        Raises:
            ParallelError: Ring context parallelism (the token grid is never whole on one rank), at every call.
            UnsupportedModelError: the call carries an attention mask with a variant other than "exact_sim".
        """
        plan = self._current_plan()
        if self._parallel_config is not None:
            from vdit_accel.parallel.timeripple import check_parallel_config

            check_parallel_config(self._parallel_config)
        theta = plan.theta
        call = self.adapter.qkv(attn, args, kwargs) if theta != 0.0 else None
        if call is None:  # a dense step, or a call that is not video self-attention
            if theta == 0.0:
                if torch.compiler.is_compiling() and plan.slot is not None:
                    plan.slot.dense = True  # counted on the host (an int counter here would be a graph constant)
                else:
                    self.stats.dense_calls += 1
            return self.original(attn, *args, **kwargs)
        if call.parallel_config is not None:  # Ulysses: the reuse runs inside the op, on the full sequence
            from vdit_accel.parallel.timeripple import ulysses_timeripple_attention

            return self.adapter.attention_output(attn, ulysses_timeripple_attention(self, call, plan), call)
        q, k, v = call.q, call.k, call.v
        cfg = self.config
        ctx = plan
        if call.mask is not None:
            return self._masked_call(attn, call, ctx, theta)
        if torch.compiler.is_compiling():
            traced = self._traced_exact_sim if cfg.variant == "exact_sim" else self._traced_rows
            return self.adapter.attention_output(attn, traced(q, k, v, call, plan), call)
        return self.adapter.attention_output(attn, self._reuse_attention(q, k, v, call, ctx), call)

    def _reuse_attention(self, q, k, v, call, ctx: _CallPlan, heads=None) -> torch.Tensor:
        """One reuse call's attention on `[B, S, H, D]` q/k/v at θ = ``ctx.theta`` > 0, by ``config.variant``; records
        the stats. ``heads`` (``parallel.timeripple.HeadGroup``): q/k/v hold one Ulysses rank's share of the heads
        (full sequence), and what pools over heads ("per_channel" θ, the "tokens" spreads) is reduced over the ranks.
        """
        cfg = self.config
        theta = ctx.theta
        groups = self.rope_groups if heads is None else heads.local_groups(self.rope_groups)
        kw = dict(
            grid=ctx.grid, thresholds=self._thresholds(theta, q, heads), window=cfg.window, axes=cfg.axes,
            priority=cfg.priority, text_prefix=call.text_prefix, text_suffix=call.text_suffix, reuse_q=cfg.reuse_q,
            reuse_k=cfg.reuse_k, rope_groups=groups,
        )
        if cfg.variant == "tokens":
            xs = [x for x, on in ((q, cfg.reuse_q), (k, cfg.reuse_k)) if on]
            kw["key_merge"] = cfg.key_merge
            # under Ulysses every rank decides on all heads: the per-token spread sums are all-reduced (channel_sum)
            kw["decisions"] = self._token_decisions(("attention", ctx.branch), ctx, tuple(q.shape[:2]), lambda: (
                token_decisions(xs, ctx.grid, theta, window=cfg.window, axes=cfg.axes, priority=cfg.priority,
                                text_prefix=call.text_prefix, text_suffix=call.text_suffix,
                                channel_sum=None if heads is None else heads.sum)))
            out, stats, dec = tokens_timeripple_attention(q, k, v, **kw)
            if self.decision_log is not None and dec is not None:
                self.decision_log[(ctx.branch, ctx.step, self.layer)] = dict(
                    spread={a: t[:1].detach().cpu() for a, t in dec.spread.items()}, grid=ctx.grid,
                    text_prefix=ctx.text_prefix, text_suffix=ctx.text_suffix, heads=q.shape[2], head_dim=q.shape[3])
        elif cfg.variant == "exact_sim":
            out, stats = timeripple_attention(q, k, v, **kw)
        else:
            out, stats = structured_timeripple_attention(
                q, k, v, variant=cfg.variant, row_fraction=cfg.row_fraction, **kw
            )
        self.stats.record(ctx.branch, ctx.step, self.layer, stats)
        return out

    def _traced_exact_sim(self, q, k, v, call, plan: _CallPlan) -> torch.Tensor:
        """The "exact_sim" call as ``torch.compile`` traces it: the same masks, resolution and SDPA as
        ``ops.timeripple.timeripple_attention``, against the device-side θ (``plan.theta_t``), with the stats left as
        integer counts in ``plan.slot`` (no host sync, no graph break). Returns `[B, S, H, D]`."""
        cfg = self.config
        kw = dict(window=cfg.window, axes=cfg.axes, text_prefix=call.text_prefix, text_suffix=call.text_suffix)
        th = self._thresholds(plan.theta_t, q)
        if isinstance(th, dict):  # per_axis: one [len(axes), D] tensor (a dict of tensors would be read as floats)
            th = torch.stack([th[a] for a in cfg.axes]).float()[:, None].expand(len(cfg.axes), q.shape[-1])
        q_masks = reuse_masks(q, plan.grid, th, **kw) if cfg.reuse_q else None
        k_masks = reuse_masks(k, plan.grid, th, **kw) if cfg.reuse_k else None
        qt = q if q_masks is None else resolve_reuse(q, q_masks, priority=cfg.priority)
        kt = k if k_masks is None else resolve_reuse(k, k_masks, priority=cfg.priority)
        out = F.scaled_dot_product_attention(qt.transpose(1, 2), kt.transpose(1, 2), v.transpose(1, 2))
        plan.slot.sums = (_mask_sums(q_masks, self.rope_groups), _mask_sums(k_masks, self.rope_groups))
        plan.slot.shape = tuple(q.shape)
        return out.transpose(1, 2)

    def _traced_rows(self, q, k, v, call, plan: _CallPlan) -> torch.Tensor:
        """A row-removing variant's call as ``torch.compile`` traces it: one opaque custom op
        (``ops.timeripple_compile.timeripple_rows_attention``, output of the query's shape, so the removed counts
        never reach the graph) running the eager op; its packed stats go to ``plan.slot``. Returns `[B, S, H, Dv]`."""
        cfg = self.config
        if self.decision_log is not None:
            raise ConfigError("record_decisions() is not supported under torch.compile: the 'tokens' decisions "
                              "are inside an opaque op; record them on an eager run")
        if cfg.decision_interval > 1:
            raise ConfigError(f"decision_interval={cfg.decision_interval} is not supported under torch.compile: the "
                              "'tokens' decisions are taken inside an opaque op on every call; use 1, or run eager")
        out, packed = timeripple_rows_attention(
            q, k, v, plan.theta_t, group_masks(self.rope_groups, q.shape[2], q.shape[3], q.device), list(plan.grid),
            cfg.variant, cfg.threshold_mode, list(cfg.axis_scale), cfg.row_fraction, cfg.window, "".join(cfg.axes),
            cfg.priority, call.text_prefix, call.text_suffix, cfg.reuse_q, cfg.reuse_k, cfg.key_merge)
        plan.slot.packed = packed
        plan.slot.shape = tuple(q.shape)
        return out

    def _masked_call(self, attn, call, ctx, theta: float):
        """A call whose attention carries a mask (HunyuanVideo's text padding): the exact simulation substitutes the
        reused q/k elements (Q̃/K̃) and runs the adapter's raw attention op, which honours the mask. Only
        ``variant="exact_sim"``; the structured variants remove rows and keys and take no mask."""
        cfg = self.config
        if cfg.variant != "exact_sim":
            raise UnsupportedModelError(f"variant={cfg.variant!r} is not supported where self-attention carries an "
                                        f"attention mask ({self.adapter.family or type(self.adapter).__name__}): "
                                        "accepted ['exact_sim']")
        args = (ctx.grid, self._thresholds(theta, call.q), call.text_prefix, call.text_suffix)
        q_masks = self._decide(call.q, *args) if cfg.reuse_q else None
        k_masks = self._decide(call.k, *args) if cfg.reuse_k else None
        q = call.q if q_masks is None else resolve_reuse(call.q, q_masks, priority=cfg.priority)
        k = call.k if k_masks is None else resolve_reuse(call.k, k_masks, priority=cfg.priority)
        out = self.adapter.attention(attn, call, q, k, call.v)
        self.stats.record(ctx.branch, ctx.step, self.layer,
                          _build_stats(q_masks, k_masks, call.q.shape, cfg.axes, self.rope_groups))
        return self.adapter.attention_output(attn, out, call)

    def _decide(self, x: torch.Tensor, grid, thresholds, text_prefix: int, text_suffix: int):
        cfg = self.config
        masks = reuse_masks(x, grid, thresholds, window=cfg.window, axes=cfg.axes, text_prefix=text_prefix,
                            text_suffix=text_suffix)
        if cfg.variant == "token_rows":
            masks = row_masks(masks, DEFAULT_ROW_FRACTION if cfg.row_fraction is None else cfg.row_fraction)
        return masks

    def rows_attention(self, q_sel: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       scale: float | None = None,
                       key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """TimeRipple's reuse applied to a row-subset attention (the composition hook for row-selecting methods).

        Keys: every key reuses as in a normal call (masks on the full grid of the published context). Queries:
        only the selected rows exist, so a selected row reuses along an axis only when every token of its window
        along that axis is selected (its source is then selected too; unselected tokens enter the criterion as NaN,
        which never passes). Decisions follow ``config.variant`` ("token_rows" takes whole-row decisions); the
        reuse is applied by substitution (Q̃/K̃), never by removing rows, so the output is that variant's exact
        simulation and the LSE is exact for it. Stats are recorded as for a normal call (q fractions count over
        all ``S`` tokens, unselected ones as not reused). At a dense step this is plain ``row_subset_attention``.

        Args:
            q_sel (`torch.Tensor`): `[B, K, H, D]` post-RoPE queries of the selected rows.
            idx (`torch.Tensor`): `[B, K]` long, the token index in `[0, S)` of each selected row, distinct per batch.
            k (`torch.Tensor`): `[B, S, H, D]` post-RoPE keys of all tokens.
            v (`torch.Tensor`): `[B, S, H, D]` values of all tokens.
            scale (`float | None`, defaults to `None`): softmax scale, `1/sqrt(D)` when `None`.
            key_mask (`torch.Tensor | None`, defaults to `None`): `[B, S]` bool key-padding mask (``True`` =
                attended), handed to the row attention op after the reuse (masked keys are text padding, never
                reused nor a reuse source).

        Returns:
            out: `[B, K, H, D]`; lse: `[B, K, H]` (natural log), as ``ops.attention.row_subset_attention``.
        """
        ctx = self._current_plan()
        b, kk, h, d = q_sel.shape if q_sel.dim() == 4 else (None,) * 4
        if b is None or k.dim() != 4 or idx.shape != (b, kk) or k.shape[0] != b or k.shape[2:] != (h, d):
            raise ConfigError(f"q_sel {tuple(q_sel.shape)}, idx {tuple(idx.shape)}, k {tuple(k.shape)} are not "
                              "accepted: expected q_sel [B, K, H, D], idx [B, K], k and v [B, S, H, D]")
        if idx.dtype != torch.long or (kk and (int(idx.min()) < 0 or int(idx.max()) >= k.shape[1])):
            raise ConfigError(f"idx is not accepted: expected long token indices in [0, {k.shape[1]})")
        theta = ctx.theta
        if theta == 0.0:
            self.stats.dense_calls += 1
            return row_subset_attention(q_sel, k, v, scale=scale, key_mask=key_mask)
        cfg = self.config
        grid, thresholds = ctx.grid, self._thresholds(theta, q_sel)
        args = (grid, thresholds, ctx.text_prefix, ctx.text_suffix)
        q_masks = k_masks = None
        if cfg.variant == "tokens":  # keys reuse by whole tokens on the full grid; selected queries keep their values
            if not cfg.reuse_k:
                self.stats.dense_calls += 1
                return row_subset_attention(q_sel, k, v, scale=scale, key_mask=key_mask)
            dec = self._token_decisions(("rows", ctx.branch), ctx, tuple(k.shape[:2]), lambda: token_decisions(
                [k], grid, theta, window=cfg.window, axes=cfg.axes, priority=cfg.priority,
                text_prefix=ctx.text_prefix, text_suffix=ctx.text_suffix))
            k = substitute_keys(k, dec.root, cfg.key_merge)
            out, lse = row_subset_attention(q_sel, k, v, scale=scale, key_mask=key_mask)
            r = dec.reused
            self.stats.record(ctx.branch, ctx.step, self.layer, ReuseStats(
                0.0, r, dict.fromkeys(cfg.axes, 0.0), {a: float((dec.spread[a] < theta).float().mean())
                                                        for a in cfg.axes},
                dict.fromkeys(self.rope_groups, 0.0), dict.fromkeys(self.rope_groups, r), r, [r] * h))
            return out, lse
        if cfg.reuse_k:
            k_masks = self._decide(k, *args)
            k = resolve_reuse(k, k_masks, priority=cfg.priority)
        if cfg.reuse_q:
            where = idx.view(b, kk, 1, 1).expand(b, kk, h, d)
            full = q_sel.new_full((b, k.shape[1], h, d), float("nan")).scatter(1, where, q_sel)
            q_masks = self._decide(full, *args)
            q_sel = resolve_reuse(full, q_masks, priority=cfg.priority).gather(1, where)
        out, lse = row_subset_attention(q_sel, k, v, scale=scale, key_mask=key_mask)
        self.stats.record(ctx.branch, ctx.step, self.layer,
                          _build_stats(q_masks, k_masks, k.shape, cfg.axes, self.rope_groups))
        return out, lse


@dataclass
class TimeRippleHandle:
    """Returned by :func:`apply_timeripple`: live ``stats`` and ``remove()`` (restores the processors)."""

    transformer: torch.nn.Module
    stats: TimeRippleStats
    adapter: ModelAdapter | None = None
    _restore: list = field(default_factory=list)
    _removed: bool = False
    _context: ContextHook | None = None
    _planner_key: str = ""

    def record_decisions(self, log: dict | None) -> None:
        """Record the "tokens" variant's per-token spreads of every reuse call into ``log`` (``None`` stops).

        ``log[(branch, step, layer)] = {"spread": {axis: [1, S] cpu}, "grid", "text_prefix", "text_suffix",
        "heads", "head_dim"}`` (first batch element); used by speed calibration (``search.calibrate``).
        """
        for module, _ in self._restore:
            module.get_processor().decision_log = log

    def remove(self) -> None:
        if self._removed:
            return
        for module, processor in self._restore:
            self.adapter.restore_processor(module, processor)
        if self._context is not None:
            self._context.remove_planner(self._planner_key)
        self.stats.flush()
        release_context(self.transformer)
        drop_empty_created([self.transformer])  # the hook registry apply created for the context hook, now empty
        self._removed = True


def apply_timeripple(transformer: torch.nn.Module, config: TimeRippleConfig,
                     adapter: ModelAdapter | None = None) -> TimeRippleHandle:
    """Install TimeRipple on every (selected) video self-attention module of ``transformer``.

    Transactional (:mod:`vdit_accel.transaction`): if anything fails, nothing stays installed (every processor as
    it was, no hook registry the model did not have); the handle's ``remove()`` leaves the model as it was before.

    Raises:
        ConfigError: the model has no RoPE, ``layers`` names blocks the model does not have, or TimeRipple is
            already installed on this model (remove the first handle before applying again); nothing is installed.
        UnsupportedModelError: no adapter for the model class (pass ``adapter=``), or a variant other than
            ``"exact_sim"`` on a model whose self-attention always carries a mask (HunyuanVideo); nothing installed.
    """
    adapter = adapter or resolve_adapter(transformer)
    if not adapter.has_rope(transformer):
        raise ConfigError(f"{type(transformer).__name__} applies no RoPE in self-attention: TimeRipple needs RoPE "
                          "channel groups (post-RoPE Q/K)")
    if config.variant != "exact_sim" and adapter.masks_self_attention(transformer):
        raise UnsupportedModelError(f"variant={config.variant!r} is not supported on {type(transformer).__name__}: "
                                    "its self-attention always carries an attention mask (text padding), which only "
                                    "the exact simulation honours; accepted ['exact_sim']")
    blocks = adapter.blocks(transformer)
    layers = range(len(blocks)) if config.layers is None else config.layers
    bad = [i for i in layers if i >= len(blocks)]
    if bad:
        raise ConfigError(f"layers={list(bad)} are out of range: accepted [0, {len(blocks) - 1}]")
    installed = [i for i, blk in enumerate(blocks)
                 if isinstance(adapter.self_attention(blk).get_processor(), TimeRippleProcessor)]
    if installed:
        raise ConfigError(f"TimeRipple is already applied to this model (blocks {installed}): remove the first "
                          "handle before applying it again")
    stats = TimeRippleStats()
    handle = TimeRippleHandle(transformer, stats, adapter)
    groups = adapter.rope_groups(transformer)
    planner = _Planner(transformer, config, stats)
    with transactional([transformer]):  # a failure on any block leaves the model exactly as it was
        context = acquire_context(transformer, adapter, num_steps=config.num_steps)
        for i in layers:
            attn = adapter.self_attention(blocks[i])
            processor = TimeRippleProcessor(i, attn.get_processor(), config, context, groups, stats, adapter)
            original = adapter.install_processor(attn, processor)
            planner.processors.append(processor)
            handle._restore.append((attn, original))
            logger.debug("TimeRipple on block %d", i)
        handle._context, handle._planner_key = context, f"timeripple:{id(handle)}"
        context.add_planner(handle._planner_key, planner)
    return handle



register_method(
    Method("timeripple", TimeRippleConfig, apply_timeripple, "TimeRipple partial-score reuse (QK savings)"),
    # the exact simulation (QK savings, not faster) at its highest calibrated savings, and the 'tokens' variant
    # (keys merged, queries untouched) calibrated for attention-op speedups at W2 width: merged keys attend with
    # their group's mean key (-d4: decisions kept for 4 steps), and one point with the root's key (TimeRipple's K̃)
    [preset_operating_point("timeripple", name) for name in (
        "timeripple-85", "timeripple-op1.5x-root", "timeripple-op1.5x", "timeripple-op2x", "timeripple-op2.5x",
        "timeripple-op3x", "timeripple-op2x-d4", "timeripple-op2.5x-d4")],
)
