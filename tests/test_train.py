"""Training: deterministic, checkpointed, and a resumed run equals an uninterrupted one."""

import dataclasses
import json

import pytest
import torch

from vdit_accel.errors import ConfigError
from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel
from vdit_accel.instrument.train import CHAINS, Phase, Stage, TrainConfig, phase_dir, recipe, train, train_chain

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


def test_a_kill_while_saving_a_checkpoint_resumes_from_the_previous_complete_one(tmp_path):
    """The checkpoint is a step folder plus ``state.json`` naming it, replaced last: a save killed before that
    (here: a newer, half-written step folder, a stray state.json.tmp) resumes from the previous checkpoint and
    still ends bit-equal to an uninterrupted run; each save keeps one folder."""
    full = _weights(train(tmp_path / "a", CFG, TINY, progress=False))
    train(tmp_path / "b", CFG, TINY, max_steps=3, progress=False)
    ckpt = tmp_path / "b" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "step-0000003"]
    (ckpt / "step-0000004").mkdir()
    (ckpt / "step-0000004" / "model.safetensors").write_bytes(b"half written")
    (ckpt / "state.json.tmp").write_text("{")
    resumed = _weights(train(tmp_path / "b", CFG, TINY, progress=False))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert json.loads((ckpt / "state.json").read_text())["files"] == "step-0000005"
    assert not (ckpt / "step-0000004").exists() and not (ckpt / "step-0000003").exists()


def test_a_checkpoint_of_the_earlier_layout_still_resumes(tmp_path):
    """Checkpoints written before step folders kept their three files beside state.json (no "files" key)."""
    full = _weights(train(tmp_path / "a", CFG, TINY, progress=False))
    train(tmp_path / "b", CFG, TINY, max_steps=3, progress=False)
    ckpt = tmp_path / "b" / "checkpoint"
    for f in (ckpt / "step-0000003").iterdir():
        f.replace(ckpt / f.name)
    (ckpt / "step-0000003").rmdir()
    state = json.loads((ckpt / "state.json").read_text())
    for key in ("files", "sha256", "settings", "digest"):  # none of these existed then
        del state[key]
    (ckpt / "state.json").write_text(json.dumps(state))
    resumed = _weights(train(tmp_path / "b", CFG, TINY, progress=False))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "step-0000005"]


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
    with pytest.raises(ConfigError, match="layout='grid' is not known"):
        TrainConfig(layout="grid")
    for bad in (0.0, -3.0, (), (3.0, 0.0)):
        with pytest.raises(ConfigError, match=r"timestep_shift=.* is out of range"):
            TrainConfig(timestep_shift=bad)
    with pytest.raises(ConfigError, match="object size range"):
        TrainConfig(object_size=(0.3, 0.7))
    with pytest.raises(ConfigError, match="height=10"):
        train("/tmp/never", TrainConfig(stages=(Stage(4, 10, 8, 1, 1),)), TINY, progress=False)


def test_timestep_shift_defaults_to_the_models_flow_shift(tmp_path):
    """``timestep_shift=None`` trains exactly as the model's own shift does (so does a 1-tuple of it); another
    shift, or a mixture, trains differently."""
    default = _weights(train(tmp_path / "a", CFG, TINY, progress=False))
    same = _weights(train(tmp_path / "b", dataclasses.replace(CFG, timestep_shift=TINY.flow_shift), TINY,
                          progress=False))
    other = _weights(train(tmp_path / "c", dataclasses.replace(CFG, timestep_shift=12.0), TINY, progress=False))
    one = _weights(train(tmp_path / "d", dataclasses.replace(CFG, timestep_shift=[TINY.flow_shift]), TINY,
                         progress=False))
    mixed = _weights(train(tmp_path / "e", dataclasses.replace(CFG, timestep_shift=(TINY.flow_shift, 12.0)), TINY,
                           progress=False))
    assert all(torch.equal(default[k], same[k]) and torch.equal(default[k], one[k]) for k in default)
    assert not all(torch.equal(default[k], other[k]) for k in default)
    assert not any(all(torch.equal(w[k], mixed[k]) for k in w) for w in (default, other))


