"""GPU benchmark of TimeRipple's "tokens" variant on its Triton kernel at the full Wan2.1-1.3B self-attention geometry.

One prepared script for a lent CUDA GPU (written for an H200; runs in well under 3 minutes there). At the geometry of
one Wan2.1-1.3B self-attention call (480x832, 81 frames: a 21x30x52 token grid = 32,760 tokens, 12 heads x 128,
bfloat16, batch 1) it times, with CUDA events (``--warmup`` calls, then the median of ``--repeats``):

1. ``sdpa_flash``: torch SDPA forced to the flash backend (the baseline every speedup is against), and
   ``sdpa_auto`` (torch's own backend choice), recorded for reference.
2. ``triton_dense_*``: the Triton kernel (``ops.timeripple_triton.biased_attention_triton``) on the dense case, no
   bias, for each ``--configs`` block configuration ``BM,BN,warps,stages``: sanity vs flash (max abs error of the
   output and of the LSE against ``aten._scaled_dot_product_flash_attention``'s) and the speed of the kernel itself.
   The fastest configuration is used below (``--configs`` with one entry fixes it).
3. For each preset in ``--presets`` (``timeripple-op1.5x`` ... ``timeripple-op3x``: the "tokens" variant, keys only),
   q/k are synthesised so that the preset's own threshold removes the fraction of keys its record holds
   (``record.calibration.reused``, measured on the embedded model's recorded calls): random bf16 tokens (relative
   windowed spread ~0.7, never reused) where a seeded random subset of tokens of odd frames copies its previous
   frame's k (and q, for sides that reuse: spread 0 along t). Timed:
   ``tokens_e2e_triton`` = ``tokens_timeripple_attention(..., backend="triton")``: decisions (``token_decisions``)
   + gathers + key merging + kernel + scatter, everything the method runs per call;
   ``tokens_decisions``: the decision pass alone; ``tokens_kernel``: the kernel alone on the unique rows / merged keys;
   ``tokens_e2e_torch``: the same call on the torch path (SDPA with an additive ``attn_mask``; torch picks the
   backend), with the max abs difference of the two paths' outputs.
   ``--both-sides`` adds a case per preset with q and k both reused at the same fraction (rows *and* keys removed).

The removal pattern is synthetic (random positions, the recorded *fraction*): the kernel's cost depends on how many
rows/keys remain, not where they were. Writes JSON to ``--out`` (hardware name, capability, torch/triton/CUDA
versions, settings, every timing list, medians, speedups vs ``sdpa_flash``, errors, removed fractions). Exits with a
message and status 2 on a machine without CUDA (``--cpu-smoke`` runs the whole script on CPU under
``TRITON_INTERPRET=1`` at a tiny grid to check its logic; its timings mean nothing).

    # on the lent GPU (one command; < 3 min on an H200)
    PYTHONPATH=src python benchmarks/timeripple_gpu.py --out runs/timeripple_gpu/h200.json
    # logic check on a CPU machine (seconds)
    TRITON_INTERPRET=1 PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/timeripple_gpu.py --cpu-smoke \\
        --out /tmp/tr-gpu-smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vdit_accel.ops.timeripple_tokens import token_decisions, tokens_timeripple_attention
from vdit_accel.ops.timeripple_triton import biased_attention_triton, triton_available
from vdit_accel.search.presets import read_preset

WAN13_GRID = (21, 30, 52)  # 81 frames at 480x832 -> latent 21x60x104 -> patch (1, 2, 2)
DEFAULT_CONFIGS = ("128,64,8,2", "128,64,4,3", "128,128,8,2", "64,64,4,3", "128,32,4,3")


# --------------------------------------------------------------------------------------------------- timing
class Timer:
    """Median-of-repeats timer: CUDA events on CUDA, `perf_counter` on CPU (smoke only)."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": [round(t, 4) for t in times]}


