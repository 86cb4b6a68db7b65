"""The Wan family through its own pipelines: Wan2.1, Wan2.2 A14B (two experts), Wan2.2 TI2V (per-token
timesteps); WanVACE and SkyReels-V2 on the transformer."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import PROMPT, WAN_CALL, tiny_skyreels_v2, tiny_wan, tiny_wan_vace, wan_inputs, wan_pipeline

import vdit_accel
from vdit_accel.adapters import RowCache, resolve_adapter
from vdit_accel.errors import UnsupportedModelError
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.ops.attention import row_subset_attention

TR_OFF = TimeRippleConfig(fixed_threshold=0.0, num_steps=4, i_min=0, i_max=1)
TR_ON = TimeRippleConfig(fixed_threshold=10.0, num_steps=4, i_min=0, i_max=1)
AS_OFF = AstraeaConfig(budgets=(1.0,) * 4, num_steps=4)
AS_ON = AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4)
# row_subset_attention reduces with its own LSE kernel, not the stock SDPA call: float32 rounding differs
ROW_TOL = dict(atol=2e-5, rtol=1e-5)


def _generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **WAN_CALL).frames


def _check_pipeline(pipe, denoisers):
    """Off-settings exact, each method acts on every denoiser, remove() exact."""
    ref = _generate(pipe)
    with vdit_accel.apply(pipe, [TR_OFF, AS_OFF]):
        assert torch.equal(_generate(pipe), ref)
    for spec, key in ((TR_ON, "timeripple"), (AS_ON, "astraea")):
        with vdit_accel.apply(pipe, spec) as handle:
            out = _generate(pipe)
            stats = handle.stats[key]
        per = {d: stats[d] for d in denoisers} if len(denoisers) > 1 else {denoisers[0]: stats}
        for d, s in per.items():
            if key == "timeripple":
                assert s["active_calls"] > 0 and s["qk_savings_active"] > 0.1, (d, s)
            else:
                assert s["kept_ratio"] < 1.0, (d, s)
        assert not torch.equal(out, ref)
        assert torch.equal(_generate(pipe), ref)


def test_wan21_pipeline():
    _check_pipeline(wan_pipeline(), ["transformer"])


def test_wan22_a14b_two_expert_pipeline_accelerates_both_experts():
    pipe = wan_pipeline(two_experts=True)
    seen = {"transformer": [], "transformer_2": []}
    hooks = [getattr(pipe, d).register_forward_pre_hook(lambda m, a, k, d=d: seen[d].append(1), with_kwargs=True)
             for d in seen]
    _generate(pipe)
    for h in hooks:
        h.remove()
    assert len(seen["transformer"]) == len(seen["transformer_2"]) == 4  # 2 steps x (cond, uncond) each
    _check_pipeline(pipe, ["transformer", "transformer_2"])


def test_wan22_ti2v_per_token_timesteps_pipeline():
    _check_pipeline(wan_pipeline(expand_timesteps=True), ["transformer"])


@torch.no_grad()
def test_wan22_row_path_with_per_token_temb_equals_stock_block():
    """Wan2.2 TI2V hands every block a `[B, S, 6, C]` temb: the row path gathers each row's modulation."""
    model = tiny_wan()
    adapter = resolve_adapter(model)
    block = adapter.blocks(model)[0]
    g = torch.Generator().manual_seed(4)
    x, text = torch.randn(2, 8, 24, generator=g), torch.randn(2, 5, 24, generator=g)
    temb = torch.randn(2, 8, 6, 24, generator=g)
    rope = model.rope(torch.zeros(1, 4, 2, 4, 4))
    ref = block(x, text, temb, rope)
    idx = torch.arange(8).expand(2, 8)
    for kv in ("all", "rows", "cache"):
        rows, _ = adapter.block_rows_forward(block, (x, text, temb, rope), {}, idx, row_subset_attention, kv=kv,
                                             cache=RowCache())
        torch.testing.assert_close(rows, ref, **ROW_TOL)
    sub = torch.tensor([[1, 6], [0, 3]])
    rows, _ = adapter.block_rows_forward(block, (x, text, temb, rope), {}, sub, row_subset_attention)
    torch.testing.assert_close(rows, torch.gather(ref, 1, sub[..., None].expand(-1, -1, 24)), **ROW_TOL)


