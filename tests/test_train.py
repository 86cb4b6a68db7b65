"""Training: deterministic, checkpointed, and a resumed run equals an uninterrupted one."""

import json

import pytest
import torch

from vdit_accel.errors import ConfigError
from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel
from vdit_accel.instrument.train import Stage, TrainConfig, train

CFG = TrainConfig(stages=(Stage(4, 8, 8, 3, 2), Stage(4, 16, 16, 2, 2)), warmup=2, checkpoint_every=1, bf16=False)
TINY = EmbeddedConfig.tiny()


def _weights(model: EmbeddedModel) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    full = _weights(train(tmp_path / "a", CFG, TINY, progress=False))
    train(tmp_path / "b", CFG, TINY, max_steps=3, progress=False)  # "killed" after step 3 (stage boundary)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    resumed = _weights(train(tmp_path / "b", CFG, TINY, progress=False))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_release_has_weights_record_and_loss_plot(tmp_path):
    train(tmp_path / "r", CFG, TINY, progress=False)
    rel = tmp_path / "r" / "release"
    record = json.loads((rel / "training.json").read_text())
    assert record["steps"] == 5 and len(record["loss"]) == 5 and record["seed"] == 0 and record["wall_time_s"] > 0
    assert (rel / "loss.png").stat().st_size > 0
    loaded = EmbeddedModel.load(rel)
    assert loaded.config == TINY


def test_bad_recipe_values():
    with pytest.raises(ConfigError, match="caption_dropout"):
        TrainConfig(caption_dropout=1.5)
    with pytest.raises(ConfigError, match="stage"):
        TrainConfig(stages=(Stage(4, 8, 8, 0, 2),))
    with pytest.raises(ConfigError, match="height=10"):
        train("/tmp/never", TrainConfig(stages=(Stage(4, 10, 8, 1, 1),)), TINY, progress=False)
