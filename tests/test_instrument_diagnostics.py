"""The instrument's diagnostics: conditioning_probe, sampler_sweep, x0_grid and oracle_gap (benchmarks/)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vdit_accel.instrument.captions import format_caption, parse_caption
from vdit_accel.testing import tiny_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def probe():
    return _load("conditioning_probe")


@pytest.mark.parametrize("attribute, expected", [
    ("colour", "a orange circle moves left on a blue background"),
    ("shape", "a red square moves left on a blue background"),
    ("motion", "a red circle moves right on a blue background"),
    ("background.colour", "a red circle moves left on a green background"),
    ("background.kind", "a red circle moves left on a blue gradient background"),
])
def test_swap_changes_exactly_one_attribute(probe, attribute, expected):
    caption = parse_caption("a red circle moves left on a blue background")
    assert format_caption(probe.swapped(caption, attribute)) == expected


def test_probe_writes_gaps_per_noise_level(probe, tmp_path):
    tiny_model().save(tmp_path / "m")
    out = tmp_path / "probe.json"
    assert probe.main(["--weights", str(tmp_path / "m"), "--clips", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["t"] for r in doc["per_noise_level"]] == list(probe.NOISE_LEVELS)
    row = doc["per_noise_level"][0]
    assert set(row["gap"]) == {"empty", *probe.ATTRIBUTES}
    assert row["gap"]["shape"] == pytest.approx(row["loss"]["shape"] - row["loss"]["true"], abs=1e-5)
    assert doc["settings"]["clips"] == 2 and doc["command"]


def test_sampler_sweep_scores_both_prompt_sets(tmp_path):
    from vdit_accel.instrument.captions import parse_caption
    from vdit_accel.instrument.dataset import heldout_prompts, is_heldout

    sweep = _load("sampler_sweep")
    training = sweep.training_prompts(6)
    assert not any(is_heldout(o.colour, o.shape, o.motion) for p in training for o in parse_caption(p).objects)
    tiny_model().save(tmp_path / "m")
    out = tmp_path / "sweep.json"
    assert sweep.main(["--weights", str(tmp_path / "m"), "--prompts", "1", "--steps", "2",
                       "--settings", "1,3", "2,5", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["guidance"], r["shift"]) for r in doc["results"]] == [(1.0, 3.0), (2.0, 5.0)]
    assert doc["settings"]["prompts"]["heldout"] == heldout_prompts()[:1]
    for row in doc["results"]:
        for name in ("heldout", "training"):
            assert 0 <= row[name]["adherence"] <= 1 and "object0.shape" in row[name]["attributes"]


def test_x0_grid_names_the_nearest_shape(tmp_path):
    from vdit_accel.instrument.captions import SHAPES

    grid = _load("x0_grid")
    tiny_model().save(tmp_path / "m")
    out = tmp_path / "grid"
    assert grid.main(["--weights", str(tmp_path / "m"), "--size", "8", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert [(r["shape"], r["t"]) for r in doc["rows"]] == [(s, t) for s in SHAPES for t in grid.NOISE_LEVELS]
    for row in doc["rows"]:
        assert row["nearest"] == min(row["mse_to"], key=row["mse_to"].get) and set(row["mse_to"]) == set(SHAPES)
    for t, fraction in doc["own_shape_fraction_per_t"].items():
        own = [r["nearest"] == r["shape"] for r in doc["rows"] if r["t"] == float(t)]
        assert fraction == pytest.approx(sum(own) / len(SHAPES))


def test_probe_takes_noise_levels_and_object_size(probe, tmp_path):
    tiny_model().save(tmp_path / "m")
    out = tmp_path / "probe.json"
    assert probe.main(["--weights", str(tmp_path / "m"), "--clips", "1", "--noise-levels", "0.5", "0.995",
                       "--object-size", "0.4", "0.44", "--layout", "anchored", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["t"] for r in doc["per_noise_level"]] == [0.5, 0.995]
    assert doc["settings"]["object_size"] == [0.4, 0.44] and doc["settings"]["layout"] == "anchored"
    with pytest.raises(SystemExit) as e:
        probe.main(["--weights", str(tmp_path / "m"), "--noise-levels", "1.0", "--out", str(out)])
    assert e.value.code == 2


def test_oracle_mean_clip_of_a_fixed_placement_is_the_clip_itself():
    """With the layout anchored, one size and no motion, every placement is the same: the mean is that clip."""
    import numpy as np

    from vdit_accel.instrument.captions import BackgroundCaption, Caption, ObjectCaption
    from vdit_accel.instrument.dataset import render, spec_for_caption

    oracle = _load("oracle_gap")
    obj = ObjectCaption("red", "triangle", "still")
    mean = oracle.mean_clip(obj, "anchored", (0.3, 0.3), 3, np.random.default_rng(0), 4, 16)
    spec = spec_for_caption(Caption((obj,), BackgroundCaption("blue", "solid")), np.random.default_rng(1),
                            "anchored", (0.3, 0.3))
    np.testing.assert_allclose(mean, render(spec, 4, 16, 16), atol=1e-6)
    jittered = oracle.mean_clip(obj, "uniform", (0.3, 0.3), 3, np.random.default_rng(0), 4, 16)
    assert np.abs(jittered - mean).max() > 0.1  # uniform starts blur the mean


def test_heldout_adherence_records_background_measurements_and_scores_renders(tmp_path):
    heldout = _load("heldout_adherence")
    tiny_model().save(tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left on a blue background\n"
                       "a red square grows on a gray gradient background\n")
    out = tmp_path / "gt"
    assert heldout.main(["--weights", str(tmp_path / "m"), "--prompts", str(prompts), "--render", "anchored",
                         "--object-size", "0.38", "0.46", "--out", str(out)]) == 0
    doc = json.loads((out / "heldout_adherence.json").read_text())
    assert doc["settings"]["render"] == "anchored" and doc["settings"]["object_size"] == [0.38, 0.46]
    assert set(doc["background_kind_thresholds"]) == {"temporal_change", "plane_residual", "plane_range"}
    solid, gradient = (row["background"] for row in doc["clips"])
    assert solid["temporal_change"] < 1e-6 and solid["plane_range"] < 1e-6  # a rendered solid background is flat
    assert gradient["plane_range"] > doc["background_kind_thresholds"]["plane_range"]
