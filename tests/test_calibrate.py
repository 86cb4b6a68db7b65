import dataclasses
import json

import pytest
import torch

from vdit_accel.errors import ConfigError, WeightsError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.timeripple import TimeRippleConfig
from vdit_accel.search.calibrate import calibrate_timeripple, measure_savings
from vdit_accel.search.presets import load_preset, read_preset, save_preset
from vdit_accel.testing import TINY_PROMPT, tiny_model

GEN = GenerationConfig(steps=4, guidance=2.0)
BASE = TimeRippleConfig(theta_min=0.2, theta_max=0.5, i_min=1, i_max=2, num_steps=4)


def test_calibration_reaches_target_and_round_trips_as_preset(tmp_path):
    sampler = Sampler(tiny_model())
    cfg, rec = calibrate_timeripple(sampler, [TINY_PROMPT], 0.6, GEN, base=BASE, tolerance=0.02, progress=False)
    assert abs(rec["achieved"] - 0.6) <= 0.02
    assert cfg.theta_min / cfg.theta_max == pytest.approx(0.4)
    measured = measure_savings(sampler, [TINY_PROMPT], GEN, cfg)["qk_savings_active"]
    assert measured == pytest.approx(rec["achieved"], abs=1e-4)  # deterministic re-measurement
    path = save_preset(tmp_path / "p.json", "timeripple", cfg, model_id="tiny", geometry=[4, 8, 8], steps=4, seed=0,
                       record={"calibration": rec})
    assert load_preset(path, method="timeripple", steps=4) == cfg
    assert read_preset(path)["record"]["calibration"]["target"] == 0.6


def test_out_of_reach_target_names_the_maximum():
    base = TimeRippleConfig(theta_min=0.2, theta_max=0.5, i_min=1, i_max=2, num_steps=4, axes=("t",))
    with pytest.raises(ConfigError, match="out of reach: at most 0.75"):
        calibrate_timeripple(Sampler(tiny_model()), [TINY_PROMPT], 0.95, GEN, base=base, progress=False)


def test_preset_errors(tmp_path):
    path = save_preset(tmp_path / "p.json", "timeripple", BASE, model_id="tiny", geometry=[4, 8, 8], steps=4, seed=0)
    assert load_preset(path, steps=50).num_steps == 50  # TimeRipple presets resample over normalised time
    with pytest.raises(ConfigError, match="cannot be resampled to num_steps=2"):
        load_preset(path, steps=2)
    with pytest.raises(ConfigError, match="not 'astraea'"):
        load_preset(path, method="astraea")
    data = json.loads(path.read_text())
    data["config"]["bogus"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="bogus"):
        load_preset(path)
    path.write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_preset(path)
    with pytest.raises(WeightsError, match="neither a file nor a shipped preset"):
        load_preset("no-such-preset")


