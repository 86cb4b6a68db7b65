"""Fault tests: ``train`` and ``search`` killed with SIGKILL at seeded event counts, then resumed, end exactly where an
uninterrupted run ends (byte-identical weights, identical schedules and records, evaluation counts included; wall
times excepted); damaged checkpoints and dense references are detected and rebuilt or refused with a typed error.

The kills use the test-only hook ``VDIT_ACCEL_FAULT_AT=<event>:<n>`` (``vdit_accel._faults``): the n-th event of
the process (counted from its start) sends SIGKILL to itself. Each scenario is one chain: every process is killed at
its point and the next one resumes what it left, so the chain's final result has gone through every kill point.
All processes of a scenario (the uninterrupted reference included) run with the same environment and one thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vdit_accel
from vdit_accel._faults import FAULT_ENV
from vdit_accel.errors import ConfigError, WeightsError
from vdit_accel.methods.astraea import AstraeaConfig
from vdit_accel.testing import TINY_PROMPT, tiny_model

SRC = str(Path(vdit_accel.__file__).resolve().parent.parent)
TRAIN_SCRIPT = """
import sys
from vdit_accel.instrument.model import EmbeddedConfig
from vdit_accel.instrument.train import Stage, TrainConfig, train
cfg = TrainConfig(stages=(Stage(4, 8, 8, 3, 2), Stage(4, 16, 16, 2, 2)), warmup=2, checkpoint_every=1, bf16=False)
train(sys.argv[1], cfg, EmbeddedConfig.tiny(), progress=False)
"""
CLI = "import sys; from vdit_accel.cli import main; sys.exit(main(sys.argv[1:]))"
PROMPTS = [TINY_PROMPT, "a green square grows on a gray background"]


def _run(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(PYTHONPATH=SRC, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def _killed(result: subprocess.CompletedProcess, fault: str) -> None:
    assert result.returncode == -signal.SIGKILL, f"{fault}: exit {result.returncode}\n{result.stderr[-2000:]}"


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _step(run: Path) -> int | None:
    state = run / "checkpoint" / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else None


# (fault, checkpointed step after the kill): 5 steps, a checkpoint after each (4 file writes: model, EMA,
# optimiser, state.json.tmp; then state.json is replaced); counts restart in every process.
TRAIN_CHAIN = [
    ("train_step:1", None),   # after the first step, before its checkpoint
    ("train_write:2", None),  # mid-checkpoint: weights and EMA written, optimiser not
    ("train_write:4", None),  # the new state.json.tmp written, not yet in place
    ("train_write:7", 1),     # checkpoint 1 complete, checkpoint 2 killed after its optimiser file
    ("train_step:3", 3),      # resumed at 1: steps 2 and 3 (the stage boundary) checkpointed, killed after step 4
]


@pytest.mark.slow
def test_train_killed_at_five_points_resumes_to_the_uninterrupted_weights(tmp_path):
    _ok(_run(["-c", TRAIN_SCRIPT, str(tmp_path / "ref")]))
    run = tmp_path / "run"
    for fault, step in TRAIN_CHAIN:
        _killed(_run(["-c", TRAIN_SCRIPT, str(run)], fault), fault)
        assert _step(run) == step, fault
        assert not (run / "release").exists()
    _ok(_run(["-c", TRAIN_SCRIPT, str(run)]))
    ref, got = tmp_path / "ref" / "release", run / "release"
    assert (got / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    rec_ref, rec_got = (json.loads((d / "training.json").read_text()) for d in (ref, got))
    for rec in (rec_ref, rec_got):
        del rec["wall_time_s"]
    assert rec_got == rec_ref and len(rec_got["loss"]) == 5
    ckpt = run / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "step-0000005"]


def _search_args(tmp_path: Path, name: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    if not prompts.is_file():
        prompts.write_text("\n".join(PROMPTS) + "\n")
        tiny_model().save(tmp_path / "weights")
    return ["-c", CLI, "search", "astraea", "--weights", str(tmp_path / "weights"), "--target", "0.6", "--steps",
            "4", "--population", "4", "--children", "2", "--generations", "2", "--prompts", str(prompts),
            "--checkpoint", str(tmp_path / f"{name}-ck"), "--out", str(tmp_path / f"{name}.json"), "--plot",
            str(tmp_path / f"{name}.png"), "--quiet"]


def _without_times(preset: dict) -> dict:
    search = preset["record"]["search"]
    assert search["search_seconds"] >= 0 and search["total_seconds"] >= 0
    del search["search_seconds"], search["total_seconds"]
    return preset


# Events of the uninterrupted search: the proxy dense reference written (write 1), generation 0 (4 evaluations), its
# checkpoint (write 2), generations 1 and 2 (1 evaluation and 1 checkpoint each), the full-fidelity reference
# (write 5), the re-rank (4 proxy + 4 full evaluations). Counts restart in every process.
SEARCH_CHAIN = [
    "search_write:1",  # the proxy reference written under its temporary name, not yet moved into place
    "search_eval:2",   # mid generation 0 (no evolution checkpoint yet)
    "search_write:3",  # generation 2's checkpoint written under its temporary name (generation 1's is in place)
    "search_eval:3",   # resumed at generation 1: generation 2 done, killed in the re-rank's proxy evaluations
    "search_eval:6",   # evolution finished: killed in the re-rank's full-fidelity evaluations
]


@pytest.mark.slow
def test_search_killed_at_five_points_resumes_to_the_uninterrupted_schedule_and_record(tmp_path):
    _ok(_run(_search_args(tmp_path, "ref")))
    for fault in SEARCH_CHAIN:
        _killed(_run(_search_args(tmp_path, "run"), fault), fault)
        assert not (tmp_path / "run.json").exists()
    _ok(_run(_search_args(tmp_path, "run")))
    ref = _without_times(json.loads((tmp_path / "ref.json").read_text()))
    got = _without_times(json.loads((tmp_path / "run.json").read_text()))
    assert got == ref
    search = got["record"]["search"]
    assert search["search_evaluations"] == search["evolution"]["evaluations"] == 6
    assert [h["evaluations"] for h in search["evolution"]["history"]] == [4, 5, 6]
    assert not list((tmp_path / "run-ck").glob("*.tmp"))


# ---- damaged files: detected, then rebuilt (dense references) or refused with a typed error (checkpoints) ----


def _search_in_process(workdir: Path):
    from vdit_accel.instrument.sampler import Sampler
    from vdit_accel.search.astraea_search import search_astraea
    from vdit_accel.search.evolution import EvolutionConfig

    evo = EvolutionConfig(target=0.6, num_steps=4, population=4, children=2, generations=1)
    return search_astraea(Sampler(tiny_model()), PROMPTS, 0.6, steps=4, evolution=evo, workdir=workdir,
                          rerank=2, progress=False)


def _flip(path: Path, offset_from_end: int, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[-offset_from_end + i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "payload_flipped", "header_flipped", "empty", "wrong_shape"])
def test_a_damaged_dense_reference_is_rebuilt_and_the_search_result_is_unchanged(tmp_path, damage, caplog):
    from safetensors.torch import save_file

    cfg, record = _search_in_process(tmp_path / "a")
    refs = sorted((tmp_path / "a").glob("dense-*.safetensors"))
    assert len(refs) == 2
    (tmp_path / "a" / "evolution.json").unlink()  # resume re-evaluates: the rebuilt reference is used
    for ref in refs:
        original = ref.read_bytes()
        if damage == "truncated":
            ref.write_bytes(original[: len(original) // 2])
        elif damage == "payload_flipped":
            _flip(ref, 64)
        elif damage == "header_flipped":
            data = bytearray(original)
            data[12] ^= 0xFF
            ref.write_bytes(bytes(data))
        elif damage == "empty":
            ref.write_bytes(b"")
        else:
            save_file({"latents": torch.zeros(1, 3)}, str(ref))
    with caplog.at_level("WARNING", logger="vdit_accel.search.astraea_search"):
        cfg2, record2 = _search_in_process(tmp_path / "a")
    assert "rebuilding" in caplog.text
    assert cfg2 == cfg
    for rec in (record, record2):
        del rec["search_seconds"], rec["total_seconds"]
    assert record2 == record
    assert all(r.read_bytes() for r in refs)
    cfg3, _ = _search_in_process(tmp_path / "a")  # the rebuilt files are whole again: no endless rebuild
    assert cfg3 == cfg


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "flipped", "not_an_object"])
def test_a_damaged_evolution_checkpoint_is_refused_with_a_typed_error(tmp_path, damage):
    _search_in_process(tmp_path / "a")
    ck = tmp_path / "a" / "evolution.json"
    text = ck.read_text()
    if damage == "truncated":
        ck.write_text(text[: len(text) // 2])
    elif damage == "flipped":  # still valid JSON: one digit of the best fitness changed
        state = json.loads(text)
        state["parent_fitness"][0] *= 1.5
        ck.write_text(json.dumps(state))
    else:
        ck.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"evolution\.json.*(corrupt|not a readable)"):
        _search_in_process(tmp_path / "a")


def _train_tiny(run: Path, max_steps: int | None = None, **kw):
    from vdit_accel.instrument.model import EmbeddedConfig
    from vdit_accel.instrument.train import Stage, TrainConfig, train

    cfg = TrainConfig(stages=(Stage(4, 8, 8, 3, 2),), warmup=2, checkpoint_every=1, bf16=False, **kw)
    return train(run, cfg, EmbeddedConfig.tiny(), max_steps=max_steps, progress=False)


@pytest.mark.parametrize("damage", ["weights_flipped", "weights_truncated", "optim_missing", "state_truncated",
                                    "state_value_changed", "state_not_json"])
def test_a_damaged_training_checkpoint_is_refused_before_any_step(tmp_path, damage):
    run = tmp_path / "run"
    _train_tiny(run, max_steps=2)
    ckpt = run / "checkpoint"
    folder = ckpt / "step-0000002"
    state_file = ckpt / "state.json"
    before = state_file.read_bytes()
    if damage == "weights_flipped":
        _flip(folder / "model.safetensors", 40)
    elif damage == "weights_truncated":
        (folder / "ema.safetensors").write_bytes((folder / "ema.safetensors").read_bytes()[:100])
    elif damage == "optim_missing":
        (folder / "optim.safetensors").unlink()
    elif damage == "state_truncated":
        state_file.write_bytes(before[: len(before) // 2])
    elif damage == "state_value_changed":  # valid JSON, a loss value altered
        state = json.loads(before)
        state["record"]["loss"][0] += 1.0
        state_file.write_text(json.dumps(state))
    else:
        state_file.write_bytes(b"\xff\xfe not json")
    expected = state_file.read_bytes()
    with pytest.raises(WeightsError, match=r"checkpoint.*(corrupt|missing|not readable).*remove"):
        _train_tiny(run)
    assert state_file.read_bytes() == expected  # nothing was trained or written


@pytest.mark.parametrize(("change", "named"), [
    ({"seed": 1}, "recipe.seed: 0 in the checkpoint, 1 now"),
    ({"lr": 5e-4}, "recipe.lr: 0.001 in the checkpoint, 0.0005 now"),
    ({"layout": "anchored"}, "recipe.layout: 'uniform' in the checkpoint, 'anchored' now"),
])
def test_train_refuses_to_resume_a_run_of_other_settings_naming_the_difference(tmp_path, change, named):
    run = tmp_path / "run"
    _train_tiny(run, max_steps=1)
    state = (run / "checkpoint" / "state.json").read_bytes()
    with pytest.raises(ConfigError, match=r"other settings") as err:
        _train_tiny(run, **change)
    assert named in str(err.value)
    assert (run / "checkpoint" / "state.json").read_bytes() == state


def test_train_refuses_to_resume_from_other_init_weights(tmp_path):
    from vdit_accel.instrument.model import EmbeddedConfig
    from vdit_accel.instrument.train import Stage, TrainConfig, train

    a, b = tmp_path / "a", tmp_path / "b"
    tiny_model(seed=1).save(a)
    tiny_model(seed=2).save(b)
    cfg = TrainConfig(stages=(Stage(4, 8, 8, 3, 2),), warmup=2, checkpoint_every=1, bf16=False)
    train(tmp_path / "run", cfg, EmbeddedConfig.tiny(), max_steps=1, progress=False, init_from=a)
    with pytest.raises(ConfigError, match=r"init_from\.path"):
        train(tmp_path / "run", cfg, EmbeddedConfig.tiny(), progress=False, init_from=b)
    train(tmp_path / "run2", cfg, EmbeddedConfig.tiny(), max_steps=1, progress=False)
    with pytest.raises(ConfigError, match=r"init_from: None in the checkpoint"):
        train(tmp_path / "run2", cfg, EmbeddedConfig.tiny(), progress=False, init_from=a)
    a.joinpath("model.safetensors").write_bytes(b.joinpath("model.safetensors").read_bytes())  # same path, new bytes
    with pytest.raises(ConfigError, match=r"init_from\.model_sha256"):
        train(tmp_path / "run", cfg, EmbeddedConfig.tiny(), progress=False, init_from=a)


def test_train_refuses_to_resume_with_another_model_config(tmp_path):
    import dataclasses

    from vdit_accel.instrument.model import EmbeddedConfig
    from vdit_accel.instrument.train import Stage, TrainConfig, train

    cfg = TrainConfig(stages=(Stage(4, 8, 8, 3, 2),), warmup=2, checkpoint_every=1, bf16=False)
    train(tmp_path / "run", cfg, EmbeddedConfig.tiny(), max_steps=1, progress=False)
    other = dataclasses.replace(EmbeddedConfig.tiny(), model_id="someone/else")
    with pytest.raises(ConfigError, match=r"model\.model_id: 'vdit-accel/tiny-test' in the checkpoint"):
        train(tmp_path / "run", cfg, other, progress=False)


def test_fault_hook_is_inert_without_the_variable_and_counts_only_its_event(monkeypatch):
    from vdit_accel import _faults

    monkeypatch.delenv(FAULT_ENV, raising=False)
    monkeypatch.setattr(_faults, "_counts", {})
    for _ in range(3):
        _faults.fault_point("train_step")
    assert _faults._counts == {}
    monkeypatch.setenv(FAULT_ENV, "search_eval:1000")
    _faults.fault_point("train_step")
    _faults.fault_point("search_eval")
    assert _faults._counts == {"search_eval": 1}



@pytest.mark.parametrize("damage", ["value_changed", "evals_not_object", "value_not_number"])
def test_a_damaged_refine_checkpoint_is_refused_with_a_typed_error(tmp_path, damage):
    from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    from vdit_accel.search.refine import FinalVideoObjective

    def objective():
        return FinalVideoObjective(Sampler(tiny_model()), PROMPTS, GenerationConfig(steps=4, guidance=1.0),
                                   AstraeaConfig(num_steps=4), workdir=tmp_path)

    first = objective()
    first.evals = {"F F F F": [31.5, 29.0]}
    first._save()
    assert objective().evals == first.evals  # an intact checkpoint is read back as written
    path = tmp_path / "evals.json"
    data = json.loads(path.read_text())
    if damage == "value_changed":  # still valid JSON: one PSNR altered
        data["evals"]["F F F F"][0] = 35.0
    elif damage == "evals_not_object":
        data["evals"] = [1, 2]
    else:
        data["evals"]["F F F F"] = ["x", 1]
        data.pop("digest")
    path.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"evals\.json is corrupt"):
        objective()
