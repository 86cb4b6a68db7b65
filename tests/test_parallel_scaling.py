"""benchmarks/parallel_scaling.py: the communication volumes and the scaling model's arithmetic (fast; the timed
2-rank measurement itself is run by hand, see docs/parallel.md)."""

from __future__ import annotations

import statistics

import pytest


@pytest.fixture(scope="module")
def ps(parallel_scaling):
    return parallel_scaling


def test_implied_serial_seconds_meet_the_published_pair(ps):
    s = ps.implied_serial_s(100.0, 60.0, 2, 0.0)
    assert s == pytest.approx(20.0) and (100.0 - s) / 2 + s == pytest.approx(60.0)
    s = ps.implied_serial_s(100.0, 30.0, 4, 5.0)  # with communication: (100 - S)/4 + S + 5 = 30
    assert (100.0 - s) / 4 + s + 5.0 == pytest.approx(30.0)


def test_comm_volumes(ps):
    kw = dict(bandwidth=1.0, latency=0.0, bytes_per=1)
    assert ps.comm_seconds(8, 4, 3, 1, 1, **kw) == 0.0
    # Ulysses 2: 4 tensors of S/P x C = 4 x 4 = 16 elements, half of each leaves the rank: 4 x 8 per layer
    assert ps.comm_seconds(8, 4, 3, 2, 1, **kw) == pytest.approx(3 * 4 * 16 / 2)
    # Astraea at budget 0.5: q and out carry half the rows
    assert ps.comm_seconds(8, 4, 1, 2, 1, budget=0.5, **kw) == pytest.approx((2 * 0.5 + 2) * 16 / 2)
    # Ring 2: K and V of the other half arrive: 2 x (S/2 x C) elements per layer
    assert ps.comm_seconds(8, 4, 1, 1, 2, **kw) == pytest.approx(2 * 4 * 4 / 2)
    assert ps.comm_seconds(8, 4, 1, 2, 1, bandwidth=1.0, latency=0.5, bytes_per=1) == pytest.approx(32 + 4 * 0.5)
    # FSDP: each rank receives the (P-1)/P of the weights it does not hold, once per call
    assert ps.fsdp_seconds(8.0, 1, bytes_per=1, bandwidth=1.0) == 0.0
    assert ps.fsdp_seconds(8.0, 4, bytes_per=1, bandwidth=2.0) == pytest.approx(8.0 * 3 / 4 / 2)


def test_vae_decode_flops_counts_the_published_architecture_on_meta(ps):
    """Wan's VAE (diffusers' default config, meta device): the count grows with the latent, more than linearly in
    frames here (the causal first frame decodes to 1 frame, every later latent frame to 4)."""
    small = ps.vae_decode_flops("AutoencoderKLWan", (1, 16, 2, 8, 8), False)
    big = ps.vae_decode_flops("AutoencoderKLWan", (1, 16, 3, 8, 8), False)
    assert 0 < small < big
    assert big / small == pytest.approx((1 + 4 * 2) / (1 + 4 * 1), rel=0.15)  # ~ output frames: 9 vs 5


