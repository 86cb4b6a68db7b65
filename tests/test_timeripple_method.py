"""TimeRipple integrated in the real Wan code path (tiny random model)."""

import dataclasses

import pytest
import torch

from vdit_accel.adapters.wan import WanAdapter
from vdit_accel.errors import ConfigError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.registry import apply
from vdit_accel.testing import TINY_PROMPT

GEN = GenerationConfig(steps=4, guidance=3.0, seed=3)
RAMP = dict(i_min=1, i_max=2, num_steps=4)


def _run(model, cfg=None):
    handle = apply_timeripple(model.transformer, cfg) if cfg is not None else None
    try:
        return Sampler(model)(TINY_PROMPT, GEN, progress=False), handle
    finally:
        if handle is not None:
            handle.remove()


def test_threshold_zero_is_bit_identical_whole_generation(tiny_model):
    dense, _ = _run(tiny_model)
    off, handle = _run(tiny_model, TimeRippleConfig(theta_min=0.0, theta_max=0.0, **RAMP))
    assert torch.equal(dense, off)
    assert handle.stats.summary()["active_calls"] == 0


def test_fixed_zero_threshold_is_bit_identical(tiny_model):
    dense, _ = _run(tiny_model)
    off, _ = _run(tiny_model, TimeRippleConfig(fixed_threshold=0.0, **RAMP))
    assert torch.equal(dense, off)


def test_reuse_changes_output_and_remove_restores_exactly(tiny_model):
    dense, _ = _run(tiny_model)
    on, handle = _run(tiny_model, TimeRippleConfig(theta_min=0.5, theta_max=5.0, **RAMP))
    assert not torch.equal(dense, on)
    s = handle.stats.summary()
    assert s["active_calls"] > 0 and 0 < s["qk_savings_active"] <= 1
    after, _ = _run(tiny_model)
    assert torch.equal(dense, after)
    procs = {type(p).__name__ for p in tiny_model.transformer.attn_processors.values()}
    assert procs == {"WanAttnProcessor"}


def test_infinite_threshold_reuses_seven_eighths(tiny_model):
    _, handle = _run(tiny_model, TimeRippleConfig(fixed_threshold=float("inf"), **RAMP))
    s = handle.stats.summary()
    assert s["q_reuse_active"] == pytest.approx(7 / 8) and s["k_reuse_active"] == pytest.approx(7 / 8)
    assert s["qk_savings_active"] == pytest.approx(1 - (1 / 8) ** 2, abs=1e-4)


def test_schedule_drives_dense_steps(tiny_model):
    _, handle = _run(tiny_model, TimeRippleConfig(theta_min=0.5, theta_max=5.0, **RAMP))
    steps = {step for (_, step, _) in handle.stats.calls}
    assert steps == {1, 2}  # step 0 is before i_min, step 3 is the last (dense) step


def test_cfg_branches_keep_separate_records(tiny_model):
    _, handle = _run(tiny_model, TimeRippleConfig(theta_min=0.5, theta_max=5.0, **RAMP))
    branches = {b for (b, _, _) in handle.stats.calls}
    assert branches == {"cond", "uncond"}
    n_layers = len(tiny_model.transformer.blocks)
    assert len(handle.stats.calls) == 2 * 2 * n_layers


def test_registry_dispatch_and_layer_selection(tiny_model):
    handle = apply(tiny_model, TimeRippleConfig(layers=(1,), **RAMP))
    try:
        kinds = [type(b.attn1.processor).__name__ for b in tiny_model.transformer.blocks]
        cross = [type(b.attn2.processor).__name__ for b in tiny_model.transformer.blocks]
    finally:
        handle.remove()
    assert kinds == ["WanAttnProcessor", "TimeRippleProcessor"] and set(cross) == {"WanAttnProcessor"}


