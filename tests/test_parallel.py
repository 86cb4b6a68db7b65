"""Context parallelism (diffusers' Ulysses / Ring) on CPU with gloo: multi-process runs against one process.

The multi-process tests start real ranks (``vdit_accel.parallel.spawn``: fresh processes, gloo, collective and
launcher timeouts) and run several scenarios per launch, so each launch's start-up (imports) is paid once; the
module-scoped fixtures hold the per-rank results and the tests compare them with one-process references computed
here. Tolerances, where not bit-exact, are stated with their reason next to the assertion.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

import vdit_accel
from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.parallel import ParallelError, check_split, degrees_for, spawn
from vdit_accel.parallel.cp import cpu_workarounds, simulate_rank_selection
from vdit_accel.testing import TINY_PROMPT

GEN = GenerationConfig(steps=4, guidance=2.0, seed=3, frames=8, height=16, width=16)  # 4x4x4 = 64 tokens, CFG on
SPARSE = AstraeaConfig(budgets=(1.0, 0.5, 0.25, 0.5), num_steps=4)
SPARSE_KV = AstraeaConfig(budgets=(1.0, 0.5, 0.25, 0.5), num_steps=4, kv_reuse=True, forecast=1)
DENSE_BUDGET = AstraeaConfig(budgets=(1.0, 1.0, 1.0, 1.0), num_steps=4)
TR = TimeRippleConfig(theta_min=0.2, theta_max=0.5, i_min=1, i_max=2, num_steps=4)  # exact_sim: ~45% q reuse
TR_PER_CHANNEL = dataclasses.replace(TR, threshold_mode="per_channel")
TR_TOKENS = TimeRippleConfig(theta_min=0.3, theta_max=0.6, i_min=1, i_max=2, num_steps=4, variant="tokens")
TAYLORSEER = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                   cache_identifiers=[r"^blocks\.\d+$"])
TR_STATS = ("q_reuse_active", "k_reuse_active", "qk_savings_active", "active_calls", "dense_calls")


def _model(heads: int = 2) -> EmbeddedModel:
    torch.manual_seed(1234)
    cfg = EmbeddedConfig.tiny()
    if heads != cfg.num_heads:
        cfg = dataclasses.replace(cfg, num_heads=heads, head_dim=12)
    return EmbeddedModel(cfg).eval()


def _generate(model: EmbeddedModel, gen: GenerationConfig = GEN) -> torch.Tensor:
    return Sampler(model)(TINY_PROMPT, gen, progress=False)


def _single(heads: int, config: AstraeaConfig | None = None, groups: int = 1) -> torch.Tensor:
    """One process: dense, or Astraea selecting as ``groups`` ranks would (``groups=1``: global top-k)."""
    model = _model(heads)
    if config is None:
        return _generate(model)
    handle = apply_astraea(model.transformer, config)
    simulate_rank_selection(handle, groups)
    try:
        return _generate(model)
    finally:
        handle.remove()


def _timeripple(model: EmbeddedModel, config: TimeRippleConfig, *, apply=None) -> tuple[torch.Tensor, dict]:
    """TimeRipple on ``model`` (through ``vdit_accel.apply`` unless ``apply`` is given); the video and its stats."""
    handle = (apply or vdit_accel.apply)(model.transformer, config)
    video = _generate(model)
    summary = handle.stats["timeripple"] if isinstance(handle, vdit_accel.AccelHandle) else handle.stats.summary()
    handle.remove()
    return video, {k: summary[k] for k in TR_STATS}


# ----------------------------------------------------------------------------------------- rank scenarios
def _scenarios_ulysses(rank: int, world: int, heads: int) -> dict:
    """Every Ulysses scenario on this rank; each on a fresh model (enable_parallelism runs once per model)."""
    from vdit_accel.parallel import enable_context_parallel

    out: dict = {}

    def cp_model():
        m = _model(heads)
        enable_context_parallel(m.transformer, ulysses=world)
        return m

    out["dense"] = _generate(cp_model())
    # Astraea applied BEFORE enable_parallelism (plain apply_astraea) and AFTER it (vdit_accel.apply re-orders)
    m = _model(heads)
    h = vdit_accel.apply(m.transformer, SPARSE)
    enable_context_parallel(m.transformer, ulysses=world)
    out["sparse_before"] = _generate(m)
    out["sparse_before_kept"] = h.stats["astraea"]["kept_ratio"]
    h.remove()
    out["after_remove"] = _generate(m)  # CP still on, Astraea removed: dense CP again
    m = cp_model()
    h = vdit_accel.apply(m.transformer, SPARSE)
    out["sparse_after"] = _generate(m)
    m = cp_model()
    with vdit_accel.apply(m.transformer, DENSE_BUDGET):
        out["budget1"] = _generate(m)
    m = cp_model()
    with vdit_accel.apply(m.transformer, SPARSE_KV):
        out["sparse_kv"] = _generate(m)
    # direct apply_astraea after enable_parallelism: refused, naming the order
    m = cp_model()
    try:
        apply_astraea(m.transformer, SPARSE)
        out["direct_after"] = "no error"
    except vdit_accel.errors.CompositionError as err:
        out["direct_after"] = str(err)
    # TimeRipple inside the Ulysses op: applied after CP (vdit_accel.apply) and before it (plain apply_timeripple)
    out["tr_after"], out["tr_after_stats"] = _timeripple(cp_model(), TR)
    m = _model(heads)
    h = apply_timeripple(m.transformer, TR)
    enable_context_parallel(m.transformer, ulysses=world)
    out["tr_before"] = _generate(m)
    out["tr_before_stats"] = {k: h.stats.summary()[k] for k in TR_STATS}
    h.remove()
    out["tr_removed"] = _generate(m)  # CP still on, TimeRipple removed: dense CP again
    out["tr_per_channel"], _ = _timeripple(cp_model(), TR_PER_CHANNEL)
    out["tr_tokens"], out["tr_tokens_stats"] = _timeripple(cp_model(), TR_TOKENS)
    try:  # with Astraea: its CP rows attention would skip TimeRipple's rows_attention: refused
        vdit_accel.apply(cp_model().transformer, [SPARSE, TR])
        out["tr_astraea"] = "no error"
    except ParallelError as err:
        out["tr_astraea"] = str(err)
    # diffusers' caches through vdit_accel.apply after CP: TaylorSeer (fixed schedule) per rank; FBC refused
    m = cp_model()
    with vdit_accel.apply(m.transformer, TAYLORSEER):
        out["taylorseer"] = _generate(m)
    try:
        vdit_accel.apply(cp_model().transformer, FirstBlockCacheConfig(threshold=0.3))
        out["fbc"] = "no error"
    except ParallelError as err:
        out["fbc"] = str(err)
    # uneven token count: 3x3x3 = 27 tokens on `world` ranks
    try:
        _generate(cp_model(), GEN.replace(frames=6, height=12, width=12))
        out["uneven"] = "no error"
    except ParallelError as err:
        out["uneven"] = str(err)
    return out


def _scenarios_ring(rank: int, world: int, heads: int, ulysses: int) -> dict:
    from vdit_accel.parallel import enable_context_parallel

    out: dict = {}
    m = _model(heads)
    enable_context_parallel(m.transformer, ulysses=ulysses, ring=world // ulysses)
    out["dense"] = _generate(m)
    m = _model(heads)
    enable_context_parallel(m.transformer, ulysses=ulysses, ring=world // ulysses)
    with vdit_accel.apply(m.transformer, SPARSE):
        out["sparse"] = _generate(m)
        try:  # TimeRipple on a Ring model: refused at apply time
            vdit_accel.apply(m.transformer, TR)
            out["tr_after"] = "no error"
        except ParallelError as err:
            out["tr_after"] = str(err)
    m = _model(heads)
    vdit_accel.apply(m.transformer, TR)
    try:  # ... and when TimeRipple came first: at enable time
        enable_context_parallel(m.transformer, ulysses=ulysses, ring=world // ulysses)
        out["tr_before"] = "no error"
    except ParallelError as err:
        out["tr_before"] = str(err)
    torch.distributed.barrier()  # no rank leaves (ending the store) while another still builds its mesh's groups
    return out


def _scenarios_cfg(rank: int, world: int) -> dict:
    """CFG parallelism x Ulysses 2 on 4 ranks: ranks 0-1 the cond branch, ranks 2-3 the uncond branch."""
    from vdit_accel.parallel import cfg_parallel_generate, enable_cfg_context_parallel

    out: dict = {}
    m = _model(2)
    cfg = enable_cfg_context_parallel(m.transformer, ulysses=2)
    out["branch"] = cfg.branch
    out["dense"] = cfg_parallel_generate(m, TINY_PROMPT, GEN, cfg)
    m = _model(2)
    h = vdit_accel.apply(m.transformer, SPARSE)
    cfg = enable_cfg_context_parallel(m.transformer, ulysses=2)
    out["sparse"] = cfg_parallel_generate(m, TINY_PROMPT, GEN, cfg)
    out["branches_seen"] = sorted({k[0] for k in h.applied[0][2].stats.kept})
    try:
        cfg_parallel_generate(m, TINY_PROMPT, GEN.replace(guidance=1.0), cfg)
        out["no_guidance"] = "no error"
    except ParallelError as err:
        out["no_guidance"] = str(err)
    return out


def _fail_on_rank_one(rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank one broke on purpose")
    dist.all_reduce(torch.ones(3))  # rank 0 waits here for a peer that never comes
    dist.barrier()


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def record_diff():
    """``record(name, a, b)``: the max |a - b| of a comparison within a stated tolerance, kept and, when the
    environment variable ``VDIT_RECORD_DIFFS`` names a JSON file, merged into it at the end of the module (how
    docs/parallel.md's measured differences are made); returns the difference."""
    found: dict[str, float] = {}

    def record(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
        diff = float((a - b).abs().max())
        found[name] = max(found.get(name, 0.0), diff)
        return diff

    yield record
    path = os.environ.get("VDIT_RECORD_DIFFS")
    if path and found:
        out = Path(path)
        merged = json.loads(out.read_text()) if out.exists() else {}
        merged.update({name: {"max_abs_diff": diff, "on": "the [-1, 1] video, 4 steps, CFG 2, max over ranks"}
                       for name, diff in found.items()})
        merged["_how"] = ("written by tests/test_parallel.py's record_diff fixture: VDIT_RECORD_DIFFS=<this file> "
                          "python -m pytest tests/test_parallel.py -k 'pooled or ring_two or hybrid'")
        out.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def ulysses2():
    return spawn(_scenarios_ulysses, 2, 2, timeout=240)


@pytest.fixture(scope="module")
def single2():
    model = _model(2)
    with vdit_accel.apply(model.transformer, TAYLORSEER):
        taylorseer = _generate(model)
    return {"dense": _single(2), "sparse_global": _single(2, SPARSE), "sparse_rank2": _single(2, SPARSE, 2),
            "sparse_kv_rank2": _single(2, SPARSE_KV, 2), "taylorseer": taylorseer}


@pytest.fixture(scope="module")
def single_tr():
    return {name: _timeripple(_model(2), config) for name, config in
            (("exact", TR), ("per_channel", TR_PER_CHANNEL), ("tokens", TR_TOKENS))}


# ------------------------------------------------------------------------------------------- fast tests
def test_check_split_refuses_uneven_tokens_and_heads():
    check_split((4, 4, 4), 4, ulysses=4, ring=1)
    with pytest.raises(ParallelError, match="27 tokens, not divisible by the 2"):
        check_split((3, 3, 3), 2, ulysses=2, ring=1)
    with pytest.raises(ParallelError, match="12 attention heads do not split over ulysses_degree=8"):
        check_split((4, 4, 4), 12, ulysses=8, ring=1)


def test_degrees_for_prefers_ulysses_up_to_the_head_count():
    assert degrees_for(8, 12) == (4, 2)
    assert degrees_for(4, 2) == (2, 2)
    assert degrees_for(1, 2) == (1, 1)
    with pytest.raises(ParallelError):
        degrees_for(0, 2)


def test_cpu_workarounds_are_scoped():
    from diffusers.hooks import context_parallel as cp_hooks

    count = torch.accelerator.device_count
    had = hasattr(cp_hooks.logger, "warning_once") and "warning_once" in vars(cp_hooks.logger)
    with cpu_workarounds():
        assert torch.accelerator.device_count() >= 1
        assert hasattr(cp_hooks.logger, "warning_once")
    assert torch.accelerator.device_count is count
    assert ("warning_once" in vars(cp_hooks.logger)) == had


def test_timeripple_refuses_ring_at_call_time():
    """A user's own ``enable_parallelism`` with Ring (not ``enable_context_parallel``, which refuses earlier): the
    processor refuses at its first call, dense steps included, naming Ring."""
    from types import SimpleNamespace

    model = _model(2)
    handle = apply_timeripple(model.transformer, TR)
    ring = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_anything=False))
    for block in model.transformer.blocks:
        block.attn1.get_processor()._parallel_config = ring
    with pytest.raises(ParallelError, match=r"TimeRipple under Ring context parallelism \(ring_degree=2\)"):
        _generate(model)
    handle.remove()


