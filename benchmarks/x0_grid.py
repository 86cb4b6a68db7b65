"""What the model believes the clean clip is, per shape and noise level: its x0 estimate for a still object.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/x0_grid.py --weights runs/exp-NAME/release \
        --size 32 --out docs/results/instrument/recipe_experiments/NAME-x0_grid

For each shape, a red still object of size 0.3 at the frame centre on a solid blue background, noised to
x_t = (1 - t) x0 + t eps (one seeded eps for all) at t = 0.3 ... 0.95; the model's x0 estimate
x_t - t v(x_t, t, caption) is drawn (middle frame) next to the truth, and compared by MSE with every shape's
clean clip: ``nearest`` is the shape whose clip the estimate is closest to. A model that renders the shape it
is told names its own shape at low t (where x_t shows it) and, if it reads the shape word, at high t too.
Writes NAME.png and NAME.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from vdit_accel.bench.harness import machine_info
from vdit_accel.bench.records import command_line, write_json
from vdit_accel.instrument.captions import SHAPES, BackgroundCaption, ObjectCaption
from vdit_accel.instrument.dataset import ObjectSpec, VideoSpec, render
from vdit_accel.instrument.model import EmbeddedModel

NOISE_LEVELS = (0.3, 0.6, 0.8, 0.9, 0.95)


def still_clip(shape: str) -> VideoSpec:
    """A red ``shape`` of size 0.3 standing still at the centre of a solid blue background."""
    return VideoSpec((ObjectSpec(ObjectCaption("red", shape, "still"), 0.5, 0.5, 0.3, 0.0, 1.0),),
                     BackgroundCaption("blue", "solid"), 0.0, 0.0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="model folder (default: the shipped embedded model)")
    p.add_argument("--size", type=int, default=64, help="frame height and width in pixels (16 frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output path without extension")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = EmbeddedModel.load(a.weights).eval()
    specs = {s: still_clip(s) for s in SHAPES}
    clean = {s: torch.from_numpy(render(sp, 16, a.size, a.size))[None] for s, sp in specs.items()}
    eps = torch.randn(clean[SHAPES[0]].shape, generator=torch.Generator().manual_seed(a.seed))
    fig, axes = plt.subplots(len(SHAPES), len(NOISE_LEVELS) + 1, figsize=(2 * (len(NOISE_LEVELS) + 1),
                                                                          2 * len(SHAPES)))
    rows = []
    for i, shape in enumerate(SHAPES):
        cond = model.encode_prompts([specs[shape].text])
        for j, t in enumerate(NOISE_LEVELS):
            x_t = (1 - t) * clean[shape] + t * eps
            with torch.no_grad():
                v = model.transformer(x_t, timestep=torch.tensor([t * 1000.0]), encoder_hidden_states=cond,
                                      return_dict=False)[0]
            x0 = (x_t - t * v).clamp(-1, 1)
            mse = {s: float(((x0 - c) ** 2).mean()) for s, c in clean.items()}
            rows.append({"shape": shape, "t": t, "mse_to": mse, "nearest": min(mse, key=mse.get)})
            axes[i, j].imshow((x0[0, :, 8].permute(1, 2, 0) * 0.5 + 0.5).numpy())
            axes[i, j].set_title(f"{shape} t={t}: {rows[-1]['nearest']}", fontsize=7)
        axes[i, -1].imshow((clean[shape][0, :, 8].permute(1, 2, 0) * 0.5 + 0.5).numpy())
        axes[i, -1].set_title(f"{shape}: truth", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=60)
    plt.close(fig)
    own = {t: float(np.mean([r["nearest"] == r["shape"] for r in rows if r["t"] == t])) for t in NOISE_LEVELS}
    doc = {"command": command_line(__file__, argv), **machine_info(),
           "settings": {"model_id": model.config.model_id, "size": a.size, "seed": a.seed},
           "own_shape_fraction_per_t": own, "rows": rows}
    print("fraction of shapes whose x0 estimate is nearest their own shape, per t:", own)
    print(f"wrote {write_json(out.with_suffix('.json'), doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
