"""Joint (budget, forecast) schedules under a measured latency budget: allocators against brute force, the latency
constraint, the schedule <-> config round trip, the error table's resume, and a CLI smoke on the tiny model."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from vdit_accel.errors import ConfigError
from vdit_accel.search.joint import (
    FULL,
    SELECTION_PROMPTS,
    ErrorTable,
    JointCoding,
    choice_set,
    dp_schedule,
    greedy_schedule_joint,
    preset_name,
    table_calls,
    uniform_candidates,
    uniform_joint,
)
from vdit_accel.search.latency import LatencyModel, StepChoice

C00, C01, C50 = StepChoice(0.0, 0), StepChoice(0.0, 1), StepChoice(0.5, 0)


def _lm(costs: dict) -> LatencyModel:
    return LatencyModel(costs={(1.0, 0): 1.0, **costs}, kv_reuse=True, geometry={"grid": [2, 2, 2]},
                        hardware={"cpu": "test"}, dense_step_s=0.1)


LM3 = _lm({(0.0, 0): 0.05, (0.0, 1): 0.1, (0.5, 0): 0.55})
CS3 = (C00, C01, C50)  # cost-sorted under LM3


def _homogeneous_runs(sched) -> bool:
    runs = [list(g) for full, g in itertools.groupby(sched, key=lambda c: c == FULL) if not full]
    return all(len(set(r)) == 1 for r in runs)


def _brute(table: ErrorTable, lm: LatencyModel, target: float, homogeneous: bool = True):
    n, opts = table.num_steps, list(table.choices) + [FULL]
    best = (math.inf, None)
    for tail in itertools.product(opts, repeat=n - 1):
        s = [FULL, *tail]
        if lm.speedup(s) < target - 1e-9 or (homogeneous and not _homogeneous_runs(s)):
            continue
        e = table.estimate(s)
        if e < best[0]:
            best = (e, s)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [1.2, 1.6, 2.2, 2.6])
def test_dp_matches_brute_force(seed, target):
    rng = np.random.default_rng(seed)
    choices = CS3
    n = 6
    err = rng.uniform(0.0, 1.0, size=(n, len(choices), 4)) * np.array([3.0, 1.0, 0.3])[None, :, None]
    table = ErrorTable.from_arrays(choices, err, dense_steps=1)
    best_err, _ = _brute(table, LM3, target)
    sched = dp_schedule(table, LM3, target)
    assert len(sched) == n and sched[0] == FULL
    assert LM3.speedup(sched) >= target - 1e-9
    assert _homogeneous_runs(sched)
    assert table.estimate(sched) == pytest.approx(best_err, rel=1e-12, abs=1e-12)


def test_dp_respects_segment_bound_and_reports_infeasible():
    choices = CS3
    table = ErrorTable.from_arrays(choices, np.ones((8, len(choices), 3)), dense_steps=1)
    sched = dp_schedule(table, LM3, 2.0)
    runs = [len(list(g)) for full, g in itertools.groupby(sched, key=lambda c: c == FULL) if not full]
    assert max(runs) <= 2 and LM3.speedup(sched) >= 2.0
    with pytest.raises(ConfigError, match="no schedule meets"):
        dp_schedule(table, LM3, 4.5)  # reachable by the latency model, not with runs of <= 2 steps
    with pytest.raises(ConfigError, match="infeasible"):
        dp_schedule(table, LM3, 50.0)


def test_greedy_is_optimal_on_a_separable_single_choice_table():
    """One choice, errors that do not depend on the run's start: the best schedule skips the cheapest steps."""
    lm = _lm({(0.0, 0): 0.1})
    choices = (C00,)
    rng = np.random.default_rng(3)
    n = 7
    e = rng.uniform(0.1, 1.0, size=n)
    err = np.zeros((n, 1, n))
    for i in range(n):
        for ln in range(1, n):
            if i + ln < n:
                err[i, 0, ln] = e[i + ln]
    table = ErrorTable.from_arrays(choices, err, dense_steps=1)
    for target in (1.3, 1.8, 2.5):
        g = greedy_schedule_joint(table, lm, target)
        assert lm.speedup(g) >= target - 1e-9
        assert table.estimate(g) == pytest.approx(_brute(table, lm, target)[0])
        assert table.estimate(dp_schedule(table, lm, target)) == pytest.approx(table.estimate(g))


def test_greedy_feasible_and_not_better_than_dp_on_random_tables():
    rng = np.random.default_rng(5)
    choices = CS3
    for _ in range(5):
        table = ErrorTable.from_arrays(choices, rng.uniform(0, 1, size=(6, len(choices), 4)), dense_steps=1)
        g = greedy_schedule_joint(table, LM3, 1.8)
        assert LM3.speedup(g) >= 1.8 - 1e-9
        if _homogeneous_runs(g):
            assert table.estimate(dp_schedule(table, LM3, 1.8)) <= table.estimate(g) + 1e-12