def test_rank_selection_reference_differs_from_global_and_is_balanced(single2):
    """The per-rank reference is a different selection from the global top-k (else the CP test proves nothing)."""
    assert not torch.equal(single2["sparse_rank2"], single2["sparse_global"])
    model = _model(2)
    handle = apply_astraea(model.transformer, SPARSE)
    simulate_rank_selection(handle, 2)
    seen = []
    hook = model.transformer.blocks[0]._diffusers_hook.get_hook("vdit_accel.astraea")
    original = hook._scores_topk
    hook._scores_topk = lambda *a: seen.append(original(*a)) or seen[-1]
    _generate(model)
    handle.remove()
    assert seen
    for idx in seen:  # equal count in each half of the sequence: load-balanced by construction
        halves = (idx < 32).sum(dim=1), (idx >= 32).sum(dim=1)
        assert torch.equal(halves[0], halves[1])


@pytest.mark.slow
def test_rank_failure_ends_every_rank_with_a_clear_error():
    import time

    start = time.monotonic()
    with pytest.raises(ParallelError) as info:  # generous timeout: start-up (imports) is slow on a loaded machine
        spawn(_fail_on_rank_one, 2, timeout=400, grace=10, collective_timeout=30)
    msg = str(info.value)
    assert "failed after" in msg  # ended by the failure, not by the launcher's timeout
    assert "rank 1 raised ValueError: rank one broke on purpose" in msg
    assert "rank 0" in msg  # the peer's fate is named too (its collective failed, or the launcher ended it)
    assert time.monotonic() - start < 400


