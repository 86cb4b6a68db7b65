"""The ``vdit-accel`` command line: generate, score, inspect, train, bench, calibrate, search.

Flag defaults come from the config dataclasses, so the CLI and the library cannot disagree. Bad input
exits with status 2 and one line naming the bad value and the accepted range.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vdit_accel.errors import VditAccelError

DEFAULT_OUT = "clip.mp4"


def _gen_defaults():
    from vdit_accel.instrument.sampler import GenerationConfig

    return GenerationConfig()


def _load_model(weights: str | None):
    from vdit_accel.instrument.model import EmbeddedModel

    return EmbeddedModel.load(weights)


def _method_config(name: str | None, preset: str | None, steps: int, model_id: str | None = None):
    """The config of ``--method`` (optionally from ``--preset``), or None for dense."""
    if name in (None, "dense"):
        if preset:
            raise VditAccelError("--preset needs --method timeripple or astraea")
        return None
    from vdit_accel.search.presets import method_config_from_cli

    return method_config_from_cli(name, preset, steps, model_id)


def cmd_generate(a) -> int:
    if a.nproc != 1:  # context parallelism: the same command on N ranks (vdit_accel.parallel.generate)
        from vdit_accel.parallel.generate import launch_generate

        return launch_generate(a)
    from vdit_accel.bench.harness import stats_summary
    from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    from vdit_accel.instrument.video import to_frames, write_video
    from vdit_accel.registry import apply

    cfg = GenerationConfig(steps=a.steps, guidance=a.guidance, seed=a.seed, flow_shift=a.flow_shift)
    model = _load_model(a.weights)
    model.encode_prompts([a.prompt])  # validate before any compute
    method_cfg = _method_config(a.method, a.preset, a.steps, model.config.model_id)
    handle = apply(model.transformer, method_cfg) if method_cfg is not None else None
    try:
        video = Sampler(model)(a.prompt, cfg, progress=not a.quiet)
    finally:
        stats = stats_summary(handle) if handle is not None else None
        if handle is not None:
            handle.remove()
    frames = to_frames(video)
    out = Path(a.out)
    write_video(frames, out.with_suffix(".mp4"))
    write_video(frames, out.with_suffix(".gif"))
    print(f"wrote {out.with_suffix('.mp4')} and {out.with_suffix('.gif')}")
    if stats:
        print(json.dumps(stats, indent=1))
    if a.save_tensor:
        from safetensors.torch import save_file

        save_file({"video": video.contiguous()}, a.save_tensor)
    return 0


def cmd_score(a) -> int:
    from vdit_accel.instrument.score import ground_truth_accuracy, score_file

    if a.ground_truth:
        sizes = {} if a.object_size is None else {"size_range": tuple(a.object_size)}
        acc = ground_truth_accuracy(n_clips=a.ground_truth, through_mp4=a.mp4, layout=a.layout, **sizes)
        print(json.dumps({"command": "vdit-accel " + " ".join(sys.argv[1:]), **acc}, indent=1))
        return 0
    if not a.clip or not a.prompt:
        raise VditAccelError("score needs CLIP and --prompt (or --ground-truth N)")
    res = score_file(a.clip, a.prompt)
    print(json.dumps({"prompt": a.prompt, "adherence": res.adherence, "all_correct": res.all_correct,
                      "attributes": res.attributes}, indent=1))
    return 0


def cmd_inspect(a) -> int:
    from vdit_accel.bench.harness import resolve_prompts
    from vdit_accel.instrument.inspect import format_report, inspect_model
    from vdit_accel.instrument.sampler import GenerationConfig, Sampler

    model = _load_model(a.weights)
    rep = inspect_model(Sampler(model), resolve_prompts(a.prompts), GenerationConfig(steps=a.steps, seed=0))
    print(format_report(rep))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), **rep}, indent=1))
    return 0


def cmd_train(a) -> int:
    import dataclasses

    from vdit_accel.errors import ConfigError
    from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel
    from vdit_accel.instrument.train import CHAINS, recipe, train, train_chain

    if a.recipe in CHAINS:
        given = [f for f, v in (("--init-from", a.init_from), ("--model-id", a.model_id), ("--seed", a.seed),
                                ("--max-steps", a.max_steps)) if v is not None]
        if given:
            raise ConfigError(f"--recipe {a.recipe} is a chained recipe with its own seeds and model configs: "
                              f"{', '.join(given)} not accepted with it (stop with Ctrl-C and rerun to resume)")
        train_chain(a.out, CHAINS[a.recipe], progress=not a.quiet)
        print(f"each phase's run in {a.out}/<k>-<phase>; the final release in {a.out}/release")
        return 0
    cfg = recipe(a.recipe, a.seed)
    if a.recipe == "finetune" and a.init_from is None:
        raise ConfigError("--recipe finetune needs --init-from: the saved model folder to start from")
    model_cfg = EmbeddedConfig()
    if a.init_from is not None:
        model_cfg = EmbeddedModel.load(a.init_from).config
    if a.model_id is not None:
        model_cfg = dataclasses.replace(model_cfg, model_id=a.model_id)
    train(a.out, cfg, model_cfg, max_steps=a.max_steps, progress=not a.quiet, init_from=a.init_from)
    print(f"training state in {a.out}/checkpoint; release (when finished) in {a.out}/release")
    return 0


def cmd_bench(a) -> int:
    from vdit_accel.bench.harness import BenchConfig, run_bench
    from vdit_accel.bench.report import markdown_table

    cfg = BenchConfig(methods=a.methods, prompts=a.prompts, seeds=a.seeds, steps=a.steps, guidance=a.guidance,
                      quick=a.quick, step_costs=a.step_costs, latency_model=a.latency_model)
    model = _load_model(a.weights)
    results = run_bench(model, cfg, a.out, progress=not a.quiet, command="vdit-accel " + " ".join(sys.argv[1:]))
    print(markdown_table(results))
    if results["drift_flagged"]:
        print(f"drift flagged: dense latency second half / first half = {results['dense_drift']}", file=sys.stderr)
    print(f"wrote {a.out}/results.json, results.md, pareto.png, compare.gif")
    return 0


def _bench_step_command(a) -> str:
    """The bench-step command with every option spelled out (reproducible whatever the defaults become)."""
    parts = ["vdit-accel", "bench-step"]
    for key, value in vars(a).items():
        if key in ("fn", "cmd", "verbose") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def cmd_bench_step(a) -> int:
    from vdit_accel.bench.step import StepBenchConfig, latency_model_from, latency_settings, run_step_bench

    if a.out is None:
        raise VditAccelError("bench-step needs --out DIR: results are written there and nowhere else")
    cfg = StepBenchConfig(layers=a.layers, target_layers=a.target_layers, latent=tuple(a.latent), text_len=a.text_len,
                          dtype=a.dtype, device=a.device, repeats=a.repeats, warmup=a.warmup, budgets=tuple(a.budgets),
                          kv_reuse=a.kv_reuse, orders=tuple(a.orders), seed=a.seed, full=a.full, tiny=a.tiny)
    settings = latency_settings(a.latency_kv_reuse) if a.latency_model else None
    results = run_step_bench(cfg, a.out, settings=settings, command=_bench_step_command(a), progress=not a.quiet)
    from vdit_accel.bench.step import markdown

    print(markdown(results))
    print(f"wrote {a.out}/bench-step.json and bench-step.md")
    if a.latency_model:
        path = latency_model_from(results, a.latency_kv_reuse).save(a.latency_model)
        print(f"wrote latency model {path}")
    return 0


def cmd_calibrate(a) -> int:
    from vdit_accel.search.cli import calibrate_cli

    return calibrate_cli(a)


def cmd_search(a) -> int:
    from vdit_accel.search.cli import search_cli

    return search_cli(a)


def build_parser() -> argparse.ArgumentParser:
    g = _gen_defaults()
    p = argparse.ArgumentParser(prog="vdit-accel", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("generate", help="generate a clip with the embedded model (MP4 + GIF)")
    s.add_argument("prompt")
    s.add_argument("--steps", type=int, default=g.steps)
    s.add_argument("--seed", type=int, default=g.seed)
    s.add_argument("--guidance", type=float, default=g.guidance, help="CFG scale (default: the model's)")
    s.add_argument("--flow-shift", type=float, default=None, help="sampler timestep shift (default: the model's)")
    s.add_argument("--out", default=DEFAULT_OUT, help="output path; .mp4 and .gif are written")
    s.add_argument("--method", default=None, help="acceleration method: timeripple or astraea (default dense)")
    s.add_argument("--preset", default=None, help="preset name or JSON file for --method")
    s.add_argument("--weights", default=None, help="model folder (default: the embedded model)")
    s.add_argument("--save-tensor", default=None, help="also save the raw video tensor (safetensors)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--nproc", type=int, default=1, help="context-parallel ranks: > 1 relaunches through torchrun "
                   "(docs/parallel.md)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("score", help="check whether a clip shows its prompt")
    s.add_argument("clip", nargs="?")
    s.add_argument("--prompt")
    s.add_argument("--ground-truth", type=int, default=0, help="instead: accuracy on N ground-truth clips")
    s.add_argument("--mp4", action="store_true", help="with --ground-truth: through an MP4 round trip")
    s.add_argument("--object-size", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="with --ground-truth: the clips' object diameter range (default: embedded-wan-v1's data)")
    s.add_argument("--layout", default="uniform", help="with --ground-truth: where objects start, one of "
                   "uniform (default; v1's data), anchored (v2's data), anchored-scene")
    s.set_defaults(fn=cmd_score)

    s = sub.add_parser("inspect", help="instrument report: Q/K adjacency and self-attention time share")
    s.add_argument("--prompts", default="quick")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--weights", default=None)
    s.add_argument("--out", default=None, help="write the report as JSON here")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("train", help="train the embedded model (resumes from OUT/checkpoint)")
    s.add_argument("--out", default="runs/train")
    s.add_argument("--recipe", default="v2",
                   help="v2 (default: the shipped embedded-wan-v2 from scratch, one resumable run, 104 min on 2 "
                        "cores), v2-lineage (the five fine-tunes that made the session-4 model), scratch (random "
                        "init; made embedded-wan-v1, 51 min) or finetune (needs --init-from)")
    s.add_argument("--init-from", default=None, help="saved model folder to start from (fine-tuning)")
    s.add_argument("--model-id", default=None, help="model id recorded in the released config")
    s.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    s.add_argument("--max-steps", type=int, default=None, help="stop early (resumable)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_train)

    from vdit_accel.bench.harness import BenchConfig

    b = BenchConfig()
    s = sub.add_parser("bench", help="side-by-side benchmark of methods (JSON, Markdown, plots, GIF)")
    s.add_argument("--methods", default=b.methods, help="comma-separated method names (each selects its whole "
                   "grid of operating points) or point labels, e.g. taylorseer-i5-o2, magcache-0.24-s6, fbc-0.2")
    s.add_argument("--prompts", default=b.prompts, help="prompt set (quick, bench, heldout, calib) or file")
    s.add_argument("--seeds", type=int, default=b.seeds)
    s.add_argument("--steps", type=int, default=b.steps)
    s.add_argument("--guidance", type=float, default=b.guidance, help="CFG scale (default: the model's)")
    s.add_argument("--out", default="results")
    s.add_argument("--quick", action="store_true", help="smoke test: 2 prompts, 1 seed, 8 steps (presets are "
                   "resampled over normalised time)")
    s.add_argument("--step-costs", default=b.step_costs, metavar="JSON", help="a bench-step JSON: replay every "
                   "point's recorded decisions at W2 width (speedup_w2; default: none)")
    s.add_argument("--latency-model", default=b.latency_model, metavar="JSON", help="a latency-model JSON: price "
                   "Astraea schedules at W2 width (speedup_w2; default: none)")
    s.add_argument("--weights", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_bench)

    from vdit_accel.bench.step import KV_CHOICES, StepBenchConfig

    sb = StepBenchConfig()
    s = sub.add_parser("bench-step", help="real-width (Wan2.1-1.3B) steady-state step latency per setting, "
                       "speedup, FLOP ceiling and efficiency (JSON + Markdown)")
    s.add_argument("--out", default=None, help="results folder (required; nothing is written elsewhere)")
    s.add_argument("--layers", type=int, default=sb.layers, help=f"blocks timed (default {sb.layers})")
    s.add_argument("--target-layers", type=int, default=sb.target_layers,
                   help=f"layers the step cost is composed for (default {sb.target_layers})")
    s.add_argument("--latent", type=int, nargs=3, default=list(sb.latent), metavar=("F", "H", "W"),
                   help=f"latent frames, height, width (default {' '.join(map(str, sb.latent))})")
    s.add_argument("--text-len", type=int, default=sb.text_len, help=f"text tokens (default {sb.text_len})")
    s.add_argument("--dtype", default=sb.dtype, help=f"float32, bfloat16 or float16 (default {sb.dtype})")
    s.add_argument("--device", default=sb.device, help=f"auto, cpu or cuda (default {sb.device})")
    s.add_argument("--repeats", type=int, default=sb.repeats,
                   help=f"timed steps per setting, round-robin (default {sb.repeats})")
    s.add_argument("--warmup", type=int, default=sb.warmup,
                   help=f"untimed steps at each setting before the timed one (default {sb.warmup})")
    s.add_argument("--budgets", type=float, nargs="+", default=list(sb.budgets),
                   help=f"Astraea uniform budgets (default {' '.join(map(str, sb.budgets))})")
    s.add_argument("--kv-reuse", default=sb.kv_reuse, choices=KV_CHOICES,
                   help=f"Astraea settings without/with cached K/V rows (default {sb.kv_reuse})")
    s.add_argument("--orders", type=int, nargs="+", default=list(sb.orders),
                   help=f"forecast orders of the budget-0 steps (default {' '.join(map(str, sb.orders))})")
    s.add_argument("--seed", type=int, default=sb.seed, help=f"weights and inputs (default {sb.seed})")
    s.add_argument("--full", action="store_true", help="480p x 81 frames (latent 21x60x104), 30 layers, bfloat16, "
                   "CUDA when present (default off)")
    s.add_argument("--tiny", action="store_true", help="tiny width for smoke tests (default off)")
    s.add_argument("--latency-model", default=None, metavar="PATH",
                   help="instead of the settings above, measure dense, budgets 0..0.9 (order 0) and orders 1, 2 at "
                   "budgets 0 and 0.5, and write a latency model (vdit-accel/latency-model JSON) here (default: none)")
    s.add_argument("--latency-kv-reuse", action="store_true",
                   help="with --latency-model: the Astraea steps reuse cached K/V rows (default off)")
    s.add_argument("--quiet", action="store_true", help="no per-step progress on stderr (default off)")
    s.set_defaults(fn=cmd_bench_step)

    s = sub.add_parser("calibrate", help="calibrate a method's thresholds into a preset")
    s.add_argument("method", help="timeripple or magcache")
    s.add_argument("--target", type=float, default=None, help="target QK savings (timeripple), e.g. 0.85")
    s.add_argument("--target-speedup", type=float, default=None,
                   help="target attention-op speedup incl. decisions (timeripple 'tokens' variant), e.g. 1.5")
    s.add_argument("--op-grid", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="token grid of the speed target (default: W2, 4 32 32)")
    s.add_argument("--op-heads", type=int, default=None, help="heads of the speed target (default: W2, 12)")
    s.add_argument("--op-head-dim", type=int, default=None, help="head dim of the speed target (default: W2, 128)")
    s.add_argument("--keys-only", action="store_true", help="with --target-speedup: merge keys only, queries "
                   "untouched (reuse_q=False; better fidelity at the same speed on the embedded model; default off)")
    s.add_argument("--prompts", default="calib")
    s.add_argument("--n-prompts", type=int, default=None, help="use only the first N prompts of the set")
    s.add_argument("--steps", type=int, default=g.steps)
    s.add_argument("--out", default=None, help="preset file to write")
    s.add_argument("--weights", default=None)
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("search", help="search a method's schedule (astraea) into a preset")
    s.add_argument("method", help="astraea")
    s.add_argument("--target", type=float, default=None, help="mean token budget, e.g. 0.5 (budget-only search)")
    s.add_argument("--target-speedup", type=float, default=None,
                   help="joint budget+forecast search at this predicted speedup, e.g. 3 (needs --latency-model)")
    s.add_argument("--latency-model", default=None, help="vdit-accel/latency-model JSON (step benchmark)")
    from vdit_accel.search.joint import ALLOCATORS, DEFAULT_MAX_SEGMENT

    s.add_argument("--allocator", default="all", choices=[*ALLOCATORS, "all"],
                   help="joint search: allocator(s); 'all' runs every one and keeps the best on selection prompts")
    s.add_argument("--max-segment", type=int, default=DEFAULT_MAX_SEGMENT,
                   help="joint search: longest run between fully computed steps (error table, dp, greedy)")
    s.add_argument("--dense-steps", type=int, default=1, help="joint search: first steps always computed in full "
                   "(the teacher-forced error table cannot see how an early reuse propagates; default 1)")
    s.add_argument("--proxy-geometry", default="8x32x32", help="FxHxW of the error table / fitness, or 'model'")
    s.add_argument("--steps", type=int, default=g.steps)
    s.add_argument("--prompts", default="calib")
    s.add_argument("--out", default=None, help="preset file to write (default runs/presets/NAME.json)")
    s.add_argument("--checkpoint", default=None, help="checkpoint folder (default runs/search-NAME)")
    s.add_argument("--weights", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    from vdit_accel.search.evolution import EvolutionConfig

    e = EvolutionConfig(target=0.5, num_steps=50)
    s.add_argument("--plot", default=None, help="schedule/fitness plot (default runs/search-NAME/NAME-search.png)")
    s.add_argument("--population", type=int, default=e.population)
    s.add_argument("--children", type=int, default=e.children)
    s.add_argument("--generations", type=int, default=None,
                   help=f"evolution generations (default {e.generations}; joint search: match the table's cost)")
    s.set_defaults(fn=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return a.fn(a)
    except VditAccelError as e:
        print(f"vdit-accel {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