# ----------------------------------------------------------------------------------------------------- inputs
def synth_qkv(grid, heads, head_dim, dtype, device, fraction, sides, seed):
    """`[1, S, H, D]` q, k, v: random tokens, and `fraction` of all tokens (odd frames only) copy their previous
    frame's q and/or k (`sides`), so a relative-spread threshold in (0, ~0.7) reuses exactly those tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t, hh, w = grid
    s = t * hh * w
    q, k, v = (torch.randn(1, s, heads, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    frame = torch.arange(s) // (hh * w)
    candidates = torch.nonzero(frame % 2 == 1).squeeze(1)  # with window 2, frame 2i+1's t-window is [2i, 2i+1]
    n_copy = round(fraction * s)
    if n_copy > candidates.numel():
        raise SystemExit(f"fraction={fraction} needs {n_copy} reusable tokens; odd frames give {candidates.numel()}")
    chosen = candidates[torch.randperm(candidates.numel(), generator=g)[:n_copy]].to(device)
    src = chosen - hh * w  # the same (h, w) one frame earlier: the window anchor along t (window 2)
    for name, x in (("q", q), ("k", k)):
        if name in sides:
            x[0, chosen] = x[0, src]
    return q, k, v


def preset_case(name: str) -> dict:
    p = read_preset(name)
    cfg, cal = p["config"], p["record"]["calibration"]
    if cfg.get("variant") != "tokens":
        raise SystemExit(f"preset {name!r} is variant {cfg.get('variant')!r}: this benchmark times 'tokens'")
    sides = "".join(s for s, on in (("q", cfg["reuse_q"]), ("k", cfg["reuse_k"])) if on)
    if int(cfg["window"]) != 2 or "t" not in cfg["axes"]:
        raise SystemExit(f"preset {name!r}: the synthetic inputs assume window 2 along t (got window "
                         f"{cfg['window']}, axes {cfg['axes']})")
    return dict(name=name, theta=float(cfg["fixed_threshold"]), fraction=float(cal["reused"]), sides=sides,
                window=int(cfg["window"]), axes=tuple(cfg["axes"]), priority=cfg["priority"],
                key_merge=cfg.get("key_merge", "root"),
                recorded_speedup_cpu=cal.get("achieved_speedup"), op_geometry=cal.get("op_geometry"))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------------- run
def run(args) -> dict:
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = getattr(torch, args.dtype)
    grid, heads, hd = tuple(args.grid), args.heads, args.head_dim
    s = math.prod(grid)
    timer = Timer(device, args.warmup, args.repeats)
    res: dict = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "tokens": s}, "timings": {}, "errors": {}, "cases": []}
    scale = 1.0 / math.sqrt(hd)

    q, k, v = synth_qkv(grid, heads, hd, dtype, device, 0.0, "", args.seed)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] views, as SDPA takes them

    # 1. torch SDPA
    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt)

    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            res["timings"]["sdpa_flash"] = timer(sdpa)
            flash_out, flash_lse = torch.ops.aten._scaled_dot_product_flash_attention(
                qt, kt, vt, 0.0, False, False, scale=scale)[:2]
        res["timings"]["sdpa_auto"] = timer(sdpa)
    else:
        res["timings"]["sdpa_flash"] = timer(sdpa)  # the CPU smoke has no flash backend: plain SDPA stands in
        flash_out, flash_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, False, scale=scale)[:2]
    flash_out, flash_lse = flash_out.transpose(1, 2), flash_lse.transpose(1, 2)  # [B, S, H, D], [B, S, H]
    base = res["timings"]["sdpa_flash"]["median_ms"]

    # 2. the Triton kernel on the dense case, per block configuration
    best = None
    for c in args.configs:
        bm, bn, warps, stages = (int(x) for x in c.split(","))
        kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        key = f"triton_dense_{bm}x{bn}_w{warps}_s{stages}"
        try:
            out, lse = biased_attention_triton(q, k, v, None, **kw)
            res["timings"][key] = timer(lambda kw=kw, q=q, k=k, v=v: biased_attention_triton(q, k, v, None, **kw))
        except Exception as e:  # a configuration that does not fit this GPU (shared memory): record and go on
            res["errors"][key] = {"failed": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        res["errors"][key] = {"out_max_abs_vs_flash": float((out.float() - flash_out.float()).abs().max()),
                              "out_rel_l2_vs_flash": rel_l2(out, flash_out),
                              "lse_max_abs_vs_flash": float((lse - flash_lse.float()).abs().max())}
        if best is None or res["timings"][key]["median_ms"] < res["timings"][best[0]]["median_ms"]:
            best = (key, kw)
    if best is None:
        raise SystemExit("every Triton configuration failed: see the errors above")
    res["best_config"] = best[0]
    kw_best = best[1]
    del flash_out, flash_lse

    # 3. the tokens variant end to end at each preset's recorded removed fraction
    cases = [preset_case(n) for n in args.presets]
    if args.both_sides:
        cases += [dict(c, name=c["name"] + "+q", sides="qk") for c in cases if c["sides"] != "qk"]
    for c in cases:
        q, k, v = synth_qkv(grid, heads, hd, dtype, device, c["fraction"], c["sides"], args.seed + 1)
        call = dict(grid=grid, thresholds=c["theta"], window=c["window"], axes=c["axes"], priority=c["priority"],
                    reuse_q="q" in c["sides"], reuse_k="k" in c["sides"], key_merge=c["key_merge"])
        xs = [x for x, side in ((q, "q"), (k, "k")) if side in c["sides"]]
        dec = token_decisions(xs, grid, c["theta"], window=c["window"], axes=c["axes"], priority=c["priority"])
        out_tri, st, _ = tokens_timeripple_attention(q, k, v, backend="triton", decisions=dec, **call)
        rec = dict(c, rows_removed=st.rows_removed, keys_removed=st.keys_removed, attn_work=st.attn_work,
                   reused=dec.reused)
        # the kernel alone on the structured form (the same gathers tokens_timeripple_attention does)
        root = dec.root[0]
        ar = torch.arange(s, device=device)
        is_root = root == ar
        u = is_root.nonzero().squeeze(1)
        qu = q[:, u] if call["reuse_q"] else q
        if call["reuse_k"]:
            pos = (is_root.cumsum(0) - 1).gather(0, root)
            cnt = torch.zeros(u.numel(), device=device).index_add_(0, pos, torch.ones(s, device=device))
            vm = (torch.zeros(u.numel(), heads, hd, device=device).index_add_(0, pos, v[0].float())
                  / cnt.view(-1, 1, 1)).to(dtype)[None]
            if c["key_merge"] == "mean":  # the group's mean key, as token_dedup_attention merges them
                km = (torch.zeros(u.numel(), heads, hd, device=device).index_add_(0, pos, k[0].float())
                      / cnt.view(-1, 1, 1)).to(dtype)[None]
            else:
                km = k[:, u]
            bias = cnt.log()[None]
        else:
            km, vm, bias = k, v, None
        cfg = dict(kw_best)
        res["timings"][f"{c['name']}:tokens_decisions"] = timer(lambda xs=xs, c=c: token_decisions(
            xs, grid, c["theta"], window=c["window"], axes=c["axes"], priority=c["priority"]))
        res["timings"][f"{c['name']}:tokens_kernel"] = timer(
            lambda qu=qu, km=km, vm=vm, bias=bias, cfg=cfg: biased_attention_triton(qu, km, vm, bias, **cfg))
        with _kernel_config(kw_best):
            res["timings"][f"{c['name']}:tokens_e2e_triton"] = timer(
                lambda q=q, k=k, v=v, call=call: tokens_timeripple_attention(q, k, v, backend="triton", **call))
        try:
            out_torch = tokens_timeripple_attention(q, k, v, backend="torch", decisions=dec, **call)[0]
            res["timings"][f"{c['name']}:tokens_e2e_torch"] = timer(
                lambda q=q, k=k, v=v, call=call: tokens_timeripple_attention(q, k, v, backend="torch", **call))
            rec["out_max_abs_triton_vs_torch_path"] = float((out_tri.float() - out_torch.float()).abs().max())
            rec["out_rel_l2_triton_vs_torch_path"] = rel_l2(out_tri, out_torch)
            del out_torch
        except Exception as e:  # e.g. out of memory if torch falls back to the math backend with a mask
            rec["tokens_e2e_torch_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["cases"].append(rec)
        del q, k, v, out_tri, qu, km, vm

    res["speedup_vs_sdpa_flash"] = {name: round(base / t["median_ms"], 4) for name, t in res["timings"].items()}
    return res


class _kernel_config:
    """Make `token_dedup_attention`'s kernel calls use the chosen block configuration (restored on exit)."""

    def __init__(self, kw: dict):
        self.kw = kw

    def __enter__(self):
        import vdit_accel.ops.timeripple_tokens as tokens_mod

        self.mod, self.orig = tokens_mod, tokens_mod.biased_attention_triton
        kw, orig = self.kw, self.orig
        tokens_mod.biased_attention_triton = lambda *a, **k: orig(*a, **{**kw, **k})
        return self

    def __exit__(self, *exc):
        self.mod.biased_attention_triton = self.orig


