"""Soak: 100 short generations on the shipped embedded model with methods applied, composed and removed, shapes and
CFG varying. Resident memory does not grow (least-squares slope over generations 10-100 below 0.1 MB per
generation, from ``/proc/self/statm``), Astraea's caches hold exactly 0 bytes after every removal, and no hook,
processor or hook registry is left behind."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig

import vdit_accel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import BLOCK_HOOK, AstraeaConfig
from vdit_accel.methods.timeripple import TimeRippleConfig, TimeRippleProcessor

GENERATIONS = 100
WARMUP = 10
MAX_SLOPE_MB = 0.1
STATM = Path("/proc/self/statm")

ASTRAEA = AstraeaConfig(budgets=(1.0, 0.5, 0.0, 0.5), num_steps=4, forecast=1)
ASTRAEA_KV = AstraeaConfig(budgets=(1.0, 0.25, 0.5, 0.5), num_steps=4, kv_reuse=True, cache_dtype="bfloat16")
TIMERIPPLE = TimeRippleConfig(fixed_threshold=0.5, num_steps=4, i_min=1, i_max=2)
TOKENS = TimeRippleConfig(fixed_threshold=0.3, num_steps=4, i_min=1, i_max=2, variant="tokens")
FBC = FirstBlockCacheConfig(threshold=0.2)
SCENARIOS = [[], [ASTRAEA], [TIMERIPPLE], [ASTRAEA, TIMERIPPLE], [ASTRAEA_KV, FBC], [TOKENS], [ASTRAEA_KV, TOKENS]]
SHAPES = [(8, 32, 32), (4, 32, 32), (8, 16, 32), (16, 32, 32), (4, 16, 16)]  # frames, height, width
STEPS = [2, 3, 4]
GUIDANCE = [1.0, 2.0]  # without and with the CFG branch


def rss_mb() -> float:
    """Resident set size of this process (``/proc/self/statm``: pages)."""
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def astraea_hooks(transformer) -> list:
    """Astraea's block hooks now installed (kept by the test to read their caches after removal)."""
    registries = [b.__dict__.get("_diffusers_hook") for b in transformer.blocks]
    return [r.get_hook(BLOCK_HOOK) for r in registries if r is not None and r.get_hook(BLOCK_HOOK) is not None]


def cache_bytes(hooks) -> int:
    return sum(s.nbytes() for h in hooks for s in h.states.values())


def leftovers(transformer) -> list[str]:
    """Hooks, processors and hook registries a method left on the transformer."""
    out = []
    for name, m in transformer.named_modules():
        registry = m.__dict__.get("_diffusers_hook")
        if registry is not None and registry.hooks:
            out.append(f"{name}: hooks {list(registry.hooks)}")
        if hasattr(m, "get_processor") and isinstance(m.get_processor(), TimeRippleProcessor):
            out.append(f"{name}: TimeRipple processor")
        if m._forward_hooks or m._forward_pre_hooks:
            out.append(f"{name}: torch hooks")
    return out


@pytest.mark.skipif(not STATM.is_file(), reason="needs /proc/self/statm (Linux)")
@pytest.mark.slow
def test_soak_100_generations_no_growth_no_leftovers(embedded_model):
    model = embedded_model
    transformer = model.transformer
    before_hooks = leftovers(transformer)
    sampler = Sampler(model)
    rss, acted = [], 0
    for i in range(GENERATIONS):
        spec = SCENARIOS[i % len(SCENARIOS)]
        f, h, w = SHAPES[i % len(SHAPES)]
        steps = STEPS[i % len(STEPS)]
        gen = GenerationConfig(steps=steps, guidance=GUIDANCE[(i // len(SCENARIOS)) % 2], seed=i, frames=f,
                               height=h, width=w)
        handle = vdit_accel.apply(model, spec, steps=steps) if spec else None
        hooks = astraea_hooks(transformer)
        with torch.no_grad():
            video = sampler("a red circle moves right on a blue background", gen, progress=False)
        assert torch.isfinite(video).all() and video.shape == (3, f, h, w)
        if handle is not None:
            stats = handle.stats
            acted += any(v.get("kept_ratio", 1.0) < 1.0 or v.get("qk_savings_active", 0.0) > 0.0
                         for v in stats.values())
            assert cache_bytes(hooks) == 0  # the sampler frees the caches when the generation ends
            handle.remove()
        assert cache_bytes(hooks) == 0, f"generation {i}: Astraea caches not freed after removal"
        assert leftovers(transformer) == before_hooks, f"generation {i}: {leftovers(transformer)}"
        del handle, hooks, video
        gc.collect()
        rss.append(rss_mb())
    assert acted >= 50  # the methods really ran (kept_ratio < 1 or QK savings > 0) in most accelerated generations
    x = np.arange(WARMUP, GENERATIONS)
    slope = float(np.polyfit(x, np.asarray(rss[WARMUP:]), 1)[0])
    print(f"soak: RSS {rss[WARMUP]:.1f} -> {rss[-1]:.1f} MB over generations {WARMUP}-{GENERATIONS}, "
          f"slope {slope:.4f} MB/generation")
    assert slope < MAX_SLOPE_MB, (slope, rss)