# -------------------------------------------------------------------------------------- 2-rank Ulysses
@pytest.mark.slow
def test_ulysses_dense_is_bit_exact(ulysses2, single2):
    for rank in ulysses2:
        assert torch.equal(rank["dense"], single2["dense"])
        assert torch.equal(rank["after_remove"], single2["dense"])


def test_ulysses_diffusers_caches(ulysses2, single2):
    """diffusers' TaylorSeer applied after CP (through ``vdit_accel.apply``, inside the CP hooks) caches each rank's
    shard: bit-exact vs one process, and it acts; First-Block Cache (a per-rank data-dependent skip) is refused."""
    assert not torch.equal(single2["taylorseer"], single2["dense"])
    for rank in ulysses2:
        assert torch.equal(rank["taylorseer"], single2["taylorseer"])
        assert "First-Block Cache under context parallelism is not supported" in rank["fbc"]


@pytest.mark.slow
def test_ulysses_astraea_budget_one_is_bit_exact(ulysses2, single2):
    for rank in ulysses2:
        assert torch.equal(rank["budget1"], single2["dense"])


@pytest.mark.slow
def test_ulysses_astraea_equals_per_rank_reference_in_either_order(ulysses2, single2):
    """Each rank selects its budget of its shard; the rows' attention goes through the all-to-all over all keys.
    Bit-exact against the one-process per-rank reference: per (row, head) the same keys, the same op."""
    for rank in ulysses2:
        # per-rank counts are exact halves of the one-process counts: the mean kept ratio is the schedule's
        assert rank["sparse_before_kept"] == pytest.approx((1.0 + 0.5 + 0.25 + 0.5) / 4)
        for key in ("sparse_before", "sparse_after"):
            assert torch.equal(rank[key], single2["sparse_rank2"]), key
        assert torch.equal(rank["sparse_kv"], single2["sparse_kv_rank2"])