def versions(device: torch.device) -> dict:
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count)
    else:
        info.update(gpu=None, note="CPU smoke under TRITON_INTERPRET=1: timings are meaningless")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--presets", nargs="+", default=["timeripple-op1.5x", "timeripple-op2x", "timeripple-op3x"])
    p.add_argument("--grid", type=int, nargs=3, default=list(WAN13_GRID), metavar=("T", "H", "W"))
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="Triton blocks BM,BN,warps,stages")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--both-sides", action=argparse.BooleanOptionalAction, default=True,
                   help="also time q and k both reused at each preset's fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script's logic on CPU (needs TRITON_INTERPRET=1; use a tiny --grid)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu-smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        if math.prod(args.grid) > 4096:
            print(f"--cpu-smoke with --grid {args.grid} would take hours in the interpreter: use e.g. --grid 4 4 6",
                  file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("timeripple_gpu.py times the Triton kernel on a CUDA GPU and no CUDA device is visible here "
              f"(torch {torch.__version__}, cuda {torch.version.cuda}); nothing was run. On a CPU machine, "
              "--cpu-smoke checks the script's logic under TRITON_INTERPRET=1.", file=sys.stderr)
        return 2
    if not triton_available():
        print("timeripple_gpu.py needs triton (pip install triton); nothing was run.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    t0 = time.perf_counter()
    res = {"benchmark": "timeripple_gpu", "command": " ".join(sys.argv), "hardware": versions(device)}
    res.update(run(args))
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({"hardware": res["hardware"], "best_config": res["best_config"],
                      "speedup_vs_sdpa_flash": res["speedup_vs_sdpa_flash"],
                      "cases": [{k: c[k] for k in ("name", "sides", "rows_removed", "keys_removed")}
                                for c in res["cases"]], "wall_s": res["wall_s"]}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
