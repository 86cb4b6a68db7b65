import dataclasses
import json

import pytest
import torch

from vdit_accel.errors import ConfigError, WeightsError
from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel


def test_save_load_round_trip_is_exact(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    loaded = EmbeddedModel.load(tmp_path / "m")
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.config == tiny_model.config


def test_missing_weight_file(tmp_path):
    with pytest.raises(WeightsError, match="missing"):
        EmbeddedModel.load(tmp_path / "nowhere")


def test_corrupt_weight_file(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="safetensors"):
        EmbeddedModel.load(tmp_path / "m")


def test_mismatched_config(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="does not match"):
        EmbeddedModel.load(tmp_path / "m")
    cfg["bogus"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="unknown keys"):
        EmbeddedModel.load(tmp_path / "m")


def test_no_pickle_in_weight_format(tmp_path, tiny_model):
    tiny_model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_geometry_not_divisible_by_patch():
    with pytest.raises(ConfigError, match="height=30 .*multiple of the patch size 4"):
        EmbeddedConfig(height=30)


def test_shipped_model_is_small_and_documented():
    from vdit_accel.instrument.model import WEIGHTS_DIR

    assert (WEIGHTS_DIR / "model.safetensors").stat().st_size < 50 * 2**20
    record = json.loads((WEIGHTS_DIR / "training.json").read_text())
    assert record["steps"] == len(record["loss"]) and record["wall_time_s"] > 0
    assert (WEIGHTS_DIR / "loss.png").is_file()
    cfg = EmbeddedModel.load().config
    t, h, w = (cfg.frames // cfg.patch_size[0], cfg.height // cfg.patch_size[1], cfg.width // cfg.patch_size[2])
    assert t * h * w >= 2048 and cfg.head_dim >= 64


def test_caption_mixer_spreads_every_word_to_every_token(tmp_path):
    cfg = dataclasses.replace(EmbeddedConfig.tiny(), caption_mixer=True)
    torch.manual_seed(0)
    model = EmbeddedModel(cfg)
    a, b = model.encode_prompts(["a red circle grows on a gray background", "a red square grows on a gray background"])
    assert not torch.equal(a[0], b[0])  # token 0 ("a") differs although only word 2 changed
    plain = EmbeddedModel(EmbeddedConfig.tiny())
    a, b = plain.encode_prompts(["a red circle grows on a gray background", "a red square grows on a gray background"])
    assert torch.equal(a[0], b[0]) and not torch.equal(a[2], b[2])
    model.save(tmp_path / "m")
    loaded = EmbeddedModel.load(tmp_path / "m")
    assert loaded.config.caption_mixer and all(torch.equal(v, loaded.state_dict()[k])
                                               for k, v in model.state_dict().items())
