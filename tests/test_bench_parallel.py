"""``vdit-accel bench-parallel`` (:mod:`vdit_accel.bench.parallel`): its checks before any compute, the modules it
counts as replicated, and (slow: 2 gloo ranks, tiny width) a whole run through the CLI, read back by the scaling
model of ``benchmarks/parallel_scaling.py``."""

from __future__ import annotations

import json
import statistics

import pytest

from vdit_accel.bench import parallel as bp
from vdit_accel.cli import main
from vdit_accel.errors import ConfigError


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"nproc": 1}, "nproc=1 is out of range"),
    ({"mesh": "pipefusion"}, "pipefusion"),
    ({"budgets": (1.0,)}, "budgets: 1.0 is out of range: accepted (0, 1)"),
    ({"budgets": (0.0,)}, "budgets: 0.0 is out of range"),
    ({"nproc": 7}, "3120 tokens, which do not split over nproc=7"),
    ({"repeats": 0}, "repeats=0 is out of range"),
])
def test_config_refuses_bad_values_naming_them(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bp.ParallelBenchConfig(**kwargs)


def test_tiny_config_uses_the_tiny_latent():
    assert bp.ParallelBenchConfig(tiny=True).bench_kwargs()["latent"] == bp.TINY_LATENT
    assert bp.ParallelBenchConfig().bench_kwargs()["latent"] == (2, 60, 104)


def test_cli_refuses_before_any_compute(tmp_path, monkeypatch, capsys):
    def no_compute(*args, **kwargs):
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(bp, "measure", no_compute)
    assert main(["bench-parallel", "--tiny"]) == 2
    assert "needs --out DIR" in capsys.readouterr().err
    (tmp_path / "bench-parallel.json").write_text("{}")
    assert main(["bench-parallel", "--tiny", "--out", str(tmp_path)]) == 2
    assert "bench-parallel.json" in capsys.readouterr().err
    assert main(["bench-parallel", "--nproc", "1", "--out", str(tmp_path / "new")]) == 2
    assert main(["bench-parallel", "--nproc", "7", "--out", str(tmp_path / "new")]) == 2
    assert "do not split over nproc=7" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_replicated_modules_are_what_a_rank_runs_whole():
    """The modules named replicated are the ones outside diffusers' Wan split (embeddings, RoPE before its output
    split, and attn2's text K/V); the split points are where diffusers' plan puts them."""
    from vdit_accel.bench.step import StepBench, StepBenchConfig

    model = StepBench(StepBenchConfig(layers=2, latent=(2, 8, 8), text_len=8, tiny=True)).model
    names = {m: n for n, m in model.named_modules()}
    got = [names[m] for m in bp.replicated_modules(model)]
    assert got[:3] == ["patch_embedding", "condition_embedder", "rope"]
    assert got[3:] == [f"blocks.{i}.attn2.{p}" for i in range(2) for p in ("to_k", "to_v", "norm_k")]
    assert {"rope", "blocks.0", "proj_out"} <= set(model._cp_plan)  # diffusers' plan: what it splits / gathers


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["ulysses", "ring"])
def test_cli_run_interleaves_three_runs_and_checks_the_models(tmp_path, monkeypatch, mesh, parallel_scaling):
    """2 gloo ranks, tiny width, Ulysses or Ring: the three runs step together, the replicated modules and the
    mesh's communication are timed, every model check is its stated formula of the measured inputs, and the
    scaling model reads the result back under the mesh's name."""
    out = tmp_path / "run"
    assert main(["bench-parallel", "--tiny", "--nproc", "2", "--repeats", "2", "--budgets", "0.5", "--mesh", mesh,
                 "--out", str(out)]) == 0
    d = json.loads((out / "bench-parallel.json").read_text())
    assert "| dense |" in (out / "bench-parallel.md").read_text()
    assert d["command"].startswith("vdit-accel bench-parallel --out")
    assert d["mesh"] == ({"ulysses": 2, "ring": 1} if mesh == "ulysses" else {"ulysses": 1, "ring": 2})
    assert set(d["settings"]) == {"dense", "astraea-b0.50"}
    raw = d["raw"][0]["settings"]
    assert set(raw) == set(bp.RUNS)
    for label, v in d["settings"].items():
        for kind in bp.RUNS:
            assert len(raw[kind][label]["step_s_all"]) == 2
        assert raw["single"][label]["comm_s"] == raw["loaded"][label]["comm_s"] == 0.0 < v["comm_s"]
        assert 0.0 < v["replicated_s"] < v["single_s"]
        assert 0.0 < v["loaded_replicated_s"] < v["loaded_s"]
        assert v["single_s"] == pytest.approx(statistics.median(raw["single"][label]["step_s_all"]))
        assert v["simple_model_parallel_s"] == pytest.approx(v["single_s"] / 2 + v["comm_s"])
        assert v["replicated_model_parallel_s"] == pytest.approx(
            (v["single_s"] - v["replicated_s"]) / 2 + v["replicated_s"] + v["comm_s"])
        assert v["loaded_model_parallel_s"] == pytest.approx(
            (v["loaded_s"] - v["loaded_replicated_s"]) / 2 + v["loaded_replicated_s"] + v["comm_s"])
        for name in bp.MODELS:
            assert v[f"{name}_model_error"] == pytest.approx(v[f"{name}_model_parallel_s"] / v["parallel_s"] - 1)
        assert v["contention"] == pytest.approx(v["loaded_s"] / v["single_s"])
    again = bp.summarize(d["raw"], 2)  # the summary is a function of the raw steps alone
    for label, row in d["settings"].items():
        assert again[label] == pytest.approx(row)
    # the scaling model's CPU check reads it back under the mesh's name
    ps = parallel_scaling
    monkeypatch.setattr(ps, "vae_decode_flops", lambda *args, **kwargs: 1e15)
    model_out = tmp_path / "s.json"
    assert ps.main(["model", "--measured", str(out / "bench-parallel.json"), "--out", str(model_out)]) == 0
    check = json.loads(model_out.read_text())
    key = ("ulysses2" if mesh == "ulysses" else "ring2") + ": bench-parallel.json"
    assert set(check["cpu_check"]) == {key}
    for label, v in d["settings"].items():
        row = check["cpu_check"][key]["settings"][label]
        assert row["measured_parallel_s"] == v["parallel_s"]
        assert row["replicated_error"] == v["replicated_model_error"]
    assert check["cpu_check_within_15pct"][key] == {
        name: all(abs(v[f"{name}_model_error"]) <= 0.15 for v in d["settings"].values()) for name in bp.MODELS}
