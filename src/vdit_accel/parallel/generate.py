"""``vdit-accel generate --nproc N``: the same generation on N context-parallel ranks, through torchrun.

The CLI re-launches itself as ``torchrun --standalone --nproc_per_node N -m vdit_accel.parallel.generate PROMPT
[generate flags]``; every rank loads the model, applies the method (``vdit_accel.apply``: inside diffusers' CP
hooks), enables context parallelism (Ulysses as far as the heads divide, Ring for the rest:
:func:`~vdit_accel.parallel.launch.degrees_for`) and samples; rank 0 writes the outputs. A rank that fails makes
torchrun stop the others and exit non-zero; collectives time out after ``VDIT_CP_TIMEOUT_S`` seconds (default 600)
so a rank cannot wait forever on a dead peer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vdit_accel.errors import VditAccelError

_FLAGS = ("steps", "seed", "guidance", "flow_shift", "out", "method", "preset", "weights", "save_tensor")
_SWITCHES = ("quiet", "no_gif", "overwrite", "no_check_finite")


def generate_argv(a) -> list[str]:
    """The worker's arguments for a parsed ``generate`` namespace (everything but ``--nproc``)."""
    argv = [a.prompt]
    for name in _FLAGS:
        value = getattr(a, name, None)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    for name in _SWITCHES:
        if getattr(a, name, False):
            argv.append(f"--{name.replace('_', '-')}")
    return argv


def launch_generate(a) -> int:
    """Run ``generate`` on ``a.nproc`` ranks through torchrun; return its exit status (2 on a rank failure)."""
    from vdit_accel.cli import generate_outputs
    from vdit_accel.parallel.launch import torchrun_command

    if isinstance(a.nproc, bool) or not isinstance(a.nproc, int) or a.nproc < 1:
        raise VditAccelError(f"--nproc={a.nproc!r} is out of range: accepted an int >= 1")
    generate_outputs(a)  # bad or existing output paths fail here, once, before any rank starts
    cmd = torchrun_command(a.nproc, "vdit_accel.parallel.generate", generate_argv(a))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        print(f"vdit-accel generate --nproc {a.nproc}: error: a rank failed (torchrun exit {code}); see the rank "
              "errors above", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    import vdit_accel
    from vdit_accel.bench.harness import stats_summary
    from vdit_accel.cli import (
        _load_model,
        _method_configs,
        _method_specs,
        _write_outputs,
        build_parser,
        generate_outputs,
    )
    from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    from vdit_accel.instrument.video import to_frames, write_video
    from vdit_accel.parallel.cp import cpu_workarounds, enable_context_parallel
    from vdit_accel.parallel.launch import degrees_for, init_process_group

    a = build_parser().parse_args(["generate", *(sys.argv[1:] if argv is None else argv)])
    rank, world = init_process_group(timeout_s=float(os.environ.get("VDIT_CP_TIMEOUT_S", "600")))
    try:
        with cpu_workarounds():
            cfg = GenerationConfig(steps=a.steps, guidance=a.guidance, seed=a.seed, flow_shift=a.flow_shift,
                                   frames=a.frames, height=a.height, width=a.width,
                                   check_finite=not a.no_check_finite)
            paths = generate_outputs(a)
            specs = _method_specs(a.method, a.preset)
            model = _load_model(a.weights)
            model.encode_prompts([a.prompt])
            configs = _method_configs(specs, a.steps, model.config.model_id)
            ulysses, ring = degrees_for(world, model.config.num_heads)
            handle = vdit_accel.apply(model.transformer, configs, steps=a.steps) if configs else None
            enable_context_parallel(model.transformer, ulysses=ulysses, ring=ring)
            video = Sampler(model)(a.prompt, cfg, progress=not a.quiet and rank == 0)
            stats = stats_summary(handle) if handle is not None else None
        if rank == 0:  # as cmd_generate writes them
            _write_outputs(paths, video, to_frames(video), write_video)
            print(f"({world} ranks: ulysses={ulysses}, ring={ring})")
            if stats:
                print(json.dumps(stats, indent=1))
    except VditAccelError as e:
        print(f"vdit-accel generate (rank {rank}/{world}): error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
