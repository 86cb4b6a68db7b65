"""Astraea integrated in the real Wan code path (tiny random model)."""

import pytest
import torch

from vdit_accel.adapters.wan import wan_block_rows_forward
from vdit_accel.errors import ConfigError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.ops.attention import row_subset_attention
from vdit_accel.testing import TINY_PROMPT

GEN = GenerationConfig(steps=4, guidance=3.0, seed=5)


def _run(model, cfg=None, gen=GEN):
    handle = apply_astraea(model.transformer, cfg) if cfg is not None else None
    try:
        return Sampler(model)(TINY_PROMPT, gen, progress=False), handle
    finally:
        if handle is not None:
            handle.remove()


def test_full_budget_is_bit_identical_whole_generation(tiny_model):
    dense, _ = _run(tiny_model)
    full, handle = _run(tiny_model, AstraeaConfig(budgets=(1.0,) * 4, num_steps=4))
    assert torch.equal(dense, full)
    full_t, _ = _run(tiny_model, AstraeaConfig(target=1.0, num_steps=4))
    assert torch.equal(dense, full_t)


def test_sparse_budget_changes_output_and_remove_restores(tiny_model):
    dense, _ = _run(tiny_model)
    sparse, handle = _run(tiny_model, AstraeaConfig(budgets=(1.0, 0.5, 0.25, 0.5), num_steps=4))
    assert not torch.equal(dense, sparse)
    assert handle.stats.summary()["kept_ratio"] == pytest.approx((1 + 0.5 + 0.25 + 0.5) / 4)
    after, _ = _run(tiny_model)
    assert torch.equal(dense, after)
    assert not any(getattr(b, "_diffusers_hook", None) and b._diffusers_hook.get_hook("vdit_accel.astraea")
                   for b in tiny_model.transformer.blocks)


def test_rows_forward_with_all_rows_matches_the_stock_block(tiny_model):
    t = tiny_model.transformer
    block = t.blocks[0]
    x = torch.randn(2, 8, t.config.num_attention_heads * t.config.attention_head_dim)
    ehs = torch.randn(2, 20, x.shape[-1])
    temb = torch.randn(2, 6, x.shape[-1])
    rope = t.rope(torch.zeros(1, 3, 4, 8, 8))
    ref = block(x, ehs, temb, rope)
    idx = torch.arange(8).expand(2, 8)
    rows, lse = wan_block_rows_forward(block, x, ehs, temb, rope, idx, row_subset_attention)
    torch.testing.assert_close(rows, ref, atol=2e-5, rtol=1e-5)
    sub = torch.tensor([[1, 5], [0, 7]])
    rows_sub, _ = wan_block_rows_forward(block, x, ehs, temb, rope, sub, row_subset_attention)
    torch.testing.assert_close(rows_sub, torch.gather(ref, 1, sub[..., None].expand(-1, -1, x.shape[-1])),
                               atol=2e-5, rtol=1e-5)


def test_cfg_branches_keep_separate_caches_and_caches_are_freed(tiny_model):
    cfg = AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4)
    handle = apply_astraea(tiny_model.transformer, cfg)
    seen = {}
    hook0 = tiny_model.transformer.blocks[0]._diffusers_hook.get_hook("vdit_accel.astraea")

    def spy(i, x):
        seen[i] = {k: id(v.out) for k, v in hook0.states.items()}

    try:
        Sampler(tiny_model)(TINY_PROMPT, GEN, progress=False, on_step=spy)
        assert set(seen[1]) == {"cond", "uncond"} and seen[1]["cond"] != seen[1]["uncond"]
        assert hook0.states == {}  # freed at the end of the generation
        branches = {b for (b, _, _) in handle.stats.kept}
        assert branches == {"cond", "uncond"}
    finally:
        handle.remove()


def test_zero_budget_reuses_every_cached_output(tiny_model):
    _, handle = _run(tiny_model, AstraeaConfig(budgets=(1.0, 0.0, 0.0, 0.0), num_steps=4))
    assert handle.stats.per_step() == {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}


def test_schedule_length_must_match_the_generation(tiny_model):
    handle = apply_astraea(tiny_model.transformer, AstraeaConfig(budgets=(1.0, 0.5, 0.5), num_steps=3))
    try:
        with pytest.raises(ConfigError, match="3 steps but the generation has 4"):
            Sampler(tiny_model)(TINY_PROMPT, GEN, progress=False)
    finally:
        handle.remove()


@pytest.mark.parametrize("kw, match", [
    (dict(budgets=(1.0, 1.5), num_steps=2), r"budgets\[1\]=1.5"),
    (dict(budgets=(1.0, -0.1), num_steps=2), r"budgets\[1\]=-0.1"),
    (dict(budgets=(1.0, 0.5), num_steps=3), "budgets has 2 entries"),
    (dict(target=0.01, num_steps=10, dense_steps=2), "no feasible schedule"),
    (dict(target=1.2), "target=1.2"),
    (dict(w_alpha=-1.0), "w_alpha=-1.0"),
    (dict(w_beta=-0.5), "w_beta=-0.5"),
    (dict(delta_norm="l7"), "delta_norm='l7'"),
    (dict(lse_reduction="median"), "lse_reduction='median'"),
    (dict(cache="disk"), "cache='disk'"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        AstraeaConfig(**kw)


def test_uniform_schedule_meets_target():
    cfg = AstraeaConfig(target=0.5, num_steps=10, dense_steps=1)
    assert cfg.schedule[0] == 1.0 and cfg.mean_budget == pytest.approx(0.5)
    assert AstraeaConfig.from_dict(cfg.to_dict()) == cfg


def test_stats_count_dense_tail_steps(tiny_model):
    """Steps after the last sparse one run the original forward and still count as fully kept."""
    _, handle = _run(tiny_model, AstraeaConfig(budgets=(1.0, 0.5, 1.0, 1.0), num_steps=4))
    assert handle.stats.per_step() == {0: 1.0, 1: 0.5, 2: 1.0, 3: 1.0}
    assert handle.stats.summary()["kept_ratio"] == pytest.approx(0.875)
