"""CLI smoke tests on a tiny saved model (fast), plus error handling."""

import json
import re

import pytest

from vdit_accel.cli import main
from vdit_accel.testing import TINY_PROMPT, tiny_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("w") / "tiny"
    tiny_model().save(d)
    return str(d)


def test_generate_writes_mp4_and_gif(weights, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(["generate", TINY_PROMPT, "--steps", "2", "--seed", "1", "--out", str(out), "--weights", weights,
                 "--quiet"]) == 0
    assert out.stat().st_size > 0 and out.with_suffix(".gif").stat().st_size > 0


def test_generate_with_methods(weights, tmp_path, caplog):
    """Presets apply through --preset; one made for another model (here "t") is applied with a warning."""
    for method in ("timeripple", "astraea"):
        preset_file = tmp_path / f"{method}.json"
        from vdit_accel.methods.astraea import AstraeaConfig
        from vdit_accel.methods.timeripple import TimeRippleConfig
        from vdit_accel.search.presets import save_preset

        cfg = (TimeRippleConfig(i_min=0, i_max=1, num_steps=3) if method == "timeripple"
               else AstraeaConfig(budgets=(1.0, 0.5, 0.5), num_steps=3))
        save_preset(preset_file, method, cfg, model_id="t", geometry=[4, 8, 8], steps=3, seed=0)
        assert main(["generate", TINY_PROMPT, "--steps", "3", "--out", str(tmp_path / f"{method}.mp4"),
                     "--weights", weights, "--method", method, "--preset", str(preset_file), "--quiet"]) == 0
        assert f"preset {preset_file} was made for model t, applied to" in caplog.text
        caplog.clear()


def test_score_command(weights, tmp_path, capsys):
    out = tmp_path / "c.mp4"
    main(["generate", TINY_PROMPT, "--steps", "2", "--out", str(out), "--weights", weights, "--quiet"])
    capsys.readouterr()
    assert main(["score", str(out), "--prompt", TINY_PROMPT]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.0 <= res["adherence"] <= 1.0 and set(res["attributes"])


def test_bench_quick_dense_and_one_peer(weights, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--methods", "dense,fbc-0.05,taylorseer-i2-o2", "--out", str(out), "--weights",
                 weights, "--steps", "3", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    labels = [m["label"] for m in res["methods"]]
    assert labels == ["dense", "fbc-0.05", "taylorseer-i2-o2"]
    dense = res["methods"][0]
    assert dense["speedup"] == 1.0 and dense["psnr_min"] == float("inf") and dense["ssim_mean"] == pytest.approx(1.0)
    assert dense["psnr_worst_patch_min"] == float("inf") and dense["temporal_psnr_mean"] == float("inf")
    # --quick: 2 prompts x 1 seed, every point once per job, the start rotated by one
    assert [e["label"] for e in res["run_log"]] == labels + labels[1:] + labels[:1]
    assert isinstance(res["drift_flagged"], bool) and len(res["settings"]["prompt_list"]) == 2
    for name in ("results.md", "pareto.png", "compare.gif", "compare.png"):
        assert (out / name).stat().st_size > 0
    assert res["git_commit"] and res["versions"]["diffusers"].startswith("0.42")
    assert res["settings"]["guidance"] == 5.0  # no --guidance: the model's, recorded as the value used


@pytest.mark.parametrize("argv, match", [
    (["generate", "a red hexagon moves left on a blue background"], "hexagon"),
    (["generate", TINY_PROMPT, "--steps", "0"], "steps=0"),
    (["generate", TINY_PROMPT, "--guidance", "-1"], "guidance=-1"),
    (["generate", TINY_PROMPT, "--flow-shift", "0"], "flow_shift=0.0 is out of range"),
    (["bench", "--methods", "dense,warp-drive"], "warp-drive"),
    (["generate", TINY_PROMPT, "--weights", "/nonexistent/weights"], "missing"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, match, capsys, weights):
    if "--weights" not in argv:
        argv = argv + ["--weights", weights]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["train", "--recipe", "overnight"], "recipe='overnight' is not known: accepted \\['finetune', 'scratch'\\] "
                                         "\\(chained: \\['v2', 'v2-lineage'\\]\\)"),
    (["train", "--recipe", "finetune"], "needs --init-from"),
    (["train", "--recipe", "v2", "--seed", "3"], "--recipe v2 is a chained recipe .*--seed not accepted"),
])
def test_bad_train_recipe_exits_2_before_training(argv, match, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "never")]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "never").exists()
