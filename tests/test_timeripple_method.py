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
