"""Dense adherence of the embedded model on the held-out prompts (never seen in training), plus a GIF grid.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/heldout_adherence.py --out docs/results/instrument

Writes ``heldout_adherence.json`` (per prompt: the scorer's attribute verdicts and adherence, and the background
measurements its kind verdict reads; the mean; the share of all-correct clips) and ``heldout_grid.gif`` /
``heldout_grid.png`` (every clip, 4 per row). ``--render LAYOUT`` scores the renderer's clips of the same prompts
instead (objects of ``--object-size``): the ground-truth reference for those measurements.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from vdit_accel.bench.harness import machine_info, resolve_prompts
from vdit_accel.bench.records import command_line, write_json
from vdit_accel.instrument.captions import parse_caption
from vdit_accel.instrument.dataset import LAYOUTS, SIZE_FRACTION, render, spec_for_caption
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.instrument.score import (
    GRADIENT_RANGE_THRESHOLD,
    TEXTURE_CHANGE_THRESHOLD,
    TEXTURE_RESIDUAL_THRESHOLD,
    score,
)
from vdit_accel.instrument.video import to_frames, write_video

PER_ROW = 4


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", default="heldout")
    p.add_argument("--steps", type=int, default=GenerationConfig().steps)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flow-shift", type=float, default=None, help="sampler shift (default: the model's)")
    p.add_argument("--out", default="docs/results/instrument")
    p.add_argument("--weights", default=None, help="model folder (default: the shipped embedded model)")
    p.add_argument("--render", default=None, choices=LAYOUTS,
                   help="score rendered ground-truth clips in this layout (seeded by --seed) instead of generations")
    p.add_argument("--object-size", type=float, nargs=2, default=SIZE_FRACTION, metavar=("LO", "HI"),
                   help="with --render: the objects' diameter range")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = EmbeddedModel.load(a.weights)
    sampler = Sampler(model)
    gen = GenerationConfig(steps=a.steps, guidance=a.guidance, seed=a.seed, flow_shift=a.flow_shift)
    rows, clips = [], []
    t0 = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    for prompt in resolve_prompts(a.prompts):
        if a.render is None:
            frames = to_frames(sampler(prompt, gen, progress=False))
        else:
            spec = spec_for_caption(parse_caption(prompt), rng, a.render, tuple(a.object_size))
            frames = to_frames(render(spec, *sampler.geometry(gen)))
        res = score(frames, prompt)
        bg = res.analysis.background
        rows.append({"prompt": prompt, "adherence": res.adherence, "all_correct": res.all_correct,
                     "attributes": res.attributes, "detected": str(res.analysis.caption),
                     "background": {"temporal_change": bg.temporal_change, "plane_range": bg.plane_range,
                                    "plane_residual": bg.plane_residual}})
        clips.append(frames)
        print(f"{res.adherence:.3f} {prompt}", flush=True)
    doc = {
        "command": command_line(__file__, argv),
        **machine_info(),
        "settings": {"prompts": a.prompts, "steps": a.steps, "guidance": sampler.guidance(gen), "seed": a.seed,
                     "flow_shift": sampler.flow_shift(gen), "model_id": None if a.render else model.config.model_id,
                     "render": a.render, "object_size": list(a.object_size) if a.render else None},
        "background_kind_thresholds": {"temporal_change": TEXTURE_CHANGE_THRESHOLD,
                                       "plane_residual": TEXTURE_RESIDUAL_THRESHOLD,
                                       "plane_range": GRADIENT_RANGE_THRESHOLD},
        "mean_adherence": float(np.mean([r["adherence"] for r in rows])),
        "all_correct_share": float(np.mean([r["all_correct"] for r in rows])),
        "wall_s": time.perf_counter() - t0,
        "clips": rows,
    }
    write_json(out / "heldout_adherence.json", doc)
    while len(clips) % PER_ROW:
        clips.append(np.zeros_like(clips[0]))
    grid = np.concatenate([np.concatenate(clips[i:i + PER_ROW], axis=2) for i in range(0, len(clips), PER_ROW)],
                          axis=1)
    write_video(grid, out / "heldout_grid.gif")
    import imageio.v3 as iio

    iio.imwrite(out / "heldout_grid.png", grid[grid.shape[0] // 2])
    print(f"mean adherence {doc['mean_adherence']:.4f}; all correct {doc['all_correct_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
