"""Non-finite guards: weights (finite, SHA-256 verified) on load, latents before sampling, one check per step on the
model output (on by default, switchable off), located to the first non-finite block only after a failure; bench and
search never record a NaN."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vdit_accel.cli import main
from vdit_accel.errors import ChecksumError, NonFiniteError, WeightsError
from vdit_accel.instrument.model import CHECKSUM_KEY, V1_WEIGHTS_DIR, V2_WEIGHTS_DIR, WEIGHTS_FILE, EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.testing import TINY_PROMPT, tiny_model
from vdit_accel.validate import sha256_file

GEN = GenerationConfig(steps=2)


def _hooks(model: EmbeddedModel) -> int:
    mods = [model.transformer, *model.transformer.children(), *model.transformer.blocks]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


@pytest.mark.parametrize("folder", [V1_WEIGHTS_DIR, V2_WEIGHTS_DIR], ids=["v1", "v2"])
def test_shipped_weights_carry_and_match_their_sha256(folder):
    recorded = json.loads((folder / "config.json").read_text())[CHECKSUM_KEY]
    assert recorded == {WEIGHTS_FILE: sha256_file(folder / WEIGHTS_FILE)}
    model = EmbeddedModel.load(folder, require_checksum=True)
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())


@pytest.mark.parametrize("offset, count", [(-2000, 2000), (-1, 1), (200_000, 1)], ids=["2000-bytes", "last-byte",
                                                                                          "one-mid-byte"])
def test_flipped_bytes_in_a_copy_of_the_shipped_model_are_a_checksum_error(tmp_path, offset, count):
    copy = tmp_path / "v2"
    shutil.copytree(V2_WEIGHTS_DIR, copy)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    start = offset % len(data)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"has SHA-256 [0-9a-f]{64}, but .* records 'c59095c9"):
        EmbeddedModel.load(copy)
    assert issubclass(ChecksumError, WeightsError)


def test_save_records_the_checksum_and_load_verifies_it(tmp_path):
    model = tiny_model()
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg[CHECKSUM_KEY] == {WEIGHTS_FILE: sha256_file(tmp_path / "m" / WEIGHTS_FILE)}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", WEIGHTS_FILE]  # no temp files left
    loaded = EmbeddedModel.load(tmp_path / "m", require_checksum=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_on_load_even_with_a_matching_checksum(tmp_path, value):
    model = tiny_model()
    name = "transformer.blocks.1.attn1.to_q.weight"
    with torch.no_grad():
        model.get_parameter(name).view(-1)[5] = value
    model.save(tmp_path / "m")  # records the checksum of the poisoned file: only the finite check can catch it
    with pytest.raises(WeightsError, match=rf"tensor '{name}' has 1 non-finite values"):
        EmbeddedModel.load(tmp_path / "m")


def test_nan_latents_are_refused_before_any_forward(tiny_model):
    calls = []
    tiny_model.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    x = Sampler(tiny_model).initial_noise(GEN)
    x[0, 2, 1, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="latents has 1 non-finite values") as info:
        Sampler(tiny_model)(TINY_PROMPT, GEN, progress=False, latents=x)
    assert calls == [] and info.value.step is None


@pytest.mark.parametrize("block", [0, 1])
def test_a_nan_weight_stops_at_step_0_and_names_its_block(tiny_model, block):
    with torch.no_grad():
        tiny_model.transformer.blocks[block].attn2.to_out[0].weight.view(-1)[0] = float("nan")
    hooks = _hooks(tiny_model)
    with pytest.raises(NonFiniteError, match=rf"step 0 of 2 .* cond branch at transformer.blocks.{block}") as info:
        Sampler(tiny_model)(TINY_PROMPT, GEN, progress=False)
    assert (info.value.step, info.value.branch, info.value.block) == (0, "cond", f"blocks.{block}")
    assert _hooks(tiny_model) == hooks  # the locating hooks are gone


def test_a_later_step_is_named(tiny_model):
    """A block turns non-finite from the 4th transformer call on (step 1's uncond branch at guidance 5)."""
    calls = [0]

    def poison(module, args, output):
        calls[0] += 1
        return output * float("inf") if calls[0] >= 4 else output

    tiny_model.transformer.blocks[1].register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match=r"step 1 of 3 .*transformer.blocks.1") as info:
        Sampler(tiny_model)(TINY_PROMPT, GenerationConfig(steps=3, guidance=5.0), progress=False)
    assert info.value.step == 1 and info.value.block == "blocks.1"


