"""Evolutionary budget search: repair invariant, toy-fitness improvement, determinism, exact resume, baselines."""

from __future__ import annotations

import dataclasses
import doctest
import itertools
import json
import re

import numpy as np
import pytest
import torch

from vdit_accel.errors import ConfigError
from vdit_accel.search import evolution as evolution_mod
from vdit_accel.search.evolution import (
    CHECKPOINT_FORMAT,
    EvolutionConfig,
    SearchResult,
    block_crossover,
    evolve,
    greedy_schedule,
    mutate,
    mutation_probability,
    repair,
    uniform_crossover,
    uniform_schedule,
)

SLACK = 1e-9


def _in_band(genome: np.ndarray, cfg: EvolutionConfig) -> bool:
    lo, hi = cfg.band
    return lo - SLACK <= float(np.mean(genome)) <= hi + SLACK


def _on_grid(genome: np.ndarray, cfg: EvolutionConfig) -> bool:
    rest = genome[cfg.dense_steps :]
    return bool(np.all(genome[: cfg.dense_steps] == 1.0) and np.isin(rest, np.asarray(cfg.grid)).all())


class _Toy:
    """Separable fitness: weighted squared distance to a known in-band optimum; counts every evaluated genome."""

    def __init__(self, cfg: EvolutionConfig, seed: int = 0):
        rng = np.random.default_rng(100 + seed)
        self.opt = repair(np.linspace(1.0, 0.0, cfg.num_steps) ** 2 + 0.3, cfg, rng)  # front-loaded, in band
        self.w = rng.uniform(0.5, 2.0, size=cfg.num_steps)
        self.seen: list[bytes] = []

    def value(self, g: np.ndarray) -> np.ndarray:
        return (self.w * (np.atleast_2d(g) - self.opt) ** 2).sum(axis=1)

    def __call__(self, genomes: np.ndarray) -> np.ndarray:
        self.seen.extend(g.tobytes() for g in genomes)
        return self.value(genomes)


SMALL = {"population": 12, "children": 8, "generations": 30}
CONFIGS = [
    EvolutionConfig(target=0.4, num_steps=20, **SMALL),
    EvolutionConfig(target=0.25, num_steps=16, dense_steps=3, tolerance=0.05, **SMALL),
    EvolutionConfig(target=0.5, num_steps=12, dense_steps=0, tolerance=0.0, grid=(0.0, 0.25, 0.5, 0.75, 1.0), **SMALL),
    EvolutionConfig(target=0.6, num_steps=25, dense_steps=2, grid=(0.0, 0.3, 0.5, 1.0), tolerance=0.2, **SMALL),
    EvolutionConfig(target=0.05, num_steps=50, dense_steps=1),
]


# ---------------------------------------------------------------------------------------------------- repair
@pytest.mark.parametrize("cfg", CONFIGS)
def test_repair_keeps_every_candidate_in_band(cfg):
    rng = np.random.default_rng(7)
    for trial in range(150):
        genome = rng.uniform(-0.5, 1.5, size=cfg.num_steps) if trial % 3 else rng.choice(cfg.grid, cfg.num_steps)
        fixed = repair(genome, cfg, np.random.default_rng(trial))
        assert fixed.shape == (cfg.num_steps,) and _in_band(fixed, cfg) and _on_grid(fixed, cfg)
        assert np.array_equal(fixed, repair(genome, cfg, np.random.default_rng(trial)))  # deterministic given rng
        assert np.array_equal(repair(fixed, cfg, rng), fixed)  # already in band: unchanged


def test_repair_moves_one_notch_at_a_time_toward_band():
    cfg = EvolutionConfig(target=0.2, num_steps=5, dense_steps=0, tolerance=0.0)  # band = sum exactly 1.0
    fixed = repair(np.full(5, 0.4), cfg, np.random.default_rng(0))  # sum 2.0: ten notches down
    assert np.isclose(fixed.sum(), 1.0) and np.all(fixed <= 0.4) and _on_grid(fixed, cfg)


