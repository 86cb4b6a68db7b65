"""The real-width step benchmark ("W2"): steady-state denoising steps of Wan2.1-1.3B-width blocks, per setting.

A ``WanTransformer3DModel`` with the published Wan2.1-T2V-1.3B configuration (:data:`WAN21_1_3B`; random seeded
weights, the same class the library accelerates) is called step by step as a sampler would (``cache_context``
with step index and step count). For every setting (:class:`~vdit_accel.bench.flops.Setting`: dense, Astraea
budgets with/without K/V reuse, forecast-only steps) and every repeat, round-robin over settings in one process:

1. the method is applied (dense: nothing), ``1 + order`` dense steps fill its caches, ``warmup`` steps run at the
   setting, then ``timed_steps`` consecutive steps at the setting (default 1) are timed and averaged into one sample;
   the method is removed;
2. during the timed steps, forward hooks time every block (CUDA synchronised), so the step splits into per-block
   times and the non-block overhead (patch/condition embedding, head): ``overhead = step - sum(blocks)``.

The reported step cost is **composed** for ``target_layers`` layers (default 30) from those measured parts:
``overhead + (target_layers - 1)·mean(blocks[:-1]) + blocks[-1]`` (the last block is kept apart because a
forecast-only step forms the output there), or ``overhead + target_layers·block`` with one layer. Both measured
numbers (step at ``layers``; block and overhead) stay in the JSON next to the composed one. Each repeat runs the
settings in a rotated order (:func:`rotated`). Per setting: the median over repeats, speedup against dense composed
in the same process (ratio of the medians), the paired speedup (median and quartiles of the per-repeat ratios
against the dense step of the same pass, :func:`~vdit_accel.bench.timing.paired_speedups`), the FLOP ceiling
(:mod:`vdit_accel.bench.flops`, at ``target_layers``), efficiency = speedup / ceiling, and the self-attention
share: the setting's attention op (dense: ``F.scaled_dot_product_attention``; Astraea:
:func:`~vdit_accel.ops.attention.row_subset_attention` of ``k`` rows over ``N`` keys) timed alone at the same shapes,
over the mean computing block time.

Example (a real run: ``vdit-accel bench-step --out runs/bench-step``):
    >>> StepBenchConfig(tiny=True).effective().tokens
    32
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vdit_accel.bench.flops import Setting, WanGeometry, ceiling, step_flops
from vdit_accel.bench.timing import paired_speedups
from vdit_accel.errors import ConfigError, check_choice, check_range
from vdit_accel.validate import atomic_write

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "vdit-accel/bench-step"
RESULT_FILES = ("bench-step.json", "bench-step.md")  # what a bench-step run writes into its --out
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY = dict(WAN21_1_3B, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=16,
            in_channels=4, out_channels=4)
KV_CHOICES = ("off", "on", "both")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LATENCY_BUDGETS = tuple(i / 10 for i in range(10))  # 0.0 .. 0.9
LATENCY_ORDERS = (0, 1, 2)
LATENCY_ORDER_BUDGETS = (0.0, 0.5)  # forecast orders > 0 are measured at these budgets and interpolated between


@dataclass(frozen=True)
class StepBenchConfig:
    """Settings of ``vdit-accel bench-step`` (the CLI's defaults come from here).

    Args:
        layers (`int`, defaults 2): blocks of the timed model.
        target_layers (`int`, defaults 30): layers the step cost is composed for.
        latent (`tuple[int, int, int]`, defaults (4, 48, 80)): latent frames, height, width (grid 4x24x40 = 3840).
        text_len (`int`, defaults 512): text tokens (Wan's).
        dtype (`str`, defaults "float32"): one of ``DTYPES``.
        device (`str`, defaults "auto"): "auto" (CUDA when present), "cpu" or "cuda".
        repeats (`int`, defaults 3): timed steps per setting (round-robin over settings).
        warmup (`int`, defaults 1): untimed steps at the setting before the timed one.
        timed_steps (`int`, defaults 1): consecutive steps timed per sample (their mean is the sample).
        budgets (`tuple[float, ...]`, defaults (0.2, 0.4, 0.6)): Astraea uniform budgets.
        kv_reuse (`str`, defaults "both"): Astraea settings without ("off"), with ("on") or with both K/V modes.
        orders (`tuple[int, ...]`, defaults (0, 1, 2)): forecast orders of the forecast-only (budget 0) steps.
        seed (`int`, defaults 0): weights and inputs.
        full (`bool`): 480p x 81 frames (latent 21x60x104), 30 layers, bfloat16, CUDA when present.
        tiny (`bool`): a tiny width for tests (2 heads x 16, latent 2x8x8, 8 text tokens).
    """

    layers: int = 2
    target_layers: int = 30
    latent: tuple[int, int, int] = (4, 48, 80)
    text_len: int = 512
    dtype: str = "float32"
    device: str = "auto"
    repeats: int = 3
    warmup: int = 1
    timed_steps: int = 1
    budgets: tuple[float, ...] = (0.2, 0.4, 0.6)
    kv_reuse: str = "both"
    orders: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    full: bool = False
    tiny: bool = False

    def __post_init__(self) -> None:
        for name in ("layers", "target_layers", "text_len", "repeats", "timed_steps"):
            check_range(name, getattr(self, name), lo=1)
        check_range("warmup", self.warmup, lo=0)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("kv_reuse", self.kv_reuse, KV_CHOICES)
        if self.full and self.tiny:
            raise ConfigError("--full and --tiny are not accepted together")
        if len(self.latent) != 3 or min(self.latent) < 1:
            raise ConfigError(f"latent={self.latent} is not accepted: expected 3 ints >= 1 (frames, height, width)")
        for b in self.budgets:
            Setting(budget=b)
        for o in self.orders:
            Setting(budget=0.0, order=o)

    def effective(self) -> StepBenchConfig:
        """``--full`` and ``--tiny`` applied."""
        if self.full:
            return dataclasses.replace(self, full=False, layers=30, latent=(21, 60, 104), dtype="bfloat16")
        if self.tiny:
            return dataclasses.replace(self, tiny=False, latent=(2, 8, 8), text_len=8)
        return self

    @property
    def model_kwargs(self) -> dict:
        return dict(TINY if self.tiny else WAN21_1_3B, num_layers=self.layers)

    @property
    def grid(self) -> tuple[int, int, int]:
        p = self.model_kwargs["patch_size"]
        return tuple(n // s for n, s in zip(self.latent, p, strict=True))

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' is not available on this machine: accepted 'cpu' or 'auto'")
        return torch.device(self.device)

    def settings(self) -> list[Setting]:
        """Dense, Astraea budgets x K/V modes, forecast-only orders."""
        kvs = {"off": (False,), "on": (True,), "both": (False, True)}[self.kv_reuse]
        out = [Setting()]
        out += [Setting(budget=b, kv_reuse=kv) for b in self.budgets for kv in kvs]
        out += [Setting(budget=0.0, order=o) for o in self.orders]
        return list(dict.fromkeys(out))


def latency_settings(kv_reuse: bool) -> list[Setting]:
    """The latency-model grid: dense, budgets {0, 0.1, ..., 0.9} at order 0, and orders 1, 2 at budgets 0 and
    0.5 (a forecast's cost hardly depends on the budget: it is formed for every row, then the computed rows
    replace theirs; the latency model interpolates between the measured budgets of each order)."""
    return [Setting()] + [Setting(budget=b, kv_reuse=kv_reuse, order=o) for o in LATENCY_ORDERS
                          for b in (LATENCY_BUDGETS if o == 0 else LATENCY_ORDER_BUDGETS)]


# ------------------------------------------------------------------------------------------------ method configs
def astraea_fields() -> set[str]:
    from vdit_accel.methods.astraea import AstraeaConfig

    return {f.name for f in dataclasses.fields(AstraeaConfig)}


def unsupported(setting: Setting) -> str | None:
    """Why this build of Astraea cannot run ``setting`` (a missing config field), or None."""
    if setting.dense:
        return None
    fields = astraea_fields()
    if setting.kv_reuse and "kv_reuse" not in fields:
        return "AstraeaConfig has no kv_reuse field in this build"
    if setting.order and "forecast" not in fields:
        return "AstraeaConfig has no forecast field in this build"
    return None


def astraea_config(setting: Setting, warm: int, steps: int, cache_dtype: str | None = None):
    """An AstraeaConfig: ``warm`` dense steps, then ``steps - warm`` steps at ``setting``."""
    from vdit_accel.methods.astraea import AstraeaConfig

    budgets = tuple([1.0] * warm + [setting.budget] * (steps - warm))
    kw: dict = dict(budgets=budgets, num_steps=steps, dense_steps=warm)
    fields = astraea_fields()
    if "kv_reuse" in fields:
        kw["kv_reuse"] = setting.kv_reuse
    if "forecast" in fields:
        kw["forecast"] = setting.order
    if cache_dtype is not None and "cache_dtype" in fields:
        kw["cache_dtype"] = cache_dtype
    return AstraeaConfig(**kw)


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModuleTimer:
    """Forward pre/post hooks that time modules (with CUDA synchronisation); handles removed on ``close``."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device) -> None:
        self.device, self.start, self.times = device, {}, [0.0] * len(modules)
        self.active = False
        self.handles = []
        for i, m in enumerate(modules):
            self.handles.append(m.register_forward_pre_hook(self._pre(i)))
            self.handles.append(m.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(module, args):
            if self.active:
                _sync(self.device)
                self.start[i] = time.perf_counter()
        return hook

    def _post(self, i):
        def hook(module, args, out):
            if self.active:
                _sync(self.device)
                self.times[i] += time.perf_counter() - self.start[i]
        return hook

    def reset(self) -> None:
        self.times = [0.0] * len(self.times)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class StepBench:
    """The model, inputs and timers of one benchmark process (see the module docstring)."""

    def __init__(self, cfg: StepBenchConfig) -> None:
        from diffusers import WanTransformer3DModel

        self.cfg = cfg
        self.device = cfg.resolved_device()
        self.dtype = DTYPES[cfg.dtype]
        torch.manual_seed(cfg.seed)
        kw = cfg.model_kwargs
        self.model = WanTransformer3DModel(**kw).to(self.device).eval()
        if self.dtype != torch.float32:  # as from_pretrained(torch_dtype=...): Wan's fp32 modules stay fp32
            self.model.to(self.dtype)
            keep = getattr(self.model, "_keep_in_fp32_modules", None) or []
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
                if any(k in name.split(".") for k in keep) and t.is_floating_point():
                    t.data = t.data.float()
        self.geometry = WanGeometry.from_model(self.model, cfg.grid, cfg.text_len)
        gen = torch.Generator().manual_seed(cfg.seed)
        shape = (1, kw["in_channels"], *cfg.latent)
        self.x0 = torch.randn(shape, generator=gen).to(self.device, self.dtype)
        self.drift = torch.randn(shape, generator=gen).to(self.device, self.dtype)
        self.text = torch.randn(1, cfg.text_len, kw["text_dim"], generator=gen).to(self.device, self.dtype)
        blocks = list(self.model.blocks)
        self.block_timer = ModuleTimer(blocks, self.device)
        self.attn1_timer = ModuleTimer([b.attn1 for b in blocks], self.device)

    def close(self) -> None:
        self.block_timer.close()
        self.attn1_timer.close()

    @torch.no_grad()
    def _call(self, i: int, steps: int) -> None:
        x = self.x0 + (0.05 * i) * self.drift  # the latent moves between steps, as in sampling
        t = torch.tensor([999.0 * (1 - i / max(steps, 1))], device=self.device)
        with self.model.cache_context("cond", step_index=i, num_inference_steps=steps):
            self.model(hidden_states=x, timestep=t, encoder_hidden_states=self.text, return_dict=False)

    def time_setting(self, setting: Setting) -> dict:
        """One timed steady-state step at ``setting``: step, per-block and attn1-module seconds."""
        from vdit_accel.registry import apply

        warm = 1 + setting.order if not setting.dense else 0
        timed = self.cfg.timed_steps
        steps = warm + self.cfg.warmup + timed
        handle = None if setting.dense else apply(self.model, astraea_config(setting, warm, steps))
        try:
            self.model._reset_stateful_cache()
            for i in range(steps - timed):
                self._call(i, steps)
            self.block_timer.reset()
            self.attn1_timer.reset()
            self.block_timer.active = self.attn1_timer.active = True
            _sync(self.device)
            t0 = time.perf_counter()
            for i in range(steps - timed, steps):
                self._call(i, steps)
            _sync(self.device)
            step_s = (time.perf_counter() - t0) / timed
        finally:
            self.block_timer.active = self.attn1_timer.active = False
            self.model._reset_stateful_cache()
            if handle is not None:
                handle.remove()
        blocks = [t / timed for t in self.block_timer.times]
        return {"step_s": step_s, "blocks_s": blocks, "overhead_s": step_s - sum(blocks),
                "attn1_module_s": [t / timed for t in self.attn1_timer.times]}

    @torch.no_grad()
    def attention_op_s(self, setting: Setting, repeats: int) -> float:
        """Median seconds of the setting's self-attention op alone, at its shapes (0 when no row is computed)."""
        from vdit_accel.ops.attention import row_subset_attention

        geo = self.geometry
        rows = step_rows(geo, setting)
        if rows == 0:
            return 0.0
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        k, v = (torch.randn(1, geo.tokens, geo.heads, geo.head_dim, generator=gen).to(self.device, self.dtype)
                for _ in range(2))
        q = torch.randn(1, rows, geo.heads, geo.head_dim, generator=gen).to(self.device, self.dtype)
        if setting.dense:
            def op():
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        else:
            def op():
                return row_subset_attention(q, k, v)
        return _median_time(op, repeats, self.device)

    @torch.no_grad()
    def skipped_block_s(self, repeats: int) -> float:
        """Median seconds of a skipped block's elementwise work: ``hidden + cached residual`` at `[1, N, D]`."""
        geo = self.geometry
        h = torch.randn(1, geo.tokens, geo.dim, device=self.device, dtype=self.dtype)
        r = torch.randn_like(h)
        return _median_time(lambda: h + r, repeats, self.device)


def step_rows(geo: WanGeometry, setting: Setting) -> int:
    from vdit_accel.ops.astraea import budget_to_count

    return geo.tokens if setting.dense else budget_to_count(setting.budget, geo.tokens)


def _median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(max(repeats, 3)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compose(blocks_s: list[float], overhead_s: float, target_layers: int) -> float:
    """Step seconds at ``target_layers`` from measured per-block and overhead seconds (module docstring).

    Example:
        >>> compose([2.0, 3.0], 1.0, 30)  # 1 + 29·2 + 3
        62.0
    """
    if len(blocks_s) == 1:
        return overhead_s + target_layers * blocks_s[0]
    inner = statistics.fmean(blocks_s[:-1])
    return overhead_s + (target_layers - 1) * inner + blocks_s[-1]


def rotated(items: list, r: int) -> list:
    """``items`` started at position ``r mod len(items)``: repeat ``r``'s order, so that no setting always runs
    first (or right after dense) while the machine's speed drifts.

    Example:
        >>> rotated(["dense", "a", "b"], 1), rotated(["dense", "a", "b"], 3)
        (['a', 'b', 'dense'], ['dense', 'a', 'b'])
    """
    k = r % len(items)
    return items[k:] + items[:k]


def _median_of(samples: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def _summarise(setting: Setting, samples: list[dict], bench: StepBench, attn_s: float) -> dict:
    cfg, geo = bench.cfg, bench.geometry
    n = len(samples[0]["blocks_s"])
    blocks = [statistics.median(s["blocks_s"][j] for s in samples) for j in range(n)]
    overhead = _median_of(samples, "overhead_s")
    mean_block = statistics.fmean(blocks if n == 1 else blocks[:-1])
    return {
        "label": setting.label, "budget": setting.budget, "kv_reuse": setting.kv_reuse, "order": setting.order,
        "rows": step_rows(geo, setting),
        "step_measured_s": _median_of(samples, "step_s"),
        "step_measured_samples_s": [s["step_s"] for s in samples],
        "blocks_s": blocks, "overhead_s": overhead,
        "step_composed_s": compose(blocks, overhead, cfg.target_layers),
        "step_composed_samples_s": [compose(s["blocks_s"], s["overhead_s"], cfg.target_layers) for s in samples],
        "attn1_module_s": statistics.median(statistics.fmean(s["attn1_module_s"]) for s in samples),
        "attention_op_s": attn_s,
        "attention_share": attn_s / mean_block if mean_block > 0 and attn_s > 0 else None,
        "step_flops": step_flops(geo, setting, num_layers=cfg.target_layers),
        "flop_ceiling": ceiling(geo, setting, num_layers=cfg.target_layers),
    }


def run_step_bench(cfg: StepBenchConfig, out_dir: str | Path | None, *, settings: list[Setting] | None = None,
                   command: str | None = None, progress: bool = False) -> dict:
    """Time every setting (round-robin over ``cfg.repeats``); write ``bench-step.json`` and ``bench-step.md``.

    Args:
        cfg (`StepBenchConfig`): the benchmark (``--full``/``--tiny`` applied here).
        out_dir (`str | Path`): required; results are written there and nowhere else.
        settings (`list[Setting] | None`): default ``cfg.settings()``; dense is always measured.
        command (`str | None`): recorded command line (default ``sys.argv``).

    Returns:
        The results dictionary (what ``bench-step.json`` holds).
    """
    if out_dir is None:
        raise ConfigError("bench-step needs --out DIR: results are written there and nowhere else")
    from vdit_accel.bench.harness import machine_info

    cfg = cfg.effective()
    settings = list(dict.fromkeys([Setting()] + list(settings if settings is not None else cfg.settings())))
    skipped = {s.label: r for s in settings if (r := unsupported(s)) is not None}
    settings = [s for s in settings if s.label not in skipped]
    bench = StepBench(cfg)
    try:
        samples: dict[str, list[dict]] = {s.label: [] for s in settings}
        bench.time_setting(Setting())  # process warm-up (first-call allocations), not recorded
        for r in range(cfg.repeats):
            for s in rotated(settings, r):
                samples[s.label].append(bench.time_setting(s))
                if progress:
                    tqdm.write(f"repeat {r + 1}/{cfg.repeats} {s.label}: {samples[s.label][-1]['step_s']:.3f} s",
                               file=sys.stderr)
        rows = [_summarise(s, samples[s.label], bench, bench.attention_op_s(s, cfg.repeats)) for s in settings]
        skipped_block = bench.skipped_block_s(cfg.repeats)
    finally:
        bench.close()
    dense = rows[0]
    for row in rows:
        row["speedup"] = dense["step_composed_s"] / row["step_composed_s"]
        row["speedup_measured_layers"] = dense["step_measured_s"] / row["step_measured_s"]
        row["efficiency"] = row["speedup"] / row["flop_ceiling"]
        paired = paired_speedups(dense["step_composed_samples_s"], row["step_composed_samples_s"])
        row["speedup_paired_samples"] = paired["speedup_ratios"]
        row["speedup_paired"] = paired["speedup"]
        row["speedup_paired_iqr"] = [paired["speedup_q25"], paired["speedup_q75"]]
        row["efficiency_paired"] = row["speedup_paired"] / row["flop_ceiling"]
    inner = dense["blocks_s"][:-1] or dense["blocks_s"]
    results = {
        "format": RESULTS_FORMAT, "version": 1,
        "command": command or " ".join(sys.argv),
        **machine_info(),
        "threads": torch.get_num_threads(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.model_kwargs.items()},
        "geometry": {**bench.geometry.to_dict(), "device": str(bench.device), "dtype": cfg.dtype,
                     "target_layers": cfg.target_layers},
        "composition": (f"step_composed_s = overhead_s + (target_layers - 1) * mean(blocks_s[:-1]) + blocks_s[-1] "
                        f"(one layer: overhead_s + target_layers * blocks_s[0]); blocks and overhead measured at "
                        f"{cfg.layers} layers in one timed step, overhead = step - sum(blocks)"),
        "components": {"full_block_s": statistics.fmean(inner),
                       "attn1_s": dense["attn1_module_s"], "skipped_block_s": skipped_block,
                       "overhead_s": dense["overhead_s"], "target_layers": cfg.target_layers},
        "skipped_settings": skipped,
        "settings": rows,
    }
    write_step_results(results, Path(out_dir))
    return results


def latency_model_from(results: dict, kv_reuse: bool):
    """A :class:`~vdit_accel.search.latency.LatencyModel` of composed step costs relative to dense."""
    from vdit_accel.search.latency import LatencyModel

    rows = results["settings"]
    dense = rows[0]["step_composed_s"]
    costs = {(r["budget"], r["order"]): r["step_composed_s"] / dense for r in rows
             if r["budget"] >= 1.0 or r["budget"] == 0.0 or r["kv_reuse"] == kv_reuse}
    return LatencyModel(costs=costs, kv_reuse=kv_reuse, geometry=results["geometry"],
                        hardware=results["machine"], dense_step_s=dense, command=results["command"],
                        extra={"composition": results["composition"], "skipped_settings": results["skipped_settings"],
                               "measured": "step_composed_s per setting / dense, one process"})


def markdown(results: dict) -> str:
    g = results["geometry"]
    head = (f"Wan2.1-1.3B width, grid {'x'.join(map(str, g['grid']))} = {g['tokens']} tokens, {g['dtype']} on "
            f"{g['device']}; {results['config']['layers']} layers timed, composed for {g['target_layers']}\n\n")
    lines = ["| setting | rows | step (composed) s | speedup | paired speedup (IQR) | FLOP ceiling | efficiency | "
             "paired efficiency | attention share | step measured s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["settings"]:
        share = "-" if r["attention_share"] is None else f"{r['attention_share']:.3f}"
        paired, iqr = r.get("speedup_paired"), r.get("speedup_paired_iqr")  # absent in results made before v2
        pcell = "-" if paired is None else f"{paired:.2f} ({iqr[0]:.2f}-{iqr[1]:.2f})"
        peff = "-" if paired is None else f"{r['efficiency_paired']:.2f}"
        lines.append(f"| {r['label']} | {r['rows']} | {r['step_composed_s']:.4f} | {r['speedup']:.2f} | {pcell} | "
                     f"{r['flop_ceiling']:.2f} | {r['efficiency']:.2f} | {peff} | {share} | "
                     f"{r['step_measured_s']:.4f} |")
    tail = "".join(f"\nnot measured: {k} ({v})" for k, v in results["skipped_settings"].items())
    return head + "\n".join(lines) + "\n" + tail


def write_step_results(results: dict, out: Path) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench-step.json", json.dumps(results, indent=1)), ("bench-step.md", markdown(results))):
        with atomic_write(out / name) as tmp:  # an interrupted run never leaves a half-written file
            tmp.write_text(text)
