"""The bench harness and report: paired speedups, drift flag, prompt splits, interleaving, report columns."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import vdit_accel.methods  # noqa: F401  (registers the built-in methods)
from vdit_accel.bench.harness import (
    BENCH_PROMPTS,
    CALIBRATION_PROMPTS,
    BenchConfig,
    _aggregate,
    prompt_sets,
    run_bench,
)
from vdit_accel.bench.report import KNOWN_FRONTS, drift_line, fronts_present, markdown_table, plot_pareto
from vdit_accel.bench.timing import drift_flagged, latency_drift, paired_speedups, round_robin_order
from vdit_accel.errors import ConfigError
from vdit_accel.registry import method_names, operating_points
from vdit_accel.testing import tiny_model

# ---- timing: pure functions with hand-computed numbers


def test_paired_speedups_median_quartiles_and_extremes():
    s = paired_speedups([2.0, 4.0, 6.0, 8.0], [1.0, 1.0, 2.0, 2.0])  # ratios 2, 4, 3, 4 -> sorted 2, 3, 4, 4
    assert s["speedup_ratios"] == [2.0, 4.0, 3.0, 4.0]
    assert s["speedup"] == 3.5 and s["speedup_q25"] == 2.75 and s["speedup_q75"] == 4.0
    assert (s["speedup_min"], s["speedup_max"]) == (2.0, 4.0)


def test_paired_speedups_pairs_by_job_not_by_medians():
    # medians of each side give 2.0 / 2.0 = 1; pairing shows the method is 2x faster on every job
    s = paired_speedups([1.0, 2.0, 4.0], [0.5, 1.0, 2.0])
    assert s["speedup"] == 2.0 and s["speedup_min"] == s["speedup_max"] == 2.0


@pytest.mark.parametrize("dense, method, match", [
    ([1.0, 2.0], [1.0], "one value per job each: got 2 dense and 1 method"),
    ([1.0, 0.0], [1.0, 1.0], r"dense_latencies=\[1.0, 0.0\] has a value out of range"),
    ([], [], "non-empty"),
    ([1.0], [float("nan")], "method_latencies"),
])
def test_paired_speedups_refuses_bad_latencies(dense, method, match):
    with pytest.raises(ConfigError, match=match):
        paired_speedups(dense, method)


def test_latency_drift_halves_and_flag():
    assert latency_drift([1.0, 1.0, 1.0, 1.2, 1.2, 1.2]) == pytest.approx(1.2)
    assert drift_flagged(latency_drift([1.0, 1.0, 1.0, 1.2, 1.2, 1.2]))
    assert latency_drift([1.0, 1.0, 1.05, 1.05]) == pytest.approx(1.05)
    assert not drift_flagged(latency_drift([1.0, 1.0, 1.05, 1.05]))
    assert latency_drift([2.0, 50.0, 2.0]) == 1.0  # odd count: the middle job is in neither half
    assert latency_drift([1.0, 1.0, 0.85, 0.85]) == pytest.approx(0.85) and drift_flagged(0.85)  # faster counts too
    assert latency_drift([3.0]) is None and not drift_flagged(None)
    assert not drift_flagged(1.1) and drift_flagged(1.1001) and not drift_flagged(0.9)  # "beyond 10%"
    assert drift_flagged(1.05, tolerance=0.02)


def test_round_robin_rotates_every_point_once_per_job():
    order = round_robin_order(["dense", "a", "b"], 4)
    assert order == [["dense", "a", "b"], ["a", "b", "dense"], ["b", "dense", "a"], ["dense", "a", "b"]]
    with pytest.raises(ConfigError, match="n_jobs=0"):
        round_robin_order(["dense"], 0)


def test_aggregate_keeps_inf_and_refuses_nan():
    assert _aggregate("psnr", [math.inf, math.inf], 3) == (math.inf, math.inf)
    assert _aggregate("psnr", [30.0, math.inf, 20.0], 3) == (25.0, 20.0)  # mean over finite values
    with pytest.raises(ConfigError, match="psnr_worst_patch=nan is not a number"):
        _aggregate("psnr_worst_patch", [30.0, float("nan")], 3)


# ---- prompt splits


def _search_prompts() -> set[str]:
    """Every prompt the search / calibration side uses: the calib set, shipped presets' and MagCache ratios'."""
    from vdit_accel.methods.magcache_ratios import RATIOS_FILE
    from vdit_accel.search.presets import PRESETS_DIR

    used = set(prompt_sets()["calib"]) | set(CALIBRATION_PROMPTS)
    def walk(node) -> None:  # every list of prompts anywhere in a preset's record
        if isinstance(node, dict):
            for key, value in node.items():
                if "prompts" in key and isinstance(value, list):
                    used.update(value)
                walk(value)

    for path in sorted(PRESETS_DIR.glob("*.json")):
        walk(json.loads(path.read_text()).get("record", {}))
    used |= {entry["prompt"] for entry in json.loads(RATIOS_FILE.read_text()).values()}
    return used


def test_bench_prompt_sets_are_held_out_and_disjoint_from_search_prompts():
    from vdit_accel.instrument.dataset import heldout_prompts

    sets = prompt_sets()
    assert len(sets["bench"]) >= 8 and len(set(sets["bench"])) == len(sets["bench"])
    assert sets["bench"] == list(BENCH_PROMPTS)
    assert set(sets["quick"]) <= set(sets["bench"]) and len(sets["quick"]) == 2
    assert set(sets["bench"]) <= set(heldout_prompts())  # held out of training
    search = _search_prompts()
    assert len(search) >= 4
    for name in ("bench", "quick", "heldout"):
        assert set(sets[name]).isdisjoint(search), f"{name} shares prompts with calibration/search"


def test_search_and_calibrate_default_to_the_calib_set():
    from vdit_accel.cli import build_parser

    parser = build_parser()
    for argv in (["calibrate", "timeripple"], ["search", "astraea", "--target", "0.5"]):
        assert parser.parse_args(argv).prompts == "calib"
    assert parser.parse_args(["bench"]).prompts == "bench"


# ---- defaults


def test_default_methods_cover_ours_and_every_peer():
    from vdit_accel.cli import build_parser

    default = BenchConfig().methods
    assert {p.method for p in operating_points(default)} == set(method_names())
    assert {"timeripple", "astraea", "taylorseer", "magcache", "fbc", "pab", "fastercache"} <= set(default.split(","))
    assert build_parser().parse_args(["bench"]).methods == default


# ---- the harness, interleaved, on the tiny model


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    import vdit_accel.bench.harness as harness

    applied = []
    real_apply = harness.apply

    def recording_apply(transformer, config):
        applied.append((type(config).__name__, getattr(config, "threshold", None)))
        return real_apply(transformer, config)

    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setattr(harness, "apply", recording_apply)  # the harness module's own name, nothing global
    try:
        res = run_bench(tiny_model(), BenchConfig(methods="fbc-0.05,dense,fbc-0.3", prompts="quick", seeds=2, steps=3),
                        out, progress=False)
    finally:
        mp.undo()
    return res, applied, out


def test_harness_interleaves_round_robin_and_records_the_order(tiny_bench):
    res, applied, _ = tiny_bench
    labels = ["dense", "fbc-0.05", "fbc-0.3"]  # dense first, then the order given
    assert [m["label"] for m in res["methods"]] == labels
    assert res["jobs"] == [[p, s] for p in prompt_sets()["quick"] for s in (0, 1)]
    log = res["run_log"]
    assert [[e["label"] for e in log if e["job"] == j] for j in range(4)] == round_robin_order(labels, 4)
    assert [e["job"] for e in log] == sorted(e["job"] for e in log)  # one job's round ends before the next starts
    assert all(a["start_s"] + a["latency_s"] <= b["start_s"] + 1e-3 for a, b in zip(log, log[1:]))
    # what was really applied, in order (dense through its own config), matches the log
    name = {"dense": ("DenseConfig", None), "fbc-0.05": ("FirstBlockCacheConfig", 0.05),
            "fbc-0.3": ("FirstBlockCacheConfig", 0.3)}
    assert applied == [name[e["label"]] for e in log]
    for m in res["methods"]:  # each row's latencies are its log entries, in job order
        assert m["latencies_s"] == [e["latency_s"] for e in log if e["label"] == m["label"]]


def test_harness_rows_carry_paired_speedups_quality_and_drift(tiny_bench):
    res, _, _ = tiny_bench
    dense, fbc_hi = res["methods"][0], res["methods"][2]
    assert dense["speedup"] == 1.0 and dense["speedup_ratios"] == [1.0] * 4
    dense_lat = dense["latencies_s"]
    expected = paired_speedups(dense_lat, fbc_hi["latencies_s"])["speedup"]
    assert fbc_hi["speedup"] == pytest.approx(expected, rel=0.02)  # latencies_s are rounded to 0.1 ms
    assert fbc_hi["speedup_min"] <= fbc_hi["speedup_q25"] <= fbc_hi["speedup"] <= fbc_hi["speedup_q75"]
    assert fbc_hi["speedup_q75"] <= fbc_hi["speedup_max"]
    for key in ("psnr_worst_patch_min", "psnr_worst_patch_mean", "temporal_psnr_mean", "temporal_psnr_min"):
        assert dense[key] == math.inf and not math.isnan(fbc_hi[key])
    assert fbc_hi["psnr_worst_patch_min"] <= fbc_hi["psnr_min"] < math.inf  # fbc-0.3 skips on the tiny model
    assert res["dense_drift"] == pytest.approx(latency_drift(dense_lat), rel=0.02)
    assert res["drift_flagged"] == drift_flagged(res["dense_drift"])
    grids = res["settings"]["peer_grids"]
    assert grids["grids"]["taylorseer"] == {"cache_interval": [2, 3, 4, 5, 6, 8], "max_order": [1, 2]}
    assert "rule" in grids and res["settings"]["worst_patch_side"] == 16


def test_report_files_and_columns(tiny_bench):
    res, _, out = tiny_bench
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"][0]["psnr_worst_patch_min"] == math.inf and "drift_flagged" in on_disk
    md = (out / "results.md").read_text()
    for header in ("speedup IQR", "speedup min-max", "worst-patch PSNR min", "worst-patch PSNR mean",
                   "temporal PSNR mean"):
        assert header in md
    assert ("DRIFT FLAGGED" in md) == res["drift_flagged"]
    for name in ("pareto.png", "compare.gif", "compare.png"):
        assert (out / name).stat().st_size > 0


def _rows() -> dict:
    row = {"label": "fbc-0.1", "method": "fbc", "speedup": 1.8, "speedup_q25": 1.5, "speedup_q75": 2.0,
           "speedup_min": 1.2, "speedup_max": 2.5, "latency_median_s": 1.0, "psnr_mean": 30.0, "psnr_min": 28.0,
           "psnr_worst_patch_mean": 22.0, "psnr_worst_patch_min": 19.5, "temporal_psnr_mean": 33.0,
           "ssim_mean": 0.9, "ssim_min": 0.8, "adherence": 1.0, "peak_rss_mb": 400.0, "peak_delta_mb": 3.0,
           "stats": {}}
    dense = {**row, "label": "dense", "method": "dense", "speedup": 1.0, "psnr_mean": math.inf}
    return {"methods": [dense, row], "dense_drift": 1.25, "drift_flagged": True,
            "settings": {"model_id": "m", "drift_tolerance": 0.1}}


def test_markdown_table_cells_and_optional_w2_column():
    res = _rows()
    table = markdown_table(res)
    assert "| fbc-0.1 | 1.80x | 1.50-2.00 | 1.20-2.50 |" in table and "| 22.00 | 19.50 | 33.00 |" in table
    assert "W2" not in table
    res["methods"][1]["speedup_w2"] = 1.4
    table = markdown_table(res)
    assert "speedup W2 (replay)" in table and "| 1.40x |" in table and table.splitlines()[2].count("| - |") == 1
    assert "25%" in drift_line(res) and drift_line({**res, "drift_flagged": False}) is None


def test_pareto_has_one_panel_per_front_and_skips_rows_without_the_key(tmp_path):
    res = _rows()
    res["methods"].append({**res["methods"][1], "label": "pab-2", "method": "pab", "speedup_w2": 1.3})
    assert fronts_present(res) == list(KNOWN_FRONTS)
    drawn = plot_pareto(res, tmp_path / "p.png", fronts_present(res))
    assert drawn == {"W1 wall-clock": ["dense", "fbc-0.1", "pab-2"], "W2 replay": ["pab-2"]}
    assert (tmp_path / "p.png").stat().st_size > 0
    assert plot_pareto(res, tmp_path / "d.png") == {"W1 wall-clock": ["dense", "fbc-0.1", "pab-2"]}
    with pytest.raises(ConfigError, match="fronts"):
        plot_pareto(res, tmp_path / "e.png", [])


def test_quick_runs_every_peer_point(tmp_path, monkeypatch):
    """--quick (8 steps) with every peer's whole grid and Astraea's presets (resampled over normalised time)."""
    from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    from vdit_accel.methods.magcache_ratios import calibrate_mag_ratios

    model = tiny_model()
    ratios = calibrate_mag_ratios(Sampler(model), prompt_sets()["quick"][0], GenerationConfig(steps=8), write=False)
    monkeypatch.setattr("vdit_accel.methods.magcache_ratios.load_mag_ratios", lambda model_id: ratios)
    peers = "dense,pab,fbc,taylorseer,fastercache,magcache,astraea"
    res = run_bench(model, BenchConfig(methods=peers, quick=True), None, progress=False)
    assert res["settings"]["steps"] == 8 and res["settings"]["seeds"] == 1 and len(res["jobs"]) == 2
    n_astraea = len(operating_points("astraea"))
    assert len(res["methods"]) == 1 + 3 + 4 + 12 + 2 + 8 + n_astraea
    assert all(m["stats"]["kept_ratio"] < 1.0 for m in res["methods"] if m["method"] == "astraea")
    assert all(m["speedup"] > 0 and not math.isnan(m["temporal_psnr_mean"]) for m in res["methods"])


def test_a_w2_pass_rerenders_the_summary_without_videos(tiny_bench, tmp_path):
    import copy

    from vdit_accel.bench.report import write_summary

    res = copy.deepcopy(tiny_bench[0])
    for m in res["methods"]:
        m["speedup_w2"] = 1.0 if m["label"] == "dense" else 2.0
    write_summary(res, tmp_path)
    assert "speedup W2 (replay)" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["methods"][1]["speedup_w2"] == 2.0
    assert fronts_present(res) == list(KNOWN_FRONTS) and (tmp_path / "pareto.png").stat().st_size > 0


def test_w2_speedups_from_step_costs_and_latency_model(tmp_path):
    """speedup_w2: peers by replaying their recorded decisions, Astraea by the latency model, dense 1.0."""
    from vdit_accel.bench.replay import ComponentCosts
    from vdit_accel.registry import BenchEnv
    from vdit_accel.search.latency import LatencyModel

    costs = ComponentCosts(full_block_s=1.0, attn1_s=0.4, skipped_block_s=0.0, overhead_s=0.0, target_layers=30)
    (tmp_path / "step.json").write_text(json.dumps({"components": dataclasses.asdict(costs)}))
    model = tiny_model()
    point = operating_points("astraea")[0]
    kv = point.make_config(BenchEnv(None, 4, model.config.model_id)).kv_reuse
    lm = LatencyModel(costs={(1.0, 0): 1.0, (0.0, 0): 0.1, (0.0, 1): 0.1, (0.0, 2): 0.1}, kv_reuse=kv,
                      geometry={}, hardware={}, dense_step_s=1.0)
    lm.save(tmp_path / "lm.json")
    cfg = BenchConfig(methods=f"dense,fbc-0.3,pab-2,{point.label}", prompts="quick", seeds=1, steps=4,
                      step_costs=str(tmp_path / "step.json"), latency_model=str(tmp_path / "lm.json"))
    res = run_bench(model, cfg, None, progress=False)
    rows = {m["label"]: m for m in res["methods"]}
    assert rows["dense"]["speedup_w2"] == 1.0
    assert rows["pab-2"]["speedup_w2_source"] == "decision replay" and rows["pab-2"]["speedup_w2"] > 1.0
    assert rows["fbc-0.3"]["speedup_w2"] >= 1.0
    assert rows[point.label]["speedup_w2_source"] == "latency model" and rows[point.label]["speedup_w2"] > 1.0
    assert res["settings"]["w2"]["step_costs"]["full_block_s"] == 1.0
    with pytest.raises(ConfigError, match="step_costs"):
        run_bench(model, dataclasses.replace(cfg, step_costs=str(tmp_path / "missing.json")), None, progress=False)
