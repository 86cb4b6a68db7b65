"""torch.compile with a method active (issue 16 §5): graph breaks, recompiles across CFG branches and steps, and
compiled output against eager, on the tiny random-init model at a 4x4x4 token grid (64 tokens, 2 blocks).

Break and graph counts use ``torch._dynamo.utils.counters`` (``graph_break``: one entry per break reason, counted
at trace time; ``stats/unique_graphs``: graphs compiled). Counting tests compile with ``backend="eager"`` (Dynamo
only, no code generation), so a compiled run executes the same ATen ops as eager and its output is compared
bit for bit; the inductor tests allow float reassociation (``INDUCTOR_ATOL``).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from vdit_accel.context import CONTEXT_HOOK
from vdit_accel.methods.astraea import ROW_BUCKETS, AstraeaConfig, apply_astraea, compiled_row_counts, row_bucket
from vdit_accel.methods.timeripple import COMPILED_VARIANTS, TimeRippleConfig, apply_timeripple
from vdit_accel.ops.timeripple_compile import group_masks, timeripple_rows_attention
from vdit_accel.testing import tiny_model

STEPS = 6
TOKENS = 64  # latent (1, 3, 8, 16, 16) with patch (2, 4, 4): grid 4x4x4
INDUCTOR_ATOL = 1e-4  # compiled (inductor) vs eager, outputs of O(1): fused kernels reorder float sums only
RAMP = dict(theta_min=0.2, theta_max=0.5, i_min=1, i_max=3, num_steps=STEPS)
ON_GRID = (1.0, 0.5, 0.25, 0.5, 0.75, 1.0)  # every budget a multiple of 1/ROW_BUCKETS: compiled == eager counts
OFF_GRID = (1.0, 0.5, 0.3, 0.5, 0.25, 1.0)
WHOLE_STEP = (1.0, 0.0, 1.0, 0.0, 0.0, 1.0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 8, 16, 16, generator=g), torch.randn(1, 20, 16, generator=g), torch.zeros(1, 20, 16)


def _generate(m, generations: int = 1) -> list[torch.Tensor]:
    """``generations`` CFG generations of ``STEPS`` steps (cond and uncond calls per step); the outputs in order."""
    x, text, uncond = _inputs()
    outs = []
    with torch.no_grad():
        for _ in range(generations):
            for i in range(STEPS):
                for branch, emb in (("cond", text), ("uncond", uncond)):
                    with m.cache_context(branch, step_index=i, num_inference_steps=STEPS):
                        t = torch.tensor([1000.0 - 150 * i])
                        outs.append(m(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0])
            m._reset_stateful_cache()
    return outs


def _apply(m, method: str, **kw):
    if method == "timeripple":
        return apply_timeripple(m, TimeRippleConfig(**{**RAMP, **kw}))
    return apply_astraea(m, AstraeaConfig(num_steps=STEPS, **kw))


def _run(method: str, compile_mode: str | None, generations: int = 1, backend: str = "eager", **kw):
    """(outputs, stats summary, graph-break reasons, unique graphs) of a run from a fresh seeded model."""
    m = tiny_model().transformer
    handle = _apply(m, method, **kw)
    if compile_mode == "regional":
        m.compile_repeated_blocks(backend=backend, fullgraph=True)  # fullgraph: any break raises
    model = torch.compile(m, backend=backend) if compile_mode == "whole" else m
    counters.clear()
    outs = _generate(model, generations)
    breaks = dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    return outs, handle.stats.summary(), breaks, graphs, handle


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------- TimeRipple
@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
@pytest.mark.parametrize("mode", ["shared", "per_axis"])
def test_timeripple_exact_sim_regional_fullgraph_no_breaks_and_exact(mode):
    kw = dict(threshold_mode=mode, axis_scale=(1.0, 0.5, 2.0))
    eager, eager_stats, _, _, _ = _run("timeripple", None, **kw)
    outs, stats, breaks, graphs, _ = _run("timeripple", "regional", **kw)
    assert breaks == {}
    assert 1 <= graphs <= COMPILED_VARIANTS  # dense step and reuse step, shared by both blocks and CFG branches
    assert _same(outs, eager)
    assert stats["active_calls"] == eager_stats["active_calls"] > 0
    assert stats["qk_savings_active"] == eager_stats["qk_savings_active"] > 0
    assert stats["dense_calls"] == eager_stats["dense_calls"] > 0


@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
def test_timeripple_per_channel_regional_close():
    eager, eager_stats, _, _, _ = _run("timeripple", None, threshold_mode="per_channel")
    outs, stats, breaks, graphs, _ = _run("timeripple", "regional", threshold_mode="per_channel")
    assert breaks == {} and graphs <= COMPILED_VARIANTS
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(outs, eager))
    assert stats["active_calls"] == eager_stats["active_calls"] > 0


# the row-removing variants, each at a ramp whose removed counts differ between calls (data-dependent shapes)
ROW_RAMPS = {"exact_rows": (1.0, 3.0), "token_rows": (1.0, 3.0), "tokens": (0.6, 0.99)}


@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
@pytest.mark.parametrize("variant,key_merge", [(v, "root") for v in sorted(ROW_RAMPS)] + [("tokens", "mean")])
def test_timeripple_row_removing_variants_regional_fullgraph(variant, key_merge):
    """The variants that remove rows and keys compile with fullgraph=True: one opaque op per call
    (ops.timeripple_compile), exact against eager (the op runs the eager function: tolerance 0), stats equal,
    rows and keys removed in counts that vary across calls, and the same COMPILED_VARIANTS graphs for all of them
    ("tokens" also with mean-key merging, which reaches the op as an argument)."""
    lo, hi = ROW_RAMPS[variant]
    kw = dict(variant=variant, theta_min=lo, theta_max=hi) | ({"key_merge": key_merge} if key_merge != "root" else {})
    eager, eager_stats, _, _, _ = _run("timeripple", None, **kw)
    outs, stats, breaks, graphs, handle = _run("timeripple", "regional", **kw)
    assert breaks == {}
    assert graphs == COMPILED_VARIANTS  # a dense step and a reuse step, whatever the removed counts
    assert _same(outs, eager)
    assert stats == eager_stats
    assert stats["rows_removed_active"] > 0 and stats["keys_removed_active"] > 0
    removed = {(s.rows_removed, s.keys_removed) for s in handle.stats.calls.values()}
    assert len(removed) >= 3  # the counts are data dependent, the graphs are not
    assert len(handle.stats.calls) == 2 * 2 * (STEPS - 2)  # branches x blocks x reuse steps: every call recorded


@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
def test_timeripple_row_removing_variant_oracle_under_compile():
    """θ far above every spread: 7 of 8 rows and keys removed on the even 4x4x4 grid, compiled as eager."""
    outs, stats, breaks, graphs, _ = _run("timeripple", "regional", variant="exact_rows", theta_min=50.0,
                                          theta_max=100.0)
    assert breaks == {} and graphs == COMPILED_VARIANTS
    assert stats["rows_removed_active"] == stats["keys_removed_active"] == 0.875


@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
@pytest.mark.parametrize("variant", ["exact_sim", "exact_rows"])
def test_timeripple_on_ltx_regional_fullgraph_exact(variant):
    """Another family: LTX-Video, whose RoPE groups are bool [H, D] masks (traced as graph constants)."""
    from tiny_pipelines import ltx_inputs, tiny_ltx

    def run(compiled: bool):
        m = tiny_ltx()
        handle = apply_timeripple(m, TimeRippleConfig(variant=variant, theta_min=1.0, theta_max=3.0, i_min=1,
                                                      i_max=2, num_steps=4))
        if compiled:
            m.compile_repeated_blocks(backend="eager", fullgraph=True)
        counters.clear()
        outs = []
        with torch.no_grad():
            for i in range(4):
                for branch in ("cond", "uncond"):
                    with m.cache_context(branch, step_index=i, num_inference_steps=4):
                        outs.append(m(**ltx_inputs(seed=i) | {"timestep": torch.tensor([900 - 200 * i] * 2)})[0])
        return outs, handle.stats.summary(), dict(counters["graph_break"]), counters["stats"]["unique_graphs"]

    eager, eager_stats, _, _ = run(False)
    torch._dynamo.reset()
    outs, stats, breaks, graphs = run(True)
    assert breaks == {} and graphs == COMPILED_VARIANTS
    assert _same(outs, eager) and stats == eager_stats and stats["q_reuse_group_t"] > 0


@pytest.mark.parametrize("variant", sorted(ROW_RAMPS))
def test_rows_attention_op_passes_opcheck(variant):
    """The custom op's schema, fake (meta) implementation and dispatch agree with its real implementation."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 10, 2, 6, generator=g) for _ in range(3))
    groups = group_masks({"t": slice(0, 2), "h": slice(2, 4), "w": slice(4, 6)}, 2, 6, "cpu")
    args = (q, k, v, torch.tensor(0.9, dtype=torch.float64), groups, [2, 2, 2], variant, "shared", [1.0, 1.0, 1.0],
            None, 2, "thw", "thw", 2, 0, True, True)
    assert set(torch.library.opcheck(timeripple_rows_attention, args).values()) == {"SUCCESS"}