def test_repair_rejects_bad_genomes():
    cfg = CONFIGS[0]
    with pytest.raises(ConfigError, match=r"genome of shape \(3,\) is not accepted: expected 20 finite values"):
        repair(np.zeros(3), cfg, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="finite"):
        repair(np.full(20, np.nan), cfg, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------- operators
def test_crossovers_take_genes_from_parents():
    rng = np.random.default_rng(0)
    a, b = np.zeros(10), np.ones(10)
    for _ in range(50):
        child = uniform_crossover(a, b, rng)
        assert np.isin(child, [0.0, 1.0]).all()
        child = block_crossover(a, b, rng)
        taken = np.flatnonzero(child == 1.0)
        assert taken.size >= 1 and np.array_equal(taken, np.arange(taken[0], taken[-1] + 1))  # one contiguous block


def test_mutation_rate_and_dense_genes():
    cfg = EvolutionConfig(target=0.5, num_steps=400, dense_steps=4)
    genome = np.concatenate([np.ones(4), np.full(396, 0.5)])
    out = mutate(genome, 0.25, cfg, np.random.default_rng(0))
    assert np.all(out[:4] == 1.0) and _on_grid(out, cfg)
    assert 0.18 < np.mean(out[4:] != 0.5) < 0.32  # every hit changes the gene (drawn among the *other* values)
    assert np.array_equal(mutate(genome, 0.0, cfg, np.random.default_rng(0)), genome)
    assert np.all(mutate(genome, 1.0, cfg, np.random.default_rng(0))[4:] != 0.5)


def test_mutation_probability_decays_geometrically():
    cfg = EvolutionConfig(target=0.5, num_steps=10, generations=30)
    p = np.array([mutation_probability(g, cfg) for g in range(1, 31)])
    assert np.isclose(p[0], 0.1) and np.isclose(p[-1], 0.01)
    assert np.allclose(p[1:] / p[:-1], 0.1 ** (1 / 29))  # constant ratio
    lin = EvolutionConfig(target=0.5, num_steps=10, generations=3, p_mutation_end=0.0)
    assert [mutation_probability(g, lin) for g in (1, 2, 3)] == [0.1, 0.05, 0.0]
    assert mutation_probability(1, EvolutionConfig(target=0.5, num_steps=10, generations=1)) == 0.1


# ---------------------------------------------------------------------------------------------------- evolve
@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_evolve_improves_on_uniform_and_is_deterministic(cfg):
    toy = _Toy(cfg)
    result = evolve(toy, cfg, progress=False)
    uniform = uniform_schedule(cfg)
    assert _in_band(uniform, cfg) and _in_band(np.array(result.best_genome), cfg)
    assert result.best_fitness < 0.5 * toy.value(uniform)[0]
    assert np.isclose(result.best_fitness, toy.value(np.array(result.best_genome))[0])
    # History: generation 0..G, best never worsens, evaluations cumulative and equal to distinct fitness calls.
    assert [h["generation"] for h in result.history] == list(range(cfg.generations + 1))
    bests = [h["best"] for h in result.history]
    assert all(b1 <= b0 for b0, b1 in zip(bests, bests[1:]))
    assert len(toy.seen) == len(set(toy.seen)) == result.evaluations == result.history[-1]["evaluations"]
    again = evolve(_Toy(cfg), cfg, progress=False)
    assert again == result
    other = evolve(_Toy(cfg), EvolutionConfig(**{**cfg.to_dict(), "seed": 1}), progress=False)
    assert other.history != result.history


def test_evolve_resume_after_interruption_is_identical(tmp_path):
    cfg = EvolutionConfig(target=0.35, num_steps=18, dense_steps=2, population=10, children=7, generations=6, seed=3)
    reference = evolve(_Toy(cfg), cfg, progress=False)

    path = tmp_path / "ckpt" / "search.json"

    def stop_at_2(record):
        if record["generation"] == 2:
            raise KeyboardInterrupt

    first = _Toy(cfg)
    with pytest.raises(KeyboardInterrupt):
        evolve(first, cfg, checkpoint=path, progress=False, on_generation=stop_at_2)
    state = json.loads(path.read_text())
    assert state["format"] == CHECKPOINT_FORMAT and state["generation"] == 2
    assert not path.with_suffix(".json.tmp").exists()

    second, seen = _Toy(cfg), []
    resumed = evolve(second, cfg, checkpoint=path, progress=False, on_generation=seen.append)
    assert resumed == reference
    assert [r["generation"] for r in seen] == [3, 4, 5, 6]
    assert not set(first.seen) & set(second.seen)  # the checkpointed cache is reused, nothing re-evaluated
    assert len(first.seen) + len(second.seen) == reference.evaluations
    # A finished checkpoint returns the result without any fitness call.
    third = _Toy(cfg)
    assert evolve(third, cfg, checkpoint=path, progress=False) == reference and not third.seen


def test_resume_with_another_config_raises(tmp_path):
    cfg = EvolutionConfig(target=0.4, num_steps=10, population=4, children=2, generations=1)
    path = tmp_path / "s.json"
    evolve(_Toy(cfg), cfg, checkpoint=path, progress=False)
    other = EvolutionConfig(**{**cfg.to_dict(), "generations": 2})
    with pytest.raises(ConfigError, match=r"another config \(generations=1 there, 2 here\)"):
        evolve(_Toy(other), other, checkpoint=path, progress=False)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable evolution checkpoint"):
        evolve(_Toy(cfg), cfg, checkpoint=path, progress=False)


def test_infeasible_target_raises_before_any_fitness_call():
    calls = []
    match = r"target=0.01 is infeasible with dense_steps=5 of num_steps=50: .*\[0.1, 1\]"
    with pytest.raises(ConfigError, match=match):
        evolve(calls.append, EvolutionConfig(target=0.01, num_steps=50, dense_steps=5), progress=False)
    assert not calls
    EvolutionConfig(target=0.05, num_steps=50, dense_steps=1)  # min mean 0.02: feasible
    with pytest.raises(ConfigError, match=r"none lies in the band \[0.333, 0.333\]"):
        EvolutionConfig(target=0.333, num_steps=3, dense_steps=0, tolerance=0.0)
    with pytest.raises(ConfigError, match=r"tolerance=0.01 is too tight for the unevenly spaced grid"):
        EvolutionConfig(target=0.5, num_steps=10, grid=(0.0, 0.2, 1.0), tolerance=0.01)


@pytest.mark.parametrize(
    ("returned", "match"),
    [(lambda g: np.zeros(len(g) + 1), "shape"), (lambda g: np.full(len(g), np.nan), "nan")],
)
def test_bad_fitness_output_raises(returned, match):
    cfg = EvolutionConfig(target=0.4, num_steps=10, population=4, children=2, generations=1)
    with pytest.raises(ConfigError, match=f"fitness returned .*{match}"):
        evolve(returned, cfg, progress=False)


def test_search_result_to_dict_is_json():
    cfg = EvolutionConfig(target=0.4, num_steps=10, population=4, children=2, generations=1)
    result = evolve(_Toy(cfg), cfg, progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert EvolutionConfig.from_dict(data["cfg"]) == cfg and data["best_genome"] == result.best_genome
    assert isinstance(result, SearchResult)


# ---------------------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("cfg", CONFIGS)
def test_uniform_and_greedy_reach_the_band(cfg):
    uniform = uniform_schedule(cfg)
    assert _in_band(uniform, cfg) and _on_grid(uniform, cfg)
    non_dense = uniform[cfg.dense_steps :]
    assert np.ptp(non_dense) <= np.diff(cfg.grid).max() + SLACK  # at most one notch apart
    toy = _Toy(cfg)
    err = toy.w[:, None] * (np.asarray(cfg.grid)[None, :] - toy.opt[:, None]) ** 2  # [num_steps, len(grid)]
    greedy = greedy_schedule(err, cfg)
    assert _in_band(greedy, cfg) and _on_grid(greedy, cfg)
    assert np.array_equal(greedy, greedy_schedule(lambda i, b: float(err[i, cfg.grid.index(b)]), cfg))


def test_greedy_is_optimal_for_separable_convex_errors():
    cfg = EvolutionConfig(target=0.5, num_steps=5, dense_steps=0, grid=(0.0, 0.25, 0.5, 0.75, 1.0), tolerance=0.0)
    rng = np.random.default_rng(0)
    grid = np.asarray(cfg.grid)
    err = rng.uniform(0.5, 3.0, size=(5, 1)) * (1.0 - grid[None, :]) ** 2  # convex, decreasing per step
    greedy = greedy_schedule(err, cfg)
    cost = err[np.arange(5), np.searchsorted(grid, greedy)].sum()
    best = min(
        err[np.arange(5), list(js)].sum()
        for js in itertools.product(range(5), repeat=5)
        if np.isclose(grid[list(js)].mean(), 0.5)
    )
    assert np.isclose(cost, best)


def test_greedy_rejects_bad_tables():
    cfg = CONFIGS[0]
    with pytest.raises(ConfigError, match=r"step_cost of shape \(3, 3\) is not accepted"):
        greedy_schedule(np.zeros((3, 3)), cfg)


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"target": 0.0}, r"target=0.0 is out of range: accepted \(0, 1\]"),
        ({"target": 1.5}, r"target=1.5 is out of range"),
        ({"target": float("nan")}, r"target=nan is out of range"),
        ({"num_steps": 0}, r"num_steps=0 is out of range: accepted an int in \[1, inf\]"),
        ({"num_steps": 2.0}, r"num_steps=2.0 is out of range"),
        ({"grid": (0.0, 0.5, 0.5, 1.0)}, r"grid=.* is not accepted: expected sorted unique values"),
        ({"grid": (0.5, 0.0, 1.0)}, r"grid=.* is not accepted"),
        ({"grid": (0.0, 1.2)}, r"grid\[1\]=1.2 is out of range: accepted \[0, 1\]"),
        ({"grid": ()}, r"grid=\(\) is not accepted"),
        ({"tolerance": 1.0}, r"tolerance=1.0 is out of range: accepted \[0, 1\)"),
        ({"tolerance": -0.1}, r"tolerance=-0.1 is out of range"),
        ({"population": 1}, r"population=1 is out of range: accepted an int in \[2, inf\]"),
        ({"children": 0}, r"children=0 is out of range"),
        ({"generations": -1}, r"generations=-1 is out of range"),
        ({"p_mutation_start": 1.5}, r"p_mutation_start=1.5 is out of range: accepted \[0, 1\]"),
        ({"p_mutation_end": -0.01}, r"p_mutation_end=-0.01 is out of range"),
        ({"crossover": ("uniform", "twopoint")}, r"crossover=.* is not accepted: choose from \['uniform', 'block'\]"),
        ({"crossover": ()}, r"crossover=\(\) is not accepted"),
        ({"dense_steps": 10}, r"dense_steps=10 is out of range: accepted an int in \[0, 9\]"),
        ({"dense_steps": -1}, r"dense_steps=-1 is out of range"),
        ({"seed": -3}, r"seed=-3 is out of range"),
        ({"seed": True}, r"seed=True is out of range"),
    ],
)
def test_bad_config_values_raise_naming_them(kw, match):
    with pytest.raises(ConfigError, match=match):
        EvolutionConfig(**{"target": 0.5, "num_steps": 10, **kw})


