"""Forecast over the step index (diffusers TaylorSeer's convention) vs over the model's timestep, same schedules.

Astraea's ``forecast_axis`` option: a first- or second-order forecast extrapolates each cached block output over
the distance since it was computed, measured in steps ("step") or in the timestep the transformer receives
("timestep"). With a shifted flow-matching schedule (the embedded model's shift is 3) the timesteps are unevenly
spaced, so the two differ. Each schedule (TaylorSeer's cadences, an Astraea preset) is run with both axes on the
4 calibration + 4 selection prompts (final videos, 50 steps, CFG 2, noise seed = prompt index; never a bench
prompt), PSNR against dense; the evaluations are checkpointed per axis under ``--out``.

    PYTHONPATH=src python benchmarks/forecast_axis.py --threads 2 --out docs/results/astraea/forecast-axis
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from vdit_accel.bench.harness import CALIBRATION_PROMPTS, machine_info
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig
from vdit_accel.search.joint import SELECTION_PROMPTS, config_to_schedule
from vdit_accel.search.latency import LatencyModel
from vdit_accel.search.presets import load_preset
from vdit_accel.search.refine import FinalVideoObjective, schedule_key, taylorseer_cadence


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cadences", default="4,5,6", help="TaylorSeer intervals (warm-up 3, order 1)")
    p.add_argument("--presets", nargs="*", default=["astraea-4x"])
    p.add_argument("--latency-model", default="docs/results/bench-step/latency-kv/latency.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    latency = LatencyModel.load(a.latency_model)
    schedules = {f"taylorseer-i{i}-o1": taylorseer_cadence(50, int(i)) for i in a.cadences.split(",")}
    for name in a.presets:
        schedules[name] = config_to_schedule(load_preset(name, steps=50))
    sampler = Sampler(EmbeddedModel.load())
    gen = GenerationConfig(steps=50)
    prompts = list(CALIBRATION_PROMPTS) + list(SELECTION_PROMPTS)
    base = AstraeaConfig(num_steps=50, dense_steps=1, kv_reuse=latency.kv_reuse)
    rows: dict = {}
    for axis in ("step", "timestep"):
        work = out / f"ck-{axis}"
        if axis != "step" and not (work / "dense.safetensors").exists():  # the same dense videos (same prompts,
            work.mkdir(parents=True, exist_ok=True)                        # noise and generation): not generated twice
            shutil.copyfile(out / "ck-step" / "dense.safetensors", work / "dense.safetensors")
        obj = FinalVideoObjective(sampler, prompts, gen, dataclasses.replace(base, forecast_axis=axis), workdir=work)
        for name, s in schedules.items():
            ps = obj.psnr(s)
            rows.setdefault(name, {"key": schedule_key(s), "w2_predicted": latency.speedup(s)})[axis] = {
                "psnr": ps, "psnr_mean": float(np.mean(ps)), "psnr_min": float(np.min(ps))}
            print(f"{name} {axis}: {np.mean(ps):.2f} / {np.min(ps):.2f} dB", file=sys.stderr, flush=True)
    for r in rows.values():
        r["gain_mean_db"] = r["timestep"]["psnr_mean"] - r["step"]["psnr_mean"]
        r["gain_min_db"] = r["timestep"]["psnr_min"] - r["step"]["psnr_min"]
    result = {"command": " ".join(["python", *sys.argv]), **machine_info(), "threads": a.threads,
              "prompts": prompts, "generation": dataclasses.asdict(gen), "schedules": rows}
    (out / "forecast_axis.json").write_text(json.dumps(result, indent=1))
    for name, r in rows.items():
        st, ts = r["step"], r["timestep"]
        print(f"{name:24s} W2 {r['w2_predicted']:.2f}x  step {st['psnr_mean']:.2f} / {st['psnr_min']:.2f}  timestep "
              f"{ts['psnr_mean']:.2f} / {ts['psnr_min']:.2f}  gain {r['gain_mean_db']:+.2f} / "
              f"{r['gain_min_db']:+.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
