"""HunyuanVideo (dual- and single-stream joint blocks, video first then text, text padding masked, RoPE 4/6/6)."""

from __future__ import annotations

import dataclasses

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
    """At apply time (``test_unsupported_settings_are_refused_at_apply_time``); an adapter that cannot tell in
    advance (``masks_self_attention`` False) still gets the typed error at the first masked call."""

    class LateMask(HunyuanVideoAdapter):
        def masks_self_attention(self, model):
            return False

    model = tiny_hunyuan_video()
    handle = apply_timeripple(model, TimeRippleConfig(fixed_threshold=0.5, num_steps=4, i_min=0, i_max=1,
                                                      variant="tokens"), adapter=LateMask())
    try:
        with pytest.raises(UnsupportedModelError, match="exact_sim"):
            _run(model, hunyuan_inputs())
    finally:
        handle.remove()


def _steps(n=4, padded=2):
    """A denoising loop without a pipeline: changing latents and timesteps, the second prompt padded."""
    return [hunyuan_inputs(padded=padded, seed=i) | {"timestep": torch.tensor([900 - 200 * i] * 2)}
            for i in range(n)]


def test_astraea_full_budget_exact_sparse_acts_remove_exact_with_text_padding():
    model = tiny_hunyuan_video()
    seq = _steps()
    ref = [_run(model, kw) for kw in seq]
    handle = apply_astraea(model, AS_OFF)
    assert all(torch.equal(_run(model, kw), r) for kw, r in zip(seq, ref))
    handle.remove()
    for cfg in (AS_ON, dataclasses.replace(AS_ON, forecast=2), AstraeaConfig(budgets=(1.0, 0.0, 0.5, 0.0),
                                                                              num_steps=4)):
        handle = apply_astraea(model, cfg)
        outs = [_run(model, kw) for kw in seq]
        handle.remove()
        summary = handle.stats.summary()
        assert summary["kept_ratio_per_step"] == list(cfg.schedule) and summary["block_calls"] == 2 * 4
        assert torch.equal(outs[0], ref[0])
        assert all(not torch.equal(o, r) and torch.isfinite(o).all() for o, r in zip(outs[1:], ref[1:]))
    assert all(torch.equal(_run(model, kw), r) for kw, r in zip(seq, ref))