@pytest.mark.slow
def test_ulysses_refusals_name_the_reason(ulysses2):
    for rank in ulysses2:
        assert "vdit_accel.apply(...)" in rank["direct_after"] and "before enable_parallelism" in rank["direct_after"]
        assert rank["tr_astraea"].startswith("TimeRipple with Astraea under context parallelism is not supported")
        assert "27 tokens, not divisible by the 2" in rank["uneven"]


@pytest.mark.slow
def test_ulysses_timeripple_equals_one_process_in_either_order(ulysses2, single_tr, single2):
    """TimeRipple's reuse runs inside the Ulysses op (full sequence, one head of two per rank). "exact_sim" with a
    shared θ decides per (token, head, channel): no communication, the same masks, the same SDPA per head, so
    bit-exact, applied after enable_parallelism (vdit_accel.apply) or before it (apply_timeripple). Stats are the
    rank's heads: the mean over ranks is the one-process figure (equal head shares), up to the summary's rounding."""
    video, stats = single_tr["exact"]
    assert stats["q_reuse_active"] > 0.2 and stats["active_calls"] > 0  # built to reuse: the check is not vacuous
    assert not torch.equal(video, single2["dense"])
    for key in ("tr_after", "tr_before"):
        for rank in ulysses2:
            assert torch.equal(rank[key], video), key
            assert rank[f"{key}_stats"]["active_calls"] == stats["active_calls"]
            assert rank[f"{key}_stats"]["dense_calls"] == stats["dense_calls"]
            assert rank[f"{key}_stats"]["q_reuse_active"] > 0
        for name in ("q_reuse_active", "k_reuse_active", "qk_savings_active"):
            mean = sum(rank[f"{key}_stats"][name] for rank in ulysses2) / len(ulysses2)
            assert mean == pytest.approx(stats[name], abs=1e-4), (key, name)
    for rank in ulysses2:
        assert torch.equal(rank["tr_removed"], single2["dense"])


