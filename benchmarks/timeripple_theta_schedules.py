"""TimeRipple's keys-merged "tokens" variant under step schedules: fixed θ, dense early steps then a higher θ, a ramp.

PSNR vs dense of final videos (50 steps, CFG 2, noise seed = prompt index) on the 4 calibration + 4 selection
prompts (never a bench prompt), with the mean keys removed per step; resumable (the JSON is the checkpoint).
Session 10 ran the first five settings (the run was stopped for time; the JSON holds what ran):

    PYTHONPATH=src python benchmarks/timeripple_theta_schedules.py docs/results/timeripple/theta-schedules/sweep.json
"""
import json
import sys
import time
from collections import defaultdict

import torch

from vdit_accel.bench.harness import CALIBRATION_PROMPTS
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.search.joint import SELECTION_PROMPTS, _psnr

torch.set_num_threads(1)
STEPS = 50
sampler = Sampler(EmbeddedModel.load())
gen = GenerationConfig(steps=STEPS)
prompts = list(CALIBRATION_PROMPTS) + list(SELECTION_PROMPTS)
noise = torch.cat([sampler.initial_noise(gen.replace(seed=n)) for n in range(len(prompts))])
out_path = sys.argv[1]
try:
    res = json.load(open(out_path))
except FileNotFoundError:
    res = {}

def run(cfg):
    h = apply_timeripple(sampler.model.transformer, cfg) if cfg is not None else None
    try:
        v = sampler(prompts, gen, progress=False, latents=noise)
        per = defaultdict(list)
        if h is not None:
            h.stats.flush()
            for (_, s, _), st in h.stats.calls.items():
                per[s].append(st.keys_removed)
        return v, {s: sum(x) / len(x) for s, x in sorted(per.items())}
    finally:
        if h is not None:
            h.remove()

dense, _ = run(None)
def tok(th_lo, th_hi, i_min, i_max):
    return TimeRippleConfig(theta_min=th_lo, theta_max=th_hi, i_min=i_min, i_max=i_max, num_steps=STEPS,
                            variant="tokens", reuse_q=False)
cands = {}
for th in (0.13, 0.14):
    cands[f"fixed-{th}"] = TimeRippleConfig(fixed_threshold=th, num_steps=STEPS, variant="tokens", reuse_q=False)
for th in (0.15, 0.17):
    for i0 in (3, 6, 10):
        cands[f"d{i0}-{th}"] = tok(th, th, i0, i0 + 1)
for lo, hi, i0, i1 in ((0.1, 0.2, 3, 45),):
    cands[f"ramp{lo}-{hi}-{i0}-{i1}"] = tok(lo, hi, i0, i1)
for name, cfg in cands.items():
    if name in res:
        continue
    t0 = time.time()
    v, per = run(cfg)
    ps = _psnr(dense, v)
    res[name] = {"psnr": ps, "mean": sum(ps) / len(ps), "min": min(ps), "keys_removed_per_step": per,
                 "config": cfg.to_dict(), "s": time.time() - t0}
    print(name, round(res[name]["mean"], 2), round(min(ps), 2), round(time.time() - t0), flush=True)
    json.dump(res, open(out_path, "w"), indent=1)
