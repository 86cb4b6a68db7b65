"""The bad-input catalogue (issue 18): every case is a typed error naming the bad value, most before any compute.

Each case asserts the error type (CLI: exit status 2 and the ``vdit-accel ...: error:`` line; API: the
``VditAccelError`` subclass), that the message names the bad value, and, for "before compute" cases, that no
transformer forward ran: every model loaded during a CLI case, and the tiny model of an API case, carries a
forward pre-hook that counts calls (installed by the test, on that model only). The accepted edge inputs at the
end stay accepted. ``CATALOGUE_COUNTS`` at the bottom is what the report quotes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vdit_accel import errors, validate
from vdit_accel.cli import UsageError, main
from vdit_accel.errors import (
    ConfigError,
    NonFiniteError,
    OutputPathError,
    PromptError,
    VditAccelError,
    WeightsError,
)
from vdit_accel.instrument import model as model_mod
from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.testing import TINY_PROMPT, tiny_model

PKG = Path(model_mod.__file__).resolve().parent.parent
BIG_SEED = str(2**63)
HUGE_SEED = str(2**64)


# ---------------------------------------------------------------------------------------------------------------
# fixtures: a tiny saved model, broken copies of it, bad files, and the forward counter
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Every file and folder the CLI cases name (made once; each case only reads them)."""
    root = tmp_path_factory.mktemp("bad")
    tiny = root / "tiny"
    tiny_model().save(tiny)
    f = {"root": str(root), "tiny": str(tiny)}

    def config_variant(name: str, edit: Callable[[dict], None] | None = None, text: str | None = None) -> None:
        d = root / name
        d.mkdir()
        (d / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
        if text is None:
            cfg = json.loads((tiny / "config.json").read_text())
            edit(cfg)
            text = json.dumps(cfg)
        (d / "config.json").write_text(text)
        f[name] = str(d)

    raw = (tiny / "config.json").read_text()
    config_variant("guidance_infinity", text=raw.replace('"guidance": 5.0', '"guidance": Infinity'))
    config_variant("guidance_nan", text=raw.replace('"guidance": 5.0', '"guidance": NaN'))
    config_variant("guidance_1e400", text=raw.replace('"guidance": 5.0', '"guidance": 1e400'))
    config_variant("guidance_1e30", lambda c: c.update(guidance=1e30))
    config_variant("flow_shift_neg", lambda c: c.update(flow_shift=-1.0))
    config_variant("flow_shift_zero", lambda c: c.update(flow_shift=0))
    config_variant("flow_shift_inf", text=raw.replace('"flow_shift": 3.0', '"flow_shift": Infinity'))
    config_variant("frames_zero", lambda c: c.update(frames=0))
    config_variant("frames_float", lambda c: c.update(frames=4.0))
    config_variant("frames_beyond_rope", lambda c: c.update(frames=130))
    config_variant("heads_float", lambda c: c.update(num_heads=2.5))
    config_variant("patch_two", lambda c: c.update(patch_size=[2, 4]))
    config_variant("prediction_noise", lambda c: c.update(prediction="noise"))
    config_variant("unknown_key", lambda c: c.update(dropout=0.1))
    config_variant("not_object", text="[1, 2, 3]")
    config_variant("bad_json", text=raw[: len(raw) // 2])
    config_variant("sha_wrong", lambda c: c.update(weights_sha256={"model.safetensors": "0" * 64}))
    config_variant("sha_string", lambda c: c.update(weights_sha256="abc"))
    # a NaN inside a tensor whose file and header are intact, its checksum re-recorded: only the finite check sees it
    nan_dir = root / "nan_weights"
    nan_dir.mkdir()
    state = load_file(str(tiny / "model.safetensors"))
    name = sorted(k for k in state if k.endswith("weight"))[0]
    state[name] = state[name].clone()
    state[name].view(-1)[3] = float("nan")
    save_file(state, str(nan_dir / "model.safetensors"))
    cfg = json.loads(raw)
    cfg.pop("weights_sha256")
    (nan_dir / "config.json").write_text(json.dumps(cfg))
    f["nan_weights"] = str(nan_dir)
    f["nan_tensor"] = name
    # flipped bytes in the payload, the old checksum kept
    flip = root / "flipped"
    flip.mkdir()
    data = bytearray((tiny / "model.safetensors").read_bytes())
    for i in range(len(data) - 2000, len(data) - 1000):
        data[i] ^= 0x5A
    (flip / "model.safetensors").write_bytes(bytes(data))
    (flip / "config.json").write_text(raw)
    f["flipped"] = str(flip)
    # video files
    from vdit_accel.instrument.video import write_video

    frames = np.zeros((4, 16, 16, 3), np.uint8)
    write_video(frames, root / "ok.mp4")
    (root / "empty.mp4").write_bytes(b"")
    mp4 = (root / "ok.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(mp4[: len(mp4) // 3])
    write_video(np.zeros((4, 16, 32, 3), np.uint8), root / "wide.gif")
    gif = (root / "wide.gif").read_bytes()
    (root / "truncated.gif").write_bytes(gif[: len(gif) // 2])
    (root / "clip.txt").write_text("not a video")
    # output-path obstacles
    (root / "folder.mp4").mkdir()
    (root / "folder.json").mkdir()
    (root / "exists.mp4").write_bytes(b"keep me")
    (root / "exists.gif").write_bytes(b"keep me")
    (root / "exists.json").write_text("{}")
    (root / "exists.safetensors").write_bytes(b"keep me")
    (root / "companion.gif").write_bytes(b"keep me")
    (root / "a_file").write_text("a file, not a folder")
    for folder, result in (("old-bench", "results.json"), ("old-step", "bench-step.json")):  # an earlier run's
        (root / folder).mkdir()
        (root / folder / result).write_bytes(b"keep me")
    return f


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """Counts transformer forwards of every model ``EmbeddedModel.load`` returns during the test (this test only)."""
    calls = [0]
    original = EmbeddedModel.load.__func__

    def counting_load(cls, *args, **kwargs):
        m = original(cls, *args, **kwargs)
        m.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return m

    monkeypatch.setattr(EmbeddedModel, "load", classmethod(counting_load))
    return calls


# ---------------------------------------------------------------------------------------------------------------
# CLI cases: (id, argv with {placeholders} from `files`, stderr pattern naming the value, before compute?)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliCase:
    id: str
    argv: list[str]
    match: str
    before_compute: bool = True


GEN = ["generate", TINY_PROMPT, "--weights", "{tiny}", "--steps", "2", "--quiet", "--out", "{root}/never.mp4"]


def gen(*extra: str, out: str | None = None) -> list[str]:
    argv = list(GEN)
    if out is not None:
        argv[-1] = out
    return argv + list(extra)


CLI_CASES = [
    # generate: steps (stated bound 1000), seeds (2**63 - 1), guidance (50), flow shift (100)
    CliCase("steps-0", gen("--steps", "0"), r"steps=0 is out of range: accepted an int in \[1, 1000\]"),
    CliCase("steps-negative", gen("--steps", "-3"), r"steps=-3 is out of range"),
    CliCase("steps-1001", gen("--steps", "1001"), r"steps=1001 is out of range: accepted an int in \[1, 1000\]"),
    CliCase("steps-1e9", gen("--steps", "1e9"), r"steps='1e9' is not accepted: expected an int"),
    CliCase("steps-float", gen("--steps", "2.5"), r"steps='2.5' is not accepted: expected an int"),
    CliCase("steps-word", gen("--steps", "many"), r"steps='many' is not accepted"),
    CliCase("seed-negative", gen("--seed", "-1"), r"seed=-1 is out of range"),
    CliCase("seed-2**63", gen("--seed", BIG_SEED), rf"seed={BIG_SEED} is out of range: accepted an int in \[0, "),
    CliCase("seed-2**64", gen("--seed", HUGE_SEED), rf"seed={HUGE_SEED} is out of range"),
    CliCase("seed-float", gen("--seed", "1.5"), r"seed='1.5' is not accepted"),
    CliCase("guidance-inf", gen("--guidance", "inf"), r"guidance=inf is out of range: accepted finite values in "
            r"\[0.0, 50.0\]"),
    CliCase("guidance-minus-inf", gen("--guidance=-inf"), r"guidance=-inf is out of range"),
    CliCase("guidance-nan", gen("--guidance", "nan"), r"guidance=nan is out of range"),
    CliCase("guidance-1e30", gen("--guidance", "1e30"), r"guidance=1e\+30 is out of range"),
    CliCase("guidance-50.5", gen("--guidance", "50.5"), r"guidance=50.5 is out of range"),
    CliCase("guidance-negative", gen("--guidance", "-1"), r"guidance=-1.0 is out of range"),
    CliCase("guidance-word", gen("--guidance", "strong"), r"guidance='strong' is not accepted"),
    CliCase("flow-shift-0", gen("--flow-shift", "0"), r"flow_shift=0.0 is out of range: accepted finite values in "
            r"\(0.0, 100.0\]"),
    CliCase("flow-shift-negative", gen("--flow-shift", "-1"), r"flow_shift=-1.0 is out of range"),
    CliCase("flow-shift-inf", gen("--flow-shift", "inf"), r"flow_shift=inf is out of range"),
    CliCase("flow-shift-nan", gen("--flow-shift", "nan"), r"flow_shift=nan is out of range"),
    CliCase("flow-shift-1e6", gen("--flow-shift", "1e6"), r"flow_shift=1000000.0 is out of range"),
    # generate: output paths, all before compute
    CliCase("out-empty", gen(out=""), r"--out='' is not accepted"),
    CliCase("out-txt", gen(out="{root}/clip.txt"), r"clip.txt' has extension '.txt': accepted \['.mp4', '.gif'\]"),
    CliCase("out-no-extension", gen(out="{root}/clip"), r"clip' has extension '': accepted"),
    CliCase("out-is-folder", gen(out="{root}/folder.mp4"), r"folder.mp4' is a directory"),
    CliCase("out-exists", gen(out="{root}/exists.mp4"), r"exists.mp4' already exists: pass --overwrite"),
    CliCase("out-gif-exists", gen(out="{root}/exists.gif"), r"exists.gif' already exists"),
    CliCase("out-companion-gif-exists", gen(out="{root}/companion.mp4"), r"companion.gif' already exists"),
    CliCase("out-parent-is-file", gen(out="{root}/a_file/clip.mp4"), r"a_file' is a file, not a folder"),
    CliCase("out-read-only-fs", gen(out="/proc/vdit-accel-test/clip.mp4"), r"folder '/proc' is not writable"),
    CliCase("save-tensor-pt", gen("--save-tensor", "{root}/video.pt"), r"video.pt' has extension '.pt': accepted "
            r"\['.safetensors'\]"),
    CliCase("save-tensor-exists", gen("--save-tensor", "{root}/exists.safetensors"), r"exists.safetensors' already"),
    # generate: names, prompts, presets
    CliCase("method-unknown", gen("--method", "warp"), r"argument --method: invalid choice: 'warp'"),
    CliCase("preset-without-method", gen("--preset", "astraea-2x"), r"--preset needs --method"),
    CliCase("prompt-unknown-word", ["generate", "a red hexagon moves left on a blue background", "--weights",
                                    "{tiny}", "--out", "{root}/never.mp4"], r"hexagon"),
    CliCase("unknown-flag", gen("--frobnicate"), r"unrecognized arguments: --frobnicate"),
    # generate: the model's config.json and weights
    CliCase("weights-missing", gen("--weights", "{root}/nowhere"), r"nowhere/config.json' is missing"),
    CliCase("config-guidance-Infinity", gen("--weights", "{guidance_infinity}"), r"value Infinity is not accepted"),
    CliCase("config-guidance-NaN", gen("--weights", "{guidance_nan}"), r"value NaN is not accepted"),
    CliCase("config-guidance-1e400", gen("--weights", "{guidance_1e400}"), r"guidance=inf is out of range"),
    CliCase("config-guidance-1e30", gen("--weights", "{guidance_1e30}"), r"guidance=1e\+30 is out of range"),
    CliCase("config-flow-shift-negative", gen("--weights", "{flow_shift_neg}"), r"flow_shift=-1.0 is out of range"),
    CliCase("config-flow-shift-0", gen("--weights", "{flow_shift_zero}"), r"flow_shift=0.0 is out of range"),
    CliCase("config-flow-shift-inf", gen("--weights", "{flow_shift_inf}"), r"value Infinity is not accepted"),
    CliCase("config-frames-0", gen("--weights", "{frames_zero}"), r"frames=0 is out of range"),
    CliCase("config-frames-float", gen("--weights", "{frames_float}"), r"frames=4.0 is not accepted: expected an int"),
    CliCase("config-frames-beyond-rope", gen("--weights", "{frames_beyond_rope}"), r"frames=130 is out of range: "
            r"accepted an int in \[1, 128\]"),
    CliCase("config-heads-float", gen("--weights", "{heads_float}"), r"num_heads=2.5 is not accepted"),
    CliCase("config-patch-two", gen("--weights", "{patch_two}"), r"patch_size=\[2, 4\] is not accepted"),
    CliCase("config-prediction", gen("--weights", "{prediction_noise}"), r"prediction='noise' is not known"),
    CliCase("config-unknown-key", gen("--weights", "{unknown_key}"), r"unknown keys \['dropout'\]"),
    CliCase("config-not-object", gen("--weights", "{not_object}"), r"holds a list: expected a JSON object"),
    CliCase("config-truncated", gen("--weights", "{bad_json}"), r"is not valid JSON"),
    CliCase("weights-checksum-wrong", gen("--weights", "{sha_wrong}"), r"records '0000000000"),
    CliCase("weights-checksum-malformed", gen("--weights", "{sha_string}"), r"weights_sha256='abc' is not accepted"),
    CliCase("weights-flipped-bytes", gen("--weights", "{flipped}"), r"has SHA-256 [0-9a-f]{64}, but .* records"),
    CliCase("weights-nan-tensor", gen("--weights", "{nan_weights}"), r"has 1 non-finite values"),
    # score
    CliCase("score-missing", ["score", "{root}/nowhere.mp4", "--prompt", TINY_PROMPT], r"nowhere.mp4' is missing"),
    CliCase("score-empty", ["score", "{root}/empty.mp4", "--prompt", TINY_PROMPT], r"empty.mp4' is empty"),
    CliCase("score-truncated-mp4", ["score", "{root}/truncated.mp4", "--prompt", TINY_PROMPT],
            r"truncated.mp4' is truncated or not a readable"),
    CliCase("score-truncated-gif", ["score", "{root}/truncated.gif", "--prompt", TINY_PROMPT],
            r"truncated.gif' is truncated or not a readable"),
    CliCase("score-non-square", ["score", "{root}/wide.gif", "--prompt", TINY_PROMPT], r"wide.gif' is 64x32 pixels"),
    CliCase("score-txt", ["score", "{root}/clip.txt", "--prompt", TINY_PROMPT], r"clip.txt' has suffix '.txt'"),
    CliCase("score-no-prompt", ["score", "{root}/ok.mp4"], r"score needs CLIP and --prompt"),
    CliCase("score-bad-prompt", ["score", "{root}/ok.mp4", "--prompt", "a red hexagon moves left on a blue "
                                 "background"], r"hexagon"),
    CliCase("score-ground-truth-negative", ["score", "--ground-truth", "-1"], r"ground_truth=-1 is out of range"),
    CliCase("score-ground-truth-float", ["score", "--ground-truth", "1.5"], r"ground_truth='1.5' is not accepted"),
    CliCase("score-object-size-0", ["score", "--ground-truth", "2", "--object-size", "0", "0.5"],
            r"object_size=0.0 is out of range"),
    CliCase("score-object-size-nan", ["score", "--ground-truth", "2", "--object-size", "nan", "0.5"],
            r"object_size=nan is out of range"),
    CliCase("score-layout", ["score", "--ground-truth", "2", "--layout", "diagonal"], r"invalid choice: 'diagonal'"),
    # inspect
    CliCase("inspect-steps-0", ["inspect", "--steps", "0", "--weights", "{tiny}"], r"steps=0 is out of range"),
    CliCase("inspect-steps-5000", ["inspect", "--steps", "5000", "--weights", "{tiny}"], r"steps=5000 is out"),
    CliCase("inspect-out-txt", ["inspect", "--steps", "2", "--weights", "{tiny}", "--out", "{root}/r.txt"],
            r"r.txt' has extension '.txt': accepted \['.json'\]"),
    CliCase("inspect-out-exists", ["inspect", "--steps", "2", "--weights", "{tiny}", "--out", "{root}/exists.json"],
            r"exists.json' already exists"),
    CliCase("inspect-prompts", ["inspect", "--steps", "2", "--weights", "{tiny}", "--prompts", "nonsense"],
            r"prompts='nonsense' is neither"),
    # train
    CliCase("train-max-steps-0", ["train", "--recipe", "scratch", "--max-steps", "0", "--out", "{root}/never-t"],
            r"max_steps=0 is out of range"),
    CliCase("train-max-steps-negative", ["train", "--recipe", "scratch", "--max-steps", "-5", "--out",
                                         "{root}/never-t"], r"max_steps=-5 is out of range"),
    CliCase("train-max-steps-float", ["train", "--recipe", "scratch", "--max-steps", "0.5", "--out",
                                      "{root}/never-t"], r"max_steps='0.5' is not accepted"),
    CliCase("train-seed-negative", ["train", "--recipe", "scratch", "--seed", "-1", "--out", "{root}/never-t"],
            r"seed=-1 is out of range"),
    CliCase("train-seed-2**64", ["train", "--recipe", "scratch", "--seed", HUGE_SEED, "--out", "{root}/never-t"],
            rf"seed={HUGE_SEED} is out of range"),
    CliCase("train-out-is-file", ["train", "--recipe", "scratch", "--max-steps", "1", "--out", "{root}/a_file"],
            r"a_file' is a file, not a folder"),
    CliCase("train-recipe", ["train", "--recipe", "overnight", "--out", "{root}/never-t"], r"recipe='overnight'"),
    CliCase("train-finetune-no-init", ["train", "--recipe", "finetune", "--out", "{root}/never-t"],
            r"needs --init-from"),
    # bench
    CliCase("bench-seeds-0", ["bench", "--seeds", "0", "--weights", "{tiny}", "--out", "{root}/never-b"],
            r"seeds=0 is out of range"),
    CliCase("bench-steps-0", ["bench", "--steps", "0", "--weights", "{tiny}", "--out", "{root}/never-b"],
            r"steps=0 is out of range"),
    CliCase("bench-guidance-inf", ["bench", "--guidance", "inf", "--weights", "{tiny}", "--out", "{root}/never-b"],
            r"guidance=inf is out of range"),
    CliCase("bench-method-unknown", ["bench", "--methods", "dense,warp-drive", "--weights", "{tiny}", "--out",
                                     "{root}/never-b"], r"warp-drive"),
    CliCase("bench-out-is-file", ["bench", "--quick", "--weights", "{tiny}", "--out", "{root}/a_file"],
            r"a_file' is a file, not a folder"),
    CliCase("bench-out-has-results", ["bench", "--quick", "--weights", "{tiny}", "--out", "{root}/old-bench"],
            r"--out='.*old-bench': '.*old-bench/results.json' already exists .*pass --overwrite"),
    # bench-step
    CliCase("bench-step-no-out", ["bench-step", "--tiny"], r"bench-step needs --out"),
    CliCase("bench-step-out-has-results", ["bench-step", "--tiny", "--out", "{root}/old-step"],
            r"--out='.*old-step': '.*old-step/bench-step.json' already exists .*pass --overwrite"),
    CliCase("bench-step-latency-model-exists", ["bench-step", "--tiny", "--out", "{root}/never-s", "--latency-model",
                                                "{root}/exists.json"],
            r"--latency-model='.*exists.json' already exists: pass --overwrite"),
    CliCase("bench-step-layers-0", ["bench-step", "--tiny", "--layers", "0", "--out", "{root}/never-s"],
            r"layers=0 is out of range"),
    CliCase("bench-step-budget-1.5", ["bench-step", "--tiny", "--budgets", "1.5", "--out", "{root}/never-s"],
            r"budgets=1.5 is out of range"),
    CliCase("bench-step-budget-nan", ["bench-step", "--tiny", "--budgets", "nan", "--out", "{root}/never-s"],
            r"budgets=nan is out of range"),
    CliCase("bench-step-order-3", ["bench-step", "--tiny", "--orders", "3", "--out", "{root}/never-s"],
            r"orders=3 is out of range"),
    CliCase("bench-step-dtype", ["bench-step", "--tiny", "--dtype", "float8", "--out", "{root}/never-s"],
            r"invalid choice: 'float8'"),
    CliCase("bench-step-latent-0", ["bench-step", "--tiny", "--latent", "0", "8", "8", "--out", "{root}/never-s"],
            r"latent=0 is out of range"),
    # calibrate
    CliCase("calibrate-method", ["calibrate", "warp"], r"invalid choice: 'warp'"),
    CliCase("calibrate-no-target", ["calibrate", "timeripple", "--weights", "{tiny}"], r"needs --target"),
    CliCase("calibrate-target-0", ["calibrate", "timeripple", "--target", "0"], r"target=0.0 is out of range"),
    CliCase("calibrate-target-inf", ["calibrate", "timeripple", "--target", "inf"], r"target=inf is out of range"),
    CliCase("calibrate-speedup-1", ["calibrate", "timeripple", "--target-speedup", "1"],
            r"target_speedup=1.0 is out of range"),
    CliCase("calibrate-speedup-nan", ["calibrate", "timeripple", "--target-speedup", "nan"],
            r"target_speedup=nan is out of range"),
    CliCase("calibrate-n-prompts-0", ["calibrate", "timeripple", "--target", "0.5", "--n-prompts", "0"],
            r"n_prompts=0 is out of range"),
    CliCase("calibrate-steps-0", ["calibrate", "timeripple", "--target", "0.5", "--steps", "0"], r"steps=0 is out"),
    CliCase("calibrate-op-grid-0", ["calibrate", "timeripple", "--target-speedup", "1.5", "--op-grid", "0", "4", "4"],
            r"op_grid=0 is out of range"),
    CliCase("calibrate-timeripple-out-in-package", ["calibrate", "timeripple", "--target", "0.5", "--weights",
                                                    "{tiny}", "--steps", "2", "--out", f"{PKG}/presets/x.json"],
            r"is inside the installed package"),
    CliCase("calibrate-magcache-out-in-package", ["calibrate", "magcache", "--weights", "{tiny}", "--steps", "2",
                                                  "--out", f"{PKG}/methods/magcache_ratios.json"],
            r"is inside the installed package"),
    CliCase("calibrate-magcache-out-txt", ["calibrate", "magcache", "--weights", "{tiny}", "--steps", "2",
                                           "--out", "{root}/ratios.txt"], r"ratios.txt' has extension '.txt'"),
    # search
    CliCase("search-method", ["search", "warp", "--target", "0.5"], r"invalid choice: 'warp'"),
    CliCase("search-no-target", ["search", "astraea", "--weights", "{tiny}"], r"needs exactly one of --target"),
    CliCase("search-target-0", ["search", "astraea", "--target", "0"], r"target=0.0 is out of range"),
    CliCase("search-target-1.5", ["search", "astraea", "--target", "1.5"], r"target=1.5 is out of range"),
    CliCase("search-speedup-0.5", ["search", "astraea", "--target-speedup", "0.5"], r"target_speedup=0.5 is out"),
    CliCase("search-speedup-no-latency", ["search", "astraea", "--target-speedup", "2", "--weights", "{tiny}"],
            r"needs --latency-model"),
    CliCase("search-population-0", ["search", "astraea", "--target", "0.5", "--population", "0"],
            r"population=0 is out of range"),
    CliCase("search-generations-0", ["search", "astraea", "--target", "0.5", "--generations", "0"],
            r"generations=0 is out of range"),
    CliCase("search-seed-2**64", ["search", "astraea", "--target", "0.5", "--seed", HUGE_SEED],
            rf"seed={HUGE_SEED} is out of range"),
    CliCase("search-steps-0", ["search", "astraea", "--target", "0.5", "--steps", "0"], r"steps=0 is out of range"),
    CliCase("search-max-segment-0", ["search", "astraea", "--target-speedup", "2", "--max-segment", "0"],
            r"max_segment=0 is out of range"),
    CliCase("search-dense-steps-budget-mode", ["search", "astraea", "--target", "0.5", "--dense-steps", "2",
                                               "--weights", "{tiny}"], r"--dense-steps=2 applies to --target-speedup"),
    CliCase("search-out-in-package", ["search", "astraea", "--target", "0.5", "--weights", "{tiny}", "--out",
                                      f"{PKG}/presets/astraea-50.json"], r"is inside the installed package"),
    CliCase("search-out-folder", ["search", "astraea", "--target", "0.5", "--weights", "{tiny}", "--out",
                                  "{root}/folder.json"], r"--out='.*folder.json' is a directory"),
    CliCase("search-plot-txt", ["search", "astraea", "--target", "0.5", "--weights", "{tiny}", "--plot",
                                "{root}/plot.txt"], r"--plot='.*plot.txt' has extension '.txt': accepted \['.png'\]"),
    CliCase("search-checkpoint-file", ["search", "astraea", "--target", "0.5", "--weights", "{tiny}",
                                       "--checkpoint", "{root}/a_file"], r"a_file' is a file, not a folder"),
    CliCase("calibrate-out-txt", ["calibrate", "timeripple", "--target", "0.5", "--weights", "{tiny}", "--out",
                                  "{root}/preset.txt"], r"preset.txt' has extension '.txt': accepted \['.json'\]"),
    CliCase("bench-step-latency-model-folder", ["bench-step", "--tiny", "--out", "{root}/never-s", "--latency-model",
                                                "{root}/folder.json"], r"folder.json' is a directory"),
    # the command line itself
    CliCase("no-command", [], r"the following arguments are required: cmd"),
    CliCase("unknown-command", ["accelerate"], r"invalid choice: 'accelerate'"),
]


def _fill(argv: list[str], files: dict[str, str]) -> list[str]:
    return [a.format(**files) for a in argv]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input_exits_2_before_compute(case: CliCase, files, forwards, capsys):
    before = sorted(p.name for p in Path(files["root"]).iterdir())
    assert main(_fill(case.argv, files)) == 2
    err = capsys.readouterr().err
    assert re.search(r"^vdit-accel( [\w-]+)?: error: ", err), err
    assert re.search(case.match, err), err
    assert "Traceback" not in err
    if case.before_compute:
        assert forwards[0] == 0
    assert sorted(p.name for p in Path(files["root"]).iterdir()) == before  # nothing written, nothing removed
    for name in ("exists.mp4", "exists.gif", "companion.gif", "exists.safetensors", "old-bench/results.json",
                 "old-step/bench-step.json"):
        assert (Path(files["root"]) / name).read_bytes() == b"keep me"


# ---------------------------------------------------------------------------------------------------------------
# API cases: a callable on a tiny model that carries a forward counter
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiCase:
    id: str
    call: Callable[[EmbeddedModel], object]
    error: type[VditAccelError]
    match: str
    before_compute: bool = True
    tags: tuple[str, ...] = field(default=())


def sample(**kw) -> Callable[[EmbeddedModel], object]:
    return lambda m: Sampler(m)(TINY_PROMPT, GenerationConfig(steps=2, **kw), progress=False)


def with_latents(make: Callable[[], torch.Tensor]) -> Callable[[EmbeddedModel], object]:
    return lambda m: Sampler(m)(TINY_PROMPT, GenerationConfig(steps=2), progress=False, latents=make())


def nan_latents() -> torch.Tensor:
    x = torch.zeros(1, 3, 4, 8, 8)
    x[0, 1, 2, 3, 4] = float("nan")
    return x


def inf_latents() -> torch.Tensor:
    x = torch.zeros(1, 3, 4, 8, 8)
    x[0, 0, 0, 0, 0] = float("inf")
    return x


def poisoned(block: int, branch_weight: str = "ffn.net.0.proj.weight") -> Callable[[EmbeddedModel], object]:
    def run(m: EmbeddedModel):
        with torch.no_grad():
            m.transformer.blocks[block].get_parameter(branch_weight).view(-1)[0] = float("nan")
        return Sampler(m)(TINY_PROMPT, GenerationConfig(steps=2), progress=False)

    return run


def gen_cfg(**kw) -> Callable[[EmbeddedModel], object]:
    return lambda m: GenerationConfig(**kw)


def emb_cfg(**kw) -> Callable[[EmbeddedModel], object]:
    return lambda m: EmbeddedConfig(**{**_tiny_kwargs(), **kw})


def _tiny_kwargs() -> dict:
    c = EmbeddedConfig.tiny()
    return {f: getattr(c, f) for f in ("model_id", "frames", "height", "width", "num_layers", "head_dim", "ffn_dim",
                                       "text_dim", "freq_dim")}


def astraea(**kw) -> Callable[[EmbeddedModel], object]:
    from vdit_accel.methods.astraea import AstraeaConfig

    return lambda m: AstraeaConfig(**{"num_steps": 4, **kw})


def timeripple(**kw) -> Callable[[EmbeddedModel], object]:
    from vdit_accel.methods.timeripple import TimeRippleConfig

    return lambda m: TimeRippleConfig(**{"i_min": 0, "i_max": 1, "num_steps": 4, **kw})


def scored(frames: np.ndarray) -> Callable[[EmbeddedModel], object]:
    from vdit_accel.instrument.score import score

    return lambda m: score(frames, TINY_PROMPT)


INF, NAN = math.inf, math.nan

API_CASES = [
    # GenerationConfig: steps
    ApiCase("gen-steps-0", gen_cfg(steps=0), ConfigError, r"steps=0 is out of range: accepted an int in \[1, 1000\]"),
    ApiCase("gen-steps-1001", gen_cfg(steps=1001), ConfigError, r"steps=1001 is out of range"),
    ApiCase("gen-steps-1e9", gen_cfg(steps=10**9), ConfigError, r"steps=1000000000 is out of range"),
    ApiCase("gen-steps-float", gen_cfg(steps=2.5), ConfigError, r"steps=2.5 is not accepted: expected an int"),
    ApiCase("gen-steps-integral-float", gen_cfg(steps=50.0), ConfigError, r"steps=50.0 is not accepted"),
    ApiCase("gen-steps-bool", gen_cfg(steps=True), ConfigError, r"steps=True is not accepted"),
    ApiCase("gen-steps-str", gen_cfg(steps="50"), ConfigError, r"steps='50' is not accepted"),
    ApiCase("gen-steps-none", gen_cfg(steps=None), ConfigError, r"steps=None is not accepted"),
    # guidance
    ApiCase("gen-guidance-inf", gen_cfg(guidance=INF), ConfigError, r"guidance=inf is out of range: accepted finite "
            r"values in \[0.0, 50.0\]"),
    ApiCase("gen-guidance-minus-inf", gen_cfg(guidance=-INF), ConfigError, r"guidance=-inf is out of range"),
    ApiCase("gen-guidance-nan", gen_cfg(guidance=NAN), ConfigError, r"guidance=nan is out of range"),
    ApiCase("gen-guidance-1e30", gen_cfg(guidance=1e30), ConfigError, r"guidance=1e\+30 is out of range"),
    ApiCase("gen-guidance-50.01", gen_cfg(guidance=50.01), ConfigError, r"guidance=50.01 is out of range"),
    ApiCase("gen-guidance-negative", gen_cfg(guidance=-0.5), ConfigError, r"guidance=-0.5 is out of range"),
    ApiCase("gen-guidance-str", gen_cfg(guidance="5"), ConfigError, r"guidance='5' is not accepted"),
    ApiCase("gen-guidance-bool", gen_cfg(guidance=True), ConfigError, r"guidance=True is not accepted"),
    # seed
    ApiCase("gen-seed-negative", gen_cfg(seed=-1), ConfigError, r"seed=-1 is out of range"),
    ApiCase("gen-seed-2**63", gen_cfg(seed=2**63), ConfigError, rf"seed={2**63} is out of range: accepted an int "
            rf"in \[0, {2**63 - 1}\]"),
    ApiCase("gen-seed-2**64", gen_cfg(seed=2**64), ConfigError, rf"seed={2**64} is out of range"),
    ApiCase("gen-seed-float", gen_cfg(seed=1.5), ConfigError, r"seed=1.5 is not accepted"),
    ApiCase("gen-seed-bool", gen_cfg(seed=False), ConfigError, r"seed=False is not accepted"),
    # flow shift
    ApiCase("gen-flow-shift-0", gen_cfg(flow_shift=0.0), ConfigError, r"flow_shift=0.0 is out of range"),
    ApiCase("gen-flow-shift-negative", gen_cfg(flow_shift=-1.0), ConfigError, r"flow_shift=-1.0 is out of range"),
    ApiCase("gen-flow-shift-inf", gen_cfg(flow_shift=INF), ConfigError, r"flow_shift=inf is out of range"),
    ApiCase("gen-flow-shift-nan", gen_cfg(flow_shift=NAN), ConfigError, r"flow_shift=nan is out of range"),
    ApiCase("gen-flow-shift-1e6", gen_cfg(flow_shift=1e6), ConfigError, r"flow_shift=1000000.0 is out of range"),
    ApiCase("gen-flow-shift-str", gen_cfg(flow_shift="3"), ConfigError, r"flow_shift='3' is not accepted"),
    # geometry: 0 is never silently the model's default
    ApiCase("gen-frames-0", gen_cfg(frames=0), ConfigError, r"frames=0 is out of range"),
    ApiCase("gen-frames-negative", gen_cfg(frames=-4), ConfigError, r"frames=-4 is out of range"),
    ApiCase("gen-frames-float", gen_cfg(frames=2.5), ConfigError, r"frames=2.5 is not accepted"),
    ApiCase("gen-height-0", gen_cfg(height=0), ConfigError, r"height=0 is out of range"),
    ApiCase("gen-width-bool", gen_cfg(width=True), ConfigError, r"width=True is not accepted"),
    ApiCase("gen-check-finite-str", gen_cfg(check_finite="yes"), ConfigError, r"check_finite='yes' is not accepted"),
    ApiCase("sample-frames-odd", sample(frames=5), ConfigError, r"frames=5 is not accepted: it must be a positive "
            r"multiple of the patch size 2"),
    ApiCase("sample-height-not-multiple", sample(height=6), ConfigError, r"height=6 is not accepted"),
    ApiCase("sample-frames-beyond-rope", sample(frames=130), ConfigError, r"frames=130 is out of range: accepted an "
            r"int in \[1, 128\]"),
    ApiCase("sample-width-beyond-rope", sample(width=260), ConfigError, r"width=260 is out of range: accepted an int "
            r"in \[1, 256\]"),
    # sampler inputs
    ApiCase("sample-latents-nan", with_latents(nan_latents), NonFiniteError, r"latents has 1 non-finite values"),
    ApiCase("sample-latents-inf", with_latents(inf_latents), NonFiniteError, r"latents has 1 non-finite values"),
    ApiCase("sample-latents-shape", with_latents(lambda: torch.zeros(1, 3, 4, 8, 16)), ConfigError,
            r"latents of shape \(1, 3, 4, 8, 16\) are not accepted: expected \(1, 3, 4, 8, 8\)"),
    ApiCase("sample-latents-int", with_latents(lambda: torch.zeros(1, 3, 4, 8, 8, dtype=torch.int64)), ConfigError,
            r"latents of dtype torch.int64 are not accepted"),
    ApiCase("sample-no-prompts", lambda m: Sampler(m)([], GenerationConfig(steps=2), progress=False), ConfigError,
            r"prompts=\[\] is not accepted"),
    ApiCase("sample-bad-prompt", lambda m: Sampler(m)("a red hexagon moves left on a blue background",
                                                      GenerationConfig(steps=2), progress=False), PromptError,
            r"hexagon"),
    # non-finite model output: found at the step, after that step's forward (not before compute)
    ApiCase("sample-nan-weight-block-1", poisoned(1), NonFiniteError, r"step 0 of 2 is non-finite.*transformer\."
            r"blocks.1", before_compute=False),
    ApiCase("sample-nan-weight-block-0", poisoned(0), NonFiniteError, r"step 0 of 2 is non-finite.*transformer\."
            r"blocks.0", before_compute=False),
    # EmbeddedConfig (what config.json becomes)
    ApiCase("model-guidance-inf", emb_cfg(guidance=INF), ConfigError, r"guidance=inf is out of range"),
    ApiCase("model-guidance-51", emb_cfg(guidance=51.0), ConfigError, r"guidance=51.0 is out of range"),
    ApiCase("model-flow-shift-negative", emb_cfg(flow_shift=-1.0), ConfigError, r"flow_shift=-1.0 is out of range"),
    ApiCase("model-flow-shift-0", emb_cfg(flow_shift=0.0), ConfigError, r"flow_shift=0.0 is out of range"),
    ApiCase("model-flow-shift-inf", emb_cfg(flow_shift=INF), ConfigError, r"flow_shift=inf is out of range"),
    ApiCase("model-flow-shift-nan", emb_cfg(flow_shift=NAN), ConfigError, r"flow_shift=nan is out of range"),
    ApiCase("model-frames-0", emb_cfg(frames=0), ConfigError, r"frames=0 is out of range"),
    ApiCase("model-frames-float", emb_cfg(frames=4.5), ConfigError, r"frames=4.5 is not accepted"),
    ApiCase("model-height-beyond-rope", emb_cfg(height=512), ConfigError, r"height=512 is out of range"),
    ApiCase("model-layers-float", emb_cfg(num_layers=1.5), ConfigError, r"num_layers=1.5 is not accepted"),
    ApiCase("model-head-dim-0", emb_cfg(head_dim=0), ConfigError, r"head_dim=0 is out of range"),
    ApiCase("model-patch-float", emb_cfg(patch_size=(2, 4.0, 4)), ConfigError, r"patch_size\[1\]=4.0 is not"),
    ApiCase("model-prediction", emb_cfg(prediction="noise"), ConfigError, r"prediction='noise' is not known"),
    ApiCase("model-load-require-checksum", lambda m: EmbeddedModel.load(_saved_without_checksum(m),
                                                                        require_checksum=True),
            WeightsError, r"records no weights_sha256"),
    # method configs: checked on construction, never mid-run
    ApiCase("astraea-w-alpha-inf", astraea(w_alpha=INF), ConfigError, r"w_alpha=inf is out of range"),
    ApiCase("astraea-w-beta-nan", astraea(w_beta=NAN), ConfigError, r"w_beta=nan is out of range"),
    ApiCase("astraea-num-steps-float", astraea(num_steps=2.5), ConfigError, r"num_steps=2.5"),
    ApiCase("astraea-target-inf", astraea(target=INF), ConfigError, r"target=inf is out of range"),
    ApiCase("astraea-budget-nan", astraea(budgets=(1.0, NAN, 0.5, 0.5)), ConfigError, r"budgets\[1\]=nan"),
    ApiCase("astraea-memory-cap-inf", astraea(memory_cap_mb=INF), ConfigError, r"memory_cap_mb=inf is out of range"),
    ApiCase("timeripple-layer-float", timeripple(layers=(0.9,)), ConfigError, r"layers\[0\]=0.9 is not accepted: "
            r"expected an int"),
    ApiCase("timeripple-layer-negative", timeripple(layers=(-1,)), ConfigError, r"layers\[0\]=-1 is out of range"),
    ApiCase("timeripple-layers-int", timeripple(layers=3), ConfigError, r"layers=3 is not accepted"),
    # score and video files
    ApiCase("score-non-square", scored(np.zeros((4, 16, 32, 3), np.uint8)), ConfigError, r"must be square .*"
            r"\(4, 16, 32, 3\)"),
    ApiCase("score-no-frames", scored(np.zeros((0, 16, 16, 3), np.uint8)), ConfigError, r"\(0, 16, 16, 3\)"),
    ApiCase("score-float-frames", scored(np.zeros((4, 16, 16, 3), np.float32)), ConfigError, r"ndarray of float32"),
    ApiCase("write-video-txt", lambda m: _write_video("clip.txt"), OutputPathError, r"clip.txt' has suffix '.txt'"),
    ApiCase("bench-metric-nan", lambda m: _check_metric(NAN), ConfigError, r"psnr=nan is not a number"),
    ApiCase("bench-config-guidance-inf", lambda m: _bench_config(guidance=INF), ConfigError, r"guidance=inf"),
]


def _saved_without_checksum(m: EmbeddedModel) -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vdit-no-sha-"))
    m.save(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("weights_sha256")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _write_video(name: str):
    import tempfile

    from vdit_accel.instrument.video import write_video

    with tempfile.TemporaryDirectory() as d:
        write_video(np.zeros((2, 8, 8, 3), np.uint8), Path(d) / name)


def _check_metric(value: float) -> float:
    from vdit_accel.bench.metrics import check_metric

    return check_metric("psnr", value)


def _bench_config(**kw):
    from vdit_accel.bench.harness import BenchConfig

    return BenchConfig(**kw)


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_bad_input_is_a_typed_error(case: ApiCase):
    model = tiny_model()
    calls = [0]
    model.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with pytest.raises(case.error) as info:
        case.call(model)
    assert isinstance(info.value, VditAccelError)
    assert re.search(case.match, str(info.value)), str(info.value)
    if case.before_compute:
        assert calls[0] == 0
    else:
        assert calls[0] >= 1


# ---------------------------------------------------------------------------------------------------------------
# edge inputs that are accepted, and stay accepted
# ---------------------------------------------------------------------------------------------------------------

ACCEPTED = [
    ("steps-1000", dict(steps=1000)), ("steps-1", dict(steps=1)), ("seed-max", dict(seed=2**63 - 1)),
    ("guidance-50", dict(guidance=50.0)), ("guidance-0", dict(guidance=0)), ("guidance-int", dict(guidance=5)),
    ("flow-shift-100", dict(flow_shift=100.0)), ("flow-shift-tiny", dict(flow_shift=1e-3)),
    ("numpy-int-seed", dict(seed=np.int64(7))), ("frames-none", dict(frames=None)),
    ("no-check-finite", dict(check_finite=False)),
]


@pytest.mark.parametrize("kw", [k for _, k in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_accepted_generation_settings_stay_accepted(kw):
    cfg = GenerationConfig(**kw)
    for k, v in kw.items():
        assert getattr(cfg, k) == v


def test_accepted_edge_generation_runs(tiny_model):
    """The largest accepted geometry of the tiny model's rotary table and the largest guidance still generate."""
    video = Sampler(tiny_model)(TINY_PROMPT, GenerationConfig(steps=1, guidance=50.0, frames=4, height=8, width=8),
                                progress=False)
    assert video.shape == (3, 4, 8, 8) and bool(torch.isfinite(video).all())
    assert Sampler(tiny_model).geometry(GenerationConfig(frames=128, height=256, width=256)) == (128, 256, 256)


def test_accepted_cli_edges(files, forwards, capsys, tmp_path):
    assert main(["generate", TINY_PROMPT, "--weights", files["tiny"], "--steps", "1", "--seed", str(2**63 - 1),
                 "--guidance", "50", "--flow-shift", "100", "--out", str(tmp_path / "edge.gif"), "--quiet"]) == 0
    assert (tmp_path / "edge.gif").stat().st_size > 0 and forwards[0] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge.gif"]  # a .gif --out writes no .mp4
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    from vdit_accel import __version__

    assert capsys.readouterr().out.strip() == f"vdit-accel {__version__}"


def test_usage_error_is_a_typed_error():
    assert issubclass(UsageError, VditAccelError) and issubclass(errors.OutputPathError, VditAccelError)


# the counts the report quotes: typed errors before compute / typed errors after a forward / accepted inputs
CATALOGUE_COUNTS = {
    "before_compute": sum(c.before_compute for c in CLI_CASES) + sum(c.before_compute for c in API_CASES),
    "after_compute": sum(not c.before_compute for c in CLI_CASES) + sum(not c.before_compute for c in API_CASES),
    "accepted": len(ACCEPTED) + 2,
}


def test_catalogue_size():
    assert len(CLI_CASES) + len(API_CASES) >= 120
    assert len({c.id for c in CLI_CASES}) == len(CLI_CASES) and len({c.id for c in API_CASES}) == len(API_CASES)


# ---------------------------------------------------------------------------------------------------------------
# CLI polish: every flag says what it does and its default; names have choices
# ---------------------------------------------------------------------------------------------------------------


def _subparsers():
    from vdit_accel.cli import build_parser

    parser = build_parser()
    return parser, parser._subparsers._group_actions[0].choices


def test_every_flag_has_help_that_states_its_default():
    parser, subs = _subparsers()
    missing = []
    for name, sub in subs.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            if not action.help:
                missing.append(f"{name} {action.dest}: no help")
            elif action.option_strings and "default" not in sub._get_formatter()._expand_help(action).lower():
                missing.append(f"{name} {action.option_strings[0]}: no default in its help")
        assert "%(default)" not in text
    assert missing == []


@pytest.mark.parametrize("command, dest", [("generate", "method"), ("calibrate", "method"), ("search", "method"),
                                           ("score", "layout"), ("bench-step", "dtype"), ("bench-step", "device")])
def test_names_have_choices(command, dest):
    _, subs = _subparsers()
    action = next(a for a in subs[command]._actions if a.dest == dest)
    assert action.choices and f"{{{','.join(action.choices)}}}" in subs[command].format_help().replace("\n", "")


def test_generate_method_choices_are_the_registry():
    from vdit_accel.registry import method_names

    _, subs = _subparsers()
    action = next(a for a in subs["generate"]._actions if a.dest == "method")
    assert sorted(action.choices) == sorted({"dense", *method_names()})


# ---------------------------------------------------------------------------------------------------------------
# property checks of the validation layer: any value is either accepted within its stated range or a ConfigError
# ---------------------------------------------------------------------------------------------------------------

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                      st.integers(-5, 5).map(np.int64), st.floats(-5, 5).map(np.float32))


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(steps=ANY_VALUE, guidance=ANY_VALUE, seed=ANY_VALUE, flow_shift=ANY_VALUE, frames=ANY_VALUE)
def test_generation_config_accepts_in_range_or_raises_config_error(steps, guidance, seed, flow_shift, frames):
    try:
        cfg = GenerationConfig(steps=steps, guidance=guidance, seed=seed, flow_shift=flow_shift, frames=frames)
    except ConfigError as e:
        assert "=" in str(e) and "accepted" in str(e)
        return
    assert isinstance(cfg.steps, (int, np.integer)) and not isinstance(cfg.steps, bool)
    assert 1 <= cfg.steps <= validate.MAX_STEPS and 0 <= cfg.seed <= validate.MAX_SEED
    assert cfg.guidance is None or 0 <= cfg.guidance <= validate.MAX_GUIDANCE
    assert cfg.flow_shift is None or 0 < cfg.flow_shift <= validate.MAX_FLOW_SHIFT
    assert cfg.frames is None or (isinstance(cfg.frames, (int, np.integer)) and cfg.frames >= 1)


NUMBER_TEXT = st.one_of(st.integers(-(2**70), 2**70).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.sampled_from(["inf", "-inf", "nan", "1e9", "0x10", "", " 3", "1_000", "２"]))


@pytest.fixture(scope="module")
def parser():
    from vdit_accel.cli import build_parser

    return build_parser()


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(steps=NUMBER_TEXT, guidance=NUMBER_TEXT, seed=NUMBER_TEXT)
def test_cli_numbers_parse_in_range_or_are_usage_errors(parser, steps, guidance, seed):
    try:
        a = parser.parse_args(["generate", TINY_PROMPT, f"--steps={steps}", f"--guidance={guidance}",
                                       f"--seed={seed}"])
    except UsageError as e:
        assert "accepted" in str(e) or "expected" in str(e)
        return
    assert 1 <= a.steps <= validate.MAX_STEPS and 0 <= a.guidance <= validate.MAX_GUIDANCE
    assert 0 <= a.seed <= validate.MAX_SEED and math.isfinite(a.guidance)
