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
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from vdit_accel.adapters import ModelAdapter, TokenLayout, register_adapter


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class WanAdapter(ModelAdapter):
    family = "wan"
    model_classes = (WanTransformer3DModel,)

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


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair RoPE, as in the stock processor. x: [B, S, H, D]; freqs: [1, S, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


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


WAN = register_adapter(WanAdapter())