def test_model_labels_predictions_and_reports_validation(ps, tmp_path, monkeypatch):
    out = tmp_path / "s.json"
    # the full-size VAE counts take minutes of Python on meta tensors: a stand-in value keeps this test fast
    monkeypatch.setattr(ps, "vae_decode_flops", lambda *args, **kwargs: 1e15)
    assert ps.main(["model", "--out", str(out)]) == 0
    import json

    d = json.loads(out.read_text())
    assert "PREDICTIONS" in d["label"]
    assert {v["gpus"] for v in d["validation"]} == {2, 3, 4, 6, 8}
    assert {v["gpu"] for v in d["validation"]} == {"H100", "H20", "L20", "H800", "A800"}
    for v in d["validation"]:
        assert v["error"] == pytest.approx(v["predicted"] / v["published"] - 1, abs=1e-3)
    for v in d["validation"]:  # the Wan table's runs shard the transformer with FSDP: its all-gather is counted
        pub = next(pub for pub in ps.PUBLISHED if pub["name"] == v["case"])
        bw = d["inputs"]["bandwidth_bytes_per_s"] * ps.GPUS[v["gpu"]]["bandwidth_scale"]
        expected = ps.comm_seconds(pub["tokens"], pub["dim"], pub["layers"], v["ulysses"], v["ring"], bandwidth=bw,
                                   latency=d["inputs"]["latency_s"])
        expected += ps.fsdp_seconds(pub.get("fsdp_params", 0.0), v["gpus"], bandwidth=bw)
        assert v["comm_s_per_call"] == pytest.approx(expected, abs=1e-4)
        assert ("fsdp_params" in pub) == v["case"].startswith("Wan2.1")
    assert d["validated_within_15pct"] == all(abs(v["error"]) <= 0.15 for v in d["validation"])
    counts = [tuple(map(int, c.split(" of "))) for c in d["within_15pct_by_link"].values()]
    assert tuple(map(sum, zip(*counts))) == tuple(map(int, d["within_15pct"].split(" of ")))
    for v in d["validation"]:  # the serial VAE / text encoders can only lower the predicted speedup
        assert v["predicted"] < v["predicted_transformer_only"]
    hv = d["serial_parts"]["HunyuanVideo xDiT (USP) 1280x720x129f, H100"]
    assert hv["vae_decode"] == 1e15 and hv["total"] > hv["vae_decode"]
    i2v = d["serial_parts"]["Wan2.1-I2V-14B FSDP + xDiT USP 1280x720x81f, H800"]
    assert i2v["vae_encode"] == 1e15 and "clip vit-h/14 visual" in i2v["text_encoders"]
    assert "vae_encode" not in d["serial_parts"]["Wan2.1-T2V-14B FSDP + xDiT USP 1280x720x81f, H800"]
    # the held-out folds: per implementation, a GPU type judged by the others where there are several, else a row
    by_family: dict[str, list[dict]] = {}
    for v in d["validation"]:
        by_family.setdefault(v["family"], []).append(v)
    cross, serial = d["fixed_overhead_cross_check"], d["serial_seconds_cross_check"]
    implied = serial["implied_serial_s"]
    for check, value_key in ((cross, "fixed_s_per_call"), (serial, "serial_s")):
        folds = check["folds"]
        assert {f["family"] for f in folds} == set(by_family)
        for f in folds:
            rows = by_family[f["family"]]
            held = "gpu" if len({v["gpu"] for v in rows}) > 1 else "case"
            fitted = [v for v in rows if v[held] != f["judged_on"]]
            judged = [v for v in rows if v[held] == f["judged_on"]]
            assert fitted and sorted({v["case"] for v in fitted}) == f["fitted_on"]
            assert [(j["case"], j["gpus"]) for j in f["judged"]] == [(v["case"], v["gpus"]) for v in judged]
            if check is cross:
                assert f[value_key] == pytest.approx(statistics.median(v["residual_s_per_call"] for v in fitted),
                                                     abs=1e-4)
            else:
                assert f[value_key] == pytest.approx(statistics.median(
                    pt["implied_serial_s"] for pt in implied if pt["case"] in f["fitted_on"]), abs=0.02)
                for j in f["judged"]:
                    pt = next(pt for pt in implied if pt["case"] == j["case"] and pt["gpus"] == j["gpus"])
                    t_p = (pt["t1"] - f["serial_s"]) / pt["gpus"] + f["serial_s"] + pt["comm_s"]
                    assert j["predicted"] == pytest.approx(pt["t1"] / t_p, abs=2e-3)
            for j in f["judged"]:
                assert j["error"] == pytest.approx(j["predicted"] / j["published"] - 1, abs=1e-3)
    assert sum(len(f["judged"]) for f in serial["folds"]) == len(d["validation"])  # every point judged once
    across = serial["across_implementations"]
    assert [j["case"] for j in across["judged"]] == [v["case"] for v in d["validation"] if "L20" in v["case"]]
    # the pessimistic readings: a worst residual on the predictions' GPU class as a per-step cost of every method
    assert "H100" in d["serial_fraction"]["fitted_on"]
    assert "Wan2.1" in d["serial_fraction_wan"]["fitted_on"] and "H800" in d["serial_fraction_wan"]["fitted_on"]
    for pred in d["predictions"].values():
        for variant in ("pessimistic", "pessimistic_wan"):
            assert pred[f"kept_of_one_gpu_gain_at_8_{variant}"] == pytest.approx(
                pred["gpus"]["8"][variant]["astraea_gain_over_dense_same_gpus"]
                / pred["gpus"]["1"]["astraea_gain_over_dense_same_gpus"], abs=2e-3)
            for p, row in pred["gpus"].items():
                assert row[variant]["dense_speedup_vs_1gpu"] <= row["dense_speedup_vs_1gpu"]
                assert (row[variant] == {k: row[k] for k in row[variant]}) == (p == "1")  # P > 1 only
    wan = d["predictions"]["Wan2.1-T2V-1.3B"]["gpus"]
    assert (wan["8"]["ulysses"], wan["8"]["ring"]) == (4, 2)  # 12 heads: Ulysses 4 x Ring 2 on 8 GPUs
    assert wan["1"]["dense_speedup_vs_1gpu"] == 1.0
    for row in wan.values():  # the two conventions: over 1 dense GPU = over dense on P GPUs x dense scaling
        assert row["astraea_gain_over_1_dense_gpu"] == pytest.approx(
            row["astraea_gain_over_dense_same_gpus"] * row["dense_speedup_vs_1gpu"], rel=2e-3)


