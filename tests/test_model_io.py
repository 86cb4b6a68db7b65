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


@pytest.mark.parametrize("which", ["V1_WEIGHTS_DIR", "V2_WEIGHTS_DIR"])
def test_shipped_model_is_small_and_documented(which):
    from vdit_accel.instrument import model as model_module

    weights_dir = getattr(model_module, which)
    assert (weights_dir / "model.safetensors").stat().st_size < 50 * 2**20
    record = json.loads((weights_dir / "training.json").read_text())
    assert record["steps"] == len(record["loss"]) and 0 < record["wall_time_s"] <= 2 * 3600
    assert (weights_dir / "loss.png").is_file()
    cfg = EmbeddedModel.load(weights_dir).config
    t, h, w = (cfg.frames // cfg.patch_size[0], cfg.height // cfg.patch_size[1], cfg.width // cfg.patch_size[2])
    assert t * h * w >= 2048 and cfg.head_dim >= 64


def test_v2_weights_were_trained_by_the_v2_recipe_and_are_the_default():
    from vdit_accel.instrument.model import V2_WEIGHTS_DIR, WEIGHTS_DIR
    from vdit_accel.instrument.train import CHAINS

    assert WEIGHTS_DIR == V2_WEIGHTS_DIR and EmbeddedModel.load().config.model_id == "vdit-accel/embedded-wan-v2"

    (phase,) = CHAINS["v2"]
    record = json.loads((V2_WEIGHTS_DIR / "training.json").read_text())
    assert record["init_from"] is None and record["steps"] == phase.recipe.total_steps
    assert record["recipe"] == json.loads(json.dumps(dataclasses.asdict(phase.recipe)))
    assert EmbeddedModel.load(V2_WEIGHTS_DIR).config == phase.model


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


def test_position_channels_reach_the_transformer_from_every_caller(tmp_path):
    """The pre-hook appends (t, y, x) to a 3-channel input, positional or keyword, and nothing else."""
    from vdit_accel.instrument.model import position_grid

    grid = position_grid(4, 8, 8)
    assert grid.shape == (3, 4, 8, 8)
    assert torch.allclose(grid[1, 0, :, 0], (torch.arange(8) + 0.5) / 4 - 1)  # y runs down the rows
    assert torch.equal(grid[2, 0, 0], grid[1, 0, :, 0]) and grid[0, :, 0, 0].tolist() == [-0.75, -0.25, 0.25, 0.75]
    cfg = dataclasses.replace(EmbeddedConfig.tiny(), position_channels=True)
    torch.manual_seed(0)
    model = EmbeddedModel(cfg)
    assert model.transformer.config.in_channels == 6 and model.transformer.config.out_channels == 3
    x, c, t = torch.randn(2, 3, 4, 8, 8), model.encode_prompts(["", ""]), torch.full((2,), 500.0)
    with torch.no_grad():
        by_position = model.transformer(x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
        by_keyword = model.transformer(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
        explicit = model.transformer(torch.cat([x, grid.expand(2, -1, -1, -1, -1)], 1), timestep=t,
                                     encoder_hidden_states=c, return_dict=False)[0]
    assert by_position.shape == x.shape and torch.equal(by_position, by_keyword) and torch.equal(by_position, explicit)
    model.save(tmp_path / "m")
    loaded = EmbeddedModel.load(tmp_path / "m")
    assert loaded.config.position_channels
    with torch.no_grad():
        again = loaded.transformer(x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
    assert torch.equal(again, by_position)


def test_sample_prediction_returns_a_velocity(tmp_path):
    """An x0-predicting model's transformer answers with (x_t - x0) / max(t, 0.05), x0 being its raw output."""
    from vdit_accel.instrument.model import MIN_SIGMA_FOR_SAMPLE

    cfg = dataclasses.replace(EmbeddedConfig.tiny(), position_channels=True, prediction="sample")
    torch.manual_seed(0)
    model = EmbeddedModel(cfg)
    raw = EmbeddedModel(dataclasses.replace(cfg, prediction="velocity"))
    raw.load_state_dict(model.state_dict())  # same weights, no x0 -> velocity hook
    x, c = torch.randn(3, 3, 4, 8, 8), model.encode_prompts([""] * 3)
    timestep = torch.tensor([800.0, 250.0, 10.0])  # the last one is below the sigma floor
    with torch.no_grad():
        v = model.transformer(x, timestep=timestep, encoder_hidden_states=c, return_dict=False)[0]
        as_dict = model.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=c).sample
        x0 = raw.transformer(x, timestep=timestep, encoder_hidden_states=c, return_dict=False)[0]
    sigma = torch.tensor([0.8, 0.25, MIN_SIGMA_FOR_SAMPLE]).view(-1, 1, 1, 1, 1)
    assert torch.allclose(v, (x - x0) / sigma, atol=1e-5) and torch.equal(v, as_dict)
    with pytest.raises(ConfigError, match="prediction='eps' is not known"):
        EmbeddedConfig(prediction="eps")


def test_pooled_text_starts_as_a_no_op_then_conditions_the_modulation(tmp_path):
    """A fresh PooledCaption adds zero (outputs bit-identical to the model without it); once trained, the
    caption reaches the timestep embedding, with per-batch and per-token (Wan2.2 TI2V) timesteps alike."""
    cfg = dataclasses.replace(EmbeddedConfig.tiny(), pooled_text=True)
    torch.manual_seed(0)
    plain = EmbeddedModel(dataclasses.replace(cfg, pooled_text=False))
    pooled = EmbeddedModel(cfg)
    missing, unexpected = pooled.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("pooled_caption.") for k in missing)
    x, t = torch.randn(2, 3, 4, 8, 8), torch.full((2,), 700.0)
    c = plain.encode_prompts(["a red circle grows on a gray background", "a blue square moves up on a black "
                              "background"])
    with torch.no_grad():
        ref = plain.transformer(x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
        assert torch.equal(pooled.transformer(x, timestep=t, encoder_hidden_states=c, return_dict=False)[0], ref)
        torch.nn.init.normal_(pooled.pooled_caption.proj[2].weight, std=0.5)
        out = pooled.transformer(x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
        per_token = pooled.transformer(x, timestep=t[:, None].expand(2, 8), encoder_hidden_states=c,
                                       return_dict=False)[0]
    assert not torch.allclose(out, ref, atol=1e-4)
    torch.testing.assert_close(per_token, out, atol=1e-5, rtol=1e-5)  # same t on every token: same result
    pooled.save(tmp_path / "m")
    with torch.no_grad():
        again = EmbeddedModel.load(tmp_path / "m").transformer(x, timestep=t, encoder_hidden_states=c,
                                                               return_dict=False)[0]
    assert torch.equal(again, out)


def test_start_from_fills_only_no_op_modules(tmp_path):
    cfg = EmbeddedConfig.tiny()
    torch.manual_seed(0)
    EmbeddedModel(cfg).save(tmp_path / "plain")
    grown = EmbeddedModel(dataclasses.replace(cfg, pooled_text=True))
    grown.start_from(tmp_path / "plain")  # pooled_caption stays zero-initialised
    plain = EmbeddedModel.load(tmp_path / "plain")
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in plain.state_dict().items())
    with pytest.raises(WeightsError, match="do not fit this config"):
        EmbeddedModel(dataclasses.replace(cfg, position_channels=True)).start_from(tmp_path / "plain")
    grown.save(tmp_path / "grown")
    with pytest.raises(WeightsError, match="unexpected"):
        EmbeddedModel(cfg).start_from(tmp_path / "grown")
