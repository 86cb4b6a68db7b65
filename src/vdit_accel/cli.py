"""The ``vdit-accel`` command line: generate, score, inspect, train, bench, calibrate, search.

Flag defaults come from the config dataclasses, so the CLI and the library cannot disagree. Bad input
exits with status 2 and one line naming the bad value and the accepted range, before any compute: every number
goes through :mod:`vdit_accel.validate` as it is parsed, and output paths are checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from vdit_accel import validate
from vdit_accel.errors import ConfigError, VditAccelError

DEFAULT_OUT = "clip.mp4"
MAX_COUNT = 10**6  # stated upper bound of counts without a tighter one (clips, prompts, generations, ...)
MAX_TRAIN_STEPS = 10**7
MAX_SIZE = 4096  # token grid sides, heads, head dims, text lengths of the step benchmark / speed targets


class UsageError(VditAccelError, ValueError):
    """A command line that argparse cannot parse: unknown flag, bad choice, or a value refused by validation."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` (``main`` prints it and returns 2)."""

    def error(self, message: str):
        raise UsageError(f"{message}\n{self.format_usage().rstrip()}")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every flag's help unless the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "default" in help_.lower():
            return help_
        return super()._get_help_string(action)


def _arg(parse: Callable, check: Callable, name: str) -> Callable:
    """An argparse ``type=``: parse the text, then validate it (errors name the flag's value and the range)."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            kind = "an int" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"{name}={text!r} is not accepted: expected {kind}") from None
        try:
            return check(value, name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def int_arg(name: str, lo: int | None = None, hi: int | None = None) -> Callable:
    return _arg(int, lambda v, n: validate.check_int(n, v, lo=lo, hi=hi), name)


def float_arg(name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable:
    return _arg(float, lambda v, n: validate.check_float(n, v, lo=lo, hi=hi, lo_open=lo_open), name)


STEPS = _arg(int, validate.check_steps, "steps")
SEED = _arg(int, validate.check_seed, "seed")
GUIDANCE = _arg(float, validate.check_guidance, "guidance")
FLOW_SHIFT = _arg(float, validate.check_flow_shift, "flow_shift")


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


def _method_specs(names: str | None, presets: str | None) -> list[tuple[str, str | None]]:
    """``--method a,b`` with ``--preset p,q`` as ``[(method, preset or None), ...]`` (one preset per method, in
    order; none: each method's default preset); ``[]`` for dense. Checked before any model is loaded."""
    methods = [m.strip() for m in (names or "dense").split(",")]
    if len(methods) > 1 and "dense" in methods:
        raise ConfigError(f"--method={names!r} is not accepted: 'dense' cannot be composed with other methods")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--method={names!r} names a method twice: each method at most once")
    if methods == ["dense"]:
        _method_config("dense", presets, 1)  # refuses a --preset without a method
        return []
    given = [None] * len(methods) if presets is None else [p.strip() for p in presets.split(",")]
    if len(given) != len(methods):
        raise ConfigError(f"--preset={presets!r} gives {len(given)} presets for {len(methods)} methods {methods}: "
                          "accepted one per method, in the same order (or none: each method's default)")
    return list(zip(methods, given))


def _method_configs(specs: list[tuple[str, str | None]], steps: int, model_id: str | None) -> list:
    """The configs of :func:`_method_specs` for ``steps`` (a preset made for another model warns with both ids)."""
    return [_method_config(m, p, steps, model_id) for m, p in specs]


class _MethodChoices(list):
    """``--method`` choices that also accept a comma-separated composition of them (``astraea,timeripple``)."""

    def __contains__(self, value) -> bool:
        parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [value]
        return bool(parts) and all(list.__contains__(self, p) for p in parts)


def generate_outputs(a) -> list[Path]:
    """The files ``generate`` writes, validated before any compute: ``--out`` (.mp4 or .gif); with .mp4 a GIF
    preview beside it unless ``--no-gif``; ``--save-tensor`` (.safetensors). None may exist without
    ``--overwrite``; an .mp4 and a .gif are never both touched unless the user named the .mp4."""
    from vdit_accel.instrument.video import VIDEO_EXTENSIONS

    out = validate.check_output_path(a.out, VIDEO_EXTENSIONS, overwrite=a.overwrite, name="--out")
    paths = [out]
    if out.suffix.lower() == ".mp4" and not a.no_gif:
        paths.append(validate.check_output_path(out.with_suffix(".gif"), VIDEO_EXTENSIONS, overwrite=a.overwrite,
                                                name="--out's GIF preview (--no-gif skips it)"))
    if a.save_tensor is not None:
        paths.append(validate.check_output_path(a.save_tensor, (".safetensors",), overwrite=a.overwrite,
                                                name="--save-tensor"))
    if len({p.resolve() for p in paths}) != len(paths):
        raise ConfigError(f"output paths {[str(p) for p in paths]} are not distinct")
    return paths


def cmd_generate(a) -> int:
    if a.nproc != 1:  # context parallelism: the same command on N ranks (vdit_accel.parallel.generate)
        if a.model is not None:
            raise ConfigError(f"--nproc={a.nproc} runs the embedded model only; with --model, enable diffusers' "
                              "context parallelism on the pipeline's transformer and call vdit_accel.apply from "
                              "Python (docs/parallel.md)")
        from vdit_accel.parallel.generate import launch_generate

        return launch_generate(a)
    from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    from vdit_accel.instrument.video import to_frames, write_video

    if a.model is not None:
        return _generate_pipeline(a)
    if a.dtype != "float32" or a.device != "cpu":
        raise ConfigError(f"--dtype={a.dtype} --device={a.device} apply to --model (a diffusers pipeline) only: the "
                          "embedded model runs in float32 on the CPU")
    cfg = GenerationConfig(steps=a.steps, guidance=a.guidance, seed=a.seed, flow_shift=a.flow_shift,
                           frames=a.frames, height=a.height, width=a.width, check_finite=not a.no_check_finite)
    paths = generate_outputs(a)  # before any compute
    specs = _method_specs(a.method, a.preset)
    model = _load_model(a.weights)
    model.encode_prompts([a.prompt])  # validate before any compute
    sampler = Sampler(model)
    sampler.geometry(cfg)
    configs = _method_configs(specs, a.steps, model.config.model_id)
    video = _run_with(model.transformer, configs, lambda: sampler(a.prompt, cfg, progress=not a.quiet), a)
    _write_outputs(paths, video, to_frames(video), write_video)
    return 0


def _run_with(target, configs: list, run: Callable, a):
    """``run()`` with ``configs`` applied to ``target`` (every denoiser), removed afterwards; prints the stats."""
    import vdit_accel

    handle = vdit_accel.apply(target, configs, steps=a.steps) if configs else None
    try:
        out = run()
    finally:
        stats = handle.stats if handle is not None else None
        if handle is not None:
            handle.remove()
    if stats:
        print(json.dumps(stats, indent=1))
    return out


def _write_outputs(paths: list[Path], video, frames, write_video) -> None:
    for path in paths:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            with validate.atomic_write(path) as tmp:
                save_file({"video": video.contiguous()}, str(tmp))
        else:
            write_video(frames, path)
    print(f"wrote {' and '.join(map(str, paths))}")


def _generate_pipeline(a) -> int:
    """``generate --model DIR``: a saved diffusers pipeline (``DiffusionPipeline.from_pretrained``, local files
    only) with any method, preset or composition, in ``--dtype`` on ``--device``."""
    import numpy as np
    import torch

    from vdit_accel.instrument.video import write_video
    from vdit_accel.pipelines import check_device, load_pipeline, pipeline_model_id

    if a.weights is not None:
        raise ConfigError("--weights (the embedded model) and --model (a diffusers pipeline) are two models: give one")
    if a.flow_shift is not None:
        raise ConfigError("--flow-shift applies to the embedded model only: a pipeline's shift is its scheduler's")
    if not a.prompt.strip():
        raise ConfigError("prompt='' is not accepted: a non-empty prompt")
    check_device(a.device)
    paths = generate_outputs(a)  # before any compute
    specs = _method_specs(a.method, a.preset)
    pipe = load_pipeline(a.model, dtype=a.dtype, device=a.device)
    configs = _method_configs(specs, a.steps, pipeline_model_id(pipe))
    pipe.set_progress_bar_config(disable=a.quiet)
    kw = {k: v for k, v in (("height", a.height), ("width", a.width), ("num_frames", a.frames),
                            ("guidance_scale", a.guidance)) if v is not None}

    def run():
        return pipe(prompt=a.prompt, num_inference_steps=a.steps, generator=torch.Generator().manual_seed(a.seed),
                    output_type="np", **kw).frames[0]

    frames = np.asarray(_run_with(pipe, configs, run, a), dtype=np.float32)  # [F, H, W, 3] in [0, 1]
    if not a.no_check_finite:
        validate.check_finite("the generated video", torch.from_numpy(frames))
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).mul(2).sub(1)  # [3, F, H, W] in [-1, 1]
    uint8 = np.clip(frames * 255 + 0.5, 0, 255).astype(np.uint8)
    _write_outputs(paths, video, uint8, write_video)
    return 0


