"""Astraea's higher-ceiling options: K/V reuse, text K/V once, forecasting, budget-0 steps, caches, composition."""

import dataclasses

import pytest
import torch
from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

import vdit_accel.methods.astraea as astraea_mod
from vdit_accel.adapters import RowCache
from vdit_accel.adapters.wan import wan_block_rows_forward
from vdit_accel.errors import CompositionError, ConfigError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea, cache_bytes
from vdit_accel.ops.attention import row_subset_attention
from vdit_accel.testing import TINY_PROMPT

GEN = GenerationConfig(steps=6, guidance=3.0, seed=5)
SPARSE = (1.0, 0.5, 0.25, 0.0, 0.5, 0.0)


def _run(model, cfg=None, gen=GEN):
    handle = apply_astraea(model.transformer, cfg) if cfg is not None else None
    try:
        return Sampler(model)(TINY_PROMPT, gen, progress=False), handle
    finally:
        if handle is not None:
            handle.remove()


def _block_inputs(t, b=2, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = t.config.num_attention_heads * t.config.attention_head_dim
    x = torch.randn(b, n, c, generator=g)
    ehs = torch.randn(b, 20, c, generator=g)
    temb = torch.randn(b, 6, c, generator=g)
    rope = t.rope(torch.zeros(1, 3, 4, 8, 8))
    return x, ehs, temb, rope


def test_row_cache_path_with_all_rows_matches_the_stock_block(tiny_model):
    t = tiny_model.transformer
    block = t.blocks[0]
    x, ehs, temb, rope = _block_inputs(t)
    ref = block(x, ehs, temb, rope)
    idx = torch.arange(8).expand(2, 8)
    cache = RowCache()
    rows, _ = wan_block_rows_forward(block, x, ehs, temb, rope, idx, row_subset_attention, kv="cache", cache=cache)
    torch.testing.assert_close(rows, ref, atol=2e-5, rtol=1e-5)
    assert cache.k.shape == (2, 8, t.config.num_attention_heads, t.config.attention_head_dim)
    assert cache.text_k is not None
    # second call, rows only: K/V of the selected rows are fresh, the others come from the cache
    x2 = x + 0.1 * torch.randn_like(x)
    sub = torch.tensor([[1, 5], [0, 7]])
    rows2, _ = wan_block_rows_forward(block, x2, ehs, temb, rope, sub, row_subset_attention, kv="cache", cache=cache)
    mixed = x.clone()
    mixed.scatter_(1, sub[..., None].expand(-1, -1, x.shape[-1]), torch.gather(x2, 1, sub[..., None].expand(-1, -1,
                                                                                                          x.shape[-1])))
    ref2 = block(mixed, ehs, temb, rope)  # keys/values of unselected rows from x, of selected rows from x2
    torch.testing.assert_close(rows2, torch.gather(ref2, 1, sub[..., None].expand(-1, -1, x.shape[-1])),
                               atol=2e-5, rtol=1e-5)
    full_kv, _ = wan_block_rows_forward(block, x2, ehs, temb, rope, sub, row_subset_attention)
    assert not torch.allclose(rows2, full_kv, atol=1e-4)  # K/V reuse really reused stale rows


def test_text_kv_recomputed_when_the_text_changes(tiny_model):
    t = tiny_model.transformer
    block = t.blocks[0]
    x, ehs, temb, rope = _block_inputs(t)
    idx = torch.arange(8).expand(2, 8)
    cache = RowCache()
    wan_block_rows_forward(block, x, ehs, temb, rope, idx, row_subset_attention, kv="cache", cache=cache)
    first = cache.text_k
    ehs2 = ehs + 1.0
    rows, _ = wan_block_rows_forward(block, x, ehs2, temb, rope, idx, row_subset_attention, kv="all", cache=cache)
    assert cache.text_k is not first
    torch.testing.assert_close(rows, block(x, ehs2, temb, rope), atol=2e-5, rtol=1e-5)


def test_kv_reuse_acts_and_stays_close(tiny_model):
    dense, _ = _run(tiny_model)
    base, _ = _run(tiny_model, AstraeaConfig(budgets=SPARSE, num_steps=6))
    reuse, handle = _run(tiny_model, AstraeaConfig(budgets=SPARSE, num_steps=6, kv_reuse=True))
    assert not torch.equal(base, reuse)
    err_base = (base - dense).pow(2).mean()
    err_reuse = (reuse - dense).pow(2).mean()
    assert err_reuse < 10 * err_base + 1e-6
    assert handle.stats.cache_bytes_peak > 0


def test_forecast_orders_act_and_are_counted(tiny_model):
    outs = {}
    for order in (0, 1, 2):
        outs[order], handle = _run(tiny_model, AstraeaConfig(budgets=SPARSE, num_steps=6, forecast=order))
        calls = handle.stats.summary()["forecast_calls"]
        assert (calls > 0) == (order > 0)
    assert not torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[1], outs[2])


