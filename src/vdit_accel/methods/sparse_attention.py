"""Sparse-attention baselines as a method: masking, skipping and static sparsity in video self-attention.

The comparison side of TimeRipple's central claim (reuse beats masking/skipping the same amount of attention):
the baselines of :mod:`vdit_accel.ops.sparse_baselines` installed in the model's video self-attention the way
:mod:`vdit_accel.methods.timeripple` installs its processor, so they run end to end. Four named parts:
:class:`SparseAttentionConfig`, :class:`SparseAttentionStats`, :class:`SparseAttentionProcessor` and
:func:`apply_sparse_attention` returning a removable :class:`SparseAttentionHandle`.

Baselines (``SparseAttentionConfig.baseline``):

- ``"topk_keys"``: per head keep the keys with the largest attention mass estimated from block-mean-pooled queries;
- ``"similarity_keys"``: drop the keys most similar to their window anchor (TimeRipple's relative spread), with no
  merge and no ``+log(count)`` bias;
- ``"static_rows"``: skip query rows chosen by position only; a skipped row copies the nearest computed row's output;
- ``"tile_window"``: a static spatio-temporal tile-window mask (sliding-tile / neighbourhood style).

How many keys or rows the first three drop is either a fixed share of the video tokens (``drop_fraction``) or,
with ``match_theta = θ``, on every call exactly as many as TimeRipple's ``"tokens"`` variant with keys only
(``reuse_q=False``) merges at θ on the same call (the keys whose smallest relative spread is < θ): the same amount
of attention removed, decided the way TimeRipple decides it. The processor recomputes projections, QK-norm and RoPE
exactly as the stock processor (through the model adapter, ``ModelAdapter.qkv``); calls that are not video
self-attention keep the original processor, masked calls raise.

Example:
    >>> from vdit_accel.testing import tiny_model, TINY_PROMPT
    >>> from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    >>> model = tiny_model()
    >>> handle = apply_sparse_attention(model.transformer, SparseAttentionConfig("topk_keys", drop_fraction=0.5))
    >>> _ = Sampler(model)(TINY_PROMPT, GenerationConfig(steps=2, guidance=1.0), progress=False)
    >>> handle.stats.summary()["keys_removed"]
    0.5
    >>> handle.remove()
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from vdit_accel.adapters import ModelAdapter, resolve_adapter
from vdit_accel.config_io import config_from_dict, config_to_dict
from vdit_accel.context import ContextHook, acquire_context, release_context
from vdit_accel.errors import ConfigError, UnsupportedModelError, check_choice
from vdit_accel.ops.sparse_baselines import (
    TILE_BACKENDS,
    SparseStats,
    _similarity_keep,
    _static_candidates,
    key_mass_scores,
    masked_key_attention,
    row_skip_attention,
    static_row_skip_roots,
    tile_plan,
    tile_window_attention,
    topk_key_keep,
)
from vdit_accel.ops.timeripple import AXES
from vdit_accel.ops.timeripple_tokens import token_decisions
from vdit_accel.transaction import drop_empty_created, transactional

logger = logging.getLogger(__name__)

BASELINES = ("topk_keys", "similarity_keys", "static_rows", "tile_window")
_COUNTED = ("topk_keys", "similarity_keys", "static_rows")


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Settings of one sparse-attention baseline; validated on construction (bad values raise ``ConfigError``).

    Args:
        baseline (`str`, defaults "tile_window"): one of ``BASELINES``.
        drop_fraction (`float | None`): for the counted baselines, the share of video tokens whose key (or query
            row) is dropped on every call, in [0, 1) (capped at the skippable tokens for "similarity_keys" and
            "static_rows": at most 7/8 on even grids).
        match_theta (`float | None`): for the counted baselines instead of ``drop_fraction``: drop as many as
            TimeRipple's "tokens" variant with keys only merges at this relative θ on the same call.
        query_pool (`int`, defaults 64): "topk_keys": tokens per pooled query of the mass estimate.
        reuse_window (`int`, defaults 2), axes (`tuple[str, ...]`), priority (`str`, defaults "thw"): window size,
            axes and anchor order of the similarity measure ("similarity_keys", ``match_theta``) and of the static
            row-skip anchors.
        tile (`tuple[int, int, int]`, defaults (2, 4, 4)), window (`tuple[int, int, int]`, defaults (4, 3, 3)):
            "tile_window": tokens per tile and tiles per window along (t, h, w); the tile must divide the token grid
            (checked per call).
        backend (`str`, defaults "auto"): "tile_window" backend (``ops.sparse_baselines.TILE_BACKENDS``).
        layers (`tuple[int, ...] | None`, defaults None): block indices to replace (None = all).
    """

    baseline: str = "tile_window"
    drop_fraction: float | None = None
    match_theta: float | None = None
    query_pool: int = 64
    reuse_window: int = 2
    axes: tuple[str, ...] = AXES
    priority: str = "thw"
    tile: tuple[int, int, int] = (2, 4, 4)
    window: tuple[int, int, int] = (4, 3, 3)
    backend: str = "auto"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("axes", "tile", "window"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        check_choice("baseline", self.baseline, BASELINES)
        check_choice("backend", self.backend, TILE_BACKENDS)
        counted = self.baseline in _COUNTED
        given = [n for n in ("drop_fraction", "match_theta") if getattr(self, n) is not None]
        if counted and len(given) != 1:
            raise ConfigError(f"baseline={self.baseline!r} needs exactly one of drop_fraction and match_theta "
                              f"(got {given or 'neither'})")
        if not counted and given:
            raise ConfigError(f"{given[0]} is not accepted with baseline={self.baseline!r}: the tile window's "
                              "sparsity is set by tile and window")
        if self.drop_fraction is not None and not 0.0 <= self.drop_fraction < 1.0:
            raise ConfigError(f"drop_fraction={self.drop_fraction!r} is out of range: accepted [0, 1)")
        if self.match_theta is not None and not self.match_theta >= 0.0:
            raise ConfigError(f"match_theta={self.match_theta!r} is out of range: accepted [0, inf)")
        for name in ("query_pool", "reuse_window"):
            v, lo = getattr(self, name), 1 if name == "query_pool" else 2
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name}={v!r} is out of range: an int >= {lo}")
        if not self.axes or len(set(self.axes)) != len(self.axes) or any(a not in AXES for a in self.axes):
            raise ConfigError(f"axes={self.axes!r} is not accepted: a non-empty subset of {list(AXES)}")
        if sorted(self.priority) != sorted("".join(AXES)):
            raise ConfigError(f"priority={self.priority!r} is not accepted: a permutation of 'thw'")
        for name in ("tile", "window"):
            v = getattr(self, name)
            if len(v) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ConfigError(f"{name}={v!r} is not accepted: three ints >= 1 (t, h, w)")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"layers={self.layers!r} is not accepted: block indices >= 0")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SparseAttentionConfig:
        return config_from_dict(cls, d)


