"""Tests of the TimeRipple tensor ops against analytic oracles and their plain-PyTorch reference twins."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from vdit_accel.errors import ConfigError
from vdit_accel.ops.timeripple import (
    AXES,
    ReuseMasks,
    ThresholdSchedule,
    partial_score_attention_reference,
    qk_savings,
    resolve_reuse,
    resolve_reuse_reference,
    reuse_masks,
    reuse_stats,
    timeripple_attention,
    timeripple_attention_reference,
    wan_rope_groups,
    window_delta,
)

INF = float("inf")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sdpa_bshd(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _valid_count(n: int, window: int) -> int:
    """Tokens of one axis that are a non-first member of a window of size >= 2."""
    return sum(max(min(window, n - start) - 1, 0) for start in range(0, n, window))


def _analytic_reuse(grid, window) -> Fraction:
    return 1 - math.prod(Fraction(n - _valid_count(n, window), n) for n in grid)


def _coords(grid):
    return list(itertools.product(*(range(n) for n in grid)))


# ----------------------------------------------------------------------------------------------- window_delta
def test_window_delta_matches_explicit_windows():
    grid, window, prefix = (3, 4, 5), 3, 2
    x = _randn(2, prefix + 60, 2, 3, seed=1, dtype=torch.float64)
    coords = _coords(grid)
    for a, axis in enumerate(AXES):
        delta, anchor, valid = window_delta(x, grid, axis, window, text_prefix=prefix)
        assert torch.equal(delta[:, :prefix], torch.zeros_like(delta[:, :prefix]))
        assert anchor[:prefix].tolist() == list(range(prefix)) and not valid[:prefix].any()
        for s, c in enumerate(coords):
            start = c[a] - c[a] % window
            span = range(start, min(start + window, grid[a]))
            members = [coords.index(c[:a] + (i,) + c[a + 1 :]) + prefix for i in span]
            want = x[:, members].std(dim=1, unbiased=False) if len(members) > 1 else torch.zeros(2, 2, 3)
            assert torch.allclose(delta[:, prefix + s], want.to(delta))
            assert anchor[prefix + s].item() == members[0]
            assert valid[prefix + s].item() == (len(members) >= 2 and c[a] != start)


def test_window_delta_k2_is_half_abs_difference():
    x = _randn(1, 2 * 3 * 4, 2, 5, seed=2)
    delta, anchor, valid = window_delta(x, (2, 3, 4), "t")
    half = (x[:, :12] - x[:, 12:]).abs() / 2
    assert torch.allclose(delta[:, 12:], half, atol=1e-6) and torch.allclose(delta[:, :12], half, atol=1e-6)
    assert anchor[12:].tolist() == list(range(12)) and valid.tolist() == [False] * 12 + [True] * 12


# ----------------------------------------------------------------------------------------------- tier (a) oracles
@pytest.mark.parametrize("thresholds", [0.0, {"t": 0.0, "h": 0.0, "w": 0.0}, torch.zeros(3, 8)])
def test_theta_zero_is_bit_identical_to_sdpa(thresholds):
    grid, prefix, suffix = (2, 3, 4), 2, 3
    q, k, v = (_randn(2, prefix + 24 + suffix, 2, 8, seed=s) for s in (3, 4, 5))
    masks = reuse_masks(q, grid, thresholds, text_prefix=prefix, text_suffix=suffix)
    assert not any(m.any() for m in masks.per_axis.values())
    kw = dict(grid=grid, thresholds=thresholds, text_prefix=prefix, text_suffix=suffix)
    out, stats = timeripple_attention(q, k, v, **kw)
    assert torch.equal(out, _sdpa_bshd(q, k, v))
    assert stats.q_reuse == stats.k_reuse == stats.qk_savings == 0.0


def test_theta_inf_even_grid_reuses_exactly_seven_eighths():
    grid = (4, 4, 6)
    q, k, v = (_randn(1, 96, 2, 6, seed=s) for s in (6, 7, 8))
    out, stats = timeripple_attention(q, k, v, grid=grid, thresholds=INF, rope_groups=wan_rope_groups(6))
    assert stats.q_reuse == stats.k_reuse == 7 / 8
    assert stats.q_reuse_per_axis == {"t": 0.5, "h": 0.5, "w": 0.5}
    assert stats.q_reuse_per_group == {"t": 7 / 8, "h": 7 / 8, "w": 7 / 8}
    assert stats.qk_savings == pytest.approx(63 / 64, abs=1e-12)
    assert stats.qk_savings_per_head == pytest.approx([63 / 64, 63 / 64], abs=1e-12)
    assert out.shape == q.shape


@pytest.mark.parametrize(
    ("grid", "window"), [((3, 5, 7), 2), ((4, 4, 6), 4), ((5, 3, 4), 4), ((3, 5, 7), 3), ((1, 5, 6), 4)]
)
def test_theta_inf_reuse_fraction_matches_analytic_count(grid, window):
    n = math.prod(grid)
    x = _randn(1, n, 1, 2, seed=9)
    masks = reuse_masks(x, grid, INF, window=window)
    expected = _analytic_reuse(grid, window)
    assert Fraction(int(masks.any.sum()), masks.any.numel()) == expected
    stats = reuse_stats(masks, None)
    assert stats.q_reuse == pytest.approx(float(expected), abs=1e-12) and stats.k_reuse == 0.0
    assert stats.qk_savings == pytest.approx(float(expected), abs=1e-12)  # rk = 0: savings = rq


def test_text_tokens_never_reuse_and_are_unchanged():
    grid, prefix, suffix = (2, 3, 3), 4, 3
    x = _randn(2, prefix + 18 + suffix, 2, 4, seed=10)
    masks = reuse_masks(x, grid, INF, text_prefix=prefix, text_suffix=suffix)
    reused = masks.any
    assert not reused[:, :prefix].any() and not reused[:, -suffix:].any() and reused[:, prefix:-suffix].any()
    for anchor in masks.anchor.values():  # no video token takes a text token as its source
        assert bool(((anchor[prefix:-suffix] >= prefix) & (anchor[prefix:-suffix] < prefix + 18)).all())
    xt = resolve_reuse(x, masks)
    assert torch.equal(xt[:, :prefix], x[:, :prefix]) and torch.equal(xt[:, -suffix:], x[:, -suffix:])
    stats = reuse_stats(masks, masks)
    want = _analytic_reuse(grid, 2) * Fraction(18, prefix + 18 + suffix)  # text tokens count as kept
    assert want == Fraction(14, 25) and stats.q_reuse == pytest.approx(float(want), abs=1e-12)


# ----------------------------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("priority", ["thw", "wht", "min_delta"])
@pytest.mark.parametrize(("grid", "window", "prefix"), [((3, 5, 7), 2, 0), ((3, 4, 5), 3, 2), ((2, 3, 5), 2, 1)])
def test_resolve_matches_loop_reference(priority, grid, window, prefix):
    x = _randn(2, prefix + math.prod(grid), 2, 4, seed=11)
    thresholds = torch.rand(3, 4, generator=torch.Generator().manual_seed(12)) * 0.8
    masks = reuse_masks(x, grid, thresholds, window=window, text_prefix=prefix)
    frac = masks.any.float().mean().item()
    assert 0.05 < frac < 0.95  # a mixed case, not all or nothing
    fast = resolve_reuse(x, masks, priority=priority)
    assert torch.equal(fast, resolve_reuse_reference(x, masks, priority=priority))
    assert not torch.equal(fast, x)


@pytest.mark.parametrize("priority", ["thw", "hwt"])
def test_resolution_is_a_fixed_point(priority):
    grid = (3, 4, 4)
    x = _randn(1, 48, 2, 3, seed=13)
    masks = reuse_masks(x, grid, 1.0)
    xt = resolve_reuse(x, masks, priority=priority)
    hop = x
    for a in reversed(priority):  # one more hop, the first axis of `priority` applied last so that it wins
        hop = torch.where(masks.per_axis[a], xt.index_select(1, masks.anchor[a]), hop)
    assert torch.equal(hop, xt)
    one_hop = x
    for a in reversed(priority):
        one_hop = torch.where(masks.per_axis[a], x.index_select(1, masks.anchor[a]), one_hop)
    assert not torch.equal(one_hop, xt)  # chains exist in this case, so one hop is not enough


def _hand_masks(grid, passes: dict[str, list[int]], deltas: dict[str, dict[int, float]] | None = None) -> ReuseMasks:
    n = math.prod(grid)
    x = torch.zeros(1, n, 1, 1)
    per_axis, delta, anchor = {}, {}, {}
    for a in AXES:
        _, anchor[a], _ = window_delta(x, grid, a)
        per_axis[a] = torch.zeros(1, n, 1, 1, dtype=torch.bool)
        per_axis[a][0, passes.get(a, []), 0, 0] = True
        delta[a] = torch.zeros(1, n, 1, 1)
        for s, d in (deltas or {}).get(a, {}).items():
            delta[a][0, s, 0, 0] = d
    return ReuseMasks(per_axis, delta, anchor)


def test_three_hop_chain_t_then_h_then_w():
    # grid (2, 2, 2): token 7 = (1,1,1) -t-> 3 = (0,1,1) -h-> 1 = (0,0,1) -w-> 0 = (0,0,0)
    masks = _hand_masks((2, 2, 2), {"t": [7], "h": [3], "w": [1]})
    x = (torch.arange(8.0) + 1).view(1, 8, 1, 1)
    want = x.clone()
    want[0, [1, 3, 7]] = x[0, 0]
    assert torch.equal(resolve_reuse(x, masks), want)
    assert torch.equal(resolve_reuse_reference(x, masks), want)


def test_cyclic_hand_made_masks_raise():
    masks = _hand_masks((2, 1, 1), {"t": [0, 1]})
    masks.anchor["t"][:] = torch.tensor([1, 0])
    x = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    with pytest.raises(ConfigError, match="resolve"):
        resolve_reuse(x, masks)
    with pytest.raises(ConfigError, match="resolve"):
        resolve_reuse_reference(x, masks)


def test_min_delta_priority_picks_smallest_delta():
    # grid (2, 2, 1): token 3 = (1,1) has t-source 1 and h-source 2; tokens 1 and 2 fail their own checks at θ=4.5.
    x = torch.tensor([0.0, 20.0, 10.0, 12.0], dtype=torch.float64).view(1, 4, 1, 1)
    masks = reuse_masks(x, (2, 2, 1), 4.5)
    assert masks.any[0, :, 0, 0].tolist() == [False, False, False, True]
    assert masks.delta["t"][0, 3, 0, 0].item() == 4.0 and masks.delta["h"][0, 3, 0, 0].item() == 1.0
    for resolve in (resolve_reuse, resolve_reuse_reference):
        assert resolve(x, masks, priority="min_delta")[0, 3, 0, 0].item() == 10.0  # h (Δ = 1) wins
        assert resolve(x, masks, priority="thw")[0, 3, 0, 0].item() == 20.0  # t wins by order
        assert resolve(x, masks, priority="htw")[0, 3, 0, 0].item() == 10.0


# ----------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize(
    ("grid", "window", "prefix", "suffix", "priority", "reuse_q", "reuse_k"),
    [
        ((2, 3, 4), 2, 0, 0, "thw", True, True),
        ((3, 3, 5), 3, 4, 0, "thw", True, True),
        ((3, 2, 5), 2, 0, 3, "min_delta", True, True),
        ((3, 3, 3), 2, 2, 0, "wht", True, False),
        ((2, 3, 3), 2, 0, 0, "thw", False, True),
    ],
)
def test_resolved_sdpa_equals_partial_score_reference(grid, window, prefix, suffix, priority, reuse_q, reuse_k):
    s = prefix + math.prod(grid) + suffix
    q, k, v = (_randn(2, s, 2, 8, seed=20 + i, dtype=torch.float64) for i in range(3))
    kw = dict(grid=grid, window=window, priority=priority, text_prefix=prefix, text_suffix=suffix)
    out, stats = timeripple_attention(q, k, v, thresholds=0.3, reuse_q=reuse_q, reuse_k=reuse_k, **kw)
    masks = dict(window=window, text_prefix=prefix, text_suffix=suffix)
    q_masks = reuse_masks(q, grid, 0.3, **masks) if reuse_q else None
    k_masks = reuse_masks(k, grid, 0.3, **masks) if reuse_k else None
    literal = partial_score_attention_reference(q, k, v, q_masks, k_masks, priority=priority)
    assert torch.allclose(out, literal, rtol=0, atol=1e-12)
    ref, ref_stats = timeripple_attention_reference(q, k, v, thresholds=0.3, reuse_q=reuse_q, reuse_k=reuse_k, **kw)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert ref_stats == stats
    assert 0.0 < stats.qk_savings < 1.0
    assert not torch.allclose(out, _sdpa_bshd(q, k, v), atol=1e-6)  # reuse changed the result


def test_float32_fast_path_close_to_reference():
    q, k, v = (_randn(1, 30, 2, 8, seed=30 + i) for i in range(3))
    out, _ = timeripple_attention(q, k, v, grid=(2, 3, 5), thresholds=0.4)
    ref, _ = timeripple_attention_reference(q, k, v, grid=(2, 3, 5), thresholds=0.4)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------- savings
def test_qk_savings_formula_hand_cases():
    half = torch.full((8,), 0.5)
    assert qk_savings(half, half).item() == 0.75
    rq = torch.tensor([1.0] * 4 + [0.0] * 4)
    assert qk_savings(rq, torch.zeros(8)).item() == 0.5
    assert qk_savings(rq, torch.tensor([0.0] * 4 + [1.0] * 4)).item() == 1.0  # every channel is skipped on one side
    assert qk_savings(torch.zeros(8), torch.zeros(8)).item() == 0.0
    batched = qk_savings(torch.stack([half, rq]), torch.stack([half, torch.zeros(8)]))
    assert batched.tolist() == [0.75, 0.5]


def test_stats_per_group_with_per_channel_thresholds():
    groups = wan_rope_groups(12)  # t: 0:4, h: 4:8, w: 8:12
    assert groups == {"t": slice(0, 4), "h": slice(4, 8), "w": slice(8, 12)}
    thresholds = torch.zeros(3, 12)
    thresholds[:, :4] = INF  # only the t group's channels reuse, along every axis
    q, k, v = (_randn(1, 16, 2, 12, seed=40 + i) for i in range(3))
    _, stats = timeripple_attention(q, k, v, grid=(2, 2, 4), thresholds=thresholds, reuse_k=False, rope_groups=groups)
    assert stats.q_reuse_per_group == {"t": 7 / 8, "h": 0.0, "w": 0.0}
    assert stats.q_reuse == pytest.approx(7 / 8 / 3, abs=1e-12)
    assert stats.k_reuse == 0.0 and stats.k_reuse_per_group == {"t": 0.0, "h": 0.0, "w": 0.0}
    assert stats.qk_savings == pytest.approx(7 / 8 / 3, abs=1e-12)


# ----------------------------------------------------------------------------------------------- schedule
def test_hunyuan_schedule_values():
    sched = ThresholdSchedule.hunyuan_video()
    assert sched == ThresholdSchedule(0.2, 0.5, 10, 20, 50)
    want = {0: 0.0, 9: 0.0, 10: 0.2, 15: 0.35, 20: 0.5, 21: 0.5, 30: 0.5, 48: 0.5, 49: 0.0}
    for step, theta in want.items():
        assert sched.at(step) == pytest.approx(theta, abs=1e-12)
    values = sched.values()
    assert len(values) == 50 and values[10:21] == sorted(values[10:21]) and values[12] > values[11]


def test_literal_schedule_values():
    sched = ThresholdSchedule(0.2, 0.5, 10, 20, 50, literal=True)
    want = {9: 0.0, 10: 0.0, 15: 0.15, 20: 0.3, 21: 0.5, 49: 0.0}
    for step, theta in want.items():
        assert sched.at(step) == pytest.approx(theta, abs=1e-12)
    assert ThresholdSchedule(0.1, 0.4, 3, 3, 6).values() == [0.0, 0.0, 0.0, 0.4, 0.4, 0.0]


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(theta_min=-0.1, theta_max=0.5, i_min=1, i_max=2, num_steps=5), r"theta_min=-0\.1"),
        (dict(theta_min=0.6, theta_max=0.5, i_min=1, i_max=2, num_steps=5), r"theta_min=0\.6 is out of range"),
        (dict(theta_min=0.1, theta_max=INF, i_min=1, i_max=2, num_steps=5), r"theta_max=inf"),
        (dict(theta_min=0.1, theta_max=0.5, i_min=3, i_max=2, num_steps=5), r"i_min=3 is out of range"),
        (dict(theta_min=0.1, theta_max=0.5, i_min=1, i_max=5, num_steps=5), r"i_max=5 is out of range"),
        (dict(theta_min=0.1, theta_max=0.5, i_min=0, i_max=0, num_steps=0), r"num_steps=0"),
    ],
)
def test_bad_schedule_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ThresholdSchedule(**kwargs)


@pytest.mark.parametrize("step", [50, -1])
def test_bad_schedule_step_raises(step):
    with pytest.raises(ConfigError, match=rf"step={step} is out of range: accepted \[0, 49\]"):
        ThresholdSchedule.hunyuan_video().at(step)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(thresholds=-0.1), r"thresholds=-0\.1 is out of range"),
        (dict(thresholds={"t": 0.1, "h": -1.0, "w": 0.1}), r"thresholds\['h'\]=-1\.0"),
        (dict(thresholds={"t": 0.1}), r"one threshold per axis"),
        (dict(thresholds=float("nan")), r"thresholds=nan"),
        (dict(thresholds=torch.full((3, 4), -1.0)), r"thresholds contains -1\.0"),
        (dict(thresholds=torch.zeros(2, 4)), r"thresholds\.shape=\(2, 4\)"),
        (dict(thresholds=0.1, window=1), r"window=1 is out of range: accepted \[2, inf\)"),
        (dict(thresholds=0.1, axes=("t", "x")), r"axes=\('t', 'x'\) is not accepted.*\['t', 'h', 'w'\]"),
        (dict(thresholds=0.1, grid=(2, 2, 3)), r"grid=\(2, 2, 3\) .* needs S=12 tokens, got S=8"),
        (dict(thresholds=0.1, text_prefix=1), r"needs S=9 tokens, got S=8"),
        (dict(thresholds=0.1, priority="tx"), r"priority='tx' is not accepted"),
    ],
)
def test_bad_attention_input_raises(kwargs, match):
    q = _randn(1, 8, 1, 4)
    kwargs = {"grid": (2, 2, 2), **kwargs}
    with pytest.raises(ConfigError, match=match):
        timeripple_attention(q, q, q, **kwargs)


def test_bad_op_inputs_raise():
    x = _randn(1, 8, 1, 4)
    with pytest.raises(ConfigError, match=r"axis='x' is not accepted"):
        window_delta(x, (2, 2, 2), "x")
    with pytest.raises(ConfigError, match=r"grid=\(2, 2, 3\)"):
        reuse_masks(x, (2, 2, 3), 0.1)
    with pytest.raises(ConfigError, match=r"rope_groups\['t'\]"):
        reuse_stats(reuse_masks(x, (2, 2, 2), 0.1), None, {"t": slice(0, 9)})
    with pytest.raises(ConfigError, match=r"rq has a value out of range"):
        qk_savings(torch.full((4,), 1.5), torch.zeros(4))
    with pytest.raises(ConfigError, match=r"head_dim=7"):
        wan_rope_groups(7)
    with pytest.raises(ConfigError, match=r"B\*H\*S\*S\*D="):
        big = torch.zeros(1, 1100, 1, 4)
        partial_score_attention_reference(big, big, big, None, None)