def test_budget_zero_shortcut_is_exact(tiny_model, monkeypatch):
    cfg = AstraeaConfig(budgets=SPARSE, num_steps=6, forecast=1)
    fast, _ = _run(tiny_model, cfg)
    original = astraea_mod.AstraeaBlockHook._settings

    def no_shortcut(self, x):
        s = original(self, x)
        s["shortcut"] = False
        return s

    monkeypatch.setattr(astraea_mod.AstraeaBlockHook, "_settings", no_shortcut)
    slow, _ = _run(tiny_model, cfg)
    assert torch.equal(fast, slow)


def test_no_scoring_on_full_and_empty_steps(tiny_model, monkeypatch):
    calls = []
    real = astraea_mod.token_scores
    monkeypatch.setattr(astraea_mod, "token_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    _run(tiny_model, AstraeaConfig(budgets=(1.0, 1.0, 0.0, 0.0, 1.0, 0.0), num_steps=6))
    assert calls == []
    _run(tiny_model, AstraeaConfig(budgets=(1.0, 1.0, 0.5, 0.0, 1.0, 0.0), num_steps=6))
    assert len(calls) == 2 * len(tiny_model.transformer.blocks)  # one sparse step, two CFG branches


def test_cache_dtype_bfloat16_shrinks_the_cache(tiny_model):
    _, h32 = _run(tiny_model, AstraeaConfig(budgets=SPARSE, num_steps=6, forecast=1))
    out16, h16 = _run(tiny_model, AstraeaConfig(budgets=SPARSE, num_steps=6, forecast=1, cache_dtype="bfloat16"))
    assert torch.isfinite(out16).all()
    assert h16.stats.cache_bytes_peak < 0.9 * h32.stats.cache_bytes_peak  # [B,N,C] caches halve; int64 ones stay


def test_memory_cap_degrades_visibly(tiny_model, caplog):
    cfg = AstraeaConfig(budgets=SPARSE, num_steps=6, forecast=2, kv_reuse=True, memory_cap_mb=1e-6)
    _, handle = _run(tiny_model, cfg)
    assert handle.stats.summary()["degraded"] == ["forecast order 2 -> 1", "forecast order 1 -> 0", "kv_reuse -> off"]
    assert "memory cap" in caplog.text
    assert handle.stats.forecast_calls == 0


def test_cache_bytes_counts_what_the_state_holds(tiny_model):
    cfg = AstraeaConfig(budgets=SPARSE, num_steps=6, forecast=1, kv_reuse=True)
    t = tiny_model.transformer
    shapes = []
    probe = t.blocks[0].register_forward_pre_hook(lambda m, a: shapes.append((a[0].shape, a[1].shape)))
    try:
        _, handle = _run(tiny_model, cfg)
    finally:
        probe.remove()
    (b, n, c), (_, text, _) = shapes[0]
    predicted = cache_bytes(n, c, t.config.num_attention_heads, len(t.blocks), batch=b, order=1, kv_reuse=True,
                            text_tokens=text)
    assert handle.stats.cache_bytes_peak == predicted  # two CFG branches, every block, after step 1


def test_resampled_keeps_the_mean_and_errors_when_it_cannot():
    cfg = AstraeaConfig(budgets=(1.0,) + (0.4,) * 24 + (0.6,) * 25, num_steps=50, forecast=tuple([1] * 25 + [2] * 25))
    r = cfg.resampled(20)
    assert r.num_steps == 20 and len(r.budgets) == 20 and r.orders[-1] == 2 and r.orders[1] == 1
    assert sum(r.budgets) / 20 == pytest.approx(sum(cfg.budgets) / 50, abs=1e-9)
    with pytest.raises(ConfigError, match="num_steps=1"):
        cfg.resampled(1)
    with pytest.raises(ConfigError, match="forecast"):
        AstraeaConfig(num_steps=4, forecast=3)
    with pytest.raises(ConfigError, match="cache='output'"):
        AstraeaConfig(num_steps=4, forecast=1, cache="residual")
    with pytest.raises(ConfigError, match="kv_reuse"):
        AstraeaConfig(num_steps=4, kv_reuse=True, kv="selected")


def test_step_count_mismatch_names_resampling(tiny_model):
    with pytest.raises(ConfigError, match="resampled"):
        _run(tiny_model, AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4))


