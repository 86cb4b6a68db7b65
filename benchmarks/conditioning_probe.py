"""How much the embedded model uses each caption word: flow-matching loss with one attribute swapped.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/conditioning_probe.py \
        --out docs/results/instrument/conditioning_probe.json

For N single-object training-distribution clips, at each noise level t, the velocity MSE of the model
given (a) the true caption, (b) the caption with one attribute replaced by another value (object colour,
shape, motion, background colour, background kind), (c) the empty caption. Same clips, same noise, same
t for every caption. ``gap = loss(swapped) - loss(true)``: a model that reads a word pays for a wrong one
(gap > 0); a gap of ~0 means the model ignores that word and adherence to it is at chance.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch

from vdit_accel.bench.harness import machine_info
from vdit_accel.bench.records import command_line, write_json
from vdit_accel.instrument.captions import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    MOTIONS,
    OBJECT_COLOURS,
    SHAPES,
    Caption,
    format_caption,
)
from vdit_accel.instrument.dataset import LAYOUTS, SIZE_FRACTION, render, sample_spec
from vdit_accel.instrument.model import EmbeddedModel

NOISE_LEVELS = (0.3, 0.6, 0.8, 0.95)


def _next(values, current: str) -> str:
    values = list(values)
    return values[(values.index(current) + 1) % len(values)]


def swapped(caption: Caption, attribute: str) -> Caption:
    """``caption`` with one attribute of its (single) object or its background moved to the next value."""
    obj, bg = caption.objects[0], caption.background
    if attribute == "colour":
        obj = dataclasses.replace(obj, colour=_next(OBJECT_COLOURS, obj.colour))
    elif attribute == "shape":
        obj = dataclasses.replace(obj, shape=_next(SHAPES, obj.shape))
    elif attribute == "motion":
        obj = dataclasses.replace(obj, motion=_next(MOTIONS, obj.motion))
    elif attribute == "background.colour":
        bg = dataclasses.replace(bg, colour=_next(BACKGROUND_COLOURS, bg.colour))
    elif attribute == "background.kind":
        bg = dataclasses.replace(bg, kind=_next(BACKGROUND_KINDS, bg.kind))
    else:
        raise ValueError(attribute)
    return Caption((obj,), bg)


ATTRIBUTES = ("colour", "shape", "motion", "background.colour", "background.kind")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="model folder (default: the shipped embedded model)")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--frames", type=int, default=None, help="default: the model's bench geometry")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--layout", default="uniform", choices=LAYOUTS,
                   help="where the clips' objects start (use the model's training layout)")
    p.add_argument("--object-size", type=float, nargs=2, default=SIZE_FRACTION, metavar=("LO", "HI"),
                   help="object diameter range of the clips (use the model's training range)")
    p.add_argument("--noise-levels", type=float, nargs="+", default=NOISE_LEVELS, metavar="T",
                   help="noise levels t in (0, 1) to probe at")
    p.add_argument("--out", default="docs/results/instrument/conditioning_probe.json")
    a = p.parse_args(argv)
    bad = [t for t in a.noise_levels if not 0 < t < 1]
    if bad:
        p.error(f"--noise-levels {bad} out of range: accepted (0, 1)")
    model = EmbeddedModel.load(a.weights).eval()
    cfg = model.config
    geometry = (a.frames or cfg.frames, a.height or cfg.height, a.width or cfg.width)
    rng = np.random.default_rng(a.seed)
    specs = [sample_spec(rng, two_object_prob=0.0, layout=a.layout, size_range=tuple(a.object_size))
             for _ in range(a.clips)]
    videos = torch.from_numpy(np.stack([render(s, *geometry) for s in specs]))
    captions = [Caption(tuple(o.caption for o in s.objects), s.background) for s in specs]
    texts = {"true": [format_caption(c) for c in captions], "empty": [""] * a.clips}
    for attr in ATTRIBUTES:
        texts[attr] = [format_caption(swapped(c, attr)) for c in captions]
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(a.seed))
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        for t in a.noise_levels:
            x_t = (1 - t) * videos + t * noise
            losses = {}
            for name, tx in texts.items():
                pred = model.transformer(x_t, timestep=torch.full((a.clips,), t * 1000.0),
                                         encoder_hidden_states=model.encode_prompts(tx), return_dict=False)[0]
                losses[name] = float(((pred - (noise - videos)) ** 2).mean())
            gaps = {k: losses[k] - losses["true"] for k in losses if k != "true"}
            rows.append({"t": t, "loss": losses, "gap": gaps})
            print(f"t={t}: true {losses['true']:.5f} " + " ".join(f"{k} {v:+.5f}" for k, v in gaps.items()),
                  flush=True)
    doc = {
        "command": command_line(__file__, argv),
        **machine_info(),
        "settings": {"model_id": cfg.model_id, "clips": a.clips, "geometry": list(geometry), "seed": a.seed,
                     "layout": a.layout, "noise_levels": list(a.noise_levels),
                     "object_size": list(a.object_size)},
        "per_noise_level": rows,
        "mean_gap": {k: float(np.mean([r["gap"][k] for r in rows])) for k in rows[0]["gap"]},
        "wall_s": time.perf_counter() - t0,
    }
    print(f"wrote {write_json(a.out, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
