"""Short training runs that compare changes to the embedded model's recipe, read by the conditioning probe.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_experiments.py base   # 15-35 min each
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_experiments.py wide
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_experiments.py mixer
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/recipe_experiments.py wide-64  # after wide
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/recipe_experiments.py anchored-xyz-x0  # 8 min
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/recipe_experiments.py anchored-xyz-x0-64-hit

Each variant trains from scratch (or, for ``wide-64``, continues ``wide``) into ``runs/exp-NAME`` with
checkpoints (rerun to resume), then runs ``benchmarks/conditioning_probe.py`` on the result at the
geometry of its last stage, writing ``runs/exp-NAME/conditioning_probe.json``. The 1,000-step variants
train at 16 x 32 x 32 only: a cheap read of how fast each one learns to use the caption; the
``anchored*`` variants (session 3) add the anchored layout, position channels and x0 prediction, and
``anchored-xyz-x0-64`` continues ``anchored-xyz-x0`` at the bench geometry (then run
``heldout_adherence.py --weights runs/exp-anchored-xyz-x0-64/release``). Session 4 continues that lineage
with high-noise training (``-hit``: ``timestep_shift`` 10), then larger objects (``-hit-large``: diameter
0.38-0.46), then 1,500 more steps of the same (``-hit-large-long``) or the same with pooled caption text in
the modulation (``-hit-large-pooled``), and ``-hit-large-mix`` continues ``-long`` 400 steps with half of
each batch at shift 1 (fine detail); each starts from its parent's release, so run them in order.
Session 5 continues ``-hit-large-pooled`` 1,000 steps with half of each batch at shift 3 (``-pooled-mix3``) or
in the ``anchored-scene`` layout (``-pooled-scene``), and ``v2-direct`` trains the v2 model on the final data
and noise mixture from scratch.
The five links of the lineage that made ``-hit-large-pooled`` come from ``train.CHAINS["v2-lineage"]``;
``v2-direct`` is the one link of ``train.CHAINS["v2"]`` (session 6: it beat the lineage, 0.87 / 0.89 held-out at
CFG 5).
``--max-steps N`` stops a variant at step N (the weights the full run has there) for a mid-run reading.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

from vdit_accel.instrument.model import EmbeddedConfig
from vdit_accel.instrument.train import CHAINS, Stage, TrainConfig, train

SHORT = TrainConfig(seed=0, stages=(Stage(16, 32, 32, 1000, 16),), checkpoint_every=100)
WIDE = EmbeddedConfig(num_heads=4, ffn_dim=512)
ANCHORED = dataclasses.replace(SHORT, layout="anchored")
V2_CHAIN = CHAINS["v2-lineage"]
V2 = V2_CHAIN[-1].model
#: the experiments that became the links of ``CHAINS["v2-lineage"]`` (``vdit-accel train --recipe v2-lineage``)
LINEAGE = ("anchored-xyz-x0", "anchored-xyz-x0-64", "anchored-xyz-x0-64-hit", "anchored-xyz-x0-64-hit-large",
           "anchored-xyz-x0-64-hit-large-pooled")
#: session 4: 1,500 more steps of the high-noise, large-object recipe (with or without pooled text)
LONG = V2_CHAIN[4].recipe
NO_POOL = dataclasses.replace(V2, pooled_text=False)

#: name -> (model config, recipe, run to start from or None)
VARIANTS: dict[str, tuple[EmbeddedConfig, TrainConfig, str | None]] = {
    "base": (EmbeddedConfig(), SHORT, None),
    "wide": (WIDE, SHORT, None),
    "mixer": (EmbeddedConfig(caption_mixer=True), SHORT, None),
    "anchored": (EmbeddedConfig(), ANCHORED, None),
    "anchored-xyz": (EmbeddedConfig(position_channels=True), ANCHORED, None),
    **{name: (phase.model, phase.recipe, None if k == 0 else f"runs/exp-{LINEAGE[k - 1]}/release")
       for k, (name, phase) in enumerate(zip(LINEAGE, V2_CHAIN, strict=True))},
    "anchored-xyz-x0-64-hit-large-long": (NO_POOL, LONG, "runs/exp-anchored-xyz-x0-64-hit-large/release"),
    "anchored-xyz-x0-64-hit-large-mix": (
        NO_POOL, dataclasses.replace(LONG, seed=6, stages=(Stage(16, 64, 64, 400, 8),), timestep_shift=(10.0, 1.0)),
        "runs/exp-anchored-xyz-x0-64-hit-large-long/release"),
    "anchored-xyz-x0-64-hit-large-pooled-mix3": (
        V2,
        dataclasses.replace(LONG, seed=7, stages=(Stage(16, 64, 64, 1000, 8),), lr=3e-4, timestep_shift=(10.0, 3.0)),
        "runs/exp-anchored-xyz-x0-64-hit-large-pooled/release"),
    "anchored-xyz-x0-64-hit-large-pooled-scene": (
        V2, dataclasses.replace(LONG, seed=8, stages=(Stage(16, 64, 64, 1000, 8),), layout="anchored-scene"),
        "runs/exp-anchored-xyz-x0-64-hit-large-pooled/release"),
    # session 5: the v2 model's data and noise from the first step, in one run (32 px, then the bench geometry);
    # session 6 made it ``CHAINS["v2"]``
    "v2-direct": (CHAINS["v2"][0].model, CHAINS["v2"][0].recipe, None),
    "wide-64": (WIDE, TrainConfig(seed=2, stages=(Stage(16, 64, 64, 1200, 8),), lr=1e-3, warmup=100,
                                  checkpoint_every=50), "runs/exp-wide/release"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(VARIANTS))
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N steps (a mid-run snapshot: the same weights the full run has at step N) and "
                        "write the EMA weights to runs/exp-NAME-stepN/release")
    a = p.parse_args(argv)
    model_cfg, cfg, init_from = VARIANTS[a.name]
    if a.max_steps is None:
        out = Path("runs") / f"exp-{a.name}"
        train(out, cfg, model_cfg, init_from=init_from)
    else:
        if not 1 <= a.max_steps < cfg.total_steps:
            p.error(f"--max-steps {a.max_steps} out of range: accepted [1, {cfg.total_steps - 1}]")
        out = Path("runs") / f"exp-{a.name}-step{a.max_steps}"
        model = train(out, cfg, model_cfg, init_from=init_from, max_steps=a.max_steps)
        model.save(out / "release", extra={"training": {"snapshot_of": a.name, "steps": a.max_steps,
                                                        "of_steps": cfg.total_steps, "init_from": init_from}})
    frames, height, width = cfg.stages[-1].frames, cfg.stages[-1].height, cfg.stages[-1].width
    probe = Path(__file__).parent / "conditioning_probe.py"
    subprocess.run([sys.executable, str(probe), "--weights", str(out / "release"), "--frames", str(frames),
                    "--height", str(height), "--width", str(width), "--layout", cfg.layout,
                    "--object-size", *(str(v) for v in cfg.object_size),
                    "--out", str(out / "conditioning_probe.json")], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