@pytest.mark.slow
def test_ulysses_timeripple_pooled_over_heads_equals_one_process(ulysses2, single_tr, record_diff):
    """What pools over heads is all-reduced over the Ulysses group before deciding: the "per_channel" θ's mean |q|
    and the "tokens" variant's per-token spread sums. The sums are added in another order than on one process, so
    θ and the spreads may differ in the last bits; a decision flips only for a value within that rounding of θ,
    and then the video would differ by far more than 1e-5. Stated tolerance: 1e-5 absolute on the [-1, 1] video.
    Token decisions are one per token for all heads, so each rank's reuse fraction is the one-process one."""
    for key in ("per_channel", "tokens"):
        video = single_tr[key][0]
        for rank in ulysses2:
            assert record_diff(f"ulysses2_timeripple_{key}", rank[f"tr_{key}"], video) <= 1e-5, key
    stats = single_tr["tokens"][1]
    assert stats["q_reuse_active"] > 0
    for rank in ulysses2:
        assert rank["tr_tokens_stats"]["q_reuse_active"] == pytest.approx(stats["q_reuse_active"], abs=1e-4)


# ------------------------------------------------------------------------------------------ Ring, 4 ranks
@pytest.mark.slow
def test_ring_two_ranks_within_tolerance(record_diff):
    """Ring merges the two K/V halves' partial results by LSE (a different summation order): not bit-exact.
    Stated tolerance: 1e-4 absolute on the [-1, 1] video after 4 steps with CFG (measured: docs/parallel.md,
    ``record_diff``)."""
    ranks = spawn(_scenarios_ring, 2, 2, 1, timeout=240)
    dense, sparse = _single(2), _single(2, SPARSE, 2)
    for rank in ranks:
        assert torch.equal(rank["dense"], ranks[0]["dense"])
        assert record_diff("ring2_dense", rank["dense"], dense) < 1e-4
        assert record_diff("ring2_astraea", rank["sparse"], sparse) < 1e-4
        assert not torch.equal(rank["sparse"], rank["dense"])
        _assert_timeripple_ring_refused(rank, ring=2)


def _assert_timeripple_ring_refused(rank: dict, ring: int) -> None:
    """TimeRipple needs the whole token grid, which Ring never gathers: refused at apply and at enable time."""
    for key in ("tr_after", "tr_before"):
        assert rank[key].startswith(f"TimeRipple under Ring context parallelism (ring_degree={ring}) is not "
                                    "supported"), key


