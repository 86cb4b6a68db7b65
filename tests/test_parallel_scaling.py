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
    monkeypatch.setattr(ps, "vae_decode_flops", lambda cls, latent, tiling: 1e15)
    assert ps.main(["model", "--out", str(out)]) == 0
    import json

    d = json.loads(out.read_text())
    assert "PREDICTIONS" in d["label"]
    assert {v["gpus"] for v in d["validation"]} == {2, 3, 4, 6, 8}
    assert {v["gpu"] for v in d["validation"]} == {"H100", "H20", "L20"}
    for v in d["validation"]:
        assert v["error"] == pytest.approx(v["predicted"] / v["published"] - 1, abs=1e-3)
    assert d["validated_within_15pct"] == all(abs(v["error"]) <= 0.15 for v in d["validation"])
    for v in d["validation"]:  # the serial VAE / text encoders can only lower the predicted speedup
        assert v["predicted"] < v["predicted_transformer_only"]
    hv = d["serial_parts"]["HunyuanVideo xDiT (USP) 1280x720x129f, H100"]
    assert hv["vae_decode"] == 1e15 and hv["total"] > hv["vae_decode"]
    # the fixed-overhead cross-check: fitted on one GPU type, judged on the other, with the residuals it fitted
    cross = d["fixed_overhead_cross_check"]
    assert set(cross) == {"fitted_on_H100", "fitted_on_H20"}
    for fit_on, other in (("H100", "H20"), ("H20", "H100")):
        rows = [v for v in d["validation"] if v["case"].startswith("HunyuanVideo xDiT") and v["gpu"] == fit_on]
        c = cross[f"fitted_on_{fit_on}"]
        assert c["fixed_s_per_call"] == pytest.approx(statistics.median(v["residual_s_per_call"] for v in rows),
                                                      abs=1e-4)
        assert c["judged"] and all(other in j["case"] for j in c["judged"])
        for j in c["judged"]:
            assert j["error"] == pytest.approx(j["predicted"] / j["published"] - 1, abs=1e-3)
    # the serial-seconds cross-check: S fitted on one GPU type's published latencies, judged on the other's
    serial = d["serial_seconds_cross_check"]
    assert {"fitted_on_H100", "fitted_on_H20"} <= set(serial)
    implied = serial["implied_serial_s"]
    for fit_on, other in (("H100", "H20"), ("H20", "H100")):
        c = serial[f"fitted_on_{fit_on}"]
        assert c["serial_s"] == pytest.approx(statistics.median(
            pt["implied_serial_s"] for pt in implied if pt["gpu"] == fit_on and "xDiT" in pt["case"]), abs=0.02)
        assert c["judged"] and all(other in j["case"] for j in c["judged"])
        for j in c["judged"]:
            pt = next(pt for pt in implied if pt["case"] == j["case"] and pt["gpus"] == j["gpus"])
            t_p = (pt["t1"] - c["serial_s"]) / pt["gpus"] + c["serial_s"] + pt["comm_s"]
            assert j["predicted"] == pytest.approx(pt["t1"] / t_p, abs=2e-3)
    other_impl = next(v for k, v in serial.items() if k.startswith("fitted_on_all_"))
    assert [j["case"] for j in other_impl["judged"]] == [v["case"] for v in d["validation"]
                                                         if "L20" in v["case"]]
    wan = d["predictions"]["Wan2.1-T2V-1.3B"]["gpus"]
    assert (wan["8"]["ulysses"], wan["8"]["ring"]) == (4, 2)  # 12 heads: Ulysses 4 x Ring 2 on 8 GPUs
    assert wan["1"]["dense_speedup_vs_1gpu"] == 1.0
    for row in wan.values():  # the two conventions: over 1 dense GPU = over dense on P GPUs x dense scaling
        assert row["astraea_gain_over_1_dense_gpu"] == pytest.approx(
            row["astraea_gain_over_dense_same_gpus"] * row["dense_speedup_vs_1gpu"], rel=2e-3)
