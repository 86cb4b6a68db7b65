"""CLI glue for ``vdit-accel calibrate`` and ``vdit-accel search`` (kept out of the algorithms)."""

from __future__ import annotations

import json
from pathlib import Path

from vdit_accel.errors import ConfigError
from vdit_accel.search.presets import save_preset

RUNS_DIR = Path("runs")  # default home of everything a command writes (the package is read-only at run time)
DEFAULT_PROXY_GEOMETRY = "8x32x32"  # the joint search's error table / fitness on the embedded model (FxHxW)


def _model_and_sampler(a):
    """The embedded model (``--weights``) and its ``Sampler``, or with ``--model`` a saved diffusers pipeline and a
    :class:`~vdit_accel.pipelines.PipelineSampler` over it (geometry from ``--frames/--height/--width``)."""
    if getattr(a, "model", None) is not None:
        from vdit_accel.pipelines import PipelineSampler, load_pipeline

        sampler = PipelineSampler(load_pipeline(a.model, dtype=a.dtype, device=a.device), frames=a.frames,
                                  height=a.height, width=a.width)
        return sampler.model, sampler
    from vdit_accel.instrument.model import EmbeddedModel
    from vdit_accel.instrument.sampler import Sampler

    model = EmbeddedModel.load(a.weights)
    return model, Sampler(model)


def _check_model_flags(a, what: str, supported: bool = True) -> None:
    """Before any compute: ``--model`` excludes ``--weights``; its dtype/device/geometry flags need it (the embedded
    model's calibration and search use its own geometry); ``what`` (a mode) may not support a pipeline at all."""
    from vdit_accel.pipelines import check_device

    if getattr(a, "model", None) is None:
        given = [f for f, v, d in (("--dtype", getattr(a, "dtype", "float32"), "float32"),
                                   ("--device", getattr(a, "device", "cpu"), "cpu"),
                                   ("--frames", getattr(a, "frames", None), None),
                                   ("--height", getattr(a, "height", None), None),
                                   ("--width", getattr(a, "width", None), None)) if v != d]
        if given:
            raise ConfigError(f"{' and '.join(given)} apply to --model (a diffusers pipeline) only")
        return
    if not supported:
        raise ConfigError(f"{what} with --model is not supported: it runs on the embedded model only (accepted with "
                          "--model: calibrate timeripple, search astraea)")
    if a.weights is not None:
        raise ConfigError("--weights (the embedded model) and --model (a diffusers pipeline) are two models: give one")
    check_device(a.device)


def calibrate_cli(a) -> int:
    from vdit_accel.bench.harness import resolve_prompts
    from vdit_accel.instrument.sampler import GenerationConfig

    prompts = resolve_prompts(a.prompts)[: a.n_prompts]
    gen = GenerationConfig(steps=a.steps)
    if a.method == "magcache":
        from vdit_accel.methods.magcache_ratios import USER_RATIOS_FILE, calibrate_mag_ratios

        _check_model_flags(a, "calibrate magcache", supported=False)
        out = Path(a.out) if a.out else USER_RATIOS_FILE
        _check_out(out, a)  # never inside the package
        _, sampler = _model_and_sampler(a)
        ratios = calibrate_mag_ratios(sampler, prompts[0], gen, out=out, progress=not getattr(a, "quiet", True))
        print(f"wrote {len(ratios)} MagCache ratios to {out}")
        return 0
    if a.method != "timeripple":
        raise ConfigError(f"calibrate method {a.method!r} is unknown: choose one of ['timeripple', 'magcache']")
    _check_model_flags(a, "calibrate timeripple")
    if getattr(a, "target_speedup", None) is not None:
        return _calibrate_speed_cli(a, prompts, gen)
    for flag in ("keys_only", "key_merge", "decision_interval"):
        if getattr(a, flag, None):
            raise ConfigError(f"--{flag.replace('_', '-')} applies to --target-speedup only (the 'tokens' variant): "
                              "add --target-speedup")
    if a.target is None:
        raise ConfigError("calibrate timeripple needs --target (QK savings in (0, 1), e.g. 0.85) or --target-speedup")
    from vdit_accel.search.calibrate import calibrate_timeripple

    out = Path(a.out) if a.out else RUNS_DIR / "presets" / f"timeripple-{round(a.target * 100)}.json"
    _check_out(out, a)  # before any compute
    model, sampler = _model_and_sampler(a)
    cfg, record = calibrate_timeripple(sampler, prompts, a.target, gen)
    save_preset(out, "timeripple", cfg, model_id=model.config.model_id, geometry=list(sampler.geometry(gen)),
                steps=gen.steps, seed=gen.seed, record={"calibration": record})
    print(json.dumps({"preset": str(out), **record}, indent=1))
    return 0


