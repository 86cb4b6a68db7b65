"""Per-job PSNR of an Astraea preset on the bench prompts, as shipped and with its steps 1-3 computed in full.

Diagnoses the joint search's blind spot: the teacher-forced segment error table (8x32x32, no CFG) prices a reuse
of the first computed step by the error it adds along the dense trajectory, not by how far the trajectory then
drifts, and some prompts drift far. Also runs the preset with forecast orders capped at 1 (order 2 needs three
computed steps of history; right after step 0 it equals order 0).

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/astraea_early_steps.py --preset astraea-3x \\
        --out docs/results/astraea/early-steps/astraea-3x.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from vdit_accel.bench.harness import machine_info, prompt_sets
from vdit_accel.bench.metrics import psnr
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import apply_astraea
from vdit_accel.search.presets import load_preset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="astraea-3x")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=2)
    a = p.parse_args(argv)
    model = EmbeddedModel.load()
    sampler = Sampler(model)
    gen = GenerationConfig(steps=50)
    base = load_preset(a.preset, steps=50)
    budgets = list(base.budgets)
    budgets[1:4] = [1.0] * 3
    variants = {"shipped": base, "steps 1-3 computed": dataclasses.replace(base, budgets=tuple(budgets)),
                "orders <= 1": dataclasses.replace(base, forecast=tuple(min(o, 1) for o in base.orders))}
    rows = []
    for prompt in prompt_sets()["bench"]:
        for seed in range(a.seeds):
            ref = sampler(prompt, gen.replace(seed=seed), progress=False)
            row = {"prompt": prompt, "seed": seed}
            for name, cfg in variants.items():
                handle = apply_astraea(model.transformer, cfg)
                video = sampler(prompt, gen.replace(seed=seed), progress=False)
                handle.remove()
                row[name] = round(psnr(video, ref), 2)
            rows.append(row)
            print(row, flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/astraea_early_steps.py " + " ".join(sys.argv[1:])
    record = {"format": "vdit-accel/astraea-early-steps", "command": command, **machine_info(), "preset": a.preset,
              "rows": rows}
    out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
