"""Bad-input catalogue, files and configs: presets, a model's ``config.json``, the config dataclasses, training and
search checkpoints. Each case asserts the typed error (a :class:`~vdit_accel.errors.VditAccelError` subclass) and
that its message names the bad value (or field). None of these cases builds a model or runs a transformer: every
refusal happens while reading or validating, before any compute (the training cases check that the checkpoint on
disk is untouched). The CLI and runtime catalogue is ``tests/test_bad_inputs.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vdit_accel.errors import ConfigError, VditAccelError, WeightsError
from vdit_accel.instrument.model import EmbeddedConfig, read_model_config
from vdit_accel.instrument.train import Stage, TrainConfig
from vdit_accel.methods.astraea import AstraeaConfig
from vdit_accel.methods.timeripple import TimeRippleConfig
from vdit_accel.search.evolution import EvolutionConfig
from vdit_accel.search.presets import PRESET_FORMAT, PRESET_VERSION, load_preset

INF, NAN = math.inf, math.nan


# ---- presets ----

def _preset(**over) -> dict:
    base = {"format": PRESET_FORMAT, "version": PRESET_VERSION, "method": "astraea", "model_id": "m",
            "geometry": [16, 64, 64], "steps": 4, "seed": 0,
            "config": AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4).to_dict(), "record": {}}
    for k, v in over.items():
        if k.startswith("config."):
            base["config"][k[7:]] = v
        else:
            base[k] = v
    return base


def _tr_preset(**over) -> dict:
    d = _preset(method="timeripple", config=TimeRippleConfig(i_min=1, i_max=2, num_steps=4).to_dict())
    d["config"].update(over)
    return d


PRESET_CASES = {  # id: (file content: a JSON-able object, or bytes; error; text the message must hold)
    "null": (None, WeightsError, "holds NoneType None"),
    "a_string": ("astraea-3x", WeightsError, "holds str 'astraea-3x'"),
    "a_list": ([1, 2], WeightsError, "holds list [1, 2]"),
    "empty_object": ({}, WeightsError, "missing ['format', 'version'"),
    "wrong_format": (_preset(format="other/preset"), WeightsError, "format='other/preset'"),
    "version_2": (_preset(version=2), WeightsError, "version=2"),
    "version_true": (_preset(version=True), WeightsError, "version=True"),
    "version_string": (_preset(version="1"), WeightsError, "version='1'"),
    "nan_weight": (_preset(**{"config.w_alpha": NAN}), WeightsError, "config.w_alpha"),
    "infinite_budget": (_preset(**{"config.budgets": [1.0, INF, 0.5, 0.5]}), WeightsError, "config.budgets[1]"),
    "infinite_record_value": (_preset(record={"psnr": -INF}), WeightsError, "record.psnr"),
    "steps_string": (_preset(steps="50"), WeightsError, "steps='50'"),
    "steps_float": (_preset(steps=2.5), WeightsError, "steps=2.5"),
    "steps_zero": (_preset(steps=0), WeightsError, "steps=0"),
    "steps_huge": (_preset(steps=10**6), WeightsError, "steps=1000000"),
    "seed_negative": (_preset(seed=-1), WeightsError, "seed=-1"),
    "seed_2_64": (_preset(seed=2**64), WeightsError, f"seed={2**64}"),
    "seed_null": (_preset(seed=None), WeightsError, "seed=None"),
    "geometry_string": (_preset(geometry="16x64x64"), WeightsError, "geometry='16x64x64'"),
    "geometry_two": (_preset(geometry=[16, 64]), WeightsError, "geometry=[16, 64]"),
    "geometry_float": (_preset(geometry=[16, 64.5, 64]), WeightsError, "geometry[1]=64.5"),
    "method_number": (_preset(method=3), WeightsError, "method=3"),
    "method_unknown": (_preset(method="nope"), ConfigError, "method 'nope' is unknown"),
    "method_without_presets": (_preset(method="fbc", config={}), ConfigError,
                               "method 'fbc', which takes no presets: presets exist for ['astraea'"),
    "model_id_list": (_preset(model_id=["m"]), WeightsError, "model_id=['m']"),
    "config_string": (_preset(config="x"), WeightsError, "config='x'"),
    "config_null": (_preset(config=None), WeightsError, "config=None"),
    "config_unknown_key": (_preset(**{"config.foo": 1}), ConfigError, "no fields ['foo']"),
    "record_string": (_preset(record="x"), WeightsError, "record='x'"),
    "astraea_weight_string": (_preset(**{"config.w_alpha": "1"}), ConfigError, "w_alpha='1'"),
    "astraea_budget_string": (_preset(**{"config.budgets": [1.0, "0.5", 0.5, 0.5]}), ConfigError,
                              "budgets[1]='0.5'"),
    "astraea_budgets_object": (_preset(**{"config.budgets": {"0": 1.0}}), ConfigError, "budgets={'0': 1.0}"),
    "astraea_num_steps_float": (_preset(**{"config.num_steps": 2.5}), ConfigError, "num_steps=2.5"),
    "astraea_budgets_length": (_preset(**{"config.budgets": [1.0, 0.5]}), ConfigError, "budgets has 2 entries"),
    "astraea_budget_above_one": (_preset(**{"config.budgets": [1.0, 1.5, 0.5, 0.5]}), ConfigError,
                                 "budgets[1]=1.5"),
    "astraea_forecast_3": (_preset(**{"config.forecast": 3}), ConfigError, "forecast=3"),
    "astraea_forecast_float": (_preset(**{"config.forecast": 1.0}), ConfigError, "forecast=1.0"),
    "astraea_kv_reuse_string": (_preset(**{"config.kv_reuse": "yes"}), ConfigError, "kv_reuse='yes'"),
    "astraea_kv_reuse_int": (_preset(**{"config.kv_reuse": 1}), ConfigError, "kv_reuse=1"),
    "astraea_cache_dtype": (_preset(**{"config.cache_dtype": "int8"}), ConfigError, "cache_dtype='int8'"),
    "astraea_norm_null": (_preset(**{"config.delta_norm": None}), ConfigError, "delta_norm=None"),
    "timeripple_layer_float": (_tr_preset(layers=[0.9]), ConfigError, "layers[0]=0.9"),
    "timeripple_layer_negative": (_tr_preset(layers=[-1]), ConfigError, "layers[0]=-1"),
    "timeripple_window_float": (_tr_preset(window=2.5), ConfigError, "window=2.5"),
    "timeripple_axes_string": (_tr_preset(axes="xyz"), ConfigError, "axis='x'"),
    "timeripple_axes_null": (_tr_preset(axes=None), ConfigError, "axes=None"),
    "timeripple_theta_string": (_tr_preset(theta_min="0.2"), ConfigError, "theta_min='0.2'"),
    "timeripple_theta_infinite": (_tr_preset(theta_max=INF), WeightsError, "config.theta_max"),
    "timeripple_axis_scale_string": (_tr_preset(axis_scale=[1, "a", 1]), ConfigError, "axis_scale[1]='a'"),
    "timeripple_priority_number": (_tr_preset(priority=3), ConfigError, "priority=3"),
    "timeripple_reuse_q_int": (_tr_preset(reuse_q=0), ConfigError, "reuse_q=0"),
    "timeripple_i_max_float": (_tr_preset(i_max=2.0), ConfigError, "i_max=2.0"),
    "not_utf8": (b"\xff\xfe{}", WeightsError, "not UTF-8"),
    "truncated": (b'{"format": "vdit-accel/pre', WeightsError, "not valid JSON"),
    "empty_file": (b"", WeightsError, "not valid JSON"),
    "nested_too_deeply": (b"[" * 100_000, WeightsError, "nested too deeply"),
    "integer_too_long": (b'{"steps": ' + b"1" * 5000 + b"}", WeightsError, "not valid JSON"),
    "binary": (bytes(range(256)), WeightsError, "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(PRESET_CASES))
def test_bad_preset_file(case, tmp_path):
    content, error, needle = PRESET_CASES[case]
    path = tmp_path / "preset.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(error) as e:
        load_preset(path)
    assert isinstance(e.value, VditAccelError) and needle in str(e.value), str(e.value)


PRESET_NAME_CASES = {
    "none": (None, ConfigError, "preset=None"),
    "empty": ("", ConfigError, "preset=''"),
    "number": (3, ConfigError, "preset=3"),
    "unknown_name": ("astraea-99x", WeightsError, "'astraea-99x' is neither a file nor a shipped preset"),
    "missing_file": ("no/such/file.json", WeightsError, "'no/such/file.json' is neither a file"),
}


@pytest.mark.parametrize("case", sorted(PRESET_NAME_CASES))
def test_bad_preset_name(case):
    value, error, needle = PRESET_NAME_CASES[case]
    with pytest.raises(error) as e:
        load_preset(value)
    assert isinstance(e.value, VditAccelError) and needle in str(e.value), str(e.value)


def test_a_preset_for_another_method_names_both(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_preset()))
    with pytest.raises(ConfigError, match="is for method 'astraea', not 'timeripple'"):
        load_preset(path, method="timeripple")


# ---- a model's config.json ----

def _model(**over):
    d = EmbeddedConfig.tiny().to_dict()
    d.update(over)
    return d


MODEL_CASES = {
    "null": (None, WeightsError, "holds a NoneType: expected a JSON object"),
    "a_string": ("tiny", WeightsError, "holds a str: expected a JSON object"),
    "no_format": ({k: v for k, v in _model().items() if k != "format"}, WeightsError, "format=None"),
    "version_2": (_model(version=2), WeightsError, "version=2"),
    "unknown_key": (_model(foo=1), WeightsError, "unknown keys ['foo']"),
    "guidance_infinite": (_model(guidance=INF), ConfigError, "value Infinity is not accepted"),
    "guidance_huge": (_model(guidance=1e30), ConfigError, "guidance=1e+30"),
    "guidance_negative": (_model(guidance=-1.0), ConfigError, "guidance=-1.0"),
    "guidance_nan": (_model(guidance=NAN), ConfigError, "value NaN is not accepted"),
    "guidance_1e400": (b'{"format": "vdit-accel/embedded-model", "version": 1, "guidance": 1e400}', ConfigError,
                       "guidance=inf"),
    "guidance_string": (_model(guidance="2"), ConfigError, "guidance='2'"),
    "flow_shift_zero": (_model(flow_shift=0), ConfigError, "flow_shift=0"),
    "flow_shift_negative": (_model(flow_shift=-1.0), ConfigError, "flow_shift=-1.0"),
    "flow_shift_infinite": (_model(flow_shift=INF), ConfigError, "value Infinity is not accepted"),
    "flow_shift_null": (_model(flow_shift=None), ConfigError, "flow_shift=None"),
    "frames_zero": (_model(frames=0), ConfigError, "frames=0"),
    "frames_string": (_model(frames="16"), ConfigError, "frames='16'"),
    "frames_float": (_model(frames=4.0), ConfigError, "frames=4.0"),
    "frames_beyond_rope": (_model(frames=1000), ConfigError, "frames=1000"),
    "height_not_multiple": (_model(height=30), ConfigError, "height=30"),
    "width_huge": (_model(width=10**9), ConfigError, "width=1000000000"),
    "patch_two": (_model(patch_size=[2, 4]), ConfigError, "patch_size=[2, 4]"),
    "patch_zero": (_model(patch_size=[2, 4, 0]), ConfigError, "patch_size[2]=0"),
    "patch_string": (_model(patch_size="244"), ConfigError, "patch_size='244'"),
    "heads_bool": (_model(num_heads=True), ConfigError, "num_heads=True"),
    "layers_huge": (_model(num_layers=10**9), ConfigError, "num_layers=1000000000"),
    "head_dim_negative": (_model(head_dim=-24), ConfigError, "head_dim=-24"),
    "vocab_string": (_model(vocab="abc"), ConfigError, "vocab='abc'"),
    "vocab_numbers": (_model(vocab=[1, 2]), ConfigError, "vocab[0]=1"),
    "vocab_one_word": (_model(vocab=["<pad>"]), ConfigError, "vocab has 1 entries"),
    "prediction_unknown": (_model(prediction="eps"), ConfigError, "prediction='eps'"),
    "position_channels_string": (_model(position_channels="yes"), ConfigError, "position_channels='yes'"),
    "model_id_number": (_model(model_id=5), ConfigError, "model_id=5"),
    "not_utf8": (b"\xff{}", WeightsError, "not UTF-8"),
    "nested_too_deeply": (b"[" * 100_000, WeightsError, "nested too deeply"),
    "truncated": (b'{"format": "vdit-accel/embedded-model", "vers', WeightsError, "not valid JSON"),
    "empty": (b"", WeightsError, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_config_json(case, tmp_path):
    content, error, needle = MODEL_CASES[case]
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(error) as e:
        read_model_config(path)
    assert isinstance(e.value, VditAccelError) and needle in str(e.value) and str(path) in str(e.value), str(e.value)


def test_a_bad_config_json_is_refused_by_model_load_before_any_weights_are_read(tmp_path):
    from vdit_accel.instrument.model import EmbeddedModel

    (tmp_path / "config.json").write_text(json.dumps(_model(guidance=1e30)))
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(ConfigError, match=r"guidance=1e\+30"):
        EmbeddedModel.load(tmp_path)


# ---- config dataclasses built from Python ----

CONFIG_CASES = {
    "astraea_num_steps_float": (AstraeaConfig, {"num_steps": 2.5}, "num_steps=2.5"),
    "astraea_num_steps_bool": (AstraeaConfig, {"num_steps": True}, "num_steps=True"),
    "astraea_num_steps_huge": (AstraeaConfig, {"num_steps": 1001}, "num_steps=1001"),
    "astraea_w_alpha_inf": (AstraeaConfig, {"w_alpha": INF}, "w_alpha=inf"),
    "astraea_w_beta_nan": (AstraeaConfig, {"w_beta": NAN}, "w_beta=nan"),
    "astraea_target_zero": (AstraeaConfig, {"target": 0.0}, "target=0.0"),
    "astraea_target_string": (AstraeaConfig, {"target": "0.5"}, "target='0.5'"),
    "astraea_dense_steps_negative": (AstraeaConfig, {"dense_steps": -1}, "dense_steps=-1"),
    "astraea_dense_steps_float": (AstraeaConfig, {"dense_steps": 1.0}, "dense_steps=1.0"),
    "astraea_budgets_string": (AstraeaConfig, {"budgets": "0.5", "num_steps": 3}, "budgets='0.5'"),
    "astraea_budget_nan": (AstraeaConfig, {"budgets": (1.0, NAN), "num_steps": 2}, "budgets[1]=nan"),
    "astraea_memory_cap_inf": (AstraeaConfig, {"memory_cap_mb": INF}, "memory_cap_mb=inf"),
    "astraea_cache_dtype": (AstraeaConfig, {"cache_dtype": "int8"}, "cache_dtype='int8'"),
    "astraea_selection_number": (AstraeaConfig, {"selection": 1}, "selection=1"),
    "timeripple_layer_float": (TimeRippleConfig, {"layers": (0.9,)}, "layers[0]=0.9"),
    "timeripple_layers_string": (TimeRippleConfig, {"layers": "01"}, "layers='01'"),
    "timeripple_window_float": (TimeRippleConfig, {"window": 2.5}, "window=2.5"),
    "timeripple_window_huge": (TimeRippleConfig, {"window": 10**6}, "window=1000000"),
    "timeripple_theta_max_inf": (TimeRippleConfig, {"theta_max": INF}, "theta_max=inf"),
    "timeripple_theta_min_nan": (TimeRippleConfig, {"theta_min": NAN}, "theta_min=nan"),
    "timeripple_axis_scale_string": (TimeRippleConfig, {"axis_scale": (1, "a", 1)}, "axis_scale[1]='a'"),
    "timeripple_axis_scale_nan": (TimeRippleConfig, {"axis_scale": (1, NAN, 1)}, "axis_scale[1]=nan"),
    "timeripple_axes_none": (TimeRippleConfig, {"axes": None}, "axes=None"),
    "timeripple_reuse_q_int": (TimeRippleConfig, {"reuse_q": 1}, "reuse_q=1"),
    "timeripple_num_steps_huge": (TimeRippleConfig, {"num_steps": 5000}, "num_steps=5000"),
    "timeripple_priority_number": (TimeRippleConfig, {"priority": 3}, "priority=3"),
    "timeripple_fixed_threshold_nan": (TimeRippleConfig, {"fixed_threshold": NAN}, "fixed_threshold=nan"),
    "timeripple_i_max_past_end": (TimeRippleConfig, {"i_max": 50}, "i_max=50"),
    "timeripple_variant_number": (TimeRippleConfig, {"variant": 2}, "variant=2"),
    "train_seed_negative": (TrainConfig, {"seed": -1}, "seed=-1"),
    "train_seed_2_64": (TrainConfig, {"seed": 2**64}, f"seed={2**64}"),
    "train_seed_float": (TrainConfig, {"seed": 1.5}, "seed=1.5"),
    "train_lr_inf": (TrainConfig, {"lr": INF}, "lr=inf"),
    "train_lr_zero": (TrainConfig, {"lr": 0.0}, "lr=0.0"),
    "train_stage_missing_fields": (TrainConfig, {"stages": [{"frames": 4}]}, "needs the fields ['height'"),
    "train_stage_unknown_field": (TrainConfig, {"stages": [{"frames": 4, "height": 8, "width": 8, "steps": 1,
                                                            "batch": 1, "lr": 1}]}, "no fields ['lr']"),
    "train_stages_string": (TrainConfig, {"stages": "x"}, "stages='x'"),
    "train_stage_number": (TrainConfig, {"stages": [3]}, "stages[0]=3"),
    "train_checkpoint_every_zero": (TrainConfig, {"checkpoint_every": 0}, "checkpoint_every=0"),
    "train_layout_number": (TrainConfig, {"layout": 3}, "layout=3"),
    "train_object_size_one": (TrainConfig, {"object_size": (0.5,)}, "object_size=(0.5,)"),
    "train_object_size_nan": (TrainConfig, {"object_size": (NAN, 0.4)}, "object_size[0]=nan"),
    "train_timestep_shift_inf": (TrainConfig, {"timestep_shift": INF}, "timestep_shift=inf"),
    "train_timestep_shift_string": (TrainConfig, {"timestep_shift": "3"}, "timestep_shift='3'"),
    "train_bf16_string": (TrainConfig, {"bf16": "no"}, "bf16='no'"),
    "train_ema_decay_two": (TrainConfig, {"ema_decay": 2.0}, "ema_decay=2.0"),
    "train_caption_dropout_one": (TrainConfig, {"caption_dropout": 1.0}, "caption_dropout=1.0"),
    "stage_steps_zero": (Stage, {"frames": 4, "height": 8, "width": 8, "steps": 0, "batch": 2}, "steps=0"),
    "stage_batch_float": (Stage, {"frames": 4, "height": 8, "width": 8, "steps": 1, "batch": 2.5}, "batch=2.5"),
    "stage_frames_string": (Stage, {"frames": "4", "height": 8, "width": 8, "steps": 1, "batch": 2}, "frames='4'"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_value(case):
    cls, kwargs, needle = CONFIG_CASES[case]
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert needle in str(e.value), str(e.value)


EVOLUTION_CASES = {
    "empty": ({}, "keys ['target', 'num_steps'] are missing"),
    "not_a_dict": (None, "not None"),
    "unknown_key": ({"target": 0.5, "num_steps": 4, "foo": 1}, "keys ['foo'] are not accepted"),
}


@pytest.mark.parametrize("case", sorted(EVOLUTION_CASES))
def test_bad_evolution_config_dict(case):
    d, needle = EVOLUTION_CASES[case]
    with pytest.raises(ConfigError) as e:
        EvolutionConfig.from_dict(d)
    assert needle in str(e.value), str(e.value)


# ---- training runs and search checkpoints ----

def _train(run: Path, max_steps=None, **kw):
    from vdit_accel.instrument.train import train

    cfg = TrainConfig(stages=(Stage(4, 8, 8, 3, 2),), warmup=1, checkpoint_every=1, bf16=False, **kw)
    return train(run, cfg, EmbeddedConfig.tiny(), max_steps=max_steps, progress=False)


@pytest.mark.parametrize(("max_steps", "needle"), [(0, "max_steps=0"), (-1, "max_steps=-1"), (1.5, "max_steps=1.5")])
def test_train_max_steps_must_train_something(tmp_path, max_steps, needle):
    with pytest.raises(ConfigError, match="max_steps") as e:
        _train(tmp_path / "run", max_steps=max_steps)
    assert needle in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train") / "run"
    _train(run, max_steps=1)
    return run


@pytest.mark.parametrize(("change", "needle"), [
    ({"seed": 7}, "recipe.seed: 0 in the checkpoint, 7 now"),
    ({"lr": 5e-4}, "recipe.lr: 0.001 in the checkpoint, 0.0005 now"),
    ({"caption_dropout": 0.2}, "recipe.caption_dropout: 0.1 in the checkpoint, 0.2 now"),
])
def test_train_resume_with_other_settings_is_refused(one_step_run, change, needle):
    state = (one_step_run / "checkpoint" / "state.json").read_bytes()
    with pytest.raises(ConfigError) as e:
        _train(one_step_run, **change)
    assert needle in str(e.value) and str(one_step_run) in str(e.value)
    assert (one_step_run / "checkpoint" / "state.json").read_bytes() == state


def test_a_corrupt_search_identity_is_refused(tmp_path):
    from vdit_accel.instrument.sampler import Sampler
    from vdit_accel.search.astraea_search import claim_workdir
    from vdit_accel.testing import tiny_model

    (tmp_path / "identity.json").write_bytes(b'{"model_id": "vdit-acc')
    with pytest.raises(ConfigError, match="corrupt identity.json") as e:
        claim_workdir(tmp_path, Sampler(tiny_model()), ["a red circle"])
    assert str(tmp_path) in str(e.value)
