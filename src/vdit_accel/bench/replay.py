"""Replay: the W2 (real-width) time of any schedule, from decisions and measured per-choice costs.

**Astraea schedules** (a config, or a preset loaded with :func:`vdit_accel.search.presets.load_preset`):

- :func:`predict_astraea_speedup` prices each step's :class:`~vdit_accel.search.latency.StepChoice`
  (budget, forecast order) with a measured :class:`~vdit_accel.search.latency.LatencyModel`
  (``vdit-accel bench-step --latency-model``);
- :func:`measure_astraea_kinds` really runs the schedule's distinct step kinds at W2 (one ``bench-step`` run over
  just those settings) and sums their composed step times over the schedule.

**Peers** (diffusers caches: TaylorSeer, MagCache, FirstBlockCache, PAB, FasterCache): a :class:`DecisionRecorder`
attached to the W1 transformer (the embedded model, the same ``WanTransformer3DModel`` class) while the peer
runs records, per root call (CFG branch, step) and block, which of the block's three components really executed:
self-attention, cross-attention, FFN. It counts calls of each component's *output projection* (the last
``nn.Linear`` inside ``attn1``, ``attn2``, ``ffn``) with ``register_forward_hook`` handles, removed on
:meth:`DecisionRecorder.detach`; a cache hook that returns a stored output (on the block, as FBC/TaylorSeer/MagCache
do, or on the attention module, as PAB/FasterCache do) never reaches that projection, so the skip is seen.
:func:`replay_speedup` then prices every call at W2 from :class:`ComponentCosts` measured by ``bench-step``:

=================  ================================================================================
block kind         W2 cost
=================  ================================================================================
``full``           ``full_block_s`` (dense block)
``attn1_skipped``  ``full_block_s - attn1_s`` (the block without its self-attention module)
``skipped``        ``skipped_block_s`` (elementwise ``hidden + cached residual`` at `[1, N, D]`)
=================  ================================================================================

A call costs ``overhead_s + (target_layers / recorded_blocks) · Σ_blocks cost(kind)``; the dense reference is
``overhead_s + target_layers · full_block_s`` per call. What is replayed: the peer's decisions as the instrument
made them (which block components ran at which step and branch, how many calls). What is not: the peer's own
bookkeeping (its threshold checks, Taylor updates beyond the elementwise cost of one skipped block), and the
kernels and shapes, which are W2's as ``bench-step`` measured them; the W1 decisions are assumed to transfer to
W2 (same class, same schedule), and blocks are scaled uniformly from the W1 depth to ``target_layers``.

Example:
    >>> costs = ComponentCosts(full_block_s=1.0, attn1_s=0.5, skipped_block_s=0.0, overhead_s=0.0, target_layers=2)
    >>> full, skip = BlockDecision(True, True, True), BlockDecision(False, False, False)
    >>> calls = [CallDecision("cond", 0, (full, full)), CallDecision("cond", 1, (full, skip))]
    >>> replay_speedup(calls, costs)["speedup"]
    1.3333333333333333
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from vdit_accel.errors import ConfigError

COMPONENTS = ("attn1", "attn2", "ffn")


@dataclass(frozen=True)
class BlockDecision:
    """Which components of one block ran in one call."""

    attn1: bool
    attn2: bool
    ffn: bool

    @property
    def kind(self) -> str:
        ran = (self.attn1, self.attn2, self.ffn)
        if all(ran):
            return "full"
        if not any(ran):
            return "skipped"
        if ran == (False, True, True):
            return "attn1_skipped"
        return "partial"


@dataclass(frozen=True)
class CallDecision:
    """One transformer call: its CFG branch, step index and per-block decisions."""

    branch: str
    step: int
    blocks: tuple[BlockDecision, ...]


def _probe(module: torch.nn.Module) -> torch.nn.Module:
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(module).__name__} has no nn.Linear to probe: cannot tell whether it ran")
    return linears[-1]


class DecisionRecorder:
    """Records what really executed, per root call and block (see the module docstring).

    Example:
        >>> from vdit_accel.testing import tiny_model, TINY_PROMPT
        >>> from vdit_accel.instrument.sampler import GenerationConfig, Sampler
        >>> model = tiny_model()
        >>> with DecisionRecorder(model.transformer) as rec:
        ...     _ = Sampler(model)(TINY_PROMPT, GenerationConfig(steps=2, guidance=1.0), progress=False)
        >>> [(c.branch, c.step, [b.kind for b in c.blocks]) for c in rec.decisions]
        [('cond', 0, ['full', 'full']), ('cond', 1, ['full', 'full'])]
    """

    def __init__(self, transformer: torch.nn.Module, adapter=None) -> None:
        from vdit_accel.adapters import resolve_adapter

        self.transformer = transformer
        self.adapter = adapter or resolve_adapter(transformer)
        self.decisions: list[CallDecision] = []
        self._handles: list = []
        self._context = None
        self._ran: list[dict[str, bool]] | None = None

    def attach(self) -> DecisionRecorder:
        from vdit_accel.context import acquire_context

        if self._handles:
            raise ConfigError("this DecisionRecorder is already attached")
        self._context = acquire_context(self.transformer, self.adapter)
        blocks = self.adapter.blocks(self.transformer)
        self._handles.append(self.transformer.register_forward_pre_hook(self._open))
        self._handles.append(self.transformer.register_forward_hook(self._close))
        for i, block in enumerate(blocks):
            for name in COMPONENTS:
                self._handles.append(_probe(getattr(block, name)).register_forward_hook(self._mark(i, name)))
        self._n_blocks = len(blocks)
        return self

    def detach(self) -> None:
        from vdit_accel.context import release_context

        for h in self._handles:
            h.remove()
        if self._handles:
            release_context(self.transformer)
        self._handles = []

    def __enter__(self) -> DecisionRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _open(self, module, args):
        self._ran = [dict.fromkeys(COMPONENTS, False) for _ in range(self._n_blocks)]

    def _mark(self, i: int, name: str):
        def hook(module, args, out):
            if self._ran is not None:
                self._ran[i][name] = True
        return hook

    def _close(self, module, args, out):
        ctx = self._context.current
        branch, step = (ctx.branch, ctx.step_index) if ctx is not None else ("default", len(self.decisions))
        blocks = tuple(BlockDecision(**r) for r in self._ran)
        self.decisions.append(CallDecision(branch, step, blocks))
        self._ran = None

    def summary(self) -> dict:
        kinds = Counter(b.kind for c in self.decisions for b in c.blocks)
        return {"calls": len(self.decisions), "blocks": dict(kinds)}


@dataclass(frozen=True)
class ComponentCosts:
    """Measured W2 seconds per block kind and per call outside the blocks (``bench-step``'s ``components``)."""

    full_block_s: float
    attn1_s: float
    skipped_block_s: float
    overhead_s: float
    target_layers: int

    def __post_init__(self) -> None:
        for f in ("full_block_s", "attn1_s", "skipped_block_s", "overhead_s"):
            if getattr(self, f) < 0:
                raise ConfigError(f"{f}={getattr(self, f)} is out of range: accepted >= 0")
        if self.attn1_s > self.full_block_s:
            raise ConfigError(f"attn1_s={self.attn1_s} exceeds full_block_s={self.full_block_s}")

    @classmethod
    def from_results(cls, results: dict) -> ComponentCosts:
        """From a ``bench-step.json`` dict (its ``components``)."""
        c = results["components"]
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})

    def block(self, kind: str) -> float:
        costs = {"full": self.full_block_s, "attn1_skipped": self.full_block_s - self.attn1_s,
                 "skipped": self.skipped_block_s}
        if kind not in costs:
            raise ConfigError(f"block kind {kind!r} has no measured W2 cost: priced kinds {sorted(costs)}")
        return costs[kind]


