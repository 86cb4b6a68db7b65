"""The adapter contract: every family's split self-attention call reproduces the stock processor bit for bit, and a
user's own model works through a user-defined ``ModelAdapter`` subclass (``adapter=`` / ``register_adapter``)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from tiny_pipelines import (
    cogvideox_inputs,
    hunyuan_inputs,
    ltx_inputs,
    tiny_cogvideox,
    tiny_hunyuan_video,
    tiny_ltx,
    tiny_skyreels_v2,
    tiny_wan,
    tiny_wan_vace,
    wan_inputs,
)

import vdit_accel
import vdit_accel.adapters as adapters_module
from vdit_accel.adapters import AttentionCall, ModelAdapter, TokenLayout, register_adapter, resolve_adapter
from vdit_accel.errors import ConfigError, UnsupportedModelError
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.timeripple import TimeRippleConfig, TimeRippleProcessor, apply_timeripple
from vdit_accel.parallel.cp import ParallelError

TR_OFF = TimeRippleConfig(fixed_threshold=0.0, num_steps=4, i_min=0, i_max=1)
TR_ON = TimeRippleConfig(fixed_threshold=10.0, num_steps=4, i_min=0, i_max=1)
AS_OFF = AstraeaConfig(budgets=(1.0,) * 4, num_steps=4)
AS_ON = AstraeaConfig(budgets=(1.0, 0.5, 0.5, 0.5), num_steps=4)

FAMILIES = {
    "wan": (tiny_wan, wan_inputs),
    "wan_vace": (tiny_wan_vace, lambda: wan_inputs(control_hidden_states=torch.ones(2, 8, 2, 8, 8))),
    "skyreels_v2": (tiny_skyreels_v2, wan_inputs),
    "cogvideox": (tiny_cogvideox, None),
    "cogvideox_2b_sincos": (lambda: tiny_cogvideox(rope=False), None),
    "ltx": (tiny_ltx, ltx_inputs),
    "hunyuan_video": (tiny_hunyuan_video, lambda: hunyuan_inputs(padded=2)),
}


class _Split:
    """A processor made of the three contract calls only: qkv -> attention -> attention_output."""

    def __init__(self, adapter, seen):
        self.adapter, self.seen = adapter, seen

    def __call__(self, attn, *args, **kwargs):
        call = self.adapter.qkv(attn, args, kwargs)
        assert call is not None
        self.seen.append((call.q.shape, call.text_prefix, call.text_suffix))
        return self.adapter.attention_output(attn, self.adapter.attention(attn, call), call)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_split_call_reproduces_the_stock_processor_bit_exactly(family):
    build, inputs = FAMILIES[family]
    model = build()
    kw = cogvideox_inputs(model) if inputs is None else inputs()
    ref = model(**kw)[0]
    adapter = resolve_adapter(model)
    seen: list = []
    attns = [adapter.self_attention(b) for b in adapter.blocks(model)]
    originals = [adapter.install_processor(a, _Split(adapter, seen)) for a in attns]
    try:
        out = model(**kw)[0]
    finally:
        for a, p in zip(attns, originals):
            adapter.restore_processor(a, p)
    layout = adapter.layout(model, (), kw)
    t, h, w = layout.grid
    assert len(seen) == len(attns)
    for shape, prefix, suffix in seen:
        assert (prefix, suffix) == (layout.text_prefix, layout.text_suffix)
        assert shape[1] == prefix + t * h * w + suffix and shape[0] == layout.batch
    assert torch.equal(out, ref)
    assert all(a.get_processor() is p for a, p in zip(attns, originals))


def test_optional_contract_methods_raise_typed_errors_naming_the_family():
    class Bare(ModelAdapter):
        family = "bare"
        joint_blocks = True

        def layout(self, model, args, kwargs):
            return TokenLayout((1, 1, 1), 0, 0, 1)

        def timestep(self, args, kwargs):
            return None

        def blocks(self, model):
            return []

        def self_attention(self, block):
            return block

        def rope_groups(self, model):
            return {}

    bare = Bare()
    for call in (lambda: bare.qkv(None, (), {}), lambda: bare.attention_output(None, None, None),
                 lambda: bare.block_rows_forward(None, (), {}, None, None),
                 lambda: bare.block_hidden_states((torch.zeros(1),), {})):
        with pytest.raises(UnsupportedModelError, match="bare"):
            call()


def test_unknown_model_lists_supported_classes():
    with pytest.raises(UnsupportedModelError, match="CogVideoXTransformer3DModel.*HunyuanVideoTransformer3DModel.*"
                       "LTXVideoTransformer3DModel.*SkyReelsV2Transformer3DModel.*WanTransformer3DModel"):
        resolve_adapter(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------- a user's own model
def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class ToyProcessor:
    """A processor with its own signature (RoPE as the keyword ``freqs``) and rotate-half RoPE, in BHSD layout."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs=None):
        b, s, _ = hidden_states.shape
        q, k, v = (f(hidden_states).view(b, s, attn.heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k,
                                                                                          attn.to_v))
        if freqs is not None:
            cos, sin = freqs
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        return attn.to_out[0](out.transpose(1, 2).reshape(b, s, -1))


