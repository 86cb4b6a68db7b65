"""CogVideoX (joint text-first self-attention, RoPE 5B/1.5, sincos 2B) on tiny random configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_pipelines import COGVIDEOX_CALL, PROMPT, cogvideox_inputs, cogvideox_pipeline, tiny_cogvideox

import vdit_accel
from vdit_accel.adapters import RowCache, resolve_adapter
from vdit_accel.adapters.cogvideox import CogVideoXAdapter
from vdit_accel.errors import ConfigError
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.ops.attention import row_subset_attention

OFF = TimeRippleConfig(fixed_threshold=0.0, num_steps=3, i_min=0, i_max=1)
ON = TimeRippleConfig(fixed_threshold=10.0, num_steps=3, i_min=0, i_max=1)
# row_subset_attention reduces with its own LSE kernel, not the stock SDPA call: float32 rounding differs
ROW_TOL = dict(atol=2e-5, rtol=1e-5)


@torch.no_grad()
def _run(model, kwargs):
    return model(**kwargs)[0]


def test_resolves_by_exact_class_and_describes_layout():
    model = tiny_cogvideox()
    adapter = resolve_adapter(model)
    assert isinstance(adapter, CogVideoXAdapter) and adapter.joint_blocks
    layout = adapter.layout(model, (), cogvideox_inputs(model))
    assert layout.grid == (3, 4, 4) and (layout.text_prefix, layout.text_suffix, layout.batch) == (6, 0, 2)
    assert adapter.has_rope(model) and not adapter.has_rope(tiny_cogvideox(rope=False))


@pytest.mark.parametrize("rope", [True, False])
def test_split_call_reproduces_the_stock_processor_bit_exactly(rope):
    """qkv -> attention -> attention_output installed on every block equals the stock model (RoPE included: a
    processor that lost ``image_rotary_emb`` to diffusers' keyword filtering would differ)."""
    model = tiny_cogvideox(rope=rope)
    kw = cogvideox_inputs(model)
    ref = _run(model, kw)
    adapter = resolve_adapter(model)
    seen = []

    class Split:
        def __call__(self, attn, *args, **kwargs):
            call = adapter.qkv(attn, args, kwargs)
            seen.append(call.text_prefix)
            return adapter.attention_output(attn, adapter.attention(attn, call), call)

    attns = [adapter.self_attention(b) for b in adapter.blocks(model)]
    originals = [adapter.install_processor(a, Split()) for a in attns]
    try:
        out = _run(model, kw)
    finally:
        for a, p in zip(attns, originals):
            adapter.restore_processor(a, p)
    assert seen == [6, 6] and torch.equal(out, ref)
    assert torch.equal(_run(model, kw), ref)


def test_timeripple_off_is_exact_on_acts_and_remove_restores():
    model = tiny_cogvideox()
    kw = cogvideox_inputs(model)
    ref = _run(model, kw)
    handle = apply_timeripple(model, OFF)
    off = _run(model, kw)
    handle.remove()
    assert torch.equal(off, ref) and handle.stats.dense_calls == 2
    handle = apply_timeripple(model, ON)
    on = _run(model, kw)
    summary = handle.stats.summary()
    handle.remove()
    assert summary["active_calls"] == 2 and summary["qk_savings_active"] > 0.1
    assert not torch.equal(on, ref)
    assert torch.equal(_run(model, kw), ref)


def test_sincos_2b_refuses_timeripple_and_takes_astraea_exactly():
    model = tiny_cogvideox(rope=False)
    kw = cogvideox_inputs(model)
    ref = _run(model, kw)
    with pytest.raises(ConfigError, match="no RoPE"):
        apply_timeripple(model, ON)
    assert getattr(model, "_diffusers_hook", None) is None  # refused before anything was installed
    handle = apply_astraea(model, AstraeaConfig(budgets=(1.0,) * 3, num_steps=3))
    out = _run(model, kw)
    handle.remove()
    assert torch.equal(out, ref) and torch.equal(_run(model, kw), ref)


def test_astraea_full_budget_is_exact_and_remove_restores():
    model = tiny_cogvideox()
    kw = cogvideox_inputs(model)
    ref = _run(model, kw)
    handle = apply_astraea(model, AstraeaConfig(budgets=(1.0,) * 3, num_steps=3))
    outs = [_run(model, kw) for _ in range(3)]
    handle.remove()
    assert all(torch.equal(o, ref) for o in outs)
    assert torch.equal(_run(model, kw), ref)


AS_ON = AstraeaConfig(budgets=(1.0, 0.5, 0.5), num_steps=3)


def _steps(model, n=3):
    """A denoising loop without a pipeline: changing latents and timesteps, `[B, F, C, H, W]` inputs."""
    return [cogvideox_inputs(model, seed=i) | {"timestep": torch.tensor([900 - 300 * i] * 2)} for i in range(n)]


@pytest.mark.parametrize(("cfg", "rope"), [
    (AS_ON, True), (dataclasses.replace(AS_ON, kv_reuse=True), True),
    (dataclasses.replace(AS_ON, kv="selected"), True),
    (dataclasses.replace(AS_ON, forecast=1), True), (AS_ON, False),
    (AstraeaConfig(budgets=(1.0, 0.0, 0.5), num_steps=3), True),  # a budget-0 step (reuse) before a sparse one
    (AstraeaConfig(budgets=(1.0, 0.0, 0.0), num_steps=3, forecast=1), True),  # whole-step (lean) schedule
], ids=["kv_all", "kv_reuse", "kv_selected", "forecast1", "sincos_2b", "budget0_then_sparse", "whole_steps"])
def test_astraea_sparse_steps_act_and_remove_restores(cfg, rope):
    """Joint blocks: the hook selects video rows, computes every text token and returns ``(video, text)``."""
    model = tiny_cogvideox(rope=rope)
    seq = _steps(model)
    ref = [_run(model, kw) for kw in seq]
    handle = apply_astraea(model, cfg)
    outs = [_run(model, kw) for kw in seq]
    handle.remove()
    summary = handle.stats.summary()
    assert summary["kept_ratio_per_step"] == list(cfg.schedule) and summary["block_calls"] == 2 * 3
    assert torch.equal(outs[0], ref[0])  # the dense first step is the stock forward
    assert all(not torch.equal(o, r) and torch.isfinite(o).all() for o, r in zip(outs[1:], ref[1:]))
    assert all(torch.equal(_run(model, kw), r) for kw, r in zip(seq, ref))


def test_astraea_composes_with_timeripple():
    """TimeRipple acts inside Astraea's selected rows (its ``rows_attention``, keys offset by the text prefix)."""
    model = tiny_cogvideox()
    seq = _steps(model)
    ref = [_run(model, kw) for kw in seq]
    with vdit_accel.apply(model, AS_ON):
        alone = [_run(model, kw) for kw in seq]
    with vdit_accel.apply(model, [ON, AS_ON]) as handle:
        both = [_run(model, kw) for kw in seq]
        stats = handle.stats
    assert stats["astraea"]["kept_ratio"] < 1.0
    assert stats["timeripple"]["active_calls"] == 2 * 3 and stats["timeripple"]["qk_savings_active"] > 0.1
    assert not torch.equal(both[-1], alone[-1])
    assert all(torch.equal(_run(model, kw), r) for kw, r in zip(seq, ref))


def _block_inputs(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    kw = cogvideox_inputs(model, seed=seed)
    x = torch.randn(2, 48, 32, generator=g)
    text = torch.randn(2, 6, 32, generator=g)
    temb = torch.randn(2, 8, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=text, temb=temb, image_rotary_emb=kw.get("image_rotary_emb"))


@pytest.mark.parametrize("rope", [True, False])
@torch.no_grad()
def test_row_path_with_every_row_equals_the_stock_block(rope):
    model = tiny_cogvideox(rope=rope)
    adapter = resolve_adapter(model)
    block = adapter.blocks(model)[0]
    kw = _block_inputs(model)
    ref_video, ref_text = block(**kw)
    idx = torch.arange(48).expand(2, 48)
    for kv in ("all", "rows", "cache"):
        cache = RowCache()
        rows, lse = adapter.block_rows_forward(block, (), kw, idx, row_subset_attention, kv=kv, cache=cache)
        torch.testing.assert_close(rows, ref_video, **ROW_TOL)
        torch.testing.assert_close(cache.stream, ref_text, **ROW_TOL)
        assert lse.shape == (2, 48, 2)
        video, text = adapter.block_output((), kw, rows, cache)
        assert video is rows and text is cache.stream


@torch.no_grad()
def test_row_path_subset_matches_stock_rows_and_kv_cache_reuses():
    model = tiny_cogvideox()
    adapter = resolve_adapter(model)
    block = adapter.blocks(model)[0]
    kw = _block_inputs(model)
    ref_video, ref_text = block(**kw)
    sub = torch.tensor([[0, 5, 17, 40], [3, 4, 30, 47]])
    cache = RowCache()
    rows, _ = adapter.block_rows_forward(block, (), kw, sub, row_subset_attention, kv="all", cache=cache)
    torch.testing.assert_close(rows, torch.gather(ref_video, 1, sub[..., None].expand(-1, -1, 32)), **ROW_TOL)
    torch.testing.assert_close(cache.stream, ref_text, **ROW_TOL)  # text sees every key: exact rows
    # kv="cache": the first call fills K/V of every token; a later call on the same input recomputes only the rows
    cache = RowCache()
    adapter.block_rows_forward(block, (), kw, sub, row_subset_attention, kv="cache", cache=cache)
    assert cache.k.shape == (2, 54, 2, 16)
    k_before = cache.k.clone()
    rows2, _ = adapter.block_rows_forward(block, (), kw, sub, row_subset_attention, kv="cache", cache=cache)
    torch.testing.assert_close(cache.k, k_before, **ROW_TOL)
    torch.testing.assert_close(rows2, rows, **ROW_TOL)
    # a changed input moves the cached keys of the selected rows only
    kw2 = dict(kw, hidden_states=kw["hidden_states"] + 1.0)
    adapter.block_rows_forward(block, (), kw2, sub, row_subset_attention, kv="cache", cache=cache)
    moved = (cache.k - k_before).abs().sum(dim=(2, 3)) > 0  # [B, 54]
    expect = torch.zeros(2, 54, dtype=torch.bool)  # text keys are recomputed from unchanged text: unmoved
    expect.scatter_(1, sub + 6, True)
    assert torch.equal(moved, expect)


def test_pipeline_off_exact_on_acts_remove_restores():
    pipe = cogvideox_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **COGVIDEOX_CALL).frames

    ref = run()
    with vdit_accel.apply(pipe, [OFF, AstraeaConfig(budgets=(1.0,) * 3, num_steps=3)]):
        assert torch.equal(run(), ref)
    with vdit_accel.apply(pipe, ON) as handle:
        on = run()
        stats = handle.stats["timeripple"]
    assert stats["active_calls"] == 2 * 3 and stats["qk_savings_active"] > 0.1  # 2 layers x 3 steps (CFG batched)
    assert not torch.equal(on, ref)
    assert torch.equal(run(), ref)


def test_pipeline_astraea_sparse_acts_alone_and_with_timeripple():
    pipe = cogvideox_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **COGVIDEOX_CALL).frames

    ref = run()
    with vdit_accel.apply(pipe, AS_ON) as handle:
        alone = run()
        stats = handle.stats["astraea"]
    assert stats["kept_ratio_per_step"] == [1.0, 0.5, 0.5]  # CFG batched: one branch
    assert not torch.equal(alone, ref) and torch.isfinite(alone).all()
    with vdit_accel.apply(pipe, [AS_ON, ON]) as handle:
        both = run()
        stats = handle.stats
    assert stats["astraea"]["kept_ratio"] < 1.0 and stats["timeripple"]["qk_savings_active"] > 0.1
    assert not torch.equal(both, alone)
    assert torch.equal(run(), ref)


def test_pipeline_2b_sincos_takes_astraea_exactly_and_refuses_timeripple():
    pipe = cogvideox_pipeline(rope=False)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **COGVIDEOX_CALL).frames

    ref = run()
    with vdit_accel.apply(pipe, AstraeaConfig(budgets=(1.0,) * 3, num_steps=3)):
        assert torch.equal(run(), ref)
    with vdit_accel.apply(pipe, AS_ON) as handle:
        on = run()
        assert handle.stats["astraea"]["kept_ratio"] < 1.0
    assert not torch.equal(on, ref) and torch.isfinite(on).all()
    with pytest.raises(ConfigError, match="no RoPE"):
        vdit_accel.apply(pipe, ON)
    assert torch.equal(run(), ref)
