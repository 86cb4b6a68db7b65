"""benchmarks/parallel_scaling.py: the communication volumes and the scaling model's arithmetic (fast; the timed
2-rank measurement itself is run by hand, see docs/parallel.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "parallel_scaling.py"


@pytest.fixture(scope="module")
def ps():
    spec = importlib.util.spec_from_file_location("parallel_scaling", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["parallel_scaling"] = mod
    spec.loader.exec_module(mod)
    return mod


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


def test_model_labels_predictions_and_reports_validation(ps, tmp_path):
    out = tmp_path / "s.json"
    assert ps.main(["model", "--out", str(out)]) == 0
    import json

    d = json.loads(out.read_text())
    assert "PREDICTIONS" in d["label"]
    assert {v["gpus"] for v in d["validation"]} == {2, 4, 8}
    for v in d["validation"]:
        assert v["error"] == pytest.approx(v["predicted"] / v["published"] - 1, abs=1e-3)
    assert d["validated_within_15pct"] == all(abs(v["error"]) <= 0.15 for v in d["validation"])
    wan = d["predictions"]["Wan2.1-T2V-1.3B"]["gpus"]
    assert (wan["8"]["ulysses"], wan["8"]["ring"]) == (4, 2)  # 12 heads: Ulysses 4 x Ring 2 on 8 GPUs
    assert wan["1"]["dense_speedup_vs_1gpu"] == 1.0
    for row in wan.values():  # the two conventions: over 1 dense GPU = over dense on P GPUs x dense scaling
        assert row["astraea_gain_over_1_dense_gpu"] == pytest.approx(
            row["astraea_gain_over_dense_same_gpus"] * row["dense_speedup_vs_1gpu"], rel=2e-3)