class ToyBlock(torch.nn.Module):
    def __init__(self, dim=24, heads=2):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, processor=ToyProcessor())
        self.ff = torch.nn.Linear(dim, dim)

    def forward(self, hidden_states, freqs):
        hidden_states = hidden_states + self.attn(self.norm(hidden_states), freqs=freqs)
        return hidden_states + self.ff(self.norm(hidden_states))


class ToyVideoDiT(torch.nn.Module):
    """Latents `[B, 4, T, H, W]` -> same shape; 2 blocks of 2 heads x 12 channels, 3-axis rotate-half RoPE."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj_in, self.proj_out = torch.nn.Linear(4, 24), torch.nn.Linear(24, 4)
        self.time = torch.nn.Linear(1, 24)
        self.blocks = torch.nn.ModuleList([ToyBlock(), ToyBlock()])

    @staticmethod
    def freqs(t, h, w):
        pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        pos = pos.reshape(-1, 3).float()  # [S, 3]
        axis = torch.tensor([0, 0, 1, 1, 2, 2])  # rotate-half pair p uses axis axis[p]
        angle = pos[:, axis] * torch.tensor([1.0, 0.1] * 3)  # [S, 6]
        angle = torch.cat([angle, angle], dim=-1)  # [S, 12]
        return angle.cos(), angle.sin()

    def forward(self, hidden_states, timestep):
        b, c, t, h, w = hidden_states.shape
        x = self.proj_in(hidden_states.flatten(2).transpose(1, 2)) + self.time(timestep[:, None, None] / 1000)
        freqs = self.freqs(t, h, w)
        for block in self.blocks:
            x = block(x, freqs)
        return self.proj_out(x).transpose(1, 2).reshape(b, c, t, h, w)


class ToyAdapter(ModelAdapter):
    family = "toy"
    model_classes = (ToyVideoDiT,)

    def layout(self, model, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        return TokenLayout(tuple(x.shape[2:]), 0, 0, x.shape[0])

    def timestep(self, args, kwargs):
        return kwargs.get("timestep", args[1] if len(args) > 1 else None)

    def blocks(self, model):
        return list(model.blocks)

    def self_attention(self, block):
        return block.attn

    def rope_groups(self, model):
        return {}  # rotate-half pairs interleave the axes: no contiguous groups (per-group stats stay empty)

    def qkv(self, attn, args, kwargs):
        x, freqs = (kwargs.get("hidden_states", args[0] if args else None)), kwargs.get("freqs")
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, attn.heads, -1) for f in (attn.to_q, attn.to_k, attn.to_v))
        if freqs is not None:
            cos, sin = (f[None, :, None, :] for f in freqs)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return AttentionCall(q, k, v)

    def attention(self, attn, call, q=None, k=None, v=None):
        q, k, v = (call.q if q is None else q), (call.k if k is None else k), (call.v if v is None else v)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def attention_output(self, attn, out, call):
        return attn.to_out[0](out.reshape(out.shape[0], out.shape[1], -1))

    def block_rows_forward(self, block, args, kwargs, idx, attention_fn, *, kv="all", cache=None):
        x, freqs = (kwargs.get("hidden_states", args[0] if args else None),
                    kwargs.get("freqs", args[1] if len(args) > 1 else None))
        if kv != "all":
            raise UnsupportedModelError(f"kv={kv!r} is not supported by the toy adapter: accepted ['all']")
        call = self.qkv(block.attn, (block.norm(x),), {"freqs": freqs})
        at = idx[..., None, None].expand(-1, -1, *call.q.shape[2:])
        out, lse = attention_fn(call.q.gather(1, at), call.k, call.v)
        rows = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        rows = rows + self.attention_output(block.attn, out, call)
        return rows + block.ff(block.norm(rows)), lse


def _toy_run(model):
    """Four calls with changing latents and timesteps; returns the outputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return [model(torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([900.0 - 200 * i] * 2))
                for i in range(4)]


