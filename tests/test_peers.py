"""Every registered diffusers peer engages on Wan (changes the output) and is removed exactly."""

import pytest
import torch

import vdit_accel.methods  # noqa: F401
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.magcache_ratios import calibrate_mag_ratios
from vdit_accel.registry import BenchEnv, apply, operating_points
from vdit_accel.testing import TINY_PROMPT, tiny_model

GEN = GenerationConfig(steps=12, guidance=3.0)


@pytest.mark.parametrize("label", ["pab-2", "fbc-0.1", "taylorseer-i3-o1", "taylorseer-i2-o2", "fastercache-2",
                                   "magcache-0.12-s3"])
def test_peer_engages_and_removes_exactly(label, monkeypatch):
    model = tiny_model()
    sampler = Sampler(model)
    dense = sampler(TINY_PROMPT, GEN, progress=False)
    ratios = calibrate_mag_ratios(sampler, TINY_PROMPT, GEN, write=False)
    monkeypatch.setattr("vdit_accel.methods.magcache_ratios.load_mag_ratios", lambda model_id: ratios)
    (point,) = operating_points(label)
    handle = apply(model, point.make_config(BenchEnv(sampler, GEN.steps, "tiny")))
    try:
        out = sampler(TINY_PROMPT, GEN, progress=False)
    finally:
        handle.remove()
    assert not torch.equal(out, dense), f"{label} did not change the output: it did not engage"
    assert torch.equal(sampler(TINY_PROMPT, GEN, progress=False), dense)


def test_bench_checks_every_operating_point_before_any_compute(tmp_path):
    from vdit_accel.bench.harness import BenchConfig, run_bench
    from vdit_accel.errors import WeightsError

    model = tiny_model()  # model id "vdit-accel/tiny-test": no MagCache ratios were calibrated for it
    calls = []
    model.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(WeightsError, match="no MagCache ratios for model 'vdit-accel/tiny-test'"):
        run_bench(model, BenchConfig(methods="dense,fbc-0.05,magcache-0.12-s3", prompts="quick", seeds=1, steps=3),
                  tmp_path / "never", progress=False)
    assert calls == [] and not (tmp_path / "never").exists()


def test_peer_grids_are_the_fixed_products_with_systematic_labels():
    from vdit_accel.methods.peers import PEER_GRIDS

    assert PEER_GRIDS["taylorseer"] == {"cache_interval": (2, 3, 4, 5, 6, 8), "max_order": (1, 2)}
    assert PEER_GRIDS["magcache"] == {"threshold": (0.06, 0.12, 0.24, 0.5), "max_skip_steps": (3, 6)}
    assert PEER_GRIDS["fbc"] == {"threshold": (0.05, 0.1, 0.2, 0.3)}
    assert PEER_GRIDS["pab"] == {"spatial_skip": (2, 3, 4)}
    labels = {name: [p.label for p in operating_points(name)] for name in PEER_GRIDS}
    assert labels["taylorseer"] == [f"taylorseer-i{i}-o{o}" for i in (2, 3, 4, 5, 6, 8) for o in (1, 2)]
    assert labels["magcache"] == [f"magcache-{t}-s{s}" for t in ("0.06", "0.12", "0.24", "0.5") for s in (3, 6)]
    assert labels["fbc"] == ["fbc-0.05", "fbc-0.1", "fbc-0.2", "fbc-0.3"]
    assert labels["pab"] == ["pab-2", "pab-3", "pab-4"]
    assert labels["fastercache"] == ["fastercache-2", "fastercache-3"]


def test_labels_resolve_to_their_grid_values_and_the_fixed_rule():
    (ts,) = operating_points("taylorseer-i5-o2")
    assert (ts.method, ts.settings["cache_interval"], ts.settings["max_order"]) == ("taylorseer", 5, 2)
    assert ts.settings["disable_cache_before_step"] == 3  # diffusers' default, the same for every grid point
    (mag,) = operating_points("magcache-0.24-s6")
    s = mag.settings
    assert (s["threshold"], s["max_skip_steps"], s["retention_ratio"]) == (0.24, 6, 0.2)
    (pab,) = operating_points("pab-3")
    assert pab.settings["spatial_skip"] == 3 and pab.settings["timestep_range"] == [100, 800]
    assert operating_points("fbc-0.2")[0].settings == {"threshold": 0.2}
    assert len({p.settings["timestep_range"][1] for p in operating_points("pab")}) == 1  # one rule, not per point


def test_built_configs_carry_the_grid_values_and_whole_block_identifiers():
    env = BenchEnv(sampler=None, steps=8, model_id="vdit-accel/embedded-wan-v2")
    cfg = operating_points("taylorseer-i6-o2")[0].make_config(env)
    assert (cfg.cache_interval, cfg.max_order, cfg.disable_cache_before_step) == (6, 2, 3)
    assert cfg.cache_identifiers == [r"^blocks\.\d+$"] and cfg.taylor_factors_dtype == torch.float32
    mag = operating_points("magcache-0.5-s6")[0].make_config(env)
    assert (mag.threshold, mag.max_skip_steps, mag.num_inference_steps) == (0.5, 6, 8)
    pab = operating_points("pab-4")[0].make_config(env)
    assert pab.spatial_attention_block_skip_range == 4 and pab.spatial_attention_timestep_skip_range == (100, 800)
    assert operating_points("fbc-0.3")[0].make_config(env).threshold == 0.3


def test_old_labels_are_refused_with_the_known_points():
    from vdit_accel.errors import ConfigError

    with pytest.raises(ConfigError, match="'taylorseer-3' is unknown.*taylorseer-i3-o1"):
        operating_points("taylorseer-3")