# ----------------------------------------------------------------------------------------------------- Astraea
@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
@pytest.mark.parametrize("budgets,extra", [(ON_GRID, {}), (ON_GRID, {"forecast": 2}), (WHOLE_STEP, {"forecast": 1}),
                                           (ON_GRID, {"selection": "fixed"}), (ON_GRID, {"kv_reuse": True}),
                                           (ON_GRID, {"forecast": 2, "forecast_axis": "timestep"}),
                                           (WHOLE_STEP, {"forecast": 1, "forecast_axis": "timestep"})])
def test_astraea_regional_fullgraph_no_breaks_and_exact(budgets, extra):
    eager, eager_stats, _, _, _ = _run("astraea", None, budgets=budgets, **extra)
    outs, stats, breaks, graphs, handle = _run("astraea", "regional", budgets=budgets, **extra)
    assert breaks == {}
    assert graphs < torch._dynamo.config.recompile_limit  # no fallback to eager from the recompile limit
    assert _same(outs, eager)
    assert stats["kept_ratio_per_step"] == eager_stats["kept_ratio_per_step"]
    assert stats["forecast_calls"] == eager_stats["forecast_calls"]
    assert handle.stats.bucketed == {}


@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
def test_astraea_every_bucket_stays_under_the_recompile_limit():
    """A schedule using all seven intermediate buckets (and forecasts): the row count varies every step, yet the
    graphs stay under Dynamo's recompile_limit (Dynamo makes the bucket a symbolic size after its first change)."""
    budgets = (1.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    m = tiny_model().transformer
    handle = apply_astraea(m, AstraeaConfig(budgets=budgets, num_steps=len(budgets), forecast=1))
    m.compile_repeated_blocks(backend="eager", fullgraph=True)
    x, text, uncond = _inputs()
    with torch.no_grad():
        for i in range(len(budgets)):
            for branch, emb in (("cond", text), ("uncond", uncond)):
                with m.cache_context(branch, step_index=i, num_inference_steps=len(budgets)):
                    m(hidden_states=x, timestep=torch.tensor([900.0 - 90 * i]), encoder_hidden_states=emb)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] < torch._dynamo.config.recompile_limit
    assert handle.stats.summary()["kept_ratio_per_step"] == list(budgets) and handle.stats.bucketed == {}