def test_uniform_picks_the_costliest_feasible_choice_per_order():
    lm = _lm({(0.2, 0): 0.25, (0.4, 0): 0.45, (0.4, 1): 0.47, (0.2, 1): 0.27})
    choices = choice_set(lm, budgets=(0.2, 0.4, 1.0), orders=(0, 1))
    only = uniform_candidates(choices, lm, 10, 1, 2.0)  # 9 steps in <= 4 dense steps: 0.444 each
    assert only == [[FULL] + [StepChoice(0.2, 1)] * 9, [FULL] + [StepChoice(0.2, 0)] * 9]  # costliest first
    two = uniform_candidates(choices, lm, 10, 1, 1.8)
    assert [s[1] for s in two] == [StepChoice(0.4, 1), StepChoice(0.4, 0)]  # costliest first
    assert uniform_joint(choices, lm, 10, 1, 1.8)[1] == StepChoice(0.4, 1)
    picked = uniform_joint(choices, lm, 10, 1, 1.8, fitness=lambda s: float(s[1].order == 1))
    assert picked[1] == StepChoice(0.4, 0)
    assert all(lm.speedup(s) >= 1.8 for s in two)


def test_choice_set_is_cost_sorted_and_only_costable():
    lm = _lm({(0.0, 0): 0.05, (0.5, 0): 0.5, (0.0, 2): 0.08, (0.5, 2): 0.56})
    cs = choice_set(lm)
    assert cs[-1] == FULL and all(c.order in (0, 2) for c in cs)
    assert [lm.cost(c) for c in cs] == sorted(lm.cost(c) for c in cs)
    assert StepChoice(1.0, 2) == FULL and len(cs) == len({c for c in cs})
    assert len(choice_set()) == 8 * 3 + 1  # the default grid: budget 1 only with order 0


def test_joint_coding_repair_meets_the_latency_budget():
    cs = (*CS3, FULL)
    coding = JointCoding(cs, LM3, 12, 2, 2.5, tolerance=0.05)
    rng = np.random.default_rng(0)
    for trial in range(100):
        g = coding.repair(rng.uniform(0, 1, size=12), np.random.default_rng(trial))
        sched = coding.decode(g)
        assert sched[:2] == [FULL, FULL]
        assert LM3.speedup(sched) >= 2.5 - 1e-9
        assert LM3.total(sched) >= coding.lo - 1e-9 or all(c == FULL for c in sched[2:]) is False
        assert coding.decode(coding.encode(sched)) == sched
        assert np.array_equal(coding.repair(g, rng), g)  # already in band: unchanged


def test_joint_evolution_feasible_and_resume_checks_identity(tmp_path):
    from vdit_accel.search.evolution import evolve

    cs = (*CS3, FULL)
    coding = JointCoding(cs, LM3, 10, 1, 2.0)
    cfg = coding.evolution_config(population=6, children=4, generations=4, seed=3)
    good = np.array([1.0] + [0.3] * 9)
    res = evolve(lambda g: ((g - good) ** 2).sum(axis=1), cfg, progress=False, repair_fn=coding.repair,
                 checkpoint=tmp_path / "ck.json", identity={"target_speedup": 2.0})
    assert LM3.speedup(coding.decode(np.asarray(res.best_genome))) >= 2.0 - 1e-9
    again = evolve(lambda g: ((g - good) ** 2).sum(axis=1), cfg, progress=False, repair_fn=coding.repair,
                   checkpoint=tmp_path / "ck.json", identity={"target_speedup": 2.0})
    assert again.best_genome == res.best_genome
    with pytest.raises(ConfigError, match="another search problem"):
        evolve(lambda g: g.sum(axis=1), cfg, progress=False, repair_fn=coding.repair,
               checkpoint=tmp_path / "ck.json", identity={"target_speedup": 3.0})


def test_names_and_selection_prompts_are_held_apart():
    from vdit_accel.bench.harness import CALIBRATION_PROMPTS, prompt_sets
    from vdit_accel.instrument.captions import parse_caption

    assert preset_name(3) == "astraea-3x" and preset_name(2.5) == "astraea-2.5x"
    held = set(prompt_sets()["heldout"])
    for p in SELECTION_PROMPTS:
        parse_caption(p)
        assert p not in held and p not in CALIBRATION_PROMPTS
    # dense pass 4; rows i = 0, 1, 2 of (C00, C01): calls i - order .. min(4, i + 3) - 1
    assert table_calls(4, 1, [C00, C01], 3, 1) == 4 + (3 + 3) + (3 + 4) + (2 + 3)


# ------------------------------------------------------------------------------------------- on the tiny model
@pytest.fixture(scope="module")
def sampler():
    from vdit_accel.instrument.sampler import Sampler
    from vdit_accel.testing import tiny_model

    return Sampler(tiny_model())