def test_astraea_sparse_rows_ignore_padded_text():
    """The padded text tokens are masked on the row path too: with both prompts padded by two tokens, Astraea's
    output equals its output on the same calls with the padding removed (float tolerance: other lengths)."""
    seq = _steps(padded=0)
    for kw in seq:
        kw["encoder_attention_mask"][:, -2:] = 0
    short = [dict(kw, encoder_hidden_states=kw["encoder_hidden_states"][:, :3],
                  encoder_attention_mask=kw["encoder_attention_mask"][:, :3]) for kw in seq]
    outs = {}
    for name, calls in (("padded", seq), ("short", short)):
        model = tiny_hunyuan_video()
        with vdit_accel.apply(model, AS_ON) as handle:
            outs[name] = [_run(model, kw) for kw in calls]
            assert handle.stats["astraea"]["kept_ratio"] < 1.0
    for a, b in zip(outs["padded"], outs["short"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_astraea_composes_with_timeripple_under_the_mask():
    model = tiny_hunyuan_video()
    seq = _steps()
    ref = [_run(model, kw) for kw in seq]
    with vdit_accel.apply(model, AS_ON):
        alone = [_run(model, kw) for kw in seq]
    with vdit_accel.apply(model, [TR_ON, AS_ON]) as handle:
        both = [_run(model, kw) for kw in seq]
        stats = handle.stats
    assert stats["astraea"]["kept_ratio"] < 1.0 and stats["timeripple"]["qk_savings_active"] > 0.1
    assert not torch.equal(both[-1], alone[-1]) and torch.isfinite(both[-1]).all()
    assert all(torch.equal(_run(model, kw), r) for kw, r in zip(seq, ref))


def test_unsupported_settings_are_refused_at_apply_time():
    """K/V modes the HunyuanVideo row block lacks, and TimeRipple's structured variants (its attention always
    carries the padding mask), are refused when applied: nothing installed, the model untouched."""
    model = tiny_hunyuan_video()
    kw = hunyuan_inputs(padded=2)
    ref = _run(model, kw)
    for cfg, match in ((dataclasses.replace(AS_ON, kv_reuse=True), "kv_reuse=True"),
                       (dataclasses.replace(AS_ON, kv="selected"), "kv='selected'")):
        with pytest.raises(UnsupportedModelError, match=match):
            apply_astraea(model, cfg)
    for variant in ("tokens", "token_rows"):
        with pytest.raises(UnsupportedModelError, match="exact_sim"):
            vdit_accel.apply(model, TimeRippleConfig(fixed_threshold=0.5, num_steps=4, i_min=0, i_max=1,
                                                     variant=variant))
    assert getattr(model, "_diffusers_hook", None) is None or not model._diffusers_hook._hook_order
    adapter = resolve_adapter(model)
    assert all(type(adapter.self_attention(b).get_processor()).__name__ == "HunyuanVideoAttnProcessor2_0"
               for b in adapter.blocks(model))
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
def test_row_path_honours_text_padding():
    """Padded text keys are masked on the row path (``key_mask`` to the row op, the mask to text queries): every
    row and any subset equal the stock blocks, the text stream too, for a batch whose prompts pad differently."""
    model = tiny_hunyuan_video()
    adapter, calls = _captured_block_calls(model, hunyuan_inputs(padded=2))
    for block, args, kwargs, (ref_video, ref_text) in calls:
        b, n = ref_video.shape[:2]
        for idx in (torch.arange(n).expand(b, n), torch.tensor([[0, 7, 31], [3, 4, 20]])):
            cache = RowCache()
            rows, _ = adapter.block_rows_forward(block, args, kwargs, idx, row_subset_attention, cache=cache)
            torch.testing.assert_close(rows, torch.gather(ref_video, 1, idx[..., None].expand(-1, -1, 32)),
                                       **ROW_TOL)
            torch.testing.assert_close(cache.stream, ref_text, **ROW_TOL)
    # the same block without the mask attends to the padding: a different output (the mask matters here)
    block, args, kwargs, (ref_video, _) = calls[0]
    unmasked = dict(kwargs, attention_mask=None)
    rows, _ = adapter.block_rows_forward(block, args, unmasked, torch.arange(32).expand(2, 32), row_subset_attention)
    assert not torch.allclose(rows[1], ref_video[1], atol=1e-4)
    torch.testing.assert_close(rows[0], ref_video[0], **ROW_TOL)  # the first prompt has no padding


@torch.no_grad()
def test_row_path_refuses_a_mask_that_is_not_key_padding():
    model = tiny_hunyuan_video()
    adapter, calls = _captured_block_calls(model, hunyuan_inputs(padded=2))
    block, args, kwargs, _ = calls[0]
    mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[3]  # [B, 1, 1, S] bool
    assert mask.dtype == torch.bool and mask.shape[:3] == (2, 1, 1) and not mask.all()
    s = mask.shape[-1]
    bad = dict(kwargs, attention_mask=torch.rand(2, 1, s, s) > 0.5)
    with pytest.raises(UnsupportedModelError, match="key-padding"):
        adapter.block_rows_forward(block, args, bad, torch.zeros(2, 1, dtype=torch.long), row_subset_attention)


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
    assert torch.equal(run(), ref)


def test_pipeline_astraea_sparse_acts_alone_and_with_timeripple():
    """The pipeline pads every prompt to ``max_sequence_length``: Astraea's rows run under the padding mask."""
    pipe = hunyuan_video_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **HUNYUAN_CALL).frames

    ref = run()
    with vdit_accel.apply(pipe, AS_ON) as handle:
        alone = run()
        stats = handle.stats["astraea"]
    assert stats["kept_ratio_per_step"] == [1.0, 0.5, 0.5, 0.5]
    assert not torch.equal(alone, ref) and torch.isfinite(alone).all()
    with vdit_accel.apply(pipe, [TR_ON, AS_ON]) as handle:
        both = run()
        stats = handle.stats
    assert stats["astraea"]["kept_ratio"] < 1.0 and stats["timeripple"]["qk_savings_active"] > 0.1
    assert not torch.equal(both, alone)
    assert torch.equal(run(), ref)
