"""Final-video refinement (search/refine.py): schedule keys, seeds (TaylorSeer's cadence reproduced exactly by
Astraea's whole-step forecast), moves that keep the computed-step count, the local search against a known optimum,
the checkpointed objective (replay without compute, identity, corruption) and a CLI smoke on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from vdit_accel.errors import ConfigError, WeightsError
from vdit_accel.search.latency import LatencyModel, StepChoice
from vdit_accel.search.refine import (
    FULL,
    cadence_seeds,
    gaps,
    max_full_steps,
    neighbours,
    parse_key,
    refine_schedule,
    schedule_key,
    spread_schedule,
    taylorseer_cadence,
)


def _lm() -> LatencyModel:
    costs = {(1.0, 0): 1.0, (0.0, 0): 0.01, (0.0, 1): 0.011, (0.0, 2): 0.012, (0.5, 0): 0.55}
    return LatencyModel(costs=costs, kv_reuse=True, geometry={"grid": [2, 2, 2]}, hardware={"cpu": "test"},
                        dense_step_s=0.1)


def _n_full(s) -> int:
    return sum(c.budget >= 1.0 for c in s)


def test_keys_round_trip_and_reject_garbage():
    s = [FULL, StepChoice(0.0, 2), StepChoice(0.25, 1), FULL, StepChoice(0.0, 0)]
    assert schedule_key(s) == "F2[0.25:1]F0" and parse_key(schedule_key(s)) == s
    for bad in ("FX", "F[0.5]", "F[2.0:1]", "F3"):
        with pytest.raises(ConfigError):
            parse_key(bad)


@pytest.mark.parametrize("steps,n,w", [(50, 12, 3), (50, 14, 4), (20, 20, 1), (10, 3, 3), (30, 9, 1)])
@pytest.mark.parametrize("gamma", [0.8, 1.0, 1.25])
def test_spread_schedule_counts(steps, n, w, gamma):
    s = spread_schedule(steps, n, w, order=1, gamma=gamma)
    assert len(s) == steps and _n_full(s) == n
    assert all(c == FULL for c in s[:w])
    assert all(c == StepChoice(0.0, 1) for c in s if c != FULL)


def test_spread_schedule_rejects_bad_counts():
    for kw in (dict(n_full=0, warmup=1), dict(n_full=3, warmup=4), dict(n_full=60, warmup=3)):
        with pytest.raises(ConfigError):
            spread_schedule(50, order=1, **kw)
    with pytest.raises(ConfigError, match="order=3"):
        spread_schedule(50, 10, 3, order=3)
    with pytest.raises(ConfigError, match="gamma"):
        spread_schedule(50, 10, 3, order=1, gamma=float("nan"))


def test_taylorseer_cadence_is_diffusers_rule():
    s = taylorseer_cadence(50, 4)
    computed = [k for k, c in enumerate(s) if c == FULL]
    assert computed == [0, 1, 2] + list(range(4, 50, 4))
    with pytest.raises(ConfigError, match="interval"):
        taylorseer_cadence(50, 0)


def test_neighbours_keep_the_computed_count_and_the_leading_steps():
    s = spread_schedule(20, 6, 2, order=1)
    moves = list(neighbours(s, dense_steps=2))
    assert any(w.startswith("shift") for w, _ in moves) and any(w.startswith("order") for w, _ in moves)
    for what, m in moves:
        assert len(m) == 20 and _n_full(m) == 6 and m[:2] == [FULL, FULL], what
        if what.startswith("order"):
            a, b = (int(x) for x in what.split()[1].split("=")[0].split(":"))
            assert m[:a] == s[:a] and m[b:] == s[b:] and len({c.order for c in m[a:b]}) == 1
    assert gaps([FULL, StepChoice(0.0), StepChoice(0.0), FULL, StepChoice(0.0)]) == [(1, 3), (4, 5)]


def test_max_full_steps_and_seeds_meet_the_target():
    lm = _lm()
    n = max_full_steps(lm, 50, 3, 1, 4.0)
    assert lm.speedup(spread_schedule(50, n, 3, 1)) >= 4.0 > lm.speedup(spread_schedule(50, n + 1, 3, 1))
    seeds = cadence_seeds(lm, 50, 4.0)
    assert seeds and all(lm.speedup(s) >= 4.0 for s in seeds.values())
    assert any(k.startswith("taylorseer-i") for k in seeds) and any(k.startswith("spread-") for k in seeds)
    with pytest.raises(ConfigError, match="out of reach"):
        max_full_steps(lm, 10, 3, 1, 9.0)


def test_refine_climbs_to_a_known_optimum_within_budget_and_target():
    lm = _lm()
    steps, target = 24, 2.8
    goal = spread_schedule(steps, 8, 2, order=2, gamma=1.4)  # the objective's unique optimum
    assert lm.speedup(goal) >= target
    goal_full = [k for k, c in enumerate(goal) if c == FULL]

    def objective(s):
        full = [k for k, c in enumerate(s) if c == FULL]
        return -sum(abs(a - b) for a, b in zip(full, goal_full)) - 0.1 * sum(c.order != 2 for c in s if c != FULL)

    seeds = {"even": spread_schedule(steps, 8, 2, order=1)}
    best, rec = refine_schedule(objective, lm, target, seeds, dense_steps=2, max_evals=2000, seed=0)
    assert best == goal and rec["converged"] and rec["accepted"]
    again, rec2 = refine_schedule(objective, lm, target, seeds, dense_steps=2, max_evals=2000, seed=0)
    assert again == best and rec2["accepted"] == rec["accepted"]  # deterministic for a seed
    short, rec3 = refine_schedule(objective, lm, target, seeds, dense_steps=2, max_evals=3, seed=0)
    assert lm.speedup(short) >= target and not rec3["converged"] or len(rec3["accepted"]) <= 2
    with pytest.raises(ConfigError, match="no seed schedule reaches"):
        refine_schedule(objective, lm, 30.0, seeds)
    with pytest.raises(ConfigError, match="max_evals"):
        refine_schedule(objective, lm, target, seeds, max_evals=0)


# ------------------------------------------------------------------------------------------- on the tiny model
@pytest.fixture(scope="module")
def sampler():
    from vdit_accel.instrument.sampler import Sampler
    from vdit_accel.testing import tiny_model

    return Sampler(tiny_model())


def test_astraea_cadence_reproduces_diffusers_taylorseer_exactly(sampler):
    """The seed a refinement starts from is TaylorSeer itself: same cadence, same first-order forecast, same output."""
    from diffusers import TaylorSeerCacheConfig

    from vdit_accel.instrument.sampler import GenerationConfig
    from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
    from vdit_accel.methods.peers import TAYLORSEER_WAN_BLOCKS
    from vdit_accel.search.joint import schedule_to_config
    from vdit_accel.testing import TINY_PROMPT

    gen = GenerationConfig(steps=12, guidance=2.0)
    tr = sampler.model.transformer
    dense = sampler(TINY_PROMPT, gen, progress=False)
    tr.enable_cache(TaylorSeerCacheConfig(cache_interval=3, max_order=1, disable_cache_before_step=3,
                                          taylor_factors_dtype=torch.float32, cache_identifiers=TAYLORSEER_WAN_BLOCKS))
    try:
        peer = sampler(TINY_PROMPT, gen, progress=False)
    finally:
        tr.disable_cache()
    cfg = schedule_to_config(taylorseer_cadence(12, 3), AstraeaConfig(num_steps=12, dense_steps=1))
    handle = apply_astraea(tr, cfg)
    try:
        ours = sampler(TINY_PROMPT, gen, progress=False)
    finally:
        handle.remove()
    assert not torch.equal(peer, dense)  # the cadence really reuses
    torch.testing.assert_close(ours, peer, rtol=0, atol=1e-6)


def _objective(sampler, workdir, prompts=None):
    from vdit_accel.bench.harness import CALIBRATION_PROMPTS
    from vdit_accel.instrument.sampler import GenerationConfig
    from vdit_accel.methods.astraea import AstraeaConfig
    from vdit_accel.search.refine import FinalVideoObjective

    gen = GenerationConfig(steps=6, guidance=2.0)
    return FinalVideoObjective(sampler, list(prompts or CALIBRATION_PROMPTS[:2]), gen,
                               AstraeaConfig(num_steps=6, dense_steps=1), workdir=workdir)


def test_objective_checkpoint_replays_and_checks_identity(sampler, tmp_path):
    from vdit_accel.bench.harness import CALIBRATION_PROMPTS

    s = spread_schedule(6, 3, 1, order=1)
    obj = _objective(sampler, tmp_path)
    ps = obj.psnr(s)
    assert len(ps) == 2 and obj.evaluations == 1 and all(10 < p < 200 for p in ps)
    assert obj.psnr([FULL] * 6)[0] > 150  # every step computed: identical to dense (finite by the mse floor)
    calls = []
    hook = sampler.model.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = _objective(sampler, tmp_path)
        assert again.psnr(s) == ps and again.evaluations == 0 and not calls  # replayed, no forward
        again.psnr(spread_schedule(6, 4, 1, order=0))  # a new schedule: its own generation only, dense from disk
        assert len(calls) == 6 * 2  # 6 steps x 2 CFG branches
    finally:
        hook.remove()
    with pytest.raises(ConfigError, match="other settings"):
        _objective(sampler, tmp_path, prompts=CALIBRATION_PROMPTS[1:3])
    (tmp_path / "dense.safetensors").write_bytes(b"cut short")  # a corrupt reference is regenerated, not used
    fresh = _objective(sampler, tmp_path)
    fresh.psnr(spread_schedule(6, 2, 1, order=1))
    assert fresh.evaluations == 1 and (tmp_path / "dense.safetensors").stat().st_size > 100
    (tmp_path / "evals.json").write_text('{"format": "vdit-acc')
    with pytest.raises(WeightsError, match="corrupt"):
        _objective(sampler, tmp_path)


def test_cli_refine_smoke(tmp_path, capsys):
    from vdit_accel.cli import main
    from vdit_accel.search.presets import load_preset, read_preset
    from vdit_accel.testing import tiny_model

    weights = tmp_path / "w"
    tiny_model().save(weights)
    lm = _lm()
    lm.save(tmp_path / "lm.json")
    out = tmp_path / "astraea-2x.json"
    args = ["search", "astraea", "--target-speedup", "2", "--latency-model", str(tmp_path / "lm.json"),
            "--allocator", "refine", "--steps", "8", "--max-evals", "3", "--weights", str(weights),
            "--checkpoint", str(tmp_path / "ck"), "--out", str(out), "--quiet"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    data = read_preset(out)
    rec = data["record"]["search"]
    assert data["record"]["allocator"] == "refine" and summary["schedule"] == rec["schedule"]
    assert rec["predicted_speedup"] >= 2.0 and {"refined", f"seed:{rec['start']}"} <= set(rec["selection"])
    assert rec["chosen"] in rec["selection"] and rec["selection"][rec["chosen"]]["key"] == rec["schedule"]
    assert rec["selection"][rec["chosen"]]["score_8_prompts"] == max(v["score_8_prompts"]
                                                                      for v in rec["selection"].values())
    assert rec["evaluations_this_run"] >= 1 and rec["evaluations_total"] == rec["evaluations_this_run"]
    cfg = load_preset(out)
    assert _n_full([StepChoice(b) for b in cfg.budgets]) == _n_full(parse_key(rec["schedule"]))
    before = out.read_bytes()
    assert main(args) == 2 and out.read_bytes() == before  # an existing --out is never replaced silently
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    # rerun: every evaluation replayed from the checkpoint, same schedule
    assert main(args[:-3] + ["--out", str(tmp_path / "again.json"), "--quiet"]) == 0
    rec2 = read_preset(tmp_path / "again.json")["record"]["search"]
    assert rec2["schedule"] == rec["schedule"] and rec2["key_refined"] == rec["key_refined"]
    assert rec2["evaluations_this_run"] == 0