def _model_check(model, extra=None, astraea=True):
    """Four calls with changing latents and timesteps (a denoising loop without a pipeline): off-settings exact,
    on-settings act, remove() exact."""
    seq = [wan_inputs(seed=i, **(extra or {})) | {"timestep": torch.tensor([900.0 - 200 * i] * 2)} for i in range(4)]

    def run():
        return [model(**kw)[0] for kw in seq]

    with torch.no_grad():
        ref = run()
        for cfg, apply_x in ((TR_OFF, apply_timeripple), (AS_OFF, apply_astraea)):
            handle = apply_x(model, cfg)
            outs = run()
            handle.remove()
            assert all(torch.equal(o, r) for o, r in zip(outs, ref))
        handle = apply_timeripple(model, TR_ON)
        on = run()
        handle.remove()
        assert handle.stats.summary()["active_calls"] == 2 * 4 and not torch.equal(on[0], ref[0])
        if astraea:
            handle = apply_astraea(model, AS_ON)
            on = run()
            handle.remove()
            assert handle.stats.summary()["kept_ratio"] < 1.0
            assert torch.equal(on[0], ref[0]) and not torch.equal(on[-1], ref[-1])  # dense first step, then sparse
        assert all(torch.equal(o, r) for o, r in zip(run(), ref))
    return seq[0]


def test_wan_vace_fits_the_wan_adapter():
    model = tiny_wan_vace()
    assert resolve_adapter(model).family == "wan"
    g = torch.Generator().manual_seed(2)
    kw = _model_check(model, dict(control_hidden_states=torch.randn(2, 8, 2, 8, 8, generator=g)))
    adapter = resolve_adapter(model)
    block = adapter.blocks(model)[1]
    captured = {}
    hook = block.register_forward_hook(lambda m, a, k, out: captured.update(args=a, kwargs=k, out=out),
                                       with_kwargs=True)
    with torch.no_grad():
        model(**kw)
        hook.remove()
        b, s = captured["out"].shape[:2]
        rows, _ = adapter.block_rows_forward(block, captured["args"], captured["kwargs"],
                                             torch.arange(s).expand(b, s), row_subset_attention)
    torch.testing.assert_close(rows, captured["out"], **ROW_TOL)


def test_skyreels_v2_takes_timeripple_and_refuses_astraea_sparse_steps():
    """SkyReels-V2 has no row-subset block: a schedule with sparse steps is refused when applied (nothing installed);
    whole-step schedules (budgets 0 / 1: the stock block or the cached output) act."""
    model = tiny_skyreels_v2()
    assert resolve_adapter(model).family == "skyreels_v2"
    kw = _model_check(model, astraea=False)
    for cfg in (AS_ON, AstraeaConfig(budgets=(1.0, 0.0, 1.0, 0.0), num_steps=4, cache="residual")):
        with pytest.raises(UnsupportedModelError, match="skyreels_v2"):
            apply_astraea(model, cfg)
        assert getattr(model, "_diffusers_hook", None) is None or not model._diffusers_hook._hook_order
        assert all(getattr(b, "_diffusers_hook", None) is None or not b._diffusers_hook._hook_order
                   for b in resolve_adapter(model).blocks(model))
    seq = [dict(kw, timestep=torch.tensor([900.0 - 200 * i] * 2)) for i in range(4)]
    with torch.no_grad():
        ref = [model(**k)[0] for k in seq]
        handle = apply_astraea(model, AstraeaConfig(budgets=(1.0, 0.0, 1.0, 0.0), num_steps=4))
        outs = [model(**k)[0] for k in seq]
        handle.remove()
        assert handle.stats.summary()["kept_ratio_per_step"] == [1.0, 0.0, 1.0, 0.0]
        assert torch.equal(outs[2], ref[2]) and not torch.equal(outs[1], ref[1])
        assert all(torch.equal(model(**k)[0], r) for k, r in zip(seq, ref))