@pytest.mark.slow
def test_four_ranks_ulysses_and_hybrid(record_diff):
    """4 ranks, a 4-head model: Ulysses 4 (bit-exact, dense and per-rank Astraea), then Ulysses 2 x Ring 2
    (the LSE merge again: 1e-4)."""
    ranks = spawn(_scenarios_ring, 4, 4, 4, timeout=300)
    dense, sparse = _single(4), _single(4, SPARSE, 4)
    for rank in ranks:
        assert torch.equal(rank["dense"], dense)
        assert torch.equal(rank["sparse"], sparse)
    ranks = spawn(_scenarios_ring, 4, 4, 2, timeout=300)
    for rank in ranks:
        assert record_diff("ulysses2_ring2_dense", rank["dense"], dense) < 1e-4
        assert record_diff("ulysses2_ring2_astraea", rank["sparse"], sparse) < 1e-4
        _assert_timeripple_ring_refused(rank, ring=2)


# ------------------------------------------------------------------------------------------- LTX-Video
def _ltx_calls() -> list[dict]:
    """Four root calls of the tiny LTX model (CFG batch 2, 2x4x4 = 32 tokens, 6 text tokens, the last one masked:
    the text mask matters) at falling timesteps."""
    from tiny_pipelines import ltx_inputs

    return [ltx_inputs(seed=i, text=6) | {"timestep": torch.tensor([900 - 200 * i] * 2)} for i in range(4)]


@torch.no_grad()
def _ltx_run(model) -> list[torch.Tensor]:
    return [model(**kw)[0] for kw in _ltx_calls()]


def _ltx_single(config=None) -> tuple[list[torch.Tensor], dict | None]:
    """One process: dense, Astraea selecting as 2 ranks would, or TimeRipple; the outputs and the method's stats."""
    from tiny_pipelines import tiny_ltx

    model = tiny_ltx()
    if config is None:
        return _ltx_run(model), None
    handle = vdit_accel.apply(model, config)
    if isinstance(config, AstraeaConfig):
        simulate_rank_selection(handle.applied[0][2], 2)
    try:
        return _ltx_run(model), handle.stats
    finally:
        handle.remove()


def _scenarios_ltx(rank: int, world: int) -> dict:
    """LTX-Video under Ulysses: dense, Astraea before / after ``enable_context_parallel``, TimeRipple in the op;
    diffusers' own LTX plan on a masked prompt; a family without a plan."""
    from diffusers import ContextParallelConfig
    from tiny_pipelines import tiny_hunyuan_video, tiny_ltx

    from vdit_accel.parallel import enable_context_parallel

    def cp_model():
        m = tiny_ltx()
        enable_context_parallel(m, ulysses=world)
        return m

    out: dict = {"dense": _ltx_run(cp_model())}
    m = tiny_ltx()
    h = vdit_accel.apply(m, SPARSE)
    enable_context_parallel(m, ulysses=world)
    out["sparse_before"] = _ltx_run(m)
    out["kept"] = h.stats["astraea"]["kept_ratio"]
    h.remove()
    out["after_remove"] = _ltx_run(m)
    for name, config in (("sparse_after", SPARSE), ("sparse_kv", SPARSE_KV), ("tr", TR),
                         ("tr_tokens", TR_TOKENS)):
        m = cp_model()
        with vdit_accel.apply(m, config) as h:
            out[name] = _ltx_run(m)
            if name.startswith("tr"):
                out[name + "_stats"] = {k: h.stats["timeripple"][k] for k in TR_STATS}
    m = tiny_ltx()  # diffusers' own plan splits the text over the ranks: fails on a masked prompt
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    with cpu_workarounds():
        m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))
        try:
            _ltx_run(m)
            out["stock_plan"] = "no error"
        except RuntimeError as err:
            out["stock_plan"] = str(err)
    try:
        enable_context_parallel(tiny_hunyuan_video(), ulysses=world)
        out["no_plan"] = "no error"
    except ParallelError as err:
        out["no_plan"] = str(err)
    return out