# ------------------------------------------------------------------------------------ calibration for time
def test_axis_and_token_maps_keep_in_window_position():
    from vdit_accel.search.calibrate import axis_map, token_map

    assert axis_map(4, 8, 2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert axis_map(3, 8, 2).tolist() == [0, 1, 0, 1, 2, 2, 2, 2]  # source window of size 1: never reusable
    assert token_map((1, 2, 2), (1, 4, 4), 2, text_prefix=3).tolist()[:4] == [3, 4, 3, 4]


def test_resampled_roots_reuse_everything_reusable_above_one():
    from vdit_accel.search.calibrate import OpGeometry, resampled_roots

    rec = {"grid": (2, 2, 2), "text_prefix": 1,
           "spread": {a: torch.full((1, 9), 0.3).index_fill(1, torch.tensor([0]), float("inf")) for a in "thw"}}
    cfg = TimeRippleConfig(variant="tokens")
    root = resampled_roots(rec, 1.5, OpGeometry((2, 4, 4), 2, 12), cfg)
    assert root.shape == (1, 32)
    assert float((root != torch.arange(32)).float().mean()) == 7 / 8
    assert torch.equal(resampled_roots(rec, 0.2, OpGeometry((2, 4, 4), 2, 12), cfg), torch.arange(32).view(1, 32))


def test_speed_calibration_bisects_to_target_and_round_trips_as_preset(tmp_path, monkeypatch):
    import vdit_accel.search.calibrate as cal

    calls = []

    def fake(records, theta, config, geometry, *, repeats=3, seed=0):  # a monotone speed curve, deterministic
        calls.append(theta)
        assert records and config.variant == "tokens"
        return {"speedup": 1.0 + 2.0 * min(theta, 1.0), "reused": min(theta, 1.0), "attn_work": 0.5, "dense_s": 1.0}

    monkeypatch.setattr(cal, "measure_op_speedup", fake)
    sampler = Sampler(tiny_model())
    gen = GenerationConfig(steps=4)
    cfg, rec = cal.calibrate_timeripple_speed(sampler, [TINY_PROMPT], 1.5, gen, tolerance=0.01, progress=False)
    assert cfg.variant == "tokens" and abs(cfg.fixed_threshold - 0.25) < 0.02
    assert rec["achieved_speedup"] >= 1.49 and rec["op_geometry"]["heads"] == 12 and rec["recorded_calls"] > 0
    p = save_preset(tmp_path / "tr-speed.json", "timeripple", cfg, model_id="m", geometry=[1, 2, 3], steps=4, seed=0,
                    record={"calibration": rec})
    assert load_preset(p, steps=8) == dataclasses.replace(cfg, num_steps=8)
    with pytest.raises(ConfigError, match="out of reach: at most 3.000x"):
        cal.calibrate_timeripple_speed(sampler, [TINY_PROMPT], 10.0, gen, progress=False)
    with pytest.raises(ConfigError, match="target_speedup=0.9"):
        cal.calibrate_timeripple_speed(sampler, [TINY_PROMPT], 0.9, gen, progress=False)


def test_measure_op_speedup_runs_and_counts_reuse():
    from vdit_accel.search.calibrate import OpGeometry, measure_op_speedup

    rec = {"grid": (2, 2, 2), "text_prefix": 0, "spread": {a: torch.zeros(1, 8) for a in "thw"}}
    m = measure_op_speedup([rec], 0.5, TimeRippleConfig(variant="tokens"), OpGeometry((2, 4, 4), 2, 8), repeats=1)
    assert m["reused"] == 7 / 8 and m["attn_work"] == pytest.approx(1 / 64) and m["speedup"] > 0


def test_speed_calibration_cli_passes_key_merge_and_refuses_it_alone(tmp_path, monkeypatch, capsys):
    """``calibrate timeripple --target-speedup S --keys-only --key-merge mean`` calibrates a mean-key config and names
    the preset by it; ``--key-merge`` without ``--target-speedup`` is refused before any compute."""
    import vdit_accel.search.calibrate as cal
    import vdit_accel.search.cli as search_cli
    from vdit_accel.cli import main

    seen = {}

    def fake(sampler, prompts, target, gen, *, geometry, base):
        seen["base"] = base
        return dataclasses.replace(base, fixed_threshold=0.2), {"achieved_speedup": target}

    model = tiny_model()
    monkeypatch.setattr(cal, "calibrate_timeripple_speed", fake)
    monkeypatch.setattr(search_cli, "_model_and_sampler", lambda a: (model, Sampler(model)))
    out = tmp_path / "p.json"
    assert main(["calibrate", "timeripple", "--target-speedup", "1.5", "--keys-only", "--key-merge", "mean",
                 "--steps", "4", "--out", str(out)]) == 0
    assert seen["base"].key_merge == "mean" and not seen["base"].reuse_q
    data = json.loads(out.read_text())
    assert data["config"]["key_merge"] == "mean" and "-k-mean-op1.5x-" in data["record"]["name"]
    assert load_preset(out).key_merge == "mean"
    assert main(["calibrate", "timeripple", "--target", "0.8", "--key-merge", "mean",
                 "--out", str(tmp_path / "q.json")]) == 2
    assert "--key-merge applies to --target-speedup only" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()
