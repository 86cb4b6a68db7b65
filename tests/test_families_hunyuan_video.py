"""HunyuanVideo (dual- and single-stream joint blocks, video first then text, text padding masked, RoPE 4/6/6)."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import HUNYUAN_CALL, PROMPT, hunyuan_inputs, hunyuan_video_pipeline, tiny_hunyuan_video

import vdit_accel
from vdit_accel.adapters import RowCache, resolve_adapter
from vdit_accel.adapters.hunyuan_video import HunyuanVideoAdapter
from vdit_accel.errors import UnsupportedModelError
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.ops.attention import row_subset_attention

TR_OFF = TimeRippleConfig(fixed_threshold=0.0, num_steps=4, i_min=0, i_max=1)
TR_ON = TimeRippleConfig(fixed_threshold=10.0, num_steps=4, i_min=0, i_max=1)
AS_OFF = AstraeaConfig(budgets=(1.0,) * 4, num_steps=4)
AS_ON = AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4)
# row_subset_attention reduces with its own LSE kernel, not the stock SDPA call: float32 rounding differs
ROW_TOL = dict(atol=2e-5, rtol=1e-5)


@torch.no_grad()
def _run(model, kw):
    return model(**kw)[0]


def test_layout_rope_groups_and_both_block_kinds():
    model = tiny_hunyuan_video()
    adapter = resolve_adapter(model)
    assert isinstance(adapter, HunyuanVideoAdapter) and adapter.joint_blocks
    layout = adapter.layout(model, (), hunyuan_inputs())
    assert layout.grid == (2, 4, 4) and (layout.text_prefix, layout.text_suffix) == (0, 5)
    assert adapter.rope_groups(model) == {"t": slice(0, 4), "h": slice(4, 10), "w": slice(10, 16)}
    kinds = [type(b).__name__ for b in adapter.blocks(model)]
    assert kinds == ["HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"]


def test_timeripple_off_exact_on_acts_remove_exact_with_text_padding():
    model = tiny_hunyuan_video()
    kw = hunyuan_inputs(padded=2)
    ref = _run(model, kw)
    handle = apply_timeripple(model, TR_OFF)
    assert torch.equal(_run(model, kw), ref)
    handle.remove()
    handle = apply_timeripple(model, TR_ON)
    on = _run(model, kw)
    handle.remove()
    summary = handle.stats.summary()
    assert summary["active_calls"] == 2 and summary["qk_savings_active"] > 0.1  # one dual, one single block
    assert not torch.equal(on, ref)
    assert torch.equal(_run(model, kw), ref)


def test_timeripple_honours_the_text_padding_mask():
    """Two padded text tokens change nothing when masked: with reuse on, the output equals the output of the same
    call with the padded tokens removed (float tolerance: different sequence lengths reduce differently)."""
    model = tiny_hunyuan_video()
    kw = hunyuan_inputs(padded=2)
    kw["encoder_attention_mask"][:] = 1
    kw["encoder_attention_mask"][:, -2:] = 0  # both prompts padded: removable for the whole batch
    short = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"][:, :3],
                 encoder_attention_mask=kw["encoder_attention_mask"][:, :3])
    torch.testing.assert_close(_run(model, kw), _run(model, short), atol=1e-5, rtol=1e-5)  # the stock premise
    handle = apply_timeripple(model, TR_ON)
    try:
        padded, unpadded = _run(model, kw), _run(model, short)
    finally:
        handle.remove()
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded, _run(model, kw), atol=1e-3)


def test_structured_variants_refuse_a_masked_attention():
    model = tiny_hunyuan_video()
    handle = apply_timeripple(model, TimeRippleConfig(fixed_threshold=0.5, num_steps=4, i_min=0, i_max=1,
                                                      variant="tokens"))
    try:
        with pytest.raises(UnsupportedModelError, match="exact_sim"):
            _run(model, hunyuan_inputs())
    finally:
        handle.remove()


def test_astraea_full_budget_exact_and_sparse_refused_with_a_typed_error():
    model = tiny_hunyuan_video()
    kw = hunyuan_inputs(padded=2)
    ref = _run(model, kw)
    handle = apply_astraea(model, AS_OFF)
    assert all(torch.equal(_run(model, kw), ref) for _ in range(4))
    handle.remove()
    handle = apply_astraea(model, AS_ON)
    try:
        with pytest.raises(UnsupportedModelError, match="joint"):
            _run(model, kw)
    finally:
        handle.remove()
    assert torch.equal(_run(model, kw), ref)


def _captured_block_calls(model, kw):
    adapter = resolve_adapter(model)
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, k, out: calls.append((m, a, k, out)), with_kwargs=True)
             for b in adapter.blocks(model)]
    _run(model, kw)
    for h in hooks:
        h.remove()
    return adapter, calls


@torch.no_grad()
def test_row_path_with_every_row_equals_the_stock_blocks():
    model = tiny_hunyuan_video()
    adapter, calls = _captured_block_calls(model, hunyuan_inputs())
    assert len(calls) == 2
    for block, args, kwargs, (ref_video, ref_text) in calls:
        b, n = ref_video.shape[:2]
        cache = RowCache()
        rows, lse = adapter.block_rows_forward(block, args, kwargs, torch.arange(n).expand(b, n),
                                               row_subset_attention, cache=cache)
        torch.testing.assert_close(rows, ref_video, **ROW_TOL)
        torch.testing.assert_close(cache.stream, ref_text, **ROW_TOL)
        assert lse.shape == (b, n, 2)
        sub = torch.tensor([[0, 7, 31], [3, 4, 20]])
        rows, _ = adapter.block_rows_forward(block, args, kwargs, sub, row_subset_attention, cache=cache)
        torch.testing.assert_close(rows, torch.gather(ref_video, 1, sub[..., None].expand(-1, -1, 32)), **ROW_TOL)
        torch.testing.assert_close(cache.stream, ref_text, **ROW_TOL)
        with pytest.raises(UnsupportedModelError, match="kv="):
            adapter.block_rows_forward(block, args, kwargs, sub, row_subset_attention, kv="rows")


@torch.no_grad()
def test_row_path_refuses_text_padding():
    model = tiny_hunyuan_video()
    adapter, calls = _captured_block_calls(model, hunyuan_inputs(padded=2))
    block, args, kwargs, _ = calls[0]
    with pytest.raises(UnsupportedModelError, match="padding"):
        adapter.block_rows_forward(block, args, kwargs, torch.zeros(2, 1, dtype=torch.long), row_subset_attention)


def test_pipeline_off_exact_timeripple_acts_remove_exact():
    pipe = hunyuan_video_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **HUNYUAN_CALL).frames

    ref = run()
    with vdit_accel.apply(pipe, [TR_OFF, AS_OFF]):
        assert torch.equal(run(), ref)
    with vdit_accel.apply(pipe, TR_ON) as handle:
        on = run()
        stats = handle.stats["timeripple"]
    assert stats["active_calls"] == 2 * 4 and stats["qk_savings_active"] > 0.1  # 2 blocks x 4 steps (no CFG batch)
    assert not torch.equal(on, ref)
    with vdit_accel.apply(pipe, AS_ON), pytest.raises(UnsupportedModelError, match="joint"):
        run()
    assert torch.equal(run(), ref)
