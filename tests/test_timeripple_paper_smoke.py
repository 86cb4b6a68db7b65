"""Smoke test of benchmarks/timeripple_paper.py: every experiment on the tiny random model, in seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "timeripple_paper.py"

EXPECTED = {
    "fig7": ("summary", "calls"),
    "fig8": ("cv_across_prompts", "cv_across_steps", "error_mean_over_layers", "steps", "prompts"),
    "fig5": ("dense", "t", "h", "w"),
    "ablations": ("reference_step_sensitive_shared_K2_full", "window_4", "window_8", "per_axis_1.5_0.75_0.75",
                  "per_channel", "temporal_only", "fixed_threshold"),
}
HEADER = ("format", "experiment", "command", "argv", "model", "generation", "settings", "subsampled", "results",
          "files", "wall_s")


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, bool):
        return
    elif isinstance(x, int | float):
        yield x


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("timeripple_paper", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    out = tmp_path_factory.mktemp("timeripple_paper")
    written = mod.main(["--model", "tiny", "--steps", "6", "--prompts", "2", "--out", str(out)])
    return out, written


def test_every_experiment_writes_json_and_figure(smoke):
    out, written = smoke
    assert sorted(written) == sorted(EXPECTED)
    for name, keys in EXPECTED.items():
        doc = json.loads((out / f"{name}.json").read_text())
        assert all(k in doc for k in HEADER), name
        assert doc["experiment"] == name and "--model tiny" in doc["command"]
        assert all(k in doc["results"] for k in keys), name
        for f in doc["files"]:
            assert (out / f).is_file() and (out / f).stat().st_size > 0, f
        assert (out / f"{name}.png").is_file()
        nums = list(_numbers(doc["results"]))
        assert nums and all(math.isfinite(v) for v in nums), name
    assert (out / "fig5.gif").is_file()


def test_numbers_are_sane(smoke):
    out, _ = smoke
    fig7 = json.loads((out / "fig7.json").read_text())["results"]
    for s, row in fig7["summary"].items():
        assert abs(row["achieved_qk_savings_mean"] - float(s)) < 0.05
        assert row["mse_mean_timeripple"] > 0 and row["mask_over_timeripple_geomean"] > 0
    fig8 = json.loads((out / "fig8.json").read_text())["results"]
    assert abs(fig8["achieved_reuse_mean"] - 0.5) < 0.05
    assert fig8["cv_across_prompts"] >= 0 and fig8["cv_across_steps"] >= 0
    fig5 = json.loads((out / "fig5.json").read_text())["results"]
    assert all(fig5[g]["psnr"] is not None and fig5[g]["psnr"] > 0 for g in "thw")
    abl = json.loads((out / "ablations.json").read_text())["results"]
    for row in abl.values():
        assert 0 < row["qk_savings_all"] <= row["qk_savings_active"] <= 1
        assert row["psnr_mean"] is not None and 0 < row["ssim_mean"] <= 1