def test_second_apply_is_refused_and_leaves_the_first(tiny_model):
    cfg = AstraeaConfig(budgets=SPARSE, num_steps=6)
    handle = apply_astraea(tiny_model.transformer, cfg)
    try:
        with pytest.raises(ConfigError, match="already applied"):
            apply_astraea(tiny_model.transformer, cfg)
        Sampler(tiny_model)(TINY_PROMPT, GEN, progress=False)
        assert handle.stats.summary()["kept_ratio"] < 1.0
    finally:
        handle.remove()
    dense, _ = _run(tiny_model)
    again, _ = _run(tiny_model)
    assert torch.equal(dense, again)


def test_diffusers_attention_cache_is_refused_in_both_orders(tiny_model):
    t = tiny_model.transformer
    sampler = Sampler(tiny_model)
    pab = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                          current_timestep_callback=lambda: sampler.current_timestep,
                                          spatial_attention_block_identifiers=["blocks"])
    t.enable_cache(pab)
    try:
        with pytest.raises(CompositionError, match="self-attention"):
            apply_astraea(t, AstraeaConfig(budgets=SPARSE, num_steps=6))
    finally:
        t.disable_cache()
    handle = apply_astraea(t, AstraeaConfig(budgets=SPARSE, num_steps=6))
    try:
        t.enable_cache(pab)
        with pytest.raises(CompositionError, match="self-attention"):
            sampler(TINY_PROMPT, GEN, progress=False)
    finally:
        t.disable_cache()
        handle.remove()


def test_block_cache_before_astraea_is_refused_after_composes(tiny_model):
    t = tiny_model.transformer
    t.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with pytest.raises(CompositionError, match="apply_astraea first"):
            apply_astraea(t, AstraeaConfig(budgets=SPARSE, num_steps=6))
    finally:
        t.disable_cache()
    dense, _ = _run(tiny_model)
    astraea_only, _ = _run(tiny_model, AstraeaConfig(budgets=SPARSE, num_steps=6))
    handle = apply_astraea(t, AstraeaConfig(budgets=SPARSE, num_steps=6))
    t.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        both = Sampler(tiny_model)(TINY_PROMPT, GEN, progress=False)
    finally:
        t.disable_cache()
        handle.remove()
    assert handle.stats.summary()["kept_ratio"] < 1.0  # Astraea acted inside the cache
    assert not torch.equal(both, astraea_only)  # and the cache acted around it
    after, _ = _run(tiny_model)
    assert torch.equal(dense, after)


def test_full_budget_every_option_is_bit_identical(tiny_model):
    dense, _ = _run(tiny_model)
    cfg = AstraeaConfig(budgets=(1.0,) * 6, num_steps=6, forecast=2, kv_reuse=True, cache_dtype="bfloat16")
    full, _ = _run(tiny_model, dataclasses.replace(cfg))
    assert torch.equal(dense, full)