def test_ltx_ulysses_dense_astraea_timeripple_equal_one_process():
    """LTX-Video (diffusers' other family with a CP plan), 2 Ulysses ranks, masked text: with the adapter's plan
    (text unsplit, cross-attention local) dense CP, Astraea (per-rank selection; applied before or after CP; with K/V
    reuse + forecast) and TimeRipple inside the Ulysses op (exact_sim with LTX's per-head RoPE channel masks, and
    the tokens variant) all equal one process bit for bit; each method acts."""
    ranks = spawn(_scenarios_ltx, 2, timeout=240)
    dense, _ = _ltx_single()
    sparse, _ = _ltx_single(SPARSE)
    sparse_kv, _ = _ltx_single(SPARSE_KV)
    tr, tr_stats = _ltx_single(TR)
    tr_tokens, tr_tokens_stats = _ltx_single(TR_TOKENS)

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert not same(sparse, dense) and not same(sparse_kv, sparse) and not same(tr, dense)
    for r in ranks:
        assert same(r["dense"], dense) and same(r["after_remove"], dense)
        assert same(r["sparse_before"], sparse) and same(r["sparse_after"], sparse) and same(r["sparse_kv"], sparse_kv)
        assert r["kept"] == pytest.approx(0.5625)  # (1 + 0.5 + 0.25 + 0.5) / 4 of the rows over the 4 calls
        assert same(r["tr"], tr) and same(r["tr_tokens"], tr_tokens)
        assert "doesn't match the broadcast shape" in r["stock_plan"]
        assert "has no context-parallel plan" in r["no_plan"] and "'hunyuan_video'" in r["no_plan"]
    for name, single in (("tr_stats", tr_stats), ("tr_tokens_stats", tr_tokens_stats)):
        assert single["timeripple"]["q_reuse_active"] > 0.1  # reuse really happens
        for key in ("q_reuse_active", "qk_savings_active"):  # each rank records its heads: their mean is one process
            mean = sum(r[name][key] for r in ranks) / len(ranks)
            assert mean == pytest.approx(single["timeripple"][key], abs=1e-4)  # the summary rounds to 4 decimals


# ----------------------------------------------------------------------------------------------- the CLI
def test_generate_argv_forwards_every_flag_but_nproc():
    from vdit_accel.cli import build_parser
    from vdit_accel.parallel.generate import generate_argv

    a = build_parser().parse_args(["generate", "a red circle grows on a gray background", "--steps", "3",
                                   "--method", "astraea", "--nproc", "2", "--quiet"])
    argv = generate_argv(a)
    assert argv[0] == "a red circle grows on a gray background"
    assert argv[argv.index("--steps") + 1] == "3" and argv[argv.index("--method") + 1] == "astraea"
    assert "--nproc" not in argv and "--quiet" in argv
    again = build_parser().parse_args(["generate", *argv])
    assert (again.steps, again.method, again.nproc) == (3, "astraea", 1)


@pytest.mark.slow
def test_cli_nproc_two_equals_one_process(tmp_path, monkeypatch):
    """``vdit-accel generate --nproc 2`` (torchrun, 2 gloo ranks, Ulysses 2) writes the one-process video, bit for
    bit, with the embedded model (2,048 tokens), 2 steps."""
    from safetensors.torch import load_file

    from vdit_accel.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prompt = "a red circle moves right on a blue background"
    common = ["generate", prompt, "--steps", "2", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one.mp4"),
                 "--save-tensor", str(tmp_path / "one.safetensors")]) == 0
    assert main([*common, "--out", str(tmp_path / "two.mp4"), "--save-tensor", str(tmp_path / "two.safetensors"),
                 "--nproc", "2"]) == 0
    one, two = (load_file(tmp_path / f"{n}.safetensors")["video"] for n in ("one", "two"))
    assert torch.equal(one, two)
    assert (tmp_path / "two.gif").exists()


# ------------------------------------------------------------------------------------- CFG parallelism x CP
@pytest.mark.slow
def test_cfg_parallel_with_ulysses_equals_one_process(single2):
    """4 ranks: cond on ranks 0-1, uncond on ranks 2-3, each pair Ulysses 2; predictions exchanged by all_gather.
    Bit-exact against one process, dense and Astraea (per-rank reference); each rank's Astraea caches hold only its
    own branch (per-branch state as on one process, where both branches' states sit side by side)."""
    ranks = spawn(_scenarios_cfg, 4, timeout=300)
    assert [r["branch"] for r in ranks] == [0, 0, 1, 1]
    for r in ranks:
        assert torch.equal(r["dense"], single2["dense"])
        assert torch.equal(r["sparse"], single2["sparse_rank2"])
        assert r["branches_seen"] == (["cond"] if r["branch"] == 0 else ["uncond"])
        assert "CFG parallelism needs guidance > 1" in r["no_guidance"]