def _meter(sampler, workdir, choices=(C00, StepChoice(0.99, 0), C01)):
    from vdit_accel.bench.harness import CALIBRATION_PROMPTS
    from vdit_accel.instrument.sampler import GenerationConfig
    from vdit_accel.methods.astraea import AstraeaConfig
    from vdit_accel.search.joint import SegmentErrorMeter

    gen = GenerationConfig(steps=5, guidance=1.0)
    return SegmentErrorMeter(sampler, list(CALIBRATION_PROMPTS[:2]), gen, AstraeaConfig(num_steps=5), choices,
                             max_segment=3, workdir=workdir)


def test_schedule_config_round_trip():
    from vdit_accel.methods.astraea import AstraeaConfig
    from vdit_accel.search.joint import config_to_schedule, schedule_to_config

    sched = [FULL, StepChoice(0.0, 2), StepChoice(0.3, 1), FULL, StepChoice(0.5, 0), StepChoice(0.0, 0)]
    cfg = schedule_to_config(sched, AstraeaConfig(num_steps=50, dense_steps=1))
    assert cfg.num_steps == 6 and config_to_schedule(cfg) == sched
    assert AstraeaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_error_table_oracle_and_resume_after_kill(sampler, tmp_path):
    class Kill(Exception):
        pass

    full = _meter(sampler, tmp_path / "a").measure()
    # all 8 tokens computed (0.99 -> 8 of 8): no error; whole-step reuse: some error
    assert np.nanmax(full.step_err[:, 1]) < 1e-10 and np.nanmin(full.step_err[:, 0, 1:]) > 1e-8
    assert np.isfinite(full.step_err[:4, :, 1]).all() and np.isnan(full.step_err[4]).all()

    def stop(done):
        if done == 4:
            raise Kill

    m = _meter(sampler, tmp_path / "b")
    with pytest.raises(Kill):
        m.measure(on_row=stop)
    first_calls = m.counter.calls
    assert len(json.loads((tmp_path / "b" / "table.json").read_text())["rows"]) == 4
    (tmp_path / "b" / "table.json.tmp").write_text('{"format": "trunc')  # a write cut by the kill: ignored
    m2 = _meter(sampler, tmp_path / "b")
    resumed = m2.measure()
    np.testing.assert_array_equal(np.nan_to_num(resumed.step_err, nan=-1), np.nan_to_num(full.step_err, nan=-1))
    m3 = _meter(sampler, tmp_path / "c")
    m3.measure()
    assert m2.counter.calls < m3.counter.calls and first_calls + m2.counter.calls > m3.counter.calls
    with pytest.raises(ConfigError, match="another model, prompt set"):
        _meter(sampler, tmp_path / "b", choices=(C00,)).measure()


def test_cli_joint_search_smoke(tmp_path, capsys):
    from vdit_accel.cli import main
    from vdit_accel.search.presets import read_preset
    from vdit_accel.testing import tiny_model

    weights = tmp_path / "w"
    tiny_model().save(weights)
    lm = _lm({(0.0, 0): 0.05, (0.0, 1): 0.07, (0.0, 2): 0.09, (0.5, 0): 0.55, (0.5, 1): 0.57, (0.5, 2): 0.59})
    lm.save(tmp_path / "lm.json")
    out = tmp_path / "astraea-1.5x.json"
    args = ["search", "astraea", "--target-speedup", "1.5", "--latency-model", str(tmp_path / "lm.json"),
            "--allocator", "all", "--steps", "4", "--max-segment", "3", "--proxy-geometry", "model",
            "--population", "4", "--children", "2", "--weights", str(weights),  # evolution: equal cost
            "--checkpoint", str(tmp_path / "ck"), "--out", str(out), "--quiet"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    print(json.dumps(summary))
    data = read_preset(out)
    rec = data["record"]["search"]
    assert data["method"] == "astraea" and len(data["config"]["budgets"]) == 4
    assert len(data["config"]["forecast"]) == 4
    assert rec["allocator"] in rec["candidates"] and set(rec["candidates"]) == {"dp", "greedy", "uniform", "evolution"}
    assert all(c["predicted_speedup"] >= 1.5 - 1e-9 for c in rec["candidates"].values())
    assert data["record"]["latency_hardware"] == {"cpu": "test"} and summary["allocator"] == rec["allocator"]
    assert rec["candidates"]["dp"]["calibration_cost"]["transformer_calls"] > 0
    import vdit_accel

    bad = [a if a != str(out) else str(__import__("pathlib").Path(vdit_accel.__file__).parent / "presets" / "x.json")
           for a in args]
    assert main(bad) != 0
    assert main(args[:4] + ["--weights", str(weights), "--out", str(out)]) != 0  # no --latency-model
    assert main(["search", "astraea", "--target", "0.5", "--target-speedup", "2"]) != 0  # one mode at a time