def cmd_score(a) -> int:
    from vdit_accel.instrument.score import ground_truth_accuracy, score_file

    if a.ground_truth:
        sizes = {} if a.object_size is None else {"size_range": tuple(a.object_size)}
        acc = ground_truth_accuracy(n_clips=a.ground_truth, through_mp4=a.mp4, layout=a.layout,
                                    progress=not a.quiet, **sizes)
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

    cfg = GenerationConfig(steps=a.steps, seed=0)
    out = None if a.out is None else validate.check_output_path(a.out, (".json",), overwrite=a.overwrite)
    prompts = resolve_prompts(a.prompts)
    model = _load_model(a.weights)
    rep = inspect_model(Sampler(model), prompts, cfg)
    print(format_report(rep))
    if out is not None:
        with validate.atomic_write(out) as tmp:
            tmp.write_text(json.dumps({"command": " ".join(sys.argv), **rep}, indent=1))
    return 0


def cmd_train(a) -> int:
    import dataclasses

    from vdit_accel.errors import ConfigError
    from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel
    from vdit_accel.instrument.train import CHAINS, recipe, train, train_chain

    _check_out_dir(a.out)
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


def _check_out_dir(folder, results: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """An output folder: non-empty, not a file, creatable in a writable folder (created later by the command), and,
    unless ``overwrite``, holding none of the ``results`` the command writes (an earlier run's)."""
    validate.check_output_dir(folder, name=f"--out={str(folder or '')!r}", create=False, results=results,
                              overwrite=overwrite)


def cmd_bench(a) -> int:
    from vdit_accel.bench.harness import BenchConfig, run_bench
    from vdit_accel.bench.report import REPORT_FILES, markdown_table

    _check_out_dir(a.out, REPORT_FILES, a.overwrite)  # bench has no resume: any of its files is an earlier result
    cfg = BenchConfig(methods=a.methods, prompts=a.prompts, seeds=a.seeds, steps=a.steps, guidance=a.guidance,
                      quick=a.quick, step_costs=a.step_costs, latency_model=a.latency_model)
    model = _load_model(a.weights)
    results = run_bench(model, cfg, a.out, progress=not a.quiet, command="vdit-accel " + " ".join(sys.argv[1:]))
    print(markdown_table(results))
    if results["drift_flagged"]:
        print(f"drift flagged: dense latency second half / first half = {results['dense_drift']}", file=sys.stderr)
    print(f"wrote {a.out}/results.json, results.md, pareto.png, compare.gif")
    return 0


def _bench_command(a, name: str) -> str:
    """The bench command ``name`` with every option spelled out (reproducible whatever the defaults become)."""
    parts = ["vdit-accel", name]
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


def cmd_bench_parallel(a) -> int:
    from vdit_accel.bench.parallel import RESULT_FILES, ParallelBenchConfig, markdown, run_parallel_bench

    if a.out is None:
        raise VditAccelError("bench-parallel needs --out DIR: results are written there and nowhere else")
    cfg = ParallelBenchConfig(nproc=a.nproc, mesh=a.mesh, layers=a.layers, latent=tuple(a.latent),
                              text_len=a.text_len, budgets=tuple(a.budgets), repeats=a.repeats, rounds=a.rounds,
                              tiny=a.tiny)
    _check_out_dir(a.out, RESULT_FILES, a.overwrite)  # no resume: any of its files is an earlier run's result
    results = run_parallel_bench(cfg, a.out, command=_bench_command(a, "bench-parallel"))
    print(markdown(results))
    print(f"wrote {a.out}/bench-parallel.json and bench-parallel.md")
    return 0


def cmd_bench_step(a) -> int:
    from vdit_accel.bench.step import (
        RESULT_FILES,
        StepBenchConfig,
        latency_model_from,
        latency_settings,
        run_step_bench,
    )

    if a.out is None:
        raise VditAccelError("bench-step needs --out DIR: results are written there and nowhere else")
    _check_out_dir(a.out, RESULT_FILES, a.overwrite)  # no resume: any of its files is an earlier run's result
    if a.latency_model is not None:
        validate.check_output_path(a.latency_model, (".json",), overwrite=a.overwrite, name="--latency-model")
    cfg = StepBenchConfig(layers=a.layers, target_layers=a.target_layers, latent=tuple(a.latent), text_len=a.text_len,
                          dtype=a.dtype, device=a.device, repeats=a.repeats, warmup=a.warmup, budgets=tuple(a.budgets),
                          timed_steps=a.timed_steps,
                          kv_reuse=a.kv_reuse, orders=tuple(a.orders), seed=a.seed, full=a.full, tiny=a.tiny)
    settings = latency_settings(a.latency_kv_reuse) if a.latency_model else None
    results = run_step_bench(cfg, a.out, settings=settings, command=_bench_command(a, "bench-step"),
                             progress=not a.quiet)
    from vdit_accel.bench.step import markdown

    print(markdown(results))
    print(f"wrote {a.out}/bench-step.json and bench-step.md")
    if a.latency_model:
        path = latency_model_from(results, a.latency_kv_reuse).save(a.latency_model)
        print(f"wrote latency model {path}")
    return 0


def _check_named_outputs(a, files: dict[str, tuple[str, ...]]) -> None:
    """Named output files of calibrate/search, before any compute: a known extension, not a folder, in a writable
    folder (these commands replace their own earlier results, as a resumed run must, so existing files pass)."""
    for dest, extensions in files.items():
        value = getattr(a, dest, None)
        if value is not None:
            validate.check_output_path(value, extensions, overwrite=True, name="--" + dest.replace("_", "-"))


def cmd_calibrate(a) -> int:
    from vdit_accel.search.cli import calibrate_cli

    _check_named_outputs(a, {"out": (".json",)})
    return calibrate_cli(a)


def cmd_search(a) -> int:
    from vdit_accel.search.cli import search_cli

    _check_named_outputs(a, {"out": (".json",), "plot": (".png",)})
    if a.checkpoint is not None:
        validate.check_output_dir(a.checkpoint, name="--checkpoint", create=False)
    return search_cli(a)


def _method_choices() -> list[str]:
    import vdit_accel.methods  # noqa: F401  (registers every method)
    from vdit_accel.registry import method_names

    return ["dense", *(n for n in method_names() if n != "dense")]


def _add_model_flags(s: argparse.ArgumentParser, what: str) -> None:
    """``--model`` (a saved diffusers pipeline) and its geometry, dtype and device flags."""
    from vdit_accel.pipelines import DTYPES

    s.add_argument("--model", default=None, help=f"a saved diffusers pipeline folder (pipe.save_pretrained; loaded "
                   f"from local files only) {what} (default: the embedded model)")
    s.add_argument("--height", type=int_arg("height", lo=1, hi=MAX_SIZE * 16), default=None,
                   help="video height in pixels (default: the model's / the pipeline's)")
    s.add_argument("--width", type=int_arg("width", lo=1, hi=MAX_SIZE * 16), default=None,
                   help="video width in pixels (default: the model's / the pipeline's)")
    s.add_argument("--frames", type=int_arg("frames", lo=1, hi=MAX_SIZE), default=None,
                   help="video frames (default: the model's / the pipeline's)")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="--model's dtype")
    s.add_argument("--device", default="cpu", help="--model's device (cpu, cuda, cuda:N)")


