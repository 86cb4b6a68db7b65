"""Compiled vs eager per method at Wan2.1-1.3B width on CUDA (issue 16 §5); JSON to ``--out``.

A random-init ``WanTransformer3DModel`` with Wan2.1-1.3B's block width (12 heads x 128, FFN 8960, text 4096,
patch (1, 2, 2)), ``--layers`` blocks, is driven through ``--steps`` CFG steps (cond and uncond calls inside
``cache_context``) for each method: dense, TimeRipple ("exact_sim", a ramp), Astraea token-wise (budgets on the
row buckets, so compiled and eager compute the same rows) and Astraea whole-step. Per method it records eager and
compiled seconds per generation (CUDA-synchronised, median of ``--repeats`` after one warm-up generation), the
compile time (the first compiled generation), graph breaks and graphs (``torch._dynamo.utils.counters``) and the
largest |compiled - eager| of the outputs relative to their largest |eager| value (bf16: float reassociation only).
The compile is diffusers' regional ``compile_repeated_blocks(fullgraph=True)`` with inductor. The whole model is
cast to bf16 (norms and time embedder too, unlike ``from_pretrained(torch_dtype=...)``; diffusers warns about it).

Usage (about 2-3 min on an H200 at the defaults; the first inductor compile dominates):

    python benchmarks/compile_gpu.py --out runs/compile_gpu.json

Without CUDA it exits with status 2 and a message; ``--smoke`` runs the same code on CPU at a tiny width with
``backend="eager"`` (a plumbing check, its timings mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _build(args, device, dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    if args.smoke:
        kw = dict(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, text_dim=32, freq_dim=32, in_channels=4,
                  out_channels=4)
    else:  # Wan2.1-T2V-1.3B
        kw = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256,
                  in_channels=16, out_channels=16)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_layers=args.layers, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **kw)
    return m.to(device=device, dtype=dtype).eval(), kw["in_channels"], kw["text_dim"]


def _apply(method: str, m, steps: int):
    from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
    from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple

    if method == "dense":
        return None
    if method == "timeripple":
        return apply_timeripple(m, TimeRippleConfig(theta_min=0.2, theta_max=0.5, i_min=1, i_max=steps // 2,
                                                    num_steps=steps))
    if method == "astraea":
        budgets = tuple([1.0] + [0.5 if i % 2 else 0.25 for i in range(1, steps - 1)] + [1.0])
        return apply_astraea(m, AstraeaConfig(budgets=budgets, num_steps=steps))
    if method == "astraea_whole":
        budgets = tuple([1.0] + [0.0 if i % 2 else 1.0 for i in range(1, steps - 1)] + [1.0])
        return apply_astraea(m, AstraeaConfig(budgets=budgets, num_steps=steps, forecast=1))
    raise SystemExit(f"unknown method {method!r}: choose from dense, timeripple, astraea, astraea_whole")


def _generation(m, x, text, uncond, steps: int, device) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * (1 - i / steps)], device=device)
            for branch, emb in (("cond", text), ("uncond", uncond)):
                with m.cache_context(branch, step_index=i, num_inference_steps=steps):
                    outs.append(m(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0])
        m._reset_stateful_cache()
    return outs


def _timed(fn, device) -> tuple[float, list[torch.Tensor]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def _one(method: str, args, device, dtype) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    m, channels, text_dim = _build(args, device, dtype)
    handle = _apply(method, m, args.steps)
    g = torch.Generator(device="cpu").manual_seed(1)
    t, h, w = args.latent
    x = torch.randn(1, channels, t, h, w, generator=g).to(device=device, dtype=dtype)
    text = torch.randn(1, 512 if not args.smoke else 8, text_dim, generator=g).to(device=device, dtype=dtype)
    uncond = torch.zeros_like(text)
    run = functools.partial(_generation, m, x, text, uncond, args.steps, device)
    _timed(run, device)  # warm-up: kernels, the attention probe
    eager_times, eager = [], None
    for _ in range(args.repeats):
        sec, eager = _timed(run, device)
        eager_times.append(sec)
    eager_stats = handle.stats.summary() if handle is not None else {}
    m.compile_repeated_blocks(fullgraph=True, backend="eager" if args.smoke else "inductor")
    counters.clear()
    compile_sec, _ = _timed(run, device)
    comp_times, comp = [], None
    for _ in range(args.repeats):
        sec, comp = _timed(run, device)
        comp_times.append(sec)
    scale = max(float(e.float().abs().max()) for e in eager) or 1.0
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(comp, eager)) / scale
    out = {
        "method": method,
        "eager_s": statistics.median(eager_times),
        "compiled_s": statistics.median(comp_times),
        "first_compiled_generation_s": compile_sec,
        "speedup": statistics.median(eager_times) / statistics.median(comp_times),
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "max_rel_diff_vs_eager": diff,
        "eager_stats": eager_stats,
        "compiled_stats": handle.stats.summary() if handle is not None else {},
    }
    if handle is not None:
        handle.remove()
    del m, run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="JSON file to write")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (Wan2.1-1.3B has 30; default 4)")
    p.add_argument("--latent", type=int, nargs=3, default=(11, 60, 104),
                   help="latent T H W (default 11 60 104: 41 frames at 480x832, 17,160 tokens)")
    p.add_argument("--steps", type=int, default=6, help="denoising steps per generation (default 6)")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per mode (default 2)")
    p.add_argument("--methods", default="dense,timeripple,astraea,astraea_whole", help="comma-separated")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny width, backend='eager': a plumbing check only")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.latent = (2, 8, 8) if tuple(args.latent) == (11, 60, 104) else args.latent
    elif not torch.cuda.is_available():
        print("compile_gpu.py needs CUDA (no GPU visible); use --smoke for a CPU plumbing check", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "layers": args.layers, "latent": list(args.latent), "steps": args.steps,
               "dtype": str(dtype), "compile": "compile_repeated_blocks(fullgraph=True)", "methods": []}
    for method in args.methods.split(","):
        results["methods"].append(_one(method.strip(), args, device, dtype))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in results["methods"][-1].items() if "stats" not in k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
