"""The context-parallel step benchmark (``vdit-accel bench-parallel``): dense Wan and Astraea on ``N`` CPU ranks
under diffusers' context parallelism against one process, and the scaling model's form checked on them.

A ``WanTransformer3DModel`` at Wan2.1-T2V-1.3B width (:class:`~vdit_accel.bench.step.StepBench`: dim 1536, 12x128
heads, FFN 8960, random seeded weights, ``layers`` blocks, float32, 512 text tokens) is stepped as a sampler would
(one CFG branch per call) on ``nproc`` gloo processes, one thread each, in three runs interleaved step by step in the
same processes (:func:`rank_measure`, :data:`RUNS`): the ranks under context parallelism (``mesh``: Ulysses as far
as the heads divide, or Ring over all ranks); every process stepping a whole plain copy at once (the machine as busy,
no communication); process 0 alone on a third copy. Per setting (dense; Astraea at each budget: 1 dense step fills
the caches, 1 warm-up step, ``repeats`` timed steps) a step is the slowest rank's. Measured apart, as the models'
inputs: the step's communication at its shapes (:func:`measured_comm_seconds`) and the seconds in the modules every
rank runs whole (:func:`replicated_modules`). :func:`summarize` checks the models of :data:`MODELS` against the CP
steps. Interleaving matters: this machine's speed moves by up to 40% between jobs, and runs measured apart compare
its states, not the settings.

Example (a real run: ``vdit-accel bench-parallel --nproc 2 --out runs/bench-parallel``, ~9 min per round on 2 cores):
    >>> ParallelBenchConfig(tiny=True).bench_kwargs()["latent"]
    (2, 8, 8)
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vdit_accel.errors import ConfigError, check_choice, check_range
from vdit_accel.validate import atomic_write

FORMAT = "vdit-accel/parallel-scaling"
RESULT_FILES = ("bench-parallel.json", "bench-parallel.md")  # what a bench-parallel run writes into its --out
MESHES = ("ulysses", "ring")
TINY_LATENT, TINY_TEXT = (2, 8, 8), 8


@dataclass(frozen=True)
class ParallelBenchConfig:
    """Settings of ``vdit-accel bench-parallel`` (the CLI's defaults come from here).

    Args:
        nproc (`int`, defaults 2): ranks (gloo processes, one thread each), 2..64.
        mesh (`str`, defaults "ulysses"): "ulysses" (as far as the heads divide, Ring for the rest:
            ``degrees_for``) or "ring" (Ring over all ranks).
        layers (`int`, defaults 2): blocks of the timed model.
        latent (`tuple[int, int, int]`, defaults (2, 60, 104)): latent frames, height, width (grid 2x30x52 = 3,120
            tokens); the tokens must divide over ``nproc``.
        text_len (`int`, defaults 512): text tokens.
        budgets (`tuple[float, ...]`, defaults (0.5, 0.25)): Astraea uniform budgets, each in (0, 1).
        repeats (`int`, defaults 3): timed steps per setting and round.
        rounds (`int`, defaults 1): fresh sets of processes, pooled.
        tiny (`bool`, defaults False): a tiny width and latent (2x8x8, 8 text tokens) for smoke tests.
        timeout (`float`, defaults 3600): seconds a round may take before its ranks are stopped.
    """

    nproc: int = 2
    mesh: str = "ulysses"
    layers: int = 2
    latent: tuple[int, int, int] = (2, 60, 104)
    text_len: int = 512
    budgets: tuple[float, ...] = (0.5, 0.25)
    repeats: int = 3
    rounds: int = 1
    tiny: bool = False
    timeout: float = 3600.0

    def __post_init__(self) -> None:
        check_range("nproc", self.nproc, lo=2, hi=64)
        check_choice("mesh", self.mesh, MESHES)
        for name in ("layers", "text_len", "repeats", "rounds"):
            check_range(name, getattr(self, name), lo=1)
        check_range("timeout", self.timeout, lo=1.0)
        object.__setattr__(self, "latent", tuple(int(v) for v in self.latent))
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
        if len(self.latent) != 3:
            raise ConfigError(f"latent={self.latent} must be 3 numbers: frames, height, width")
        for v in self.latent:
            check_range("latent", v, lo=1)
        for b in self.budgets:
            if not 0.0 < b < 1.0:
                raise ConfigError(f"budgets: {b} is out of range: accepted (0, 1) (1.0 is the dense setting, "
                                  "measured always)")
        from vdit_accel.bench.step import StepBenchConfig

        tokens = StepBenchConfig(**self.bench_kwargs()).effective().tokens
        if tokens % self.nproc:
            raise ConfigError(f"latent={self.bench_kwargs()['latent']} gives {tokens} tokens, which do not split "
                              f"over nproc={self.nproc} ranks: choose a latent whose token count nproc divides")

    def bench_kwargs(self) -> dict:
        """The :class:`~vdit_accel.bench.step.StepBenchConfig` arguments of every run's model."""
        latent, text = (TINY_LATENT, TINY_TEXT) if self.tiny else (self.latent, self.text_len)
        return dict(layers=self.layers, latent=latent, text_len=text, dtype="float32", device="cpu", tiny=self.tiny)


def measured_comm_seconds(model, tokens: int, world: int, budget: float, ring: bool) -> float:
    """The context-parallel communication of one step at its shapes, timed alone (max over ranks): Ulysses, the
    all-to-alls of q, k, v and out per layer (q and out carry the budget's rows); Ring, the all-gather of each
    rank's K and V per layer (one flattened buffer, as diffusers' ``TemplatedRingAttention`` gathers them)."""
    import torch.distributed as dist

    from vdit_accel.ops.astraea import budget_to_count

    if world == 1:
        return 0.0
    c = model.config.num_attention_heads * model.config.attention_head_dim
    local = tokens // world
    rows = local if budget >= 1.0 else budget_to_count(budget, local)
    layers = len(model.blocks)
    dist.barrier()
    t0 = time.perf_counter()
    if ring:
        kv = torch.randn(2 * local * c)
        for _ in range(layers):
            out = torch.empty(world * kv.numel())
            dist.all_gather_into_tensor(out, kv)
    else:
        bufs = [torch.randn(world * ((n * c + world - 1) // world)) for n in (rows, local, local, rows)]
        for _ in range(layers):
            for b in bufs:
                out = torch.empty_like(b)
                dist.all_to_all_single(out, b)
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def replicated_modules(model) -> list[torch.nn.Module]:
    """The modules of a Wan call that every context-parallel rank runs whole (diffusers 0.42's Wan plan splits the
    sequence at ``blocks.0`` and the RoPE tables at the output of ``rope``): the patch embedding, the condition
    embedder (timestep and text), RoPE, and each block's text K/V projections of the cross-attention (``attn2``;
    the text is not split). Everything else of the call runs on the rank's ``1/P`` of the tokens."""
    mods = [model.patch_embedding, model.condition_embedder, model.rope]
    for block in model.blocks:
        mods += [block.attn2.to_k, block.attn2.to_v, block.attn2.norm_k]
    return mods


RUNS = ("single", "loaded", "parallel")  # 1 process alone; every process a whole copy at once; the CP ranks


def rank_measure(rank: int, world: int, bench_kwargs: dict, budgets: list[float], repeats: int,
                 ring: bool = False) -> dict:
    """Step times per setting of the three runs of :data:`RUNS`, interleaved step by step on the same ``world``
    processes (so the machine's drifts fall on all three alike):

    - ``parallel``: every rank steps its own model under diffusers' CP, Ulysses (``ring=False``) or Ring over all
      ranks (the ranks' shards of one call);
    - ``loaded``: every rank steps a second, plain model on the whole problem at the same time (``world``
      independent copies: the machine as busy as under CP, no communication);
    - ``single``: rank 0 steps a third, plain model while the other ranks wait (the one-process step).

    Per step index the three run in an order rotated by the index; each is timed between barriers, and a step ends
    when its slowest rank ends. Also recorded per timed step: the seconds in :func:`replicated_modules`."""
    import torch.distributed as dist

    import vdit_accel
    from vdit_accel.bench.flops import Setting
    from vdit_accel.bench.step import ModuleTimer, StepBench, StepBenchConfig, astraea_config
    from vdit_accel.parallel import degrees_for, enable_context_parallel

    benches = {kind: StepBench(StepBenchConfig(**bench_kwargs)) for kind in RUNS}
    cp = benches["parallel"]
    u, r = (1, world) if ring else degrees_for(world, cp.model.config.num_attention_heads)
    enable_context_parallel(cp.model, ulysses=u, ring=r)
    timers = {kind: ModuleTimer(replicated_modules(b.model), b.device) for kind, b in benches.items()}
    runs_on = {"single": rank == 0, "loaded": True, "parallel": True}
    out = {"tokens": cp.cfg.tokens, "grid": list(cp.cfg.grid), "ulysses": u, "ring": r,
           "settings": {kind: {} for kind in RUNS}}
    try:
        for setting in [Setting()] + [Setting(budget=b) for b in budgets]:
            warm = 0 if setting.dense else 1
            steps = warm + 1 + repeats
            handles = [] if setting.dense else [vdit_accel.apply(b.model, astraea_config(setting, warm, steps))
                                                for b in benches.values()]
            times = {kind: [] for kind in RUNS}
            replicated = {kind: [] for kind in RUNS}
            try:
                for b in benches.values():
                    b.model._reset_stateful_cache()
                for i in range(steps):
                    for kind in RUNS[i % 3:] + RUNS[:i % 3]:
                        timer = timers[kind]
                        timer.reset()
                        timer.active = i >= warm + 1
                        dist.barrier()
                        t0 = time.perf_counter()
                        if runs_on[kind]:
                            benches[kind]._call(i, steps)
                        t = torch.tensor([time.perf_counter() - t0, sum(timer.times)])
                        timer.active = False
                        dist.all_reduce(t, op=dist.ReduceOp.MAX)
                        if i >= warm + 1:
                            times[kind].append(float(t[0]))
                            replicated[kind].append(float(t[1]))
            finally:
                for b in benches.values():
                    b.model._reset_stateful_cache()
                for h in handles:
                    h.remove()
            comm = measured_comm_seconds(cp.model, cp.cfg.tokens, world, setting.budget, ring)
            for kind in RUNS:
                out["settings"][kind][setting.label] = {
                    "budget": setting.budget, "step_s_all": times[kind], "replicated_s_all": replicated[kind],
                    "comm_s": comm if kind == "parallel" else 0.0}
    finally:
        for timer in timers.values():
            timer.close()
    return out


def _pooled(results: list[dict], kind: str, label: str) -> dict:
    """One run kind's setting pooled over rounds: the median of every timed step of every round."""
    rows = [r["settings"][kind][label] for r in results]
    steps = [t for s in rows for t in s["step_s_all"]]
    return {"step_s": statistics.median(steps),
            "replicated_s": statistics.median(t for s in rows for t in s["replicated_s_all"]),
            "comm_s": statistics.median(s["comm_s"] for s in rows), "step_s_all": steps}


MODELS = {
    "simple": "T_P = T_1/P + t_comm",
    "replicated": "T_P = (T_1 - r_1)/P + r_1 + t_comm (the GPU model's form; r_1: the one-process step's seconds in "
                  "the modules every rank runs whole)",
    "loaded": "T_P = (T_L - r_L)/P + r_L + t_comm (T_L: one process while P-1 whole copies run; r_L: its seconds in "
              "the replicated modules)",
}


def summarize(results: list[dict], nproc: int) -> dict:
    """Per setting, from the raw results of :func:`rank_measure` (rounds pooled): the three runs' step times, the
    speedup of the CP ranks over one process (ratio of medians, and the median of the per-step-index ratios), and
    each model of :data:`MODELS` against the measured CP step (``<model>_model_parallel_s``,
    ``<model>_model_error``; every input measured apart from the CP steps)."""
    dense = {kind: _pooled(results, kind, "dense")["step_s"] for kind in RUNS}
    table = {}
    for label, s0 in results[0]["settings"]["single"].items():
        s, ld, p = (_pooled(results, kind, label) for kind in RUNS)
        speedup = s["step_s"] / p["step_s"]
        paired = [a / b for a, b in zip(s["step_s_all"], p["step_s_all"], strict=True)]
        models = {"simple": s["step_s"] / nproc + p["comm_s"],
                  "replicated": (s["step_s"] - s["replicated_s"]) / nproc + s["replicated_s"] + p["comm_s"],
                  "loaded": (ld["step_s"] - ld["replicated_s"]) / nproc + ld["replicated_s"] + p["comm_s"]}
        row = {"budget": s0["budget"], "single_s": s["step_s"], "loaded_s": ld["step_s"], "parallel_s": p["step_s"],
               "speedup": speedup, "speedup_paired_median": statistics.median(paired), "efficiency": speedup / nproc,
               "comm_s": p["comm_s"], "replicated_s": s["replicated_s"],
               "replicated_share": s["replicated_s"] / s["step_s"], "loaded_replicated_s": ld["replicated_s"],
               "contention": ld["step_s"] / s["step_s"],
               "gain_over_dense_same_ranks": dense["parallel"] / p["step_s"],
               "gain_over_dense_one_process": dense["single"] / p["step_s"]}
        for name, t in models.items():
            row[f"{name}_model_parallel_s"] = t
            row[f"{name}_model_error"] = t / p["step_s"] - 1.0
        table[label] = row
    return table


def measure(cfg: ParallelBenchConfig, command: str | None = None) -> dict:
    """``cfg.rounds`` spawns of :func:`rank_measure` (each a fresh set of ``cfg.nproc`` processes), summarised by
    :func:`summarize`; the results dictionary (what ``bench-parallel.json`` holds)."""
    from vdit_accel.parallel import spawn

    kw = cfg.bench_kwargs()
    results = [spawn(rank_measure, cfg.nproc, kw, list(cfg.budgets), cfg.repeats, cfg.mesh == "ring",
                     timeout=cfg.timeout, collective_timeout=600)[0] for _ in range(cfg.rounds)]
    return {
        "format": FORMAT, "kind": "measured", "nproc": cfg.nproc, "threads_per_rank": 1,
        "command": command or "python " + " ".join(sys.argv), "tokens": results[0]["tokens"],
        "grid": results[0]["grid"], "mesh": {"ulysses": results[0]["ulysses"], "ring": results[0]["ring"]},
        "rounds": cfg.rounds, "bench": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
        "repeats": cfg.repeats,
        "hardware": {"platform": platform.platform(), "cpu": platform.processor(),
                     "cores": len(__import__("os").sched_getaffinity(0)), "torch": torch.__version__},
        "models": MODELS, "settings": summarize(results, cfg.nproc), "raw": results,
    }


def markdown(results: dict) -> str:
    """The results as a Markdown table: per setting the three runs' step times, speedup, efficiency, and each model's
    error against the CP step."""
    mesh = " x ".join(f"{k.capitalize()} {v}" for k, v in results["mesh"].items() if v > 1)
    lines = [f"# bench-parallel: {results['nproc']} ranks ({mesh}), {results['tokens']} tokens", "",
             "| setting | 1 process s/step | loaded s/step | CP s/step | speedup (paired) | efficiency | comm s | "
             "replicated share | " + " | ".join(f"{name} model error" for name in MODELS) + " |",
             "|---" * (8 + len(MODELS)) + "|"]
    for label, v in results["settings"].items():
        errors = " | ".join(f"{100 * v[f'{name}_model_error']:+.1f}%" for name in MODELS)
        lines.append(f"| {label} | {v['single_s']:.3f} | {v['loaded_s']:.3f} | {v['parallel_s']:.3f} | "
                     f"{v['speedup']:.2f}x ({v['speedup_paired_median']:.2f}x) | {v['efficiency']:.2f} | "
                     f"{v['comm_s']:.3f} | {100 * v['replicated_share']:.1f}% | {errors} |")
    lines += ["", "Models: " + "; ".join(f"{k}: {v}" for k, v in MODELS.items()), "",
              f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def run_parallel_bench(cfg: ParallelBenchConfig, out_dir: str | Path | None, *, command: str | None = None) -> dict:
    """:func:`measure`, then write ``bench-parallel.json`` and ``bench-parallel.md`` into ``out_dir`` (required;
    nothing is written elsewhere). Returns the results dictionary."""
    import json

    if out_dir is None:
        raise ConfigError("bench-parallel needs --out DIR: results are written there and nowhere else")
    results = measure(cfg, command)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in zip(RESULT_FILES, (json.dumps(results, indent=1), markdown(results)), strict=True):
        with atomic_write(out / name) as tmp:  # an interrupted run never leaves a half-written file
            tmp.write_text(text)
    return results
