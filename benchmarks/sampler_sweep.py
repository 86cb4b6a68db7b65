"""Dense adherence of the embedded model under sampler settings, on held-out and training-distribution prompts.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sampler_sweep.py --prompts 10 \
        --settings 5,3 3,3 5,8 3,8 --out docs/results/instrument/sampler_sweep.json

Each setting is ``guidance,shift`` (the flow shift of the Euler scheduler; the model was trained at its
config's ``flow_shift``). Both prompt sets are single-object: the first N held-out prompts, and N captions
drawn from the training distribution (``--training-seed``, default 123). Tells whether low adherence is a
sampler setting or a generalisation gap (held-out vs in-distribution) or neither. To choose a setting without
looking at the held-out prompts, run ``--sets training`` (on a fresh ``--training-seed``), then read the chosen
setting once with ``heldout_adherence.py --guidance G --flow-shift S``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from vdit_accel.bench.harness import machine_info
from vdit_accel.bench.records import command_line, write_json
from vdit_accel.instrument.captions import Caption, format_caption
from vdit_accel.instrument.dataset import heldout_prompts, sample_spec
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.instrument.score import score
from vdit_accel.instrument.video import to_frames


def training_prompts(n: int, seed: int = 123) -> list[str]:
    """``n`` single-object captions drawn from the training distribution (never a held-out combination)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        spec = sample_spec(rng, two_object_prob=0.0)
        out.append(format_caption(Caption(tuple(o.caption for o in spec.objects), spec.background)))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="model folder (default: the shipped embedded model)")
    p.add_argument("--prompts", type=int, default=10, help="prompts per set")
    p.add_argument("--settings", nargs="+", default=["5,3"], help="guidance,shift pairs")
    p.add_argument("--steps", type=int, default=GenerationConfig().steps)
    p.add_argument("--sets", nargs="+", choices=("heldout", "training"), default=["heldout", "training"],
                   help="prompt sets to run (choose a setting on training-distribution prompts alone, then read it "
                        "once on the held-out ones)")
    p.add_argument("--training-seed", type=int, default=123, help="seed of the training-distribution prompts")
    p.add_argument("--out", default="docs/results/instrument/sampler_sweep.json")
    a = p.parse_args(argv)
    settings = [tuple(float(x) for x in s.split(",")) for s in a.settings]
    base = EmbeddedModel.load(a.weights)
    all_sets = {"heldout": lambda: heldout_prompts()[: a.prompts],
                "training": lambda: training_prompts(a.prompts, a.training_seed)}
    sets = {name: all_sets[name]() for name in a.sets}
    rows = []
    t0 = time.perf_counter()
    for guidance, shift in settings:
        base.config = dataclasses.replace(base.config, flow_shift=shift)  # read by the sampler only
        sampler = Sampler(base)
        row = {"guidance": guidance, "shift": shift}
        for name, prompts in sets.items():
            adherence, attributes = [], {}
            for prompt in prompts:
                res = score(to_frames(sampler(prompt, GenerationConfig(steps=a.steps, guidance=guidance, seed=0),
                                              progress=False)), prompt)
                adherence.append(res.adherence)
                for k, v in res.attributes.items():
                    attributes.setdefault(k, []).append(v)
            row[name] = {"adherence": float(np.mean(adherence)),
                         "attributes": {k: float(np.mean(v)) for k, v in attributes.items()}}
        rows.append(row)
        print(f"guidance {guidance} shift {shift}: "
              + " ".join(f"{name} {row[name]['adherence']:.3f}" for name in sets), flush=True)
    doc = {
        "command": command_line(__file__, argv),
        **machine_info(),
        "settings": {"model_id": base.config.model_id, "prompts": sets, "training_seed": a.training_seed,
                     "steps": a.steps, "seed": 0},
        "results": rows,
        "wall_s": time.perf_counter() - t0,
    }
    print(f"wrote {write_json(a.out, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
