"""Sparse-attention baselines (issue 15's masking comparison): ops vs their reference twins, analytic oracles,
and the method installed in a tiny model (reversible, stats, count matching with TimeRipple)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vdit_accel.errors import ConfigError
from vdit_accel.methods.sparse_attention import (
    SparseAttentionConfig,
    SparseAttentionProcessor,
    SparseAttentionStats,
    apply_sparse_attention,
)
from vdit_accel.ops.sparse_baselines import (
    key_mass_scores,
    key_mass_scores_reference,
    masked_key_attention,
    masked_key_attention_reference,
    row_skip_attention,
    row_skip_attention_reference,
    similarity_key_keep,
    similarity_key_keep_reference,
    static_row_skip_roots,
    static_row_skip_roots_reference,
    tile_plan,
    tile_window_attention,
    tile_window_attention_reference,
    tile_window_density,
    tile_window_mask,
    topk_key_keep,
    topk_key_keep_reference,
)
from vdit_accel.ops.timeripple_tokens import token_decisions, token_dedup_attention, tokens_timeripple_attention


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _smooth(b, grid, h, d, seed, text_prefix=0):
    g = torch.Generator().manual_seed(seed)
    t, hh, w = grid
    base = torch.randn(b, 1, 1, 1, h * d, generator=g, dtype=torch.float64)
    x = base + 0.3 * torch.randn(b, t, hh, w, h * d, generator=g, dtype=torch.float64).cumsum(1).cumsum(2)
    pre = torch.randn(b, text_prefix, h, d, generator=g, dtype=torch.float64)
    return torch.cat([pre, x.reshape(b, t * hh * w, h, d)], 1)


def _dense(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# ------------------------------------------------------------------------------------------------ top-k keys
@pytest.mark.parametrize("s,pool", [(97, 10), (64, 64), (33, 1)])
def test_key_mass_scores_equal_reference_and_sum_to_one(s, pool):
    q, k = _rand(2, s, 3, 8, seed=1), _rand(2, s, 3, 8, seed=2)
    fast = key_mass_scores(q, k, query_pool=pool)
    assert fast.shape == (2, 3, s)
    torch.testing.assert_close(fast, key_mass_scores_reference(q, k, query_pool=pool), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.sum(-1), torch.ones(2, 3, dtype=torch.float64))


def test_topk_keep_equals_reference_per_item_counts():
    scores = _rand(2, 3, 41, seed=3)
    fast, ref = topk_key_keep(scores, [5, 17]), topk_key_keep_reference(scores, [5, 17])
    assert [tuple(x.shape) for x in fast] == [(3, 36), (3, 24)]
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError):
        topk_key_keep(scores, 41)
    with pytest.raises(ConfigError):
        topk_key_keep(scores, [1])


def test_topk_drops_the_keys_without_mass():
    """Half the keys score -50 against every query: top-k drops exactly those, and the output is dense's."""
    g = torch.Generator().manual_seed(4)
    q = torch.ones(1, 16, 2, 4, dtype=torch.float64)
    k = torch.randn(1, 16, 2, 4, generator=g, dtype=torch.float64) * 0.1
    k[:, 1::2] = -50.0
    v = torch.randn(1, 16, 2, 5, generator=g, dtype=torch.float64)
    keep = topk_key_keep(key_mass_scores(q, k, query_pool=4), 8)
    assert torch.equal(keep[0], torch.arange(0, 16, 2).expand(2, 8))
    out, st = masked_key_attention(q, k, v, keep)
    assert st.keys_removed == 0.5 and st.attn_work == 0.5
    torch.testing.assert_close(out, _dense(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
def test_masked_key_attention_equals_reference(shared):
    q, k, v = _rand(2, 37, 3, 8, seed=5, dtype=torch.float32), _rand(2, 37, 3, 8, seed=6, dtype=torch.float32), \
        _rand(2, 37, 3, 6, seed=7, dtype=torch.float32)
    scores = key_mass_scores(q, k, query_pool=5)
    keep = topk_key_keep(scores, [9, 20])
    if shared:
        keep = [x[:1] for x in keep]
    out, st = masked_key_attention(q, k, v, keep)
    ref = masked_key_attention_reference(q, k, v, keep)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    assert st.keys_removed == pytest.approx((9 + 20) / 74)
    assert (out - _dense(q, k, v)).abs().max() > 1e-3  # keys really dropped


def test_masked_key_attention_keeping_all_is_dense():
    q, k, v = (_rand(1, 20, 2, 4, seed=i, dtype=torch.float32) for i in range(3))
    out, st = masked_key_attention(q, k, v, [torch.arange(20).view(1, 20)])
    torch.testing.assert_close(out, _dense(q, k, v))
    assert st.keys_removed == 0.0


# ------------------------------------------------------------------------------------------------ similarity keys
@pytest.mark.parametrize("grid,prefix,n_drop", [((2, 4, 4), 0, [6, 13]), ((3, 5, 3), 2, [0, 20])])
def test_similarity_keep_equals_reference(grid, prefix, n_drop):
    k = _smooth(2, grid, 2, 4, 8, prefix)
    fast = similarity_key_keep(k, grid, n_drop, text_prefix=prefix)
    ref = similarity_key_keep_reference(k, grid, n_drop, text_prefix=prefix)
    for a, b, c in zip(fast, ref, n_drop):
        assert torch.equal(a, b) and a.shape[1] == k.shape[1] - c
        assert set(range(prefix)) <= set(a[0].tolist())  # text keys are never dropped


def test_similarity_drops_exactly_the_keys_timeripple_merges():
    grid = (2, 4, 4)
    k = _smooth(1, grid, 2, 4, 9)
    dec = token_decisions([k], grid, 0.15)
    merged = dec.root[0] != torch.arange(32)
    n = int(merged.sum())
    assert 0 < n < 28
    keep = similarity_key_keep(k, grid, n)[0][0]
    assert set(keep.tolist()) == set((~merged).nonzero().squeeze(1).tolist())
    with pytest.raises(ConfigError):
        similarity_key_keep(k, grid, 29)  # only 28 of 32 tokens have a window anchor on a 2x4x4 grid


def test_skipping_duplicates_is_not_exact_but_merging_is():
    """Keys duplicated pairwise along w: TimeRipple's merge (mean value, +log 2 bias) equals dense; dropping the
    duplicates without the bias (the similarity-skip baseline) changes the output."""
    grid = (2, 4, 4)
    g = torch.Generator().manual_seed(10)
    k = torch.randn(1, 32, 2, 8, generator=g, dtype=torch.float64)
    k[:, 1::2] = k[:, 0::2]
    q = torch.randn(1, 32, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 32, 2, 8, generator=g, dtype=torch.float64)
    dense = _dense(q, k, v)
    root = token_decisions([k], grid, 1e-9).root
    merged, _ = token_dedup_attention(q, k, v, None, root)
    torch.testing.assert_close(merged, dense, rtol=1e-10, atol=1e-10)
    keep = similarity_key_keep(k, grid, 16)
    assert torch.equal(keep[0][0], torch.arange(0, 32, 2))
    dropped, st = masked_key_attention(q, k, v, keep)
    assert st.keys_removed == 0.5
    assert (dropped - dense).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ query rows
@pytest.mark.parametrize("grid,window,priority,prefix,suffix", [
    ((2, 4, 4), 2, "thw", 0, 0), ((3, 5, 3), 2, "hwt", 2, 1), ((4, 3, 5), 3, "wth", 0, 0), ((1, 1, 1), 2, "thw", 1, 0),
])
def test_static_row_roots_equal_reference(grid, window, priority, prefix, suffix):
    n = math.prod(grid)
    from vdit_accel.ops.sparse_baselines import _static_candidates

    limit = int(_static_candidates(grid, window, ("t", "h", "w"))[1].sum())
    for n_skip in sorted({0, limit // 3, limit // 2, limit}):
        kw = dict(window=window, priority=priority, text_prefix=prefix, text_suffix=suffix)
        fast = static_row_skip_roots(grid, n_skip, **kw)
        ref = static_row_skip_roots_reference(grid, n_skip, **kw)
        assert torch.equal(fast, ref)
        assert int((fast != torch.arange(prefix + n + suffix)).sum()) == n_skip
        assert torch.equal(fast.gather(0, fast), fast)  # roots are computed rows
    with pytest.raises(ConfigError):
        static_row_skip_roots(grid, limit + 1, window=window, priority=priority, text_prefix=prefix,
                              text_suffix=suffix)


def test_static_roots_are_grid_neighbours():
    grid = (4, 6, 6)
    root = static_row_skip_roots(grid, 100)
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    dist = (coords - coords[root]).abs()
    assert int(dist.max()) <= 1  # window 2: the source differs by at most one step along each axis
    assert int((root != torch.arange(144)).sum()) == 100


def test_row_skip_attention_equals_reference_and_is_exact_on_duplicate_rows():
    grid = (2, 4, 4)
    root = static_row_skip_roots(grid, 20)
    q, k, v = (_rand(2, 32, 2, 8, seed=i, dtype=torch.float32) for i in (11, 12, 13))
    out, st = row_skip_attention(q, k, v, root)
    torch.testing.assert_close(out, row_skip_attention_reference(q, k, v, root), rtol=2e-5, atol=2e-6)
    assert st.rows_removed == pytest.approx(20 / 32)
    assert (out - _dense(q, k, v)).abs().max() > 1e-3
    q_dup = q.gather(1, root.view(1, -1, 1, 1).expand(q.shape))  # skipped rows equal their roots' queries
    torch.testing.assert_close(row_skip_attention(q_dup, k, v, root)[0], _dense(q_dup, k, v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError):
        row_skip_attention(q, k, v, torch.tensor([0, 0, 1] + list(range(3, 32))))  # a chain 2 -> 1 -> 0


# ------------------------------------------------------------------------------------------------ tile windows
@pytest.mark.parametrize("grid,tile,window", [((4, 8, 8), (1, 2, 2), (3, 2, 3)), ((3, 4, 6), (1, 2, 3), (2, 2, 1)),
                                              ((2, 4, 4), (2, 4, 4), (1, 1, 1))])
def test_tile_mask_density_and_constant_row_count(grid, tile, window):
    mask = tile_window_mask(grid, tile, window)
    dens = tile_window_density(grid, tile, window)
    assert float(mask.double().mean()) == pytest.approx(dens)
    assert torch.all(mask.sum(1) == round(dens * math.prod(grid)))  # border windows shift, never shrink
    assert torch.all(mask.diagonal())  # a query's own tile is inside its window
    plan = tile_plan(grid, tile, window)
    assert torch.equal(torch.sort(torch.cat([g[0] for g in plan.groups])).values, torch.arange(math.prod(grid)))
    for qi, ki in plan.groups:
        assert torch.all(mask[qi][:, ki]) and int(mask[qi].sum()) == qi.numel() * ki.numel()


@pytest.mark.parametrize("grid,tile,window,prefix,suffix", [((4, 8, 8), (1, 2, 2), (3, 2, 3), 0, 0),
                                                            ((3, 4, 6), (1, 2, 3), (2, 2, 1), 3, 2)])
def test_tile_blocked_equals_reference(grid, tile, window, prefix, suffix):
    s = prefix + math.prod(grid) + suffix
    q, k, v = (_rand(2, s, 2, 8, seed=i, dtype=torch.float32) for i in (14, 15, 16))
    kw = dict(grid=grid, tile=tile, window=window, text_prefix=prefix, text_suffix=suffix)
    out, st = tile_window_attention(q, k, v, backend="blocked", **kw)
    torch.testing.assert_close(out, tile_window_attention_reference(q, k, v, **kw), rtol=2e-5, atol=2e-6)
    assert st.attn_work == pytest.approx(tile_window_density(grid, tile, window)) and st.attn_work < 1
    assert (out - _dense(q, k, v)).abs().max() > 1e-3


def test_tile_full_window_is_dense():
    q, k, v = (_rand(1, 32, 2, 8, seed=i, dtype=torch.float32) for i in (17, 18, 19))
    out, st = tile_window_attention(q, k, v, grid=(2, 4, 4), tile=(1, 2, 2), window=(2, 2, 2), backend="blocked")
    torch.testing.assert_close(out, _dense(q, k, v), rtol=1e-5, atol=1e-6)
    assert st.attn_work == 1.0


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_tile_flex_eager_equals_reference():
    """flex_attention with the tile block mask (eager; the benchmark compiles it) on tile-ordered tokens."""
    grid, tile, window = (2, 8, 8), (1, 4, 4), (1, 2, 1)
    q, k, v = (_rand(1, 128, 2, 16, seed=i, dtype=torch.float32) for i in (20, 21, 22))
    kw = dict(grid=grid, tile=tile, window=window)
    out, _ = tile_window_attention(q, k, v, backend="flex", compiled=False, **kw)
    torch.testing.assert_close(out, tile_window_attention_reference(q, k, v, **kw), rtol=2e-5, atol=2e-6)


def test_tile_bad_settings_raise():
    q = torch.zeros(1, 32, 1, 4)
    with pytest.raises(ConfigError):
        tile_window_attention(q, q, q, grid=(2, 4, 4), tile=(1, 3, 2), window=(1, 1, 1))  # 3 does not divide 4
    with pytest.raises(ConfigError):
        tile_window_attention(q, q, q, grid=(2, 4, 4), tile=(1, 2, 2), window=(1, 3, 1))  # 3 > 2 tiles
    with pytest.raises(ConfigError):
        tile_window_attention(q, q, q, grid=(2, 4, 2), tile=(1, 2, 2), window=(1, 1, 1))  # grid != S
    with pytest.raises(ConfigError):
        tile_window_attention(q, q, q, grid=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1), backend="triton")


# ------------------------------------------------------------------------------------------------ method
@pytest.mark.parametrize("kw", [
    dict(baseline="topk_keys"), dict(baseline="static_rows", drop_fraction=0.1, match_theta=0.1),
    dict(baseline="tile_window", drop_fraction=0.5), dict(baseline="nope"), dict(baseline="topk_keys",
                                                                              drop_fraction=1.0),
    dict(baseline="tile_window", tile=(0, 1, 1)), dict(baseline="tile_window", backend="x"),
    dict(baseline="topk_keys", drop_fraction=0.5, query_pool=0), dict(baseline="topk_keys", match_theta=-1.0),
])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ConfigError):
        SparseAttentionConfig(**kw)


def test_config_round_trips():
    cfg = SparseAttentionConfig("similarity_keys", match_theta=0.12, axes=["t", "w"], layers=[0])
    assert SparseAttentionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError):
        SparseAttentionConfig.from_dict({**cfg.to_dict(), "unknown": 1})


@pytest.mark.parametrize("baseline", ["topk_keys", "similarity_keys", "static_rows"])
def test_match_theta_removes_what_timeripple_merges(baseline):
    grid = (2, 4, 4)
    q, k, v = (_smooth(2, grid, 2, 8, s).float() for s in (23, 24, 25))
    theta = 0.2
    _, tr, dec = tokens_timeripple_attention(q, k, v, grid=grid, thresholds=theta, reuse_q=False)
    assert tr.keys_removed > 0.1
    proc = SparseAttentionProcessor(0, None, SparseAttentionConfig(baseline, match_theta=theta), None,
                                    SparseAttentionStats(), None)
    out, st = proc.attention(q, k, v, grid)
    removed = st.rows_removed if baseline == "static_rows" else st.keys_removed
    assert removed == pytest.approx(tr.keys_removed)
    assert (out - _dense(q, k, v)).abs().max() > 1e-4


def test_method_runs_each_baseline_and_removes_bit_identically():
    from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    from vdit_accel.testing import TINY_PROMPT, tiny_model

    model = tiny_model()
    sampler = Sampler(model)
    gen = GenerationConfig(steps=3, seed=0)
    with torch.inference_mode():
        dense = sampler(TINY_PROMPT, gen, progress=False)
        for cfg in (SparseAttentionConfig("topk_keys", drop_fraction=0.25, query_pool=2),
                    SparseAttentionConfig("similarity_keys", drop_fraction=0.5),
                    SparseAttentionConfig("static_rows", match_theta=0.5),
                    SparseAttentionConfig("tile_window", tile=(1, 1, 1), window=(1, 2, 2)),
                    SparseAttentionConfig("tile_window", tile=(1, 1, 1), window=(2, 2, 2), layers=(1,))):
            handle = apply_sparse_attention(model.transformer, cfg)
            with pytest.raises(ConfigError):
                apply_sparse_attention(model.transformer, cfg)
            video = sampler(TINY_PROMPT, gen, progress=False)
            summary = handle.stats.summary()
            handle.remove()
            layers = 2 if cfg.layers is None else 1
            assert summary["calls"] == 3 * 2 * layers  # steps x CFG branches x layers (batched or not)
            if cfg.window == (2, 2, 2):
                torch.testing.assert_close(video, dense, rtol=1e-4, atol=1e-4)  # a full window is dense
                assert summary["attn_work"] == 1.0
            else:
                assert summary["attn_work"] < 1.0
                assert not torch.equal(video, dense)
        assert torch.equal(sampler(TINY_PROMPT, gen, progress=False), dense)  # removal restores the model exactly


# ------------------------------------------------------------------------------------------------ benchmark
def _load_masking_benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "timeripple_masking.py"
    spec = importlib.util.spec_from_file_location("timeripple_masking", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod


def test_masking_benchmark_pairing_interpolates_on_measured_curves():
    mod = _load_masking_benchmark()
    assert mod._interp([(1.0, 10.0), (2.0, 20.0)], 1.5) == pytest.approx(15.0)
    assert mod._interp([(1.0, 1e-2), (2.0, 1e-4)], 1.5, log=True) == pytest.approx(1e-3)
    assert mod._interp([(1.0, 10.0), (2.0, 20.0)], 2.5) is None  # never extrapolated
    op = {"aggregate": {
        "timeripple@0.1": {"family": "timeripple", "speedup_vs_dense_geomean": 1.5, "rel_l2_vs_dense_mean": 0.05},
        "topk_keys@0.1": {"family": "topk_keys", "speedup_vs_dense_geomean": 1.2, "rel_l2_vs_dense_mean": 0.1},
        "topk_keys@0.2": {"family": "topk_keys", "speedup_vs_dense_geomean": 1.8, "rel_l2_vs_dense_mean": 0.4},
    }}
    e2e = {"summary": {"topk_keys@0.1": {"psnr_mean": 30.0}, "topk_keys@0.2": {"psnr_mean": 24.0},
                       "timeripple@0.1": {"psnr_mean": 38.0}}}
    res = mod.pair(op, e2e, [1.5, 2.5])
    at = res["at_timeripple_points"]["timeripple@0.1"]
    assert at["speedup"] == 1.5 and at["timeripple"]["psnr_mean"] == 38.0
    assert at["topk_keys"]["psnr_mean"] == pytest.approx(27.0)
    assert at["topk_keys"]["rel_l2_vs_dense"] == pytest.approx(0.2)
    assert res["at_target_speedups"]["2.5"]["topk_keys"]["psnr_mean"] is None
    assert "note" in mod.pair(None, e2e, [1.5])


def test_masking_benchmark_smoke_and_resume(tmp_path):
    """Every family runs on the tiny model at θ = 2 (7/8 of keys / rows removed), the JSON is complete, and a re-run
    of the e2e part reuses its stored entries."""
    import json

    mod = _load_masking_benchmark()
    argv = ["--model", "tiny", "--grid", "2", "8", "8", "--heads", "2", "--head-dim", "16", "--tile", "1", "4", "4",
            "--windows", "2,2,1", "--e2e-tile", "1", "1", "1", "--e2e-windows", "2,2,1", "--steps", "3",
            "--capture-steps", "1", "--layers", "0", "--e2e-steps", "2", "--e2e-prompts", "1", "--repeats", "1",
            "--thetas", "2.0", "--e2e-thetas", "2.0", "--query-pool", "8", "--out", str(tmp_path)]
    mod.main(argv)
    doc = json.loads((tmp_path / "timeripple_masking.json").read_text())
    assert doc["format"] == "vdit-accel/timeripple-masking" and "--model tiny" in doc["command"]
    op = doc["op"]
    assert set(op) == {"dense", "timeripple@2", "topk_keys@2", "similarity_keys@2", "static_rows@2",
                       "tile_window@2,2,1"}
    for lab in ("timeripple@2", "topk_keys@2", "similarity_keys@2", "static_rows@2"):
        assert op[lab]["removed_mean"] == pytest.approx(7 / 8)  # 2x8x8 grid: every non-anchor token
        assert op[lab]["rel_l2_vs_dense_mean"] > 0 and op[lab]["speedup_vs_dense_geomean"] > 0
    assert op["tile_window@2,2,1"]["density"] == 0.5 and op["tile_window@2,2,1"]["rel_l2_vs_dense_mean"] > 0
    e2e = doc["e2e"]
    assert set(e2e) == {"timeripple@2", "topk_keys@2", "similarity_keys@2", "static_rows@2", "tile_window@2,2,1"}
    assert e2e["static_rows@2"]["rows_removed_mean"] > 0 and e2e["topk_keys@2"]["keys_removed_mean"] > 0
    assert all(math.isfinite(x["psnr_mean"]) for x in e2e.values())
    assert set(doc["pairing"]["curves"]) == {"timeripple", "topk_keys", "similarity_keys", "static_rows",
                                             "tile_window"}
    stored = json.loads((tmp_path / "e2e.json").read_text())["entries"]
    mod.main(argv[:-2] + ["--parts", "e2e", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "e2e.json").read_text())["entries"] == stored
