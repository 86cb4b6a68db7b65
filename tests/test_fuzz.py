"""Property-based fuzzing (hypothesis) of every file and config a user hands in: preset JSON, a model's
``config.json`` and the config dataclasses (AstraeaConfig, TimeRippleConfig, EmbeddedConfig, TrainConfig/Stage,
EvolutionConfig). Property: any input either loads to a valid object (its invariants hold and it round-trips through
its dict form) or raises a typed :class:`~vdit_accel.errors.VditAccelError`, never any other exception.

Inputs mix plausible values (a valid config with some fields replaced) with arbitrary JSON (null, bools, huge
integers, NaN/Infinity, strings, nested lists and objects) and raw bytes. Runs are derandomized (the same examples
every run, no example database written); the default run is fast, the ``_deep`` twins (marked slow) try many more.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdit_accel.errors import VditAccelError
from vdit_accel.instrument.model import EmbeddedConfig, read_model_config
from vdit_accel.instrument.train import Stage, TrainConfig
from vdit_accel.methods.astraea import AstraeaConfig
from vdit_accel.methods.timeripple import TimeRippleConfig
from vdit_accel.search.evolution import EvolutionConfig
from vdit_accel.search.presets import PRESET_FORMAT, PRESET_VERSION, load_preset

FAST, DEEP = 60, 800


def _settings(n: int):
    return settings(derandomize=True, database=None, max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _fuzz(strategies: tuple, check, n: int) -> dict:
    """Run ``check`` over ``n`` derandomized draws; it returns "loaded", "refused" or "skipped". Both of the first
    two must occur, so that a strategy that only ever produces valid (or only invalid) inputs fails the test."""
    outcomes = {"loaded": 0, "refused": 0, "skipped": 0}

    @_settings(n)
    @given(st.tuples(*strategies))
    def run(xs):
        outcomes[check(*xs)] += 1

    run()
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0, outcomes
    return outcomes


def _pair(strategy, check):
    """A fast test and its slow deep twin over the same strategy and property."""

    def fast():
        _fuzz((strategy,), check, FAST)

    @pytest.mark.slow
    def deep():
        _fuzz((strategy,), check, DEEP)

    return fast, deep


# ---- values ----

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, 2, 3, -1, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 2.5, -0.0, 1e-12, 1e308]),
    st.text(max_size=8),
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=12)


def _field_dicts(base: dict, plausible: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A valid dict with some fields replaced by plausible or arbitrary values, sometimes with unknown keys."""
    names = sorted(base)
    value_for = {n: st.one_of(plausible.get(n, JSON), JSON) for n in names}

    @st.composite
    def build(draw):
        d = dict(base)
        for n in draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True)):
            d[n] = draw(value_for[n])
        if draw(st.integers(0, 9)) == 0:
            d[draw(st.text(min_size=1, max_size=6))] = draw(JSON)
        return d

    # the valid dict itself, edited dicts, and now and then not an object at all
    return st.one_of(st.just(base).map(dict), build(), build(), JSON)


def _valid_or_typed(make, check_valid) -> str:
    """The property: ``make()`` raises a typed error, or returns an object that ``check_valid`` accepts."""
    try:
        obj = make()
    except VditAccelError:
        return "refused"
    check_valid(obj)
    return "loaded"


# ---- AstraeaConfig ----

UNIT = st.floats(min_value=0.0, max_value=1.0)
ASTRAEA_PLAUSIBLE = {
    "budgets": st.one_of(st.none(), st.lists(st.one_of(UNIT, JSON), max_size=6)),
    "target": st.one_of(st.none(), UNIT),
    "num_steps": st.integers(-1, 6),
    "dense_steps": st.integers(-1, 6),
    "forecast": st.one_of(st.integers(-1, 3), st.lists(st.integers(-1, 3), max_size=6)),
    "delta_norm": st.sampled_from(["l1", "l2", "rel_l2", "L2"]),
    "cache": st.sampled_from(["output", "residual", "outputs"]),
    "kv": st.sampled_from(["all", "selected", "none"]),
    "kv_reuse": st.sampled_from([True, False, 0, 1, "true"]),
    "cache_dtype": st.sampled_from([None, "float32", "bfloat16", "float16", "int8"]),
    "memory_cap_mb": st.one_of(st.none(), st.floats(allow_nan=True)),
    "w_alpha": st.floats(allow_nan=True, allow_infinity=True),
}


