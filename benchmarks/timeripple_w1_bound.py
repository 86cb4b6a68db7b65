"""What TimeRipple's keys-merged variant could save on the embedded model (W1) with zero decision overhead.

Two measurements, one process, interleaved repeats:

1. the share of a dense W1 generation's time spent in the self-attention SDPA op (torch profiler, self CPU time of
   the SDPA kernel at the self-attention shapes, keys = the video tokens, over the total self CPU time of the
   generation; cross-attention's SDPA, 20 text keys, is excluded);
2. the SDPA time at W1 shapes (`[1, H, N, D]`, the model's heads) with only a fraction of the keys kept and the
   merge's `+log(count)` bias passed as a `[1, 1, 1, U]` additive mask, as the `tokens` variant runs it, over dense
   SDPA.

The bound on the end-to-end speedup of a variant that keeps a fraction ``f`` of the keys, if deciding and merging
cost nothing, is ``1 / (1 - share * (1 - ratio(f)))``. The kept fractions default to the shipped presets' measured
key removal on the bench prompts (``timeripple-op1.3x-root``: 0.290 removed, ``timeripple-op1.5x-root``: 0.344).

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/timeripple_w1_bound.py \
        --out docs/results/timeripple/w1-bound
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vdit_accel.bench.harness import machine_info, prompt_sets
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler

SDPA_KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
                "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")


def self_attention_share(sampler: Sampler, prompt: str, gen: GenerationConfig, tokens: int) -> dict:
    """Self CPU seconds of the SDPA kernel on `tokens` keys / the generation's total self CPU seconds."""
    with torch.profiler.profile(record_shapes=True) as prof:
        sampler(prompt, gen, progress=False)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    self_attn = cross = 0.0
    for e in events:
        if e.key not in SDPA_KERNELS:
            continue
        keys = e.input_shapes[1][2] if e.input_shapes and len(e.input_shapes[1]) == 4 else None
        if keys == tokens:
            self_attn += e.self_cpu_time_total
        else:
            cross += e.self_cpu_time_total
    return {"self_attention_sdpa_s": self_attn / 1e6, "cross_attention_sdpa_s": cross / 1e6, "total_s": total / 1e6,
            "share": self_attn / total}


def sdpa_ratio(heads: int, head_dim: int, tokens: int, kept: float, repeats: int) -> dict:
    """Median SDPA seconds with ``round(kept * tokens)`` keys and a per-key bias mask, over dense SDPA (paired)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=gen) for _ in range(3))
    u = round(kept * tokens)
    ku, vu = k[:, :, :u].contiguous(), v[:, :, :u].contiguous()
    mask = torch.rand(u, generator=gen).add(1.0).log().view(1, 1, 1, u)
    runs = {"dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "merged": lambda: F.scaled_dot_product_attention(q, ku, vu, attn_mask=mask)}
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = [m / d for m, d in zip(times["merged"], times["dense"])]
    return {"kept": kept, "keys": u, "dense_s": float(np.median(times["dense"])),
            "merged_s": float(np.median(times["merged"])), "ratio_paired_median": float(np.median(ratios))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--removed", type=float, nargs="+", default=[0.290, 0.344],
                   help="fractions of keys removed (defaults: the presets' measured removal on the bench prompts)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=40)
    a = p.parse_args(argv)
    if not all(0.0 <= r < 1.0 for r in a.removed):
        p.error(f"--removed {a.removed}: each fraction must be in [0, 1)")
    out = Path(a.out)
    if (out / "w1_bound.json").exists():
        p.error(f"{out / 'w1_bound.json'} exists: remove it or name another --out")
    model = EmbeddedModel.load()
    sampler = Sampler(model)
    gen = GenerationConfig(steps=a.steps)
    prompt = prompt_sets()["quick"][0]
    f, h, w = sampler.geometry(gen)
    pt, ph, pw = model.transformer.config.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    heads, head_dim = model.transformer.config.num_attention_heads, model.transformer.config.attention_head_dim
    sampler(prompt, gen.replace(steps=2), progress=False)  # warm-up
    shares = [self_attention_share(sampler, prompt, gen, tokens) for _ in range(3)]
    share = float(np.median([s["share"] for s in shares]))
    rows = []
    for removed in a.removed:
        r = sdpa_ratio(heads, head_dim, tokens, 1.0 - removed, a.repeats)
        r["removed"] = removed
        r["bound_speedup"] = 1.0 / (1.0 - share * (1.0 - r["ratio_paired_median"]))
        rows.append(r)
    out.mkdir(parents=True, exist_ok=True)
    result = {"format": "vdit-accel/timeripple-w1-bound", "command": "benchmarks/timeripple_w1_bound.py " +
              " ".join(sys.argv[1:]), **machine_info(), "threads": torch.get_num_threads(),
              "geometry": {"tokens": tokens, "heads": heads, "head_dim": head_dim, "steps": a.steps},
              "self_attention_share_runs": shares, "self_attention_share": share, "rows": rows,
              "bound": "1 / (1 - share * (1 - ratio)): the end-to-end speedup if deciding and merging cost nothing"}
    (out / "w1_bound.json").write_text(json.dumps(result, indent=1))
    print(f"self-attention SDPA share of a dense W1 generation: {share:.3f}")
    for r in rows:
        print(f"keys removed {r['removed']:.3f}: SDPA ratio {r['ratio_paired_median']:.3f}, zero-overhead bound "
              f"{r['bound_speedup']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
