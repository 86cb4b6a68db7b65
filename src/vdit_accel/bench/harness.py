"""The side-by-side benchmark: every method, one process, the same prompts and seeds, interleaved.

Every operating point is built (and so checked) before any compute. After one warm-up generation the harness
goes through the (prompt, seed) jobs; for each job it runs every point in turn, dense among them (the order
rotates by one per job, :func:`~vdit_accel.bench.timing.round_robin_order`), applying the method through the
registry just before its generation and removing it just after, so slow drift of a noisy machine hits every
method alike. The order actually run is recorded (``run_log``). After each job's round the videos are compared
with that job's dense video (PSNR, worst-patch PSNR, temporal PSNR, SSIM) and scored for prompt adherence.

A point's speedup is the median over jobs of the paired ratio ``dense_latency(job) / point_latency(job)``, with
its quartiles and extremes; ``dense_drift`` is the dense median latency of the run's second half over its
first, flagged (``drift_flagged``) beyond ``DRIFT_TOLERANCE``. Peak memory is measured around each
generation; a point reports the max over its jobs.

Example (a real run: see ``vdit-accel bench --help``):
    >>> BenchConfig(methods="dense,fbc", prompts="quick", seeds=1, steps=4).seeds
    1
    >>> set(prompt_sets()["bench"]).isdisjoint(prompt_sets()["calib"])
    True
"""

from __future__ import annotations

import dataclasses
import json
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
from vdit_accel.bench.metrics import WORST_PATCH_SIDE, check_metric, psnr, ssim, temporal_psnr, worst_patch_psnr
from vdit_accel.bench.timing import DRIFT_TOLERANCE, drift_flagged, latency_drift, paired_speedups, round_robin_order
from vdit_accel.errors import ConfigError, check_range
from vdit_accel.instrument.dataset import heldout_prompts
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.instrument.score import score
from vdit_accel.instrument.video import to_frames
from vdit_accel.methods.peers import peer_grid_record
from vdit_accel.registry import BenchEnv, apply, operating_points

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "vdit-accel/bench-results"

# calibration / search prompts (training distribution): never in a bench set (a test checks)
CALIBRATION_PROMPTS = (
    "a yellow square moves right on a gray background",
    "a cyan circle shrinks on a black textured background",
    "a purple triangle moves up and a white circle moves left on a brown gradient background",
    "a green cross stays still on a blue background",
)

# the published bench set: 8 held-out prompts covering every colour, shape, motion and background kind of the
# held-out list, committed as text so that a change of that list cannot silently change the bench
BENCH_PROMPTS = (
    "a red square stays still on a gray background",
    "a orange triangle moves down on a brown background",
    "a yellow cross moves left on a blue gradient background",
    "a green square moves right on a brown gradient background",
    "a cyan cross grows on a blue textured background",
    "a blue square shrinks on a green textured background",
    "a purple triangle moves up on a blue background",
    "a white circle moves down on a green background",
)