def replay_speedup(decisions: list[CallDecision], costs: ComponentCosts) -> dict:
    """Dense and replayed W2 seconds of the recorded calls, and their ratio (module docstring).

    Returns:
        `dict` with ``dense_s``, ``replay_s``, ``speedup``, ``calls`` and ``block_kinds`` (counts).
    """
    if not decisions:
        raise ConfigError("no recorded calls to replay: attach the DecisionRecorder before generating")
    dense = replay = 0.0
    for call in decisions:
        scale = costs.target_layers / len(call.blocks)
        dense += costs.overhead_s + costs.target_layers * costs.full_block_s
        replay += costs.overhead_s + scale * sum(costs.block(b.kind) for b in call.blocks)
    return {"dense_s": dense, "replay_s": replay, "speedup": dense / replay, "calls": len(decisions),
            "block_kinds": dict(Counter(b.kind for c in decisions for b in c.blocks))}


# ------------------------------------------------------------------------------------------------------ Astraea
def astraea_choices(config) -> list:
    """The per-step :class:`~vdit_accel.search.latency.StepChoice` of an AstraeaConfig (order 0 without forecast)."""
    from vdit_accel.search.latency import StepChoice

    orders = getattr(config, "orders", None) or (0,) * config.num_steps
    return [StepChoice(b, int(o)) for b, o in zip(config.schedule, orders, strict=True)]


def predict_astraea_speedup(config, latency_model) -> float:
    """Predicted W2 speedup of an Astraea schedule from a measured latency model.

    Raises:
        ConfigError: the model measured another K/V mode than the config uses, or a choice outside its range.
    """
    kv = bool(getattr(config, "kv_reuse", False))
    if latency_model.kv_reuse != kv:
        raise ConfigError(f"the latency model measured kv_reuse={latency_model.kv_reuse} but the config has "
                          f"kv_reuse={kv}")
    return latency_model.speedup(astraea_choices(config))


def measure_astraea_kinds(config, bench_cfg, out_dir: str | Path) -> dict:
    """Really run the schedule's distinct step kinds at W2 (``bench-step`` over those settings) and sum them.

    Returns:
        `dict` with ``speedup`` (dense schedule / this schedule, composed step times), ``kinds`` (label -> steps)
        and ``results`` (the bench-step results, also written to ``out_dir``).
    """
    from vdit_accel.bench.flops import Setting
    from vdit_accel.bench.step import run_step_bench

    kv = bool(getattr(config, "kv_reuse", False))
    settings = [Setting(budget=c.budget, kv_reuse=kv, order=c.order) for c in astraea_choices(config)]
    results = run_step_bench(bench_cfg, out_dir, settings=list(dict.fromkeys(settings)),
                             command=f"measure_astraea_kinds({config!r})")
    by_label = {r["label"]: r["step_composed_s"] for r in results["settings"]}
    missing = sorted({s.label for s in settings} - set(by_label))
    if missing:
        raise ConfigError(f"step kinds {missing} could not be measured: {results['skipped_settings']}")
    total = sum(by_label[s.label] for s in settings)
    return {"speedup": len(settings) * by_label["dense"] / total,
            "kinds": dict(Counter(s.label for s in settings)), "results": results}
