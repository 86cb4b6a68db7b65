"""The side-by-side benchmark: every method, one process, the same prompts and seeds.

For each operating point the harness applies the method through the registry, generates every
(prompt, seed) job, times it, measures peak memory, compares the video with the dense video of the
same job (PSNR, SSIM), scores prompt adherence, collects the method's own stats, and removes the
method. Dense runs first (its videos are the references) and again last, and its latency is the
median over both passes, so that drift of a noisy machine shows in ``dense_drift``. Speedups are
ratios of medians measured in this one run.

Example (a real run: see ``vdit-accel bench --help``):
    >>> BenchConfig(methods="dense,fbc", prompts="quick", seeds=1, steps=4).seeds
    1
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import vdit_accel.methods  # noqa: F401  (registers the built-in methods)
from vdit_accel.bench.memory import PeakMemory
from vdit_accel.bench.metrics import psnr, ssim
from vdit_accel.errors import ConfigError, check_range
from vdit_accel.instrument.dataset import heldout_prompts
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.instrument.score import score
from vdit_accel.instrument.video import to_frames
from vdit_accel.registry import BenchEnv, apply, operating_points

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "vdit-accel/bench-results"

CALIBRATION_PROMPTS = (
    "a yellow square moves right on a gray background",
    "a cyan circle shrinks on a black textured background",
    "a purple triangle moves up and a white circle moves left on a brown gradient background",
    "a green cross stays still on a blue background",
)


def prompt_sets() -> dict[str, list[str]]:
    """Named prompt sets: held-out prompts for evaluation, training-distribution ones for calibration."""
    held = heldout_prompts()
    return {
        "quick": held[:2],
        "bench": held[::5][:4],
        "heldout": held,
        "calib": list(CALIBRATION_PROMPTS),
    }


def resolve_prompts(spec: str) -> list[str]:
    """A prompt-set name, or a path to a text file with one prompt per line."""
    sets = prompt_sets()
    if spec in sets:
        return sets[spec]
    path = Path(spec)
    if path.is_file():
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if prompts:
            return prompts
    raise ConfigError(f"prompts={spec!r} is neither a prompt set {sorted(sets)} nor a non-empty prompt file")


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark settings (see ``vdit-accel bench --help``)."""

    methods: str = "dense,pab,fbc,taylorseer,fastercache,magcache"
    prompts: str = "bench"
    seeds: int = 2
    steps: int = 50
    guidance: float | None = None  # None: the model's (``EmbeddedConfig.guidance``)
    quick: bool = False

    def __post_init__(self) -> None:
        check_range("seeds", self.seeds, lo=1)
        check_range("steps", self.steps, lo=1)
        if self.guidance is not None:
            check_range("guidance", self.guidance, lo=0.0)

    def effective(self) -> BenchConfig:
        """``--quick``: 2 prompts, 1 seed, 8 steps (a smoke test)."""
        if not self.quick:
            return self
        return dataclasses.replace(self, prompts="quick", seeds=1, steps=min(self.steps, 8))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    import diffusers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": {"platform": platform.platform(), "cpu": cpu, "cores": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "numpy": np.__version__},
        "git_commit": _git_commit(),
    }


def stats_summary(handle) -> dict:
    """A handle's stats as a JSON-able dict (its ``summary()``, the dict itself, or empty)."""
    stats = getattr(handle, "stats", None)
    if stats is None:
        return {}
    if hasattr(stats, "summary"):
        return stats.summary()
    return dict(stats) if isinstance(stats, dict) else {}


def _run_point(config: Any, sampler: Sampler, jobs, gen_cfg: GenerationConfig,
               bar) -> tuple[list[torch.Tensor], list[float], dict, PeakMemory]:
    handle = apply(sampler.model.transformer, config)
    videos, latencies = [], []
    try:
        with PeakMemory() as mem:
            for prompt, seed in jobs:
                t0 = time.perf_counter()
                videos.append(sampler(prompt, gen_cfg.replace(seed=seed), progress=False))
                latencies.append(time.perf_counter() - t0)
                bar.update(1)
        stats = stats_summary(handle)
    finally:
        handle.remove()
    return videos, latencies, stats, mem


