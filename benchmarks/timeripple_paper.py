"""Reproduce the TimeRipple paper's analysis experiments (Fig. 5, 7, 8 and the Table 3 ablations) on our model.

Every number and figure is computed here, from the model, at run time; nothing is hard-coded. Each experiment
writes ``<name>.json`` (the exact command line, settings, what was subsampled, and every number) and ``<name>.png``
(fig5 also writes ``fig5.gif``) into ``--out``.

Experiments (definitions; see each function's docstring for the exact computation):

* ``fig7``: reuse vs masking at equal QK savings, on captured post-RoPE q/k/v of real self-attention calls.
* ``fig8``: single-call induced error at a fixed 50% Q/K reuse ratio, per step and prompt (step vs prompt
  sensitivity), with the coefficient of variation across prompts and across steps.
* ``fig5``: adversarial RoPE-group reuse (odd latent frames copy one whole t / h / w channel group of q and k from
  the previous latent frame), end to end, with PSNR vs dense and temporal / stripe artifact measures.
* ``ablations``: window K, threshold mode, fixed vs step-sensitive threshold, temporal-only vs full, each calibrated
  to the same QK savings as the reference (step-sensitive, shared θ, K=2, full axes, target 0.75).

Commands (run from the repository root):

    # smoke (random tiny model, seconds; what tests/test_timeripple_paper_smoke.py runs)
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timeripple_paper.py \\
        --model tiny --steps 6 --prompts 2 --out /tmp/timeripple-smoke

    # the real runs on the shipped embedded model, one experiment at a time
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/timeripple_paper.py \\
        --model embedded --experiments fig7 --out docs/results/timeripple
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/timeripple_paper.py \\
        --model embedded --experiments fig8 --out docs/results/timeripple
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/timeripple_paper.py \\
        --model embedded --experiments fig5 --out docs/results/timeripple
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python benchmarks/timeripple_paper.py \\
        --model embedded --experiments ablations --ablation-steps 20 --out docs/results/timeripple

QK savings is the fraction of Q·Kᵀ channel products that reuse makes unnecessary (counted analytically from the
reuse masks); it is never a speedup: the implementation simulates the reuse exactly and runs dense attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vdit_accel.adapters import resolve_adapter  # noqa: E402
from vdit_accel.adapters.wan import wan_attention_output, wan_qkv  # noqa: E402
from vdit_accel.bench.harness import machine_info, prompt_sets  # noqa: E402
from vdit_accel.bench.metrics import psnr, ssim  # noqa: E402
from vdit_accel.bench.records import command_line, json_clean  # noqa: E402
from vdit_accel.context import acquire_context, release_context  # noqa: E402
from vdit_accel.errors import ConfigError  # noqa: E402
from vdit_accel.instrument.sampler import GenerationConfig, Sampler  # noqa: E402
from vdit_accel.instrument.video import to_frames, write_video  # noqa: E402
from vdit_accel.methods.timeripple import TimeRippleConfig, TimeRippleProcessor  # noqa: E402
from vdit_accel.ops.timeripple import (  # noqa: E402
    ReuseMasks,
    reuse_masks,
    reuse_stats,
    timeripple_attention,
)
from vdit_accel.search.calibrate import THETA_CEILING, calibrate_timeripple, measure_savings  # noqa: E402

EXPERIMENTS = ("fig7", "fig8", "fig5", "ablations")
FIG7_SAVINGS = (0.5, 0.75, 0.85)
FIG7_STEP_FRACTIONS = (0.2, 0.4, 0.6, 0.8)  # steps {10, 20, 30, 40} at 50 steps
FIG8_REUSE = 0.5
ABLATION_TARGET = 0.75
ABLATION_TOLERANCE = 0.02
RESULTS_FORMAT = "vdit-accel/timeripple-paper"


# ----------------------------------------------------------------------------------------------------------------
# shared infrastructure
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    """What every experiment needs: the model, its sampler, the run settings and where to write."""

    model_kind: str
    model: torch.nn.Module
    sampler: Sampler
    steps: int
    guidance: float
    seed: int
    n_prompts: int
    out: Path
    args: argparse.Namespace
    prompts: list[str]
    prompt_source: str

    def gen(self, **kw) -> GenerationConfig:
        return GenerationConfig(steps=self.steps, guidance=self.guidance, seed=self.seed).replace(**kw)


def load_model(kind: str):
    if kind == "tiny":
        from vdit_accel.testing import tiny_model

        return tiny_model()
    from vdit_accel.instrument.model import EmbeddedModel

    return EmbeddedModel.load()


HELDOUT_SOURCE = "vdit_accel.bench.harness.prompt_sets()['heldout']"
METRICS_SOURCE = "vdit_accel.bench.metrics"


def write_json(env: Env, name: str, settings: dict, results: dict, subsampled: dict, wall_s: float,
               files: list[str]) -> Path:
    mc = env.model.config
    doc = {
        "format": RESULTS_FORMAT,
        "experiment": name,
        "command": command_line(__file__, env.args.argv),
        "argv": list(env.args.argv),
        "invoked": env.args.invoked,
        "cwd": os.getcwd(),
        "model": {"kind": env.model_kind, "model_id": mc.model_id, "geometry": [mc.frames, mc.height, mc.width],
                  "patch_size": list(mc.patch_size), "layers": mc.num_layers, "heads": mc.num_heads,
                  "head_dim": mc.head_dim},
        "generation": {"steps": env.steps, "guidance": env.guidance, "seed": env.seed},
        "prompt_source": env.prompt_source,
        "settings": settings,
        "subsampled": subsampled,
        "results": results,
        "files": files,
        "wall_s": round(wall_s, 2),
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
    }
    path = env.out / f"{name}.json"
    path.write_text(json.dumps(json_clean(doc), indent=1, allow_nan=False))
    return path


class _SelfAttnProcessor:
    """Base for our stock-equivalent Wan self-attention processors (reads the per-call context)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, original, context) -> None:
        self.layer, self.original, self.context = layer, original, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        ctx = self.context.current
        q, k, v = wan_qkv(attn, hidden_states, rotary_emb)
        q, k, v = self.transform(ctx, q, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        self.observe(ctx, q, k, v, out)
        return wan_attention_output(attn, out, q)

    def transform(self, ctx, q, k, v):
        return q, k, v

    def observe(self, ctx, q, k, v, out) -> None:
        pass


class TapProcessor(_SelfAttnProcessor):
    """Dense attention that hands every call's post-RoPE q, k, v and output to ``fn(layer, ctx, q, k, v, out)``."""

    def __init__(self, layer, original, context, fn) -> None:
        super().__init__(layer, original, context)
        self.fn = fn

    def observe(self, ctx, q, k, v, out) -> None:
        self.fn(self.layer, ctx, q, k, v, out)


class GroupCopyProcessor(_SelfAttnProcessor):
    """Fig. 5 adversarial reuse: odd latent frames take one whole RoPE channel group of q and k (all tokens, all
    heads) from the previous latent frame, at every step and in both CFG branches."""

    def __init__(self, layer, original, context, group: slice) -> None:
        super().__init__(layer, original, context)
        self.group = group

    def transform(self, ctx, q, k, v):
        t = ctx.grid.t
        if t < 2:
            return q, k, v
        n = ctx.grid.tokens

        def copy(x):
            x = x.clone()
            vid = x[:, ctx.text_prefix: ctx.text_prefix + n].unflatten(1, ctx.grid.as_tuple())  # view into x
            vid[:, 1::2, ..., self.group] = vid[:, 0: t - 1: 2, ..., self.group]
            return x

        return copy(q), copy(k), v


@contextmanager
def patched_self_attention(transformer, factory):
    """Install ``factory(layer, original, context)`` on every video self-attention module; restore on exit."""
    adapter = resolve_adapter(transformer)
    context = acquire_context(transformer, adapter)
    restore = []
    try:
        for i, block in enumerate(adapter.blocks(transformer)):
            attn = adapter.self_attention(block)
            original = attn.get_processor()
            attn.set_processor(factory(i, original, context))
            restore.append((attn, original))
        yield context
    finally:
        for attn, original in restore:
            attn.set_processor(original)
        release_context(transformer)


def dense_attention(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def masks_at(inf_masks: ReuseMasks, theta: float) -> ReuseMasks:
    """The masks ``reuse_masks(x, grid, theta)`` would return, from the θ = ∞ masks (Δ does not depend on θ)."""
    return ReuseMasks({a: m & (inf_masks.delta[a] < theta) for a, m in inf_masks.per_axis.items()},
                      inf_masks.delta, inf_masks.anchor)


def min_valid_delta(inf_masks: ReuseMasks) -> torch.Tensor:
    """Per element, the smallest Δ over the axes along which it is reusable (inf where it is reusable on none):
    the element is reused at shared θ exactly when this is < θ."""
    return torch.stack([torch.where(m, inf_masks.delta[a], float("inf"))
                        for a, m in inf_masks.per_axis.items()]).amin(0)


def pick_steps(steps: int, fractions) -> list[int]:
    return sorted({min(steps - 1, max(0, round(f * steps))) for f in fractions})


def short(prompt: str, n: int = 38) -> str:
    return prompt if len(prompt) <= n else prompt[: n - 1] + "…"


# ----------------------------------------------------------------------------------------------------------------
# fig7: reuse vs masking at equal savings
# ----------------------------------------------------------------------------------------------------------------


def bisect_theta(q_inf: ReuseMasks, k_inf: ReuseMasks, target: float, iterations: int = 40) -> tuple[float, float]:
    """Shared θ whose QK savings (reuse_stats of this call's own masks) is closest to ``target``; (θ, savings)."""
    top = max(float(d[m].max()) if m.any() else 0.0
              for masks in (q_inf, k_inf) for m, d in ((masks.per_axis[a], masks.delta[a]) for a in masks.axes))
    lo, hi = 0.0, top * (1 + 1e-6) + 1e-12
    s_lo, s_hi = 0.0, reuse_stats(masks_at(q_inf, hi), masks_at(k_inf, hi)).qk_savings
    if s_hi <= target:
        return hi, s_hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        s = reuse_stats(masks_at(q_inf, mid), masks_at(k_inf, mid)).qk_savings
        if s < target:
            lo, s_lo = mid, s
        else:
            hi, s_hi = mid, s
    return (lo, s_lo) if abs(s_lo - target) < abs(s_hi - target) else (hi, s_hi)


def mask_smallest_scores(q, k, v, fraction: float) -> tuple[torch.Tensor, float]:
    """Masking baseline: per (batch, head), the ``fraction`` of score entries with the smallest |S_ij| are set to 0
    (their partial products are skipped: "reusing zero") before softmax. Returns (output, fraction masked)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bihc,bjhc->bhij", q.float(), k.float()) * scale  # [B, H, S, S]
    flat = scores.abs().flatten(2)
    m = round(fraction * flat.shape[-1])
    if m == 0:
        mask = torch.zeros_like(scores, dtype=torch.bool)
    else:
        kth = flat.kthvalue(m, dim=-1).values  # [B, H]
        mask = scores.abs() <= kth[..., None, None]
    out = torch.einsum("bhij,bjhe->bihe", scores.masked_fill(mask, 0.0).softmax(-1), v.float())
    return out.to(v.dtype), float(mask.float().mean())


def fig7(env: Env) -> dict:
    """Attention-output MSE vs dense of TimeRipple reuse and two skipping baselines at equal QK savings.

    Capture: one dense generation per prompt (``min(2, --prompts)`` held-out prompts, seed ``--seed``) with a tap
    processor; keep post-RoPE q, k, v of every self-attention call of the cond branch at steps
    round({0.2, 0.4, 0.6, 0.8}·steps) in every layer. For each capture and target savings s in {0.5, 0.75, 0.85}:

    * TimeRipple (K=2, axes t,h,w, priority thw): the shared θ whose QK savings on this call's own q/k is closest to s
      (40-step bisection on reuse_stats of reuse_masks), then ``timeripple_attention``; s* = its QK savings.
    * mask_scores: the fraction s* of score entries with the smallest |S_ij| (per head) set to 0 before softmax.
    * sim_skip: the elements TimeRipple reuses (Δ < θ: per token, exactly the elements with the smallest Δ to a
      window neighbour, as many as TimeRipple reuses) are set to 0 in q and k instead of copied: their partial
      scores are skipped. Same skipped products as TimeRipple, so QK savings is s* by construction.

    MSE = mean squared difference of the attention output [B, S, H, D] vs dense attention on the same q, k, v.
    """
    prompts = env.prompts[: min(2, env.n_prompts)]
    steps_kept = pick_steps(env.steps, FIG7_STEP_FRACTIONS)
    captures = []
    t0 = time.perf_counter()
    for pi, prompt in enumerate(prompts):
        def keep(layer, ctx, q, k, v, out, pi=pi):
            if ctx.branch == "cond" and ctx.step_index in steps_kept:
                captures.append(dict(prompt=pi, step=ctx.step_index, layer=layer, grid=ctx.grid.as_tuple(),
                                     q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone()))

        with patched_self_attention(env.model.transformer, lambda i, o, c: TapProcessor(i, o, c, keep)):
            env.sampler(prompt, env.gen(), progress=False)
    capture_s = time.perf_counter() - t0

    records = []
    for cap in captures:
        q, k, v, grid = cap["q"], cap["k"], cap["v"], cap["grid"]
        dense = dense_attention(q, k, v)
        var = float(dense.double().var())
        q_inf, k_inf = reuse_masks(q, grid, float("inf")), reuse_masks(k, grid, float("inf"))
        for s in FIG7_SAVINGS:
            theta, s_bis = bisect_theta(q_inf, k_inf, s)
            out_tr, st = timeripple_attention(q, k, v, grid=grid, thresholds=theta)
            if abs(st.qk_savings - s_bis) > 1e-9:
                raise RuntimeError(f"bisection masks disagree with reuse_masks: {s_bis} vs {st.qk_savings}")
            out_mask, masked = mask_smallest_scores(q, k, v, st.qk_savings)
            qm, km = masks_at(q_inf, theta).any, masks_at(k_inf, theta).any
            out_skip = dense_attention(q.masked_fill(qm, 0.0), k.masked_fill(km, 0.0), v)
            e = {"timeripple": mse(out_tr, dense), "mask_scores": mse(out_mask, dense),
                 "sim_skip": mse(out_skip, dense)}
            records.append({
                "prompt": cap["prompt"], "step": cap["step"], "layer": cap["layer"], "target": s,
                "theta": theta, "qk_savings": st.qk_savings, "q_reuse": st.q_reuse, "k_reuse": st.k_reuse,
                "masked_fraction": masked, "dense_var": var, "mse": e,
                "ratio_mask_over_timeripple": e["mask_scores"] / max(e["timeripple"], 1e-30),
                "ratio_simskip_over_timeripple": e["sim_skip"] / max(e["timeripple"], 1e-30),
            })
    methods = ("timeripple", "mask_scores", "sim_skip")
    summary = {}
    for s in FIG7_SAVINGS:
        rs = [r for r in records if r["target"] == s]
        row = {"achieved_qk_savings_mean": float(np.mean([r["qk_savings"] for r in rs])),
               "achieved_qk_savings_min": float(np.min([r["qk_savings"] for r in rs])),
               "achieved_qk_savings_max": float(np.max([r["qk_savings"] for r in rs])),
               "calls": len(rs)}
        for m in methods:
            vals = np.array([r["mse"][m] for r in rs])
            row[f"mse_mean_{m}"] = float(vals.mean())
            row[f"mse_median_{m}"] = float(np.median(vals))
            row[f"nmse_mean_{m}"] = float(np.mean([r["mse"][m] / r["dense_var"] for r in rs]))
        for key, name in (("ratio_mask_over_timeripple", "mask"), ("ratio_simskip_over_timeripple", "simskip")):
            ratios = np.array([r[key] for r in rs])
            row[f"{name}_over_timeripple_geomean"] = float(np.exp(np.log(ratios).mean()))
            row[f"{name}_over_timeripple_median"] = float(np.median(ratios))
            row[f"{name}_over_timeripple_min"] = float(ratios.min())
        row["mask_over_timeripple_of_means"] = row["mse_mean_mask_scores"] / max(row["mse_mean_timeripple"], 1e-30)
        row["timeripple_best_fraction_of_calls"] = float(np.mean(
            [r["mse"]["timeripple"] <= min(r["mse"]["mask_scores"], r["mse"]["sim_skip"]) for r in rs]))
        summary[f"{s:g}"] = row

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"timeripple": "C0", "mask_scores": "C3", "sim_skip": "C2"}
    labels = {"timeripple": "TimeRipple reuse", "mask_scores": "mask smallest |S| (set 0)",
              "sim_skip": "similarity-selected skip (set 0)"}
    for m in methods:
        xs = [r["qk_savings"] for r in records]
        axes[0].scatter(xs, [r["mse"][m] for r in records], s=8, alpha=0.35, color=colors[m])
        axes[0].plot(FIG7_SAVINGS, [summary[f"{s:g}"][f"mse_mean_{m}"] for s in FIG7_SAVINGS], "o-",
                     color=colors[m], label=labels[m])
    axes[0].set_yscale("log")
    axes[0].set_xlabel("QK savings of the call")
    axes[0].set_ylabel("attention-output MSE vs dense")
    axes[0].set_title("Fig. 7: reuse vs skipping at equal savings")
    axes[0].legend(fontsize=8)
    pos = np.arange(len(FIG7_SAVINGS))
    for off, key, m in ((-0.15, "ratio_mask_over_timeripple", "mask_scores"),
                        (0.15, "ratio_simskip_over_timeripple", "sim_skip")):
        data = [[r[key] for r in records if r["target"] == s] for s in FIG7_SAVINGS]
        bp = axes[1].boxplot(data, positions=pos + off, widths=0.25, patch_artist=True, showfliers=True)
        for patch in bp["boxes"]:
            patch.set_facecolor(colors[m])
            patch.set_alpha(0.5)
    axes[1].axhline(10, color="gray", ls="--", lw=0.8)
    axes[1].axhline(1, color="k", lw=0.6)
    axes[1].set_xticks(pos, [f"{s:g}" for s in FIG7_SAVINGS])
    axes[1].set_yscale("log")
    axes[1].set_xlabel("target QK savings")
    axes[1].set_ylabel("MSE ratio baseline / TimeRipple (per call)")
    axes[1].set_title("red: mask scores, green: sim. skip; dashed: 10x")
    fig.tight_layout()
    fig.savefig(env.out / "fig7.png", dpi=120)
    plt.close(fig)

    settings = {"targets": list(FIG7_SAVINGS), "window": 2, "axes": ["t", "h", "w"], "priority": "thw",
                "threshold": "shared θ per call, bisection (40 iterations) on the call's own q/k",
                "prompts": prompts, "steps_captured": steps_kept, "branch": "cond",
                "masking": "per (batch, head): kthvalue of |S_ij| over the whole S x S map; entries <= it set to 0",
                "equal_savings": "both baselines skip the fraction s* = TimeRipple's achieved QK savings of that call",
                "capture_generation_s": round(capture_s, 2)}
    subsampled = {"calls": f"cond branch only, steps {steps_kept} of {env.steps}, all {env.model.config.num_layers} "
                           f"layers, {len(prompts)} prompt(s): {len(captures)} of "
                           f"{env.steps * 2 * env.model.config.num_layers * len(prompts)} self-attention calls",
                  "query_rows": "none (full S x S score matrices)"}
    return {"settings": settings, "subsampled": subsampled, "results": {"summary": summary, "calls": records},
            "files": ["fig7.png"]}


# ----------------------------------------------------------------------------------------------------------------
# fig8: step vs prompt sensitivity
# ----------------------------------------------------------------------------------------------------------------


def fixed_ratio_theta(q_inf: ReuseMasks, k_inf: ReuseMasks, ratio: float) -> float:
    """Shared θ reusing ``ratio`` of all q and k elements of this call: the quantile of the valid Δ values (the
    per-element minimum over the axes along which it may reuse), just above the k-th smallest."""
    d = torch.cat([min_valid_delta(q_inf).flatten(), min_valid_delta(k_inf).flatten()])
    n = round(ratio * d.numel())
    if n == 0:
        return 0.0
    kth = float(d.kthvalue(n).values)
    return float(np.nextafter(np.float32(kth), np.float32(np.inf))) if math.isfinite(kth) else THETA_CEILING


def fig8(env: Env) -> dict:
    """Induced error of one TimeRipple call at a fixed reuse ratio, per (prompt, step, layer).

    For each of ``--prompts`` held-out prompts (seed ``--seed``), a dense generation with a tap processor; at every
    ``--fig8-stride``-th step, in every layer (cond branch), the call's θ is the quantile of its valid Δ values that
    makes 50% of its q and k elements reused (shared θ, K=2, axes t,h,w); the error is
    MSE(timeripple_attention, dense attention) / Var(dense attention output), on the dense trajectory.
    E[p, s] = mean over layers. CV across prompts = mean over steps of std_p E / mean_p E; CV across steps = mean over
    prompts of std_s E / mean_s E (population std). Also the shares of the variance of log E explained by the step
    and by the prompt main effects (two-way decomposition).
    """
    prompts = env.prompts[: env.n_prompts]
    stride = env.args.fig8_stride
    steps_kept = list(range(0, env.steps, stride))
    n_layers = env.model.config.num_layers
    err = np.full((len(prompts), len(steps_kept), n_layers), np.nan)
    reuse = np.full_like(err, np.nan)
    sav = np.full_like(err, np.nan)
    t0 = time.perf_counter()
    for pi, prompt in enumerate(prompts):
        def measure(layer, ctx, q, k, v, out, pi=pi):
            if ctx.branch != "cond" or ctx.step_index not in steps_kept:
                return
            grid = ctx.grid.as_tuple()
            q_inf, k_inf = reuse_masks(q, grid, float("inf")), reuse_masks(k, grid, float("inf"))
            theta = fixed_ratio_theta(q_inf, k_inf, FIG8_REUSE)
            out_tr, st = timeripple_attention(q, k, v, grid=grid, thresholds=theta)
            si = steps_kept.index(ctx.step_index)
            err[pi, si, layer] = mse(out_tr, out) / max(float(out.double().var()), 1e-30)
            reuse[pi, si, layer] = 0.5 * (st.q_reuse + st.k_reuse)
            sav[pi, si, layer] = st.qk_savings

        with patched_self_attention(env.model.transformer, lambda i, o, c: TapProcessor(i, o, c, measure)):
            env.sampler(prompt, env.gen(), progress=False)
    run_s = time.perf_counter() - t0

    e = err.mean(-1)  # [P, S]
    cv_prompt_per_step = e.std(0) / e.mean(0)
    cv_step_per_prompt = e.std(1) / e.mean(1)
    log_e = np.log(e)
    total_var = float(log_e.var())
    step_share = float(log_e.mean(0).var() / total_var) if total_var > 0 else float("nan")
    prompt_share = float(log_e.mean(1).var() / total_var) if total_var > 0 else float("nan")
    results = {
        "cv_across_prompts": float(cv_prompt_per_step.mean()),
        "cv_across_steps": float(cv_step_per_prompt.mean()),
        "cv_ratio_steps_over_prompts": float(cv_step_per_prompt.mean() / max(cv_prompt_per_step.mean(), 1e-30)),
        "log_error_variance_share_step": step_share,
        "log_error_variance_share_prompt": prompt_share,
        "cv_across_prompts_per_step": cv_prompt_per_step.tolist(),
        "cv_across_steps_per_prompt": cv_step_per_prompt.tolist(),
        "steps": steps_kept,
        "prompts": prompts,
        "error_mean_over_layers": e.tolist(),
        "error_mean_over_prompts_and_layers": e.mean(0).tolist(),
        "error_per_layer_mean_over_prompts": err.mean(0).T.tolist(),
        "error": err.tolist(),
        "achieved_reuse_mean": float(reuse.mean()),
        "achieved_reuse_min": float(reuse.min()),
        "achieved_reuse_max": float(reuse.max()),
        "qk_savings_mean": float(sav.mean()),
        "argmax_step": steps_kept[int(e.mean(0).argmax())],
        "late_half_over_peak": float(e.mean(0)[len(steps_kept) // 2:].mean() / e.mean(0).max()),
    }

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for pi, p in enumerate(prompts):
        axes[0].plot(steps_kept, e[pi], lw=1.2, label=short(p))
    axes[0].set_yscale("log")
    axes[0].set_xlabel("denoising step")
    axes[0].set_ylabel("MSE / Var(dense out), mean over layers")
    axes[0].set_title(f"Fig. 8: {FIG8_REUSE:.0%} Q/K reuse per call; CV prompts {results['cv_across_prompts']:.2f}"
                      f" vs steps {results['cv_across_steps']:.2f}", fontsize=9)
    axes[0].legend(fontsize=6)
    for layer in range(n_layers):
        axes[1].plot(steps_kept, err[:, :, layer].mean(0), lw=1.2, label=f"layer {layer}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("denoising step")
    axes[1].set_title("per layer (mean over prompts)", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(env.out / "fig8.png", dpi=120)
    plt.close(fig)
    settings = {"reuse_ratio": FIG8_REUSE, "window": 2, "axes": ["t", "h", "w"], "threshold":
                "shared θ per call = quantile of the call's per-element min valid Δ over q and k giving the reuse "
                "ratio", "branch": "cond", "step_stride": stride, "prompts": prompts,
                "error": "MSE(TimeRipple out, dense out) / Var(dense out), single call, dense trajectory",
                "generation_s": round(run_s, 2)}
    subsampled = {"steps": f"every {stride}th step: {len(steps_kept)} of {env.steps}", "branch": "cond only",
                  "layers": "all"}
    return {"settings": settings, "subsampled": subsampled, "results": results, "files": ["fig8.png"]}


# ----------------------------------------------------------------------------------------------------------------
# fig5: adversarial group reuse
# ----------------------------------------------------------------------------------------------------------------


def artifact_measures(video: torch.Tensor) -> dict:
    """Temporal and stripe measures of a video ``[3, F, H, W]`` in [-1, 1]."""
    x = video.double()
    out = {
        "temporal_mad": float((x[:, 1:] - x[:, :-1]).abs().mean()),  # mean |frame difference|
        "grad_w": float((x[..., 1:] - x[..., :-1]).abs().mean()),  # horizontal neighbour differences
        "grad_h": float((x[..., 1:, :] - x[..., :-1, :]).abs().mean()),  # vertical neighbour differences
    }
    spec = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs() ** 2  # [3, F, H, W]
    fh = torch.fft.fftfreq(x.shape[-2]).abs().view(-1, 1)
    fw = torch.fft.fftfreq(x.shape[-1]).abs().view(1, -1)
    total = float(spec.sum()) or 1e-30
    out["hf_energy_w"] = float(spec[..., (fw >= 0.25).expand_as(spec[0, 0])].sum()) / total  # |f_w| >= Nyquist/2
    out["hf_energy_h"] = float(spec[..., (fh >= 0.25).expand_as(spec[0, 0])].sum()) / total
    return out


def fig5(env: Env) -> dict:
    """Adversarial group reuse: for each RoPE group g in (t, h, w), odd latent frames copy group g of q and k from
    the previous latent frame (all tokens, heads, layers, steps, both CFG branches); generate the first held-out
    prompt (seed ``--seed``) with each variant and dense. Per variant: PSNR/SSIM vs dense; temporal = mean |frame
    difference| (and its ratio to dense); stripes = mean |horizontal| (grad_w) and |vertical| (grad_h) neighbour
    differences and the share of spatial power at |f| >= 1/4 cycle/px along w and h, of the video and of the error
    (variant - dense); the error's anisotropy grad_w/grad_h (> 1: vertical stripes, variation along w)."""
    prompt = env.prompts[0]
    groups = resolve_adapter(env.model.transformer).rope_groups(env.model.transformer)
    t0 = time.perf_counter()
    videos = {"dense": env.sampler(prompt, env.gen(), progress=False)}
    for g, sl in groups.items():
        with patched_self_attention(env.model.transformer, lambda i, o, c, sl=sl: GroupCopyProcessor(i, o, c, sl)):
            videos[g] = env.sampler(prompt, env.gen(), progress=False)
    gen_s = time.perf_counter() - t0
    dense = videos["dense"]
    base = artifact_measures(dense)
    results = {"dense": base}
    for g in groups:
        v = videos[g]
        m = artifact_measures(v)
        err = artifact_measures(v - dense)
        results[g] = {
            "psnr": psnr(v, dense), "ssim": ssim(v, dense), **m,
            "temporal_mad_ratio": m["temporal_mad"] / max(base["temporal_mad"], 1e-30),
            "temporal_mad_change": m["temporal_mad"] - base["temporal_mad"],
            "grad_w_ratio": m["grad_w"] / max(base["grad_w"], 1e-30),
            "grad_h_ratio": m["grad_h"] / max(base["grad_h"], 1e-30),
            "error_grad_w": err["grad_w"], "error_grad_h": err["grad_h"],
            "error_anisotropy_w_over_h": err["grad_w"] / max(err["grad_h"], 1e-30),
            "error_hf_energy_w": err["hf_energy_w"], "error_hf_energy_h": err["hf_energy_h"],
            "error_temporal_mad": err["temporal_mad"],
        }

    sep = lambda f: np.full((f.shape[0], f.shape[1], 2, 3), 255, np.uint8)  # noqa: E731
    frames = [to_frames(videos[k]) for k in ("dense", *groups)]
    strip = np.concatenate([x for f in frames for x in (f, sep(f))][:-1], axis=2)
    write_video(strip, env.out / "fig5.gif", fps=4)

    names = ("dense", *groups)
    fig = plt.figure(figsize=(11, 6))
    mid = min(dense.shape[1] - 1, 2 * env.model.config.patch_size[0] + 1)  # a frame of an odd latent frame
    for j, k in enumerate(names):
        ax = fig.add_subplot(2, 4, j + 1)
        ax.imshow(to_frames(videos[k])[mid], interpolation="nearest")
        ax.set_title(f"{k}" + ("" if k == "dense" else f" group copied, PSNR {results[k]['psnr']:.1f}"), fontsize=8)
        ax.axis("off")
    keys = (("temporal_mad_ratio", "temporal |Δframe| / dense"), ("grad_w_ratio", "grad_w / dense"),
            ("grad_h_ratio", "grad_h / dense"), ("error_anisotropy_w_over_h", "error grad_w / grad_h"))
    for j, (key, title) in enumerate(keys):
        ax = fig.add_subplot(2, 4, 5 + j)
        vals = [results[g][key] for g in groups]
        ax.bar(list(groups), vals, color=["C0", "C1", "C2"])
        ax.axhline(1, color="k", lw=0.6)
        lo, hi = min(1.0, *vals), max(1.0, *vals)
        pad = 0.1 * (hi - lo) or 0.01
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"Fig. 5: adversarial RoPE-group reuse (frame {mid}; '{short(prompt, 60)}')", fontsize=9)
    fig.tight_layout()
    fig.savefig(env.out / "fig5.png", dpi=120)
    plt.close(fig)
    settings = {"prompt": prompt, "groups": {g: [sl.start, sl.stop] for g, sl in groups.items()},
                "copy": "odd latent frames <- previous latent frame, group channels of q and k, all tokens/heads/"
                        "layers/steps, both CFG branches", "metrics_source": METRICS_SOURCE,
                "gif": "fig5.gif: dense | t | h | w (left to right), 2x nearest upscale",
                "generation_s": round(gen_s, 2)}
    return {"settings": settings, "subsampled": {"prompts": "1 prompt, 1 seed"}, "results": results,
            "files": ["fig5.png", "fig5.gif"]}


# ----------------------------------------------------------------------------------------------------------------
# ablations
# ----------------------------------------------------------------------------------------------------------------


def hunyuan_base(steps: int) -> TimeRippleConfig:
    """``TimeRippleConfig.hunyuan_video(steps)``; below 21 steps its ramp (steps 10..20) does not fit, so the ramp
    steps are scaled by steps/50 (documented in the JSON)."""
    try:
        return TimeRippleConfig.hunyuan_video(steps)
    except ConfigError:
        ref = TimeRippleConfig.hunyuan_video(50)
        i_min = max(0, min(steps - 1, round(ref.i_min * steps / 50)))
        i_max = max(i_min, min(steps - 1, round(ref.i_max * steps / 50)))
        return dataclasses.replace(ref, num_steps=steps, i_min=i_min, i_max=i_max)


class RecordingSampler(Sampler):
    """A Sampler that keeps each video and the installed TimeRipple stats, keyed by the installed config (so the
    calibration's own generations are reused for the quality metrics instead of being generated again)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.videos: dict = {}
        self.summaries: dict = {}
        self.generations = 0

    def __call__(self, prompts, cfg=GenerationConfig(), **kw):
        out = super().__call__(prompts, cfg, **kw)
        self.generations += 1
        adapter = resolve_adapter(self.model.transformer)
        proc = adapter.self_attention(adapter.blocks(self.model.transformer)[0]).get_processor()
        key = proc.config if isinstance(proc, TimeRippleProcessor) else "dense"
        self.videos.setdefault(key, {})[prompts] = out
        if isinstance(proc, TimeRippleProcessor):
            self.summaries[key] = proc.stats.summary()
        return out


def fixed_threshold_search(sampler: RecordingSampler, prompts, gen: GenerationConfig, base: TimeRippleConfig,
                           target_all: float, start: float, tolerance: float, max_iterations: int):
    """Bisection (doubling/halving ladder, then geometric) on ``fixed_threshold`` to match ``qk_savings_all``."""
    tried = []

    def savings(theta):
        cfg = dataclasses.replace(base, fixed_threshold=theta)
        s = measure_savings(sampler, prompts, gen, cfg)["qk_savings_all"]
        tried.append((theta, s))
        return s

    lo, hi, theta = 0.0, None, max(start, 1e-3)
    while len(tried) < max_iterations:
        s = savings(theta)
        if abs(s - target_all) <= tolerance:
            break
        if s < target_all:
            lo = theta
            theta = theta * 2 if hi is None else math.sqrt(lo * hi)
        else:
            hi = theta
            theta = theta / 2 if lo == 0 else math.sqrt(lo * hi)
    best_theta, best = min(tried, key=lambda ts: abs(ts[1] - target_all))
    record = {"target_qk_savings_all": target_all, "achieved": best, "tolerance": tolerance,
              "iterations": len(tried), "max_iterations": max_iterations, "tried": [list(t) for t in tried]}
    return dataclasses.replace(base, fixed_threshold=best_theta), record


def ablations(env: Env) -> dict:
    """End-to-end quality vs dense at matched QK savings, for the paper's ablation axes.

    Prompts: the first ``min(2, --prompts)`` held-out prompts, 1 seed, ``--ablation-steps`` steps (default
    ``--steps``), CFG ``--guidance``. Reference: step-sensitive shared θ, K=2, axes t,h,w, base
    ``TimeRippleConfig.hunyuan_video(steps)`` (ramp steps scaled below 21 steps), θ_max calibrated with
    ``calibrate_timeripple`` to target 0.75 (tolerance 0.02, max 6 iterations; the measure is the mean QK savings over
    reuse-active calls of those prompts). Every schedule variant (K=4, K=8, per_axis (1.5, 0.75, 0.75), per_channel,
    temporal-only) is calibrated the same way to the reference's *achieved* savings (warm start at the reference θ).
    The fixed-threshold variant reuses at every step (no dense steps), so it is matched on QK savings over *all*
    self-attention calls (qk_savings_all) to the reference's, by our own bisection on ``fixed_threshold``.
    Quality = PSNR/SSIM of each video vs the dense video of the same prompt/seed, mean over prompts.
    """
    prompts = env.prompts[: min(2, env.n_prompts)]
    steps = env.args.ablation_steps or env.steps
    gen = env.gen(steps=steps)
    sampler = RecordingSampler(env.model)
    t0 = time.perf_counter()
    dense = {p: sampler(p, gen, progress=False) for p in prompts}
    base = hunyuan_base(steps)
    kw = dict(tolerance=ABLATION_TOLERANCE, max_iterations=env.args.ablation_max_iterations, progress=False)
    ref_cfg, ref_rec = calibrate_timeripple(sampler, prompts, ABLATION_TARGET, gen, base=base, **kw)
    ref_sum = sampler.summaries[ref_cfg]
    target = ref_sum["qk_savings_active"]
    variants = {
        "window_4": dataclasses.replace(base, window=4),
        "window_8": dataclasses.replace(base, window=8),
        "per_axis_1.5_0.75_0.75": dataclasses.replace(base, threshold_mode="per_axis", axis_scale=(1.5, 0.75, 0.75)),
        "per_channel": dataclasses.replace(base, threshold_mode="per_channel"),
        "temporal_only": dataclasses.replace(base, axes=("t",)),
    }
    configs = {"reference_step_sensitive_shared_K2_full": (ref_cfg, {"calibration": ref_rec})}
    for name, vbase in variants.items():
        warm = dataclasses.replace(vbase, theta_max=ref_cfg.theta_max, theta_min=ref_cfg.theta_min)
        try:
            cfg, rec = calibrate_timeripple(sampler, prompts, target, gen, base=warm, **kw)
            configs[name] = (cfg, {"calibration": rec})
        except ConfigError as e:  # the target is above what θ = ∞ reaches with this variant
            ratio = warm.theta_min / warm.theta_max
            cfg = dataclasses.replace(warm, theta_max=THETA_CEILING, theta_min=ratio * THETA_CEILING)
            configs[name] = (cfg, {"calibration": None, "unreachable": str(e)})
    fixed_cfg, fixed_rec = fixed_threshold_search(
        sampler, prompts, gen, base, ref_sum["qk_savings_all"], start=ref_cfg.theta_max,
        tolerance=ABLATION_TOLERANCE, max_iterations=env.args.ablation_max_iterations)
    configs["fixed_threshold"] = (fixed_cfg, {"calibration": fixed_rec})

    rows = {}
    for name, (cfg, extra) in configs.items():
        if cfg not in sampler.videos or any(p not in sampler.videos[cfg] for p in prompts):
            measure_savings(sampler, prompts, gen, cfg)  # only when the calibration never generated this config
        vids, summ = sampler.videos[cfg], sampler.summaries[cfg]
        ps = [psnr(vids[p], dense[p]) for p in prompts]
        ss = [ssim(vids[p], dense[p]) for p in prompts]
        rows[name] = {
            "psnr_mean": float(np.mean(ps)), "psnr": ps, "ssim_mean": float(np.mean(ss)), "ssim": ss,
            "qk_savings_active": summ["qk_savings_active"], "qk_savings_all": summ["qk_savings_all"],
            "q_reuse_active": summ["q_reuse_active"], "k_reuse_active": summ["k_reuse_active"],
            "theta_max": cfg.theta_max, "theta_min": cfg.theta_min, "fixed_threshold": cfg.fixed_threshold,
            "config": cfg.to_dict(), **extra,
        }
    wall = time.perf_counter() - t0

    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = np.arange(len(names))
    axes[0].bar(xs, [rows[n]["psnr_mean"] for n in names], color=["C3"] + ["C0"] * (len(names) - 1))
    for i, n in enumerate(names):
        axes[0].text(i, rows[n]["psnr_mean"], f"{rows[n]['qk_savings_all']:.2f}/{rows[n]['qk_savings_active']:.2f}",
                     ha="center", va="bottom", fontsize=7)
    axes[0].set_xticks(xs, names, rotation=30, ha="right", fontsize=7)
    axes[0].set_ylabel("PSNR vs dense (dB), mean over prompts")
    axes[0].set_title("ablations (labels: QK savings all / active calls)", fontsize=9)
    axes[1].bar(xs, [rows[n]["ssim_mean"] for n in names], color=["C3"] + ["C0"] * (len(names) - 1))
    axes[1].set_xticks(xs, names, rotation=30, ha="right", fontsize=7)
    axes[1].set_ylabel("SSIM vs dense")
    lo = min(rows[n]["ssim_mean"] for n in names)
    axes[1].set_ylim(max(0.0, lo - 0.05), 1.0)
    fig.tight_layout()
    fig.savefig(env.out / "ablations.png", dpi=120)
    plt.close(fig)
    settings = {
        "prompts": prompts, "seed": env.seed, "steps": steps, "target": ABLATION_TARGET,
        "tolerance": ABLATION_TOLERANCE, "max_iterations": env.args.ablation_max_iterations,
        "base": base.to_dict(),
        "base_note": "TimeRippleConfig.hunyuan_video(steps)" if steps >= 21 else
        f"hunyuan_video(50) with ramp steps scaled by {steps}/50 (hunyuan_video({steps}) does not fit the ramp)",
        "matched_savings_active": target, "matched_savings_all_fixed": ref_sum["qk_savings_all"],
        "matching": "schedule variants: qk_savings_active (same dense steps as the reference); fixed threshold: "
                    "qk_savings_all (it has no dense steps)",
        "calibration_prompts": "the same prompts as the evaluation", "metrics_source": METRICS_SOURCE,
        "generations": sampler.generations, "wall_s_generations": round(wall, 2),
    }
    subsampled = {"prompts": f"{len(prompts)} prompt(s) x 1 seed",
                  "steps": f"{steps} steps" + (f" instead of {env.steps} (--ablation-steps)" if steps != env.steps
                                               else "")}
    return {"settings": settings, "subsampled": subsampled, "results": rows, "files": ["ablations.png"]}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

RUNNERS = {"fig7": fig7, "fig8": fig8, "fig5": fig5, "ablations": ablations}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "embedded"), default="embedded")
    p.add_argument("--out", default="docs/results/timeripple")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                   help=f"comma-separated subset of {','.join(EXPERIMENTS)}")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompts", type=int, default=8,
                   help="held-out prompts for fig8; fig7 and ablations use min(2, this), fig5 the first one")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fig8-stride", type=int, default=2, help="fig8 measures every N-th step")
    p.add_argument("--ablation-steps", type=int, default=None, help="steps for the ablations (default: --steps)")
    p.add_argument("--ablation-max-iterations", type=int, default=6)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.invoked = "command line" if argv is None else "main(argv) in-process"
    names = [x.strip() for x in args.experiments.split(",") if x.strip()]
    bad = [x for x in names if x not in EXPERIMENTS]
    if bad or not names:
        p.error(f"--experiments {args.experiments!r}: unknown {bad}; choose from {','.join(EXPERIMENTS)}")
    if args.steps < 2 or args.prompts < 1 or args.fig8_stride < 1:
        p.error("--steps must be >= 2, --prompts and --fig8-stride >= 1")
    if args.ablation_steps is not None and args.ablation_steps < 2:
        p.error("--ablation-steps must be >= 2")
    args.experiments = names
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    sampler = Sampler(model)
    args.guidance = sampler.guidance(GenerationConfig(guidance=args.guidance))  # None: the model's; recorded as used
    held, source = prompt_sets()["heldout"], HELDOUT_SOURCE
    if args.prompts > len(held):
        raise SystemExit(f"--prompts {args.prompts}: only {len(held)} held-out prompts")
    env = Env(args.model, model, sampler, args.steps, args.guidance, args.seed, args.prompts, out, args,
              held[: args.prompts], source)
    written = {}
    for name in args.experiments:
        t0 = time.perf_counter()
        print(f"[{name}] running ({args.model}, {args.steps} steps, {torch.get_num_threads()} threads)", flush=True)
        with torch.no_grad():
            res = RUNNERS[name](env)
        wall = time.perf_counter() - t0
        path = write_json(env, name, res["settings"], res["results"], res["subsampled"], wall, res["files"])
        written[name] = path
        print(f"[{name}] {wall:.1f} s -> {path}", flush=True)
    return written


if __name__ == "__main__":
    main()