@pytest.mark.parametrize("kw, match", [
    (dict(theta_min=-0.1), "theta_min=-0.1"),
    (dict(theta_min=0.6, theta_max=0.5), "theta_min"),
    (dict(i_min=30, i_max=20), "i_min"),
    (dict(i_max=60), "i_max=60"),
    (dict(window=1), "window=1"),
    (dict(axes=("t", "z")), "'z'"),
    (dict(priority="xyz"), "priority='xyz'"),
    (dict(threshold_mode="magic"), "threshold_mode='magic'"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        TimeRippleConfig(**kw)


def test_layers_out_of_range(tiny_model):
    with pytest.raises(ConfigError, match=r"layers=\[5\]"):
        apply_timeripple(tiny_model.transformer, TimeRippleConfig(layers=(5,), **RAMP))


def test_model_without_rope_is_rejected(tiny_model):
    class NoRope(WanAdapter):
        def has_rope(self, model):
            return False

    with pytest.raises(ConfigError, match="RoPE"):
        apply_timeripple(tiny_model.transformer, TimeRippleConfig(**RAMP), adapter=NoRope())


def test_config_dict_round_trip_rejects_unknown_keys():
    cfg = TimeRippleConfig(window=3, axes=("t", "h"), layers=(0,), **RAMP)
    assert TimeRippleConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        TimeRippleConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_grid_mismatch_is_a_clear_error(tiny_model):
    """A wrong adapter (grid not matching the token count) fails with a ConfigError, not a shape crash."""

    class WrongGrid(WanAdapter):
        def layout(self, model, args, kwargs):
            lay = super().layout(model, args, kwargs)
            return dataclasses.replace(lay, grid=(lay.grid[0] + 1, *lay.grid[1:]))

    handle = apply_timeripple(tiny_model.transformer, TimeRippleConfig(fixed_threshold=1.0, **RAMP),
                              adapter=WrongGrid())
    try:
        with pytest.raises(ConfigError, match="grid"):
            Sampler(tiny_model)(TINY_PROMPT, GEN, progress=False)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------- structured variants
def test_structured_variant_zero_threshold_is_bit_identical(tiny_model):
    dense, _ = _run(tiny_model)
    for variant in ("exact_rows", "token_rows"):
        off, handle = _run(tiny_model, TimeRippleConfig(fixed_threshold=0.0, variant=variant, **RAMP))
        assert torch.equal(dense, off) and handle.stats.summary()["active_calls"] == 0


def test_exact_rows_matches_exact_sim_and_records_removed_rows(tiny_model):
    sim, sim_handle = _run(tiny_model, TimeRippleConfig(fixed_threshold=float("inf"), **RAMP))
    rows, handle = _run(tiny_model, TimeRippleConfig(fixed_threshold=float("inf"), variant="exact_rows", **RAMP))
    assert torch.allclose(rows, sim, atol=1e-4)
    s, s_sim = handle.stats.summary(), sim_handle.stats.summary()
    assert s["rows_removed_active"] == pytest.approx(7 / 8) and s["keys_removed_active"] == pytest.approx(7 / 8)
    assert s_sim["rows_removed_active"] == 0.0 and s_sim["attn_work_active"] == 1.0
    assert s["q_reuse_active"] == pytest.approx(s_sim["q_reuse_active"])


def test_token_rows_acts_and_remove_restores(tiny_model):
    dense, _ = _run(tiny_model)
    on, handle = _run(tiny_model, TimeRippleConfig(theta_min=0.5, theta_max=5.0, variant="token_rows",
                                                   row_fraction=0.5, **RAMP))
    assert not torch.equal(dense, on)
    assert handle.stats.summary()["rows_removed_active"] > 0
    after, _ = _run(tiny_model)
    assert torch.equal(dense, after)


@pytest.mark.parametrize("kw, match", [
    (dict(variant="rows"), "variant='rows'"),
    (dict(row_fraction=0.5), "row_fraction=0.5 is not accepted with variant='exact_sim'"),
    (dict(variant="token_rows", row_fraction=0.0), "row_fraction=0.0"),
])
def test_bad_variant_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        TimeRippleConfig(**kw)


# ---------------------------------------------------------------------------------- composition hook
def _processor(cfg, grid=(2, 3, 4), prefix=0):
    from vdit_accel.context import Grid, StepContext
    from vdit_accel.methods.timeripple import TimeRippleProcessor, TimeRippleStats
    from vdit_accel.ops.timeripple import wan_rope_groups

    class Ctx:
        current = StepContext("cond", 1, 4, 500.0, Grid(*grid), prefix, 0, 1)

    return TimeRippleProcessor(0, None, cfg, Ctx(), wan_rope_groups(12), TimeRippleStats())


def _qkv_grid(seed, s, smooth=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, s, 2, 12, generator=g)
    return [base + 0.1 * torch.randn(1, s, 2, 12, generator=g) if smooth else base for _ in range(3)]


def test_rows_attention_all_rows_equals_normal_call():
    from vdit_accel.ops.timeripple import timeripple_attention

    cfg = TimeRippleConfig(fixed_threshold=0.3, **RAMP)
    proc = _processor(cfg, prefix=2)
    q, k, v = _qkv_grid(0, 2 + 24)
    idx = torch.arange(26).view(1, 26)
    out, lse = proc.rows_attention(q, idx, k, v)
    ref, st = timeripple_attention(q, k, v, grid=(2, 3, 4), thresholds=0.3, text_prefix=2,
                                   rope_groups=proc.rope_groups)
    assert st.q_reuse > 0 and lse.shape == (1, 26, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    assert proc.stats.calls[("cond", 1, 0)].q_reuse == pytest.approx(st.q_reuse)


def test_rows_attention_subset_acts_and_only_reuses_selected_sources():
    from vdit_accel.ops.attention import row_subset_attention
    from vdit_accel.ops.timeripple import resolve_reuse, reuse_masks

    proc = _processor(TimeRippleConfig(fixed_threshold=float("inf"), **RAMP))
    q, k, v = _qkv_grid(1, 24, smooth=False)
    idx = torch.tensor([[0, 1, 5, 12, 13, 23]])
    out, lse = proc.rows_attention(q[:, idx[0]], idx, k, v)
    plain, plain_lse = row_subset_attention(q[:, idx[0]], k, v)
    assert not torch.allclose(out, plain, atol=1e-3)  # K reuse acts
    # Grid (2, 3, 4), token = t*12 + h*4 + w, θ = inf, priority t, h, w. Row 1 reuses row 0 (w window {0, 1}),
    # row 5 = (0, 1, 1) reuses row 1 along h (window {1, 5}, both selected; its w partner 4 is not selected),
    # row 13 reuses row 12 (w). Row 23 = (1, 2, 3): partners 11 (t) and 22 (w) are unselected, h window has size 1,
    # so it keeps its own query.
    assert torch.allclose(out[:, 1], out[:, 0]) and torch.allclose(out[:, 2], out[:, 0])
    assert torch.allclose(out[:, 4], out[:, 3]) and not torch.allclose(out[:, 5], out[:, 0])
    kt = resolve_reuse(k, reuse_masks(k, (2, 3, 4), float("inf")))
    own, _ = row_subset_attention(q[:, [23]], kt, v)
    assert torch.allclose(out[:, 5:], own, atol=1e-6)
    assert proc.stats.summary()["active_calls"] == 1


# ---------------------------------------------------------------------------------- "tokens" variant
def test_tokens_variant_zero_threshold_is_bit_identical_and_acts(tiny_model):
    dense, _ = _run(tiny_model)
    off, _ = _run(tiny_model, TimeRippleConfig(fixed_threshold=0.0, variant="tokens", **RAMP))
    assert torch.equal(dense, off)
    on, handle = _run(tiny_model, TimeRippleConfig(fixed_threshold=2.0, variant="tokens", **RAMP))
    s = handle.stats.summary()
    assert not torch.equal(dense, on)
    assert s["rows_removed_active"] == pytest.approx(7 / 8) and s["keys_removed_active"] == pytest.approx(7 / 8)
    assert s["qk_savings_active"] == pytest.approx(1 - (1 / 8) ** 2, abs=1e-4)
    after, _ = _run(tiny_model)
    assert torch.equal(dense, after)


def test_tokens_variant_rejects_non_shared_thresholds():
    with pytest.raises(ConfigError, match="threshold_mode='per_axis' is not accepted with variant='tokens'"):
        TimeRippleConfig(variant="tokens", threshold_mode="per_axis")


def test_rows_attention_tokens_reuses_keys_only():
    proc = _processor(TimeRippleConfig(fixed_threshold=2.0, variant="tokens", **RAMP))
    q, k, v = _qkv_grid(0, 24)
    out, lse = proc.rows_attention(q, torch.arange(24).view(1, 24), k, v)
    st = proc.stats.calls[("cond", 1, 0)]
    assert st.q_reuse == 0.0 and st.k_reuse == pytest.approx(20 / 24)  # grid 2x3x4: 1x2x2 tokens are roots
    assert out.shape == q.shape and lse.shape == (1, 24, 2)


def test_tokens_mean_key_merge_acts_and_is_refused_where_it_would_do_nothing(tiny_model):
    """``key_merge="mean"``: the same decisions (same keys removed) and another output than the root-key merge, in the
    processor and in the rows path Astraea calls; refused where nothing merges keys."""
    keys = dict(fixed_threshold=0.7, variant="tokens", reuse_q=False, **RAMP)  # 2x2x2 tokens: several groups
    root, h_root = _run(tiny_model, TimeRippleConfig(**keys))
    mean, h_mean = _run(tiny_model, TimeRippleConfig(key_merge="mean", **keys))
    assert not torch.equal(root, mean)
    for name in ("keys_removed_active", "rows_removed_active"):
        assert h_mean.stats.summary()[name] == h_root.stats.summary()[name]
    assert 0.2 < h_mean.stats.summary()["keys_removed_active"] < 0.8
    q, k, v = _qkv_grid(0, 24)
    idx = torch.arange(24).view(1, 24)
    rows = {m: _processor(TimeRippleConfig(key_merge=m, **(keys | {"fixed_threshold": 2.0}))).rows_attention(
        q, idx, k, v)[0]
            for m in ("root", "mean")}
    assert not torch.equal(rows["root"], rows["mean"])
    with pytest.raises(ConfigError, match="key_merge='mean' is not accepted with variant='exact_sim'"):
        TimeRippleConfig(key_merge="mean")
    with pytest.raises(ConfigError, match="reuse_k=False"):
        TimeRippleConfig(key_merge="mean", variant="tokens", reuse_k=False)
    with pytest.raises(ConfigError, match="key_merge='centroid' is not accepted"):
        TimeRippleConfig(key_merge="centroid", variant="tokens")


def test_tokens_decision_interval_keeps_decisions_between_steps(tiny_model, monkeypatch):
    """``decision_interval=N``: a layer's decisions are taken on every N-th reuse step of each branch and kept in
    between (fewer decision passes, the same keys merged on the kept steps), afresh in each generation; refused for
    variants that keep nothing."""
    import vdit_accel.methods.timeripple as tr

    calls = []
    real = tr.token_decisions
    monkeypatch.setattr(tr, "token_decisions", lambda *a, **k: calls.append(1) or real(*a, **k))
    keys = dict(fixed_threshold=0.7, variant="tokens", reuse_q=False, key_merge="mean", **RAMP)
    every, h_every = _run(tiny_model, TimeRippleConfig(**keys))
    n_every = len(calls)
    kept, h_kept = _run(tiny_model, TimeRippleConfig(decision_interval=2, **keys))
    n_kept = len(calls) - n_every
    active = h_every.stats.summary()["active_calls"]
    assert n_every == active and 0 < n_kept < n_every  # 4 steps, interval 2: two of them decide
    assert h_kept.stats.summary()["keys_removed_active"] > 0.2 and h_kept.stats.summary()["active_calls"] == active
    again, _ = _run(tiny_model, TimeRippleConfig(decision_interval=2, **keys))  # a new generation decides afresh
    assert torch.equal(again, kept)
    with pytest.raises(ConfigError, match="decision_interval=2 is not accepted with variant='exact_sim'"):
        TimeRippleConfig(decision_interval=2)
    with pytest.raises(ConfigError, match="decision_interval"):
        TimeRippleConfig(decision_interval=0, variant="tokens")


# ---------------------------------------------------------------------------------- step count, double apply
def test_resampled_scales_ramp_and_keeps_thresholds():
    cfg = TimeRippleConfig(theta_min=0.1, theta_max=0.3)  # 10..20 of 50
    r = cfg.resampled(20)
    assert (r.i_min, r.i_max, r.num_steps, r.theta_min, r.theta_max) == (4, 8, 20, 0.1, 0.3)
    assert cfg.resampled(50) is cfg
    fixed = TimeRippleConfig(fixed_threshold=0.2).resampled(4)
    assert fixed.fixed_threshold == 0.2 and fixed.num_steps == 4
    with pytest.raises(ConfigError, match="cannot be resampled to num_steps=2"):
        cfg.resampled(2)
    with pytest.raises(ConfigError, match="num_steps=0"):
        cfg.resampled(0)


def test_load_preset_resamples_timeripple(tmp_path):
    from vdit_accel.search.presets import load_preset, save_preset

    p = save_preset(tmp_path / "tr.json", "timeripple", TimeRippleConfig(), model_id="m", geometry=[1, 2, 3],
                    steps=50, seed=0)
    cfg = load_preset(p, steps=8)
    assert (cfg.num_steps, cfg.i_min, cfg.i_max) == (8, 2, 3)


def test_schedule_for_other_step_count_raises_naming_resampling(tiny_model):
    cfg = TimeRippleConfig()  # a 50-step schedule, the sampler runs 4 steps
    with pytest.raises(ConfigError, match="resample"):
        _run(tiny_model, cfg)
    dense, _ = _run(tiny_model)
    fixed, _ = _run(tiny_model, TimeRippleConfig(fixed_threshold=0.0))  # fixed θ has no step count to match
    assert torch.equal(dense, fixed)


def test_applying_twice_raises_before_installing(tiny_model):
    dense, _ = _run(tiny_model)
    handle = apply_timeripple(tiny_model.transformer, TimeRippleConfig(fixed_threshold=0.3, **RAMP))
    try:
        procs = [b.attn1.get_processor() for b in tiny_model.transformer.blocks]
        with pytest.raises(ConfigError, match="already applied"):
            apply_timeripple(tiny_model.transformer, TimeRippleConfig(fixed_threshold=0.3, **RAMP))
        assert [b.attn1.get_processor() for b in tiny_model.transformer.blocks] == procs
    finally:
        handle.remove()
    assert torch.equal(dense, _run(tiny_model)[0])
