"""Astraea: per block and step, compute only a budget of selected tokens; the rest reuse cached outputs.

Four named parts: :class:`AstraeaConfig`, :class:`BlockState` (per block and CFG branch, reset every
generation), :class:`AstraeaBlockHook` (a diffusers ``ModelHook`` replacing each block's forward) and
:func:`apply_astraea` returning a removable :class:`AstraeaHandle`.

At step ``i`` with budget ``b_i`` every block scores its tokens, ``S = w_α·norm(LSE·Δ) + w_β·exp(n)``
(:mod:`vdit_accel.ops.astraea`), keeps the top ``round(b_i·N)`` and computes them through the adapter's
row-subset block (``ModelAdapter.block_rows_forward``): queries and everything after attention for the
selected rows only; the attention also returns the rows' LSE for the next score. Keys and values come from
every token (``kv="all"``, the paper), or with ``kv_reuse=True`` fresh for the selected rows and from the
block's K/V cache for the others. Cross-attention's text K/V are computed once per generation on this path.

Unselected rows take the block's cached output (``cache="output"``), or its Taylor forecast of order
``forecast`` (1 or 2: the cached output extrapolated per token over the steps since the token was last
computed, from divided differences of its last computed outputs; TaylorSeer's idea at token level), or the
cached output plus the input change (``cache="residual"``). A step of budget 0 computes no block at all
(no scoring either); when nothing wraps Astraea's hooks, only the last block forms its output, the others
pass their input through (their outputs would be ignored). Budget 1.0 and 0.0 steps do no scoring.

Caches are per block and per CFG branch and are freed when the generation ends (the pipeline/sampler resets
stateful hooks). A whole-step schedule (every budget 0 or 1) needs no scoring: its computed steps run the stock
block and only the last block keeps outputs (memory ~1/num_layers of the token-wise caches). At budget 1.0
for every step the hook calls the original block forward: bit-identical to the unpatched model.

Schedules live over normalised denoising time: :meth:`AstraeaConfig.resampled` maps a schedule made for
``num_steps`` to another step count (budgets by interval mean, which keeps the mean; orders by midpoint).

Composition: the row-subset attention calls through the self-attention's processor when it offers
``rows_attention`` (TimeRipple does), so both act; a diffusers hook that Astraea would bypass (one on a block
registered *before* Astraea, or any hook on a self-attention module) raises :class:`CompositionError`
naming the order that works (enable diffusers' block caches after ``apply_astraea``: they then wrap it).

Example:
    >>> from vdit_accel.testing import tiny_model, TINY_PROMPT
    >>> from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    >>> model = tiny_model()
    >>> handle = apply_astraea(model.transformer, AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4))
    >>> _ = Sampler(model)(TINY_PROMPT, GenerationConfig(steps=4, guidance=1.0), progress=False)
    >>> handle.stats.summary()["kept_ratio"]
    0.625
    >>> handle.remove()
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from vdit_accel.adapters import ModelAdapter, RowCache, resolve_adapter
from vdit_accel.config_io import (
    check_bool,
    check_float,
    check_int,
    check_sequence,
    check_str,
    config_from_dict,
    config_to_dict,
)
from vdit_accel.context import CONTEXT_HOOK, ContextHook, acquire_context, release_context
from vdit_accel.errors import CompositionError, ConfigError, UnsupportedModelError
from vdit_accel.ops.astraea import (
    LSE_REDUCTIONS,
    NORMS,
    SIGNAL_NORMALISATIONS,
    budget_to_count,
    input_delta,
    reduce_head_lse,
    select_topk,
    token_scores,
    update_skips,
)
from vdit_accel.ops.attention import probe_fast_path, row_subset_attention
from vdit_accel.ops.rows import gather_rows, scatter_rows_
from vdit_accel.ops.schedule import MAX_STEPS, resample_mean, resample_nearest
from vdit_accel.parallel.cp import (
    TIMERIPPLE_IN_ASTRAEA_ROWS,
    ParallelError,
    cp_rows_attention,
    is_cp_hook,
    processor_cp_config,
)
from vdit_accel.registry import Method, register_method
from vdit_accel.search.presets import preset_operating_point
from vdit_accel.transaction import drop_empty_created, transactional

logger = logging.getLogger(__name__)

BLOCK_HOOK = "vdit_accel.astraea"
CACHE_MODES = ("output", "residual")
SELECTIONS = ("dynamic", "fixed")
KV_SOURCES = ("all", "selected")
MAX_FORECAST_ORDER = 2
FORECAST_AXES = ("step", "timestep")
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROW_BUCKETS = 8
"""Under ``torch.compile`` a block computes ``ceil(N·j/ROW_BUCKETS)`` rows, ``j = ceil(budget·ROW_BUCKETS)``
(budgets rounded *up* to eighths, budget 0 stays 0): at most ``ROW_BUCKETS + 1`` row counts per block shape, so a
schedule compiles a bounded number of variants (:func:`compiled_row_counts`). The rounding is recorded
(``AstraeaStats.bucketed``) and logged; eager runs keep exact counts (``budget_to_count``)."""


@dataclass(frozen=True)
class AstraeaConfig:
    """Astraea settings; validated on construction (bad values raise :class:`ConfigError`).

    Args:
        budgets (`tuple[float, ...] | None`): fraction of tokens computed at each step, each in [0, 1]; length
            ``num_steps``. ``None``: a uniform schedule meeting ``target``.
        target (`float | None`): mean budget for the uniform schedule (when ``budgets`` is None), in (0, 1].
        num_steps (`int`, defaults 50): denoising steps the schedule is for.
        dense_steps (`int`, defaults 1): first steps always computed in full (need a cache to start from).
        w_alpha (`float`, defaults 1.0), w_beta (`float`, defaults 0.5): score weights, >= 0.
        delta_norm (`str`, defaults "l2"): norm of the input change Δ, one of ``NORMS``.
        lse_reduction (`str`, defaults "mean"): how per-head LSE becomes one value per token.
        normalize (`str`, defaults "mean"): scaling of LSE·Δ before the staleness penalty is added.
        cache (`str`, defaults "output"): unselected rows reuse the cached block "output" (paper) or
            cached output + input change ("residual").
        selection (`str`, defaults "dynamic"): per-block, per-step top-k ("dynamic"), or one token set chosen
            once and reused by every block and step ("fixed", the paper's FIXED-TOKEN ablation).
        kv (`str`, defaults "all"): K/V from all tokens (Astraea) or only the selected ones ("selected", the
            SELECT Q&K ablation).
        forecast (`int | tuple[int, ...]`, defaults 0): Taylor order (0, 1 or 2) of the unselected rows' cached
            output at each step (an int: every step); needs ``cache="output"``.
        forecast_axis (`str`, defaults "step"): the variable the forecast extrapolates over: "step" (the step
            index, diffusers TaylorSeer's convention) or "timestep" (the model's ``timestep`` input, i.e. the
            ODE time the sampler really moves through; schedulers with a shift space it unevenly).
        kv_reuse (`bool`, defaults False): fresh K/V projections for the selected rows only; the other rows' K/V
            come from the block's cache (computed when each token was last computed). Needs ``kv="all"``.
        cache_dtype (`str | None`, defaults None): storage dtype of the caches, one of ``CACHE_DTYPES`` (None:
            the activations' dtype).
        memory_cap_mb (`float | None`, defaults None): cap on the predicted cache memory of a generation (two
            CFG branches); above it Astraea degrades visibly (a warning, ``stats.degraded``): first fewer
            forecast terms, then no K/V reuse, instead of failing.
    """

    budgets: tuple[float, ...] | None = None
    target: float | None = None
    num_steps: int = 50
    dense_steps: int = 1
    w_alpha: float = 1.0
    w_beta: float = 0.5
    delta_norm: str = "l2"
    lse_reduction: str = "mean"
    normalize: str = "mean"
    cache: str = "output"
    selection: str = "dynamic"
    kv: str = "all"
    forecast: int | tuple[int, ...] = 0
    forecast_axis: str = "step"
    kv_reuse: bool = False
    cache_dtype: str | None = None
    memory_cap_mb: float | None = None

    def __post_init__(self) -> None:
        check_int("num_steps", self.num_steps, lo=1, hi=MAX_STEPS)
        check_int("dense_steps", self.dense_steps, lo=0, hi=self.num_steps)
        for name in ("w_alpha", "w_beta"):
            check_float(name, getattr(self, name), lo=0.0)
        check_str("delta_norm", self.delta_norm, NORMS)
        check_str("lse_reduction", self.lse_reduction, LSE_REDUCTIONS)
        check_str("normalize", self.normalize, SIGNAL_NORMALISATIONS)
        check_str("cache", self.cache, CACHE_MODES)
        check_str("selection", self.selection, SELECTIONS)
        check_str("kv", self.kv, KV_SOURCES)
        self._check_forecast()
        check_str("forecast_axis", self.forecast_axis, FORECAST_AXES)
        check_bool("kv_reuse", self.kv_reuse)
        if self.kv_reuse and self.kv != "all":
            raise ConfigError(f"kv_reuse=True with kv={self.kv!r} is not accepted: K/V reuse needs kv='all'")
        if self.cache_dtype is not None:
            check_str("cache_dtype", self.cache_dtype, CACHE_DTYPES)
        if self.memory_cap_mb is not None:
            check_float("memory_cap_mb", self.memory_cap_mb, lo=0.0, hi=float(2**40))
        if self.budgets is None and self.target is None:
            object.__setattr__(self, "target", 1.0)
        if self.budgets is not None:
            budgets = check_sequence("budgets", self.budgets)
            if len(budgets) != self.num_steps:
                raise ConfigError(f"budgets has {len(budgets)} entries: accepted exactly num_steps="
                                  f"{self.num_steps}")
            budgets = tuple(check_float(f"budgets[{i}]", b, lo=0.0, hi=1.0) for i, b in enumerate(budgets))
            object.__setattr__(self, "budgets", budgets)
        else:
            check_float("target", self.target, lo=0.0, hi=1.0, lo_open=True)
            lo = self.dense_steps / self.num_steps
            if self.target < lo:
                raise ConfigError(f"target={self.target} has no feasible schedule: with dense_steps="
                                  f"{self.dense_steps} of {self.num_steps} the mean budget is in [{lo:.4f}, 1.0]")

    @property
    def schedule(self) -> tuple[float, ...]:
        """The budget of every step (dense steps forced to 1.0)."""
        n, d = self.num_steps, self.dense_steps
        if self.budgets is not None:
            return tuple(1.0 if i < d else b for i, b in enumerate(self.budgets))
        rest = (self.target * n - d) / (n - d) if n > d else 1.0
        return tuple([1.0] * d + [min(1.0, max(0.0, rest))] * (n - d))

    @property
    def mean_budget(self) -> float:
        return float(np.mean(self.schedule))

    def _check_forecast(self) -> None:
        f = self.forecast
        if isinstance(f, list):
            f = tuple(f)
            object.__setattr__(self, "forecast", f)
        values = f if isinstance(f, tuple) else (f,)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_FORECAST_ORDER:
                raise ConfigError(f"forecast={v!r} is out of range: accepted an int in [0, {MAX_FORECAST_ORDER}]")
        if isinstance(f, tuple) and len(f) != self.num_steps:
            raise ConfigError(f"forecast has {len(f)} entries: accepted an int or exactly num_steps="
                              f"{self.num_steps}")
        if max(values) > 0 and self.cache != "output":
            raise ConfigError(f"forecast={f!r} with cache={self.cache!r} is not accepted: forecasting extrapolates "
                              "cached outputs, use cache='output'")

    @property
    def orders(self) -> tuple[int, ...]:
        """The forecast order of every step."""
        f = self.forecast
        return tuple(f) if isinstance(f, tuple) else (f,) * self.num_steps

    def resampled(self, num_steps: int) -> AstraeaConfig:
        """This schedule over normalised denoising time, for ``num_steps`` steps.

        Budgets take the interval mean of the old schedule (the mean budget is kept), forecast orders the
        midpoint's; ``dense_steps`` scales with the step count (at least 1 if it was). Raises
        :class:`ConfigError` when ``num_steps`` cannot hold the dense steps plus one.

        Example:
            >>> AstraeaConfig(budgets=(1.0, 0.0, 0.5, 0.5), num_steps=4, dense_steps=1).resampled(2).schedule
            (1.0, 0.5)
        """
        if num_steps == self.num_steps:
            return self
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ConfigError(f"num_steps={num_steps!r} cannot take this schedule: accepted an int >= 2")
        dense = max(min(self.dense_steps, 1), round(self.dense_steps * num_steps / self.num_steps))
        if num_steps <= dense:
            raise ConfigError(f"num_steps={num_steps!r} cannot take this schedule: its {dense} dense steps leave none")
        budgets = None if self.budgets is None else tuple(
            min(1.0, max(0.0, round(b, 12))) for b in resample_mean(self.budgets, num_steps))
        forecast = self.forecast if isinstance(self.forecast, int) else tuple(
            resample_nearest(self.forecast, num_steps))
        target = self.target if budgets is None else None
        return dataclasses.replace(self, budgets=budgets, target=target, num_steps=num_steps, forecast=forecast,
                                   dense_steps=dense)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AstraeaConfig:
        return config_from_dict(cls, d)


@dataclass
class BlockState:
    """Per block and CFG branch: last computed outputs and their history, inputs, LSE, skip counters, K/V.

    Shapes: ``out``, ``d1``, ``d2``, ``inp`` `[B, N, C]`; ``lse``, ``skips``, ``last``, ``hist`` `[B, N]`.
    ``out`` holds each token's output as last *computed* (never a forecast); ``d1``/``d2`` its first and
    second divided differences over steps, valid once the token was computed ``hist`` >= 2 / 3 times; ``last``
    the step it was last computed at.
    """

    out: torch.Tensor | None = None
    inp: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    skips: torch.Tensor | None = None
    d1: torch.Tensor | None = None
    d2: torch.Tensor | None = None
    last: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    rows: RowCache = field(default_factory=RowCache)

    def nbytes(self) -> int:
        ts = (self.out, self.inp, self.lse, self.skips, self.d1, self.d2, self.last, self.hist)
        return sum(t.numel() * t.element_size() for t in ts if t is not None) + self.rows.nbytes()


@dataclass
class AstraeaStats:
    """Kept-token ratio per (branch, step, block), cache memory and degradations; :meth:`summary` aggregates."""

    kept: dict[tuple[str, int, int], float] = field(default_factory=dict)
    cache_bytes_peak: int = 0
    forecast_calls: int = 0
    degraded: list[str] = field(default_factory=list)
    bucketed: dict[float, float] = field(default_factory=dict)
    _all: list = field(default_factory=list)
    _pending: list = field(default_factory=list)  # _BlockSlot of compiled block calls, resolved by flush()

    def flush(self) -> None:
        """Record the compiled block calls (their kept ratios were left in host-made slots); logs budget rounding.

        ``bucketed`` maps each budget a compiled run rounded to the kept ratio it computed instead.
        """
        pending, self._pending = self._pending, []
        new = {}
        for slot in pending:
            if slot.ratio is None:
                continue
            self.record(slot.branch, slot.step, slot.block, slot.ratio)
            self.forecast_calls += slot.forecast
            if slot.budget is not None and slot.budget not in self.bucketed and slot.ratio != slot.budget:
                new[slot.budget] = slot.ratio
        if new:
            self.bucketed.update(new)
            logger.warning("Astraea under torch.compile rounded budgets up to row buckets (ROW_BUCKETS=%d): %s",
                           ROW_BUCKETS, ", ".join(f"{b:g} -> {r:.4f}" for b, r in sorted(new.items())))

    def record(self, branch: str, step: int, block: int, ratio: float) -> None:
        self.kept[(branch, step, block)] = ratio
        self._all.append((step, ratio))

    def per_step(self) -> dict[int, float]:
        self.flush()
        by: dict[int, list[float]] = defaultdict(list)
        for s, r in self._all:
            by[s].append(r)
        return {s: float(np.mean(v)) for s, v in sorted(by.items())}

    def summary(self) -> dict:
        self.flush()
        ratios = [r for _, r in self._all]
        return {
            "kept_ratio": round(float(np.mean(ratios)), 4) if ratios else 1.0,
            "cache_mb_peak": round(self.cache_bytes_peak / 2**20, 2),
            "block_calls": len(ratios),
            "forecast_calls": self.forecast_calls,
            "degraded": list(self.degraded),
            "kept_ratio_per_step": [round(v, 3) for v in self.per_step().values()],
        }

    def reset(self) -> None:
        self.kept.clear()
        self._all.clear()
        self._pending.clear()
        self.bucketed.clear()
        self.cache_bytes_peak = 0
        self.forecast_calls = 0
        self.degraded.clear()


def cache_bytes(tokens: int, dim: int, heads: int, blocks: int, *, branches: int = 2, batch: int = 1,
                order: int = 0, kv_reuse: bool = False, text_tokens: int = 0, dtype_bytes: int = 4) -> int:
    """Predicted bytes of Astraea's caches for one generation (the accounting :class:`BlockState` makes).

    Per block and branch: cached output and input `[B, N, C]`, ``order`` divided differences `[B, N, C]` each,
    LSE (float32), skip counter, last step and history (int64) `[B, N]`, with ``kv_reuse`` K and V `[B, N, C]`,
    and the text K/V `[B, L, C]` of cross-attention.

    Example:
        >>> cache_bytes(32760, 1536, 12, 30, order=1, kv_reuse=True, dtype_bytes=2) / 2**30  # Wan2.1-1.3B, bf16
        ... # doctest: +ELLIPSIS
        28.1...
    """
    per_token = (2 + order + (2 if kv_reuse else 0)) * dim * dtype_bytes + 4 + 3 * 8
    per_block = batch * (tokens * per_token + 2 * text_tokens * dim * dtype_bytes)
    return per_block * blocks * branches


def _attention_through(block, adapter: ModelAdapter, idx: torch.Tensor):
    """The row-subset attention ``(q_sel, k, v) -> (out, lse)`` for the rows ``idx`` `[B, k]`: through the
    self-attention processor's ``rows_attention(q_sel, idx, k, v)`` when it has one (another method, e.g.
    TimeRipple, then acts inside Astraea's rows), else plain :func:`row_subset_attention`. Keyword arguments (an
    adapter's ``key_mask`` `[B, S]` for masked keys, e.g. HunyuanVideo's text padding) are passed on."""
    processor = getattr(adapter.self_attention(block), "processor", None)
    rows_attention = getattr(processor, "rows_attention", None)
    parallel = processor_cp_config(processor)
    if parallel is not None:  # context parallelism: the rows meet every rank's K/V through diffusers' engine
        if rows_attention is not None:  # another method's rows attention would be skipped: refused, not dropped
            raise ParallelError(TIMERIPPLE_IN_ASTRAEA_ROWS)
        return lambda q, k, v: cp_rows_attention(q, k, v, parallel)
    if rows_attention is None:
        return row_subset_attention
    return lambda q, k, v, **kw: rows_attention(q, idx, k, v, **kw)


def _foreign_hooks(module: torch.nn.Module, *, skip_cp: bool = False) -> list[str]:
    """Hooks on ``module`` other than ours; ``skip_cp``: also not diffusers' context-parallel split/gather hooks
    (they reshape the sequence around Astraea and never consume its outputs)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    return [n for n in registry._hook_order if n not in (BLOCK_HOOK, CONTEXT_HOOK) and not (skip_cp and is_cp_hook(n))]


def _check_composition(adapter: ModelAdapter, transformer: torch.nn.Module, blocks: list) -> None:
    """Refuse hooks that Astraea's row path would bypass: on a self-attention module (any order), or on a block
    registered before Astraea's (it would sit inside Astraea's hook and never run on sparse steps)."""
    for i, block in enumerate(blocks):
        attn_hooks = _foreign_hooks(adapter.self_attention(block))
        if attn_hooks:
            raise CompositionError(
                f"block {i}'s self-attention carries hooks {attn_hooks} (e.g. a diffusers attention cache such as "
                "PyramidAttentionBroadcast or FasterCache): Astraea computes attention itself on its selected rows "
                "and would bypass them; remove that cache (transformer.disable_cache()) before apply_astraea")
        registry = getattr(block, "_diffusers_hook", None)
        if registry is None or BLOCK_HOOK not in registry._hook_order:
            inner = _foreign_hooks(block)
        else:
            inner = [n for n in registry._hook_order[:registry._hook_order.index(BLOCK_HOOK)] if n != CONTEXT_HOOK]
        if inner and any(is_cp_hook(n) for n in inner):
            raise CompositionError(
                f"block {i} carries diffusers' context-parallel hooks {inner} registered before Astraea: its rows "
                "would not be split across ranks. Orders that work: vdit_accel.apply(...) (either order: it puts "
                "the context-parallel hooks back outside), or apply_astraea before enable_parallelism")
        if inner:
            raise CompositionError(
                f"block {i} carries hooks {inner} registered before Astraea: Astraea's row path would bypass them. "
                "Order that works: apply_astraea first, then enable the diffusers cache (it wraps Astraea)")


class AstraeaBlockHook(ModelHook):
    """Replaces one block's forward with Astraea's select / compute-rows / merge (or forecast)."""

    _is_stateful = True

    def __init__(self, index: int, block: torch.nn.Module, config: AstraeaConfig, context: ContextHook,
                 shared: dict, stats: AstraeaStats, adapter: ModelAdapter, is_last: bool) -> None:
        super().__init__()
        self.index = index
        self.block = block
        self.config = config
        self.context = context
        self.shared = shared  # across blocks: fixed token sets, all hooks, the generation's effective settings
        self.stats = stats
        self.adapter = adapter
        self.is_last = is_last
        self.schedule = config.schedule
        sparse = [i for i, b in enumerate(self.schedule) if b < 1.0]
        self.last_sparse = sparse[-1] if sparse else -1
        self.states: dict[str, BlockState] = {}
        self.plan: _BlockPlan | None = None  # host-side decisions for the traced path, set by _Planner
        self.selection_groups = 1  # > 1: top-k within each of that many contiguous shards (one CP rank's selection)

    def reset_state(self, module):
        self.states.clear()
        for key in [k for k in self.shared if k not in ("hooks", "transformer")]:  # token sets, settings
            del self.shared[key]
        return module

    # ----------------------------------------------------------------------------------- generation settings
    def _settings(self, hidden_states: torch.Tensor) -> dict:
        """Effective settings of this generation, decided once at its first sparse-capable call: the memory cap
        may lower the forecast order and switch K/V reuse off (visibly), and whether non-last blocks may skip
        forming their output on budget-0 steps (only when no other hook wraps Astraea's)."""
        if "settings" in self.shared:
            return self.shared["settings"]
        cfg, hooks = self.config, self.shared["hooks"]
        _check_composition(self.adapter, self.context_module(), [h.block for h in hooks])  # hooks added since
        order, kv_reuse = max(cfg.orders), cfg.kv_reuse
        b, n, c = hidden_states.shape
        dtype_bytes = CACHE_DTYPES[cfg.cache_dtype].itemsize if cfg.cache_dtype else hidden_states.element_size()
        heads = getattr(self.adapter.self_attention(self.block), "heads", 1)
        if cfg.memory_cap_mb is not None:
            cap = cfg.memory_cap_mb * 2**20
            while cache_bytes(n, c, heads, len(hooks), batch=b, order=order, kv_reuse=kv_reuse,
                              dtype_bytes=dtype_bytes) > cap and (order > 0 or kv_reuse):
                what = f"forecast order {order} -> {order - 1}" if order > 0 else "kv_reuse -> off"
                order, kv_reuse = (order - 1, kv_reuse) if order > 0 else (order, False)
                self.stats.degraded.append(what)
                logger.warning("Astraea memory cap %.1f MB: %s", cfg.memory_cap_mb, what)
        wrapped = any(_foreign_hooks(h.block, skip_cp=True) for h in hooks) or bool(
            _foreign_hooks(self.context_module(), skip_cp=True))
        whole_steps = all(b in (0.0, 1.0) for b in self.schedule)
        self.shared["settings"] = {"order": order, "kv_reuse": kv_reuse, "shortcut": not wrapped,
                                   "lean": whole_steps and not wrapped and cfg.cache == "output"}
        return self.shared["settings"]

    def context_module(self) -> torch.nn.Module:
        return self.shared["transformer"]

    # ------------------------------------------------------------------------------------------------ forward
    def new_forward(self, module, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._traced_forward(module, *args, **kwargs)
        ctx = self.context.current
        original = self.fn_ref.original_forward
        if ctx is None or ctx.step_index > self.last_sparse:
            if ctx is not None:
                self.stats.record(ctx.branch, ctx.step_index, self.index, 1.0)
            return original(*args, **kwargs)
        if ctx.num_steps is not None and ctx.num_steps != self.config.num_steps:
            raise ConfigError(f"Astraea schedule has {self.config.num_steps} steps but the generation has "
                              f"{ctx.num_steps}: use config.resampled({ctx.num_steps}) (normalised time) or make a "
                              f"schedule for {ctx.num_steps} steps")
        hidden_states = self.adapter.block_stream(args, kwargs)
        settings = self._settings(hidden_states)
        state = self.states.get(ctx.branch)
        if state is None:
            rows = RowCache(dtype=CACHE_DTYPES.get(self.config.cache_dtype))
            state = self.states[ctx.branch] = BlockState(rows=rows)
        if settings["lean"]:
            out = self._lean_forward(original, args, kwargs, hidden_states, ctx, state, settings)
            self._account()
            return out
        b, n, _ = hidden_states.shape
        step = ctx.step_index
        budget = self.schedule[step] if state.out is not None else 1.0
        order = min(self.config.orders[step], settings["order"])
        groups = self.selection_groups
        count = budget_to_count(budget, n) if groups == 1 else groups * budget_to_count(budget, n // groups)
        if count == 0:
            state.skips = update_skips(state.skips, hidden_states.new_zeros(b, 0, dtype=torch.long))
            self.stats.record(ctx.branch, step, self.index, 0.0)
            if self.config.cache == "output" and settings["shortcut"] and not self.is_last:
                return self.adapter.block_output(args, kwargs, hidden_states)  # ignored by the next block
            return self.adapter.block_output(args, kwargs, self._reused(state, hidden_states, step, order), state.rows)
        idx = self._select(ctx.branch, state, hidden_states, count, b, n)
        kv = "rows" if self.config.kv == "selected" else ("cache" if settings["kv_reuse"] else "all")
        attention = _attention_through(module, self.adapter, idx + ctx.text_prefix)
        rows, lse = self.adapter.block_rows_forward(module, args, kwargs, idx, attention, kv=kv, cache=state.rows)
        # order 0 from the output cache: the output is the cache once the rows are in (one row write, not a copy
        # plus two); the same bits, unless the cache is stored in another dtype
        into_cache = (count < n and state.out is not None and self.config.cache == "output" and order == 0
                      and state.out.dtype == hidden_states.dtype)
        if count == n or into_cache:  # count == n: every row computed (idx is arange(n))
            out = rows
        else:  # a fresh tensor from _reused, so the rows go in in place
            base = hidden_states.new_empty(hidden_states.shape) if state.out is None else self._reused(
                state, hidden_states, step, order)
            out = scatter_rows_(base, idx, rows)
        self._update(state, hidden_states, idx, rows, lse, step, settings["order"])
        if into_cache:  # only the next block reads it before this block's next call rewrites it (the last block's
            # goes to the output norm); a foreign hook around the blocks may keep outputs: a copy then
            out = state.out if settings["shortcut"] else state.out.clone()
        self.stats.record(ctx.branch, step, self.index, count / n)
        self._account()
        return self.adapter.block_output(args, kwargs, out, state.rows)

    def _account(self) -> None:
        total = sum(s.nbytes() for h in self.shared["hooks"] for s in h.states.values())
        self.stats.cache_bytes_peak = max(self.stats.cache_bytes_peak, total)

    def _reused(self, state: BlockState, x: torch.Tensor, step: int, order: int) -> torch.Tensor:
        """What the unselected rows take: `[B, N, C]` cached output, its forecast, or output + input change."""
        if self.config.cache == "residual":
            return (state.out.float() + (x.float() - state.inp.float())).to(x.dtype)
        if order == 0 or state.d1 is None:
            return state.out.to(x.dtype, copy=True)  # a copy: the cache is updated in place later
        if torch.compiler.is_compiling():
            self.plan.slot.forecast = True  # counted on the host (an int counter would be a graph constant)
        else:
            self.stats.forecast_calls += 1
        gap = self._gap(step, state.last)[..., None]  # [B, N, 1]
        pred = state.out.float() + state.d1.float() * gap
        if order >= 2 and state.d2 is not None:
            pred = pred + state.d2.float() * (gap * gap / 2)
        return pred.to(x.dtype)

    def _gap(self, step: int | torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Forecast distance `[B, k]` (float32) from the steps ``last`` `[B, k]` to ``step``: in steps, or (axis
        "timestep") in the model's timestep, which falls as denoising proceeds (the generation's table of
        timesteps per step is filled by :class:`_Planner` before each call)."""
        if self.config.forecast_axis == "step":
            return (step - last).to(torch.float32)
        times = self.plan.times
        return times[last] - times[step]

    def _record_rows(self, state: BlockState, x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, step: int,
                     max_order: int) -> None:
        """Record freshly computed output rows ``rows`` `[B, k, C]` at ``idx`` `[B, k]`: outputs, their divided
        differences over steps (orders up to ``max_order``), the step and how often each row was computed."""
        b, n, c = x.shape
        store = CACHE_DTYPES.get(self.config.cache_dtype, x.dtype)
        if state.out is None:  # first computation: every row (budget forced to 1)
            state.out = scatter_rows_(torch.empty(b, n, c, dtype=store, device=x.device), idx, rows)
            state.last = (step.expand(b, n).clone() if isinstance(step, torch.Tensor)  # traced: a device step
                          else torch.full((b, n), step, dtype=torch.long, device=x.device))
            state.hist = torch.ones(b, n, dtype=torch.long, device=x.device)
            return
        if max_order > 0:
            gap = self._gap(step, gather_rows(state.last, idx))[..., None]  # [B, k, 1]
            hist = gather_rows(state.hist, idx)
            d1_new = (rows.float() - gather_rows(state.out, idx).float()) / gap
            if state.d1 is None:
                state.d1 = torch.zeros(b, n, c, dtype=store, device=x.device)
            d1_old = gather_rows(state.d1, idx).float()
            if max_order > 1:
                if state.d2 is None:
                    state.d2 = torch.zeros(b, n, c, dtype=store, device=x.device)
                d2_new = torch.where(hist[..., None] >= 2, (d1_new - d1_old) / gap, 0.0)
                scatter_rows_(state.d2, idx, d2_new)
            scatter_rows_(state.d1, idx, d1_new)
            scatter_rows_(state.hist, idx, hist.clamp_max(2) + 1)
            scatter_rows_(state.last, idx, step.expand_as(idx) if isinstance(step, torch.Tensor)
                          else torch.full_like(idx, step))
        scatter_rows_(state.out, idx, rows)

    def _update(self, state: BlockState, x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, lse: torch.Tensor,
                step: int, max_order: int) -> None:
        """:meth:`_record_rows`, plus what scoring needs: the rows' inputs, LSE and skip counters."""
        store = CACHE_DTYPES.get(self.config.cache_dtype, x.dtype)
        red = reduce_head_lse(lse, self.config.lse_reduction)
        first = state.out is None
        self._record_rows(state, x, idx, rows, step, max_order)
        if first:
            state.inp, state.lse = x.to(store).clone(), red
            state.skips = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        else:
            scatter_rows_(state.inp, idx, gather_rows(x, idx))
            scatter_rows_(state.lse, idx, red)
        state.skips = update_skips(state.skips, idx)

    def _lean_forward(self, original, args, kwargs, x: torch.Tensor, ctx, state: BlockState, settings: dict):
        """Whole-step schedules (every budget 0 or 1, nothing wraps Astraea): no scoring, no K/V and no input
        caches; computed steps run the stock block; only the last block keeps outputs (and their differences)
        to form the output of budget-0 steps, the others pass their input through on those steps."""
        step = ctx.step_index
        last = self.shared["hooks"][-1].states.get(ctx.branch)
        primed = last is not None and last.out is not None
        if not primed or self.schedule[step] >= 1.0:
            out = original(*args, **kwargs)
            if self.is_last:
                b, n, _ = x.shape
                self._record_rows(state, x, torch.arange(n, device=x.device).expand(b, n),
                                  self.adapter.block_output_stream(out), step, settings["order"])
            self.stats.record(ctx.branch, step, self.index, 1.0)
            return out
        self.stats.record(ctx.branch, step, self.index, 0.0)
        if not self.is_last:
            return self.adapter.block_output(args, kwargs, x)
        return self.adapter.block_output(args, kwargs, self._reused(state, x, step, min(self.config.orders[step],
                                                                                         settings["order"])))

    # ------------------------------------------------------------------------------- the traced (compiled) path
    def _traced_forward(self, module, *args, **kwargs):
        """``new_forward`` as ``torch.compile`` traces it: every decision was taken on the host by :class:`_Planner`
        (``self.plan``); the graph sees the plan's bounded values (mode, row bucket ``j``, forecast order, whether
        caches exist) and tensors only, so it has no graph break and one variant per distinct plan."""
        plan = self.plan
        original = self.fn_ref.original_forward
        if plan is None or plan.mode == "stock":
            if plan is not None:
                plan.slot.ratio = 1.0
            return original(*args, **kwargs)
        x = self.adapter.block_stream(args, kwargs)
        state, step = plan.state, plan.step
        if plan.mode == "lean":
            if plan.compute:
                out = original(*args, **kwargs)
                if self.is_last:
                    b, n, _ = x.shape
                    self._record_rows(state, x, torch.arange(n, device=x.device).expand(b, n),
                                      self.adapter.block_output_stream(out), step, plan.max_order)
                plan.slot.ratio = 1.0
                return out
            plan.slot.ratio = 0.0
            if not self.is_last:
                return self.adapter.block_output(args, kwargs, x)
            return self.adapter.block_output(args, kwargs, self._reused(state, x, step, plan.order))
        b, n, _ = x.shape
        groups = self.selection_groups  # context-parallel shards: the bucket applies per shard
        per = n // groups
        count = groups * (per if plan.j >= ROW_BUCKETS else min(per, -(-per * plan.j // ROW_BUCKETS)))
        plan.slot.ratio = count / n
        if count == 0:
            state.skips = update_skips(state.skips, x.new_zeros(b, 0, dtype=torch.long))
            if self.config.cache == "output" and plan.shortcut and not self.is_last:
                return self.adapter.block_output(args, kwargs, x)
            return self.adapter.block_output(args, kwargs, self._reused(state, x, step, plan.order), state.rows)
        if count >= n or state.out is None:
            idx = torch.arange(n, device=x.device).expand(b, n)
        elif plan.fixed is not None:
            if plan.fixed.idx is None:
                plan.fixed.idx = self._scores_topk(state, x, count)
            idx = plan.fixed.idx
        else:
            idx = self._scores_topk(state, x, count)
        attention = _attention_through(module, self.adapter, idx + plan.text_prefix)
        rows, lse = self.adapter.block_rows_forward(module, args, kwargs, idx, attention, kv=plan.kv, cache=state.rows)
        if count == n:
            out = rows
        else:
            base = x.new_empty(x.shape) if state.out is None else self._reused(state, x, step, plan.order)
            out = scatter_rows_(base, idx, rows)
        self._update(state, x, idx, rows, lse, step, plan.max_order)
        return self.adapter.block_output(args, kwargs, out, state.rows)

    @torch.compiler.disable
    def _select(self, branch: str, state: BlockState, x: torch.Tensor, count: int, b: int, n: int) -> torch.Tensor:
        """Token indices `[B, count]` to compute (all tokens, unscored, when ``count == n`` or nothing is cached)."""
        if count >= n or state.out is None:
            return torch.arange(n, device=x.device).expand(b, n)
        if self.config.selection == "fixed":
            key = ("fixed", branch, count)
            if key not in self.shared:
                self.shared[key] = self._scores_topk(state, x, count)
            return self.shared[key]
        return self._scores_topk(state, x, count)

    def _scores_topk(self, state: BlockState, x: torch.Tensor, count: int) -> torch.Tensor:
        delta = input_delta(x, state.inp.to(x.dtype), self.config.delta_norm)
        groups, n = self.selection_groups, x.shape[1]
        if groups > 1:  # what each of `groups` context-parallel ranks selects from its own shard, side by side
            size, per = n // groups, count // groups
            return torch.cat([self._topk(state.lse[:, g * size:(g + 1) * size], delta[:, g * size:(g + 1) * size],
                                         state.skips[:, g * size:(g + 1) * size], per) + g * size
                              for g in range(groups)], dim=1)
        return self._topk(state.lse, delta, state.skips, count)

    def _topk(self, lse: torch.Tensor, delta: torch.Tensor, skips: torch.Tensor, count: int) -> torch.Tensor:
        scores = token_scores(lse, delta, skips, w_alpha=self.config.w_alpha, w_beta=self.config.w_beta,
                              normalize=self.config.normalize)
        return select_topk(scores, count)


@dataclass
class _BlockSlot:
    """Where a compiled block call leaves its kept ratio (made on the host per branch, step and block)."""

    branch: str
    step: int
    block: int
    budget: float | None = None
    ratio: float | None = None
    forecast: bool = False


@dataclass
class _FixedRows:
    """The FIXED-TOKEN ablation's one token set of a (branch, row count), chosen by the first block that needs it."""

    idx: torch.Tensor | None = None


@dataclass
class _BlockPlan:
    """One block's host-side decisions for one transformer call (made by :class:`_Planner`).

    Args:
        mode (`str`): "stock" (the original forward), "lean" (whole-step schedule) or "rows" (token-wise).
        state (`BlockState | None`): the block's state of the call's CFG branch.
        step (`torch.Tensor | None`): 0-d long, the step index on the model's device (a tensor, not a constant).
        j (`int`): row bucket in ``[0, ROW_BUCKETS]``; ``ceil(N·j/ROW_BUCKETS)`` rows are computed.
        order (`int`), max_order (`int`): forecast order of this step / of the generation.
        kv (`str`): the row-subset block's K/V source; shortcut (`bool`): budget-0 blocks may pass through.
        compute (`bool`): lean mode, this step runs the stock block.
        fixed (`_FixedRows | None`): FIXED-TOKEN selection holder; text_prefix (`int`); slot (`_BlockSlot`).
        times (`torch.Tensor | None`): `[num_steps]` float32, the generation's timestep per step so far (forecast
            axis "timestep" only).
    """

    mode: str
    slot: _BlockSlot
    state: BlockState | None = None
    step: torch.Tensor | None = None
    j: int = ROW_BUCKETS
    order: int = 0
    max_order: int = 0
    kv: str = "all"
    shortcut: bool = False
    compute: bool = True
    fixed: _FixedRows | None = None
    text_prefix: int = 0
    times: torch.Tensor | None = None


def row_bucket(budget: float) -> int:
    """Row bucket ``j = ceil(budget·ROW_BUCKETS)`` of a budget (0 only for budget 0), as compiled runs use it.

    Example:
        >>> [row_bucket(b) for b in (0.0, 0.01, 0.3, 0.5, 1.0)]
        [0, 1, 3, 4, 8]
    """
    return min(ROW_BUCKETS, math.ceil(round(budget * ROW_BUCKETS, 9)))


def compiled_row_counts(config: AstraeaConfig, tokens: int) -> list[int]:
    """Distinct row counts a compiled run of ``config`` computes per block of ``tokens`` rows (sorted).

    The compiled variants of the block are bounded by these counts times the cache states (first call, forecast
    differences present), see ``docs/compile.md``.

    Example:
        >>> compiled_row_counts(AstraeaConfig(budgets=(1.0, 0.5, 0.3, 0.25), num_steps=4), 64)
        [16, 24, 32, 64]
    """
    js = {row_bucket(b) for b in config.schedule}
    return sorted({tokens if j >= ROW_BUCKETS else min(tokens, -(-tokens * j // ROW_BUCKETS)) for j in js})


class _Planner:
    """Astraea's host side (called by the root context hook before every transformer call): the schedule lookup,
    the CFG branch's state, the generation settings and the row bucket of every block, as a :class:`_BlockPlan`.
    Eager block calls ignore the plan (they decide the same things themselves, with exact row counts)."""

    def __init__(self, hooks: list[AstraeaBlockHook], config: AstraeaConfig, stats: AstraeaStats) -> None:
        self.hooks = hooks
        self.config = config
        self.stats = stats
        self._steps: dict[tuple, torch.Tensor] = {}

    def __call__(self, ctx) -> None:
        cfg, hooks = self.config, self.hooks
        if not hooks:
            return
        self.stats.flush()  # the previous call's slots (plain floats: no device sync)
        first = hooks[0]
        if ctx.step_index > first.last_sparse:
            for h in hooks:
                h.plan = _BlockPlan("stock", self._slot(ctx, h))
            return
        if ctx.num_steps is not None and ctx.num_steps != cfg.num_steps:
            raise ConfigError(f"Astraea schedule has {cfg.num_steps} steps but the generation has {ctx.num_steps}: "
                              f"use config.resampled({ctx.num_steps}) (normalised time) or make a schedule for "
                              f"{ctx.num_steps} steps")
        param = next(first.block.parameters())
        key = (param.device, ctx.step_index)
        if key not in self._steps:
            self._steps[key] = torch.tensor(ctx.step_index, dtype=torch.long, device=param.device)
        step_t = self._steps[key]
        attn = first.adapter.self_attention(first.block)
        to_q = getattr(attn, "to_q", None)
        width = getattr(attn, "inner_dim", None) or getattr(to_q, "out_features", 1)  # the cap's estimate only
        settings = first._settings(torch.empty(ctx.batch, ctx.grid.tokens, width, dtype=param.dtype, device="meta"))
        _warm_attention_probe(attn, param)
        times = self._times(ctx, first, param.device) if cfg.forecast_axis == "timestep" else None
        step, order_cfg = ctx.step_index, cfg.orders[ctx.step_index]
        for h in hooks:
            state = h.states.get(ctx.branch)
            if state is None:
                state = h.states[ctx.branch] = BlockState(rows=RowCache(dtype=CACHE_DTYPES.get(cfg.cache_dtype)))
            slot = self._slot(ctx, h)
            order = min(order_cfg, settings["order"])
            if settings["lean"]:
                last = hooks[-1].states.get(ctx.branch)
                primed = last is not None and last.out is not None
                h.plan = _BlockPlan("lean", slot, state, step_t, order=order, max_order=settings["order"],
                                    compute=not primed or h.schedule[step] >= 1.0, times=times)
                continue
            budget = h.schedule[step] if state.out is not None else 1.0
            j = row_bucket(budget)
            slot.budget = budget
            kv = "rows" if cfg.kv == "selected" else ("cache" if settings["kv_reuse"] else "all")
            fixed = None
            if cfg.selection == "fixed" and 0 < j < ROW_BUCKETS:
                fixed = first.shared.setdefault(("planned_fixed", ctx.branch, j), _FixedRows())  # reset per generation
            h.plan = _BlockPlan("rows", slot, state, step_t, j, order, settings["order"], kv, settings["shortcut"],
                                fixed=fixed, text_prefix=ctx.text_prefix, times=times)
        hooks[-1]._account()  # cache memory as of the previous call (the traced path does not account itself)

    def _times(self, ctx, first: AstraeaBlockHook, device: torch.device) -> torch.Tensor:
        """The generation's `[num_steps]` timestep table (reset with the hooks' state), this step's entry written
        from the call's ``timestep`` on the device (no host sync; per-token timesteps: the first token's)."""
        t = ctx.timestep_raw
        if not isinstance(t, torch.Tensor):
            if not math.isfinite(t):
                raise ConfigError("forecast_axis='timestep' needs the model's timestep input, which this call does "
                                  "not pass: use forecast_axis='step'")
            t = torch.tensor(t)
        times = first.shared.get("times")
        if times is None:
            times = first.shared["times"] = torch.zeros(self.config.num_steps, dtype=torch.float32, device=device)
        times[ctx.step_index] = t.flatten()[0].to(device=device, dtype=torch.float32)
        return times

    def _slot(self, ctx, hook) -> _BlockSlot:
        slot = _BlockSlot(ctx.branch, ctx.step_index, hook.index)
        self.stats._pending.append(slot)
        return slot


def _warm_attention_probe(attn: torch.nn.Module, param: torch.Tensor) -> None:
    """Run the fused-attention capability probe on the host, so a traced ``row_subset_attention`` finds its answer."""
    heads = getattr(attn, "heads", None)
    width = getattr(attn, "inner_dim", None)
    if heads and width and width % heads == 0:
        probe_fast_path(param.device, param.dtype, width // heads)


@dataclass
class AstraeaHandle:
    """Returned by :func:`apply_astraea`: live ``stats`` and ``remove()`` (removes every hook)."""

    transformer: torch.nn.Module
    stats: AstraeaStats
    blocks: list = field(default_factory=list)
    adapter: ModelAdapter | None = None
    _removed: bool = False
    _context: ContextHook | None = None
    _planner_key: str = ""

    def check(self) -> None:
        """Raise :class:`CompositionError` if a hook installed since would be bypassed (also checked at run time)."""
        _check_composition(self.adapter, self.transformer, self.blocks)

    def remove(self) -> None:
        if self._removed:
            return
        for block in self.blocks:
            registry = block.__dict__.get("_diffusers_hook")
            if registry is not None and registry.get_hook(BLOCK_HOOK) is not None:
                registry.remove_hook(BLOCK_HOOK, recurse=False)
        if self._context is not None:
            self._context.remove_planner(self._planner_key)
        self.stats.flush()
        release_context(self.transformer)
        drop_empty_created([self.transformer])  # the hook registries apply created, now empty
        self._removed = True


def _check_row_path(adapter: ModelAdapter, transformer: torch.nn.Module, config: AstraeaConfig) -> None:
    """Refuse, before anything is installed, a schedule whose sparse steps the adapter cannot compute."""
    schedule = config.schedule
    needs_rows = any(0.0 < b < 1.0 for b in schedule) or (config.cache != "output" and min(schedule) < 1.0)
    if not needs_rows:  # full budgets run the stock block; whole-step schedules reuse whole block outputs
        return
    modes = adapter.row_kv_modes(transformer)
    name = adapter.family or type(adapter).__name__
    if not modes:
        raise UnsupportedModelError(
            f"the {name} adapter has no row-subset block for {type(transformer).__name__}: Astraea's sparse steps "
            f"(budgets strictly between 0 and 1, or cache='residual') are not supported; accepted here: budgets of "
            f"0.0 or 1.0 only (whole-step reuse, cache='output')")
    kv = "rows" if config.kv == "selected" else ("cache" if config.kv_reuse else "all")
    if kv not in modes:
        setting = "kv='selected'" if kv == "rows" else "kv_reuse=True"
        raise UnsupportedModelError(f"{setting} (row K/V mode {kv!r}) is not supported by the {name} adapter's "
                                    f"row-subset block: accepted modes {list(modes)}")


def apply_astraea(transformer: torch.nn.Module, config: AstraeaConfig,
                  adapter: ModelAdapter | None = None) -> AstraeaHandle:
    """Install Astraea on every transformer block of ``transformer``.

    Transactional (:mod:`vdit_accel.transaction`): if anything fails, nothing stays installed (no hook, no hook
    registry the model did not have); the handle's ``remove()`` leaves the model as it was before.

    Raises:
        ConfigError: ``config`` is not an :class:`AstraeaConfig`, or Astraea is already applied to this model, or
            ``forecast_axis`` is "timestep" while no step forecasts (it would do nothing).
        CompositionError: a hook Astraea would bypass is installed (see the module docstring).
        UnsupportedModelError: the schedule needs the row-subset block (a budget strictly between 0 and 1, or
            ``cache="residual"`` with a budget below 1) and the adapter has none for this model, or the K/V mode
            (``kv="selected"``, ``kv_reuse=True``) is not one the adapter's row-subset block supports. Nothing is
            installed.
    """
    if not isinstance(config, AstraeaConfig):
        raise ConfigError(f"config of type {type(config).__name__} is not accepted: an AstraeaConfig")
    if config.forecast_axis != "step" and max(config.orders) == 0:
        raise ConfigError(f"forecast_axis={config.forecast_axis!r} with forecast order 0 at every step does nothing "
                          "(no step extrapolates): set forecast orders > 0 or leave forecast_axis='step'")
    adapter = adapter or resolve_adapter(transformer)
    _check_row_path(adapter, transformer, config)
    blocks = adapter.blocks(transformer)
    if any(getattr(b, "_diffusers_hook", None) is not None and b._diffusers_hook.get_hook(BLOCK_HOOK) is not None
           for b in blocks):
        raise ConfigError("Astraea is already applied to this model: remove its handle before applying it again")
    _check_composition(adapter, transformer, blocks)
    stats = AstraeaStats()
    handle = AstraeaHandle(transformer, stats, adapter=adapter)
    hooks: list[AstraeaBlockHook] = []
    shared: dict = {"hooks": hooks, "transformer": transformer}
    with transactional([transformer]):  # a failure on any block leaves the model exactly as it was
        context = acquire_context(transformer, adapter, num_steps=config.num_steps)
        for i, block in enumerate(blocks):
            hook = AstraeaBlockHook(i, block, config, context, shared, stats, adapter, is_last=i == len(blocks) - 1)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, BLOCK_HOOK)
            hooks.append(hook)
            handle.blocks.append(block)
        handle._context, handle._planner_key = context, f"astraea:{id(handle)}"
        context.add_planner(handle._planner_key, _Planner(hooks, config, stats))
    return handle


register_method(
    Method("astraea", AstraeaConfig, apply_astraea, "Astraea token-wise budgets (Q-only sparse attention)"),
    [preset_operating_point("astraea", f"astraea-{t}x") for t in (2, 3, 3.5, 4, 4.5, 5, 6)],
)