def test_config_dict_round_trip_and_unknown_keys():
    cfg = EvolutionConfig(target=0.4, num_steps=12, grid=[0.0, 0.5, 1.0], crossover=["block"])
    assert cfg.grid == (0.0, 0.5, 1.0) and cfg.crossover == ("block",)
    assert EvolutionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match=r"keys \['budget'\] are not accepted"):
        EvolutionConfig.from_dict({**cfg.to_dict(), "budget": 0.5})


@pytest.mark.parametrize("cls", [EvolutionConfig, SearchResult])
def test_documented_args_match_fields(cls):
    args = cls.__doc__.split("Args:")[1].split("\n\n")[0]
    documented = re.findall(r"^        (\w+) \(", args, flags=re.M)
    assert documented == [f.name for f in dataclasses.fields(cls)]


def test_progress_bar_does_not_change_the_result(capsys):
    cfg = EvolutionConfig(target=0.4, num_steps=10, population=4, children=3, generations=3)
    assert evolve(_Toy(cfg), cfg, progress=True) == evolve(_Toy(cfg), cfg, progress=False)
    assert "budget search" in capsys.readouterr().err


def test_docstring_examples():
    result = doctest.testmod(evolution_mod, extraglobs={"np": np})
    assert result.attempted >= 12 and result.failed == 0