def test_the_step_check_can_be_switched_off(tiny_model):
    with torch.no_grad():
        tiny_model.transformer.blocks[0].ffn.net[0].proj.weight.view(-1)[0] = float("nan")
    video = Sampler(tiny_model)(TINY_PROMPT, GEN.replace(check_finite=False), progress=False)
    assert not bool(torch.isfinite(video).all())  # garbage, by request


def test_a_clean_run_adds_no_hooks_and_matches_the_unchecked_run(tiny_model):
    hooks = _hooks(tiny_model)
    seen = []
    tiny_model.transformer.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(_hooks(tiny_model)))
    checked = Sampler(tiny_model)(TINY_PROMPT, GEN, progress=False)
    unchecked = Sampler(tiny_model)(TINY_PROMPT, GEN.replace(check_finite=False), progress=False)
    assert torch.equal(checked, unchecked)
    assert set(seen) == {hooks + 1}  # only this test's hook was ever on the model during the runs


@pytest.fixture(scope="module")
def overflowing_weights(tmp_path_factory) -> str:
    """Finite weights whose forward overflows to inf (one FFN weight at 1e38): load passes, sampling must not."""
    model = tiny_model()
    with torch.no_grad():
        model.transformer.blocks[1].ffn.net[0].proj.weight.fill_(1e38)
    d = tmp_path_factory.mktemp("overflow") / "m"
    model.save(d)
    return str(d)


def test_cli_generate_stops_at_the_step_and_writes_nothing(overflowing_weights, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(["generate", TINY_PROMPT, "--weights", overflowing_weights, "--steps", "2", "--quiet", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "step 0 of 2 is non-finite" in err and "transformer.blocks.1" in err and "--no-check-finite" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # NaN -> uint8, as asked
def test_cli_no_check_finite_writes_the_garbage_it_was_asked_for(overflowing_weights, tmp_path):
    out = tmp_path / "clip.gif"
    assert main(["generate", TINY_PROMPT, "--weights", overflowing_weights, "--steps", "2", "--quiet", "--out",
                 str(out), "--no-check-finite", "--save-tensor", str(tmp_path / "v.safetensors")]) == 0
    assert out.stat().st_size > 0
    assert not bool(torch.isfinite(load_file(str(tmp_path / "v.safetensors"))["video"]).all())


def test_bench_refuses_to_record_a_nan(overflowing_weights, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--methods", "dense", "--weights", overflowing_weights, "--out", str(out),
                 "--quiet"]) == 2
    assert "is non-finite" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_search_fitness_refuses_a_nan_reference(tmp_path):
    from vdit_accel.methods.astraea import AstraeaConfig
    from vdit_accel.search.astraea_search import Fidelity, ScheduleFitness

    model = tiny_model()
    with torch.no_grad():
        model.transformer.blocks[0].attn1.to_v.weight.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 0 of 2"):
        ScheduleFitness(Sampler(model), [TINY_PROMPT], Fidelity(None, 5.0, 2), AstraeaConfig(num_steps=2))


def test_metric_inf_is_recorded_and_nan_refused():
    from vdit_accel.bench.metrics import check_metric, psnr
    from vdit_accel.errors import ConfigError

    video = torch.zeros(3, 2, 8, 8)
    assert check_metric("psnr", psnr(video, video)) == float("inf")
    with pytest.raises(ConfigError, match="psnr=nan"):
        check_metric("psnr", float("nan"))


def test_a_corrupt_payload_with_no_checksum_and_a_nan_is_still_caught(tmp_path):
    """A folder saved before checksums existed: the finite check alone catches a NaN written into the payload."""
    model = tiny_model()
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop(CHECKSUM_KEY)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(tmp_path / "m" / WEIGHTS_FILE))
    state["transformer.proj_out.weight"] = state["transformer.proj_out.weight"].clone()
    state["transformer.proj_out.weight"].view(-1)[0] = float("nan")
    save_file(state, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(WeightsError, match="transformer.proj_out.weight' has 1 non-finite"):
        EmbeddedModel.load(Path(tmp_path / "m"))
    with pytest.raises(WeightsError, match="records no weights_sha256"):
        EmbeddedModel.load(Path(tmp_path / "m"), require_checksum=True)