@dataclass
class SparseAttentionStats:
    """Per-call records keyed by (branch, step, layer); :meth:`summary` averages them."""

    calls: dict[tuple[str, int, int], SparseStats] = field(default_factory=dict)
    passthrough_calls: int = 0
    _sums: dict = field(default_factory=lambda: defaultdict(list))

    def record(self, branch: str, step: int, layer: int, stats: SparseStats) -> None:
        self.calls[(branch, step, layer)] = stats
        for name in ("rows_removed", "keys_removed", "attn_work"):
            self._sums[name].append(getattr(stats, name))

    def reset(self) -> None:
        self.calls.clear()
        self._sums.clear()
        self.passthrough_calls = 0

    def summary(self) -> dict:
        """Mean ``rows_removed``, ``keys_removed`` (fractions of video+text tokens) and ``attn_work`` (share of
        dense score work) over the replaced self-attention calls, and their count."""
        def mean(key: str, empty: float) -> float:
            return round(float(np.mean(self._sums[key])), 4) if self._sums.get(key) else empty

        return {"rows_removed": mean("rows_removed", 0.0), "keys_removed": mean("keys_removed", 0.0),
                "attn_work": mean("attn_work", 1.0), "calls": len(self._sums.get("attn_work", []))}


class SparseAttentionProcessor:
    """Replacement processor for one Wan video self-attention module (same call signature as the stock one)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, original, config: SparseAttentionConfig, context: ContextHook,
                 stats: SparseAttentionStats, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.layer = layer
        self.original = original
        self.config = config
        self.context = context
        self.stats = stats
        self._plans: dict = {}

    def _counts(self, k: torch.Tensor, grid, pre: int, suf: int):
        """Per batch item, how many keys/rows to drop, and the similarity spreads when they were computed."""
        cfg = self.config
        b, n = k.shape[0], math.prod(grid)
        if cfg.match_theta is None:
            return [int(round(cfg.drop_fraction * n))] * b, None
        dec = token_decisions([k], grid, cfg.match_theta, window=cfg.reuse_window, axes=cfg.axes,
                              priority=cfg.priority, text_prefix=pre, text_suffix=suf)
        best = torch.stack(list(dec.spread.values())).min(0).values
        return [int(c) for c in (best < cfg.match_theta).sum(1)], dec.spread

    def _skippable(self, grid, pre: int, suf: int) -> int:
        key = ("skippable", grid)
        if key not in self._plans:
            self._plans[key] = int(_static_candidates(grid, self.config.reuse_window, self.config.axes)[1].sum())
        return self._plans[key]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int],
                  text_prefix: int = 0, text_suffix: int = 0) -> tuple[torch.Tensor, SparseStats]:
        """The configured baseline on post-RoPE `[B, S, H, D]` q/k/v; returns `[B, S, H, D]` and its stats."""
        cfg = self.config
        pre, suf = text_prefix, text_suffix
        if cfg.baseline == "tile_window":
            key = ("tile", grid, pre)
            if key not in self._plans:
                self._plans[key] = tile_plan(grid, cfg.tile, cfg.window, text_prefix=pre, device=q.device)
            return tile_window_attention(q, k, v, grid=grid, tile=cfg.tile, window=cfg.window, text_prefix=pre,
                                         text_suffix=suf, backend=cfg.backend, plan=self._plans[key])
        counts, spread = self._counts(k, grid, pre, suf)
        if cfg.baseline == "topk_keys":
            keep = topk_key_keep(key_mass_scores(q, k, query_pool=cfg.query_pool), counts)
            return masked_key_attention(q, k, v, keep)
        if cfg.baseline == "similarity_keys":
            if spread is None:
                dec = token_decisions([k], grid, 0.0, window=cfg.reuse_window, axes=cfg.axes, text_prefix=pre,
                                      text_suffix=suf)
                spread = dec.spread
                limits = torch.isfinite(torch.stack(list(spread.values())).min(0).values).sum(1)
                counts = [min(c, int(lim)) for c, lim in zip(counts, limits)]
            return masked_key_attention(q, k, v, _similarity_keep(spread, counts, k.shape[1]))
        limit = self._skippable(grid, pre, suf)
        outs, rows = [], []
        for bi, c in enumerate(counts):  # static rows: one root set per distinct count
            root = static_row_skip_roots(grid, min(c, limit), window=cfg.reuse_window, axes=cfg.axes,
                                         priority=cfg.priority, text_prefix=pre, text_suffix=suf, device=q.device)
            o, st = row_skip_attention(q[bi : bi + 1], k[bi : bi + 1], v[bi : bi + 1], root)
            outs.append(o)
            rows.append(st.rows_removed)
        removed = float(np.mean(rows))
        return torch.cat(outs), SparseStats(removed, 0.0, 1.0 - removed)

    def __call__(self, attn, *args, **kwargs):
        """The stock processor's call ``(attn, *args, **kwargs)``, split by the model adapter into post-RoPE q/k/v
        and the output step; calls that are not video self-attention run the stock processor.

        Raises:
            UnsupportedModelError: the call carries an attention mask or runs under context parallelism (the
                baselines take neither).
        """
        ctx = self.context.current
        if ctx is None:
            raise ConfigError("sparse attention needs the root context hook: call the transformer as a whole model")
        call = self.adapter.qkv(attn, args, kwargs)
        if call is None:
            self.stats.passthrough_calls += 1
            return self.original(attn, *args, **kwargs)
        if call.mask is not None or call.parallel_config is not None:
            raise UnsupportedModelError("the sparse-attention baselines take no attention mask and no context "
                                        f"parallelism ({self.adapter.family or type(self.adapter).__name__})")
        out, stats = self.attention(call.q, call.k, call.v, ctx.grid.as_tuple(), call.text_prefix, call.text_suffix)
        self.stats.record(ctx.branch, ctx.step_index, self.layer, stats)
        return self.adapter.attention_output(attn, out, call)


@dataclass
class SparseAttentionHandle:
    """Returned by :func:`apply_sparse_attention`: live ``stats`` and ``remove()`` (restores the processors)."""

    transformer: torch.nn.Module
    stats: SparseAttentionStats
    adapter: ModelAdapter | None = None
    _restore: list = field(default_factory=list)
    _removed: bool = False

    def remove(self) -> None:
        if self._removed:
            return
        for module, processor in self._restore:
            self.adapter.restore_processor(module, processor)
        release_context(self.transformer)
        drop_empty_created([self.transformer])  # the hook registry apply created for the context hook, now empty
        self._removed = True


def apply_sparse_attention(transformer: torch.nn.Module, config: SparseAttentionConfig,
                           adapter: ModelAdapter | None = None) -> SparseAttentionHandle:
    """Install the baseline on every (selected) video self-attention module of ``transformer``.

    Transactional (:mod:`vdit_accel.transaction`), as :func:`~vdit_accel.methods.timeripple.apply_timeripple`.

    Raises:
        ConfigError: ``layers`` names blocks the model does not have, or a sparse-attention processor is already
            installed (remove the first handle first); nothing is installed.
        UnsupportedModelError: no adapter for the model class (pass ``adapter=``).
    """
    adapter = adapter or resolve_adapter(transformer)
    blocks = adapter.blocks(transformer)
    layers = range(len(blocks)) if config.layers is None else config.layers
    bad = [i for i in layers if i >= len(blocks)]
    if bad:
        raise ConfigError(f"layers={list(bad)} are out of range: accepted [0, {len(blocks) - 1}]")
    installed = [i for i, blk in enumerate(blocks)
                 if isinstance(adapter.self_attention(blk).get_processor(), SparseAttentionProcessor)]
    if installed:
        raise ConfigError(f"sparse attention is already applied to this model (blocks {installed}): remove the "
                          "first handle before applying it again")
    stats = SparseAttentionStats()
    handle = SparseAttentionHandle(transformer, stats, adapter)
    with transactional([transformer]):  # a failure on any block leaves the model exactly as it was
        context = acquire_context(transformer, adapter)
        for i in layers:
            attn = adapter.self_attention(blocks[i])
            original = adapter.install_processor(
                attn, SparseAttentionProcessor(i, attn.get_processor(), config, context, stats, adapter))
            handle._restore.append((attn, original))
            logger.debug("sparse attention (%s) on block %d", config.baseline, i)
    return handle
