"""Reproduce the Astraea paper's comparisons (§6.4 ablation table, §7 open questions) on our model.

Every number and figure is computed here, from the model, at run time; nothing is hard-coded. Each experiment
writes ``<name>.json`` (the exact command line, settings, ``machine_info()``, the run budget, any reduction, every
number) and ``<name>.png`` into ``--out``. Evaluation always uses ``--prompts`` (default: the held-out prompt set),
which must be disjoint from the search prompts (``prompt_sets()['calib']`` and the preset's own search prompts).
Speedups are ratios of median wall-clock latencies to dense, measured in the same process on the same
(prompt, seed) jobs; within a job every variant runs back to back (dense first), so machine drift hits all alike.

Experiments (definitions; see each function's docstring for the exact computation):

* ``baselines``: the searched schedule (``--preset``) vs the uniform and the greedy schedule at the same target,
  both built by :func:`vdit_accel.search.astraea_search.baselines` on the search prompts at the proxy fidelity
  (its measured single-step sensitivity table drives the greedy). PSNR / SSIM / final-latent MSE vs dense, mean
  budget, measured speedup, and the margin of searched over uniform and greedy in dB (§7 "no uniform-budget row",
  open question 6).
* ``ablations``: §6.4 at matched speed: Astraea vs SELECT Q&K (``kv="selected"``, at the same schedule and at a
  higher mean budget whose measured speed matches Astraea's), TIMESTEP-LEVEL skipping (budgets in {0, 1} with the
  preset's mean), FIXED-TOKEN (``selection="fixed"``) and, extra, ``cache="residual"`` (open question 2); each with
  measured speedup, PSNR / SSIM, peak-memory delta vs dense and Astraea's exact cache size.
* ``score_options``: open question 1, the token-score choices (``delta_norm``, ``lse_reduction``, ``normalize``,
  ``w_beta``), one factor at a time from the defaults, at the preset schedule; PSNR vs dense.

Commands (run from the repository root):

    # smoke (random tiny model, a few seconds; what tests/test_astraea_paper_smoke.py runs)
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/astraea_paper.py \\
        --model tiny --steps 4 --n-prompts 1 --out /tmp/astraea-smoke

    # the real runs on the shipped embedded model (needs the searched preset astraea-50), one experiment each
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/astraea_paper.py \\
        --model embedded --experiments baselines --out docs/results/astraea
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/astraea_paper.py \\
        --model embedded --experiments ablations --out docs/results/astraea
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/astraea_paper.py \\
        --model embedded --experiments score_options --out docs/results/astraea

    # print the run budget (generations and estimated time per experiment) without running anything
    ... --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from vdit_accel.bench.harness import machine_info, prompt_sets, resolve_prompts
from vdit_accel.bench.memory import PeakMemory
from vdit_accel.bench.metrics import psnr, ssim
from vdit_accel.bench.records import command_line, json_clean  # noqa: E402
from vdit_accel.errors import ConfigError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.ops.astraea import budget_to_count
from vdit_accel.search.astraea_search import Fidelity, baselines, search_astraea
from vdit_accel.search.evolution import EvolutionConfig
from vdit_accel.search.presets import load_preset, read_preset

EXPERIMENTS = ("baselines", "ablations", "score_options")
RESULTS_FORMAT = "vdit-accel/astraea-paper"
RESULTS_VERSION = 1
EMBEDDED_DENSE_S_AT_50 = 10.0  # the lead's figure for one dense 50-step CFG generation; used only for the estimate
PROXY_GEOMETRY = {"embedded": (8, 32, 32), "tiny": (4, 8, 8)}
PROXY_GUIDANCE = 1.0
SENSITIVITY_PROBES = (0.0, 0.5)  # baselines()' default probes (step_sensitivity)
MATCH_TOLERANCE = 0.05  # SELECT Q&K matched-speed calibration stops within 5 % of Astraea's latency
SCORE_FACTORS = {
    "delta_norm": ("l1", "l2", "rel_l2"),
    "lse_reduction": ("mean", "max", "logsumexp"),
    "normalize": ("mean", "max", "none"),
    "w_beta": (0.0, 0.5, 2.0),
}
TINY_EVOLUTION = {"population": 4, "children": 2, "generations": 2, "seed": 0}


# ----------------------------------------------------------------------------------------------------------------
# shared infrastructure
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    """What every experiment needs: model, sampler, jobs, the schedule under test and where to write."""

    args: argparse.Namespace
    model: torch.nn.Module
    sampler: Sampler
    prompts: list[str]
    jobs: list[tuple[str, int]]
    schedule_cfg: AstraeaConfig  # the searched (preset) config: budgets + score options
    schedule_info: dict
    search_prompts: list[str]
    dense_s: float  # dense seconds per generation at --steps, for the budget estimate only
    dense_s_source: str
    out: Path

    def gen(self, seed: int) -> GenerationConfig:
        return GenerationConfig(steps=self.args.steps, guidance=self.args.guidance, seed=seed)


def load_model(kind: str):
    if kind == "tiny":
        from vdit_accel.testing import tiny_model

        return tiny_model()
    from vdit_accel.instrument.model import EmbeddedModel

    return EmbeddedModel.load()






def spaced(items: list, n: int) -> list:
    """``n`` items evenly spaced over ``items`` (first and last included), so a few prompts span the set."""
    if n > len(items):
        raise ConfigError(f"n-prompts={n} is more than the {len(items)} prompts of the set")
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int)) if n > 1 else np.array([0])
    return [items[i] for i in idx]


def scaled_schedule(schedule: tuple[float, ...], mean: float) -> tuple[float, ...]:
    """Raise a schedule's mean budget to ``mean`` by scaling every step's skipped share ``1 - b_i`` by one factor.

    ``b_i' = 1 - c·(1 - b_i)`` with ``c = (1 - mean) / (1 - mean(b))``: dense steps stay dense, the relative shape
    of the savings is kept, the new mean is exact.
    """
    m0 = float(np.mean(schedule))
    if mean < m0 - 1e-12 or mean > 1.0:
        raise ConfigError(f"scaled_schedule raises a mean budget: {mean} is not in [{m0}, 1]")
    c = 0.0 if m0 >= 1.0 else (1.0 - mean) / (1.0 - m0)
    return tuple(float(min(1.0, max(0.0, 1.0 - c * (1.0 - b)))) for b in schedule)


def timestep_level_schedule(num_steps: int, dense_steps: int, mean: float) -> tuple[tuple[float, ...], list[int]]:
    """TIMESTEP-LEVEL ablation: budgets in {0, 1} with ``round(mean·T)`` dense steps, skipped steps evenly spaced.

    The ``S = T - K`` skipped steps (``K = max(dense_steps, round(mean·T))`` computed steps) are
    ``d + floor((j + 0.5)·(T - d) / S)`` for ``j = 0..S-1`` over the non-forced steps ``d..T-1``. A skipped step
    reuses every block's cached output (whole-step reuse of the transformer body; patch embedding, time embedding
    and the output head still run with the current timestep).
    """
    t, d = num_steps, dense_steps
    k = min(t, max(d, math.floor(mean * t + 0.5)))
    s = t - k
    skipped = sorted({d + math.floor((j + 0.5) * (t - d) / s) for j in range(s)}) if s else []
    budgets = tuple(0.0 if i in skipped else 1.0 for i in range(t))
    return budgets, skipped


# ----------------------------------------------------------------------------------------------------------------
# cost model (only for the printed / recorded budget estimate; every reported speedup is measured)
# ----------------------------------------------------------------------------------------------------------------


def block_macs(n: int, k: int, mc, kv_selected: bool = False) -> float:
    """Multiply-accumulates of one Wan block computing ``k`` of ``n`` rows (Q-subset; K/V from all or the ``k``)."""
    d, ffn, text = mc.num_heads * mc.head_dim, mc.ffn_dim, mc.max_text_len
    nkv = k if kv_selected else n
    if k == 0:
        return 0.0
    return float(2 * nkv * d * d + 2 * k * d * d + 2 * k * nkv * d  # self-attention: K,V / Q,O / QK^T and AV
                 + 2 * k * d * d + 2 * text * d * d + 2 * k * text * d  # cross-attention
                 + 2 * k * d * ffn)  # FFN


def generation_macs(mc, geometry, schedule, guidance: float, batch: int = 1, kv_selected: bool = False) -> float:
    p_t, p_h, p_w = mc.patch_size
    n = (geometry[0] // p_t) * (geometry[1] // p_h) * (geometry[2] // p_w)
    branches = 2 if guidance > 1.0 else 1
    per = sum(block_macs(n, budget_to_count(b, n), mc, kv_selected) for b in schedule)
    return per * mc.num_layers * branches * batch


def estimate_seconds(env_like: dict, geometry, schedule, guidance: float, batch: int = 1,
                     kv_selected: bool = False) -> float:
    """Dense seconds scaled by the MAC ratio (compute-proportional; real sparse runs carry extra overheads)."""
    mc, steps = env_like["mc"], env_like["steps"]
    full = (mc.frames, mc.height, mc.width)
    ref = generation_macs(mc, full, [1.0] * steps, env_like["guidance"])
    return env_like["dense_s"] * generation_macs(mc, geometry, schedule, guidance, batch, kv_selected) / ref


def budget(args, mc, schedule_cfg: AstraeaConfig, dense_s: float, n_jobs: int, n_score_jobs: int,
           n_search: int) -> dict[str, dict]:
    """Generations each experiment needs and their estimated seconds (MAC-proportional to ``dense_s``)."""
    steps, g = args.steps, args.guidance
    full = (mc.frames, mc.height, mc.width)
    like = {"mc": mc, "steps": steps, "guidance": g, "dense_s": dense_s}
    sched = list(schedule_cfg.schedule)
    m0 = float(np.mean(sched))
    dense = estimate_seconds(like, full, [1.0] * steps, g)
    astraea = estimate_seconds(like, full, sched, g)
    qk = estimate_seconds(like, full, sched, g, kv_selected=True)
    # the matched SELECT Q&K budget the cost model predicts (the run calibrates it on measured latency)
    lo, hi = m0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if estimate_seconds(like, full, scaled_schedule(tuple(sched), mid), g, kv_selected=True) < astraea:
            lo = mid
        else:
            hi = mid
    qk_matched = estimate_seconds(like, full, scaled_schedule(tuple(sched), lo), g, kv_selected=True)
    ts, _ = timestep_level_schedule(steps, schedule_cfg.dense_steps, m0)
    tsl = estimate_seconds(like, full, ts, g)
    proxy = PROXY_GEOMETRY[args.model]
    d = schedule_cfg.dense_steps
    proxy_evals = 1 + (steps - d) * len(SENSITIVITY_PROBES)
    proxy_s = estimate_seconds(like, proxy, [1.0] * steps, PROXY_GUIDANCE, batch=n_search)
    n_cfg = 1 + sum(len(v) - 1 for v in SCORE_FACTORS.values())
    out = {
        "baselines": {
            "proxy_generations": proxy_evals * n_search,
            "proxy_batches": proxy_evals,
            "full_generations": n_jobs * 4 + 1,
            "estimated_s": proxy_evals * proxy_s + n_jobs * (dense + 3 * astraea),
        },
        "ablations": {
            "full_generations": n_jobs * 7 + args.match_iters,
            "estimated_s": n_jobs * (dense + 3 * astraea + qk + qk_matched + tsl) + args.match_iters * qk_matched,
            "predicted_matched_select_qk_mean_budget": lo,
        },
        "score_options": {
            "full_generations": n_score_jobs * (1 + n_cfg),
            "estimated_s": n_score_jobs * (dense + n_cfg * astraea),
        },
    }
    for v in out.values():
        v["estimated_s"] = round(float(v["estimated_s"]), 1)
        v["assumptions"] = (f"dense generation = {dense_s:.3g} s at {steps} steps; other runs scaled by the "
                            "per-block multiply-accumulate count (Q-subset rows, full or selected K/V, budget 0 = "
                            "no block compute); Astraea's scoring/gather overheads are not in the model, so real "
                            "sparse runs take somewhat longer")
    return out


# ----------------------------------------------------------------------------------------------------------------
# running variants on jobs
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runs:
    """Outputs of one variant over the jobs (one entry per job, in job order)."""

    cfg: AstraeaConfig | None
    videos: list = dataclasses.field(default_factory=list)
    latencies: list = dataclasses.field(default_factory=list)
    mem_delta: list = dataclasses.field(default_factory=list)
    stats: list = dataclasses.field(default_factory=list)


def run_one(env: Env, cfg: AstraeaConfig | None, prompt: str, seed: int) -> tuple[torch.Tensor, float, int, dict]:
    """One generation with ``cfg`` (None = dense): (video, seconds, peak RSS/alloc delta bytes, stats summary)."""
    handle = apply_astraea(env.model.transformer, cfg) if cfg is not None else None
    try:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            video = env.sampler(prompt, env.gen(seed), progress=False)
            dt = time.perf_counter() - t0
        stats = handle.stats.summary() if handle is not None else {}
    finally:
        if handle is not None:
            handle.remove()
    return video, dt, mem.delta_bytes, stats


def record(runs: Runs, job: int, out) -> None:
    video, dt, mem, stats = out
    assert len(runs.videos) == job, "jobs must be recorded in order"
    runs.videos.append(video)
    runs.latencies.append(dt)
    runs.mem_delta.append(mem)
    runs.stats.append(stats)


def warm_up(env: Env) -> None:
    """First-call costs (allocations, lazy imports behind ``torch.compiler.disable``) outside any timing."""
    p = env.prompts[0]
    gen = GenerationConfig(steps=2, guidance=env.args.guidance, seed=0)
    env.sampler(p, gen, progress=False)
    for kv in ("all", "selected"):
        h = apply_astraea(env.model.transformer, AstraeaConfig(budgets=(1.0, 0.5), num_steps=2, kv=kv))
        try:
            env.sampler(p, gen, progress=False)
        finally:
            h.remove()


def run_interleaved(env: Env, variants: dict[str, AstraeaConfig | None], label: str,
                    runs: dict[str, Runs] | None = None, jobs=None, first_job: int = 0) -> dict[str, Runs]:
    """For each job: every variant back to back (dense first; the rest rotated by job index to spread order
    effects). Appends to ``runs``."""
    runs = runs if runs is not None else {}
    for name, cfg in variants.items():
        runs.setdefault(name, Runs(cfg))
    names = [n for n in variants if n != "dense"]
    jobs = env.jobs if jobs is None else jobs
    for j, (prompt, seed) in enumerate(jobs, start=first_job):
        r = j % max(1, len(names))
        order = (["dense"] if "dense" in variants else []) + names[r:] + names[:r]
        for name in order:
            record(runs[name], j, run_one(env, variants[name], prompt, seed))
        print(f"  [{label}] job {j + 1}/{len(env.jobs)} done", flush=True)
    return runs


def summarize(runs: Runs, dense: Runs) -> dict:
    """Fidelity vs the dense video of the same job, latency ratio to dense, memory and Astraea stats."""
    ps = [psnr(r, v) for v, r in zip(runs.videos, dense.videos)]
    ss = [ssim(r, v) for v, r in zip(runs.videos, dense.videos)]
    mse = [float(((v.double() - r.double()) ** 2).mean()) for v, r in zip(runs.videos, dense.videos)]
    finite = [p for p in ps if math.isfinite(p)]
    med, dmed = float(np.median(runs.latencies)), float(np.median(dense.latencies))
    paired = [d / x for d, x in zip(dense.latencies, runs.latencies)]
    kept = [s["kept_ratio"] for s in runs.stats if s]
    cache = [s["cache_mb_peak"] for s in runs.stats if s]
    entry = {
        "psnr_mean": float(np.mean(finite)) if finite else float("inf"),
        "psnr_min": float(np.min(ps)),
        "psnr_per_job": ps,
        "identical_jobs": len(ps) - len(finite),
        "ssim_mean": float(np.mean(ss)),
        "ssim_min": float(np.min(ss)),
        "latent_mse_mean": float(np.mean(mse)),
        "latent_mse_per_job": mse,
        "latency_median_s": med,
        "latencies_s": list(runs.latencies),
        "speedup": dmed / med,
        "speedup_paired_median": float(np.median(paired)),
        "peak_delta_mb": max(runs.mem_delta) / 2**20,
        "peak_delta_vs_dense_mb": (max(runs.mem_delta) - max(dense.mem_delta)) / 2**20,
    }
    if runs.cfg is not None:
        entry["mean_budget"] = runs.cfg.mean_budget
        entry["budgets"] = list(runs.cfg.schedule)
        entry["kept_ratio_measured"] = float(np.mean(kept)) if kept else None
        entry["cache_mb_peak"] = float(max(cache)) if cache else 0.0
        entry["kept_ratio_per_step"] = runs.stats[0].get("kept_ratio_per_step") if runs.stats else None
    return entry


def dense_entry(dense: Runs) -> dict:
    return {"latency_median_s": float(np.median(dense.latencies)), "latencies_s": list(dense.latencies),
            "peak_delta_mb": max(dense.mem_delta) / 2**20}


def write_json(env: Env, name: str, settings: dict, results: dict, budget_entry: dict, reductions: dict,
               notes: list[str], wall_s: float, files: list[str]) -> Path:
    mc = env.model.config
    doc = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "experiment": name,
        "command": command_line(__file__, env.args.argv),
        "argv": list(env.args.argv),
        "cwd": os.getcwd(),
        **machine_info(),
        "torch_threads": torch.get_num_threads(),
        "model": {"kind": env.args.model, "model_id": mc.model_id, "geometry": [mc.frames, mc.height, mc.width],
                  "patch_size": list(mc.patch_size), "layers": mc.num_layers, "heads": mc.num_heads,
                  "head_dim": mc.head_dim},
        "settings": {
            "steps": env.args.steps, "guidance": env.args.guidance, "target": env.args.target,
            "prompt_set": env.args.prompts, "prompts": env.prompts, "seeds": list(range(env.args.seeds)),
            "jobs": [[p, s] for p, s in env.jobs], "search_prompts": env.search_prompts,
            "schedule": env.schedule_info, **settings,
        },
        "reductions": reductions,
        "budget": {**budget_entry, "dense_s_assumed": env.dense_s, "dense_s_source": env.dense_s_source,
                   "actual_s": round(wall_s, 2)},
        "notes": notes,
        "results": results,
        "files": files,
        "wall_s": round(wall_s, 2),
    }
    path = env.out / f"{name}.json"
    path.write_text(json.dumps(json_clean(doc), indent=1, allow_nan=False))
    return path


def short(prompt: str, n: int = 34) -> str:
    return prompt if len(prompt) <= n else prompt[: n - 1] + "…"


def _cap(x: float, cap: float = 60.0) -> float:
    return cap if not math.isfinite(x) else min(x, cap)


# ----------------------------------------------------------------------------------------------------------------
# baselines: searched vs uniform vs greedy
# ----------------------------------------------------------------------------------------------------------------


def exp_baselines(env: Env) -> dict:
    """Searched (preset) vs uniform vs greedy schedule at the same target, evaluated on the held-out jobs.

    Baselines: ``baselines(sampler, search_prompts, target, steps, Fidelity(proxy, 1.0, steps), base=preset config)``:
    the uniform schedule and the greedy allocator fed by the measured single-step sensitivity table (each non-dense
    step alone at budget 0 and 0.5, every other step dense, MSE of the final latents vs dense at the proxy geometry
    without guidance, on the search prompts; interpolated on the grid). The table is recorded and reused as is.

    Evaluation (full geometry, ``--guidance``): per job, dense then the three schedules (same score options as the
    preset). Per schedule: PSNR / SSIM of the video vs the dense video of the same job, final-latent MSE (the
    sampler's output: this model's latent is the RGB video), mean budget (schedule and measured kept ratio),
    speedup = median dense latency / median latency. Margin = searched PSNR mean minus the baseline's (dB), plus
    per-job paired differences.
    """
    args, base = env.args, env.schedule_cfg
    proxy = Fidelity(PROXY_GEOMETRY[args.model], PROXY_GUIDANCE, args.steps)
    t0 = time.perf_counter()
    print(f"  [baselines] sensitivity table on {len(env.search_prompts)} search prompts at proxy {proxy}", flush=True)
    base_no_budgets = dataclasses.replace(base, budgets=None, target=1.0)
    bl = baselines(env.sampler, env.search_prompts, args.target, args.steps, proxy, base=base_no_budgets,
                   progress=args.model == "embedded")
    baselines_s = time.perf_counter() - t0

    def with_budgets(b):
        return dataclasses.replace(base, budgets=tuple(float(x) for x in b), target=None)

    variants = {"dense": None, "searched": base, "uniform": with_budgets(bl["uniform"]),
                "greedy": with_budgets(bl["greedy"])}
    runs = run_interleaved(env, variants, "baselines")
    dense = runs["dense"]
    sched = {n: summarize(runs[n], dense) for n in ("searched", "uniform", "greedy")}
    margins = {}
    for other in ("uniform", "greedy"):
        diff = [a - b for a, b in zip(sched["searched"]["psnr_per_job"], sched[other]["psnr_per_job"])]
        margins[other] = {
            "psnr_margin_db": sched["searched"]["psnr_mean"] - sched[other]["psnr_mean"],
            "ssim_margin": sched["searched"]["ssim_mean"] - sched[other]["ssim_mean"],
            "paired_psnr_diff_mean_db": float(np.mean(diff)),
            "paired_psnr_diff_min_db": float(np.min(diff)),
            "searched_wins_jobs": int(sum(d > 0 for d in diff)),
            "jobs": len(diff),
            "latent_mse_ratio": sched[other]["latent_mse_mean"] / max(sched["searched"]["latent_mse_mean"], 1e-30),
        }
    results = {
        "dense": dense_entry(dense),
        "schedules": sched,
        "margin_searched_over": margins,
        "sensitivity": {"table": bl["sensitivity"], "probe_budgets": list(SENSITIVITY_PROBES),
                        "grid": list(EvolutionConfig(target=args.target, num_steps=args.steps,
                                                     dense_steps=base.dense_steps).grid),
                        "proxy": dataclasses.asdict(proxy), "prompts": env.search_prompts,
                        "seconds": baselines_s},
    }

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = np.arange(args.steps)
    for name, c in (("searched", "C0"), ("uniform", "C1"), ("greedy", "C2")):
        e = sched[name]
        axes[0].step(steps, e["budgets"], where="mid", color=c, label=f"{name} (mean {e['mean_budget']:.3f})")
    axes[0].set_xlabel("denoising step")
    axes[0].set_ylabel("token budget")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_title(f"schedules at target {args.target:g}")
    axes[0].legend(fontsize=8)
    table = np.asarray(bl["sensitivity"])
    im = axes[1].imshow(np.log10(np.maximum(table.T, 1e-12)), aspect="auto", origin="lower", cmap="viridis",
                        extent=(-0.5, args.steps - 0.5, -0.05, 1.05))
    fig.colorbar(im, ax=axes[1], label="log10 MSE vs dense (proxy)")
    axes[1].set_xlabel("step (alone at the budget)")
    axes[1].set_ylabel("budget")
    axes[1].set_title("measured single-step sensitivity (greedy's input)")
    names = ["searched", "uniform", "greedy"]
    x = np.arange(len(names))
    vals = [_cap(sched[n]["psnr_mean"]) for n in names]
    axes[2].bar(x, vals, color=["C0", "C1", "C2"])
    for i, n in enumerate(names):
        axes[2].scatter([i] * len(sched[n]["psnr_per_job"]), [_cap(p) for p in sched[n]["psnr_per_job"]],
                        color="k", s=10, zorder=3)
        axes[2].annotate(f"{sched[n]['speedup']:.2f}x\nSSIM {sched[n]['ssim_mean']:.3f}", (i, vals[i]),
                         ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    axes[2].set_xticks(x, names)
    axes[2].set_ylabel("PSNR vs dense (dB; dots = jobs)")
    axes[2].set_title(f"held-out: {len(env.jobs)} jobs, margin vs uniform "
                      f"{margins['uniform']['psnr_margin_db']:+.2f} dB, vs greedy "
                      f"{margins['greedy']['psnr_margin_db']:+.2f} dB", fontsize=9)
    fig.tight_layout()
    fig.savefig(env.out / "baselines.png", dpi=110)
    plt.close(fig)
    return {
        "settings": {"proxy_fidelity": dataclasses.asdict(proxy), "full_fidelity": {"geometry": None,
                     "guidance": args.guidance, "steps": args.steps}},
        "results": results,
        "reductions": {},
        "notes": [
            ("uniform and greedy come from search.astraea_search.baselines() on the search prompts (not the "
             "evaluation prompts), at the proxy fidelity; the greedy uses its measured sensitivity table"),
            "all three schedules share the preset's score options and dense_steps; only the budgets differ",
            ("speedup = median dense latency / median schedule latency over the same jobs in this run; "
             "speedup_paired_median = median over jobs of the per-job ratio"),
            "latent MSE is on the sampler output (clamped to [-1, 1]); this model's latent is the RGB video",
        ],
        "files": ["baselines.json", "baselines.png"],
    }


# ----------------------------------------------------------------------------------------------------------------
# ablations (§6.4) at matched speed
# ----------------------------------------------------------------------------------------------------------------


def exp_ablations(env: Env) -> dict:
    """§6.4 ablations at the preset schedule, with measured speed next to fidelity.

    Variants (all share the preset's score options unless said):

    * ``astraea``: the preset.
    * ``select_qk_same_budget``: ``kv="selected"`` (K/V from the selected rows only), same schedule.
    * ``select_qk_matched_speed``: ``kv="selected"`` at a higher mean budget m*, the schedule scaled by
      :func:`scaled_schedule`, with m* calibrated on job 0 so that its latency matches Astraea's: linear
      interpolation of latency in mean budget between (m0, SELECT Q&K at the preset) and (1, dense), then up to
      ``--match-iters`` secant refinements until within 5 %; the last calibration run is job 0's data point, the
      other jobs run at the final m*. The calibration trace is recorded.
    * ``timestep_level``: budgets in {0, 1} (:func:`timestep_level_schedule`): round(mean·T) computed steps, the
      others skipped evenly spaced, each skipped step reusing every block's cached output.
    * ``fixed_token``: ``selection="fixed"``: one token set per CFG branch and budget, chosen at its first use and
      reused by every block and later step.
    * ``residual_cache`` (extra, open question 2): ``cache="residual"`` (cached output + input change).

    Per variant: PSNR / SSIM vs dense, measured speedup, peak-memory delta of the generation (PeakMemory: process RSS
    on CPU, the allocator's peak on GPU) and its difference to dense's, and Astraea's exact cache size.
    """
    args, base = env.args, env.schedule_cfg
    m0 = base.mean_budget
    ts_budgets, skipped = timestep_level_schedule(args.steps, base.dense_steps, m0)
    qk = dataclasses.replace(base, kv="selected")
    variants = {
        "dense": None,
        "astraea": base,
        "select_qk_same_budget": qk,
        "timestep_level": dataclasses.replace(base, budgets=ts_budgets, target=None),
        "fixed_token": dataclasses.replace(base, selection="fixed"),
        "residual_cache": dataclasses.replace(base, cache="residual"),
    }
    # job 0: dense, astraea, SELECT Q&K first, then calibrate the matched budget
    runs = {name: Runs(variants[name]) for name in ("dense", "astraea", "select_qk_same_budget")}
    prompt0, seed0 = env.jobs[0]
    for name, r in runs.items():
        record(r, 0, run_one(env, variants[name], prompt0, seed0))
    t_dense, t_target, t_qk0 = (runs[n].latencies[0] for n in ("dense", "astraea", "select_qk_same_budget"))
    points = [(m0, t_qk0), (1.0, t_dense)]
    trace = [{"mean_budget": m0, "latency_s": t_qk0, "note": "SELECT Q&K at the preset schedule"}]
    last = None
    if t_qk0 >= t_target:  # not faster than Astraea at the preset budget: a higher budget cannot match its speed
        trace[0]["note"] += "; not faster than Astraea, so the matched run stays at the preset budget"
        last = (qk, (runs["select_qk_same_budget"].videos[0], t_qk0, runs["select_qk_same_budget"].mem_delta[0],
                     runs["select_qk_same_budget"].stats[0]))
    for it in range(1 + args.match_iters if last is None else 0):
        pts = sorted(points)
        below = [p for p in pts if p[1] <= t_target]
        above = [p for p in pts if p[1] > t_target]
        if not above:
            m_new = 1.0
        else:
            (ma, ta), (mb, tb) = max(below, key=lambda p: p[0]), min(above, key=lambda p: p[0])
            m_new = ma + (mb - ma) * (t_target - ta) / (tb - ta) if tb != ta else ma
        m_new = float(min(1.0, max(m0, m_new)))
        cfg = dataclasses.replace(qk, budgets=scaled_schedule(base.schedule, m_new), target=None)
        last = (cfg, run_one(env, cfg, prompt0, seed0))
        t_new = last[1][1]
        points.append((m_new, t_new))
        trace.append({"mean_budget": m_new, "latency_s": t_new, "ratio_to_astraea": t_new / t_target,
                      "iteration": it})
        if abs(t_new / t_target - 1.0) <= MATCH_TOLERANCE or m_new in (m0, 1.0):
            break
    matched_cfg = last[0]
    runs["select_qk_matched_speed"] = Runs(matched_cfg)
    record(runs["select_qk_matched_speed"], 0, last[1])
    for name in ("timestep_level", "fixed_token", "residual_cache"):
        runs[name] = Runs(variants[name])
        record(runs[name], 0, run_one(env, variants[name], prompt0, seed0))
    print(f"  [ablations] job 1/{len(env.jobs)} done (matched SELECT Q&K mean budget {matched_cfg.mean_budget:.3f})",
          flush=True)
    variants["select_qk_matched_speed"] = matched_cfg
    order = ["dense", "astraea", "select_qk_same_budget", "select_qk_matched_speed", "timestep_level",
             "fixed_token", "residual_cache"]
    run_interleaved(env, {k: variants[k] for k in order}, "ablations", runs=runs, jobs=env.jobs[1:], first_job=1)
    dense = runs["dense"]
    table = {n: summarize(runs[n], dense) for n in order[1:]}
    a = table["astraea"]
    for e in table.values():
        e["psnr_vs_astraea_db"] = e["psnr_mean"] - a["psnr_mean"]
        e["speedup_vs_astraea"] = e["speedup"] / a["speedup"]
    results = {
        "dense": dense_entry(dense),
        "variants": table,
        "matching": {"target_latency_s_job0": t_target, "dense_latency_s_job0": t_dense, "trace": trace,
                     "matched_mean_budget": matched_cfg.mean_budget, "preset_mean_budget": m0,
                     "tolerance": MATCH_TOLERANCE,
                     "achieved_speedup_ratio_to_astraea": table["select_qk_matched_speed"]["speedup_vs_astraea"]},
        "timestep_level": {"skipped_steps": skipped, "computed_steps": args.steps - len(skipped),
                           "mean_budget": float(np.mean(ts_budgets)), "preset_mean_budget": m0},
    }

    labels = {"astraea": "Astraea", "select_qk_same_budget": "SELECT Q&K (same budget)",
              "select_qk_matched_speed": "SELECT Q&K (matched speed)", "timestep_level": "TIMESTEP-LEVEL",
              "fixed_token": "FIXED-TOKEN", "residual_cache": "residual cache"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, n in enumerate(order[1:]):
        e = table[n]
        axes[0].scatter(e["speedup"], _cap(e["psnr_mean"]), s=50, color=f"C{i}", label=labels[n])
        axes[0].annotate(f"m={e['mean_budget']:.2f}", (e["speedup"], _cap(e["psnr_mean"])), fontsize=7,
                         xytext=(4, 3), textcoords="offset points")
    axes[0].axvline(1.0, color="gray", lw=0.8, ls="--")
    axes[0].axvline(a["speedup"], color="C0", lw=0.8, ls=":")
    axes[0].set_xlabel("measured speedup vs dense (same run)")
    axes[0].set_ylabel("PSNR vs dense (dB, capped at 60)")
    axes[0].set_title(f"§6.4 ablations at preset mean budget {m0:.3f}")
    axes[0].legend(fontsize=8)
    names = ["dense"] + order[1:]
    mem = [results["dense"]["peak_delta_mb"]] + [table[n]["peak_delta_mb"] for n in order[1:]]
    cache = [0.0] + [table[n]["cache_mb_peak"] for n in order[1:]]
    x = np.arange(len(names))
    axes[1].bar(x - 0.2, mem, 0.4, label="peak memory over baseline (PeakMemory)")
    axes[1].bar(x + 0.2, cache, 0.4, label="Astraea cache (exact)")
    axes[1].set_xticks(x, ["dense"] + [labels[n] for n in order[1:]], rotation=25, ha="right", fontsize=8)
    axes[1].set_ylabel("MB")
    axes[1].set_title("memory per variant")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(env.out / "ablations.png", dpi=110)
    plt.close(fig)
    return {
        "settings": {"match_iters": args.match_iters, "match_tolerance": MATCH_TOLERANCE,
                     "timestep_level_rule": "round(mean*T) computed steps incl. the forced dense ones; skipped "
                                            "steps d + floor((j + 0.5)(T - d)/S), j < S",
                     "select_qk_scaling": "b_i' = 1 - c (1 - b_i), c = (1 - m*) / (1 - m0)"},
        "results": results,
        "reductions": {},
        "notes": [
            ("matched speed: SELECT Q&K is reported at the preset schedule and at a higher mean budget calibrated "
             "on job 0 to Astraea's measured latency; compare each variant's speedup next to its PSNR"),
            ("TIMESTEP-LEVEL skipped steps reuse every block's cached output (the transformer body); the patch "
             "embedding, time embedding and output head still run with the current timestep"),
            ("peak_delta_mb = PeakMemory delta (peak minus memory at entry) of the worst job; on CPU this is sampled "
             "process RSS and memory the allocator kept from earlier runs is not counted again, so cache_mb_peak "
             "(exact bytes of Astraea's per-block caches, both CFG branches) is the reliable memory figure"),
        ],
        "files": ["ablations.json", "ablations.png"],
    }


# ----------------------------------------------------------------------------------------------------------------
# score options (open question 1)
# ----------------------------------------------------------------------------------------------------------------


def exp_score_options(env: Env, jobs: list[tuple[str, int]]) -> dict:
    """Token-score choices at the preset schedule, one factor at a time from the defaults; PSNR vs dense.

    Factors: ``delta_norm`` in (l1, l2, rel_l2), ``lse_reduction`` in (mean, max, logsumexp), ``normalize`` in
    (mean, max, none), ``w_beta`` in (0, 0.5, 2). Defaults are :class:`AstraeaConfig`'s (l2, mean, mean, 0.5), applied
    to the preset's budgets; the default config runs once and is every factor's default level. Per factor the spread
    (best minus worst PSNR mean) is reported.
    """
    defaults = AstraeaConfig(num_steps=env.args.steps)
    base = dataclasses.replace(env.schedule_cfg, **{f: getattr(defaults, f) for f in SCORE_FACTORS})
    variants: dict[str, AstraeaConfig | None] = {"dense": None, "default": base}
    level_of: dict[tuple[str, str], str] = {}
    for factor, values in SCORE_FACTORS.items():
        for v in values:
            key = (factor, f"{v:g}" if isinstance(v, float) else v)
            if v == getattr(base, factor):
                level_of[key] = "default"
            else:
                name = f"{factor}={key[1]}"
                variants[name] = dataclasses.replace(base, **{factor: v})
                level_of[key] = name
    sub = dataclasses.replace(env, jobs=jobs)
    runs = run_interleaved(sub, variants, "score_options")
    dense = runs["dense"]
    entries = {n: summarize(runs[n], dense) for n in variants if n != "dense"}
    factors = {}
    for factor in SCORE_FACTORS:
        levels = {lvl: {"variant": name, "psnr_mean": entries[name]["psnr_mean"],
                        "psnr_min": entries[name]["psnr_min"], "ssim_mean": entries[name]["ssim_mean"],
                        "latent_mse_mean": entries[name]["latent_mse_mean"],
                        "kept_ratio_measured": entries[name]["kept_ratio_measured"]}
                  for (f, lvl), name in level_of.items() if f == factor}
        ps = [v["psnr_mean"] for v in levels.values()]
        best = max(levels, key=lambda k: levels[k]["psnr_mean"])
        factors[factor] = {"default": f"{getattr(base, factor):g}" if isinstance(getattr(base, factor), float)
                           else getattr(base, factor), "levels": levels, "best": best,
                           "spread_db": float(max(ps) - min(ps))}
    results = {"dense": dense_entry(dense), "default_config": base.to_dict(), "variants": entries,
               "factors": factors}

    fig, axes = plt.subplots(1, len(SCORE_FACTORS), figsize=(4 * len(SCORE_FACTORS), 4), sharey=True)
    for ax, (factor, info) in zip(axes, factors.items()):
        lv = list(info["levels"])
        vals = [_cap(info["levels"][k]["psnr_mean"]) for k in lv]
        mins = [_cap(info["levels"][k]["psnr_min"]) for k in lv]
        colors = ["C0" if k == info["default"] else "C7" for k in lv]
        ax.bar(np.arange(len(lv)), vals, color=colors)
        ax.scatter(np.arange(len(lv)), mins, color="k", marker="_", s=200, zorder=3, label="min over jobs")
        ax.set_xticks(np.arange(len(lv)), lv)
        ax.set_title(f"{factor} (spread {info['spread_db']:.2f} dB)", fontsize=10)
        lo = min(mins)
        ax.set_ylim(max(0.0, lo - 3), max(vals) + 1.5)
    axes[0].set_ylabel("PSNR vs dense (dB; bar = mean, blue = default)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"token-score options at the preset schedule (mean budget {base.mean_budget:.3f}), "
                 f"{len(jobs)} jobs", fontsize=10)
    fig.tight_layout()
    fig.savefig(env.out / "score_options.png", dpi=110)
    plt.close(fig)
    reductions = {}
    if len(jobs) < len(env.jobs):
        reductions["jobs"] = (f"{len(jobs)} of the {len(env.jobs)} evaluation jobs (--score-prompts "
                              f"{env.args.score_prompts}: the first prompts of the evaluation list x all seeds), to "
                              "keep the experiment within ~4 CPU-minutes on the embedded model")
    return {
        "settings": {"factors": {k: list(v) for k, v in SCORE_FACTORS.items()},
                     "defaults": {f: getattr(base, f) for f in SCORE_FACTORS}, "w_alpha": base.w_alpha,
                     "score_jobs": [[p, s] for p, s in jobs]},
        "results": results,
        "reductions": reductions,
        "notes": [
            ("one factor at a time from the defaults; the schedule (budgets, dense_steps), cache, selection and kv "
             "are the preset's"),
            ("this experiment is about fidelity: latencies are recorded per variant but, with few jobs and no "
             "matching, they are indicative only"),
        ],
        "files": ["score_options.json", "score_options.png"],
    }


# ----------------------------------------------------------------------------------------------------------------
# schedule under test, main
# ----------------------------------------------------------------------------------------------------------------


def resolve_schedule(args, sampler: Sampler, search_prompts: list[str]) -> tuple[AstraeaConfig, dict, list[str]]:
    """The searched config for ``--target``: ``--preset`` (a preset name or file); tiny without one: a tiny search."""
    model_id = sampler.model.config.model_id
    if args.preset is None and args.model == "tiny":
        evo = EvolutionConfig(target=args.target, num_steps=args.steps, dense_steps=1, **TINY_EVOLUTION)
        t0 = time.perf_counter()
        cfg, rec = search_astraea(sampler, search_prompts, args.target, steps=args.steps, evolution=evo,
                                  proxy=Fidelity(PROXY_GEOMETRY["tiny"], PROXY_GUIDANCE, args.steps), rerank=1,
                                  base=AstraeaConfig(num_steps=args.steps), progress=False)
        info = {"source": "tiny search (search_astraea on the search prompts)", "evolution": evo.to_dict(),
                "search_seconds": time.perf_counter() - t0, "search_evaluations": rec.get("search_evaluations")}
        return cfg, info, list(search_prompts)
    name = args.preset or f"astraea-{round(args.target * 100)}"
    cfg = load_preset(name, method="astraea", steps=args.steps, model_id=model_id)
    data = read_preset(name)
    rec = data.get("record") or {}
    rec_target = rec.get("target")
    if rec_target is not None and abs(float(rec_target) - args.target) > 1e-9:
        raise ConfigError(f"preset {name!r} was searched for target={rec_target}, not --target {args.target}")
    if cfg.budgets is None:
        raise ConfigError(f"preset {name!r} has no searched budgets (a uniform target config): give a searched one")
    lo, hi = args.target * 0.9 - 1e-9, args.target * 1.1 + 1e-9
    if not lo <= cfg.mean_budget <= hi:
        raise ConfigError(f"preset {name!r} has mean budget {cfg.mean_budget:.4f}, outside target {args.target} "
                          "+-10 %")
    prompts = list(dict.fromkeys(list(search_prompts) + list(rec.get("prompts") or [])))
    info = {"source": f"preset {name}", "preset_model_id": data["model_id"], "preset_geometry": data["geometry"],
            "preset_steps": data["steps"], "preset_search_target": rec_target,
            "preset_search_seconds": rec.get("total_seconds")}
    return cfg, info, prompts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "embedded"), default="embedded")
    p.add_argument("--out", default="docs/results/astraea")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                   help=f"comma-separated subset of {','.join(EXPERIMENTS)}")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale of the evaluation (full fidelity; default: the model's)")
    p.add_argument("--prompts", default="heldout", help="evaluation prompt set name or file (never the search set)")
    p.add_argument("--n-prompts", type=int, default=4, help="prompts taken evenly spaced from the set")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per prompt")
    p.add_argument("--target", type=float, default=0.5, help="target mean budget of the schedule under test")
    p.add_argument("--preset", default=None,
                   help="preset name or file with the searched schedule (default astraea-<100*target>); tiny "
                        "without it: a tiny search")
    p.add_argument("--score-prompts", type=int, default=2,
                   help="score_options uses the first N evaluation prompts (x all seeds) to bound its cost")
    p.add_argument("--match-iters", type=int, default=1,
                   help="secant refinements of SELECT Q&K's matched-speed budget on job 0")
    p.add_argument("--dense-seconds", type=float, default=None,
                   help="dense seconds per generation at --steps for the printed estimate (default: embedded "
                        f"{EMBEDDED_DENSE_S_AT_50:g} s x steps/50; tiny: measured)")
    p.add_argument("--dry-run", action="store_true", help="print the run budget and exit")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    bad = [e for e in args.experiments if e not in EXPERIMENTS]
    if bad or not args.experiments:
        p.error(f"--experiments {bad or args.experiments}: accepted a subset of {','.join(EXPERIMENTS)}")
    for name in ("steps", "n_prompts", "seeds", "score_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.match_iters < 0:
        p.error("--match-iters must be >= 0")
    if not 0.0 < args.target <= 1.0:
        p.error("--target must be in (0, 1]")
    return args


def main(argv=None) -> dict[str, Path]:
    args = parse_args(argv)
    out = Path(args.out)
    model = load_model(args.model)
    sampler = Sampler(model)
    args.guidance = sampler.guidance(GenerationConfig(guidance=args.guidance))  # None: the model's; recorded as used
    search_prompts = list(prompt_sets()["calib"])
    prompts = spaced(resolve_prompts(args.prompts), args.n_prompts)
    for p in prompts:
        model.encode_prompts([p])  # validates every prompt before any compute
    with torch.no_grad():
        schedule_cfg, schedule_info, search_prompts = resolve_schedule(args, sampler, search_prompts)
    overlap = sorted(set(prompts) & set(search_prompts))
    if overlap:
        raise ConfigError(f"evaluation prompts overlap the search prompts {overlap}: use held-out prompts")
    schedule_info.update({"budgets": list(schedule_cfg.schedule), "mean_budget": schedule_cfg.mean_budget,
                          "config": schedule_cfg.to_dict()})
    jobs = [(p, s) for p in prompts for s in range(args.seeds)]
    score_jobs = [(p, s) for p in prompts[: args.score_prompts] for s in range(args.seeds)]
    mc = model.config
    if args.dense_seconds is not None:
        dense_s, dense_src = args.dense_seconds, "--dense-seconds"
    elif args.model == "embedded":
        dense_s = EMBEDDED_DENSE_S_AT_50 * args.steps / 50
        dense_src = f"assumed: {EMBEDDED_DENSE_S_AT_50:g} s per dense 50-step CFG generation, scaled by steps/50"
    else:
        sampler(prompts[0], GenerationConfig(steps=args.steps, guidance=args.guidance), progress=False)
        t0 = time.perf_counter()
        sampler(prompts[0], GenerationConfig(steps=args.steps, guidance=args.guidance), progress=False)
        dense_s, dense_src = time.perf_counter() - t0, "measured (one dense generation of the tiny model)"
    plan = budget(args, mc, schedule_cfg, dense_s, len(jobs), len(score_jobs), len(search_prompts))
    print(f"astraea_paper: model {args.model} ({mc.model_id}), {args.steps} steps, guidance {args.guidance}, "
          f"{len(jobs)} jobs ({len(prompts)} prompts x {args.seeds} seeds), schedule mean "
          f"{schedule_cfg.mean_budget:.3f} ({schedule_info['source']}), {torch.get_num_threads()} threads", flush=True)
    for name in args.experiments:
        b = plan[name]
        gens = ", ".join(f"{k}={v}" for k, v in b.items() if k.endswith(("generations", "batches")))
        print(f"  budget {name}: {gens}; estimated {b['estimated_s']:.3g} s ({b['estimated_s'] / 60:.2g} min)",
              flush=True)
    total = sum(plan[n]["estimated_s"] for n in args.experiments)
    print(f"  budget total: estimated {total:.3g} s ({total / 60:.2g} min) plus model load and warm-up", flush=True)
    if args.dry_run:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    env = Env(args, model, sampler, prompts, jobs, schedule_cfg, schedule_info, search_prompts, dense_s, dense_src,
              out)
    with torch.no_grad():
        warm_up(env)
    written = {}
    for name in args.experiments:
        t0 = time.perf_counter()
        print(f"[{name}] running", flush=True)
        with torch.no_grad():
            res = exp_score_options(env, score_jobs) if name == "score_options" else \
                {"baselines": exp_baselines, "ablations": exp_ablations}[name](env)
        wall = time.perf_counter() - t0
        path = write_json(env, name, res["settings"], res["results"], plan[name], res["reductions"], res["notes"],
                          wall, res["files"])
        written[name] = path
        print(f"[{name}] {wall:.1f} s (estimated {plan[name]['estimated_s']:.3g} s) -> {path}", flush=True)
    return written


if __name__ == "__main__":
    main()
