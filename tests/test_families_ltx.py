"""LTX-Video (video-only self-attention, RoPE on the flattened heads, text through masked cross-attention)."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import LTX_CALL, PROMPT, ltx_inputs, ltx_pipeline, tiny_ltx

import vdit_accel
from vdit_accel.adapters import RowCache, resolve_adapter
from vdit_accel.adapters.ltx import LTXAdapter
from vdit_accel.errors import ConfigError
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.ops.attention import row_subset_attention

TR_OFF = TimeRippleConfig(fixed_threshold=0.0, num_steps=4, i_min=0, i_max=1)
TR_ON = TimeRippleConfig(fixed_threshold=10.0, num_steps=4, i_min=0, i_max=1)
AS_OFF = AstraeaConfig(budgets=(1.0,) * 4, num_steps=4)
AS_ON = AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4)
# row_subset_attention reduces with its own LSE kernel, not the stock SDPA call: float32 rounding differs
ROW_TOL = dict(atol=2e-5, rtol=1e-5)


def _seq():
    return [ltx_inputs(seed=i) | {"timestep": torch.tensor([900 - 200 * i] * 2)} for i in range(4)]


@torch.no_grad()
def _run(model, seq):
    return [model(**kw)[0] for kw in seq]


def test_layout_from_the_grid_arguments_and_refuses_a_wrong_grid():
    model = tiny_ltx()
    adapter = resolve_adapter(model)
    assert isinstance(adapter, LTXAdapter)
    kw = ltx_inputs()
    assert adapter.layout(model, (), kw).grid == (2, 4, 4)
    with pytest.raises(ConfigError, match="packed tokens"):
        adapter.layout(model, (), kw | {"height": 3})


def test_off_exact_on_acts_remove_exact():
    model = tiny_ltx()
    seq = _seq()
    ref = _run(model, seq)
    for cfg, apply_x in ((TR_OFF, apply_timeripple), (AS_OFF, apply_astraea)):
        handle = apply_x(model, cfg)
        assert all(torch.equal(o, r) for o, r in zip(_run(model, seq), ref))
        handle.remove()
    handle = apply_timeripple(model, TR_ON)
    on = _run(model, seq)
    handle.remove()
    summary = handle.stats.summary()
    assert summary["active_calls"] == 2 * 4 and summary["qk_savings_active"] > 0.1 and not torch.equal(on[0], ref[0])
    handle = apply_astraea(model, AS_ON)
    on = _run(model, seq)
    handle.remove()
    assert handle.stats.summary()["kept_ratio"] == pytest.approx(0.625)
    assert torch.equal(on[0], ref[0]) and not torch.equal(on[-1], ref[-1])
    assert all(torch.equal(o, r) for o, r in zip(_run(model, seq), ref))


def _ltx(heads: int, head_dim: int):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=heads,
                                      attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
                                      num_layers=1, caption_channels=16).eval()


@pytest.mark.parametrize("interpolation", [None, (8 / 25, 32, 32)])  # LTXPipeline passes (4x / 25 fps, 32, 32)
@pytest.mark.parametrize("heads,head_dim", [(2, 12), (2, 10), (3, 8)])  # same map per head, offset 2, phase shift
def test_rope_groups_are_the_channels_each_axis_rotates(heads, head_dim, interpolation):
    """Oracle: diffusers' own rotary table. A channel belongs to group a exactly when its cos/sin change as the
    position along a changes (and along no other axis); unrotated channels change with nothing."""
    model = _ltx(heads, head_dim)
    groups = resolve_adapter(model).rope_groups(model)
    grid = (3, 3, 3)
    cos, sin = model.rope(torch.zeros(1, 27, 8), *grid, rope_interpolation_scale=interpolation)  # [1, S, H*D]
    table = torch.cat([cos, sin]).view(2, *grid, heads, head_dim)
    covered = torch.zeros(heads, head_dim, dtype=torch.bool)
    for i, a in enumerate("thw"):
        n = grid[i]
        step = table.narrow(1 + i, 1, n - 1) - table.narrow(1 + i, 0, n - 1)
        changes = (step != 0).flatten(0, 3).any(0)  # [H, D]
        assert groups[a].shape == (heads, head_dim) and torch.equal(changes, groups[a]), a
        assert not (covered & groups[a]).any()  # disjoint
        covered |= groups[a]
    assert int((~covered).sum()) == heads * head_dim % 6  # the unrotated leading channels, none in a group


def test_per_group_stats_with_interleaved_groups_7_of_8_oracle():
    """θ = inf reuses every candidate: 7/8 of the tokens of an even 2x4x4 grid in every channel, so every group's
    reuse fraction is exactly 0.875 (heads 2 x 10: the two heads have different channel -> axis maps)."""
    model = _ltx(2, 10)
    handle = apply_timeripple(model, TimeRippleConfig(fixed_threshold=float("inf"), num_steps=4, i_min=0, i_max=1))
    _run(model, _seq()[:1])
    handle.remove()
    summary = handle.stats.summary()
    for a in "thw":
        assert summary[f"q_reuse_group_{a}"] == summary[f"k_reuse_group_{a}"] == 0.875


@pytest.mark.parametrize("per_token_temb", [False, True])
@torch.no_grad()
def test_row_path_with_every_row_equals_the_stock_block(per_token_temb):
    model = tiny_ltx()
    adapter = resolve_adapter(model)
    block = adapter.blocks(model)[0]
    captured = {}
    hook = block.register_forward_hook(lambda m, a, k, out: captured.update(kwargs=k, out=out), with_kwargs=True)
    model(**ltx_inputs())
    hook.remove()
    kw = dict(captured["kwargs"])
    if per_token_temb:  # LTX accepts a per-token temb [B, S, 6C]
        g = torch.Generator().manual_seed(5)
        kw["temb"] = torch.randn(2, 32, kw["temb"].shape[-1], generator=g)
    ref = block(**kw)
    idx = torch.arange(32).expand(2, 32)
    for kv in ("all", "rows", "cache"):
        rows, lse = adapter.block_rows_forward(block, (), kw, idx, row_subset_attention, kv=kv, cache=RowCache())
        torch.testing.assert_close(rows, ref, **ROW_TOL)
        assert lse.shape == (2, 32, 2)
    sub = torch.tensor([[0, 9, 31], [2, 3, 17]])
    rows, _ = adapter.block_rows_forward(block, (), kw, sub, row_subset_attention)
    torch.testing.assert_close(rows, torch.gather(ref, 1, sub[..., None].expand(-1, -1, ref.shape[-1])), **ROW_TOL)


def test_pipeline_off_exact_on_acts_remove_restores():
    pipe = ltx_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **LTX_CALL).frames

    ref = run()
    with vdit_accel.apply(pipe, [TR_OFF, AS_OFF]):
        assert torch.equal(run(), ref)
    for spec, key in ((TR_ON, "timeripple"), (AS_ON, "astraea")):
        with vdit_accel.apply(pipe, spec) as handle:
            out = run()
            stats = handle.stats[key]
        if key == "timeripple":
            assert stats["active_calls"] == 2 * 4 and stats["qk_savings_active"] > 0.1  # CFG batched
        else:
            assert stats["kept_ratio"] == pytest.approx(0.625)
        assert not torch.equal(out, ref)
    assert torch.equal(run(), ref)
