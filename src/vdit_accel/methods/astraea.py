"""Astraea: per block and step, compute only a budget of selected tokens; the rest reuse cached outputs.

Four named parts: :class:`AstraeaConfig`, :class:`BlockState` (per block and CFG branch, reset every
generation), :class:`AstraeaBlockHook` (a diffusers ``ModelHook`` replacing each block's forward) and
:func:`apply_astraea` returning a removable :class:`AstraeaHandle`.

At step ``i`` with budget ``b_i`` every block scores its tokens, ``S = w_α·norm(LSE·Δ) + w_β·exp(n)``
(:mod:`vdit_accel.ops.astraea`), keeps the top ``round(b_i·N)`` and computes them through a Q-subset
block (:func:`vdit_accel.adapters.wan.wan_block_rows_forward`): K and V from all tokens, queries and
everything after attention for the selected rows only; the attention also returns the rows' LSE for
the next score. Unselected rows take the block's cached output. Caches are per block and per CFG branch
and are freed when the generation ends (the pipeline/sampler resets stateful hooks).

At budget 1.0 for every step the hook calls the original block forward: bit-identical to the
unpatched model.

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

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from vdit_accel.adapters import ModelAdapter, resolve_adapter
from vdit_accel.adapters.wan import wan_block_rows_forward
from vdit_accel.config_io import config_from_dict, config_to_dict
from vdit_accel.context import ContextHook, acquire_context, release_context
from vdit_accel.errors import ConfigError, check_choice, check_range
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
from vdit_accel.ops.attention import row_subset_attention
from vdit_accel.registry import Method, register_method
from vdit_accel.search.presets import preset_operating_point

logger = logging.getLogger(__name__)

BLOCK_HOOK = "vdit_accel.astraea"
CACHE_MODES = ("output", "residual")
SELECTIONS = ("dynamic", "fixed")
KV_SOURCES = ("all", "selected")


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

    def __post_init__(self) -> None:
        check_range("num_steps", self.num_steps, lo=1)
        check_range("dense_steps", self.dense_steps, lo=0, hi=self.num_steps)
        for name in ("w_alpha", "w_beta"):
            check_range(name, getattr(self, name), lo=0.0)
        check_choice("delta_norm", self.delta_norm, NORMS)
        check_choice("lse_reduction", self.lse_reduction, LSE_REDUCTIONS)
        check_choice("normalize", self.normalize, SIGNAL_NORMALISATIONS)
        check_choice("cache", self.cache, CACHE_MODES)
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("kv", self.kv, KV_SOURCES)
        if self.budgets is None and self.target is None:
            object.__setattr__(self, "target", 1.0)
        if self.budgets is not None:
            object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
            if len(self.budgets) != self.num_steps:
                raise ConfigError(f"budgets has {len(self.budgets)} entries: accepted exactly num_steps="
                                  f"{self.num_steps}")
            for i, b in enumerate(self.budgets):
                check_range(f"budgets[{i}]", b, lo=0.0, hi=1.0)
        else:
            check_range("target", self.target, lo=1e-9, hi=1.0)
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

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AstraeaConfig:
        return config_from_dict(cls, d)


@dataclass
class BlockState:
    """Per block and CFG branch: cached outputs, inputs and LSE at last computation, skip counters."""

    out: torch.Tensor | None = None  # [B, N, C]
    inp: torch.Tensor | None = None  # [B, N, C]
    lse: torch.Tensor | None = None  # [B, N]
    skips: torch.Tensor | None = None  # [B, N] long

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.out, self.inp, self.lse, self.skips) if t is not None)


@dataclass
class AstraeaStats:
    """Kept-token ratio per (branch, step, block) and cache memory; :meth:`summary` aggregates."""

    kept: dict[tuple[str, int, int], float] = field(default_factory=dict)
    cache_bytes_peak: int = 0
    _all: list = field(default_factory=list)

    def record(self, branch: str, step: int, block: int, ratio: float) -> None:
        self.kept[(branch, step, block)] = ratio
        self._all.append((step, ratio))

    def per_step(self) -> dict[int, float]:
        by: dict[int, list[float]] = defaultdict(list)
        for s, r in self._all:
            by[s].append(r)
        return {s: float(np.mean(v)) for s, v in sorted(by.items())}

    def summary(self) -> dict:
        ratios = [r for _, r in self._all]
        return {
            "kept_ratio": round(float(np.mean(ratios)), 4) if ratios else 1.0,
            "cache_mb_peak": round(self.cache_bytes_peak / 2**20, 2),
            "block_calls": len(ratios),
            "kept_ratio_per_step": [round(v, 3) for v in self.per_step().values()],
        }

    def reset(self) -> None:
        self.kept.clear()
        self._all.clear()
        self.cache_bytes_peak = 0


def _attention(q, k, v):
    return row_subset_attention(q, k, v)


class AstraeaBlockHook(ModelHook):
    """Replaces one block's forward with Astraea's select / compute-rows / merge."""

    _is_stateful = True

    def __init__(self, index: int, config: AstraeaConfig, context: ContextHook, shared: dict,
                 stats: AstraeaStats) -> None:
        super().__init__()
        self.index = index
        self.config = config
        self.context = context
        self.shared = shared  # across blocks: fixed token sets, all block states (for memory accounting)
        self.stats = stats
        self.schedule = config.schedule
        sparse = [i for i, b in enumerate(self.schedule) if b < 1.0]
        self.last_sparse = sparse[-1] if sparse else -1
        self.states: dict[str, BlockState] = {}

    def reset_state(self, module):
        self.states.clear()
        for key in [k for k in self.shared if k != "hooks"]:  # fixed token sets; keep the hook list
            del self.shared[key]
        return module

    def new_forward(self, module, hidden_states, encoder_hidden_states, temb, rotary_emb):
        ctx = self.context.current
        original = self.fn_ref.original_forward
        if ctx is None or ctx.step_index > self.last_sparse:
            if ctx is not None:
                self.stats.record(ctx.branch, ctx.step_index, self.index, 1.0)
            return original(hidden_states, encoder_hidden_states, temb, rotary_emb)
        if ctx.num_steps is not None and ctx.num_steps != self.config.num_steps:
            raise ConfigError(f"Astraea schedule has {self.config.num_steps} steps but the generation has "
                              f"{ctx.num_steps}: make a schedule for {ctx.num_steps} steps")
        state = self.states.setdefault(ctx.branch, BlockState())
        b, n, _ = hidden_states.shape
        budget = self.schedule[ctx.step_index] if state.out is not None else 1.0
        count = budget_to_count(budget, n)
        idx = self._select(ctx.branch, state, hidden_states, count, b, n)
        if idx.shape[1] == 0:
            out = state.out if self.config.cache == "output" else state.out + (hidden_states - state.inp)
        else:
            rows, lse = wan_block_rows_forward(module, hidden_states, encoder_hidden_states, temb, rotary_emb, idx,
                                               _attention, kv_rows=self.config.kv == "selected")
            base = hidden_states.new_empty(hidden_states.shape) if state.out is None else (
                state.out if self.config.cache == "output" else state.out + (hidden_states - state.inp))
            out = base.scatter(1, idx[..., None].expand(-1, -1, rows.shape[-1]), rows)
            red = reduce_head_lse(lse, self.config.lse_reduction)
            if state.out is None:
                state.inp, state.lse = hidden_states.clone(), red
                state.skips = torch.zeros(b, n, dtype=torch.long, device=hidden_states.device)
            else:
                rows_idx = idx[..., None].expand(-1, -1, hidden_states.shape[-1])
                state.inp = state.inp.scatter(1, rows_idx, torch.gather(hidden_states, 1, rows_idx))
                state.lse = state.lse.scatter(1, idx, red.to(state.lse.dtype))
            state.skips = update_skips(state.skips, idx)
        state.out = out
        self.stats.record(ctx.branch, ctx.step_index, self.index, idx.shape[1] / n)
        total = sum(s.nbytes() for h in self.shared["hooks"] for s in h.states.values())
        self.stats.cache_bytes_peak = max(self.stats.cache_bytes_peak, total)
        return out

    @torch.compiler.disable
    def _select(self, branch: str, state: BlockState, x: torch.Tensor, count: int, b: int, n: int) -> torch.Tensor:
        """Token indices `[B, count]` to compute (all tokens when ``count == n`` or nothing is cached)."""
        if count >= n or state.out is None:
            return torch.arange(n, device=x.device).expand(b, n)
        if self.config.selection == "fixed":
            key = ("fixed", branch, count)
            if key not in self.shared:
                self.shared[key] = self._scores_topk(state, x, count)
            return self.shared[key]
        return self._scores_topk(state, x, count)

    def _scores_topk(self, state: BlockState, x: torch.Tensor, count: int) -> torch.Tensor:
        delta = input_delta(x, state.inp, self.config.delta_norm)
        scores = token_scores(state.lse, delta, state.skips, w_alpha=self.config.w_alpha, w_beta=self.config.w_beta,
                              normalize=self.config.normalize)
        return select_topk(scores, count)


@dataclass
class AstraeaHandle:
    """Returned by :func:`apply_astraea`: live ``stats`` and ``remove()`` (removes every hook)."""

    transformer: torch.nn.Module
    stats: AstraeaStats
    blocks: list = field(default_factory=list)
    _removed: bool = False

    def remove(self) -> None:
        if self._removed:
            return
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(BLOCK_HOOK, recurse=False)
        release_context(self.transformer)
        self._removed = True


def apply_astraea(transformer: torch.nn.Module, config: AstraeaConfig,
                  adapter: ModelAdapter | None = None) -> AstraeaHandle:
    """Install Astraea on every transformer block of ``transformer``."""
    adapter = adapter or resolve_adapter(transformer)
    context = acquire_context(transformer, adapter, num_steps=config.num_steps)
    stats = AstraeaStats()
    handle = AstraeaHandle(transformer, stats)
    hooks: list[AstraeaBlockHook] = []
    shared: dict = {"hooks": hooks}
    for i, block in enumerate(adapter.blocks(transformer)):
        hook = AstraeaBlockHook(i, config, context, shared, stats)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, BLOCK_HOOK)
        hooks.append(hook)
        handle.blocks.append(block)
    return handle



register_method(
    Method("astraea", AstraeaConfig, apply_astraea, "Astraea token-wise budgets (Q-only sparse attention)"),
    [preset_operating_point("astraea", f"astraea-{t}") for t in (40, 50, 70)],
)