def _add_w2_shape_args(s, defaults) -> None:
    """The W2 benchmarks' model-shape options (``--layers``, ``--latent``, ``--text-len``), defaults from their
    config (``StepBenchConfig`` / ``ParallelBenchConfig``)."""
    s.add_argument("--layers", type=int_arg("layers", 1, MAX_SIZE), default=defaults.layers,
                   help=f"blocks timed (default {defaults.layers})")
    s.add_argument("--latent", type=int_arg("latent", 1, MAX_SIZE), nargs=3, default=list(defaults.latent),
                   metavar=("F", "H", "W"),
                   help=f"latent frames, height, width (default {' '.join(map(str, defaults.latent))})")
    s.add_argument("--text-len", type=int_arg("text_len", 1, MAX_SIZE), default=defaults.text_len,
                   help=f"text tokens (default {defaults.text_len})")


def build_parser() -> argparse.ArgumentParser:
    from vdit_accel import __version__

    g = _gen_defaults()
    p = _Parser(prog="vdit-accel", description=__doc__.splitlines()[0], formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def add_parser(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_Formatter, **kw)

    s = add_parser("generate", help="generate a clip with the embedded model or a saved diffusers pipeline "
                   "(MP4 + GIF)")
    s.add_argument("prompt", help="a prompt in the caption grammar, e.g. 'a red circle grows on a gray background'")
    s.add_argument("--steps", type=STEPS, default=g.steps, help=f"denoising steps, 1..{validate.MAX_STEPS}")
    s.add_argument("--seed", type=SEED, default=g.seed, help="noise seed, 0..2**63-1")
    s.add_argument("--guidance", type=GUIDANCE, default=g.guidance,
                   help=f"CFG scale in [0, {validate.MAX_GUIDANCE:g}] (default: the model's)")
    s.add_argument("--flow-shift", type=FLOW_SHIFT, default=None,
                   help=f"sampler timestep shift in (0, {validate.MAX_FLOW_SHIFT:g}] (default: the model's)")
    s.add_argument("--out", default=DEFAULT_OUT, help=f"output video, .mp4 or .gif; with .mp4 a GIF preview is also "
                   f"written beside it (default {DEFAULT_OUT})")
    s.add_argument("--no-gif", action="store_true", help="with an .mp4 --out: no GIF preview (default off)")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files (default off: refuse)")
    s.add_argument("--method", default=None, choices=_MethodChoices(_method_choices()),
                   help="acceleration method, or several comma-separated to compose them (astraea,timeripple); "
                   "peers need --preset (default dense)")
    s.add_argument("--preset", default=None, help="preset name or JSON file for --method; with several methods one "
                   "per method, comma-separated, same order (default: each method's)")
    s.add_argument("--weights", default=None, help="model folder (default: the embedded model)")
    _add_model_flags(s, "to run instead of the embedded model")
    s.add_argument("--save-tensor", default=None,
                   help="also save the raw video tensor here (.safetensors; default: none)")
    s.add_argument("--no-check-finite", action="store_true", help="skip the per-step NaN/inf check of the model "
                   "output (default off: checked, one host sync per step)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--nproc", type=int, default=1, help="context-parallel ranks: > 1 relaunches through torchrun "
                   "(docs/parallel.md; default 1)")
    s.set_defaults(fn=cmd_generate)

    from vdit_accel.instrument.dataset import LAYOUTS

    s = add_parser("score", help="check whether a clip shows its prompt")
    s.add_argument("clip", nargs="?", help="an MP4 or GIF clip (square frames)")
    s.add_argument("--prompt", help="the prompt the clip should show (default: none; required with CLIP)")
    s.add_argument("--ground-truth", type=int_arg("ground_truth", 0, MAX_COUNT), default=0,
                   help=f"instead: accuracy on N ground-truth clips, 0..{MAX_COUNT} (default 0: off)")
    s.add_argument("--mp4", action="store_true", help="with --ground-truth: through an MP4 round trip")
    s.add_argument("--object-size", type=float_arg("object_size", 0.0, 1.0, lo_open=True), nargs=2, default=None,
                   metavar=("LO", "HI"), help="with --ground-truth: the clips' object diameter range as fractions of "
                   "the frame in (0, 1] (default: embedded-wan-v1's data)")
    s.add_argument("--layout", default="uniform", choices=LAYOUTS,
                   help="with --ground-truth: where objects start (default uniform: v1's data; anchored: v2's)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_score)

    s = add_parser("inspect", help="instrument report: Q/K adjacency and self-attention time share")
    s.add_argument("--prompts", default="quick", help="prompt set (quick, bench, heldout, calib) or file")
    s.add_argument("--steps", type=STEPS, default=10, help=f"denoising steps, 1..{validate.MAX_STEPS}")
    s.add_argument("--weights", default=None, help="model folder (default: the embedded model)")
    s.add_argument("--out", default=None, help="write the report as JSON here (.json; default: none)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out (default off: refuse)")
    s.set_defaults(fn=cmd_inspect)

    s = add_parser("train", help="train the embedded model (resumes from OUT/checkpoint)")
    s.add_argument("--out", default="runs/train", help="run folder")
    s.add_argument("--recipe", default="v2",
                   help="v2 (default: the shipped embedded-wan-v2 from scratch, one resumable run, 104 min on 2 "
                        "cores), v2-lineage (the five fine-tunes that made the session-4 model), scratch (random "
                        "init; made embedded-wan-v1, 51 min) or finetune (needs --init-from)")
    s.add_argument("--init-from", default=None, help="saved model folder to start from (fine-tuning)")
    s.add_argument("--model-id", default=None, help="model id recorded in the released config (default: the "
                   "recipe's)")
    s.add_argument("--seed", type=SEED, default=None, help="override the recipe's seed (default: the recipe's)")
    s.add_argument("--max-steps", type=int_arg("max_steps", 1, MAX_TRAIN_STEPS), default=None,
                   help=f"stop after this many total steps, 1..{MAX_TRAIN_STEPS} (resumable; default: the recipe's "
                   "end)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train)

    from vdit_accel.bench.harness import BenchConfig

    b = BenchConfig()
    s = add_parser("bench", help="side-by-side benchmark of methods (JSON, Markdown, plots, GIF)")
    s.add_argument("--methods", default=b.methods, help="comma-separated method names (each selects its whole "
                   "grid of operating points) or point labels, e.g. taylorseer-i5-o2, magcache-0.24-s6, fbc-0.2")
    s.add_argument("--prompts", default=b.prompts, help="prompt set (quick, bench, heldout, calib) or file")
    s.add_argument("--seeds", type=int_arg("seeds", 1, MAX_COUNT), default=b.seeds,
                   help=f"seeds per prompt, 1..{MAX_COUNT}")
    s.add_argument("--steps", type=STEPS, default=b.steps, help=f"denoising steps, 1..{validate.MAX_STEPS}")
    s.add_argument("--guidance", type=GUIDANCE, default=b.guidance,
                   help=f"CFG scale in [0, {validate.MAX_GUIDANCE:g}] (default: the model's)")
    s.add_argument("--out", default="results", help="results folder")
    s.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out "
                   "(default off: refuse before any compute)")
    s.add_argument("--quick", action="store_true", help="smoke test: 2 prompts, 1 seed, 8 steps (presets are "
                   "resampled over normalised time)")
    s.add_argument("--step-costs", default=b.step_costs, metavar="JSON", help="a bench-step JSON: replay every "
                   "point's recorded decisions at W2 width (speedup_w2; default: none)")
    s.add_argument("--latency-model", default=b.latency_model, metavar="JSON", help="a latency-model JSON: price "
                   "Astraea schedules at W2 width (speedup_w2; default: none)")
    s.add_argument("--weights", default=None, help="model folder (default: the embedded model)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_bench)

    from vdit_accel.bench.step import DTYPES, KV_CHOICES, StepBenchConfig
    from vdit_accel.search.latency import MAX_ORDER

    sb = StepBenchConfig()
    s = add_parser("bench-step", help="real-width (Wan2.1-1.3B) steady-state step latency per setting, "
                   "speedup, FLOP ceiling and efficiency (JSON + Markdown)")
    s.add_argument("--out", default=None, help="results folder (required; nothing is written elsewhere)")
    _add_w2_shape_args(s, sb)
    s.add_argument("--target-layers", type=int_arg("target_layers", 1, MAX_SIZE), default=sb.target_layers,
                   help=f"layers the step cost is composed for (default {sb.target_layers})")
    s.add_argument("--dtype", default=sb.dtype, choices=DTYPES,
                   help=f"float32, bfloat16 or float16 (default {sb.dtype})")
    s.add_argument("--device", default=sb.device, choices=("auto", "cpu", "cuda"),
                   help=f"auto, cpu or cuda (default {sb.device})")
    s.add_argument("--repeats", type=int_arg("repeats", 1, MAX_COUNT), default=sb.repeats,
                   help=f"timed steps per setting, round-robin (default {sb.repeats})")
    s.add_argument("--warmup", type=int_arg("warmup", 0, MAX_COUNT), default=sb.warmup,
                   help=f"untimed steps at each setting before the timed one (default {sb.warmup})")
    s.add_argument("--timed-steps", type=int_arg("timed_steps", 1, MAX_COUNT), default=sb.timed_steps,
                   help=f"consecutive steps timed per sample, averaged (default {sb.timed_steps})")
    s.add_argument("--budgets", type=float_arg("budgets", 0.0, 1.0), nargs="+", default=list(sb.budgets),
                   help=f"Astraea uniform budgets (default {' '.join(map(str, sb.budgets))})")
    s.add_argument("--kv-reuse", default=sb.kv_reuse, choices=KV_CHOICES,
                   help=f"Astraea settings without/with cached K/V rows (default {sb.kv_reuse})")
    s.add_argument("--orders", type=int_arg("orders", 0, MAX_ORDER), nargs="+", default=list(sb.orders),
                   help=f"forecast orders of the budget-0 steps (default {' '.join(map(str, sb.orders))})")
    s.add_argument("--seed", type=SEED, default=sb.seed, help=f"weights and inputs (default {sb.seed})")
    s.add_argument("--full", action="store_true", help="480p x 81 frames (latent 21x60x104), 30 layers, bfloat16, "
                   "CUDA when present (default off)")
    s.add_argument("--tiny", action="store_true", help="tiny width for smoke tests (default off)")
    s.add_argument("--latency-model", default=None, metavar="PATH",
                   help="instead of the settings above, measure dense, budgets 0..0.9 (order 0) and orders 1, 2 at "
                   "budgets 0 and 0.5, and write a latency model (vdit-accel/latency-model JSON) here (default: none)")
    s.add_argument("--latency-kv-reuse", action="store_true",
                   help="with --latency-model: the Astraea steps reuse cached K/V rows (default off)")
    s.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out and an "
                   "existing --latency-model (default off: refuse before any compute)")
    s.add_argument("--quiet", action="store_true", help="no per-step progress on stderr (default off)")
    s.set_defaults(fn=cmd_bench_step)

    from vdit_accel.bench.parallel import MESHES, ParallelBenchConfig

    pb = ParallelBenchConfig()
    s = add_parser("bench-parallel", help="context parallelism on N CPU ranks at Wan2.1-1.3B width: dense and "
                   "Astraea step times against one process, and the scaling model's form checked (JSON + Markdown)")
    s.add_argument("--out", default=None, help="results folder (required; nothing is written elsewhere)")
    s.add_argument("--nproc", type=int_arg("nproc", 2, 64), default=pb.nproc, help=f"ranks (default {pb.nproc})")
    s.add_argument("--mesh", default=pb.mesh, choices=MESHES,
                   help=f"ulysses (as far as the heads divide) or ring (over all ranks) (default {pb.mesh})")
    _add_w2_shape_args(s, pb)
    s.add_argument("--budgets", type=float_arg("budgets", 0.0, 1.0), nargs="+", default=list(pb.budgets),
                   help=f"Astraea uniform budgets in (0, 1) (default {' '.join(map(str, pb.budgets))})")
    s.add_argument("--repeats", type=int_arg("repeats", 1, MAX_COUNT), default=pb.repeats,
                   help=f"timed steps per setting and round (default {pb.repeats})")
    s.add_argument("--rounds", type=int_arg("rounds", 1, MAX_COUNT), default=pb.rounds,
                   help=f"fresh sets of processes, pooled (default {pb.rounds})")
    s.add_argument("--tiny", action="store_true", help="tiny width for smoke tests (default off)")
    s.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out "
                   "(default off: refuse before any compute)")
    s.set_defaults(fn=cmd_bench_parallel)

    s = add_parser("calibrate", help="calibrate a method's thresholds into a preset")
    s.add_argument("method", choices=("timeripple", "magcache"), help="the method to calibrate")
    s.add_argument("--target", type=float_arg("target", 0.0, 1.0, lo_open=True), default=None,
                   help="target QK savings (timeripple) in (0, 1), e.g. 0.85 (default: none)")
    s.add_argument("--target-speedup", type=float_arg("target_speedup", 1.0, 1000.0, lo_open=True), default=None,
                   help="target attention-op speedup incl. decisions (timeripple 'tokens' variant), e.g. 1.5 "
                   "(default: none)")
    s.add_argument("--op-grid", type=int_arg("op_grid", 1, MAX_SIZE), nargs=3, default=None, metavar=("T", "H", "W"),
                   help="token grid of the speed target (default: W2, 4 32 32)")
    s.add_argument("--op-heads", type=int_arg("op_heads", 1, MAX_SIZE), default=None,
                   help="heads of the speed target (default: W2, 12)")
    s.add_argument("--op-head-dim", type=int_arg("op_head_dim", 1, MAX_SIZE), default=None,
                   help="head dim of the speed target (default: W2, 128)")
    s.add_argument("--keys-only", action="store_true", help="with --target-speedup: merge keys only, queries "
                   "untouched (reuse_q=False; better fidelity at the same speed on the embedded model; default off)")
    s.add_argument("--key-merge", choices=("root", "mean"), default=None,
                   help="with --target-speedup: the key a group of merged keys attends with, 'root' (TimeRipple's "
                   "K substitution) or 'mean' (the group's mean key; higher fidelity at the same speed; default root)")
    s.add_argument("--decision-interval", type=int_arg("decision_interval", 1, validate.MAX_STEPS), default=None,
                   help="with --target-speedup: decide every N reuse steps and keep the decisions in between (the "
                   "op timing amortises the decision pass over N calls; default 1)")
    s.add_argument("--prompts", default="calib", help="prompt set (quick, bench, heldout, calib) or file")
    s.add_argument("--n-prompts", type=int_arg("n_prompts", 1, MAX_COUNT), default=None,
                   help="use only the first N prompts of the set (default: all)")
    s.add_argument("--steps", type=STEPS, default=g.steps, help=f"denoising steps, 1..{validate.MAX_STEPS}")
    s.add_argument("--out", default=None, help="file to write (default runs/presets/NAME.json; magcache: "
                   "runs/magcache_ratios.json)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out (default off: refuse)")
    s.add_argument("--weights", default=None, help="model folder (default: the embedded model)")
    _add_model_flags(s, "to calibrate on (timeripple; the preset records it as its model_id)")
    s.add_argument("--quiet", action="store_true", help="no progress bar (magcache)")
    s.set_defaults(fn=cmd_calibrate)

    s = add_parser("search", help="search a method's schedule (astraea) into a preset")
    s.add_argument("method", choices=("astraea",), help="the method whose schedule is searched")
    s.add_argument("--target", type=float_arg("target", 0.0, 1.0, lo_open=True), default=None,
                   help="mean token budget in (0, 1], e.g. 0.5 (budget-only search; default: none)")
    s.add_argument("--target-speedup", type=float_arg("target_speedup", 1.0, 1000.0), default=None,
                   help="joint budget+forecast search at this predicted speedup, e.g. 3 (needs --latency-model; "
                   "default: none)")
    s.add_argument("--latency-model", default=None,
                   help="vdit-accel/latency-model JSON (step benchmark; default: none)")
    from vdit_accel.search.joint import ALLOCATORS, DEFAULT_MAX_SEGMENT

    s.add_argument("--allocator", default="all", choices=[*ALLOCATORS, "all", "refine"],
                   help="joint search: allocator(s); 'all' runs every one and keeps the best on selection prompts "
                   "(with --model: uniform and evolution; dp and greedy need the embedded model's step loop); "
                   "'refine' = local search scored on final videos (full geometry, CFG), seeded by TaylorSeer "
                   "cadences and spread schedules")
    s.add_argument("--max-evals", type=int_arg("max_evals", 1, 100_000), default=60,
                   help="refine: objective calls at most, seeds included")
    s.add_argument("--min-weight", type=float_arg("min_weight", 0.0, 100.0), default=1.0,
                   help="refine: objective = mean PSNR + W * min PSNR over the prompts")
    s.add_argument("--seed-preset", action="append", default=None, metavar="PRESET",
                   help="refine: also start from this preset's schedule (repeatable)")
    from vdit_accel.methods.astraea import FORECAST_AXES

    s.add_argument("--forecast-axis", default="step", choices=FORECAST_AXES,
                   help="joint search: what forecasts extrapolate over: the step index (TaylorSeer's convention) or "
                   "the model's timestep (default: step)")
    s.add_argument("--max-segment", type=int_arg("max_segment", 1, validate.MAX_STEPS), default=DEFAULT_MAX_SEGMENT,
                   help="joint search: longest run between fully computed steps (error table, dp, greedy)")
    s.add_argument("--dense-steps", type=int_arg("dense_steps", 0, validate.MAX_STEPS), default=1,
                   help="joint search: first steps always computed in full (the teacher-forced error table cannot "
                   "see how an early reuse propagates; default 1)")
    s.add_argument("--proxy-geometry", default=None, help="joint search: FxHxW of the error table / fitness, or "
                   "'model' (default 8x32x32 on the embedded model, 'model' with --model)")
    s.add_argument("--steps", type=STEPS, default=g.steps, help=f"denoising steps, 1..{validate.MAX_STEPS}")
    s.add_argument("--prompts", default="calib", help="prompt set (quick, bench, heldout, calib) or file")
    s.add_argument("--out", default=None, help="preset file to write (default runs/presets/NAME.json)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out (default off: refuse)")
    s.add_argument("--checkpoint", default=None, help="checkpoint folder (default runs/search-NAME)")
    s.add_argument("--weights", default=None, help="model folder (default: the embedded model)")
    _add_model_flags(s, "to search on (at the pipeline's geometry, no proxy; --target-speedup: allocators uniform, "
                     "evolution, refine; the preset records it as its model_id)")
    s.add_argument("--seed", type=SEED, default=0, help="search seed, 0..2**63-1")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    from vdit_accel.search.evolution import EvolutionConfig

    e = EvolutionConfig(target=0.5, num_steps=50)
    s.add_argument("--plot", default=None, help="schedule/fitness plot (default runs/search-NAME/NAME-search.png)")
    s.add_argument("--population", type=int_arg("population", 1, MAX_COUNT), default=e.population,
                   help="evolution parents kept per generation")
    s.add_argument("--children", type=int_arg("children", 1, MAX_COUNT), default=e.children,
                   help="evolution children per generation")
    s.add_argument("--generations", type=int_arg("generations", 1, MAX_COUNT), default=None,
                   help=f"evolution generations (default {e.generations}; joint search: match the table's cost)")
    s.set_defaults(fn=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; return 0, or 2 after one line on stderr naming the bad value (a typed error)."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except UsageError as e:
        print(f"vdit-accel: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return a.fn(a)
    except VditAccelError as e:
        print(f"vdit-accel {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