def test_shipped_astraea_preset_resamples_to_other_step_counts():
    from vdit_accel.search.presets import load_preset

    full = load_preset("astraea-3x", method="astraea", steps=50)
    short = load_preset("astraea-3x", method="astraea", steps=8)
    assert short.num_steps == 8 and len(short.budgets) == 8
    assert short.mean_budget == pytest.approx(full.mean_budget, abs=1 / 8)  # dense first step kept at 1.0


def test_whole_step_schedules_run_lean(tiny_model, monkeypatch):
    """Budgets 0/1 only: stock blocks on computed steps, only the last block caches; same result as the full path."""
    cfg = AstraeaConfig(budgets=(1.0, 0.0, 1.0, 0.0, 0.0, 1.0), num_steps=6, forecast=2)
    lean, h_lean = _run(tiny_model, cfg)
    original = astraea_mod.AstraeaBlockHook._settings

    def not_lean(self, x):
        s = original(self, x)
        s["lean"] = False
        return s

    monkeypatch.setattr(astraea_mod.AstraeaBlockHook, "_settings", not_lean)
    full, h_full = _run(tiny_model, cfg)
    torch.testing.assert_close(lean, full, atol=1e-4, rtol=1e-4)
    assert h_lean.stats.forecast_calls > 0 and h_lean.stats.summary()["kept_ratio"] == h_full.stats.summary()[
        "kept_ratio"]
    n_blocks = len(tiny_model.transformer.blocks)
    assert h_lean.stats.cache_bytes_peak * n_blocks <= h_full.stats.cache_bytes_peak
    dense, _ = _run(tiny_model)
    assert not torch.equal(dense, lean)


def test_cli_method_without_preset_uses_a_default_that_acts():
    from vdit_accel.search.presets import DEFAULT_PRESETS, method_config_from_cli

    cfg = method_config_from_cli("astraea", None, steps=8)
    assert cfg.num_steps == 8 and cfg.mean_budget < 1.0  # not the dense default config
    assert DEFAULT_PRESETS["astraea"] == "astraea-3x"
    with pytest.raises(ConfigError, match="needs --preset"):
        method_config_from_cli("fbc", None, steps=8)