def test_search_workdir_belongs_to_one_model_and_prompt_list(tmp_path):
    from vdit_accel.errors import ConfigError
    from vdit_accel.instrument.sampler import Sampler
    from vdit_accel.methods.astraea import AstraeaConfig
    from vdit_accel.search.astraea_search import Fidelity, ScheduleFitness
    from vdit_accel.testing import TINY_PROMPT, tiny_model

    fid, base = Fidelity(None, 1.0, 2), AstraeaConfig(num_steps=2)
    a, b = Sampler(tiny_model(1)), Sampler(tiny_model(2))
    first = ScheduleFitness(a, [TINY_PROMPT], fid, base, tmp_path / "w")
    again = ScheduleFitness(a, [TINY_PROMPT], fid, base, tmp_path / "w")  # same model and prompts: resumes
    assert torch.equal(first.reference, again.reference)
    with pytest.raises(ConfigError, match="belongs to another search \\(its weights_sha256 differ"):
        ScheduleFitness(b, [TINY_PROMPT], fid, base, tmp_path / "w")
    with pytest.raises(ConfigError, match="its prompts differ"):
        ScheduleFitness(a, [TINY_PROMPT, TINY_PROMPT], fid, base, tmp_path / "w")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "evolution.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds files but no identity.json"):
        ScheduleFitness(a, [TINY_PROMPT], fid, base, tmp_path / "old")
