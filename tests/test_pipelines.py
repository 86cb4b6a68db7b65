"""A user's saved diffusers pipeline: generate with any method / preset / composition, calibrate and search on it,
presets recording the model they were made for (tiny ``WanPipeline`` saved with ``save_pretrained``)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_pipelines import PROMPT, WAN_CALL, wan_pipeline

import vdit_accel
from vdit_accel.cli import main
from vdit_accel.errors import ConfigError, UnsupportedModelError
from vdit_accel.instrument.sampler import GenerationConfig
from vdit_accel.methods.astraea import AstraeaConfig
from vdit_accel.methods.timeripple import TimeRippleConfig
from vdit_accel.pipelines import PipelineSampler, load_pipeline, pipeline_model_id
from vdit_accel.search.calibrate import calibrate_timeripple
from vdit_accel.search.joint import run_joint_search
from vdit_accel.search.latency import LatencyModel
from vdit_accel.search.presets import load_preset, read_preset, save_preset

GEOMETRY = ["--height", "32", "--width", "32", "--frames", "5"]
AS_ON = AstraeaConfig(budgets=(1.0, 0.5, 0.5), num_steps=3)
TR_ON = TimeRippleConfig(fixed_threshold=10.0, num_steps=3, i_min=0, i_max=1)


def decodable_wan_pipeline():
    """``wan_pipeline()`` with a VAE whose latent statistics match its 4 latent channels (the shared tiny VAE keeps
    diffusers' 16-channel defaults, so it only serves ``output_type="latent"``); ``generate`` decodes."""
    from diffusers import AutoencoderKLWan, WanPipeline

    pipe = wan_pipeline()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    return WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=vae, transformer=pipe.transformer,
                       scheduler=pipe.scheduler)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Wan2.1 pipeline saved to disk, and its id (the folder, as loaded)."""
    folder = tmp_path_factory.mktemp("pipe") / "wan"
    decodable_wan_pipeline().save_pretrained(folder)
    return str(folder)


def _generate(saved, tmp_path, name, *extra):
    out = tmp_path / f"{name}.gif"
    code = main(["generate", PROMPT, "--model", saved, *GEOMETRY, "--steps", "3", "--seed", "0", "--out", str(out),
                 "--save-tensor", str(tmp_path / f"{name}.safetensors"), "--quiet", *extra])
    from safetensors.torch import load_file

    return code, out, load_file(str(tmp_path / f"{name}.safetensors"))["video"]


def test_load_pipeline_is_the_saved_pipeline_and_records_its_folder(saved):
    pipe = load_pipeline(saved)
    assert type(pipe).__name__ == "WanPipeline" and pipeline_model_id(pipe) == saved
    ref = decodable_wan_pipeline()
    run = dict(WAN_CALL, num_inference_steps=2)
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **run).frames
    b = ref(PROMPT, generator=torch.Generator().manual_seed(0), **run).frames
    assert torch.equal(a, b)  # the same weights, loaded from local files
    mem_id = pipeline_model_id(ref)  # built in memory: class and config hash, stable across builds
    assert mem_id.startswith("WanTransformer3DModel@config-sha256:") and mem_id == pipeline_model_id(wan_pipeline())


def test_load_pipeline_refuses_bad_folders_dtypes_devices(tmp_path):
    with pytest.raises(ConfigError, match="model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(ConfigError, match="dtype='float8'"):
        load_pipeline(tmp_path, dtype="float8")
    with pytest.raises(ConfigError, match="device='warp'"):
        load_pipeline(tmp_path, device="warp")


def test_generate_model_dense_then_composed_methods_act(saved, tmp_path, capsys, caplog):
    """``generate --model``: dense, then ``--method astraea,timeripple`` with one preset each (made for this model:
    no warning), whose stats show both acting and whose video differs from dense."""
    code, out, dense = _generate(saved, tmp_path, "dense")
    assert code == 0 and out.stat().st_size > 0 and dense.shape == (3, 5, 32, 32)
    assert torch.isfinite(dense).all() and dense.min() >= -1 and dense.max() <= 1
    capsys.readouterr()
    presets = []
    for method, cfg in (("astraea", AS_ON), ("timeripple", TR_ON)):
        presets.append(save_preset(tmp_path / f"{method}.json", method, cfg, model_id=saved, geometry=[5, 32, 32],
                                   steps=3, seed=0))
    with caplog.at_level(logging.WARNING):
        code, _, both = _generate(saved, tmp_path, "both", "--method", "astraea,timeripple", "--preset",
                                  ",".join(map(str, presets)))
    assert code == 0 and "was made for model" not in caplog.text
    text = capsys.readouterr().out
    stats, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    assert stats["astraea"]["kept_ratio"] < 1.0 and stats["timeripple"]["qk_savings_active"] > 0.1
    assert not torch.equal(both, dense)
    code, _, again = _generate(saved, tmp_path, "dense2")  # the methods were removed: dense again, same seed
    assert code == 0 and torch.equal(again, dense)


def test_generate_model_warns_for_a_preset_of_another_model(saved, tmp_path, caplog):
    preset = save_preset(tmp_path / "other.json", "astraea", AS_ON, model_id="someone/else", geometry=[5, 32, 32],
                         steps=3, seed=0)
    with caplog.at_level(logging.WARNING):
        code, _, _ = _generate(saved, tmp_path, "other", "--method", "astraea", "--preset", str(preset))
    assert code == 0 and f"was made for model someone/else, applied to {saved}" in caplog.text


@pytest.mark.parametrize(("extra", "match"), [
    (["--method", "astraea,astraea"], "twice"),
    (["--method", "dense,astraea"], "dense"),
    (["--method", "astraea,timeripple", "--preset", "astraea-3x"], "1 presets for 2 methods"),
    (["--method", "warp"], "invalid choice"),
    (["--flow-shift", "3"], "flow-shift"),
    (["--weights", "x"], "two models"),
    (["--device", "warp"], "device='warp'"),
])
def test_generate_model_refuses_bad_flags_before_compute(saved, tmp_path, capsys, extra, match):
    out = tmp_path / "never.gif"
    assert main(["generate", PROMPT, "--model", saved, *GEOMETRY, "--steps", "3", "--out", str(out), "--quiet",
                 *extra]) == 2
    assert match in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("argv", [["generate", "x", "--dtype", "bfloat16"],
                                  ["calibrate", "timeripple", "--target", "0.5", "--device", "cpu:0"],
                                  ["search", "astraea", "--target", "0.5", "--frames", "9"]])
def test_embedded_model_refuses_pipeline_only_flags(tmp_path, capsys, argv):
    """Flags that only a --model pipeline honours are refused on the embedded model, not silently ignored."""
    assert main([*argv, "--out", str(tmp_path / "n.json" if argv[0] != "generate" else tmp_path / "n.gif")]) == 2
    assert "--model" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_pipeline_sampler_runs_the_pipeline_and_refuses_two_experts():
    pipe = wan_pipeline()
    sampler = PipelineSampler(pipe, frames=5, height=32, width=32, call_kwargs={"max_sequence_length": 16})
    gen = GenerationConfig(steps=2, guidance=2.0, seed=3)
    assert sampler.geometry(gen) == (5, 32, 32) and sampler.guidance(GenerationConfig()) == 5.0
    noise = sampler.initial_noise(gen, 2)
    out = sampler([PROMPT, "a cat runs"], gen, progress=False, latents=noise)
    ref = pipe([PROMPT, "a cat runs"], generator=torch.Generator().manual_seed(3), latents=noise,
               **dict(WAN_CALL, num_inference_steps=2)).frames
    assert torch.equal(out, ref) and torch.equal(sampler([PROMPT, "a cat runs"], gen, progress=False), out)
    with pytest.raises(UnsupportedModelError, match="transformer_2"):
        PipelineSampler(wan_pipeline(two_experts=True))
    with pytest.raises(ConfigError, match="prompts"):
        sampler([""], gen)


def test_calibrate_timeripple_on_a_pipeline_from_python():
    """The calibration runs unchanged on a pipeline through ``PipelineSampler`` (closed loop, real generations)."""
    sampler = PipelineSampler(wan_pipeline(), frames=5, height=32, width=32, call_kwargs={"max_sequence_length": 16})
    base = TimeRippleConfig(i_min=0, i_max=2, num_steps=3)
    cfg, record = calibrate_timeripple(sampler, [PROMPT], 0.3, GenerationConfig(steps=3, guidance=1.0), base=base,
                                       tolerance=0.05, max_iterations=4, progress=False)
    assert isinstance(cfg, TimeRippleConfig) and 1 <= record["iterations"] <= 4
    assert all(0.0 <= s <= 1.0 for _, s in record["tried"]) and max(s for _, s in record["tried"]) > 0.0
    assert record["guidance"] == 1.0 and cfg.theta_max in [pytest.approx(t, rel=1e-5) for t, _ in record["tried"]]


@pytest.mark.slow
def test_calibrate_and_search_cli_on_a_saved_pipeline(saved, tmp_path, capsys, caplog):
    """``calibrate timeripple --model`` and ``search astraea --model --target`` write presets only where named,
    recording the folder as their model id; a preset from one model applied to another warns with both ids."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na cat runs\n")
    tr = tmp_path / "out" / "tr.json"
    assert main(["calibrate", "timeripple", "--model", saved, *GEOMETRY, "--steps", "21", "--target", "0.3",
                 "--prompts", str(prompts), "--n-prompts", "1", "--out", str(tr)]) == 0
    assert read_preset(tr)["model_id"] == saved and read_preset(tr)["geometry"] == [5, 32, 32]
    astraea = tmp_path / "out" / "as.json"
    assert main(["search", "astraea", "--model", saved, *GEOMETRY, "--steps", "3", "--target", "0.7", "--prompts",
                 str(prompts), "--population", "2", "--children", "2", "--generations", "1", "--out", str(astraea),
                 "--checkpoint", str(tmp_path / "ck"), "--plot", str(tmp_path / "out" / "as.png"), "--quiet"]) == 0
    data = read_preset(astraea)
    assert data["model_id"] == saved and data["steps"] == 3
    assert data["record"]["search"]["search_fitness"]["geometry"] is None  # the pipeline's geometry, no proxy
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["as.json", "as.png", "tr.json"]
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):  # the searched preset on its own model: no warning, and it acts
        handle = vdit_accel.apply(load_pipeline(saved), str(astraea))
        handle.remove()
        assert "was made for model" not in caplog.text
        handle = vdit_accel.apply(wan_pipeline(), str(astraea))  # another model (built in memory)
        handle.remove()
    assert f"was made for model {saved}, applied to WanTransformer3DModel@config-sha256:" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("allocator,steps", [("all", 3), ("refine", 8)])  # refine's seeds compute >= 3 steps