def _check_astraea(cfg: AstraeaConfig) -> None:
    sched = cfg.schedule
    assert len(sched) == cfg.num_steps == len(cfg.orders)
    assert all(isinstance(b, float) and 0.0 <= b <= 1.0 for b in sched)
    assert all(isinstance(o, int) and 0 <= o <= 2 for o in cfg.orders)
    assert math.isfinite(cfg.w_alpha) and math.isfinite(cfg.w_beta)
    assert AstraeaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _astraea(d):
    return _valid_or_typed(lambda: AstraeaConfig.from_dict(d), _check_astraea)


test_astraea_config_from_any_dict, test_astraea_config_from_any_dict_deep = _pair(
    _field_dicts(AstraeaConfig(budgets=(1.0, 0.5, 0.0), num_steps=3).to_dict(), ASTRAEA_PLAUSIBLE), _astraea)


# ---- TimeRippleConfig ----

TR_PLAUSIBLE = {
    "theta_min": st.floats(allow_nan=True, allow_infinity=True),
    "theta_max": st.floats(allow_nan=True, allow_infinity=True),
    "i_min": st.integers(-1, 8), "i_max": st.integers(-1, 8), "num_steps": st.integers(-1, 8),
    "fixed_threshold": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    "window": st.one_of(st.integers(-1, 5), st.floats()),
    "axes": st.one_of(st.lists(st.sampled_from(["t", "h", "w", "x"]), max_size=4), st.text(max_size=4)),
    "priority": st.sampled_from(["thw", "wht", "min_delta", "tt", ""]),
    "threshold_mode": st.sampled_from(["shared", "per_axis", "per_channel", "global"]),
    "axis_scale": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
    "layers": st.one_of(st.none(), st.lists(st.one_of(st.integers(-1, 5), st.floats(0, 3)), max_size=3)),
    "variant": st.sampled_from(["exact_sim", "exact_rows", "token_rows", "tokens", "fast"]),
    "row_fraction": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
}


def _check_timeripple(cfg: TimeRippleConfig) -> None:
    for step in range(cfg.num_steps):
        theta = cfg.threshold_at(step)
        assert isinstance(theta, float | int) and theta >= 0 and not math.isnan(theta)
    assert all(isinstance(i, int) and i >= 0 for i in cfg.layers or ())
    assert set(cfg.axes) <= {"t", "h", "w"} and len(cfg.axis_scale) == 3
    assert TimeRippleConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _timeripple(d):
    return _valid_or_typed(lambda: TimeRippleConfig.from_dict(d), _check_timeripple)


test_timeripple_config_from_any_dict, test_timeripple_config_from_any_dict_deep = _pair(
    _field_dicts(TimeRippleConfig(i_min=1, i_max=2, num_steps=4).to_dict(), TR_PLAUSIBLE), _timeripple)


# ---- TrainConfig / Stage, EvolutionConfig (the other configs users build) ----

STAGE = st.one_of(st.fixed_dictionaries({k: st.one_of(st.integers(-1, 9), JSON) for k in
                                         ("frames", "height", "width", "steps", "batch")}), JSON)
TRAIN_PLAUSIBLE = {
    "seed": st.one_of(st.integers(-1, 2**64), JSON), "stages": st.lists(STAGE, max_size=3),
    "lr": st.floats(allow_nan=True, allow_infinity=True), "caption_dropout": st.floats(allow_nan=True),
    "layout": st.sampled_from(["uniform", "anchored", "grid"]),
    "timestep_shift": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                                st.lists(st.floats(allow_nan=True), max_size=3)),
    "object_size": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
    "checkpoint_every": st.integers(-1, 3),
}


def _check_train(cfg: TrainConfig) -> None:
    assert cfg.total_steps >= 1 and all(isinstance(s, Stage) for s in cfg.stages)
    assert 0 <= cfg.caption_dropout < 1 and math.isfinite(cfg.lr) and cfg.lr > 0
    assert cfg.stage_at(cfg.total_steps - 1) in cfg.stages
    rebuilt = TrainConfig(**{**dataclasses.asdict(cfg), "stages": [dataclasses.asdict(s) for s in cfg.stages]})
    assert rebuilt == cfg


def _train(d):
    if isinstance(d, dict) and all(isinstance(k, str) for k in d):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return _valid_or_typed(lambda: TrainConfig(**{k: v for k, v in d.items() if k in known}), _check_train)
    return "skipped"


_TRAIN_BASE = {**dataclasses.asdict(TrainConfig(stages=(Stage(4, 8, 8, 3, 2),))), "stages": [
    {"frames": 4, "height": 8, "width": 8, "steps": 3, "batch": 2}]}
test_train_config_from_any_kwargs, test_train_config_from_any_kwargs_deep = _pair(
    _field_dicts(_TRAIN_BASE, TRAIN_PLAUSIBLE), _train)


