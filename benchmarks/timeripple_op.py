"""Op-level benchmark of TimeRipple's structured variants at Wan2.1-1.3B self-attention width, on CPU.

What it does (every number is computed at run time; nothing is hard-coded):

1. Runs the model (``--model embedded``: the shipped embedded model; ``tiny``: a seeded random one, for smoke runs)
   with TimeRipple at a fixed threshold θ for each ``--thresholds`` value, and captures the post-RoPE q/k/v of the
   cond-branch self-attention calls at ``--capture-steps`` and ``--layers``.
2. For each captured call, computes the element reuse masks there (``reuse_masks`` at θ), and resamples masks and
   values to the W2 setting (``--grid``, ``--heads`` x ``--head-dim``; default 4x32x32 tokens, 12 x 128): tokens by
   nearest window along each axis keeping the position inside the window (so "reusable" stays on non-first
   tokens), heads cyclically, channels by RoPE group (Wan groups of both head dims), pair to pair. Values get
   seeded noise of ``--noise`` times their std so tokens resampled from the same source do not tie by accident:
   the reuse decisions come from the model, not from the noise.
3. At W2 times, interleaved (``--repeats`` rounds, median, one process): dense SDPA (fastest of torch's CPU SDPA
   backends), the exact simulation (resolve Q̃/K̃ + SDPA), ``exact_rows`` and ``token_rows`` at each
   ``--row-fractions``. Decisions are given (timed separately as ``decision_s``: the mask pass on W2 q and k).
   Error: relative L2 and max abs of each output vs the exact simulation's (and vs dense).
   ``--token-thetas``: the ``"tokens"`` variant (``ops.timeripple_tokens``), its decisions taken on the model's
   call and its roots resampled to W2 (``search.calibrate.resampled_roots``), timed *including* the decision pass
   on W2 q and k (``--tokens-only``: only dense and this variant; ``--thresholds 0``: capture on the dense run).
4. ``--e2e``: 50-step generations (``--e2e-steps``, ``--e2e-prompts`` of the quick set, CFG default): each element
   variant at ``--e2e-thresholds`` and each ``"tokens"`` config of ``--e2e-token-specs`` (JSON config fields);
   PSNR and wall-clock speedup vs dense (``--skip-op``: only this).

Writes ``timeripple_op.json`` into ``--out`` with the command, machine info, settings, every per-call record and
per-(θ, variant) aggregates. Timings on a shared machine are provisional.

    # smoke (seconds)
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timeripple_op.py --model tiny --grid 2 8 8 \\
        --heads 2 --head-dim 64 --steps 4 --capture-steps 2 --repeats 2 --out /tmp/tr-op-smoke
    # "tokens" variant: op at W2 incl. decisions, and end to end (minutes)
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timeripple_op.py --model embedded --thresholds 0 \\
        --tokens-only --steps 20 --capture-steps 5 10 15 --layers 0 2 --e2e --e2e-token-specs \\
        '{"fixed_threshold": 0.12, "reuse_q": false}' --out runs/timeripple_tokens
    # the real run (minutes; quiet machine)
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/timeripple_op.py --model embedded \\
        --out runs/timeripple_op
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
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vdit_accel.adapters import resolve_adapter
from vdit_accel.adapters.wan import wan_qkv
from vdit_accel.bench.harness import machine_info, prompt_sets
from vdit_accel.bench.metrics import psnr
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.ops.timeripple import AXES, ReuseMasks, resolve_reuse, reuse_masks, wan_rope_groups, window_delta
from vdit_accel.ops.timeripple_structured import dedup_attention, duplicate_roots, row_masks, row_roots
from vdit_accel.ops.timeripple_tokens import token_decisions, token_dedup_attention
from vdit_accel.search.calibrate import OpGeometry, axis_map, resampled_roots

PRIORITY = "thw"


# ------------------------------------------------------------------------------------------------ capture
class _Capture:
    """Wraps an installed TimeRipple processor; stores post-RoPE q/k/v of selected cond-branch calls."""

    def __init__(self, inner, steps: set[int], store: dict):
        self.inner, self.steps, self.store = inner, steps, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.inner.context.current
        if encoder_hidden_states is None and ctx.branch in ("cond", "default") and ctx.step_index in self.steps:
            q, k, v = wan_qkv(attn, hidden_states, rotary_emb)
            self.store[(ctx.step_index, self.inner.layer)] = dict(
                q=q[:1].detach().clone(), k=k[:1].detach().clone(), v=v[:1].detach().clone(),
                grid=ctx.grid.as_tuple(), text_prefix=ctx.text_prefix, text_suffix=ctx.text_suffix)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def capture(model, prompt: str, theta: float, steps: int, capture_steps: set[int], layers) -> dict:
    cfg = TimeRippleConfig(fixed_threshold=theta, num_steps=steps, i_min=0, i_max=0, layers=layers)
    handle = apply_timeripple(model.transformer, cfg)
    adapter = resolve_adapter(model.transformer)
    store: dict = {}
    try:
        for block in adapter.blocks(model.transformer):
            attn = adapter.self_attention(block)
            proc = attn.get_processor()
            if hasattr(proc, "layer"):
                attn.set_processor(_Capture(proc, capture_steps, store))
        Sampler(model)(prompt, GenerationConfig(steps=steps, guidance=1.0, seed=0), progress=False)
    finally:
        handle.remove()
    return store


# ------------------------------------------------------------------------------------------------ resampling
def _channel_map(d_src: int, d_dst: int) -> torch.Tensor:
    """Destination channel -> source channel, within the same Wan RoPE group, RoPE pair to pair."""
    g_src, g_dst = wan_rope_groups(d_src), wan_rope_groups(d_dst)
    out = torch.empty(d_dst, dtype=torch.long)
    for a in AXES:
        s, d = g_src[a], g_dst[a]
        np_src, np_dst = (s.stop - s.start) // 2, (d.stop - d.start) // 2
        for c in range(d.start, d.stop):
            pair = (c - d.start) // 2
            out[c] = s.start + 2 * (pair * np_src // np_dst) + (c - d.start) % 2
    return out


def resample(rec: dict, theta: float, grid2, heads2: int, d2: int, window: int, noise: float, seed: int):
    """W2 q/k/v and W2 element masks for q and k (decisions taken on the model's call, then resampled)."""
    grid, pre = rec["grid"], rec["text_prefix"]
    h_src, d_src = rec["q"].shape[2], rec["q"].shape[3]
    maps = [axis_map(grid[a], grid2[a], window) for a in range(3)]
    tok = (maps[0].view(-1, 1, 1) * grid[1] * grid[2] + maps[1].view(1, -1, 1) * grid[2]
           + maps[2].view(1, 1, -1)).flatten() + pre
    head = torch.arange(heads2) % h_src
    chan = _channel_map(d_src, d2)
    g = torch.Generator().manual_seed(seed)

    def values(x):
        x = x.float()[:, tok][:, :, head][..., chan]
        return x + noise * x.std() * torch.randn(x.shape, generator=g)

    def masks(x):
        m = reuse_masks(x.float(), grid, theta, window=window, text_prefix=pre, text_suffix=rec["text_suffix"])
        per_axis, delta, anchor = {}, {}, {}
        for a in AXES:
            _, anc, valid = window_delta(torch.zeros(1, math.prod(grid2), 1, 1), grid2, a, window)
            per_axis[a] = m.per_axis[a][:, tok][:, :, head][..., chan] & valid.view(1, -1, 1, 1)
            delta[a] = m.delta[a][:, tok][:, :, head][..., chan]
            anchor[a] = anc
        return ReuseMasks(per_axis, delta, anchor)

    return (values(rec["q"]), values(rec["k"]), values(rec["v"])), masks(rec["q"]), masks(rec["k"])


# ------------------------------------------------------------------------------------------------ timing
def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sdpa_math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return _sdpa(q, k, v)


def _token_rows(q, k, v, qm, km):
    return dedup_attention(q, k, v, row_roots(qm, PRIORITY), row_roots(km, PRIORITY))


def _structured(q, k, v, qm, km):
    qt, kt = resolve_reuse(q, qm, priority=PRIORITY), resolve_reuse(k, km, priority=PRIORITY)
    order = [qm.anchor[a] for a in PRIORITY]
    return dedup_attention(qt, kt, v, duplicate_roots(qt, order), duplicate_roots(kt, order))


def time_call(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Interleaved repeats (rotating order), median seconds per name; also each fn's last output."""
    times = {name: [] for name in fns}
    outs = {}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            outs[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: float(np.median(t)) for n, t in times.items()}, outs


def _err(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"rel_l2": float((a - b).norm() / b.norm()), "max_abs": float((a - b).abs().max())}


def bench_call(rec, theta, args) -> dict:
    (q, k, v), qm, km = resample(rec, theta, tuple(args.grid), args.heads, args.head_dim, args.window, args.noise,
                                 args.seed)
    t0 = time.perf_counter()
    reuse_masks(q, tuple(args.grid), theta, window=args.window)
    reuse_masks(k, tuple(args.grid), theta, window=args.window)
    decision_s = time.perf_counter() - t0
    variants = {"exact_rows": (qm, km)}
    variants.update({f"token_rows@{rf}": (row_masks(qm, rf), row_masks(km, rf)) for rf in args.row_fractions})
    fns = {
        "dense_flash": lambda: _sdpa(q, k, v),
        "dense_math": lambda: _sdpa_math(q, k, v),
        "exact_sim": lambda: _sdpa(resolve_reuse(q, qm, priority=PRIORITY), resolve_reuse(k, km, priority=PRIORITY),
                                   v),
    }
    for name, (a, b) in variants.items():
        op = _token_rows if name.startswith("token_rows") else _structured
        fns[name] = lambda a=a, b=b, op=op: op(q, k, v, a, b)
    med, outs = time_call(fns, args.repeats)
    dense_name = min(("dense_flash", "dense_math"), key=med.get)
    dense_s, sim, dense = med[dense_name], outs["exact_sim"], outs[dense_name]
    row = {"dense_backend": dense_name, "dense_s": dense_s, "decision_s": decision_s,
           "q_reuse": float(qm.any.float().mean()), "k_reuse": float(km.any.float().mean()),
           "variants": {"exact_sim": {"time_s": med["exact_sim"], "speedup_vs_dense": dense_s / med["exact_sim"],
                                      "rows_removed": 0.0, "keys_removed": 0.0, "attn_work": 1.0,
                                      "err_vs_exact_sim": _err(sim, sim), "err_vs_dense": _err(sim, dense)}}}
    for name, (a, b) in variants.items():
        out, st = outs[name]
        row["variants"][name] = {
            "time_s": med[name], "speedup_vs_dense": dense_s / med[name],
            "speedup_vs_dense_incl_decision": dense_s / (med[name] + decision_s),
            "rows_removed": st.rows_removed, "keys_removed": st.keys_removed, "attn_work": st.attn_work,
            "q_reuse": float(a.any.float().mean()), "k_reuse": float(b.any.float().mean()),
            "err_vs_exact_sim": _err(out, sim), "err_vs_dense": _err(out, dense),
        }
    return row


def bench_tokens(rec, args) -> dict:
    """The "tokens" variant at W2: decisions taken on the model's call (relative spread, q and k together),
    roots resampled to W2, timed *with* the decision pass on W2 q and k, vs dense SDPA; errors vs dense."""
    grid2, geo = tuple(args.grid), OpGeometry(tuple(args.grid), args.heads, args.head_dim)
    cfg = TimeRippleConfig(variant="tokens", window=args.window)
    g = torch.Generator().manual_seed(args.seed)
    shape = (1, math.prod(grid2), args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    (qr, kr, vr), _, _ = resample(rec, 0.0, grid2, args.heads, args.head_dim, args.window, args.noise, args.seed)
    out: dict = {}
    for theta in args.token_thetas:
        sides = [rec["k"].float()] if args.token_keys_only else [rec["q"].float(), rec["k"].float()]
        dec = token_decisions(sides, rec["grid"], theta, window=args.window,
                              text_prefix=rec["text_prefix"], text_suffix=rec["text_suffix"])
        root = resampled_roots({"spread": dec.spread, "grid": rec["grid"], "text_prefix": rec["text_prefix"]},
                               theta, geo, cfg)

        qroot = None if args.token_keys_only else root

        def variant(root=root, theta=theta, qroot=qroot):
            token_decisions([k] if qroot is None else [q, k], grid2, theta, window=args.window)
            return token_dedup_attention(q, k, v, qroot, root)

        med, _ = time_call({"dense": lambda: _sdpa(q, k, v), "tokens": variant}, args.repeats)
        t0 = time.perf_counter()
        token_decisions([k] if qroot is None else [q, k], grid2, theta, window=args.window)
        decision_s = time.perf_counter() - t0
        o, st = token_dedup_attention(qr, kr, vr, qroot, root)  # error on the resampled model values
        dense = _sdpa(qr, kr, vr)
        out[str(theta)] = {"dense_s": med["dense"], "time_s_incl_decision": med["tokens"], "decision_s": decision_s,
                           "speedup_vs_dense_incl_decision": med["dense"] / med["tokens"],
                           "model_call_reused": dec.reused, "rows_removed": st.rows_removed,
                           "keys_removed": st.keys_removed,
                           "attn_work": st.attn_work, "err_vs_dense": _err(o, dense)}
    return out


def aggregate(records: list[dict]) -> dict:
    out: dict = {}
    for theta in sorted({r["theta"] for r in records}):
        rs = [r for r in records if r["theta"] == theta]
        out[str(theta)] = {}
        for name in rs[0]["variants"]:
            vs = [r["variants"][name] for r in rs]
            out[str(theta)][name] = {
                "speedup_vs_dense_geomean": float(np.exp(np.mean([np.log(x["speedup_vs_dense"]) for x in vs]))),
                "rows_removed_mean": float(np.mean([x["rows_removed"] for x in vs])),
                "keys_removed_mean": float(np.mean([x["keys_removed"] for x in vs])),
                "attn_work_mean": float(np.mean([x["attn_work"] for x in vs])),
                "rel_l2_vs_exact_sim_mean": float(np.mean([x["err_vs_exact_sim"]["rel_l2"] for x in vs])),
                "rel_l2_vs_dense_mean": float(np.mean([x["err_vs_dense"]["rel_l2"] for x in vs])),
                "calls": len(vs),
            }
        for t in sorted({t for r in rs for t in r.get("tokens", {})}):
            xs = [r["tokens"][t] for r in rs if t in r.get("tokens", {})]
            out[str(theta)][f"tokens@{t}"] = {
                "speedup_vs_dense_incl_decision_geomean": float(np.exp(np.mean(
                    [np.log(x["speedup_vs_dense_incl_decision"]) for x in xs]))),
                "decision_share_of_dense": float(np.mean([x["decision_s"] / x["dense_s"] for x in xs])),
                "rows_removed_mean": float(np.mean([x["rows_removed"] for x in xs])),
                "keys_removed_mean": float(np.mean([x["keys_removed"] for x in xs])),
                "attn_work_mean": float(np.mean([x["attn_work"] for x in xs])),
                "rel_l2_vs_dense_mean": float(np.mean([x["err_vs_dense"]["rel_l2"] for x in xs])),
                "calls": len(xs),
            }
        out[str(theta)]["q_reuse_mean"] = float(np.mean([r["q_reuse"] for r in rs]))
        out[str(theta)]["k_reuse_mean"] = float(np.mean([r["k_reuse"] for r in rs]))
    return out


def _e2e_configs(args) -> list[tuple[str, dict]]:
    runs = []
    for theta in args.e2e_thresholds:
        for variant in args.e2e_variants:
            if variant == "token_rows":
                runs += [(variant, dict(fixed_threshold=theta, variant=variant, row_fraction=rf))
                         for rf in args.row_fractions]
            elif variant != "tokens":
                runs.append((variant, dict(fixed_threshold=theta, variant=variant)))
    for spec in args.e2e_token_specs:  # JSON TimeRippleConfig fields for the "tokens" variant
        runs.append(("tokens", dict(variant="tokens", **json.loads(spec))))
    return runs


def e2e(model, prompts: list[str], args) -> dict:
    """Per config: PSNR vs dense and wall-clock speedup vs dense (interleaved per prompt; provisional on a shared
    machine). A config without ``fixed_threshold`` uses its schedule at ``--e2e-steps``."""
    gen = GenerationConfig(steps=args.e2e_steps, seed=0)
    sampler = Sampler(model)
    sampler(prompts[0], GenerationConfig(steps=2, seed=0), progress=False)  # warm-up
    res = {"steps": args.e2e_steps, "guidance": sampler.guidance(gen), "prompts": prompts, "runs": []}
    dense, dense_s = {}, {}
    for p in prompts:
        t0 = time.perf_counter()
        dense[p] = sampler(p, gen, progress=False)
        dense_s[p] = time.perf_counter() - t0
    res["dense_s"] = dense_s
    for variant, kw in _e2e_configs(args):
        kw = {"num_steps": args.e2e_steps, "i_min": 0, "i_max": 0, **kw}
        cfg = TimeRippleConfig(**kw)
        per = []
        for p in prompts:
            handle = apply_timeripple(model.transformer, cfg)
            try:
                t0 = time.perf_counter()
                video = sampler(p, gen, progress=False)
                wall = time.perf_counter() - t0
            finally:
                handle.remove()
            per.append({"prompt": p, "psnr_vs_dense": psnr(dense[p], video), "wall_s": wall,
                        "speedup_vs_dense": dense_s[p] / wall, "stats": handle.stats.summary()})
        row = {"variant": variant, "config": {k: v for k, v in kw.items()}, "per_prompt": per,
               "psnr_mean": float(np.mean([x["psnr_vs_dense"] for x in per])),
               "psnr_min": float(np.min([x["psnr_vs_dense"] for x in per])),
               "speedup_geomean": float(np.exp(np.mean([np.log(x["speedup_vs_dense"]) for x in per])))}
        res["runs"].append(row)
        print(f"e2e {variant} {kw}: PSNR {row['psnr_mean']:.2f} dB, {row['speedup_geomean']:.2f}x", flush=True)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.5, 1.0])
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the capture runs")
    p.add_argument("--capture-steps", type=int, nargs="+", default=[5, 10, 15])
    p.add_argument("--layers", type=int, nargs="+", default=None, help="captured blocks (default: all)")
    p.add_argument("--grid", type=int, nargs=3, default=[4, 32, 32], metavar=("T", "H", "W"))
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--row-fractions", type=float, nargs="+", default=[0.9, 0.75, 0.5])
    p.add_argument("--noise", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    p.add_argument("--e2e", action="store_true", help="also run end-to-end PSNR vs dense per variant")
    p.add_argument("--e2e-steps", type=int, default=50)
    p.add_argument("--e2e-thresholds", type=float, nargs="*", default=[],
                   help="fixed element θ for --e2e-variants (exact_sim, exact_rows, token_rows)")
    p.add_argument("--e2e-variants", nargs="*", default=["exact_sim", "exact_rows", "token_rows"])
    p.add_argument("--e2e-token-specs", nargs="*", default=['{"fixed_threshold": 0.15}'],
                   help='"tokens" configs as JSON TimeRippleConfig fields, e.g. \'{"fixed_threshold": 0.15, '
                        '"reuse_q": false}\'')
    p.add_argument("--e2e-prompts", type=int, default=1, help="first N prompts of the quick set")
    p.add_argument("--token-thetas", type=float, nargs="*", default=[0.1, 0.15, 0.2],
                   help="relative θ of the 'tokens' variant timed at W2 (decision time included)")
    p.add_argument("--token-keys-only", action="store_true",
                   help="'tokens' op timing with reuse_q=False (decisions from k, keys merged, every query computed)")
    p.add_argument("--tokens-only", action="store_true", help="time only dense and the 'tokens' variant")
    p.add_argument("--skip-op", action="store_true", help="no op timing (only --e2e)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model == "tiny":
        from vdit_accel.testing import tiny_model

        model = tiny_model()
    else:
        from vdit_accel.instrument.model import EmbeddedModel

        model = EmbeddedModel.load()
    prompt = prompt_sets()["quick"][0]
    if args.skip_op:
        args.thresholds = []
    records = []
    t_start = time.perf_counter()
    with torch.inference_mode():
        for theta in args.thresholds:
            store = capture(model, prompt, theta, args.steps, set(args.capture_steps), args.layers)
            for (step, layer), rec in sorted(store.items()):
                row = bench_call(rec, theta, args) if not args.tokens_only else {"variants": {}, "q_reuse": 0.0,
                                                                                    "k_reuse": 0.0}
                if args.token_thetas:
                    row["tokens"] = bench_tokens(rec, args)
                records.append({"theta": theta, "step": step, "layer": layer, "source_grid": list(rec["grid"]),
                                "source_heads_x_dim": list(rec["q"].shape[2:]), **row})
                print(f"theta={theta} step={step} layer={layer} " + " ".join(
                    f"tokens@{t}={x['speedup_vs_dense_incl_decision']:.2f}x/{x['err_vs_dense']['rel_l2']:.1e}"
                    for t, x in row.get("tokens", {}).items()) + " " + " ".join(
                    f"{n}={x['speedup_vs_dense']:.2f}x/{x['err_vs_exact_sim']['rel_l2']:.1e}"
                    for n, x in row["variants"].items()), flush=True)
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "prompt": prompt,
            "note": "CPU timings; provisional unless run on a quiet machine. speedup = dense SDPA median / variant "
                    "median (decisions given); errors vs the exact simulation's output on the same q/k/v.",
            **machine_info(),
            "aggregate": aggregate(records) if records else {},
            "records": records,
        }
        if args.e2e:
            result["e2e"] = e2e(model, prompt_sets()["quick"][: args.e2e_prompts], args)
    result["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timeripple_op.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["aggregate"], indent=1))


if __name__ == "__main__":
    main()
