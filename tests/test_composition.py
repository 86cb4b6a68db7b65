"""Compositions: every member acts (stats and output), orders that cannot work raise CompositionError, and
removal restores the model bit-exactly."""

import pytest
import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import vdit_accel
from vdit_accel.errors import CompositionError, ConfigError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.magcache_ratios import calibrate_mag_ratios
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.testing import TINY_PROMPT

STEPS = 6
GEN = GenerationConfig(steps=STEPS, guidance=3.0, seed=3)
ASTRAEA = AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.0, 0.5, 1.0), num_steps=STEPS)
TIMERIPPLE = TimeRippleConfig(fixed_threshold=2.0, i_min=1, i_max=2, num_steps=STEPS)


def _gen(model):
    return Sampler(model)(TINY_PROMPT, GEN, progress=False)


def _block_caches(model):
    sampler = Sampler(model)
    ratios = calibrate_mag_ratios(sampler, TINY_PROMPT, GEN, write=False)
    return {
        "fbc": FirstBlockCacheConfig(threshold=0.3),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                            cache_identifiers=[r"^blocks\.\d+$"]),
        "magcache": MagCacheConfig(threshold=0.5, max_skip_steps=2, retention_ratio=0.0, num_inference_steps=STEPS,
                                   mag_ratios=ratios),
    }


def test_timeripple_acts_inside_astraea_rows(tiny_model):
    dense = _gen(tiny_model)
    with vdit_accel.apply(tiny_model, ASTRAEA) as h:
        astraea_only = _gen(tiny_model)
    with vdit_accel.apply(tiny_model, TIMERIPPLE) as h:
        tr_only = _gen(tiny_model)
    for spec in ([ASTRAEA, TIMERIPPLE], [TIMERIPPLE, ASTRAEA]):  # the order in the list does not matter
        with vdit_accel.apply(tiny_model, spec) as h:
            both = _gen(tiny_model)
            stats = h.stats
        assert stats["astraea"]["kept_ratio"] < 1.0
        assert stats["timeripple"]["qk_savings_active"] > 0.0
        assert not torch.equal(both, astraea_only) and not torch.equal(both, tr_only)
    assert torch.equal(_gen(tiny_model), dense)


def test_timeripple_applied_after_astraea_by_hand_also_acts(tiny_model):
    ha = apply_astraea(tiny_model.transformer, ASTRAEA)
    ht = apply_timeripple(tiny_model.transformer, TIMERIPPLE)
    try:
        out = _gen(tiny_model)
    finally:
        ha.remove()  # removal in the order applied
        ht.remove()
    assert ha.stats.summary()["kept_ratio"] < 1.0 and ht.stats.summary()["qk_savings_active"] > 0.0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cache", ["fbc", "taylorseer", "magcache"])
def test_block_caches_wrap_astraea_and_both_act(tiny_model, cache):
    dense = _gen(tiny_model)
    caches = _block_caches(tiny_model)
    t = tiny_model.transformer
    with vdit_accel.apply(tiny_model, ASTRAEA):
        astraea_only = _gen(tiny_model)
    t.enable_cache(caches[cache])
    try:
        cache_only = _gen(tiny_model)
    finally:
        t.disable_cache()
    with vdit_accel.apply(tiny_model, [caches[cache], ASTRAEA]) as h:  # applied Astraea first, the cache around it
        both = _gen(tiny_model)
        kept = h.stats["astraea"]["kept_ratio"]
    assert kept < 1.0
    assert not torch.equal(both, astraea_only) and not torch.equal(both, cache_only)
    assert torch.equal(_gen(tiny_model), dense)
    t.enable_cache(caches[cache])
    try:
        with pytest.raises(CompositionError, match="apply_astraea first"):
            apply_astraea(t, ASTRAEA)
    finally:
        t.disable_cache()
    assert torch.equal(_gen(tiny_model), dense)


@pytest.mark.parametrize("cache", ["pab", "fastercache"])
def test_attention_caches_are_refused_with_astraea(tiny_model, cache):
    sampler = Sampler(tiny_model)
    cb = lambda: sampler.current_timestep  # noqa: E731
    config = {
        "pab": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=cb,
                                               spatial_attention_block_identifiers=["blocks"]),
        "fastercache": FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=cb,
                                         attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
                                         spatial_attention_block_identifiers=["blocks"], tensor_format="BCFHW"),
    }[cache]
    dense = sampler(TINY_PROMPT, GEN, progress=False)
    with pytest.raises(CompositionError, match="self-attention"):
        vdit_accel.apply(tiny_model, [config, ASTRAEA])  # refused at apply time, everything rolled back
    assert torch.equal(sampler(TINY_PROMPT, GEN, progress=False), dense)
    handle = apply_astraea(tiny_model.transformer, ASTRAEA)  # by hand, the cache after: refused at run time
    tiny_model.transformer.enable_cache(config)
    try:
        with pytest.raises(CompositionError, match="self-attention"):
            sampler(TINY_PROMPT, GEN, progress=False)
    finally:
        tiny_model.transformer.disable_cache()
        handle.remove()
    assert torch.equal(sampler(TINY_PROMPT, GEN, progress=False), dense)


def test_apply_refuses_duplicates_and_rolls_back(tiny_model):
    dense = _gen(tiny_model)
    with pytest.raises(ConfigError, match="more than once"):
        vdit_accel.apply(tiny_model, [ASTRAEA, ASTRAEA])
    bad = AstraeaConfig(budgets=(1.0, 0.5), num_steps=2)
    with pytest.raises(ConfigError):
        vdit_accel.apply(tiny_model, [TIMERIPPLE, bad], steps=1)  # the Astraea resampling fails: nothing stays
    assert torch.equal(_gen(tiny_model), dense)
    with vdit_accel.apply(tiny_model, "astraea-3x", steps=STEPS) as h:  # a 50-step preset, resampled at apply
        _gen(tiny_model)
        assert h.stats["astraea"]["kept_ratio"] < 1.0
    assert torch.equal(_gen(tiny_model), dense)
