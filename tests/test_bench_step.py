"""bench-step: settings, composition arithmetic, the CLI smoke run (--tiny), refusal without --out, latency model."""

import json

import pytest

from vdit_accel.bench.flops import Setting
from vdit_accel.bench.step import StepBenchConfig, compose, latency_settings, rotated, unsupported
from vdit_accel.cli import main
from vdit_accel.errors import ConfigError
from vdit_accel.search.latency import LatencyModel, StepChoice


def test_compose_keeps_the_last_block_apart():
    assert compose([2.0, 3.0], 1.0, 30) == 1.0 + 29 * 2.0 + 3.0
    assert compose([2.0, 4.0, 3.0], 1.0, 10) == 1.0 + 9 * 3.0 + 3.0
    assert compose([2.0], 1.0, 30) == 61.0


def test_default_settings_and_geometry():
    cfg = StepBenchConfig()
    assert cfg.grid == (4, 24, 40) and cfg.tokens == 3840 and cfg.model_kwargs["num_layers"] == 2
    labels = [s.label for s in cfg.settings()]
    assert labels == ["dense", "astraea-b0.20", "astraea-b0.20-kv", "astraea-b0.40", "astraea-b0.40-kv",
                      "astraea-b0.60", "astraea-b0.60-kv", "forecast-o0", "forecast-o1", "forecast-o2"]
    full = StepBenchConfig(full=True).effective()
    assert (full.grid, full.tokens, full.layers, full.dtype) == ((21, 30, 52), 32760, 30, "bfloat16")
    m = full.model_kwargs
    assert (m["num_attention_heads"], m["attention_head_dim"], m["ffn_dim"], m["text_dim"]) == (12, 128, 8960, 4096)
    grid = latency_settings(kv_reuse=True)
    assert len(grid) == 1 + 10 + 2 * 2 and grid[0] == Setting() and Setting(0.5, True, 2) in grid
    assert Setting(0.9, True, 0) in grid and Setting(0.9, True, 2) not in grid
    with pytest.raises(ConfigError, match="kv_reuse"):
        StepBenchConfig(kv_reuse="maybe")


def _run(tmp_path, *extra):
    return main(["bench-step", "--tiny", "--repeats", "1", "--warmup", "0", "--budgets", "0.5", "--orders", "0",
                 "--quiet", *extra])


def test_cli_refuses_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run(tmp_path) == 2
    assert "--out" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_cli_tiny_smoke_writes_json_markdown_and_latency_model(tmp_path):
    lm_path = tmp_path / "lm" / "latency.json"
    assert _run(tmp_path, "--out", str(tmp_path / "res"), "--kv-reuse", "off") == 0
    res = json.loads((tmp_path / "res" / "bench-step.json").read_text())
    assert res["format"] == "vdit-accel/bench-step" and res["command"].startswith("vdit-accel bench-step --out ")
    assert " --tiny" in res["command"] and " --repeats 1 " in res["command"]
    assert {"machine", "versions", "geometry", "composition", "components", "settings"} <= set(res)
    rows = {r["label"]: r for r in res["settings"]}
    assert list(rows) == ["dense", "astraea-b0.50", "forecast-o0"]
    for r in rows.values():
        assert r["step_composed_s"] == pytest.approx(compose(r["blocks_s"], r["overhead_s"], 30))
        assert r["step_measured_s"] == pytest.approx(sum(r["blocks_s"]) + r["overhead_s"], rel=0.5)
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flop_ceiling"])
        dense_s = rows["dense"]["step_composed_samples_s"]
        assert r["speedup_paired_samples"] == pytest.approx([d / t for d, t in zip(dense_s,
                                                                                   r["step_composed_samples_s"])])
        assert r["efficiency_paired"] == pytest.approx(r["speedup_paired"] / r["flop_ceiling"])
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["speedup_paired"] == 1.0
    assert rows["dense"]["flop_ceiling"] == 1.0
    assert rows["astraea-b0.50"]["rows"] == 16 and rows["astraea-b0.50"]["flop_ceiling"] > 1.0
    assert rows["forecast-o0"]["attention_share"] is None and rows["dense"]["attention_share"] > 0
    assert "| astraea-b0.50 | 16 |" in (tmp_path / "res" / "bench-step.md").read_text()

    assert _run(tmp_path, "--out", str(tmp_path / "res2"), "--latency-model", str(lm_path)) == 0
    lm = LatencyModel.load(lm_path)
    assert lm.costs[(1.0, 0)] == 1.0 and lm.kv_reuse is False and lm.geometry["tokens"] == 32
    assert {(b, 0) for b in (0.0, 0.1, 0.5, 0.9)} <= set(lm.costs)
    assert lm.cost(StepChoice(0.0, 0)) < 1.0  # a step computing no block is cheaper than dense
    measured_orders = set(lm.orders())
    assert measured_orders == ({0, 1, 2} if unsupported(Setting(0.0, order=1)) is None else {0})


def test_timed_steps_average_several_steps_into_one_sample(tmp_path, monkeypatch):
    from vdit_accel.bench.step import StepBench

    calls = []
    original = StepBench._call

    def counting(self, i, steps):
        calls.append((i, steps))
        return original(self, i, steps)

    monkeypatch.setattr(StepBench, "_call", counting)
    assert _run(tmp_path, "--out", str(tmp_path / "res"), "--kv-reuse", "off", "--timed-steps", "3") == 0
    res = json.loads((tmp_path / "res" / "bench-step.json").read_text())
    assert " --timed-steps 3" in res["command"] and res["config"]["timed_steps"] == 3
    dense_runs = [c for c in calls if c[1] == 3]  # dense: no fill, --warmup 0, 3 timed steps -> 3-step runs
    assert dense_runs and {i for i, _ in dense_runs} == {0, 1, 2}
    for r in res["settings"]:  # the sample is the per-step mean: the parts still add up to the step
        assert r["step_measured_s"] == pytest.approx(sum(r["blocks_s"]) + r["overhead_s"], rel=0.5)
    with pytest.raises(ConfigError, match="timed_steps"):
        StepBenchConfig(timed_steps=0)


def test_rotated_order():
    settings = ["dense", "a", "b"]
    orders = [rotated(settings, r) for r in range(3)]
    assert [o[0] for o in orders] == settings  # each setting runs first once in three repeats
    assert all(sorted(o) == sorted(settings) for o in orders)


def test_config_fields_are_documented_and_are_cli_flags_with_the_same_defaults():
    import dataclasses

    from vdit_accel.cli import build_parser

    parser = build_parser()._subparsers._group_actions[0].choices["bench-step"]
    defaults = {a.dest: a.default for a in parser._actions}
    args = StepBenchConfig.__doc__.split("Args:", 1)[1]
    for f in dataclasses.fields(StepBenchConfig):
        assert f"{f.name} (`" in args, f"{f.name} is not documented"
        value = f.default
        cli = defaults[f.name]
        assert (list(value) if isinstance(value, tuple) else value) == cli, f.name
    assert all(a.help for a in parser._actions), "every bench-step flag has a help text"