# ------------------------------------------------------------------------------------ forecast over the timestep
@pytest.mark.parametrize("budgets,order", [(SPARSE, 2), ((1.0, 0.0, 1.0, 0.0, 0.0, 1.0), 1)])
def test_timestep_forecast_axis_equals_step_axis_on_evenly_spaced_timesteps(tiny_model, budgets, order):
    """flow_shift 1: the scheduler's timesteps are evenly spaced, so extrapolating over the timestep is the same
    Taylor forecast as over the step index (the distances differ by one constant factor, which cancels)."""
    even = dataclasses.replace(GEN, flow_shift=1.0)
    by_step, hs = _run(tiny_model, AstraeaConfig(budgets=budgets, num_steps=6, forecast=order), gen=even)
    by_time, ht = _run(tiny_model, AstraeaConfig(budgets=budgets, num_steps=6, forecast=order,
                                                 forecast_axis="timestep"), gen=even)
    assert hs.stats.forecast_calls == ht.stats.forecast_calls > 0
    torch.testing.assert_close(by_time, by_step, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budgets", [SPARSE, (1.0, 0.0, 1.0, 0.0, 0.0, 1.0)])
def test_timestep_forecast_axis_acts_on_a_shifted_schedule(tiny_model, budgets):
    shifted = dataclasses.replace(GEN, flow_shift=3.0)
    by_step, _ = _run(tiny_model, AstraeaConfig(budgets=budgets, num_steps=6, forecast=1), gen=shifted)
    by_time, h = _run(tiny_model, AstraeaConfig(budgets=budgets, num_steps=6, forecast=1, forecast_axis="timestep"),
                      gen=shifted)
    assert h.stats.forecast_calls > 0 and torch.isfinite(by_time).all()
    assert not torch.equal(by_time, by_step)


def test_forecast_axis_is_validated(tiny_model):
    from vdit_accel.search.joint import StepChoice, schedule_to_config

    with pytest.raises(ConfigError, match="forecast_axis='sigma'.*choose one of"):
        AstraeaConfig(num_steps=4, forecast=1, forecast_axis="sigma")
    noop = AstraeaConfig(budgets=(1.0, 0.0, 1.0, 0.0), num_steps=4, forecast=0, forecast_axis="timestep")  # template
    with pytest.raises(ConfigError, match="does nothing"):
        apply_astraea(tiny_model.transformer, noop)  # refused before anything is installed
    assert "_diffusers_hook" not in tiny_model.transformer.__dict__ or not tiny_model.transformer._diffusers_hook.hooks
    template = AstraeaConfig(num_steps=2, forecast_axis="timestep")
    moot = schedule_to_config([StepChoice(1.0), StepChoice(0.0, 0)], template)
    assert moot.forecast_axis == "step"  # a searched schedule without forecasts drops the moot axis
    cfg = AstraeaConfig(num_steps=4, forecast=(0, 1, 2, 1), forecast_axis="timestep")
    assert AstraeaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.resampled(8).forecast_axis == "timestep"


def test_fast_rope_of_row_subsets_is_the_stock_formula():
    from vdit_accel.adapters.wan import _apply_rotary_emb, _rope_rows, _rope_table
    g = torch.Generator().manual_seed(0)
    for d in (8, 16, 64, 128):
        x = torch.randn(2, 7, 3, d, generator=g)
        cos = torch.randn(1, 7, 1, d // 2, generator=g).repeat_interleave(2, -1)
        sin = torch.randn(1, 7, 1, d // 2, generator=g).repeat_interleave(2, -1)
        ref = _apply_rotary_emb(x, cos, sin)
        torch.testing.assert_close(_rope_rows(x, cos, sin, _rope_table(cos, sin)), ref, atol=2e-6, rtol=1e-6)
        assert torch.equal(_rope_rows(x, cos, sin, None), ref)  # no table: the stock op itself
        strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # not contiguous: the stock op
        assert torch.equal(_rope_rows(strided, cos, sin, _rope_table(cos, sin)), ref)
    assert _rope_table(cos.half(), sin.half()) is None  # no complex path for half tables


def test_order0_output_is_the_cache_only_when_nothing_wraps_the_blocks(tiny_model):
    """The order-0 output of a sparse step is the block's output cache itself (no copy): safe because only the next
    block reads it before the block's next call rewrites it. A hook that wraps a block (registered after Astraea)
    may keep outputs across steps, so it gets a copy: what it kept must not change afterwards."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Keep(ModelHook):
        def __init__(self):
            super().__init__()
            self.kept = []

        def post_forward(self, module, output):
            astraea = module._diffusers_hook.get_hook("vdit_accel.astraea")
            self.kept.append((output, output.clone(), astraea.shared["settings"]["shortcut"]))
            return output

    cfg = AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4)
    gen = dataclasses.replace(GEN, steps=4)
    ref, _ = _run(tiny_model, cfg, gen)
    handle = apply_astraea(tiny_model.transformer, cfg)
    keep = Keep()
    HookRegistry.check_if_exists_or_initialize(tiny_model.transformer.blocks[0]).register_hook(keep, "spy")
    try:
        out = Sampler(tiny_model)(TINY_PROMPT, gen, progress=False)
    finally:
        HookRegistry.check_if_exists_or_initialize(tiny_model.transformer.blocks[0]).remove_hook("spy")
        handle.remove()
    assert torch.equal(out, ref)  # the copy changes nothing in the result
    assert len(keep.kept) == 8 and not any(shortcut for _, _, shortcut in keep.kept)  # Astraea saw the wrapper
    assert all(torch.equal(o, c) for o, c, _ in keep.kept)  # nothing kept was overwritten
    ptrs = [o.data_ptr() for o, _, _ in keep.kept]
    assert len(set(ptrs)) == len(ptrs)
