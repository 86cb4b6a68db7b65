"""Adapter for diffusers' ``WanTransformer3DModel`` (Wan2.1, Wan2.2 and the embedded model).

Wan's self-attention (``blocks[i].attn1``) is video-only: text enters through cross-attention
(``attn2``), so there are no text tokens in self-attention. Video tokens are frame-major raster
(``t*H'W' + h*W' + w``); RoPE splits each head's channels into contiguous (t, h, w) groups of
``head_dim - 2*(2*(head_dim//6))``, ``2*(head_dim//6)``, ``2*(head_dim//6)`` channels with interleaved
pairs. :func:`wan_qkv` reproduces the stock ``WanAttnProcessor`` up to the attention call, bit for bit,
and :func:`wan_attention_output` does what it does after.

Example:
    >>> from diffusers import WanTransformer3DModel
    >>> m = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    ...                           text_dim=8, freq_dim=16, ffn_dim=16, num_layers=1)
    >>> WAN.rope_groups(m)
    {'t': slice(0, 4, None), 'h': slice(4, 8, None), 'w': slice(8, 12, None)}
"""

from __future__ import annotations

import torch
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel, WanVACETransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from vdit_accel.adapters import AttentionCall, ModelAdapter, RowCache, TokenLayout, register_adapter
from vdit_accel.errors import ConfigError, UnsupportedModelError
from vdit_accel.ops.rows import gather_rows, scatter_rows_


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class WanAdapter(ModelAdapter):
    """Wan2.1 / Wan2.2 (incl. per-token timesteps) and WanVACE, whose main ``blocks`` are ``WanTransformerBlock``
    (VACE's control ``vace_blocks`` run stock and add their hints between the main blocks)."""

    family = "wan"
    model_classes = (WanTransformer3DModel, WanVACETransformer3DModel)

    def layout(self, model, args, kwargs) -> TokenLayout:
        x = _hidden_states(args, kwargs)  # [B, C, T, H, W]
        p_t, p_h, p_w = model.config.patch_size
        b, _, t, h, w = x.shape
        return TokenLayout((t // p_t, h // p_h, w // p_w), 0, 0, b)

    def timestep(self, args, kwargs):
        return kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)

    def blocks(self, model):
        return list(model.blocks)

    def self_attention(self, block):
        return block.attn1

    def rope_groups(self, model) -> dict[str, slice]:
        rope = model.rope
        t, h = rope.t_dim, rope.h_dim
        return {"t": slice(0, t), "h": slice(t, t + h), "w": slice(t + h, t + h + rope.w_dim)}

    def qkv(self, attn, args, kwargs) -> AttentionCall | None:
        """Wan's processor ``(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)``: video-only
        self-attention when ``encoder_hidden_states`` is ``None`` (cross-attention calls return ``None``)."""
        names = ("hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb")
        values = dict(zip(names, args)) | kwargs
        if values.get("encoder_hidden_states") is not None:
            return None
        q, k, v = wan_qkv(attn, values["hidden_states"], values.get("rotary_emb"))
        proc = attn.get_processor()
        return AttentionCall(q, k, v, 0, 0, values.get("attention_mask"), getattr(proc, "_attention_backend", None),
                             getattr(proc, "_parallel_config", None))

    def attention_output(self, attn, out, call):
        return wan_attention_output(attn, out, call.q)

    def block_rows_forward(self, block, args, kwargs, idx, attention_fn, *, kv="all", cache=None):
        names = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")
        values = dict(zip(names, args)) | kwargs
        return wan_block_rows_forward(block, *(values.get(n) for n in names), idx, attention_fn, kv=kv, cache=cache)


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair RoPE, as in the stock processor. x: [B, S, H, D]; freqs: [1, S, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _rope_table(freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor | None:
    """Wan's rotary tables `[1, S, 1, D]` as one complex table `[1, S, 1, D/2]` (``None`` where the complex path
    does not apply: not float32/float64)."""
    if freqs_cos.dtype not in (torch.float32, torch.float64):
        return None
    return torch.complex(freqs_cos[..., 0::2], freqs_sin[..., 1::2])


def _rope_rows(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor,
               table: torch.Tensor | None) -> torch.Tensor:
    """:func:`_apply_rotary_emb` as one complex product (rows path only; ~3x faster on CPU at dim 128): for each
    pair ``(x1, x2)``, ``(x1 + i·x2)·(cos + i·sin)`` is ``(x1·cos - x2·sin) + i·(x1·sin + x2·cos)``, the stock
    formula. Falls back to the stock op where the complex view does not apply (dtype, non-contiguous ``x``).

    Args:
        x: `[B, S, H, D]`. freqs_cos, freqs_sin: `[1, S, 1, D]`. table: :func:`_rope_table` of them, or ``None``.
    """
    if table is None or x.dtype != freqs_cos.dtype or not x.is_contiguous():
        return _apply_rotary_emb(x, freqs_cos, freqs_sin)
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * table).flatten(-2)


def wan_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE q, k and v of Wan self-attention, exactly as the stock processor computes them.

    Args:
        attn (`WanAttention`): a self-attention module (``attn1``).
        hidden_states: `[B, S, C]` normalised and modulated block input.
        rotary_emb: `(cos, sin)`, each `[1, S, 1, D]`.

    Returns:
        q, k, v: each `[B, S, H, D]`.
    """
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = _apply_rotary_emb(query, *rotary_emb)
        key = _apply_rotary_emb(key, *rotary_emb)
    return query, key, value


def wan_attention_output(attn, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Merge heads and apply the output projection, as the stock processor does. out: `[B, S, H, D]`."""
    out = out.flatten(2, 3).type_as(like)
    return attn.to_out[1](attn.to_out[0](out))


class SkyReelsV2Adapter(WanAdapter):
    """SkyReels-V2: Wan's self-attention (same projections, norm and RoPE), so TimeRipple fits; its blocks take an
    ``attention_mask`` (causal diffusion forcing) and a `[B, 6, S, C]` per-token ``temb``, which Wan's row-subset
    block does not compute: Astraea's sparse path is refused with :class:`UnsupportedModelError`."""

    family = "skyreels_v2"
    model_classes = (SkyReelsV2Transformer3DModel,)

    _NO_ROWS = ("the skyreels_v2 adapter has no row-subset block (its blocks take a causal attention_mask and a "
                "[B, 6, S, C] temb): Astraea's sparse steps are not supported on SkyReelsV2Transformer3DModel")

    def block_hidden_states(self, args, kwargs):
        raise UnsupportedModelError(self._NO_ROWS)

    def block_rows_forward(self, block, args, kwargs, idx, attention_fn, *, kv="all", cache=None):
        raise UnsupportedModelError(self._NO_ROWS)

    def row_kv_modes(self, model) -> tuple[str, ...]:
        return ()


WAN = register_adapter(WanAdapter())
SKYREELS_V2 = register_adapter(SkyReelsV2Adapter())


def _modulation(block, temb: torch.Tensor, idx: torch.Tensor | None):
    """The six AdaLN tensors of a Wan block, gathered at ``idx`` rows for per-token ``temb`` (Wan2.2 ti2v).

    Returns shift/scale/gate for self-attention and FFN, each broadcastable to `[B, S or k, C]`.
    """
    if temb.ndim == 4:  # [B, S, 6, C]
        mods = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        mods = [m.squeeze(2) for m in mods]  # [B, S, C]
        full = mods
        sub = mods if idx is None else [gather_rows(m, idx) for m in mods]
        return full, sub
    mods = (block.scale_shift_table + temb.float()).chunk(6, dim=1)  # [B, 1, C] each
    return mods, mods


def _cross_attention(attn, x: torch.Tensor, encoder_hidden_states: torch.Tensor, cache: RowCache | None):
    """Wan's cross-attention (``attn2``) on rows ``x`` `[B, k, C]`, with the text K/V computed once per ``cache``.

    Exactly the stock processor's computation (same ops, same ``dispatch_attention_fn``); only the text key and
    value projections are kept in ``cache`` and reused while ``encoder_hidden_states`` is unchanged. Image-
    conditioned cross-attention (``add_k_proj``, I2V) and custom processors take the stock path, and so does a call
    traced by ``torch.compile`` (the cache check ``torch.equal`` is data-dependent: the text K/V are recomputed).
    """
    if (cache is None or attn.add_k_proj is not None or not isinstance(attn.processor, WanAttnProcessor)
            or torch.compiler.is_compiling()):  # traced: no data-dependent cache check (aten.equal), recompute
        return attn(x, encoder_hidden_states, None, None)
    src = cache.text_src
    if src is None or src.shape != encoder_hidden_states.shape or not torch.equal(src, encoder_hidden_states):
        cache.text_k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        cache.text_v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        cache.text_src = encoder_hidden_states
    q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
    out = dispatch_attention_fn(q, cache.text_k, cache.text_v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                backend=attn.processor._attention_backend, parallel_config=None)
    out = out.flatten(2, 3).type_as(q)
    return attn.to_out[1](attn.to_out[0](out))


def _fresh_kv(attn, norm_x: torch.Tensor, rotary_emb, fast_rope: bool):
    """Post-norm, post-RoPE keys and values `[B, S, H, D]` of ``norm_x`` `[B, S, C]` (rotary tables for S;
    ``fast_rope``: the complex-product RoPE, else the stock op)."""
    key = attn.norm_k(attn.to_k(norm_x)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(norm_x).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        key = _rope_rows(key, *rotary_emb, _rope_table(*rotary_emb) if fast_rope else None)
    return key, value


def wan_block_rows_forward(block, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                           temb: torch.Tensor, rotary_emb, idx: torch.Tensor, attention_fn, kv_rows: bool = False,
                           *, kv: str | None = None, cache: RowCache | None = None):
    """A ``WanTransformerBlock`` computed for the rows ``idx`` only (Astraea's Q-subset block).

    The query projection, attention rows, output projection, residual, cross-attention and FFN run on the
    selected rows. Keys and values (``kv``):

    - ``"all"`` (default): norm, modulation and K/V projections run for every token (the paper's Astraea);
    - ``"rows"`` (or ``kv_rows=True``): K and V from the selected rows only (the "select Q and K" ablation);
    - ``"cache"``: fresh K/V for the selected rows only, scattered into ``cache.k``/``cache.v``, which hold every
      token's K/V as last computed; attention runs over all cached keys. The first call (``cache.k is None``)
      projects every token. Nothing but the selected rows is normalised or projected.

    With a ``cache``, cross-attention's text K/V are computed once and reused while the text is unchanged.

    Args:
        block (`WanTransformerBlock`).
        hidden_states: `[B, S, C]` block input.
        encoder_hidden_states: `[B, L, C]` projected text.
        temb: `[B, 6, C]` (Wan2.1) or `[B, S, 6, C]` (Wan2.2 ti2v).
        rotary_emb: `(cos, sin)`, each `[1, S, 1, D]`.
        idx: `[B, k]` selected token indices (sorted).
        attention_fn: ``(q_sel [B,k,H,D], k [B,S,H,D], v [B,S,H,D]) -> (out [B,k,H,D], lse [B,k,H])``.
        cache (`RowCache`, optional): K/V (``kv="cache"``) and text K/V kept between calls.

    Returns:
        (rows `[B, k, C]` block output at ``idx``, lse `[B, k, H]`).
    """
    kv = kv or ("rows" if kv_rows else "all")
    if kv == "cache" and cache is None:
        raise ConfigError("kv='cache' needs a RowCache")
    (shift, scale, gate, c_shift, c_scale, c_gate), sub = _modulation(block, temb, idx)
    s_shift, s_scale, s_gate, s_c_shift, s_c_scale, s_c_gate = sub
    attn = block.attn1
    x_rows = gather_rows(hidden_states, idx)
    # every row computed: the stock RoPE, so that a dense step through this path is the stock block bit for bit;
    # a subset: the complex-product RoPE (same formula, ~3x faster; bit-equal on CPU from D = 16 up)
    fast_rope = idx.shape[1] < hidden_states.shape[1]
    rope_rows = None if rotary_emb is None else tuple(gather_rows(r, idx) for r in rotary_emb)
    table = _rope_table(*rope_rows) if fast_rope and rope_rows is not None else None  # the rows' complex table
    if kv == "rows" or (kv == "cache" and cache.k is not None):
        norm_rows = (block.norm1(x_rows.float()) * (1 + s_scale) + s_shift).type_as(hidden_states)
        q, k, v = wan_qkv(attn, norm_rows, None)
        if rope_rows is not None:
            q, k = _rope_rows(q, *rope_rows, table), _rope_rows(k, *rope_rows, table)
        if kv == "cache":
            scatter_rows_(cache.k, idx, k)
            scatter_rows_(cache.v, idx, v)
            k, v = cache.k.to(q.dtype), cache.v.to(q.dtype)
    else:
        norm_x = (block.norm1(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        k, v = _fresh_kv(attn, norm_x, rotary_emb, fast_rope)
        q = attn.norm_q(attn.to_q(gather_rows(norm_x, idx))).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q = _rope_rows(q, *rope_rows, table)
        if kv == "cache":
            dtype = cache.dtype or k.dtype
            cache.k, cache.v = k.to(dtype).clone(), v.to(dtype).clone()
    out, lse = attention_fn(q, k, v)
    attn_out = wan_attention_output(attn, out, q)
    h = (x_rows.float() + attn_out * s_gate).type_as(hidden_states)
    h = h + _cross_attention(block.attn2, block.norm2(h.float()).type_as(h), encoder_hidden_states, cache)
    norm_h = (block.norm3(h.float()) * (1 + s_c_scale) + s_c_shift).type_as(h)
    h = (h.float() + block.ffn(norm_h).float() * s_c_gate).type_as(h)
    return h, lse