def prompt_sets() -> dict[str, list[str]]:
    """Named prompt sets.

    - ``bench``: :data:`BENCH_PROMPTS`, 8 held-out prompts (the published bench);
    - ``quick``: the first 2 of them (``--quick``);
    - ``heldout``: one prompt per held-out combination (:func:`heldout_prompts`, 20);
    - ``calib``: :data:`CALIBRATION_PROMPTS`, for calibration and search only (disjoint from the bench sets).

    Example:
        >>> len(prompt_sets()["bench"]), prompt_sets()["quick"] == prompt_sets()["bench"][:2]
        (8, True)
    """
    return {
        "quick": list(BENCH_PROMPTS[:2]),
        "bench": list(BENCH_PROMPTS),
        "heldout": heldout_prompts(),
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

    methods: str = "dense,timeripple,astraea,pab,fbc,taylorseer,fastercache,magcache"
    prompts: str = "bench"
    seeds: int = 2
    steps: int = 50
    guidance: float | None = None  # None: the model's (``EmbeddedConfig.guidance``)
    quick: bool = False
    step_costs: str | None = None  # a bench-step JSON: W2 replay of every recorded decision (``speedup_w2``)
    latency_model: str | None = None  # a latency-model JSON: W2 price of Astraea schedules (``speedup_w2``)

    def __post_init__(self) -> None:
        check_range("seeds", self.seeds, lo=1)
        check_range("steps", self.steps, lo=1)
        if self.guidance is not None:
            check_range("guidance", self.guidance, lo=0.0)

    def effective(self) -> BenchConfig:
        """``--quick``: 2 prompts, 1 seed, 8 steps (a smoke test).

        Presets made for another step count are resampled over normalised time (``load_preset(name, steps=8)``).
        """
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


def _merge_stats(per_job: list[dict]) -> dict:
    """One point's stats over its jobs: the mean of each numeric stat, other values from the first job."""
    if not per_job:
        return {}
    out = dict(per_job[0])
    for key in per_job[0]:
        values = [s.get(key) for s in per_job]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = float(np.mean(values))
    return out


def _aggregate(name: str, values: list[float], digits: int) -> tuple[float, float]:
    """(mean over the finite values, or inf if every value is inf; min) of one metric over a point's jobs."""
    values = [check_metric(name, v) for v in values]
    finite = [v for v in values if np.isfinite(v)]
    mean = round(float(np.mean(finite)), digits) if finite else float("inf")
    return mean, round(float(np.min(values)), digits)


def _generate(sampler: Sampler, config: Any, prompt: str, gen_cfg: GenerationConfig,
              device: torch.device, record: bool = False) -> tuple[torch.Tensor, float, dict, PeakMemory, list]:
    """Apply ``config``, generate one video (timed, memory measured), read the method's stats, remove it.

    With ``record`` a :class:`~vdit_accel.bench.replay.DecisionRecorder` sees what executed (for every point
    alike, so its small hook cost is shared); its decisions are returned (else an empty list).
    """
    from vdit_accel.bench.replay import DecisionRecorder

    handle = apply(sampler.model.transformer, config)
    recorder = DecisionRecorder(sampler.model.transformer).attach() if record else None
    try:
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            video = sampler(prompt, gen_cfg, progress=False)
            latency = time.perf_counter() - t0
        stats = stats_summary(handle)
    finally:
        if recorder is not None:
            recorder.detach()
        handle.remove()
    return video, latency, stats, mem, [] if recorder is None else recorder.decisions


def _w2_pricing(cfg: BenchConfig):
    """Load the W2 cost sources named by ``cfg`` (before any compute): (component costs, latency model)."""
    from vdit_accel.bench.replay import ComponentCosts
    from vdit_accel.search.latency import LatencyModel

    costs = None
    if cfg.step_costs is not None:
        try:
            costs = ComponentCosts.from_results(json.loads(Path(cfg.step_costs).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"step_costs={cfg.step_costs!r} is not a readable bench-step JSON: {e!r}") from e
    latency = None if cfg.latency_model is None else LatencyModel.load(cfg.latency_model)
    return costs, latency


def _w2_speedup(method: str, config: Any, decisions: list, costs, latency) -> tuple[float | None, str]:
    """One job's W2-width speedup and how it was obtained (module docstring of :mod:`vdit_accel.bench.replay`).

    Astraea schedules are priced by the latency model (each step's measured cost at W2); every other method's
    recorded decisions are replayed from the measured component costs; TimeRipple's attention kernels are not
    modelled by either, so it gets none.
    """
    from vdit_accel.bench.replay import predict_astraea_speedup, replay_speedup

    if method == "dense":
        return 1.0, "dense"
    if method == "astraea":
        if latency is None:
            return None, "no latency model"
        return predict_astraea_speedup(config, latency), "latency model"
    if method == "timeripple" or costs is None:
        return None, "attention kernels not replayed" if method == "timeripple" else "no step costs"
    return replay_speedup(decisions, costs)["speedup"], "decision replay"


def run_bench(model: EmbeddedModel, cfg: BenchConfig, out_dir: str | Path | None = None,
              progress: bool = True, command: str | None = None) -> dict:
    """Run the interleaved benchmark; write ``results.json``, ``results.md``, ``pareto.png`` and ``compare.gif``.

    Args:
        model (`EmbeddedModel`): the model to accelerate.
        cfg (`BenchConfig`): methods, prompts, seeds, steps, guidance, quick.
        out_dir (`str | Path | None`): where the report goes; ``None`` writes nothing.
        progress (`bool`): show a progress bar.
        command (`str | None`): the command recorded in the results (default: ``sys.argv``).

    Returns:
        The results dictionary (what ``results.json`` holds): one row per point under ``methods`` (dense first),
        ``run_log`` (every generation in the order run: job, label, start and latency in seconds),
        ``dense_drift``/``drift_flagged``, ``settings`` (with ``peer_grids``).
    """
    cfg = cfg.effective()
    w2_costs, w2_latency = _w2_pricing(cfg)
    record = w2_costs is not None
    sampler = Sampler(model)
    cfg = dataclasses.replace(cfg, guidance=sampler.guidance(GenerationConfig(guidance=cfg.guidance)))  # as used
    points = operating_points(cfg.methods)  # validates every name before any compute
    prompts = resolve_prompts(cfg.prompts)
    for p in prompts:
        model.encode_prompts([p])  # validates every prompt before any compute
    points = [operating_points("dense")[0]] + [p for p in points if p.label != "dense"]
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"methods={cfg.methods!r} names a point twice: {labels}")
    gen_cfg = GenerationConfig(steps=cfg.steps, guidance=cfg.guidance)
    jobs = [(p, s) for p in prompts for s in range(cfg.seeds)]
    model_id = model.config.model_id
    env = BenchEnv(sampler, gen_cfg.steps, model_id)
    # presets, calibrations, step counts: every setting is built (and so checked) before any compute
    configs = {point.label: point.make_config(env) for point in points}
    by_label = {p.label: p for p in points}
    device = next(model.transformer.parameters()).device
    order = round_robin_order(labels, len(jobs))
    bar = tqdm(total=len(jobs) * len(points) + 1, disable=not progress, desc="bench")
    sampler(prompts[0], gen_cfg.replace(steps=2), progress=False)  # warm-up: first-call allocations
    bar.update(1)
    per = {lab: {"videos": [], "lat": [], "stats": [], "peak": [], "delta": [], "psnr": [], "ssim": [],
                 "worst": [], "temporal": [], "adh": [], "w2": [], "w2_how": ""} for lab in labels}
    run_log, t_start = [], time.perf_counter()
    for j, ((prompt, seed), job_order) in enumerate(zip(jobs, order, strict=True)):
        for label in job_order:
            bar.set_postfix(method=label)
            started = time.perf_counter() - t_start
            video, lat, stats, mem, decisions = _generate(sampler, configs[label], prompt,
                                                          gen_cfg.replace(seed=seed), device, record)
            rec = per[label]
            w2, rec["w2_how"] = _w2_speedup(by_label[label].method, configs[label], decisions, w2_costs, w2_latency)
            rec["w2"].append(w2)
            rec["videos"].append(video)
            rec["lat"].append(lat)
            rec["stats"].append(stats)
            rec["peak"].append(mem.peak_bytes)
            rec["delta"].append(mem.delta_bytes)
            run_log.append({"job": j, "label": label, "start_s": round(started, 4), "latency_s": round(lat, 4)})
            bar.update(1)
        ref = per["dense"]["videos"][j]
        for label in labels:  # fail fast: a NaN video stops the run at the job that made it
            rec, video = per[label], per[label]["videos"][j]
            rec["psnr"].append(check_metric(f"psnr of {label} on job {j}", psnr(video, ref)))
            rec["ssim"].append(check_metric(f"ssim of {label} on job {j}", ssim(video, ref)))
            rec["worst"].append(check_metric(f"worst-patch psnr of {label} on job {j}", worst_patch_psnr(video, ref)))
            rec["temporal"].append(check_metric(f"temporal psnr of {label} on job {j}", temporal_psnr(video, ref)))
            rec["adh"].append(score(to_frames(video), prompt).adherence)
    bar.close()
    dense_lat = per["dense"]["lat"]
    drift = latency_drift(dense_lat)

    def entry(label: str) -> dict:
        rec, point = per[label], by_label[label]
        sp = paired_speedups(dense_lat, rec["lat"])
        psnr_mean, psnr_min = _aggregate("psnr", rec["psnr"], 3)
        worst_mean, worst_min = _aggregate("psnr_worst_patch", rec["worst"], 3)
        temporal_mean, temporal_min = _aggregate("temporal_psnr", rec["temporal"], 3)
        ssim_mean, ssim_min = _aggregate("ssim", rec["ssim"], 4)
        return {
            "label": label,
            "method": point.method,
            "settings": point.settings,
            "latency_median_s": round(float(np.median(rec["lat"])), 4),
            "latencies_s": [round(x, 4) for x in rec["lat"]],
            "speedup": round(sp["speedup"], 4),
            "speedup_q25": round(sp["speedup_q25"], 4),
            "speedup_q75": round(sp["speedup_q75"], 4),
            "speedup_min": round(sp["speedup_min"], 4),
            "speedup_max": round(sp["speedup_max"], 4),
            "speedup_ratios": [round(x, 4) for x in sp["speedup_ratios"]],
            "psnr_mean": psnr_mean,
            "psnr_min": psnr_min,
            "psnr_worst_patch_mean": worst_mean,
            "psnr_worst_patch_min": worst_min,
            "temporal_psnr_mean": temporal_mean,
            "temporal_psnr_min": temporal_min,
            "ssim_mean": ssim_mean,
            "ssim_min": ssim_min,
            "adherence": round(float(np.mean(rec["adh"])), 4),
            "peak_rss_mb": round(max(rec["peak"]) / 2**20, 1),
            "peak_delta_mb": round(max(rec["delta"]) / 2**20, 1),
            "stats": _merge_stats(rec["stats"]),
            **({"speedup_w2": round(float(np.median(rec["w2"])), 4), "speedup_w2_source": rec["w2_how"]}
               if rec["w2"] and all(x is not None for x in rec["w2"]) else {"speedup_w2_source": rec["w2_how"]}),
        }

    results = {
        "format": RESULTS_FORMAT,
        "version": 2,
        "command": command or " ".join(sys.argv),
        **machine_info(),
        "settings": {**dataclasses.asdict(cfg), "prompt_list": prompts, "model_id": model_id,
                     "geometry": list(sampler.geometry(gen_cfg)), "threads": torch.get_num_threads(),
                     "memory_kind": "cuda" if device.type == "cuda" else "rss", "worst_patch_side": WORST_PATCH_SIDE,
                     "drift_tolerance": DRIFT_TOLERANCE, "peer_grids": peer_grid_record(),
                     "w2": None if w2_costs is None and w2_latency is None else {
                         "step_costs": dataclasses.asdict(w2_costs) if w2_costs else None,
                         "latency_model": w2_latency.to_dict() if w2_latency else None}},
        "jobs": [[p, s] for p, s in jobs],
        "run_log": run_log,
        "dense_drift": None if drift is None else round(drift, 4),
        "drift_flagged": drift_flagged(drift),
        "methods": [entry(label) for label in labels],
    }
    if out_dir is not None:
        from vdit_accel.bench.report import write_report

        write_report(results, {label: per[label]["videos"] for label in labels}, Path(out_dir))
    return results
