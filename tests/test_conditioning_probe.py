"""benchmarks/conditioning_probe.py: each swap changes exactly one attribute; the probe runs on a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vdit_accel.instrument.captions import parse_caption
from vdit_accel.testing import tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "conditioning_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("conditioning_probe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("attribute, expected", [
    ("colour", "a orange circle moves left on a blue background"),
    ("shape", "a red square moves left on a blue background"),
    ("motion", "a red circle moves right on a blue background"),
    ("background.colour", "a red circle moves left on a green background"),
    ("background.kind", "a red circle moves left on a blue gradient background"),
])
def test_swap_changes_exactly_one_attribute(probe, attribute, expected):
    caption = parse_caption("a red circle moves left on a blue background")
    from vdit_accel.instrument.captions import format_caption

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
