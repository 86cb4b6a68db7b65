"""TimeRipple calibration: find θ_max (θ_min in fixed proportion) that reaches a target QK savings.

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