def test_user_model_is_refused_without_an_adapter():
    with pytest.raises(UnsupportedModelError, match="ToyVideoDiT"):
        apply_timeripple(ToyVideoDiT(), TR_ON)


def test_generic_processor_without_the_signature_would_lose_rope():
    """Why install_processor keeps the stock signature: diffusers drops ``freqs`` for a ``*args, **kwargs``
    processor (RoPE silently lost), while the same processor installed through the adapter keeps it."""
    model = ToyVideoDiT()
    ref = _toy_run(model)

    class Passthrough:
        def __init__(self, original):
            self.original = original

        def __call__(self, attn, *args, **kwargs):
            return self.original(attn, *args, **kwargs)

    attns = [b.attn for b in model.blocks]
    originals = [a.get_processor() for a in attns]
    for a, p in zip(attns, originals):
        a.set_processor(Passthrough(p))
    lost = _toy_run(model)
    adapter = ToyAdapter()
    for a, p in zip(attns, originals):
        adapter.restore_processor(a, p)
        adapter.install_processor(a, Passthrough(p))
    kept = _toy_run(model)
    assert not torch.equal(lost[0], ref[0])
    assert all(torch.equal(k, r) for k, r in zip(kept, ref))
    installed = attns[0].get_processor()
    assert isinstance(installed, Passthrough) and type(installed).__name__ == "Passthrough"
    assert "freqs" in inspect.signature(installed.__call__).parameters
    for a, p in zip(attns, originals):
        adapter.restore_processor(a, p)


@pytest.mark.parametrize("method", ["timeripple", "astraea"])
def test_user_adapter_subclass_off_exact_on_acts_remove_exact(method):
    model = ToyVideoDiT()
    ref = _toy_run(model)
    apply_x, off, on = ((apply_timeripple, TR_OFF, TR_ON) if method == "timeripple"
                        else (apply_astraea, AS_OFF, AS_ON))
    handle = apply_x(model, off, adapter=ToyAdapter())
    assert all(torch.equal(o, r) for o, r in zip(_toy_run(model), ref))
    handle.remove()
    handle = apply_x(model, on, adapter=ToyAdapter())
    if method == "timeripple":
        assert isinstance(model.blocks[0].attn.get_processor(), TimeRippleProcessor)
    out = _toy_run(model)
    summary = handle.stats.summary()
    handle.remove()
    if method == "timeripple":
        assert summary["active_calls"] == 2 * 4 and summary["qk_savings_active"] > 0.1
        assert not torch.equal(out[0], ref[0])
    else:
        assert summary["kept_ratio"] == pytest.approx((1.0 + 0.5 * 3) / 4)
        assert torch.equal(out[0], ref[0]) and not torch.equal(out[-1], ref[-1])
    assert all(torch.equal(o, r) for o, r in zip(_toy_run(model), ref))


