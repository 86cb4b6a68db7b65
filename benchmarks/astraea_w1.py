"""Astraea on the embedded model (W1): wall-clock speedup of uniform budgets against their FLOP ceiling.

For each uniform budget (first step dense) with and without K/V reuse, and for dense, this generates the same
(prompt, seed) jobs round-robin in one process (``--repeats`` passes; each job starts at another setting), takes
the median latency, and divides the measured speedup by the schedule's FLOP ceiling
(:mod:`vdit_accel.bench.flops` at the embedded model's geometry: ``sum_steps dense / sum_steps setting``).
Efficiency = measured / ceiling: what the implementation's per-token overheads (scoring, gathers, scatters) cost
on a dim-128 model. Beside the ratio of medians, the paired speedup: the median (and quartiles) of per-job
``dense / setting`` ratios, robust to the machine's drift between jobs (``bench.timing.paired_speedups``, as the
bench uses). Also records PSNR vs dense.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/astraea_w1.py --out docs/results/astraea/w1

``--compile``: the same measurement with diffusers' regional compile of the blocks (``compile_repeated_blocks
(fullgraph=True)``, inductor), for dense and every setting alike: inductor fuses the per-token elementwise work
(scores, merges, gathers) that eager runs op by op. Compiled Astraea computes ``ceil(N·j/8)`` rows (row buckets,
``methods.astraea.ROW_BUCKETS``), so under ``--compile`` every budget must be a multiple of 1/8 and the schedule is
given per step (first step dense, then the budget) so that the rows executed are the rows the ceiling counts. Each
setting runs one untimed generation first (compilation); Dynamo's recompile limit is raised for the run (each
setting's block variants are graphs of their own).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vdit_accel.bench.flops import Setting, WanGeometry, step_flops
from vdit_accel.bench.harness import machine_info, prompt_sets
from vdit_accel.bench.metrics import psnr
from vdit_accel.bench.step import rotated
from vdit_accel.bench.timing import paired_speedups
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import ROW_BUCKETS, AstraeaConfig, apply_astraea, row_bucket


def schedule_ceiling(geo: WanGeometry, cfg: AstraeaConfig | None) -> float:
    """Dense FLOPs of the whole generation / the schedule's (text K/V counted once, at the first step)."""
    steps = 50 if cfg is None else cfg.num_steps
    dense = steps * step_flops(geo, Setting())
    if cfg is None:
        return 1.0
    kv = cfg.kv_reuse
    total = sum(step_flops(geo, Setting()) if b >= 1.0 else step_flops(geo, Setting(budget=b, kv_reuse=kv))
                for b in cfg.schedule)
    return dense / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", default="quick")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (module docstring)")
    a = p.parse_args(argv)
    if a.compile:
        off = [b for b in a.budgets if row_bucket(b) / ROW_BUCKETS != b]  # compiled runs round up to a bucket
        if off:
            p.error(f"--compile needs budgets that are multiples of 1/{ROW_BUCKETS} (row buckets), got {off}")
        torch._dynamo.config.recompile_limit = 64
    model = EmbeddedModel.load()
    sampler = Sampler(model)
    gen = GenerationConfig(steps=a.steps)
    prompts = prompt_sets()[a.prompts]
    f, h, w = sampler.geometry(gen)
    pt, ph, pw = model.transformer.config.patch_size
    text_len = model.encode_prompts(prompts[:1]).shape[1]
    geo = WanGeometry.from_model(model.transformer, (f // pt, h // ph, w // pw), text_len)
    configs: dict[str, AstraeaConfig | None] = {"dense": None}
    for b in a.budgets:
        for kv in (False, True):
            configs[f"uniform-{b}" + ("-kv" if kv else "")] = (
                AstraeaConfig(budgets=(1.0,) + (b,) * (a.steps - 1), num_steps=a.steps, kv_reuse=kv) if a.compile
                else AstraeaConfig(target=b, num_steps=a.steps, kv_reuse=kv))
    if a.compile:
        model.transformer.compile_repeated_blocks(fullgraph=True)
        for cfg in configs.values():  # compile every setting's graphs before anything is timed
            handle = apply_astraea(model.transformer, cfg) if cfg is not None else None
            sampler(prompts[0], gen.replace(seed=0), progress=False)
            if handle is not None:
                handle.remove()
    sampler(prompts[0], gen.replace(steps=2), progress=False)  # warm-up
    lat = {k: [] for k in configs}
    videos: dict[str, list] = {k: [None] * len(prompts) for k in configs}
    labels = list(configs)
    for r in range(a.repeats):
        for j, prompt in enumerate(prompts):
            for label in rotated(labels, r * len(prompts) + j):  # no setting always runs first or after dense
                cfg = configs[label]
                handle = apply_astraea(model.transformer, cfg) if cfg is not None else None
                t0 = time.perf_counter()
                videos[label][j] = sampler(prompt, gen.replace(seed=0), progress=False)
                lat[label].append(time.perf_counter() - t0)
                if handle is not None:
                    handle.remove()
    dense = float(np.median(lat["dense"]))
    rows = []
    for label, cfg in configs.items():
        speed = dense / float(np.median(lat[label]))
        paired = paired_speedups(lat["dense"], lat[label])
        ceil = schedule_ceiling(geo, cfg)
        ps = [psnr(v, r) for v, r in zip(videos[label], videos["dense"])]
        rows.append({"label": label, "budget_mean": 1.0 if cfg is None else round(cfg.mean_budget, 4),
                     "kv_reuse": bool(cfg and cfg.kv_reuse),
                     "latency_median_s": round(float(np.median(lat[label])), 4),
                     "latencies_s": [round(x, 4) for x in lat[label]], "speedup": round(speed, 4),
                     "flop_ceiling": round(ceil, 4), "efficiency": round(speed / ceil, 4),
                     "speedup_paired": round(paired["speedup"], 4),
                     "speedup_paired_iqr": [round(paired["speedup_q25"], 4), round(paired["speedup_q75"], 4)],
                     "efficiency_paired": round(paired["speedup"] / ceil, 4),
                     "psnr_mean": round(float(np.mean(ps)), 3) if all(np.isfinite(ps)) else float("inf")})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"format": "vdit-accel/astraea-w1", "command": "benchmarks/astraea_w1.py " + " ".join(sys.argv[1:]),
              "compiled": bool(a.compile),
              **machine_info(), "threads": torch.get_num_threads(), "geometry": geo.to_dict(), "steps": a.steps,
              "prompts": prompts, "repeats": a.repeats, "rows": rows}
    (out / "astraea_w1.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['label']:>18} speedup {r['speedup']:.2f}x (paired {r['speedup_paired']:.2f}x, IQR "
              f"{r['speedup_paired_iqr'][0]:.2f}-{r['speedup_paired_iqr'][1]:.2f}) ceiling {r['flop_ceiling']:.2f}x "
              f"efficiency {r['efficiency']:.2f} (paired {r['efficiency_paired']:.2f}) psnr {r['psnr_mean']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
