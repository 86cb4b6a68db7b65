"""diffusers' TaylorSeer against Astraea running TaylorSeer's cadence, on the 4 selection prompts (50 steps, CFG 2).

Shows that Astraea's whole-step first-order forecast reproduces diffusers' TaylorSeer (same PSNR against dense),
and gives the peer's reference on the prompts the refine search makes its final choice on (docs/speed.md,
"Final-video refinement"). Quality only; speeds are the latency model's predictions (W2).

    python benchmarks/taylorseer_cadence.py --threads 1 --out docs/results/astraea/refine/taylorseer-cadence.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from diffusers import TaylorSeerCacheConfig

from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.peers import TAYLORSEER_WAN_BLOCKS
from vdit_accel.search.joint import SELECTION_PROMPTS, _psnr, schedule_to_config
from vdit_accel.search.latency import LatencyModel
from vdit_accel.search.refine import taylorseer_cadence

LATENCY = "docs/results/bench-step/latency-kv/latency.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--intervals", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = EmbeddedModel.load()
    sampler = Sampler(model)
    lm = LatencyModel.load(LATENCY)
    prompts = list(SELECTION_PROMPTS)
    gen = GenerationConfig(steps=50)
    noise = torch.cat([sampler.initial_noise(gen.replace(seed=n)) for n in range(len(prompts))])
    tr = model.transformer

    def run(cfg=None, peer=None):
        handle = apply_astraea(tr, cfg) if cfg is not None else None
        if peer is not None:
            tr.enable_cache(peer)
        try:
            return sampler(prompts, gen, progress=False, latents=noise)
        finally:
            if handle is not None:
                handle.remove()
            if peer is not None:
                tr.disable_cache()

    dense = run()
    base = AstraeaConfig(num_steps=50, dense_steps=1, kv_reuse=True)
    results = {}
    for i in args.intervals:
        peer = TaylorSeerCacheConfig(cache_interval=i, max_order=1, disable_cache_before_step=3,
                                     taylor_factors_dtype=torch.float32, cache_identifiers=TAYLORSEER_WAN_BLOCKS)
        runs = {f"taylorseer-i{i}-o1": run(peer=peer)}
        for order in (1, 2):
            runs[f"cad-i{i}-o{order}"] = run(cfg=schedule_to_config(taylorseer_cadence(50, i, order=order), base))
        for name, video in runs.items():
            ps = _psnr(dense, video)
            speed = lm.speedup(taylorseer_cadence(50, i, order=int(name[-1]) if name.startswith("cad") else 1))
            results[name] = {"psnr": ps, "speed": speed}
            print(f"{name:24s} W2 {speed:.2f}x  PSNR mean {np.mean(ps):.2f}  min {np.min(ps):.2f}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python " + " ".join(sys.argv), "prompts": prompts, "latency_model": LATENCY,
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