def test_step_costs_come_from_a_step_bench_when_given(ps, tmp_path, monkeypatch):
    """``--step-bench``: Astraea's relative step costs from a bench-step result (the committed full-geometry run),
    recorded in the inputs; a result without the step kinds the preset needs is refused by name."""
    import json

    from vdit_accel.errors import ConfigError

    monkeypatch.setattr(ps, "vae_decode_flops", lambda *args, **kwargs: 1e15)
    bench = "docs/results/bench-step/cpu-full-geometry/bench-step.json"
    out = tmp_path / "s.json"
    assert ps.main(["model", "--step-bench", bench, "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    results = json.loads(open(bench).read())
    dense = results["settings"][0]["step_composed_s"]
    costs = {(c["budget"], c["order"]): c["relative_cost"] for c in d["inputs"]["step_costs"]["relative_costs"]}
    forecast = next(r for r in results["settings"] if r["budget"] == 0.0 and r["order"] == 1)
    assert d["inputs"]["step_costs"]["source"] == bench and d["inputs"]["step_costs"]["geometry"]["tokens"] == 32760
    assert costs[(0.0, 1)] == pytest.approx(forecast["step_composed_s"] / dense)
    from vdit_accel.search.presets import load_preset

    preset = load_preset("astraea-3x", steps=50)
    n_dense = sum(b >= 1.0 for b in preset.schedule)
    gain = 50 / (n_dense + (50 - n_dense) * costs[(0.0, 1)])
    assert d["predictions"]["Wan2.1-T2V-1.3B"]["gpus"]["1"]["astraea_gain_over_dense_same_gpus"] == pytest.approx(
        gain, abs=2e-3)
    # the W2 table measured forecast order 0 only: the preset's order-1 steps cannot be priced from it
    with pytest.raises(ConfigError, match="order 1"):
        ps.main(["model", "--step-bench", "docs/results/bench-step/cpu-paired-s13/bench-step.json",
                 "--out", str(tmp_path / "t.json")])
