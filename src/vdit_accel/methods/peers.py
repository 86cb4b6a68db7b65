"""The peers: diffusers' own caches for Wan transformers, wrapped as registered methods.

Each peer is applied through ``transformer.enable_cache(config)`` and removed with
``transformer.disable_cache()``, exactly as a diffusers user would. Which ones apply to Wan:

- ``PyramidAttentionBroadcastConfig`` (PAB): broadcasts self-attention outputs within a timestep range.
- ``FirstBlockCacheConfig`` (FBC): skips the remaining blocks when the first block's residual barely changes.
- ``TaylorSeerCacheConfig``: Taylor-extrapolates cached block outputs between full steps. Its default module
  patterns (``"^blocks.*attn"`` under ``re.fullmatch``) match no Wan module (``blocks.0.attn1`` ends in a digit),
  so it would silently do nothing; we pass ``cache_identifiers=TAYLORSEER_WAN_BLOCKS`` (whole blocks).
- ``MagCacheConfig``: skips steps by a calibrated residual-magnitude ratio curve; needs per-model
  ``mag_ratios``, which :func:`calibrate_magcache` measures on the model itself.
- ``FasterCacheConfig``: its unconditional-branch reuse needs CFG batched into one call (it splits the
  batch in two); Wan's pipeline (and our sampler) make separate cond/uncond calls, so only its attention
  reuse applies: we run it with ``is_guidance_distilled=True`` and say so in the settings.

**The grids are fixed here, not tuned per run** (:data:`PEER_GRIDS`, recorded in every bench JSON): each peer
method name selects its whole grid, so a peer is never shown only at its best point for one model.

**The rule for parameters outside a grid** (:data:`PEER_RULE`): they keep the default of the diffusers config
class (TaylorSeer ``disable_cache_before_step=3``, ``disable_cache_after_step=None``; MagCache
``retention_ratio=0.2``; PAB ``spatial_attention_timestep_skip_range=(100, 800)``), except where that default
cannot work on Wan or with our sampler, and those exceptions are the ones listed in :data:`PEER_FIXED` (whole-block
TaylorSeer identifiers, float32 Taylor factors for a float32 model, MagCache's step count and calibrated ratios,
the sampler's timestep callback). FasterCache keeps its two historical points (a skip and its timestep bound go
together). Every point's ``settings`` lists its grid values and the fixed values, so a JSON row describes itself.

Labels are systematic: ``taylorseer-i{interval}-o{order}``, ``magcache-{threshold:g}-s{max_skip_steps}``,
``fbc-{threshold:g}``, ``pab-{skip}``, ``fastercache-{skip}``.

Example:
    >>> from vdit_accel.registry import operating_points
    >>> [p.label for p in operating_points("fbc")]
    ['fbc-0.05', 'fbc-0.1', 'fbc-0.2', 'fbc-0.3']
    >>> len(operating_points("taylorseer")), operating_points("magcache-0.24-s6")[0].settings["max_skip_steps"]
    (12, 6)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from vdit_accel.registry import BenchEnv, Method, OperatingPoint, register_method


@dataclass
class PeerHandle:
    """Handle of a diffusers cache enabled on a transformer."""

    transformer: torch.nn.Module
    stats: dict = field(default_factory=dict)

    def remove(self) -> None:
        self.transformer.disable_cache()


def _enable(transformer: torch.nn.Module, config: Any) -> PeerHandle:
    transformer.enable_cache(config)
    return PeerHandle(transformer)


TAYLORSEER_WAN_BLOCKS = [r"^blocks\.\d+$"]

# the grids: every point of each product is registered, in this order
PEER_GRIDS: dict[str, dict[str, tuple]] = {
    "taylorseer": {"cache_interval": (2, 3, 4, 5, 6, 8), "max_order": (1, 2)},
    "magcache": {"threshold": (0.06, 0.12, 0.24, 0.5), "max_skip_steps": (3, 6)},
    "fbc": {"threshold": (0.05, 0.1, 0.2, 0.3)},
    "pab": {"spatial_skip": (2, 3, 4)},
    "fastercache": {"spatial_skip": (2, 3)},  # paired with FASTERCACHE_TIMESTEP_HI, as before the grids
}
FASTERCACHE_TIMESTEP_HI = {2: 681, 3: 901}

# parameters outside the grids: diffusers' defaults, plus the named exceptions that Wan / our sampler need
PEER_FIXED: dict[str, dict[str, Any]] = {
    "taylorseer": {"disable_cache_before_step": 3, "disable_cache_after_step": None,
                   "taylor_factors_dtype": "float32", "cache_identifiers": TAYLORSEER_WAN_BLOCKS},
    "magcache": {"retention_ratio": 0.2, "num_inference_steps": "the run's steps",
                 "mag_ratios": "calibrated on the model (magcache_ratios.json)"},
    "fbc": {},
    "pab": {"timestep_range": [100, 800], "current_timestep_callback": "the sampler's timestep"},
    "fastercache": {"timestep_range_lo": -1, "attention_weight": 0.5, "tensor_format": "BCFHW",
                    "uncond_reuse": False, "current_timestep_callback": "the sampler's timestep"},
}
PEER_RULE = (
    "grid parameters take every value of PEER_GRIDS; every other parameter keeps the diffusers config default, "
    "except the values named in PEER_FIXED (needed on Wan or by the sampler); fastercache keeps its two "
    "historical (skip, timestep_hi) points"
)


def _timestep_callback(env: BenchEnv):
    return lambda: env.sampler.current_timestep


def _pab(skip: int):
    lo, hi = PEER_FIXED["pab"]["timestep_range"]

    def make(env: BenchEnv) -> PyramidAttentionBroadcastConfig:
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip,
            spatial_attention_timestep_skip_range=(lo, hi),
            current_timestep_callback=_timestep_callback(env),
        )

    return make


def _faster(skip: int, hi: int):
    fixed = PEER_FIXED["fastercache"]

    def make(env: BenchEnv) -> FasterCacheConfig:
        return FasterCacheConfig(
            spatial_attention_block_skip_range=skip,
            spatial_attention_timestep_skip_range=(fixed["timestep_range_lo"], hi),
            current_timestep_callback=_timestep_callback(env),
            attention_weight_callback=lambda _: fixed["attention_weight"],
            tensor_format=fixed["tensor_format"],
            is_guidance_distilled=True,
        )

    return make


def _mag(threshold: float, max_skip_steps: int):
    def make(env: BenchEnv) -> MagCacheConfig:
        from vdit_accel.methods.magcache_ratios import load_mag_ratios

        return MagCacheConfig(threshold=threshold, max_skip_steps=max_skip_steps,
                              retention_ratio=PEER_FIXED["magcache"]["retention_ratio"],
                              num_inference_steps=env.steps, mag_ratios=load_mag_ratios(env.model_id))

    return make


def _taylor(interval: int, order: int):
    fixed = PEER_FIXED["taylorseer"]

    def make(env: BenchEnv) -> TaylorSeerCacheConfig:
        return TaylorSeerCacheConfig(cache_interval=interval, max_order=order,
                                     disable_cache_before_step=fixed["disable_cache_before_step"],
                                     disable_cache_after_step=fixed["disable_cache_after_step"],
                                     taylor_factors_dtype=torch.float32, cache_identifiers=TAYLORSEER_WAN_BLOCKS)

    return make


def _fbc(threshold: float):
    return lambda env: FirstBlockCacheConfig(threshold=threshold)


def _point(label: str, method: str, grid_values: dict, make) -> OperatingPoint:
    return OperatingPoint(label, method, {**grid_values, **PEER_FIXED[method]}, make)


def peer_points() -> dict[str, list[OperatingPoint]]:
    """Every peer's operating points, built from :data:`PEER_GRIDS` (method name -> points in grid order)."""
    g = PEER_GRIDS
    return {
        "pab": [_point(f"pab-{k}", "pab", {"spatial_skip": k}, _pab(k)) for k in g["pab"]["spatial_skip"]],
        "fbc": [_point(f"fbc-{t:g}", "fbc", {"threshold": t}, _fbc(t)) for t in g["fbc"]["threshold"]],
        "taylorseer": [
            _point(f"taylorseer-i{i}-o{o}", "taylorseer", {"cache_interval": i, "max_order": o}, _taylor(i, o))
            for i in g["taylorseer"]["cache_interval"] for o in g["taylorseer"]["max_order"]
        ],
        "fastercache": [
            _point(f"fastercache-{k}", "fastercache", {"spatial_skip": k, "timestep_hi": FASTERCACHE_TIMESTEP_HI[k]},
                   _faster(k, FASTERCACHE_TIMESTEP_HI[k]))
            for k in g["fastercache"]["spatial_skip"]
        ],
        "magcache": [
            _point(f"magcache-{t:g}-s{s}", "magcache", {"threshold": t, "max_skip_steps": s}, _mag(t, s))
            for t in g["magcache"]["threshold"] for s in g["magcache"]["max_skip_steps"]
        ],
    }


def peer_grid_record() -> dict:
    """The grids, fixed values and rule as a JSON-able dict (what the bench records under ``peer_grids``)."""
    return {"grids": {m: {k: list(v) for k, v in grid.items()} for m, grid in PEER_GRIDS.items()},
            "fixed": PEER_FIXED, "fastercache_timestep_hi": FASTERCACHE_TIMESTEP_HI, "rule": PEER_RULE}


_METHODS = {
    "pab": (PyramidAttentionBroadcastConfig, "diffusers PyramidAttentionBroadcast"),
    "fbc": (FirstBlockCacheConfig, "diffusers FirstBlockCache"),
    "taylorseer": (TaylorSeerCacheConfig, "diffusers TaylorSeerCache"),
    "fastercache": (FasterCacheConfig, "diffusers FasterCache (attention reuse only)"),
    "magcache": (MagCacheConfig, "diffusers MagCache (ratios calibrated on the model)"),
}


def _register() -> None:
    for name, points in peer_points().items():
        config_cls, description = _METHODS[name]
        register_method(Method(name, config_cls, _enable, description), points)


_register()