def _calibrate_speed_cli(a, prompts, gen) -> int:
    from vdit_accel.search.calibrate import W2_GEOMETRY, OpGeometry, calibrate_timeripple_speed

    if a.target is not None:
        raise ConfigError("--target (QK savings) and --target-speedup are two modes: give one")
    geometry = OpGeometry(tuple(a.op_grid) if a.op_grid else W2_GEOMETRY.grid, a.op_heads or W2_GEOMETRY.heads,
                          a.op_head_dim or W2_GEOMETRY.head_dim)
    from vdit_accel.methods.timeripple import TimeRippleConfig

    g = geometry
    merge = getattr(a, "key_merge", None) or "root"
    interval = getattr(a, "decision_interval", None) or 1
    name = (f"timeripple-tokens{'-k' if a.keys_only else ''}{'-mean' if merge == 'mean' else ''}"
            f"{f'-d{interval}' if interval > 1 else ''}"
            f"-op{a.target_speedup:g}x-{g.heads}x{g.head_dim}-{g.grid[0]}x{g.grid[1]}x{g.grid[2]}")
    out = Path(a.out) if a.out else RUNS_DIR / "presets" / f"{name}.json"
    _check_out(out, a)  # before any compute
    model, sampler = _model_and_sampler(a)
    base = TimeRippleConfig(variant="tokens", reuse_q=not a.keys_only, key_merge=merge, decision_interval=interval)
    cfg, record = calibrate_timeripple_speed(sampler, prompts, a.target_speedup, gen, geometry=geometry, base=base)
    save_preset(out, "timeripple", cfg, model_id=model.config.model_id, geometry=list(sampler.geometry(gen)),
                steps=gen.steps, seed=gen.seed, record={"name": name, "calibration": record})
    print(json.dumps({"preset": str(out), "name": name, **record}, indent=1))
    return 0


