"""Whole-step cadences forecasting over the timestep: candidates scored on final videos, presets chosen per target.

Each candidate is a TaylorSeer-style cadence (every i-th step computed after a warm-up, first-order forecasts
between; ``search.refine.taylorseer_cadence``), with a different warm-up or with computed steps dropped (their
gaps joined), run by Astraea's whole-step path with ``forecast_axis="timestep"``. Score = mean + min
PSNR (the refinement's objective) of the final videos on the 4 calibration + 4 selection prompts (50 steps, CFG 2,
noise seed = prompt index; never a bench prompt); W2 = the latency model's prediction. For each target speedup the
best-scoring candidate that reaches it becomes the preset ``astraea-<target>x`` (written only with
``--presets-out``). Evaluations are checkpointed in ``--out``/ck (a rerun replays them).

    PYTHONPATH=src python benchmarks/cadence_candidates.py --threads 2 --out docs/results/astraea/cadence-timestep \
        --presets-out runs/presets-cadence
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vdit_accel.bench.harness import CALIBRATION_PROMPTS, machine_info
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig
from vdit_accel.search.joint import SELECTION_PROMPTS, config_to_schedule, schedule_to_config
from vdit_accel.search.latency import LatencyModel, StepChoice
from vdit_accel.search.presets import load_preset, save_preset
from vdit_accel.search.refine import FinalVideoObjective, schedule_key, taylorseer_cadence

# (interval, warm-up, indices of the computed steps to drop)
CANDIDATES = [(4, 3, ()), (4, 2, ()), (4, 1, ()), (4, 3, (-1,)), (4, 3, (-2,)), (4, 3, (-3,)), (4, 3, (-4,)),
              (4, 3, (6,)), (5, 3, (-1,)), (6, 2, ()), (6, 3, (-1,)), (6, 3, (-2,)), (6, 3, (-3,)), (7, 3, ()),
              (7, 2, ()), (8, 3, (-1,)), (8, 3, (-2,)), (8, 3, (-3,)),
              (4, 3, (-3, -5)), (4, 3, (-3, -6)), (4, 3, (-3, -7)), (4, 3, (-3, -4)), (4, 3, (-3, 6)), (4, 3, (-3, 4)),
              (4, 3, (-3, -7, 4)), (4, 3, (-3, -7, 5)), (4, 3, (-3, -7, 6)), (4, 3, (-3, -7, 7)), (4, 3, (-3, -7, -5)),
              (4, 3, (-3, -7, -4)), (7, 2, (-2,)), (7, 2, (-3,)), (7, 2, (-4,)), (7, 1, ()), (8, 2, ()),
              # session 11: cadences for the 2x and 3x targets (longer warm-ups at interval 3 and 4)
              (4, 4, ()), (4, 5, ()), (4, 4, (-3,)), (3, 3, ()), (3, 6, ()), (3, 8, ()), (3, 10, ()), (3, 12, ())]
TARGETS = (2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0)
# shipped presets scored beside the candidates (a target keeps its preset unless beaten)
INCUMBENTS = ("astraea-2x", "astraea-3x", "astraea-4x")


def candidate(interval: int, warmup: int, drops: tuple[int, ...]) -> tuple[str, list[StepChoice]]:
    s = taylorseer_cadence(50, interval, warmup=warmup)
    full = [k for k, c in enumerate(s) if c.budget == 1.0]
    for d in drops:  # indices into the cadence's computed steps
        s[full[d]] = StepChoice(0.0, 1)
    return f"i{interval}-w{warmup}" + "".join(f"-drop{d}" for d in drops), s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency-model", default="docs/results/bench-step/latency-kv/latency.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--presets-out", default=None, help="write the chosen presets here (astraea-<target>x.json)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    latency = LatencyModel.load(a.latency_model)
    sampler = Sampler(EmbeddedModel.load())
    gen = GenerationConfig(steps=50)
    prompts = list(CALIBRATION_PROMPTS) + list(SELECTION_PROMPTS)
    base = AstraeaConfig(num_steps=50, dense_steps=1, kv_reuse=latency.kv_reuse, forecast_axis="timestep")
    obj = FinalVideoObjective(sampler, prompts, gen, base, workdir=Path(a.out) / "ck")
    rows, schedules = {}, {}
    named = [candidate(*spec) for spec in CANDIDATES]
    named += [(f"preset:{p}", config_to_schedule(load_preset(p, steps=50))) for p in INCUMBENTS]
    for name, s in named:
        ps = obj.psnr(s)
        schedules[name] = s
        rows[name] = {"key": schedule_key(s), "w2_predicted": latency.speedup(s), "psnr": ps,
                      "psnr_mean": float(np.mean(ps)), "psnr_min": float(np.min(ps)), "score": obj.score(ps)}
        print(f"{name:14s} W2 {rows[name]['w2_predicted']:.2f}x  {rows[name]['psnr_mean']:.2f} / "
              f"{rows[name]['psnr_min']:.2f} dB", file=sys.stderr, flush=True)
    chosen = {}
    for t in TARGETS:
        ok = [n for n, r in rows.items() if r["w2_predicted"] >= t]
        best = max(ok, key=lambda n: rows[n]["score"]) if ok else None
        if best is not None and best != f"preset:astraea-{t:g}x":  # an incumbent that wins keeps its file
            chosen[f"astraea-{t:g}x"] = best
    result = {"command": " ".join(["python", *sys.argv]), **machine_info(), "threads": a.threads, "prompts": prompts,
              "base": base.to_dict(), "rule": "per target: the best mean + min PSNR among candidates reaching it",
              "candidates": rows, "chosen": chosen}
    (Path(a.out) / "candidates.json").write_text(json.dumps(result, indent=1))
    for preset, name in chosen.items():
        print(f"{preset}: {name} ({rows[name]['w2_predicted']:.2f}x, {rows[name]['psnr_mean']:.2f} / "
              f"{rows[name]['psnr_min']:.2f} dB)")
        if a.presets_out:
            save_preset(Path(a.presets_out) / f"{preset}.json", "astraea", schedule_to_config(schedules[name], base),
                        model_id=sampler.model.config.model_id, geometry=list(sampler.geometry(gen)), steps=50, seed=0,
                        record={"allocator": "cadence candidates", "candidate": name, "search": {
                            **{k: rows[name][k] for k in ("key", "w2_predicted", "psnr_mean", "psnr_min")},
                            "calibration_prompts": list(CALIBRATION_PROMPTS),
                            "selection_prompts": list(SELECTION_PROMPTS),
                            "evidence": str(Path(a.out) / "candidates.json")},
                            "latency_geometry": latency.geometry, "latency_hardware": latency.hardware})
    return 0


if __name__ == "__main__":
    sys.exit(main())
