import json

import pytest

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
    with pytest.raises(ConfigError, match="steps=4, not steps=50"):
        load_preset(path, steps=50)
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
