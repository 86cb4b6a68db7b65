"""TimeRipple calibration: a threshold that reaches a target QK savings, or a target attention-op speedup.

``calibrate_timeripple_speed`` (``--target-speedup``) targets time: the "tokens" variant's fixed θ whose measured
attention-op speedup at Wan2.1-1.3B width (``W2_GEOMETRY``), decision time included, reaches the target, with reuse
decisions recorded from the model being calibrated and resampled to that grid. ``calibrate_timeripple``
(``--target``) is the QK-savings mode described below.

QK-savings mode: find θ_max (θ_min in fixed proportion) that reaches a target QK savings.

The measured quantity is the QK savings averaged over the reuse-active self-attention calls of real
generations of the calibration prompts (closed loop: reuse changes the trajectory, and the savings
are measured on that changed trajectory). Savings grow monotonically with θ in expectation, so a
bracketing search on log θ followed by bisection converges; each evaluation is a full generation of
every calibration prompt. The result is a versioned JSON preset.

Example (real runs: ``vdit-accel calibrate timeripple --target 0.85``):
    >>> from vdit_accel.testing import tiny_model, TINY_PROMPT
    >>> from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    >>> from vdit_accel.methods.timeripple import TimeRippleConfig
    >>> base = TimeRippleConfig(i_min=1, i_max=2, num_steps=4)
    >>> cfg, rec = calibrate_timeripple(Sampler(tiny_model()), [TINY_PROMPT], 0.5, GenerationConfig(steps=4),
    ...                                 base=base, progress=False)
    >>> abs(rec["achieved"] - 0.5) <= rec["tolerance"] or rec["iterations"] == rec["max_iterations"]
    True
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vdit_accel.errors import ConfigError, check_range
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple

THETA_CEILING = 1e4  # a threshold above every |Δ| seen in practice: reuse everything reusable


def measure_savings(sampler: Sampler, prompts: list[str], gen_cfg: GenerationConfig, config: TimeRippleConfig) -> dict:
    """Generate every prompt with ``config``; return the TimeRipple stats summary."""
    handle = apply_timeripple(sampler.model.transformer, config)
    try:
        for p in prompts:
            sampler(p, gen_cfg, progress=False)
        return handle.stats.summary()
    finally:
        handle.remove()


def calibrate_timeripple(sampler: Sampler, prompts: list[str], target: float, gen_cfg: GenerationConfig, *,
                         base: TimeRippleConfig | None = None, tolerance: float = 0.01, max_iterations: int = 10,
                         progress: bool = True) -> tuple[TimeRippleConfig, dict]:
    """Find the config whose measured active-step QK savings is within ``tolerance`` of ``target``.

    Args:
        target (`float`): QK savings in (0, 1).
        base (`TimeRippleConfig`): everything but θ (ramp steps, window, axes, ...); its θ_min/θ_max ratio is kept.
            Defaults to the HunyuanVideo schedule shape at ``gen_cfg.steps``.

    Returns:
        (config, record): record has the target, achieved savings, iterations and every (θ_max, savings) tried.

    Raises:
        ConfigError: target outside (0, 1), or above what the largest threshold reaches (message gives the maximum).
    """
    check_range("target", target, lo=1e-6, hi=1 - 1e-6)
    for p in prompts:
        sampler.model.encode_prompts([p])
    base = base or TimeRippleConfig.hunyuan_video(gen_cfg.steps)
    if base.num_steps != gen_cfg.steps:
        raise ConfigError(f"base.num_steps={base.num_steps} differs from steps={gen_cfg.steps}")
    ratio = base.theta_min / base.theta_max if base.theta_max > 0 else 0.4
    tried: list[tuple[float, float]] = []
    bar = tqdm(total=max_iterations, disable=not progress, desc=f"calibrate {target:.2f}")

    def savings(theta: float) -> float:
        cfg = dataclasses.replace(base, theta_max=theta, theta_min=ratio * theta)
        s = measure_savings(sampler, prompts, gen_cfg, cfg)["qk_savings_active"]
        tried.append((theta, s))
        bar.update(1)
        bar.set_postfix(theta=f"{theta:.4g}", savings=f"{s:.4f}")
        return s

    lo = hi = None  # (theta, savings) brackets
    theta = max(base.theta_max, 1e-3)
    top = None
    while len(tried) < max_iterations:  # bracket on a x4 / /4 ladder, then interpolate in log θ
        s = savings(theta)
        if abs(s - target) <= tolerance:
            break
        if s < target:
            if theta >= THETA_CEILING:
                top = s
                break
            lo = (theta, s)
        else:
            hi = (theta, s)
        if lo is None:
            theta = theta / 4
        elif hi is None:
            theta = min(theta * 4, THETA_CEILING)
        else:
            frac = (target - lo[1]) / max(hi[1] - lo[1], 1e-9)
            frac = min(max(frac, 0.1), 0.9)  # stay inside the bracket
            theta = math.exp(math.log(lo[0]) + frac * (math.log(hi[0]) - math.log(lo[0])))
    bar.close()
    if top is not None and top < target - tolerance:
        raise ConfigError(f"target={target} is out of reach: at most {top:.4f} QK savings with these settings")
    best_theta, best = min(tried, key=lambda ts: abs(ts[1] - target))
    cfg = dataclasses.replace(base, theta_max=best_theta, theta_min=ratio * best_theta)
    record = {
        "target": target,
        "achieved": round(best, 4),
        "tolerance": tolerance,
        "iterations": len(tried),
        "max_iterations": max_iterations,
        "tried": [[round(t, 6), round(s, 4)] for t, s in tried],
        "prompts": list(prompts),
        "guidance": sampler.guidance(gen_cfg),
        "measure": "qk_savings_active: mean over reuse-active self-attention calls (both CFG branches)",
    }
    return cfg, record


# ------------------------------------------------------------------------------------ calibration for time
@dataclass(frozen=True)
class OpGeometry:
    """The self-attention geometry a speed target is measured at.

    Args:
        grid (`tuple[int, int, int]`): video token grid `(T, Hg, Wg)` (no text tokens: Wan's self-attention).
        heads (`int`), head_dim (`int`): attention heads and head dimension.
    """

    grid: tuple[int, int, int]
    heads: int
    head_dim: int

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


W2_GEOMETRY = OpGeometry(grid=(4, 32, 32), heads=12, head_dim=128)  # Wan2.1-1.3B width, a 4096-token CPU grid


def axis_map(n_src: int, n_dst: int, window: int) -> torch.Tensor:
    """Destination coordinate -> source coordinate along one axis: nearest window, same position inside it.

    Example:
        >>> axis_map(4, 8, 2).tolist()
        [0, 1, 0, 1, 2, 3, 2, 3]
    """
    c = torch.arange(n_dst)
    nw_src, nw_dst = -(-n_src // window), -(-n_dst // window)
    win = torch.clamp(torch.floor((c // window + 0.5) * nw_src / nw_dst).long(), max=nw_src - 1)
    return torch.clamp(win * window + c % window, max=n_src - 1)


def token_map(grid: tuple[int, int, int], grid2: tuple[int, int, int], window: int, text_prefix: int = 0):
    """`[T2*H2*W2]` source token index (in a sequence with `text_prefix` text tokens first) of every W2 token."""
    maps = [axis_map(grid[a], grid2[a], window) for a in range(3)]
    return (maps[0].view(-1, 1, 1) * grid[1] * grid[2] + maps[1].view(1, -1, 1) * grid[2]
            + maps[2].view(1, 1, -1)).flatten() + text_prefix


def resampled_roots(record: dict, theta: float, geometry: OpGeometry, config: TimeRippleConfig) -> torch.Tensor:
    """Token roots at `geometry` from one recorded call's spreads (`TimeRippleHandle.record_decisions`) at θ.

    Each W2 token takes the per-axis spreads of its source token (`token_map`: nearest window, same in-window
    position, so "can reuse" stays on non-first tokens); the decisions (spread < θ, axis priority) and anchors are
    then taken on the W2 grid. Returns `[1, S2]` long roots.
    """
    from vdit_accel.ops.timeripple import _window_geometry
    from vdit_accel.ops.timeripple_tokens import _parent, _roots_from_parent

    tok = token_map(record["grid"], geometry.grid, config.window, record["text_prefix"])
    spread, anchors = {}, {}
    for a in config.axes:
        anchor, valid = _window_geometry(geometry.grid, a, config.window, 0, 0, "cpu")
        spread[a] = record["spread"][a][:, tok].masked_fill(~valid.view(1, -1), float("inf"))
        anchors[a] = anchor
    return _roots_from_parent(_parent(spread, anchors, theta, config.priority), len(config.axes))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_op_speedup(records: list[dict], theta: float, config: TimeRippleConfig,
                       geometry: OpGeometry = W2_GEOMETRY, *, repeats: int = 3, seed: int = 0) -> dict:
    """Attention-op speedup of the "tokens" variant at `geometry`, decision time included, vs dense SDPA.

    For each recorded call: roots resampled to `geometry` (`resampled_roots`), seeded random q/k/v there; the timed
    variant is `token_decisions` on the sides that reuse (its cost does not depend on the values) plus
    `token_dedup_attention` with the resampled roots and the config's ``key_merge`` (with ``decision_interval``
    N > 1: one such call and N - 1 calls on kept decisions, their index cache included, averaged); dense is
    `F.scaled_dot_product_attention` on the same tensors (median of `repeats`, interleaved). Returns the
    geometric-mean speedup, the mean reused fraction and attention work share.
    """
    from vdit_accel.ops.timeripple_tokens import token_decisions, token_dedup_attention

    g = torch.Generator().manual_seed(seed)
    shape = (1, geometry.tokens, geometry.heads, geometry.head_dim)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))

    def dense():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    logs, reused, work = [], [], []
    dense_s = _median_time(dense, repeats)
    for rec in records:
        root = resampled_roots(rec, theta, geometry, config)

        def variant(root=root, cache=None):  # the decisions on the sides that reuse, as the method takes them
            if cache is None:
                token_decisions([x for x, on in ((q, config.reuse_q), (k, config.reuse_k)) if on], geometry.grid,
                                theta, window=config.window, axes=config.axes, priority=config.priority)
            return token_dedup_attention(q, k, v, root if config.reuse_q else None, root if config.reuse_k else None,
                                         key_merge=config.key_merge, index_cache=cache)

        t = _median_time(variant, repeats)
        if config.decision_interval > 1:  # decided on one call in `decision_interval`, kept on the others
            cache: dict = {}
            variant(cache=cache)
            kept = _median_time(lambda root=root, cache=cache: variant(root, cache), repeats)
            t = (t + (config.decision_interval - 1) * kept) / config.decision_interval
        d = _median_time(dense, max(1, repeats // 2))
        dense_s = min(dense_s, d)
        _, st = variant()
        logs.append(math.log(max(d, dense_s) / t))
        reused.append(float((root != torch.arange(root.shape[1])).float().mean()))
        work.append(st.attn_work)
    return {"speedup": float(math.exp(np.mean(logs))), "reused": float(np.mean(reused)),
            "attn_work": float(np.mean(work)), "dense_s": dense_s}


def record_token_decisions(sampler: Sampler, prompts: list[str], gen_cfg: GenerationConfig,
                           config: TimeRippleConfig, steps: list[int] | None = None) -> list[dict]:
    """Generate `prompts` with `config` (variant "tokens") and return the recorded per-token spreads of the
    cond-branch calls at `steps` (default: 3 steps spread over the generation), every accelerated layer."""
    steps = steps if steps is not None else sorted({gen_cfg.steps // 4, gen_cfg.steps // 2, 3 * gen_cfg.steps // 4})
    log: dict = {}
    handle = apply_timeripple(sampler.model.transformer, config)
    try:
        handle.record_decisions(log)
        for p in prompts:
            sampler(p, gen_cfg, progress=False)
    finally:
        handle.remove()
    out = [rec for (branch, step, _), rec in sorted(log.items()) if branch in ("cond", "default") and step in steps]
    if not out:
        raise ConfigError(f"no reuse call was recorded at steps {steps}: use a config that reuses at those steps")
    return out


RECORD_THETA = 1e-6  # decisions recorded on (almost exactly) the dense trajectory: nothing reuses at this θ


def calibrate_timeripple_speed(sampler: Sampler, prompts: list[str], target_speedup: float,
                               gen_cfg: GenerationConfig, *, geometry: OpGeometry = W2_GEOMETRY,
                               base: TimeRippleConfig | None = None, tolerance: float = 0.05,
                               max_iterations: int = 8, repeats: int = 3,
                               progress: bool = True) -> tuple[TimeRippleConfig, dict]:
    """Find the fixed θ of the "tokens" variant whose attention-op speedup at `geometry` reaches `target_speedup`.

    The per-token spreads are recorded from generations of `prompts` on the model being calibrated (on the dense
    trajectory, θ = `RECORD_THETA`), resampled to `geometry` (Wan2.1-1.3B width by default), and θ is bisected on
    the measured op speedup (decision time included, `measure_op_speedup`). Speedup grows with θ; the spread is in
    [0, 1], so θ is searched in (0, 1].

    Args:
        target_speedup (`float`): > 1, e.g. 1.5.
        base (`TimeRippleConfig | None`): window, axes, priority, reuse_q/reuse_k, layers (variant is set to
            "tokens", θ to a fixed threshold). Defaults to `TimeRippleConfig(variant="tokens")`.
        tolerance (`float`, defaults to 0.05): stop when the speedup is within this of the target.

    Returns:
        (config, record): config with `fixed_threshold`; record with the geometry, target, achieved speedup,
        reuse fraction, attention work, every (θ, speedup) tried and the recorded calls.

    Raises:
        ConfigError: `target_speedup <= 1`, or out of reach even when every token that can reuse does (message
            gives the maximum measured).
    """
    if not target_speedup > 1.0:
        raise ConfigError(f"target_speedup={target_speedup!r} is out of range: accepted (1, inf)")
    base = base or TimeRippleConfig(variant="tokens")
    base = dataclasses.replace(base, variant="tokens", threshold_mode="shared", row_fraction=None,
                               num_steps=gen_cfg.steps, i_min=0, i_max=0, fixed_threshold=RECORD_THETA)
    for p in prompts:
        sampler.model.encode_prompts([p])
    records = record_token_decisions(sampler, prompts, gen_cfg, dataclasses.replace(base, decision_interval=1))
    tried: list[tuple[float, dict]] = []
    bar = tqdm(total=max_iterations, disable=not progress, desc=f"calibrate {target_speedup:.2f}x")

    def measure(theta: float) -> float:
        m = measure_op_speedup(records, theta, base, geometry, repeats=repeats)
        tried.append((theta, m))
        bar.update(1)
        bar.set_postfix(theta=f"{theta:.4g}", speedup=f"{m['speedup']:.3f}")
        return m["speedup"]

    top = measure(1.0 + 1e-6)  # every token that can reuse does (the spread is <= 1)
    if top < target_speedup - tolerance:
        bar.close()
        raise ConfigError(f"target_speedup={target_speedup} is out of reach: at most {top:.3f}x at {geometry}")
    lo, hi = 0.0, 1.0 + 1e-6
    while len(tried) < max_iterations:
        theta = 0.5 * (lo + hi)
        s = measure(theta)
        if abs(s - target_speedup) <= tolerance:
            break
        lo, hi = (theta, hi) if s < target_speedup else (lo, theta)
    bar.close()
    ok = [(t, m) for t, m in tried if m["speedup"] >= target_speedup - tolerance]
    best_theta, best = min(ok, key=lambda tm: tm[0])  # the smallest θ (least reuse) that reaches the target
    cfg = dataclasses.replace(base, fixed_threshold=best_theta)
    record = {
        "target_speedup": target_speedup,
        "achieved_speedup": round(best["speedup"], 4),
        "theta": best_theta,
        "reused": round(best["reused"], 4),
        "attn_work": round(best["attn_work"], 4),
        "tolerance": tolerance,
        "iterations": len(tried),
        "tried": [[round(t, 6), round(m["speedup"], 4), round(m["reused"], 4)] for t, m in tried],
        "op_geometry": {"grid": list(geometry.grid), "heads": geometry.heads, "head_dim": geometry.head_dim},
        "recorded_calls": len(records),
        "recorded_from": {"grid": list(records[0]["grid"]), "heads": records[0]["heads"],
                          "head_dim": records[0]["head_dim"]},
        "threads": torch.get_num_threads(),
        "prompts": list(prompts),
        "measure": "attention-op speedup vs torch SDPA at op_geometry, decision time included, geometric mean over "
                   "the recorded calls (CPU; timings on a shared machine are provisional)",
    }
    return cfg, record
