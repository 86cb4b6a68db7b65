"""Structured TimeRipple ops: row dedup and key merge are exact on their Q̃/K̃, and really remove rows/keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vdit_accel.errors import ConfigError
from vdit_accel.ops.timeripple import resolve_reuse, reuse_masks, timeripple_attention
from vdit_accel.ops.timeripple_structured import (
    VARIANTS,
    _anchor_order,
    dedup_attention,
    dedup_attention_reference,
    duplicate_roots,
    row_masks,
    row_roots,
    structured_timeripple_attention,
    structured_timeripple_attention_reference,
)

INF = float("inf")


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _const_along_t(grid, h=2, d=6, prefix=0, suffix=0, dtype=torch.float64, seed=0):
    """Random tokens, but every frame equals frame 0: all odd-t rows are exact duplicates of their anchor."""
    g = torch.Generator().manual_seed(seed)
    t, hh, ww = grid
    frame = torch.randn(1, 1, hh * ww, h, d, generator=g, dtype=dtype).expand(1, t, hh * ww, h, d).reshape(1, -1, h, d)
    text = [torch.randn(1, n, h, d, generator=g, dtype=dtype) for n in (prefix, suffix)]
    return torch.cat([text[0], frame, text[1]], dim=1)


def _qkv(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))


def test_duplicate_roots_follow_exact_equality_chains():
    x = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 4.0]).view(1, 6, 1, 1)
    anchors = [torch.tensor([0, 0, 2, 2, 4, 4]), torch.tensor([0, 1, 0, 1, 4, 5])]
    assert duplicate_roots(x, anchors).flatten().tolist() == [0, 0, 0, 0, 4, 5]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_dedup_attention_equals_dense_on_duplicated_rows(dtype, tol):
    q, k, v = _qkv((2, 24, 3, 8), 1, dtype)
    g = torch.Generator().manual_seed(2)
    # Random duplicate structure per head: every row copies an earlier row with probability 1/2.
    anchor = torch.stack([torch.randint(0, i + 1, (1,), generator=g)[0] for i in range(24)])
    keep = torch.rand(2, 24, 3, generator=g) < 0.5
    src = torch.where(keep.unsqueeze(-1), torch.arange(24).view(1, 24, 1, 1), anchor.view(1, 24, 1, 1)).expand_as(q)
    qd, kd = q.clone(), k.clone()
    for i in range(24):  # copy in token order so chains resolve
        qd[:, i] = torch.where(keep[:, i, :, None], qd[:, i], qd.gather(1, src[:, i : i + 1]).squeeze(1))
        kd[:, i] = torch.where(keep[:, i, :, None], kd[:, i], kd.gather(1, src[:, i : i + 1]).squeeze(1))
    q_root, k_root = duplicate_roots(qd, [anchor]), duplicate_roots(kd, [anchor])
    out, st = dedup_attention(qd, kd, v, q_root, k_root)
    ref, st_ref = dedup_attention_reference(qd, kd, v, q_root, k_root)
    dense = _sdpa(qd, kd, v)
    assert st.rows_removed > 0.2 and st.keys_removed > 0.2
    assert (st.rows_removed, st.keys_removed) == (st_ref.rows_removed, st_ref.keys_removed)
    assert st.attn_work < 1.0
    assert torch.allclose(out, dense, atol=tol, rtol=0) and torch.allclose(ref, dense, atol=tol, rtol=0)


def test_dedup_attention_rejects_bad_roots():
    q = k = v = torch.zeros(1, 3, 1, 2)
    ok = torch.arange(3).view(1, 1, 3)
    with pytest.raises(ConfigError, match="q_root"):
        dedup_attention(q, k, v, torch.tensor([[[0, 2, 2]]]), ok)
    with pytest.raises(ConfigError, match="k_root"):
        dedup_attention(q, k, v, ok, ok.view(1, 3, 1))


@pytest.mark.parametrize("variant", ["exact_rows", "token_rows"])
@pytest.mark.parametrize("grid, prefix, suffix", [((4, 3, 2), 0, 0), ((3, 3, 5), 2, 1)])
def test_structured_removes_rows_on_smooth_input_and_matches_its_simulation(variant, grid, prefix, suffix):
    q = _const_along_t(grid, prefix=prefix, suffix=suffix, seed=1)
    k = _const_along_t(grid, prefix=prefix, suffix=suffix, seed=2)
    v = torch.randn(q.shape, dtype=torch.float64)
    kw = dict(grid=grid, thresholds=1e-9, text_prefix=prefix, text_suffix=suffix)
    out, st = structured_timeripple_attention(q, k, v, variant=variant, **kw)
    sim, sim_st = timeripple_attention(q, k, v, **kw)
    n_video = grid[0] * grid[1] * grid[2]
    odd_t = (grid[0] // 2) * grid[1] * grid[2]  # rows at odd t are exact duplicates of their anchor at t-1
    expect = odd_t / (prefix + n_video + suffix)
    assert st.rows_removed == pytest.approx(expect) and st.keys_removed == pytest.approx(expect)
    assert st.q_reuse == pytest.approx(sim_st.q_reuse)
    # Duplicates are exact copies, so both variants equal the exact simulation here.
    assert torch.allclose(out, sim, atol=1e-12, rtol=0)
    ref, ref_st = structured_timeripple_attention_reference(q, k, v, variant=variant, **kw)
    assert torch.allclose(ref, out, atol=1e-12, rtol=0) and ref_st.rows_removed == st.rows_removed


@pytest.mark.parametrize("variant", ["exact_rows", "token_rows"])
def test_nothing_to_remove_still_matches(variant):
    q, k, v = _qkv((1, 2 * 3 * 4, 2, 6), 3)
    kw = dict(grid=(2, 3, 4), thresholds=1e-3)
    out, st = structured_timeripple_attention(q, k, v, variant=variant, **kw)
    sim, sim_st = timeripple_attention(q, k, v, **kw)
    assert st.rows_removed == 0.0 and st.keys_removed == 0.0 and st.attn_work == 1.0
    assert torch.allclose(out, _sdpa(q, k, v), atol=1e-12, rtol=0)
    if variant == "exact_rows":
        assert torch.allclose(out, sim, atol=1e-12, rtol=0)


def test_exact_rows_equals_exact_sim_on_partial_reuse():
    """Element-level decisions: some rows fully reused (removed), others partly (kept, substituted)."""
    grid = (4, 4, 4)
    q = _const_along_t(grid, seed=4) + 0.05 * torch.randn(1, 64, 2, 6, dtype=torch.float64)
    k = _const_along_t(grid, seed=5) + 0.05 * torch.randn(1, 64, 2, 6, dtype=torch.float64)
    v = torch.randn(1, 64, 2, 6, dtype=torch.float64)
    kw = dict(grid=grid, thresholds=0.06)
    out, st = structured_timeripple_attention(q, k, v, variant="exact_rows", **kw)
    sim, sim_st = timeripple_attention(q, k, v, **kw)
    assert 0.0 < st.rows_removed < sim_st.q_reuse and 0.0 < st.keys_removed < sim_st.k_reuse
    assert torch.allclose(out, sim, atol=1e-12, rtol=0)


def test_token_rows_is_exact_on_its_own_simulation_and_approximates_exact_sim():
    grid = (4, 4, 4)
    q = _const_along_t(grid, seed=6) + 0.05 * torch.randn(1, 64, 2, 6, dtype=torch.float64)
    k = _const_along_t(grid, seed=7) + 0.05 * torch.randn(1, 64, 2, 6, dtype=torch.float64)
    v = torch.randn(1, 64, 2, 6, dtype=torch.float64)
    out, st = structured_timeripple_attention(q, k, v, grid=grid, thresholds=0.06, variant="token_rows",
                                              row_fraction=0.5)
    qm, km = (row_masks(reuse_masks(x, grid, 0.06), 0.5) for x in (q, k))
    own = _sdpa(resolve_reuse(q, qm), resolve_reuse(k, km), v)
    assert st.rows_removed > 0.2 and st.keys_removed > 0.2
    assert torch.allclose(out, own, atol=1e-12, rtol=0)
    sim, _ = timeripple_attention(q, k, v, grid=grid, thresholds=0.06)
    assert not torch.allclose(out, sim, atol=1e-6)  # a different decision rule: an approximation of exact_sim


def test_infinite_threshold_removes_seven_eighths():
    q = k = v = torch.randn(1, 8, 2, 6, dtype=torch.float64)
    for variant in ("exact_rows", "token_rows"):
        out, st = structured_timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=INF, variant=variant)
        assert st.rows_removed == 0.875 and st.keys_removed == 0.875
        assert torch.allclose(out, v.mean(1, keepdim=True).expand_as(v), atol=1e-12)  # one merged key: mean v


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_threshold_is_plain_sdpa_bit_for_bit(variant):
    q, k, v = _qkv((1, 8, 2, 6), 8, torch.float32)
    out, st = structured_timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=0.0, variant=variant)
    assert torch.equal(out, _sdpa(q, k, v)) and st.rows_removed == 0.0


def test_exact_sim_variant_is_timeripple_attention_bit_for_bit():
    q, k, v = _qkv((1, 8, 2, 6), 9, torch.float32)
    out, _ = structured_timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=0.7, variant="exact_sim")
    assert torch.equal(out, timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=0.7)[0])


@pytest.mark.parametrize("kw, match", [
    (dict(variant="rows"), "variant='rows'"),
    (dict(row_fraction=0.0), "row_fraction"),
    (dict(row_fraction=1.5), "row_fraction"),
])
def test_bad_arguments_raise(kw, match):
    q = k = v = torch.zeros(1, 8, 1, 6)
    with pytest.raises(ConfigError, match=match):
        structured_timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=0.1, **kw)


def test_row_roots_match_equality_roots_of_the_resolved_tensor():
    grid = (4, 4, 4)
    x = _const_along_t(grid, seed=11) + 0.05 * torch.randn(1, 64, 2, 6, dtype=torch.float64)
    for priority in ("thw", "wht", "min_delta"):
        m = row_masks(reuse_masks(x, grid, 0.06), 0.5)
        xt = resolve_reuse(x, m, priority=priority)
        roots = row_roots(m, priority)
        assert (roots != torch.arange(64)).any()
        assert torch.equal(roots, duplicate_roots(xt, _anchor_order(m, priority)))