def plot_search(record: dict, budgets: list[float], path: Path, baselines: dict | None = None) -> None:
    """Budget schedule (searched vs baselines) and the fitness curve, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.step(range(len(budgets)), budgets, where="mid", label=f"searched (mean {sum(budgets) / len(budgets):.3f})")
    for name, sched in (baselines or {}).items():
        a.step(range(len(sched)), sched, where="mid", alpha=0.6, label=name)
    a.set_xlabel("denoising step")
    a.set_ylabel("token budget")
    a.set_ylim(-0.05, 1.05)
    a.legend(fontsize=8)
    hist = record["evolution"]["history"]
    b.plot([h["generation"] for h in hist], [h["best"] for h in hist], label="best")
    b.plot([h["generation"] for h in hist], [h["mean"] for h in hist], label="mean of parents")
    b.set_yscale("log")
    b.set_xlabel("generation")
    b.set_ylabel("fitness (latent MSE vs dense)")
    b.legend(fontsize=8)
    fig.suptitle(f"Astraea search, target {record['target']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _joint_search_cli(a) -> int:
    from vdit_accel.bench.harness import resolve_prompts
    from vdit_accel.instrument.sampler import GenerationConfig
    from vdit_accel.search.astraea_search import Fidelity
    from vdit_accel.search.joint import ALLOCATORS, TABLE_ALLOCATORS, preset_name, run_joint_search
    from vdit_accel.search.latency import LatencyModel

    if a.latency_model is None:
        raise ConfigError("--target-speedup needs --latency-model PATH (a vdit-accel/latency-model JSON from the step "
                          "benchmark at the target geometry and hardware)")
    if a.allocator == "refine":
        return _refine_cli(a)
    pipeline = getattr(a, "model", None) is not None
    allocators = list(ALLOCATORS) if a.allocator == "all" else [a.allocator]
    skipped = []
    if pipeline and a.allocator == "all":  # the table re-runs single steps of the embedded sampler's loop
        skipped = [x for x in allocators if x in TABLE_ALLOCATORS]
        allocators = [x for x in allocators if x not in TABLE_ALLOCATORS]
    latency = LatencyModel.load(a.latency_model)
    prompts = resolve_prompts(a.prompts)
    name = preset_name(a.target_speedup)
    geometry = _parse_geometry(a.proxy_geometry or ("model" if pipeline else DEFAULT_PROXY_GEOMETRY))
    out = Path(a.out) if a.out else RUNS_DIR / "presets" / f"{name}.json"
    _check_out(out, a)  # before any compute
    model, sampler = _model_and_sampler(a)
    workdir = Path(a.checkpoint) if a.checkpoint else RUNS_DIR / "search-astraea-joint"  # table shared by targets
    from vdit_accel.methods.astraea import AstraeaConfig

    base = AstraeaConfig(num_steps=a.steps, dense_steps=a.dense_steps, forecast_axis=a.forecast_axis)
    cfg, record = run_joint_search(sampler, latency, a.target_speedup, prompts, steps=a.steps, allocators=allocators,
                                   base=base, proxy=Fidelity(geometry, 1.0, a.steps), max_segment=a.max_segment,
                                   population=a.population, children=a.children, generations=a.generations,
                                   seed=a.seed, workdir=workdir, progress=not a.quiet)
    save_preset(out, "astraea", cfg, model_id=model.config.model_id,
                geometry=list(sampler.geometry(GenerationConfig())), steps=a.steps, seed=a.seed,
                record={"search": record, "latency_geometry": latency.geometry, "latency_hardware": latency.hardware,
                        "allocator": record["allocator"]})
    summary = {"preset": str(out), "allocator": record["allocator"], "margin_db": record["margin_db"],
               "skipped_allocators": {x: "the segment-error table runs on the embedded model only" for x in skipped},
               "candidates": {k: {"psnr_mean": v["psnr_mean"], "predicted_speedup": v["predicted_speedup"],
                                  "transformer_calls": v["calibration_cost"]["transformer_calls"]}
                              for k, v in record["candidates"].items()}}
    print(json.dumps(summary, indent=1))
    return 0


def _refine_cli(a) -> int:
    """``search astraea --target-speedup S --allocator refine``: final-video local search (search/refine.py), then
    the final choice between the refined schedule, the best seed and TaylorSeer's cadences on calibration + selection
    prompts (the bench's prompts never seen)."""
    import numpy as np

    from vdit_accel.bench.harness import resolve_prompts
    from vdit_accel.instrument.sampler import GenerationConfig
    from vdit_accel.methods.astraea import AstraeaConfig
    from vdit_accel.search.joint import SELECTION_PROMPTS, config_to_schedule, preset_name, schedule_to_config
    from vdit_accel.search.latency import LatencyModel
    from vdit_accel.search.presets import load_preset
    from vdit_accel.search.refine import FinalVideoObjective, cadence_seeds, refine_schedule, schedule_key

    latency = LatencyModel.load(a.latency_model)
    prompts = resolve_prompts(a.prompts)
    name = preset_name(a.target_speedup)
    out = Path(a.out) if a.out else RUNS_DIR / "presets" / f"{name}.json"
    _check_out(out, a)  # before any compute
    base = AstraeaConfig(num_steps=a.steps, dense_steps=a.dense_steps, kv_reuse=latency.kv_reuse,
                         forecast_axis=a.forecast_axis)
    seeds = cadence_seeds(latency, a.steps, a.target_speedup)
    for spec in a.seed_preset or []:
        cfg = load_preset(spec, steps=a.steps)
        seeds[f"preset:{spec}"] = config_to_schedule(cfg)
    model, sampler = _model_and_sampler(a)
    gen = GenerationConfig(steps=a.steps)
    workdir = Path(a.checkpoint) if a.checkpoint else RUNS_DIR / "search-refine"  # shared by every target
    objective = FinalVideoObjective(sampler, prompts, gen, base, min_weight=a.min_weight, workdir=workdir)
    say = None if a.quiet else (lambda msg: print(msg, flush=True))
    sched, record = refine_schedule(objective, latency, a.target_speedup, seeds, dense_steps=a.dense_steps,
                                    max_evals=a.max_evals, seed=a.seed, progress=say)
    record["evaluations_this_run"] = objective.evaluations
    record["evaluations_total"] = len(objective.evals)
    record["seconds_this_run"] = round(objective.seconds, 1)
    record["calibration_prompts"] = prompts
    record["min_weight"] = a.min_weight
    record["calibration_psnr"] = objective.psnr(sched)
    # the final choice, on prompts the search never saw: the refined schedule, the best seed and TaylorSeer's own
    # cadences among the seeds, each scored on calibration + selection prompts together (8 prompts: 4 are too few
    # to separate schedules whose per-prompt PSNR spreads by 5-10 dB); the bench's prompts stay held out
    sel = FinalVideoObjective(sampler, list(SELECTION_PROMPTS), gen, base, min_weight=a.min_weight,
                              workdir=workdir / "selection")
    best_seed = max(record["seeds"], key=record["seeds"].get)
    finalists = {"refined": sched, f"seed:{best_seed}": seeds[best_seed]}
    finalists |= {f"seed:{k}": seeds[k] for k in record["seeds"] if k.startswith("taylorseer-")}
    record["selection"] = {}
    for label, cand in finalists.items():
        ps_sel, ps_cal = sel.psnr(cand), objective.psnr(cand)
        both = ps_cal + ps_sel
        record["selection"][label] = {"key": schedule_key(cand), "psnr": ps_sel, "psnr_mean": float(np.mean(ps_sel)),
                                     "psnr_min": float(np.min(ps_sel)), "score_8_prompts": objective.score(both)}
    chosen = max(record["selection"], key=lambda k: record["selection"][k]["score_8_prompts"])
    record["chosen"] = chosen
    sched = finalists[chosen]
    record["predicted_speedup"] = round(latency.speedup(sched), 4)
    record["selection_prompts"] = list(SELECTION_PROMPTS)
    record["schedule"] = schedule_key(sched)
    record["key_refined"] = record.pop("key")
    from vdit_accel.search.presets import save_preset

    save_preset(out, "astraea", schedule_to_config(sched, base), model_id=model.config.model_id,
                geometry=list(sampler.geometry(gen)), steps=a.steps, seed=a.seed,
                record={"search": record, "latency_geometry": latency.geometry, "latency_hardware": latency.hardware,
                        "allocator": "refine"})
    print(json.dumps({"preset": str(out), "schedule": record["schedule"], "chosen": chosen,
                      "predicted_speedup": record["predicted_speedup"], "selection": record["selection"]}, indent=1))
    return 0


def _parse_geometry(spec: str | None):
    if spec is None or spec == "model":
        return None
    try:
        f, h, w = (int(x) for x in spec.lower().split("x"))
    except ValueError as e:
        raise ConfigError(f"--proxy-geometry={spec!r} is not accepted: expected FxHxW (8x32x32) or 'model'") from e
    return f, h, w


def _check_out(out: Path, a=None) -> None:
    """Before any compute: never write into the installed package (read-only at run time), and never replace an
    existing file unless ``--overwrite`` was given (a killed run resumes from ``--checkpoint``, not ``--out``)."""
    from vdit_accel.errors import OutputPathError

    pkg = Path(__file__).resolve().parent.parent
    if pkg in out.resolve().parents:
        raise ConfigError(f"--out={str(out)!r} is inside the installed package ({pkg}): write presets under ./runs/ "
                          "or another folder you name")
    if out.is_dir():
        raise OutputPathError(f"--out={str(out)!r} is a directory: name a file")
    if out.exists() and not getattr(a, "overwrite", False):
        raise OutputPathError(f"--out={str(out)!r} already exists: pass --overwrite to replace it")


def search_cli(a) -> int:
    from vdit_accel.bench.harness import resolve_prompts
    from vdit_accel.instrument.sampler import GenerationConfig
    from vdit_accel.search.astraea_search import search_astraea
    from vdit_accel.search.evolution import EvolutionConfig

    if a.method != "astraea":
        raise ConfigError(f"search method {a.method!r} is unknown: choose one of ['astraea']")
    if (a.target is None) == (a.target_speedup is None):
        raise ConfigError("search astraea needs exactly one of --target (mean token budget, e.g. 0.5) or "
                          "--target-speedup (with --latency-model, e.g. 3)")
    _check_model_flags(a, "search astraea")
    if a.target_speedup is not None:
        return _joint_search_cli(a)
    if getattr(a, "dense_steps", 1) != 1:
        raise ConfigError(f"--dense-steps={a.dense_steps} applies to --target-speedup (the joint search) only")
    prompts = resolve_prompts(a.prompts)
    steps = a.steps
    kw = {} if a.generations is None else {"generations": a.generations}
    evo = EvolutionConfig(target=a.target, num_steps=steps, seed=a.seed, population=a.population,
                          children=a.children, **kw)  # validates before any compute
    name = f"astraea-{round(a.target * 100)}"
    out = Path(a.out) if a.out else RUNS_DIR / "presets" / f"{name}.json"
    _check_out(out, a)
    model, sampler = _model_and_sampler(a)
    workdir = Path(a.checkpoint) if a.checkpoint else RUNS_DIR / f"search-{name}"
    proxy = {} if getattr(a, "model", None) is None else {"proxy": None}  # a pipeline: its own geometry, no re-rank
    cfg, record = search_astraea(sampler, prompts, a.target, steps=steps, evolution=evo, workdir=workdir,
                                 progress=not a.quiet, **proxy)
    save_preset(out, "astraea", cfg, model_id=model.config.model_id,
                geometry=list(sampler.geometry(GenerationConfig())), steps=steps, seed=a.seed,
                record={"search": record})
    plot = Path(a.plot) if a.plot else RUNS_DIR / f"search-{name}" / f"{name}-search.png"
    plot_search(record, list(cfg.budgets), plot)
    summary = {"preset": str(out), "plot": str(plot), "budgets": cfg.budgets,
               "search_seconds": record["search_seconds"], "total_seconds": record["total_seconds"],
               "rerank": record.get("rerank")}
    print(json.dumps(summary, indent=1))
    return 0
