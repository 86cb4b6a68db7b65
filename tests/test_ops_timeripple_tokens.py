"""The "tokens" TimeRipple variant: fast per-token decisions and token dedup attention vs their reference twins."""

import pytest
import torch

from vdit_accel.errors import ConfigError
from vdit_accel.ops.timeripple_tokens import (
    substitute_keys,
    token_decisions,
    token_decisions_reference,
    token_dedup_attention,
    token_dedup_attention_reference,
)


def _smooth(b, grid, h, d, seed, text_prefix=0, text_suffix=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    t, hh, w = grid
    base = torch.randn(b, 1, 1, 1, h * d, generator=g, dtype=torch.float64)
    x = base + noise * torch.randn(b, t, hh, w, h * d, generator=g, dtype=torch.float64).cumsum(1).cumsum(2)
    x = x.reshape(b, t * hh * w, h, d)
    pre = torch.randn(b, text_prefix, h, d, generator=g, dtype=torch.float64)
    suf = torch.randn(b, text_suffix, h, d, generator=g, dtype=torch.float64)
    return torch.cat([pre, x, suf], 1)


@pytest.mark.parametrize("grid,window,priority,prefix,suffix", [
    ((2, 4, 4), 2, "thw", 0, 0),
    ((3, 5, 3), 2, "hwt", 3, 0),  # odd sizes: trailing windows of size 1
    ((4, 3, 5), 3, "min_delta", 0, 2),  # trailing partial windows of size 2 / 1
    ((1, 1, 1), 2, "thw", 1, 1),
])
@pytest.mark.parametrize("theta", [0.0, 0.15, 0.4, 2.0])
def test_fast_decisions_equal_reference(grid, window, priority, prefix, suffix, theta):
    q = _smooth(2, grid, 2, 4, 0, prefix, suffix)
    k = _smooth(2, grid, 2, 4, 1, prefix, suffix)
    kw = dict(window=window, priority=priority, text_prefix=prefix, text_suffix=suffix)
    fast = token_decisions([q, k], grid, theta, **kw)
    ref = token_decisions_reference([q, k], grid, theta, **kw)
    assert torch.equal(fast.root, ref.root)
    for a in fast.spread:
        torch.testing.assert_close(fast.spread[a].double(), ref.spread[a], rtol=1e-9, atol=1e-12)
        assert torch.equal(fast.anchor[a], ref.anchor[a])
    s = q.shape[1]
    assert bool((fast.root <= torch.arange(s)).all()) and torch.equal(fast.root.gather(1, fast.root), fast.root)


def test_theta_zero_reuses_nothing_and_large_theta_seven_eighths():
    x = _smooth(1, (2, 4, 4), 2, 4, 0)
    assert fast_reused(x, 0.0) == 0.0
    assert fast_reused(x, 1.5) == 7 / 8


def fast_reused(x, theta):
    return token_decisions([x], (2, 4, 4), theta).reused


def test_identical_tokens_have_zero_spread():
    x = torch.ones(1, 8, 2, 4)
    dec = token_decisions([x], (2, 2, 2), 1e-9)
    assert dec.reused == 7 / 8


@pytest.mark.parametrize("reuse_q,reuse_k", [(True, True), (True, False), (False, True)])
def test_token_dedup_attention_equals_reference(reuse_q, reuse_k):
    grid = (3, 5, 3)
    q, k, v = (_smooth(2, grid, 2, 8, s, 1, 2) for s in (0, 1, 2))
    dec = token_decisions([q, k], grid, 0.3, text_prefix=1, text_suffix=2)
    assert 0.2 < dec.reused < 0.875
    qr, kr = (dec.root if reuse_q else None), (dec.root if reuse_k else None)
    out, st = token_dedup_attention(q, k, v, qr, kr)
    ref = token_dedup_attention_reference(q, k, v, qr, kr)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert (st.rows_removed > 0) == reuse_q and (st.keys_removed > 0) == reuse_k
    assert 0 < st.attn_work < 1


@pytest.mark.parametrize("reuse_q", [False, True])
def test_mean_key_merge_equals_reference_and_beats_root_keys(reuse_q):
    """``key_merge="mean"``: the merged computation equals its twin (every key substituted by its group's mean key,
    dense float64 attention) on a case built to merge (keys really removed); and against exact attention on the
    unmerged keys its error is below the root-key merge's (the first-order logit error cancels)."""
    grid = (3, 5, 3)
    q, k, v = (_smooth(2, grid, 2, 8, s, 1, 2, noise=0.05) for s in (0, 1, 2))
    dec = token_decisions([k], grid, 0.3, text_prefix=1, text_suffix=2)
    assert 0.3 < dec.reused < 0.875
    qr = dec.root if reuse_q else None
    out, st = token_dedup_attention(q, k, v, qr, dec.root, key_merge="mean")
    torch.testing.assert_close(out, token_dedup_attention_reference(q, k, v, qr, dec.root, key_merge="mean"),
                               rtol=1e-10, atol=1e-12)
    assert st.keys_removed == pytest.approx(dec.reused) and (st.rows_removed > 0) == reuse_q
    exact = token_dedup_attention_reference(q, k, v, qr, None)  # the same queries, every key as it is
    root, _ = token_dedup_attention(q, k, v, qr, dec.root)
    assert (out - exact).norm() < 0.5 * (root - exact).norm()


def test_substitute_keys_means_of_groups():
    k = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    root = torch.tensor([[0, 0, 2, 2, 2, 5], [0, 1, 2, 3, 4, 5]])
    out = substitute_keys(k, root, "mean")
    torch.testing.assert_close(out[0, 1], k[0, :2].mean(0))
    torch.testing.assert_close(out[0, 3], k[0, 2:5].mean(0))
    assert torch.equal(out[0, 5], k[0, 5]) and torch.equal(out[1], k[1])  # singletons unchanged
    assert torch.equal(substitute_keys(k, root, "root")[0, 4], k[0, 2])
    with pytest.raises(ConfigError, match="key_merge='centroid' is not accepted"):
        substitute_keys(k, root, "centroid")


def test_no_roots_is_dense_sdpa():
    q, k, v = (torch.randn(1, 16, 2, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    out, st = token_dedup_attention(q, k, v, None, None)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.equal(out, ref) and st.attn_work == 1.0


def test_bad_inputs_raise():
    x = torch.zeros(1, 8, 1, 2)
    with pytest.raises(ConfigError, match="theta"):
        token_decisions([x], (2, 2, 2), -1.0)
    with pytest.raises(ConfigError, match="needs S"):
        token_decisions([x], (2, 2, 3), 0.1)
    with pytest.raises(ConfigError, match="q_root"):
        token_dedup_attention(x, x, x, torch.zeros(1, 7, dtype=torch.long), None)


def test_structured_entry_point_tokens_fast_equals_reference():
    from vdit_accel.ops.timeripple_structured import (
        structured_timeripple_attention,
        structured_timeripple_attention_reference,
    )

    grid = (2, 4, 3)
    q, k, v = (_smooth(1, grid, 2, 6, s, 2, 0) for s in (0, 1, 2))
    kw = dict(grid=grid, thresholds=0.3, variant="tokens", text_prefix=2)
    fast, fst = structured_timeripple_attention(q, k, v, **kw)
    ref, rst = structured_timeripple_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert fst.rows_removed == pytest.approx(rst.rows_removed) and fst.rows_removed > 0
    assert fst.qk_savings == pytest.approx(rst.qk_savings)
    with pytest.raises(ConfigError, match="tokens"):
        structured_timeripple_attention(q, k, v, **kw, row_fraction=0.5)


def test_index_cache_kept_with_decisions_gives_the_same_output_on_new_values():
    """Decisions used again on new q/k/v (``decision_interval``): the unique tokens and counts kept in
    ``TokenDecisions.index_cache`` give exactly what deriving them again gives."""
    grid = (3, 5, 3)
    q, k, v = (_smooth(2, grid, 2, 8, s, 1, 2, noise=0.05) for s in (0, 1, 2))
    dec = token_decisions([q, k], grid, 0.3, text_prefix=1, text_suffix=2)
    assert dec.reused > 0.3 and not dec.index_cache
    first, _ = token_dedup_attention(q, k, v, dec.root, dec.root, key_merge="mean", index_cache=dec.index_cache)
    assert dec.index_cache  # filled on first use
    q2, k2, v2 = (_smooth(2, grid, 2, 8, s, 1, 2, noise=0.05) for s in (3, 4, 5))
    kept, st = token_dedup_attention(q2, k2, v2, dec.root, dec.root, key_merge="mean", index_cache=dec.index_cache)
    fresh, st2 = token_dedup_attention(q2, k2, v2, dec.root, dec.root, key_merge="mean")
    assert torch.equal(kept, fresh) and st == st2 and not torch.equal(kept, first)
