"""Replay: the DecisionRecorder sees what a diffusers cache skipped; replay arithmetic on a hand-made cost table."""

import pytest
import torch
from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

from vdit_accel.bench.replay import (
    BlockDecision,
    CallDecision,
    ComponentCosts,
    DecisionRecorder,
    astraea_choices,
    predict_astraea_speedup,
    replay_speedup,
)
from vdit_accel.errors import ConfigError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig
from vdit_accel.methods.peers import TAYLORSEER_WAN_BLOCKS
from vdit_accel.search.latency import LatencyModel
from vdit_accel.testing import TINY_PROMPT, tiny_model

GEN = GenerationConfig(steps=8, guidance=3.0)
FULL, SKIP = BlockDecision(True, True, True), BlockDecision(False, False, False)
NO_ATTN1 = BlockDecision(False, True, True)


def _record(config):
    model = tiny_model()
    sampler = Sampler(model)
    t = model.transformer
    if config is not None:
        t.enable_cache(config)
    try:
        with DecisionRecorder(t) as rec:
            sampler(TINY_PROMPT, GEN, progress=False)
    finally:
        if config is not None:
            t.disable_cache()
    return rec, t


def test_dense_run_is_all_full_and_hooks_are_removed():
    rec, t = _record(None)
    assert [(c.branch, c.step) for c in rec.decisions] == [(b, s) for s in range(8) for b in ("cond", "uncond")]
    assert rec.summary()["blocks"] == {"full": 16 * 2}
    assert not t._forward_hooks and not t._forward_pre_hooks
    assert all(not m._forward_hooks for b in t.blocks for m in b.modules())


def test_recorder_sees_first_block_cache_skips():
    rec, _ = _record(FirstBlockCacheConfig(threshold=10.0))  # a huge threshold: skip whenever allowed
    kinds = [[b.kind for b in c.blocks] for c in rec.decisions]
    assert kinds[0] == ["full", "full"]  # the first call has no cache
    assert ["full", "skipped"] in kinds  # the first block always runs, the rest are served from the cache


def test_recorder_sees_taylorseer_skips():
    cfg = TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1,
                                taylor_factors_dtype=torch.float32, cache_identifiers=TAYLORSEER_WAN_BLOCKS)
    rec, _ = _record(cfg)
    skipped_steps = {c.step for c in rec.decisions if all(b.kind == "skipped" for b in c.blocks)}
    assert skipped_steps and min(skipped_steps) >= 2


def test_recorder_sees_attention_only_skips():
    sampler_holder = {}
    cfg = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                          spatial_attention_timestep_skip_range=(-1, 1001),
                                          current_timestep_callback=lambda: sampler_holder["s"].current_timestep)
    model = tiny_model()
    sampler_holder["s"] = sampler = Sampler(model)
    model.transformer.enable_cache(cfg)
    try:
        with DecisionRecorder(model.transformer) as rec:
            sampler(TINY_PROMPT, GEN, progress=False)
    finally:
        model.transformer.disable_cache()
    assert rec.summary()["blocks"].get("attn1_skipped", 0) > 0


COSTS = ComponentCosts(full_block_s=2.0, attn1_s=0.5, skipped_block_s=0.1, overhead_s=1.0, target_layers=4)


def test_replay_arithmetic_by_hand():
    calls = [CallDecision("cond", 0, (FULL, FULL)), CallDecision("cond", 1, (FULL, SKIP)),
             CallDecision("cond", 2, (NO_ATTN1, NO_ATTN1))]
    r = replay_speedup(calls, COSTS)
    dense = 3 * (1.0 + 4 * 2.0)
    replay = (1.0 + 2 * 4.0) + (1.0 + 2 * 2.1) + (1.0 + 2 * 3.0)  # 4 target layers / 2 recorded blocks
    assert r["dense_s"] == pytest.approx(dense) and r["replay_s"] == pytest.approx(replay)
    assert r["speedup"] == pytest.approx(dense / replay)
    assert r["block_kinds"] == {"full": 3, "skipped": 1, "attn1_skipped": 2}
    with pytest.raises(ConfigError, match="partial"):
        replay_speedup([CallDecision("cond", 0, (BlockDecision(True, False, True),))], COSTS)
    with pytest.raises(ConfigError, match="no recorded calls"):
        replay_speedup([], COSTS)
    assert ComponentCosts.from_results({"components": COSTS.__dict__ | {"extra": 1}}) == COSTS


def test_astraea_prediction_from_a_latency_model():
    lm = LatencyModel(costs={(1.0, 0): 1.0, (0.5, 0): 0.6, (0.0, 0): 0.05}, kv_reuse=False, geometry={},
                      hardware={}, dense_step_s=1.0)
    cfg = AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.0), num_steps=4)
    assert [c.budget for c in astraea_choices(cfg)] == [1.0, 0.5, 0.5, 0.0]
    assert predict_astraea_speedup(cfg, lm) == pytest.approx(4 / (1.0 + 0.6 + 0.6 + 0.05))
    lm_kv = LatencyModel(costs={(1.0, 0): 1.0}, kv_reuse=True, geometry={}, hardware={}, dense_step_s=1.0)
    with pytest.raises(ConfigError, match="kv_reuse"):
        predict_astraea_speedup(cfg, lm_kv)