def test_fine_tune_starts_from_saved_weights(tmp_path):
    base = train(tmp_path / "base", CFG, TINY, progress=False)
    base.save(tmp_path / "saved")
    one = TrainConfig(stages=(Stage(4, 8, 8, 1, 2),), warmup=1, checkpoint_every=1, bf16=False, lr=1e-12)
    tuned = train(tmp_path / "ft", one, TINY, progress=False, init_from=tmp_path / "saved")
    for k, v in base.state_dict().items():  # a near-zero learning rate keeps the initial weights
        torch.testing.assert_close(tuned.state_dict()[k], v, atol=1e-6, rtol=0)
    record = json.loads((tmp_path / "ft" / "release" / "training.json").read_text())
    assert record["init_from"] == str(tmp_path / "saved")


def test_fine_tune_release_records_its_lineage(tmp_path):
    train(tmp_path / "base", CFG, TINY, progress=False)
    one = TrainConfig(stages=(Stage(4, 8, 8, 1, 2),), warmup=1, checkpoint_every=1, bf16=False)
    train(tmp_path / "ft", one, TINY, progress=False, init_from=tmp_path / "base" / "release")
    record = json.loads((tmp_path / "ft" / "release" / "training.json").read_text())
    base = json.loads((tmp_path / "base" / "release" / "training.json").read_text())
    assert record["parent"]["steps"] == 5 and record["parent"]["recipe"] == base["recipe"]
    assert "loss" not in record["parent"] and record["total_steps"] == 6
    assert record["total_wall_time_s"] == pytest.approx(base["wall_time_s"] + record["wall_time_s"], abs=0.11)
    train(tmp_path / "ft2", one, TINY, progress=False, init_from=tmp_path / "ft" / "release")
    grandchild = json.loads((tmp_path / "ft2" / "release" / "training.json").read_text())
    assert grandchild["parent"]["parent"]["steps"] == 5 and grandchild["total_steps"] == 7  # the whole lineage
    assert grandchild["total_wall_time_s"] == pytest.approx(record["total_wall_time_s"] + grandchild["wall_time_s"],
                                                            abs=0.11)


def test_named_recipes():
    assert recipe("scratch") == TrainConfig() and recipe("finetune", seed=7).seed == 7
    with pytest.raises(ConfigError, match="recipe='nope' is not known"):
        recipe("nope")


def test_chain_equals_its_fine_tunes_in_a_row_and_resumes(tmp_path):
    one = TrainConfig(stages=(Stage(4, 8, 8, 1, 2),), warmup=1, checkpoint_every=1, bf16=False, seed=3)
    pooled = dataclasses.replace(TINY, pooled_text=True)  # a link may switch on a module that starts as a no-op
    chain = (Phase("base", TINY, CFG), Phase("tune", pooled, one))
    train(tmp_path / "b1", CFG, TINY, progress=False)
    by_hand = train(tmp_path / "b2", one, pooled, progress=False, init_from=tmp_path / "b1" / "release")
    chained = train_chain(tmp_path / "c", chain, progress=False)
    assert all(torch.equal(v, chained.state_dict()[k]) for k, v in by_hand.state_dict().items())
    assert phase_dir(tmp_path / "c", 1, chain[1]) == tmp_path / "c" / "2-tune"
    record = json.loads((tmp_path / "c" / "release" / "training.json").read_text())
    assert record["init_from"] == str(tmp_path / "c" / "1-base" / "release") and record["total_steps"] == 6
    again = train_chain(tmp_path / "c", chain, progress=False)  # every link done: loads the release
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in by_hand.state_dict().items())
    with pytest.raises(ConfigError, match="phases=\\(\\) is not accepted"):
        train_chain(tmp_path / "d", ())


@pytest.mark.parametrize("name", ["v2", "v2-lineage"])
def test_v2_chain_links_fit_the_model_and_end_with_pooled_text(name):
    chain = CHAINS[name]
    assert chain[-1].model.model_id == "vdit-accel/embedded-wan-v2" and len({p.name for p in chain}) == len(chain)
    assert chain[-1].model.pooled_text and chain[-1].recipe.object_size == (0.38, 0.46)
    for p in chain:
        assert p.model.position_channels and p.model.prediction == "sample" and p.recipe.layout == "anchored"
    assert sum(p.recipe.total_steps for p in chain) == {"v2": 6000, "v2-lineage": 5000}[name]