def run_bench(model: EmbeddedModel, cfg: BenchConfig, out_dir: str | Path | None = None,
              progress: bool = True, command: str | None = None) -> dict:
    """Run the benchmark; write ``results.json``, ``results.md``, ``pareto.png`` and ``compare.gif``.

    Returns:
        The results dictionary (what ``results.json`` holds).
    """
    cfg = cfg.effective()
    sampler = Sampler(model)
    cfg = dataclasses.replace(cfg, guidance=sampler.guidance(GenerationConfig(guidance=cfg.guidance)))  # as used
    points = operating_points(cfg.methods)  # validates every name before any compute
    prompts = resolve_prompts(cfg.prompts)
    for p in prompts:
        model.encode_prompts([p])  # validates every prompt before any compute
    points = [p for p in points if p.label != "dense"]
    dense = operating_points("dense")[0]
    gen_cfg = GenerationConfig(steps=cfg.steps, guidance=cfg.guidance)
    jobs = [(p, s) for p in prompts for s in range(cfg.seeds)]
    model_id = model.config.model_id
    env = BenchEnv(sampler, gen_cfg.steps, model_id)
    # presets, calibrations, step counts: every setting is built (and so checked) before any compute
    configs = [point.make_config(env) for point in points]
    bar = tqdm(total=len(jobs) * (len(points) + 2) + 1, disable=not progress, desc="bench")
    sampler(prompts[0], gen_cfg.replace(steps=2), progress=False)  # warm-up: first-call allocations
    bar.update(1)
    ref_videos, dense_lat, _, dense_mem = _run_point(dense.make_config(env), sampler, jobs, gen_cfg, bar)
    rows, all_videos = [], {"dense": ref_videos}
    for point, config in zip(points, configs, strict=True):
        bar.set_postfix(method=point.label)
        videos, lat, stats, mem = _run_point(config, sampler, jobs, gen_cfg, bar)
        all_videos[point.label] = videos
        rows.append((point, videos, lat, stats, mem))
    _, dense_lat2, _, dense_mem2 = _run_point(dense.make_config(env), sampler, jobs, gen_cfg, bar)
    bar.close()
    dense_median = float(np.median(dense_lat + dense_lat2))

    def entry(point, videos, lat, stats, mem) -> dict:
        ps = [psnr(v, r) for v, r in zip(videos, ref_videos)]
        ss = [ssim(v, r) for v, r in zip(videos, ref_videos)]
        adh = [score(to_frames(v), p).adherence for v, (p, _) in zip(videos, jobs)]
        med = float(np.median(lat))
        finite = [x for x in ps if np.isfinite(x)]
        return {
            "label": point.label,
            "method": point.method,
            "settings": point.settings,
            "latency_median_s": round(med, 4),
            "latencies_s": [round(x, 4) for x in lat],
            "speedup": round(dense_median / med, 4),
            "psnr_mean": round(float(np.mean(finite)), 3) if finite else float("inf"),
            "psnr_min": round(float(np.min(ps)), 3),
            "ssim_mean": round(float(np.mean(ss)), 4),
            "ssim_min": round(float(np.min(ss)), 4),
            "adherence": round(float(np.mean(adh)), 4),
            "peak_rss_mb": round(mem.peak_bytes / 2**20, 1),
            "peak_delta_mb": round(mem.delta_bytes / 2**20, 1),
            "stats": stats,
        }

    dense_entry = entry(dense, ref_videos, dense_lat + dense_lat2, {}, dense_mem)
    dense_entry["peak_delta_mb"] = round(max(dense_mem.delta_bytes, dense_mem2.delta_bytes) / 2**20, 1)
    results = {
        "format": RESULTS_FORMAT,
        "version": 1,
        "command": command or " ".join(sys.argv),
        **machine_info(),
        "settings": {**dataclasses.asdict(cfg), "prompt_list": prompts, "model_id": model_id,
                     "geometry": list(sampler.geometry(gen_cfg)), "threads": torch.get_num_threads()},
        "dense_drift": round(float(np.median(dense_lat2) / np.median(dense_lat)), 4),
        "methods": [dense_entry] + [entry(*r) for r in rows],
    }
    if out_dir is not None:
        from vdit_accel.bench.report import write_report

        write_report(results, all_videos, Path(out_dir))
    return results
