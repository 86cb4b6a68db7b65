"""TimeRipple's structured reuse vs masking / skipping / static sparsity, at equal *measured* speedup (issue 15).

TimeRipple's central claim is that reusing similar tokens beats masking or skipping the same amount of attention.
This benchmark puts the shipped structured variant (``variant="tokens"``, keys merged, queries untouched: the
``timeripple-op1.3x-root`` / ``timeripple-op1.5x-root`` presets) next to the baselines of
``ops.sparse_baselines`` on a speed axis. Every number is computed at run time; nothing is hard-coded.

Part ``op`` (timed; run it on a quiet machine):
    1. Runs the model dense (``--steps``) and captures the post-RoPE q/k/v of the cond-branch self-attention calls at
       ``--capture-steps`` x ``--layers`` (``benchmarks/timeripple_op.py: capture``).
    2. Resamples each call to Wan2.1-1.3B width (``--grid`` 4x32x32 tokens, ``--heads`` 12 x ``--head-dim`` 128;
       ``timeripple_op.resample``: tokens by nearest window keeping the in-window position, heads cyclically,
       channels by RoPE group, plus ``--noise`` x std seeded noise), so every method sees the model's q/k/v.
    3. Times, interleaved (``--repeats`` rotating rounds, median, one process), on those W2 tensors: dense torch SDPA;
       TimeRipple ``tokens`` keys-only at each ``--thetas`` θ (decisions on the W2 keys *included*); and at the same
       θ, the baselines removing the same count as TimeRipple merges on that call: ``topk_keys`` (mass estimate from
       64-token mean-pooled queries + top-k + SDPA on kept keys, timed), ``similarity_keys`` (relative-spread pass +
       drop + SDPA, timed; drops exactly the keys TimeRipple merges, without the merge), ``static_rows`` (query rows
       skipped by position; roots precomputed per geometry like a static mask, not timed); and ``tile_window`` at
       each ``--windows`` (tiles of ``--tile`` tokens; the blocked SDPA path; ``--flex``: also compiled
       flex_attention, compile excluded). Error: relative L2 of each output vs dense SDPA on the same tensors.
Part ``e2e`` (deterministic; PSNR only, no timing):
    50-step (``--e2e-steps``) generations with CFG (the model's default) for the first ``--e2e-prompts`` prompts of
    ``--prompt-set`` (held-out ``bench`` set by default), seed 0: dense, TimeRipple's presets ``--presets`` (and the
    same ``tokens`` keys-only config at any other ``--e2e-thetas``), the counted baselines at ``match_theta`` = each
    of those θ, and ``tile_window`` at ``--e2e-windows`` with ``--e2e-tile`` (the embedded grid 8x16x16 with tiles
    2x4x4 is 4x4x4 tiles, like W2's 4x32x32 with tiles 1x8x8, so a window in tiles has the same density on both).
    PSNR vs dense per prompt. Resumable: each finished (setting, prompt) is stored in ``--out/e2e.json`` at once and
    skipped on a re-run with the same settings.
Pairing: each method family is a curve of (op speedup, op error, e2e PSNR) over its settings (op and e2e rows share
labels ``family@θ`` / ``tile_window@wt,wh,ww``); at each ``--pair-speedups`` target and at each TimeRipple point's
own measured speedup, every family's op error (log-linear) and PSNR (linear) are interpolated on its curve (null
outside the measured speed range). Written to ``--out/timeripple_masking.json`` (with ``op.json`` and ``e2e.json``)
after every part, from what exists.

    # smoke (seconds; tiny random model)
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timeripple_masking.py --model tiny --grid 2 8 8 \\
        --heads 2 --head-dim 16 --tile 1 4 4 --windows 2,2,1 --e2e-tile 1 1 1 --e2e-windows 2,1,2 --steps 4 \\
        --capture-steps 2 --layers 0 --e2e-steps 3 --e2e-prompts 1 --repeats 2 --thetas 0.3 --out /tmp/mask-smoke
    # e2e PSNR only (deterministic)
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timeripple_masking.py --parts e2e \\
        --out runs/timeripple_masking
    # the timed op part (quiet machine), then the pairing uses both
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/timeripple_masking.py --parts op \\
        --threads 2 --out runs/timeripple_masking
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timeripple_op import _err, _sdpa, capture, resample, time_call  # noqa: E402

from vdit_accel.bench.harness import machine_info, prompt_sets  # noqa: E402
from vdit_accel.bench.metrics import psnr  # noqa: E402
from vdit_accel.instrument.sampler import GenerationConfig, Sampler  # noqa: E402
from vdit_accel.methods.sparse_attention import SparseAttentionConfig, apply_sparse_attention  # noqa: E402
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple  # noqa: E402
from vdit_accel.ops.sparse_baselines import (  # noqa: E402
    key_mass_scores,
    masked_key_attention,
    row_skip_attention,
    similarity_key_keep,
    static_row_skip_roots,
    tile_block_mask,
    tile_plan,
    tile_window_attention,
    tile_window_density,
    topk_key_keep,
)
from vdit_accel.ops.timeripple_tokens import token_decisions, token_dedup_attention  # noqa: E402
from vdit_accel.search.presets import load_preset  # noqa: E402

FAMILIES = ("timeripple", "topk_keys", "similarity_keys", "static_rows", "tile_window")
FORMAT = "vdit-accel/timeripple-masking"


def _label(family: str, x) -> str:
    if family == "tile_window":
        return f"tile_window@{','.join(str(int(w)) for w in x)}"
    return f"{family}@{float(x):.4g}"


def _windows(specs: list[str]) -> list[tuple[int, int, int]]:
    out = []
    for s in specs:
        w = tuple(int(x) for x in s.split(","))
        if len(w) != 3:
            raise SystemExit(f"--windows/--e2e-windows {s!r}: expected three comma-separated ints (t,h,w tiles)")
        out.append(w)
    return out


def _preset_thetas(names: list[str], steps: int) -> dict[str, float]:
    """Preset name -> its fixed θ; the presets must be the keys-only 'tokens' variant (what this compares)."""
    out = {}
    for name in names:
        cfg = load_preset(name, method="timeripple", steps=steps)
        if cfg.variant != "tokens" or cfg.reuse_q or cfg.fixed_threshold is None:
            raise SystemExit(f"preset {name} is not a keys-only fixed-θ 'tokens' preset: not comparable here")
        out[name] = float(cfg.fixed_threshold)
    return out


def _tr_config(theta: float, steps: int) -> TimeRippleConfig:
    return TimeRippleConfig(variant="tokens", reuse_q=False, fixed_threshold=theta, i_min=0, i_max=0,
                            num_steps=steps)


# ------------------------------------------------------------------------------------------------ op part
def bench_op_call(rec: dict, args, thetas: list[float]) -> dict:
    """All methods on one captured call resampled to W2: median times, speedups vs dense, errors vs dense."""
    grid = tuple(args.grid)
    (q, k, v), _, _ = resample(rec, 0.0, grid, args.heads, args.head_dim, 2, args.noise, args.seed)
    n = math.prod(grid)
    fns = {"dense": lambda: _sdpa(q, k, v)}
    meta: dict[str, dict] = {"dense": {"family": "dense"}}
    for theta in thetas:
        dec = token_decisions([k], grid, theta)
        n_drop = int((dec.root[0] != torch.arange(n)).sum())

        def tr(theta=theta):
            d = token_decisions([k], grid, theta)
            return token_dedup_attention(q, k, v, None, d.root)[0]

        def topk(n_drop=n_drop):
            return masked_key_attention(q, k, v, topk_key_keep(key_mass_scores(q, k, query_pool=args.query_pool),
                                                               n_drop))[0]

        def sim(n_drop=n_drop):
            return masked_key_attention(q, k, v, similarity_key_keep(k, grid, n_drop))[0]

        root = static_row_skip_roots(grid, n_drop)

        def rows(root=root):
            return row_skip_attention(q, k, v, root)[0]

        for fam, fn in (("timeripple", tr), ("topk_keys", topk), ("similarity_keys", sim), ("static_rows", rows)):
            lab = _label(fam, theta)
            fns[lab] = fn
            meta[lab] = {"family": fam, "theta": theta, "removed": n_drop / n,
                         "removed_kind": "query rows" if fam == "static_rows" else "keys"}
    for w in _windows(args.windows):
        plan = tile_plan(grid, tuple(args.tile), w)
        lab = _label("tile_window", w)
        fns[lab] = lambda w=w, plan=plan: tile_window_attention(q, k, v, grid=grid, tile=tuple(args.tile), window=w,
                                                                backend="blocked", plan=plan)[0]
        meta[lab] = {"family": "tile_window", "window": list(w), "density": tile_window_density(grid,
                                                                                              tuple(args.tile), w)}
        if args.flex:
            bm = tile_block_mask(grid, tuple(args.tile), w)
            fl = f"tile_flex@{','.join(map(str, w))}"
            fns[fl] = lambda w=w, plan=plan, bm=bm: tile_window_attention(
                q, k, v, grid=grid, tile=tuple(args.tile), window=w, backend="flex", plan=plan, block_mask=bm)[0]
            meta[fl] = {**meta[lab], "family": "tile_flex"}
    for fn in fns.values():  # warm-up (and flex compilation), untimed
        fn()
    med, outs = time_call(fns, args.repeats)
    dense = outs["dense"]
    rows_out = {}
    for lab, m in meta.items():
        rows_out[lab] = {**m, "time_s": med[lab], "speedup_vs_dense": med["dense"] / med[lab],
                         "err_vs_dense": _err(outs[lab], dense)}
    return rows_out


def op_part(model, args, thetas: list[float]) -> dict:
    prompt = prompt_sets()["quick"][0]
    store = capture(model, prompt, 0.0, args.steps, set(args.capture_steps), args.layers)
    records = []
    for (step, layer), rec in sorted(store.items()):
        t0 = time.perf_counter()
        row = bench_op_call(rec, args, thetas)
        records.append({"step": step, "layer": layer, "source_grid": list(rec["grid"]), "methods": row})
        print(f"op step={step} layer={layer} ({time.perf_counter() - t0:.0f} s): " + " ".join(
            f"{lab}={x['speedup_vs_dense']:.2f}x/{x['err_vs_dense']['rel_l2']:.2g}" for lab, x in row.items()),
            flush=True)
    agg = {}
    for lab in records[0]["methods"]:
        xs = [r["methods"][lab] for r in records]
        agg[lab] = {k: v for k, v in xs[0].items() if k in ("family", "theta", "window", "density", "removed_kind")}
        agg[lab].update({
            "speedup_vs_dense_geomean": float(np.exp(np.mean([np.log(x["speedup_vs_dense"]) for x in xs]))),
            "speedup_vs_dense_min": float(min(x["speedup_vs_dense"] for x in xs)),
            "speedup_vs_dense_max": float(max(x["speedup_vs_dense"] for x in xs)),
            "rel_l2_vs_dense_mean": float(np.mean([x["err_vs_dense"]["rel_l2"] for x in xs])),
            "removed_mean": float(np.mean([x.get("removed", 0.0) for x in xs])),
            "dense_s_median": float(np.median([r["methods"]["dense"]["time_s"] for r in records])),
            "calls": len(xs),
        })
    return {"prompt": prompt, "geometry": {"grid": list(args.grid), "heads": args.heads, "head_dim": args.head_dim},
            "threads": torch.get_num_threads(), "aggregate": agg, "records": records}


# ------------------------------------------------------------------------------------------------ e2e part
def e2e_settings(args, thetas: list[float], presets: dict[str, float]) -> list[tuple[str, str, dict]]:
    """(label, kind, config dict) of every end-to-end setting."""
    alias = {round(t, 6): name for name, t in presets.items()}
    out = []
    for theta in thetas:
        out.append((_label("timeripple", theta), "timeripple",
                    {"preset": alias.get(round(theta, 6)), **_tr_config(theta, args.e2e_steps).to_dict()}))
        for fam in ("topk_keys", "similarity_keys", "static_rows"):
            cfg = SparseAttentionConfig(fam, match_theta=theta, query_pool=args.query_pool)
            out.append((_label(fam, theta), "sparse", cfg.to_dict()))
    for w in _windows(args.e2e_windows):
        cfg = SparseAttentionConfig("tile_window", tile=tuple(args.e2e_tile), window=w, backend="blocked")
        out.append((_label("tile_window", w), "sparse", cfg.to_dict()))
    return out


def e2e_part(model, args, thetas: list[float], presets: dict[str, float], path: Path) -> dict:
    prompts = prompt_sets()[args.prompt_set][: args.e2e_prompts]
    gen = GenerationConfig(steps=args.e2e_steps, seed=0)
    sampler = Sampler(model)
    header = {"steps": args.e2e_steps, "seed": 0, "guidance": sampler.guidance(gen), "prompt_set": args.prompt_set,
              "model": getattr(getattr(model, "config", None), "model_id", None)}
    state = json.loads(path.read_text()) if path.exists() else {}
    if state.get("header") != header:
        state = {"header": header, "entries": {}}
    entries = state["entries"]
    dense = {}
    for p in prompts:
        dense[p] = sampler(p, gen, progress=False)
    for label, kind, cfg in e2e_settings(args, thetas, presets):
        for p in prompts:
            key = f"{label}|{p}"
            if key in entries and entries[key]["config"] == cfg:
                continue
            t0 = time.perf_counter()
            if kind == "timeripple":
                handle = apply_timeripple(model.transformer, TimeRippleConfig.from_dict(
                    {k: v for k, v in cfg.items() if k != "preset"}))
            else:
                handle = apply_sparse_attention(model.transformer, SparseAttentionConfig.from_dict(cfg))
            try:
                video = sampler(p, gen, progress=False)
            finally:
                handle.remove()
            stats = handle.stats.summary()
            entries[key] = {"label": label, "prompt": p, "config": cfg, "psnr_vs_dense": psnr(dense[p], video),
                            "keys_removed": stats.get("keys_removed", stats.get("keys_removed_active")),
                            "rows_removed": stats.get("rows_removed", stats.get("rows_removed_active")),
                            "attn_work": stats.get("attn_work", stats.get("attn_work_active"))}
            path.write_text(json.dumps(state, indent=1))
            print(f"e2e {label} | {p}: {entries[key]['psnr_vs_dense']:.2f} dB ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    summary = {}
    for label, _, cfg in e2e_settings(args, thetas, presets):
        xs = [entries[f"{label}|{p}"] for p in prompts if f"{label}|{p}" in entries]
        if xs:
            summary[label] = {"preset": cfg.get("preset"), "prompts": len(xs),
                              "psnr_mean": float(np.mean([x["psnr_vs_dense"] for x in xs])),
                              "psnr_min": float(np.min([x["psnr_vs_dense"] for x in xs])),
                              "keys_removed_mean": float(np.mean([x["keys_removed"] for x in xs])),
                              "rows_removed_mean": float(np.mean([x["rows_removed"] for x in xs])),
                              "attn_work_mean": float(np.mean([x["attn_work"] for x in xs]))}
    state["summary"] = summary
    state["prompts"] = prompts
    path.write_text(json.dumps(state, indent=1))
    return state


# ------------------------------------------------------------------------------------------------ pairing
def _interp(points: list[tuple[float, float]], x: float, log: bool = False) -> float | None:
    pts = sorted(points)
    if len(pts) < 1 or not pts[0][0] <= x <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            f = (x - x0) / (x1 - x0)
            if log and y0 > 0 and y1 > 0:
                return float(math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0))))
            return float(y0 + f * (y1 - y0))
    return float(pts[0][1])  # a single point exactly at x


def pair(op: dict | None, e2e: dict | None, targets: list[float]) -> dict:
    """Per family: its curve; at each target speedup and each TimeRipple point's speedup, interpolated metrics."""
    if not op:
        return {"note": "no op part yet: speedups are measured there, so nothing can be paired at equal speedup"}
    agg = op["aggregate"]
    summ = (e2e or {}).get("summary", {})
    curves = {}
    for fam in FAMILIES:
        pts = []
        for lab, a in agg.items():
            if a["family"] == fam:
                pts.append({"label": lab, "speedup": a["speedup_vs_dense_geomean"],
                            "rel_l2_vs_dense": a["rel_l2_vs_dense_mean"],
                            "psnr_mean": summ.get(lab, {}).get("psnr_mean")})
        curves[fam] = sorted(pts, key=lambda p: p["speedup"])

    def at(s: float) -> dict:
        row = {}
        for fam, pts in curves.items():
            err = _interp([(p["speedup"], p["rel_l2_vs_dense"]) for p in pts], s, log=True)
            ps = _interp([(p["speedup"], p["psnr_mean"]) for p in pts if p["psnr_mean"] is not None], s)
            row[fam] = {"rel_l2_vs_dense": err, "psnr_mean": ps}
        return row

    return {"curves": curves,
            "at_target_speedups": {str(s): at(s) for s in targets},
            "at_timeripple_points": {p["label"]: {"speedup": p["speedup"], **at(p["speedup"])}
                                     for p in curves["timeripple"]}}


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--parts", nargs="+", choices=("op", "e2e"), default=["op", "e2e"])
    p.add_argument("--presets", nargs="*", default=["timeripple-op1.3x-root", "timeripple-op1.5x-root"],
                   help="TimeRipple keys-only 'tokens' presets; their θ join --thetas / --e2e-thetas")
    p.add_argument("--thetas", type=float, nargs="*", default=[0.11, 0.14],
                   help="extra TimeRipple θ (op part) beyond the presets'; the counted baselines match each")
    p.add_argument("--e2e-thetas", type=float, nargs="*", default=[], help="extra θ for the e2e part")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the capture run (op part)")
    p.add_argument("--capture-steps", type=int, nargs="+", default=[10, 15])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 2], help="captured blocks (op part)")
    p.add_argument("--grid", type=int, nargs=3, default=[4, 32, 32], metavar=("T", "H", "W"))
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tile", type=int, nargs=3, default=[1, 8, 8], help="tile of the op part's W2 grid")
    p.add_argument("--windows", nargs="*", default=["4,4,3", "4,3,3", "3,3,3", "4,3,2"],
                   help="tile windows (t,h,w tiles) of the op part")
    p.add_argument("--flex", action="store_true", help="also time compiled flex_attention for the tile windows")
    p.add_argument("--query-pool", type=int, default=64)
    p.add_argument("--noise", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--e2e-steps", type=int, default=50)
    p.add_argument("--prompt-set", default="bench", choices=tuple(prompt_sets()))
    p.add_argument("--e2e-prompts", type=int, default=2)
    p.add_argument("--e2e-tile", type=int, nargs=3, default=[2, 4, 4], help="tile on the embedded grid (8x16x16)")
    p.add_argument("--e2e-windows", nargs="*", default=["4,4,3", "4,3,3", "3,3,3"])
    p.add_argument("--pair-speedups", type=float, nargs="*", default=[1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    command = " ".join([Path(sys.executable).name, Path(__file__).name, *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model == "tiny":
        from vdit_accel.testing import tiny_model

        model = tiny_model()
        presets = {}
    else:
        from vdit_accel.instrument.model import EmbeddedModel

        model = EmbeddedModel.load()
        presets = _preset_thetas(args.presets, args.e2e_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    op_thetas = sorted(set(presets.values()) | set(args.thetas))
    e2e_thetas = sorted(set(presets.values()) | set(args.e2e_thetas))
    t_start = time.perf_counter()
    op = json.loads((args.out / "op.json").read_text()) if (args.out / "op.json").exists() else None
    e2e = json.loads((args.out / "e2e.json").read_text()) if (args.out / "e2e.json").exists() else None
    with torch.inference_mode():
        if "op" in args.parts:
            op = {"command": command, **machine_info(),
                  **op_part(model, args, op_thetas)}
            op["wall_s"] = time.perf_counter() - t_start
            (args.out / "op.json").write_text(json.dumps(op, indent=1))
        if "e2e" in args.parts:
            t0 = time.perf_counter()
            e2e = e2e_part(model, args, e2e_thetas, presets, args.out / "e2e.json")
            e2e["wall_s_last_run"] = time.perf_counter() - t0
            e2e["command_last_run"] = command
            (args.out / "e2e.json").write_text(json.dumps(e2e, indent=1))
    result = {
        "format": FORMAT,
        "command": command,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "presets": presets,
        "note": "op: CPU timings at W2 width (speedup = dense SDPA median / method median, interleaved, one "
                "process); counted baselines remove as many keys (static_rows: query rows) as TimeRipple merges at "
                "the same θ on the same call; e2e: PSNR vs dense (deterministic). Pairing interpolates on each "
                "family's measured curve; null outside its measured speed range.",
        **machine_info(),
        "op": (op or {}).get("aggregate"),
        "e2e": (e2e or {}).get("summary"),
        "pairing": pair(op, e2e, args.pair_speedups),
        "wall_s": time.perf_counter() - t_start,
    }
    (args.out / "timeripple_masking.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"op": result["op"] and {k: round(v["speedup_vs_dense_geomean"], 3)
                                              for k, v in result["op"].items()},
                      "e2e": result["e2e"] and {k: round(v["psnr_mean"], 2) for k, v in result["e2e"].items()}},
                     indent=1))


if __name__ == "__main__":
    main()
