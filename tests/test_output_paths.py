"""Output paths: validated before compute, never overwritten without --overwrite, written under a temporary name and
renamed (an interrupted write leaves nothing half-written), and never inside the installed package."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from vdit_accel.cli import main
from vdit_accel.errors import OutputPathError, WeightsError
from vdit_accel.instrument.video import write_video
from vdit_accel.testing import TINY_PROMPT, tiny_model
from vdit_accel.validate import atomic_write, check_output_dir, check_output_path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("w") / "tiny"
    tiny_model().save(d)
    return str(d)


def _generate(weights: str, out: Path, *extra: str) -> int:
    return main(["generate", TINY_PROMPT, "--weights", weights, "--steps", "2", "--quiet", "--out", str(out), *extra])


def test_gif_out_leaves_an_unrelated_mp4_alone(weights, tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"unrelated")
    assert _generate(weights, tmp_path / "x.gif") == 0
    assert (tmp_path / "x.mp4").read_bytes() == b"unrelated"
    assert (tmp_path / "x.gif").read_bytes()[:3] == b"GIF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gif", "x.mp4"]


def test_mp4_out_writes_a_gif_preview_unless_no_gif(weights, tmp_path):
    assert _generate(weights, tmp_path / "a.mp4") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.mp4"]
    assert _generate(weights, tmp_path / "b.mp4", "--no-gif") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.mp4", "b.mp4"]


def test_existing_outputs_need_overwrite(weights, tmp_path, capsys):
    out = tmp_path / "c.mp4"
    out.write_bytes(b"old")
    assert _generate(weights, out) == 2
    assert "c.mp4' already exists: pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and not out.with_suffix(".gif").exists()
    assert _generate(weights, out, "--overwrite") == 0
    assert out.read_bytes()[4:8] == b"ftyp" and out.with_suffix(".gif").is_file()


def test_missing_parent_folders_are_created_as_named(weights, tmp_path):
    out = tmp_path / "new" / "deeper" / "clip.gif"
    assert _generate(weights, out) == 0
    assert out.is_file()


def test_written_files_get_the_usual_permissions(weights, tmp_path):
    assert _generate(weights, tmp_path / "p.gif") == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "p.gif").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("path, match", [
    ("", r"--out='' is not accepted"),
    ("   ", r"--out='   ' is not accepted"),
    ("clip.txt", r"has extension '.txt'"),
    ("clip", r"has extension ''"),
    ("folder.mp4", r"is a directory"),
    ("exists.gif", r"already exists"),
    ("a_file/clip.mp4", r"is a file, not a folder"),
    ("/proc/vdit-accel-never/clip.mp4", r"folder '/proc' is not writable"),
])
def test_check_output_path_refuses(tmp_path, path, match):
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "exists.gif").write_bytes(b"x")
    (tmp_path / "a_file").write_text("x")
    target = path if path.strip() == "" or path.startswith("/") else str(tmp_path / path)
    with pytest.raises(OutputPathError, match=match):
        check_output_path(target, (".mp4", ".gif"))
    assert not Path("/proc/vdit-accel-never").exists()


def test_check_output_path_accepts_and_creates_nothing(tmp_path):
    assert check_output_path(tmp_path / "x" / "y" / "clip.MP4", (".mp4",)) == tmp_path / "x" / "y" / "clip.MP4"
    assert check_output_path(tmp_path / "exists.gif", (".gif",), overwrite=True).name == "exists.gif"
    assert list(tmp_path.iterdir()) == []
    assert check_output_dir(tmp_path / "made", create=False) == tmp_path / "made" and list(tmp_path.iterdir()) == []
    assert check_output_dir(tmp_path / "made").is_dir()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("previous")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and tmp.suffix == ".json"
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_an_interrupted_video_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    import imageio.v3 as iio

    real = iio.imwrite

    def write_then_die(path, *args, **kwargs):
        Path(path).write_bytes(b"GIF89a-half")
        raise KeyboardInterrupt

    frames = np.zeros((2, 8, 8, 3), np.uint8)
    (tmp_path / "clip.gif").write_bytes(b"previous clip")
    monkeypatch.setattr("vdit_accel.instrument.video.iio.imwrite", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_video(frames, tmp_path / "clip.gif")
    with pytest.raises(KeyboardInterrupt):
        write_video(frames, tmp_path / "fresh.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]
    assert (tmp_path / "clip.gif").read_bytes() == b"previous clip"
    monkeypatch.setattr("vdit_accel.instrument.video.iio.imwrite", real)
    write_video(frames, tmp_path / "clip.gif")
    assert (tmp_path / "clip.gif").read_bytes()[:3] == b"GIF"


def test_write_video_refuses_unknown_suffix_and_directories(tmp_path):
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(OutputPathError, match="clip.txt' has suffix '.txt'"):
        write_video(frames, tmp_path / "clip.txt")
    (tmp_path / "d.gif").mkdir()
    with pytest.raises(OutputPathError, match="d.gif' is a directory"):
        write_video(frames, tmp_path / "d.gif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gif"]


def test_save_tensor_and_inspect_out_are_written_atomically(weights, tmp_path):
    assert _generate(weights, tmp_path / "t.gif", "--save-tensor", str(tmp_path / "v.safetensors")) == 0
    assert main(["inspect", "--steps", "2", "--weights", weights, "--out", str(tmp_path / "r.json")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.gif", "v.safetensors"]
    assert "command" in json.loads((tmp_path / "r.json").read_text())


def test_calibrate_magcache_writes_under_runs_never_the_package(weights, tmp_path, monkeypatch):
    from vdit_accel.methods.magcache_ratios import RATIOS_FILE, load_mag_ratios

    shipped = RATIOS_FILE.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "magcache", "--weights", weights, "--steps", "3", "--prompts", "quick", "--quiet"]) == 0
    assert RATIOS_FILE.read_bytes() == shipped
    table = json.loads((tmp_path / "runs" / "magcache_ratios.json").read_text())
    assert list(table) == ["vdit-accel/tiny-test"] and len(table["vdit-accel/tiny-test"]["ratios"]) == 3
    assert load_mag_ratios("vdit-accel/tiny-test") == table["vdit-accel/tiny-test"]["ratios"]
    assert load_mag_ratios("vdit-accel/embedded-wan-v1")  # the shipped curves are still found
    (tmp_path / "runs" / "magcache_ratios.json").write_text("{not json")
    with pytest.raises(WeightsError, match="magcache_ratios.json' is not valid JSON"):
        load_mag_ratios("vdit-accel/tiny-test")


def test_calibrate_magcache_named_out(weights, tmp_path):
    out = tmp_path / "mine" / "ratios.json"
    assert main(["calibrate", "magcache", "--weights", weights, "--steps", "2", "--prompts", "quick", "--quiet",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["vdit-accel/tiny-test"]["steps"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["ratios.json"]


class _Computed(Exception):
    """Raised by a stubbed run_bench / run_step_bench: the command got past its checks to the compute."""


def _bench_argv(command: str, out: Path, weights: str, *extra: str) -> list[str]:
    if command == "bench":
        return ["bench", "--quick", "--weights", weights, "--out", str(out), "--quiet", *extra]
    return ["bench-step", "--tiny", "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("command", ["bench", "bench-step"])
def test_bench_folders_holding_earlier_results_need_overwrite(command, weights, tmp_path, monkeypatch, capsys):
    """bench and bench-step have no resume: any one of their result files in --out is an earlier run's result,
    refused before any compute (no model loaded, no forward) unless --overwrite; an unrelated file is no result."""
    from vdit_accel import cli
    from vdit_accel.bench import harness, step
    from vdit_accel.bench.report import REPORT_FILES
    from vdit_accel.bench.step import RESULT_FILES

    def stub(*args, **kwargs):
        raise _Computed

    monkeypatch.setattr(harness, "run_bench", stub)
    monkeypatch.setattr(step, "run_step_bench", stub)
    loads = []
    monkeypatch.setattr(cli, "_load_model", lambda w: loads.append(w) or tiny_model())
    for name in {"bench": REPORT_FILES, "bench-step": RESULT_FILES}[command]:
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_bytes(b"keep me")
        assert main(_bench_argv(command, out, weights)) == 2
        assert loads == []
        err = capsys.readouterr().err
        assert f"error: --out={str(out)!r}: {str(out / name)!r} already exists" in err and "--overwrite" in err
        assert (out / name).read_bytes() == b"keep me" and sorted(p.name for p in out.iterdir()) == [name]
        with pytest.raises(_Computed):
            main(_bench_argv(command, out, weights, "--overwrite"))
        loads.clear()
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    with pytest.raises(_Computed):
        main(_bench_argv(command, unrelated, weights))


def test_bench_step_latency_model_needs_overwrite(tmp_path, capsys):
    lm = tmp_path / "latency.json"
    lm.write_text("{}")
    assert main(_bench_argv("bench-step", tmp_path / "res", "", "--latency-model", str(lm))) == 2
    assert f"--latency-model={str(lm)!r} already exists: pass --overwrite" in capsys.readouterr().err
    assert lm.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["latency.json"]


def test_bench_step_overwrite_replaces_earlier_results(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "bench-step.json").write_text("{}")
    argv = _bench_argv("bench-step", out, "", "--repeats", "1", "--warmup", "0", "--budgets", "0.5", "--orders", "0",
                       "--kv-reuse", "off", "--overwrite")
    assert main(argv) == 0
    assert json.loads((out / "bench-step.json").read_text())["format"] == "vdit-accel/bench-step"