@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
def test_astraea_budget_rounding_is_visible(caplog):
    with caplog.at_level(logging.WARNING, logger="vdit_accel.methods.astraea"):
        outs, stats, breaks, graphs, handle = _run("astraea", "regional", budgets=OFF_GRID)
    assert breaks == {}
    assert handle.stats.bucketed == {0.3: 0.375}  # 0.3 -> ceil(0.3*8)/8 of 64 rows
    assert stats["kept_ratio_per_step"][2] == 0.375
    assert "rounded budgets up to row buckets" in caplog.text


def test_row_buckets_bound_the_row_counts():
    assert [row_bucket(b) for b in (0.0, 1e-6, 0.125, 0.2, 0.99, 1.0)] == [0, 1, 1, 2, 8, 8]
    counts = compiled_row_counts(AstraeaConfig(num_steps=50, target=0.37), 32760)
    assert len(counts) <= ROW_BUCKETS + 1 and counts[-1] == 32760
    every = AstraeaConfig(budgets=(1.0, 0.0, *(i / 47 for i in range(48))), num_steps=50)
    assert len(compiled_row_counts(every, 1000)) == ROW_BUCKETS + 1  # 0 and the eight buckets, whatever the schedule


# --------------------------------------------------------------------------------- recompiles, whole module
@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
@pytest.mark.parametrize("method,kw", [("timeripple", {}), ("astraea", {"budgets": ON_GRID}),
                                       ("timeripple", {"variant": "tokens", "theta_min": 0.6, "theta_max": 0.99})])