def test_joint_search_cli_on_a_saved_pipeline(saved, tmp_path, capsys, caplog, allocator, steps):
    """``search astraea --target-speedup --model``: the smallest joint search end to end on a saved pipeline, at its
    own geometry; 'all' runs the allocators that score whole generations (dp and greedy are listed as skipped)."""
    latency = tmp_path / "latency.json"
    LatencyModel(costs={(1.0, 0): 1.0, (0.5, 0): 0.6, (0.0, 0): 0.05, (0.0, 1): 0.06}, kv_reuse=False,
                 geometry={"grid": [2, 2, 2]}, hardware={"cpu": "test"}, dense_step_s=1.0).save(latency)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    out = tmp_path / "out" / "joint.json"
    assert main(["search", "astraea", "--model", saved, *GEOMETRY, "--steps", str(steps), "--target-speedup", "1.4",
                 "--latency-model", str(latency), "--allocator", allocator, "--prompts", str(prompts),
                 "--population", "2", "--children", "2", "--generations", "1", "--max-evals", "2",
                 "--out", str(out), "--checkpoint", str(tmp_path / "ck"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    data = read_preset(out)
    assert data["model_id"] == saved and data["steps"] == steps and data["geometry"] == [5, 32, 32]
    record = data["record"]["search"]
    if allocator == "all":
        assert set(record["candidates"]) == {"uniform", "evolution"}
        assert set(summary["skipped_allocators"]) == {"dp", "greedy"}
        assert record["proxy"]["geometry"] is None  # the pipeline's own geometry
        speedup = record["candidates"][record["allocator"]]["predicted_speedup"]
    else:
        speedup = record["predicted_speedup"]
    assert speedup >= 1.4
    cfg = load_preset(str(out), steps=steps)
    assert min(cfg.budgets) < 1.0  # the schedule reuses: the search acted
    with caplog.at_level(logging.WARNING):
        handle = vdit_accel.apply(load_pipeline(saved), str(out))
        handle.remove()
    assert "was made for model" not in caplog.text


def test_joint_search_table_allocators_refuse_a_pipeline(saved, tmp_path, capsys):
    """dp and greedy re-run single steps of the embedded sampler's loop: on a pipeline, a typed error naming why,
    before any generation."""
    latency = tmp_path / "latency.json"
    LatencyModel(costs={(1.0, 0): 1.0, (0.0, 0): 0.05}, kv_reuse=False, geometry={}, hardware={},
                 dense_step_s=1.0).save(latency)
    assert main(["search", "astraea", "--model", saved, *GEOMETRY, "--steps", "3", "--target-speedup", "1.4",
                 "--latency-model", str(latency), "--allocator", "dp", "--out", str(tmp_path / "x.json"),
                 "--checkpoint", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "segment-error table" in err and "'uniform', 'evolution' or 'refine'" in err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "ck").exists()
    sampler = PipelineSampler(load_pipeline(saved), frames=5, height=32, width=32)
    with pytest.raises(UnsupportedModelError, match="embedded model only"):
        run_joint_search(sampler, LatencyModel.load(latency), 1.4, [PROMPT], steps=3, allocators=["greedy"])


@pytest.mark.parametrize(("argv", "match"), [
    (["calibrate", "magcache"], "calibrate magcache with --model is not supported"),
])
def test_embedded_only_modes_refuse_a_pipeline(saved, tmp_path, capsys, argv, match):
    assert main([*argv, "--model", saved, "--out", str(tmp_path / "x.json")]) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_apply_warns_with_both_ids_for_a_foreign_preset_on_an_in_memory_pipeline(tmp_path, caplog):
    """A shipped preset (made for the embedded model) and a file preset of another model, applied to a pipeline
    built in memory: each warns naming the preset's model and the pipeline's (transformer class + config hash)."""
    pipe = wan_pipeline()
    own = pipeline_model_id(pipe)
    mine = save_preset(tmp_path / "mine.json", "astraea", AS_ON, model_id=own, geometry=[5, 32, 32], steps=3, seed=0)
    with caplog.at_level(logging.WARNING):
        vdit_accel.apply(pipe, str(mine)).remove()
        assert "was made for model" not in caplog.text
        vdit_accel.apply(pipe, "astraea-3x", steps=4).remove()
    shipped = read_preset("astraea-3x")["model_id"]
    assert f"preset astraea-3x was made for model {shipped}, applied to {own}" in caplog.text


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video"])
def test_pipeline_sampler_on_joint_attention_pipelines(family):
    """The same interface over CogVideoXPipeline / HunyuanVideoPipeline: its seeded initial latents (the pipeline's
    own layout) give exactly the pipeline's own seeded run, and Astraea on ``sampler.model.transformer`` acts."""
    from tiny_pipelines import COGVIDEOX_CALL, HUNYUAN_CALL, cogvideox_pipeline, hunyuan_video_pipeline

    pipe, call = ((cogvideox_pipeline(), COGVIDEOX_CALL) if family == "cogvideox"
                  else (hunyuan_video_pipeline(), HUNYUAN_CALL))
    extra = {k: v for k, v in call.items() if k in ("max_sequence_length", "prompt_template")}
    sampler = PipelineSampler(pipe, frames=call["num_frames"], height=call["height"], width=call["width"],
                              call_kwargs=extra)
    gen = GenerationConfig(steps=3, guidance=call["guidance_scale"], seed=2)
    noise = sampler.initial_noise(gen)
    out = sampler(PROMPT, gen, progress=False, latents=noise)
    assert torch.equal(out, sampler(PROMPT, gen, progress=False)) and torch.isfinite(out).all()
    own = pipe(PROMPT, generator=torch.Generator().manual_seed(2), **dict(call, num_inference_steps=3)).frames
    assert torch.equal(out, own[0])
    with vdit_accel.apply(sampler.model.transformer, AS_ON) as handle:
        sparse = sampler(PROMPT, gen, progress=False, latents=noise)
        assert handle.stats["astraea"]["kept_ratio"] < 1.0
    assert not torch.equal(sparse, out)
