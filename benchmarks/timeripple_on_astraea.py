"""Does TimeRipple add speed on top of Astraea? (issue 15, "with Astraea" target)

On the embedded model (W1), per held-out prompt and in one process, interleaved: dense, an Astraea schedule alone,
and the same schedule with TimeRipple's ``tokens`` presets applied on top (Astraea's computed steps run the
stock blocks, whose self-attention TimeRipple's processor replaces). Reported per point: W1 wall-clock speedup vs
dense (median of per-prompt ratios), PSNR vs dense, TimeRipple's removed keys.

W2 (Wan2.1-1.3B width) price, from measured parts only:
- Astraea's schedule: the latency model (``vdit-accel bench-step --latency-model``), cost per step in dense steps;
- TimeRipple's attention op: its "tokens" decisions recorded on the W1 composed run (per-token spreads of the cond
  branch at every step it acted, every layer), resampled to the bench-step token grid and timed there against
  torch SDPA, decision pass included (``search.calibrate.measure_op_speedup``, the calibration's own measure);
- the SDPA share of a dense W2 step: ``attention_op_s`` of the bench-step JSON's dense row over its composed step.
A computed step with TimeRipple then costs ``1 - share · (1 - 1/op_speedup)`` dense steps (the attention op is the
only part TimeRipple changes), and the composed W2 speedup is ``steps / Σ step costs``.

    PYTHONPATH=src python benchmarks/timeripple_on_astraea.py --threads 2 \
        --out docs/results/timeripple/on-astraea
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vdit_accel.bench.harness import machine_info, resolve_prompts
from vdit_accel.bench.metrics import psnr
from vdit_accel.bench.replay import astraea_choices
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import apply_astraea
from vdit_accel.methods.timeripple import apply_timeripple
from vdit_accel.search.calibrate import OpGeometry, measure_op_speedup
from vdit_accel.search.latency import LatencyModel
from vdit_accel.search.presets import load_preset


def generate(sampler, prompt, gen, astraea_cfg=None, tr_cfg=None, log=None):
    """One timed generation with the given methods applied (Astraea's hooks first, then TimeRipple's processors)."""
    tr = sampler.model.transformer
    handles = []
    try:
        if astraea_cfg is not None:
            handles.append(apply_astraea(tr, astraea_cfg))
        if tr_cfg is not None:
            handles.append(apply_timeripple(tr, tr_cfg))
            if log is not None:
                handles[-1].record_decisions(log)
        t0 = time.perf_counter()
        video = sampler(prompt, gen, progress=False)
        seconds = time.perf_counter() - t0
        stats = [h.stats.summary() for h in handles]
    finally:
        for h in reversed(handles):
            h.remove()
    return video, seconds, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", default="bench")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--astraea", default="astraea-4x", help="Astraea preset (whole-step or token-wise)")
    p.add_argument("--timeripple", nargs="+", default=["timeripple-op1.5x", "timeripple-op2x", "timeripple-op3x"])
    p.add_argument("--step-costs", default="docs/results/bench-step/latency-kv/bench-step.json")
    p.add_argument("--latency-model", default="docs/results/bench-step/latency-kv/latency.json")
    p.add_argument("--op-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    latency = LatencyModel.load(a.latency_model)
    step_json = json.loads(Path(a.step_costs).read_text())
    dense_row = step_json["settings"][0]
    share = dense_row["attention_op_s"] * step_json["geometry"]["target_layers"] / dense_row["step_composed_s"]
    g = step_json["geometry"]
    geometry = OpGeometry(grid=tuple(g["grid"]), heads=g["heads"], head_dim=g["head_dim"])

    sampler = Sampler(EmbeddedModel.load())
    gen = GenerationConfig(steps=a.steps)
    a_cfg = load_preset(a.astraea, steps=a.steps)
    tr_cfgs = {name: load_preset(name, steps=a.steps) for name in a.timeripple}
    prompts = resolve_prompts(a.prompts)
    labels = ["dense", a.astraea] + [f"{a.astraea}+{n}" for n in tr_cfgs]
    rows = {label: {"seconds": [], "psnr": [], "keys_removed": []} for label in labels}
    logs: dict[str, dict] = {n: {} for n in tr_cfgs}
    for i, prompt in enumerate(prompts):
        dense, s_dense, _ = generate(sampler, prompt, gen)
        rows["dense"]["seconds"].append(s_dense)
        video, s, _ = generate(sampler, prompt, gen, a_cfg)
        rows[a.astraea]["seconds"].append(s)
        rows[a.astraea]["psnr"].append(psnr(video, dense))
        for name, cfg in tr_cfgs.items():
            video, s, stats = generate(sampler, prompt, gen, a_cfg, cfg, logs[name] if i == 0 else None)
            label = f"{a.astraea}+{name}"
            rows[label]["seconds"].append(s)
            rows[label]["psnr"].append(psnr(video, dense))
            rows[label]["keys_removed"].append(stats[1]["keys_removed_active"])
        done = [f"{k} {v['seconds'][-1]:.2f}s" + (f" {v['psnr'][-1]:.2f}dB" if v["psnr"] else "")
                for k, v in rows.items()]
        print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(done), file=sys.stderr, flush=True)

    base_cost = latency.total(astraea_choices(a_cfg))
    computed_steps = sum(1 for b in a_cfg.schedule if b >= 1.0)
    table = {}
    for label, r in rows.items():
        ratios = [d / s for d, s in zip(rows["dense"]["seconds"], r["seconds"])]
        entry = {"w1_speedup_median": float(np.median(ratios)), "seconds": r["seconds"]}
        if r["psnr"]:
            entry |= {"psnr_mean": float(np.mean(r["psnr"])), "psnr_min": float(np.min(r["psnr"])), "psnr": r["psnr"]}
        if label == a.astraea:
            entry["w2_speedup"] = a.steps / base_cost
        table[label] = entry
    for name, cfg in tr_cfgs.items():
        records = [rec for (branch, _, _), rec in sorted(logs[name].items()) if branch in ("cond", "default")]
        op = measure_op_speedup(records, cfg.fixed_threshold, cfg, geometry, repeats=a.op_repeats)
        saving = share * (1 - 1 / op["speedup"])  # of one dense step, on each computed step
        entry = table[f"{a.astraea}+{name}"]
        entry |= {"keys_removed_mean": float(np.mean(rows[f"{a.astraea}+{name}"]["keys_removed"])),
                  "w2_op_speedup": op["speedup"], "w2_op": op, "w2_step_saving": saving,
                  "w2_speedup": a.steps / (base_cost - computed_steps * saving), "recorded_calls": len(records)}
        if not all(math.isfinite(v) for v in (op["speedup"], entry["w2_speedup"])):
            raise SystemExit(f"non-finite W2 figure for {name}: refusing to record it")
    result = {"command": " ".join(["python", *sys.argv]), **machine_info(), "threads": a.threads,
              "prompts": prompts, "steps": a.steps, "astraea": a.astraea, "timeripple": a.timeripple,
              "w2": {"step_costs": a.step_costs, "latency_model": a.latency_model, "geometry": g,
                     "sdpa_share_of_dense_step": share, "astraea_cost_dense_steps": base_cost,
                     "computed_steps": computed_steps,
                     "pricing": "computed step with TimeRipple = 1 - share * (1 - 1/op_speedup) dense steps"},
              "points": table}
    (out / "on_astraea.json").write_text(json.dumps(result, indent=1))
    for label, e in table.items():
        print(f"{label:40s} W1 {e['w1_speedup_median']:.2f}x  W2 {e.get('w2_speedup', 1.0):.3f}x  "
              f"PSNR {e.get('psnr_mean', float('inf')):.2f} / {e.get('psnr_min', float('inf')):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