def test_no_recompiles_after_the_first_generation(method, kw):
    m = tiny_model().transformer
    _apply(m, method, **kw)
    m.compile_repeated_blocks(backend="eager", fullgraph=True)
    _generate(m)
    first = counters["stats"]["unique_graphs"]
    _generate(m, generations=2)
    assert counters["stats"]["unique_graphs"] == first  # steady state: steps and CFG branches reuse the graphs


@pytest.mark.slow  # compiles (Dynamo tracing, 5-20 s on a loaded 2-core machine)
@pytest.mark.parametrize("method,kw", [("timeripple", {}), ("astraea", {"budgets": ON_GRID}),
                                       ("timeripple", {"variant": "exact_rows", "theta_min": 1.0, "theta_max": 3.0})])
def test_whole_module_compile_breaks_only_at_the_context_hook(method, kw):
    eager, _, _, _, _ = _run(method, None, **kw)
    outs, _, breaks, graphs, _ = _run(method, "whole", **kw)
    assert len(breaks) == 1 and "ContextHook.pre_forward" in next(iter(breaks))
    assert graphs < torch._dynamo.config.recompile_limit
    assert _same(outs, eager)


def test_context_hook_keeps_the_timestep_on_the_device():
    m = tiny_model().transformer
    handle = apply_timeripple(m, TimeRippleConfig(**RAMP))
    x, text, _ = _inputs()
    t = torch.tensor([700.0])
    with torch.no_grad(), m.cache_context("cond", step_index=0, num_inference_steps=STEPS):
        m(hidden_states=x, timestep=t, encoder_hidden_states=text)
    hook = m._diffusers_hook.get_hook(CONTEXT_HOOK)
    assert hook.current.timestep_raw is t and hook.current.timestep == 700.0
    handle.remove()


# ------------------------------------------------------------------------------------------------- inductor
@pytest.mark.slow
@pytest.mark.parametrize("method,kw", [("astraea", {"budgets": ON_GRID, "forecast": 1}),
                                       ("timeripple", {"variant": "tokens", "theta_min": 0.6, "theta_max": 0.99})])
def test_inductor_regional_close_to_eager(method, kw):
    eager, _, _, _, _ = _run(method, None, **kw)
    outs, _, breaks, _, _ = _run(method, "regional", backend="inductor", **kw)
    assert breaks == {}
    assert all(torch.allclose(a, b, atol=INDUCTOR_ATOL, rtol=0) for a, b in zip(outs, eager))
