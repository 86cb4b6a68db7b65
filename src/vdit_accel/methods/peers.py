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


def _timestep_callback(env: BenchEnv):
    return lambda: env.sampler.current_timestep


def _pab(skip: int, lo: int, hi: int):
    def make(env: BenchEnv) -> PyramidAttentionBroadcastConfig:
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip,
            spatial_attention_timestep_skip_range=(lo, hi),
            current_timestep_callback=_timestep_callback(env),
        )

    return make


def _faster(skip: int, hi: int):
    def make(env: BenchEnv) -> FasterCacheConfig:
        return FasterCacheConfig(
            spatial_attention_block_skip_range=skip,
            spatial_attention_timestep_skip_range=(-1, hi),
            current_timestep_callback=_timestep_callback(env),
            attention_weight_callback=lambda _: 0.5,
            tensor_format="BCFHW",
            is_guidance_distilled=True,
        )

    return make


def _mag(threshold: float, max_skip_steps: int = 3):
    def make(env: BenchEnv) -> MagCacheConfig:
        from vdit_accel.methods.magcache_ratios import load_mag_ratios

        return MagCacheConfig(threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=0.2,
                              num_inference_steps=env.steps, mag_ratios=load_mag_ratios(env.model_id))

    return make


TAYLORSEER_WAN_BLOCKS = [r"^blocks\.\d+$"]


def _taylor(interval: int, before: int):
    def make(env: BenchEnv) -> TaylorSeerCacheConfig:
        return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before, max_order=1,
                                     taylor_factors_dtype=torch.float32, cache_identifiers=TAYLORSEER_WAN_BLOCKS)

    return make


def _register() -> None:
    register_method(
        Method("pab", PyramidAttentionBroadcastConfig, _enable, "diffusers PyramidAttentionBroadcast"),
        [
            OperatingPoint("pab-2", "pab", {"spatial_skip": 2, "timestep_range": [100, 800]}, _pab(2, 100, 800)),
            OperatingPoint("pab-3", "pab", {"spatial_skip": 3, "timestep_range": [100, 900]}, _pab(3, 100, 900)),
        ],
    )
    register_method(
        Method("fbc", FirstBlockCacheConfig, _enable, "diffusers FirstBlockCache"),
        [
            OperatingPoint("fbc-0.05", "fbc", {"threshold": 0.05}, lambda env: FirstBlockCacheConfig(threshold=0.05)),
            OperatingPoint("fbc-0.10", "fbc", {"threshold": 0.10}, lambda env: FirstBlockCacheConfig(threshold=0.10)),
        ],
    )
    register_method(
        Method("taylorseer", TaylorSeerCacheConfig, _enable, "diffusers TaylorSeerCache"),
        [
            OperatingPoint("taylorseer-3", "taylorseer", {"cache_interval": 3, "disable_before": 5, "max_order": 1,
                                                          "cache_identifiers": TAYLORSEER_WAN_BLOCKS}, _taylor(3, 5)),
            OperatingPoint("taylorseer-5", "taylorseer", {"cache_interval": 5, "disable_before": 3, "max_order": 1,
                                                          "cache_identifiers": TAYLORSEER_WAN_BLOCKS}, _taylor(5, 3)),
        ],
    )
    register_method(
        Method("fastercache", FasterCacheConfig, _enable, "diffusers FasterCache (attention reuse only)"),
        [
            OperatingPoint("fastercache-2", "fastercache", {"spatial_skip": 2, "timestep_hi": 681,
                                                            "uncond_reuse": False}, _faster(2, 681)),
            OperatingPoint("fastercache-3", "fastercache", {"spatial_skip": 3, "timestep_hi": 901,
                                                            "uncond_reuse": False}, _faster(3, 901)),
        ],
    )
    register_method(
        Method("magcache", MagCacheConfig, _enable, "diffusers MagCache (ratios calibrated on the model)"),
        [
            OperatingPoint("magcache-0.06", "magcache", {"threshold": 0.06, "max_skip_steps": 3}, _mag(0.06)),
            OperatingPoint("magcache-0.12", "magcache", {"threshold": 0.12, "max_skip_steps": 3}, _mag(0.12)),
            # on embedded-wan-v2 (ratios within 0.03 of 1) both points above are held by max_skip_steps=3, not by
            # their thresholds; this one lets MagCache skip further
            OperatingPoint("magcache-0.24", "magcache", {"threshold": 0.24, "max_skip_steps": 6}, _mag(0.24, 6)),
        ],
    )


_register()