def _evolution(d):
    def check(cfg):
        assert EvolutionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

    if isinstance(d, dict) and all(isinstance(k, str) for k in d):
        return _valid_or_typed(lambda: EvolutionConfig.from_dict(d), check)
    return "skipped"


test_evolution_config_from_any_dict, test_evolution_config_from_any_dict_deep = _pair(
    _field_dicts(EvolutionConfig(target=0.5, num_steps=4, population=4, children=2, generations=1).to_dict(),
                 {"target": UNIT, "num_steps": st.integers(-1, 6), "grid": st.lists(UNIT, max_size=5)}),
    _evolution)


# ---- files: a model's config.json and presets, written as bytes and loaded from disk ----


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _as_bytes(data, raw: bytes | None) -> bytes:
    """JSON text of ``data`` (NaN/Infinity written as Python does), or the raw bytes."""
    return raw if raw is not None else json.dumps(data, allow_nan=True).encode()


MODEL_PLAUSIBLE = {
    "frames": st.integers(-4, 300), "height": st.integers(-4, 600), "width": st.integers(0, 600),
    "patch_size": st.lists(st.integers(0, 5), max_size=4), "num_heads": st.integers(0, 4),
    "flow_shift": st.floats(allow_nan=True, allow_infinity=True),
    "guidance": st.floats(allow_nan=True, allow_infinity=True),
    "vocab": st.lists(st.one_of(st.text(max_size=4), JSON), max_size=4),
    "prediction": st.sampled_from(["velocity", "sample", "eps"]),
    "format": st.sampled_from(["vdit-accel/embedded-model", "other"]), "version": st.sampled_from([1, 2, True]),
}
RAW = st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=40),
                st.sampled_from([b"", b"null", b"\xff\xfe", b"[" * 5000, b"1" * 5000, b"NaN", b'{"a": 1']))


def _check_model_config(cfg: EmbeddedConfig) -> None:
    assert math.isfinite(cfg.flow_shift) and cfg.flow_shift > 0 and 0 <= cfg.guidance <= 50
    assert all(s % p == 0 and s >= p for s, p in zip((cfg.frames, cfg.height, cfg.width), cfg.patch_size))
    assert EmbeddedConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _model_file(path):
    def check(data, raw):
        path.write_bytes(_as_bytes(data, raw))
        return _valid_or_typed(lambda: read_model_config(path), _check_model_config)

    return (_field_dicts(EmbeddedConfig.tiny().to_dict(), MODEL_PLAUSIBLE), RAW), check


def test_model_config_json_any_bytes(fuzz_dir):
    _fuzz(*_model_file(fuzz_dir / "config.json"), FAST)


@pytest.mark.slow
def test_model_config_json_any_bytes_deep(fuzz_dir):
    _fuzz(*_model_file(fuzz_dir / "config-deep.json"), DEEP)


def _preset_strategy():
    astraea = _field_dicts(AstraeaConfig(budgets=(1.0, 0.5, 0.0), num_steps=3).to_dict(), ASTRAEA_PLAUSIBLE)
    timeripple = _field_dicts(TimeRippleConfig(i_min=1, i_max=2, num_steps=4).to_dict(), TR_PLAUSIBLE)
    base = {"format": PRESET_FORMAT, "version": PRESET_VERSION, "method": "astraea", "model_id": "m",
            "geometry": [4, 8, 8], "steps": 3, "seed": 0, "config": {}, "record": {}}
    plausible = {"method": st.sampled_from(["astraea", "timeripple", "fbc", "nope"]),
                 "config": st.one_of(astraea, timeripple), "steps": st.integers(-1, 5),
                 "geometry": st.lists(st.one_of(st.integers(-1, 9), JSON), max_size=4),
                 "seed": st.one_of(st.integers(-1, 2**65), JSON), "version": st.sampled_from([1, 2, True, "1"])}
    return _field_dicts(base, plausible)


def _check_preset_config(cfg) -> None:
    if isinstance(cfg, AstraeaConfig):
        _check_astraea(cfg)
    else:
        assert isinstance(cfg, TimeRippleConfig), type(cfg)
        _check_timeripple(cfg)


def _preset_file(path):
    def check(data, raw, steps):
        path.write_bytes(_as_bytes(data, raw))
        return _valid_or_typed(lambda: load_preset(path, steps=steps), _check_preset_config)

    return (_preset_strategy(), RAW, st.sampled_from([None, 3, 4])), check


def test_preset_json_any_bytes(fuzz_dir):
    _fuzz(*_preset_file(fuzz_dir / "preset.json"), FAST)


@pytest.mark.slow
def test_preset_json_any_bytes_deep(fuzz_dir):
    _fuzz(*_preset_file(fuzz_dir / "preset-deep.json"), DEEP)