def test_registered_user_adapter_works_through_vdit_accel_apply(monkeypatch):
    monkeypatch.setattr(adapters_module, "_ADAPTERS", list(adapters_module._ADAPTERS))
    register_adapter(ToyAdapter())
    model = ToyVideoDiT()
    ref = _toy_run(model)
    with vdit_accel.apply(model, [TR_ON, AS_ON]) as handle:
        out = _toy_run(model)
        stats = handle.stats
    assert stats["timeripple"]["active_calls"] > 0 and stats["astraea"]["kept_ratio"] < 1.0
    assert not torch.equal(out[-1], ref[-1])
    assert all(torch.equal(o, r) for o, r in zip(_toy_run(model), ref))


def test_unregistered_user_adapter_through_vdit_accel_apply_adapter_argument():
    """``vdit_accel.apply(model, spec, adapter=...)``: a user's own model without registering anything."""
    model = ToyVideoDiT()
    ref = _toy_run(model)
    with pytest.raises(UnsupportedModelError, match="ToyVideoDiT"):
        vdit_accel.apply(model, AS_ON)
    with pytest.raises(ConfigError, match="adapter of type str"):
        vdit_accel.apply(model, AS_ON, adapter="toy")
    with vdit_accel.apply(model, [TR_ON, AS_ON], adapter=ToyAdapter()) as handle:
        out = _toy_run(model)
        stats = handle.stats
    assert stats["timeripple"]["active_calls"] > 0 and stats["astraea"]["kept_ratio"] < 1.0
    assert not torch.equal(out[-1], ref[-1])
    assert all(torch.equal(o, r) for o, r in zip(_toy_run(model), ref))


def test_timeripple_refuses_a_context_parallel_call_and_backend_settings_carry_over():
    """A processor's ``_parallel_config`` (diffusers context parallelism) and ``_attention_backend`` reach the
    installed method processor; TimeRipple never computes windows on a shard: a parallel config it cannot run inside
    (here not a diffusers ParallelConfig at all) is refused with a typed error (Ulysses itself: test_parallel.py)."""
    model = tiny_wan()
    kw = wan_inputs()
    attn = resolve_adapter(model).self_attention(model.blocks[0])
    stock = attn.get_processor()
    stock._attention_backend, stock._parallel_config = "native", object()
    handle = apply_timeripple(model, TR_ON)
    try:
        installed = attn.get_processor()
        assert installed._attention_backend == "native" and installed._parallel_config is stock._parallel_config
        with pytest.raises(ParallelError, match="context parallelism needs diffusers' ParallelConfig"), \
                torch.no_grad():
            model(**kw)
    finally:
        handle.remove()
        stock._attention_backend = stock._parallel_config = None
    assert attn.get_processor() is stock


def test_the_latest_registration_for_a_class_wins(monkeypatch):
    from diffusers import WanTransformer3DModel

    from vdit_accel.adapters.wan import WanAdapter

    class MyWan(WanAdapter):
        family = "my_wan"

    monkeypatch.setattr(adapters_module, "_ADAPTERS", list(adapters_module._ADAPTERS))
    assert resolve_adapter(WanTransformer3DModel).family == "wan"
    register_adapter(MyWan())
    assert resolve_adapter(WanTransformer3DModel).family == "my_wan"


def test_user_adapter_without_a_row_block_is_refused_at_apply_time():
    """An adapter that does not implement ``block_rows_forward`` declares no row K/V modes: a sparse Astraea
    schedule is refused when applied (not at the first sparse call); full and whole-step schedules are accepted."""

    class NoRows(ToyAdapter):
        block_rows_forward = ModelAdapter.block_rows_forward

    model = ToyVideoDiT()
    assert NoRows().row_kv_modes(model) == () and ToyAdapter().row_kv_modes(model) == ("all", "rows", "cache")
    with pytest.raises(UnsupportedModelError, match="no row-subset block"):
        apply_astraea(model, AS_ON, adapter=NoRows())
    assert all(getattr(b, "_diffusers_hook", None) is None or not b._diffusers_hook._hook_order
               for b in model.blocks)
    for budgets in ((1.0,) * 4, (1.0, 0.0, 1.0, 0.0)):
        apply_astraea(model, AstraeaConfig(budgets=budgets, num_steps=4), adapter=NoRows()).remove()
