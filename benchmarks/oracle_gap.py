"""How much a perfect model could gain from each caption word at pure noise, per data setting.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/oracle_gap.py \
        --out docs/results/instrument/recipe_experiments/oracle_gap.json

At t -> 1 the best a model can predict is the mean clean clip given the caption, E[x0 | caption]. For a
red object on a solid blue background, this script estimates that mean from ``--samples`` random
placements per caption and reports, per data setting (layout and object size range), the MSE between the
means of two captions that differ in one word: every pair of shapes (still and moving left) and a motion
pair (left vs still). That is the ideal ``shape`` / ``motion`` gap of ``conditioning_probe.py`` near t = 1
(in x0 units): a word whose ideal gap is tiny cannot be learned from the loss, whatever the model.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np

from vdit_accel.bench.harness import machine_info
from vdit_accel.bench.records import command_line, write_json
from vdit_accel.instrument.captions import SHAPES, BackgroundCaption, Caption, ObjectCaption
from vdit_accel.instrument.dataset import SIZE_FRACTION, render, spec_for_caption

#: name -> (layout, object size range)
SETTINGS: dict[str, tuple[str, tuple[float, float]]] = {
    "uniform (v1)": ("uniform", SIZE_FRACTION),
    "anchored": ("anchored", SIZE_FRACTION),
    "anchored, size 0.38-0.46": ("anchored", (0.38, 0.46)),
}


def mean_clip(caption: ObjectCaption, layout: str, size_range: tuple[float, float], samples: int,
              rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """E[x0 | caption] over ``samples`` placements: `[3, F, H, W]` in [-1, 1]."""
    full = Caption((caption,), BackgroundCaption("blue", "solid"))
    acc = np.zeros((3, frames, size, size), np.float64)
    for _ in range(samples):
        acc += render(spec_for_caption(full, rng, layout, size_range), frames, size, size)
    return acc / samples


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=40, help="placements per caption")
    p.add_argument("--size", type=int, default=64, help="frame height and width in pixels (16 frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/instrument/recipe_experiments/oracle_gap.json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = {}
    for name, (layout, size_range) in SETTINGS.items():
        rng = np.random.default_rng(a.seed)
        means = {(s, m): mean_clip(ObjectCaption("red", s, m), layout, size_range, a.samples, rng, 16, a.size)
                 for s in SHAPES for m in ("still", "left")}
        pairs = {m: {f"{x}-{y}": float(np.mean((means[(x, m)] - means[(y, m)]) ** 2))
                     for x, y in itertools.combinations(SHAPES, 2)} for m in ("still", "left")}
        motion = float(np.mean([np.mean((means[(s, "left")] - means[(s, "still")]) ** 2) for s in SHAPES]))
        rows[name] = {"layout": layout, "object_size": list(size_range), "shape_pairs": pairs,
                      "shape_gap_mean": float(np.mean([v for d in pairs.values() for v in d.values()])),
                      "shape_gap_min": float(min(v for d in pairs.values() for v in d.values())),
                      "motion_gap_left_vs_still": motion}
        r = rows[name]
        print(f"{name:26s} shape gap mean {r['shape_gap_mean']:.4f} min {r['shape_gap_min']:.4f}  "
              f"motion (left vs still) {motion:.4f}", flush=True)
    doc = {"command": command_line(__file__, argv), **machine_info(),
           "settings": {"samples": a.samples, "geometry": [16, a.size, a.size], "seed": a.seed},
           "per_setting": rows, "wall_s": time.perf_counter() - t0}
    print(f"wrote {write_json(a.out, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
