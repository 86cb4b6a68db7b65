"""Every registered diffusers peer engages on Wan (changes the output) and is removed exactly."""

import pytest
import torch

import vdit_accel.methods  # noqa: F401
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.magcache_ratios import calibrate_mag_ratios
from vdit_accel.registry import BenchEnv, apply, operating_points
from vdit_accel.testing import TINY_PROMPT, tiny_model

GEN = GenerationConfig(steps=12, guidance=3.0)


@pytest.mark.parametrize("label", ["pab-2", "fbc-0.10", "taylorseer-3", "fastercache-2", "magcache-0.12"])
def test_peer_engages_and_removes_exactly(label, monkeypatch):
    model = tiny_model()
    sampler = Sampler(model)
    dense = sampler(TINY_PROMPT, GEN, progress=False)
    ratios = calibrate_mag_ratios(sampler, TINY_PROMPT, GEN, write=False)
    monkeypatch.setattr("vdit_accel.methods.magcache_ratios.load_mag_ratios", lambda model_id: ratios)
    (point,) = operating_points(label)
    handle = apply(model, point.make_config(BenchEnv(sampler, GEN.steps, "tiny")))
    try:
        out = sampler(TINY_PROMPT, GEN, progress=False)
    finally:
        handle.remove()
    assert not torch.equal(out, dense), f"{label} did not change the output: it did not engage"
    assert torch.equal(sampler(TINY_PROMPT, GEN, progress=False), dense)


def test_bench_checks_every_operating_point_before_any_compute(tmp_path):
    from vdit_accel.bench.harness import BenchConfig, run_bench
    from vdit_accel.errors import WeightsError

    model = tiny_model()  # model id "vdit-accel/tiny-test": no MagCache ratios were calibrated for it
    calls = []
    model.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(WeightsError, match="no MagCache ratios for model 'vdit-accel/tiny-test'"):
        run_bench(model, BenchConfig(methods="dense,fbc-0.05,magcache-0.12", prompts="quick", seeds=1, steps=3),
                  tmp_path / "never", progress=False)
    assert calls == [] and not (tmp_path / "never").exists()
