"""Adapter for diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX 2B/5B and 1.5).

CogVideoX runs *joint* self-attention: each block's ``attn1`` attends over ``[text; video]``, text first
(``text_prefix`` = the text length), and a block returns the two streams ``(video, text)``. RoPE
(``use_rotary_positional_embeddings=True``: 5B and 1.5; the 2B model uses sincos positions and has none) is
applied to the video part of q and k only, with interleaved pairs over contiguous (t, h, w) channel groups of
``D/4``, ``3D/8``, ``3D/8`` channels (``get_3d_rotary_pos_embed``). Video tokens are frame-major raster over
``(F / patch_size_t, H / p, W / p)``. The rotary tables are an argument of the transformer's forward (the
pipeline computes them).

Example:
    >>> from diffusers import CogVideoXTransformer3DModel
    >>> m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
    ...     out_channels=4, time_embed_dim=8, text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8,
    ...     sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6,
    ...     use_rotary_positional_embeddings=True)
    >>> CogVideoXAdapter().rope_groups(m)
    {'t': slice(0, 4, None), 'h': slice(4, 10, None), 'w': slice(10, 16, None)}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb

from vdit_accel.adapters import AttentionCall, ModelAdapter, TokenLayout, register_adapter
from vdit_accel.errors import ConfigError, UnsupportedModelError
from vdit_accel.ops.rows import gather_rows, scatter_rows_

_ROOT_ARGS = ("hidden_states", "encoder_hidden_states", "timestep")
_PROC_ARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "attention_kwargs")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    return dict(zip(names, args)) | kwargs


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    model_classes = (CogVideoXTransformer3DModel,)
    joint_blocks = True

    def layout(self, model, args, kwargs) -> TokenLayout:
        values = _bind(_ROOT_ARGS, args, kwargs)
        x, text = values["hidden_states"], values["encoder_hidden_states"]  # [B, F, C, H, W], [B, L, C_text]
        b, f, _, h, w = x.shape
        p, p_t = model.config.patch_size, model.config.patch_size_t
        return TokenLayout((f if p_t is None else f // p_t, h // p, w // p), text.shape[1], 0, b)

    def timestep(self, args, kwargs):
        return _bind(_ROOT_ARGS, args, kwargs).get("timestep")

    def blocks(self, model):
        return list(model.transformer_blocks)

    def self_attention(self, block):
        return block.attn1

    def has_rope(self, model) -> bool:
        return bool(model.config.use_rotary_positional_embeddings)

    def rope_groups(self, model) -> dict[str, slice]:
        d = model.config.attention_head_dim
        t, hw = d // 4, d // 8 * 3
        return {"t": slice(0, t), "h": slice(t, t + hw), "w": slice(t + hw, t + 2 * hw)}

    # ---------------------------------------------------------------------------------- self-attention call
    def qkv(self, attn, args, kwargs) -> AttentionCall | None:
        """``CogVideoXAttnProcessor2_0(attn, hidden_states, encoder_hidden_states, attention_mask,
        image_rotary_emb)`` up to its ``scaled_dot_product_attention``: q, k, v `[B, L + N, H, D]`, text first."""
        values = _bind(_PROC_ARGS, args, kwargs)
        x, text = values["hidden_states"], values["encoder_hidden_states"]
        rope, mask = values.get("image_rotary_emb"), values.get("attention_mask")
        n_text = text.size(1)
        hidden_states = torch.cat([text, x], dim=1)
        b, s, _ = hidden_states.shape
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, s, b).view(b, attn.heads, -1, mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rope is not None:
            query[:, :, n_text:] = apply_rotary_emb(query[:, :, n_text:], rope)
            if not attn.is_cross_attention:
                key[:, :, n_text:] = apply_rotary_emb(key[:, :, n_text:], rope)
        return AttentionCall(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), n_text, 0, mask,
                             extra={"n_text": n_text})

    def attention(self, attn, call, q=None, k=None, v=None) -> torch.Tensor:
        """The stock processor's ``F.scaled_dot_product_attention`` (it uses no diffusers backend), `[B, S, H, D]`."""
        q, k, v = (call.q if q is None else q), (call.k if k is None else k), (call.v if v is None else v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=call.mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2)

    def attention_output(self, attn, out, call):
        """``(video [B, N, C], text [B, L, C])`` as the stock processor returns them."""
        b = out.shape[0]
        hidden_states = attn.to_out[1](attn.to_out[0](out.reshape(b, -1, out.shape[2] * out.shape[3])))
        text, video = hidden_states.split([call.extra["n_text"], hidden_states.size(1) - call.extra["n_text"]], dim=1)
        return video, text

    # ------------------------------------------------------------------------------------------ block calls
    def block_output(self, args, kwargs, hidden_states, cache=None):
        text = cache.stream if cache is not None and cache.stream is not None else None
        return hidden_states, (_bind(_BLOCK_ARGS, args, kwargs)["encoder_hidden_states"] if text is None else text)

    def block_output_stream(self, output):
        return output[0]

    def block_rows_forward(self, block, args, kwargs, idx, attention_fn, *, kv="all", cache=None):
        """A ``CogVideoXBlock`` for the video rows ``idx`` `[B, k]`; every text token is computed too.

        ``attention_fn(q_rows [B, k, H, D], k [B, S', H, D], v)`` gets the video rows' queries; ``k``/``v`` cover the
        joint sequence (text first: video row ``i`` is key position ``L + i``; ``kv="rows"``: text then the selected
        rows). Text queries attend through the stock attention. The text stream's output `[B, L, C]` is left in
        ``cache.stream`` (when a cache is given) for :meth:`block_output`. Returns (video rows `[B, k, C]`,
        lse `[B, k, H]`).
        """
        values = _bind(_BLOCK_ARGS, args, kwargs)
        x, text, temb = values["hidden_states"], values["encoder_hidden_states"], values["temb"]
        rope = values.get("image_rotary_emb")
        if values.get("attention_kwargs"):
            raise UnsupportedModelError(f"attention_kwargs={sorted(values['attention_kwargs'])} are not supported on "
                                        "the CogVideoX row-subset block: accepted none")
        if kv == "cache" and cache is None:
            raise ConfigError("kv='cache' needs a RowCache")
        attn, n_text = block.attn1, text.shape[1]
        heads = attn.heads
        x_rows = gather_rows(x, idx)
        rope_rows = None if rope is None else tuple(gather_rows(r.unsqueeze(0), idx).unsqueeze(2) for r in rope)
        norm_rows, norm_text, gate, enc_gate = block.norm1(x_rows, text, temb)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], heads, -1)

        def project_kv(tokens: torch.Tensor, video_rope) -> tuple[torch.Tensor, torch.Tensor]:
            key, value = split(attn.to_k(tokens)), split(attn.to_v(tokens))
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if video_rope is not None:
                key = torch.cat([key[:, :n_text], _rope_bshd(key[:, n_text:], *video_rope)], dim=1)
            return key, value

        if kv == "rows" or (kv == "cache" and cache.k is not None):
            k, v = project_kv(torch.cat([norm_text, norm_rows], dim=1), rope_rows)
            if kv == "cache":
                text_pos = torch.arange(n_text, device=idx.device).expand(idx.shape[0], n_text)
                pos = torch.cat([text_pos, idx + n_text], dim=1)
                scatter_rows_(cache.k, pos, k)
                scatter_rows_(cache.v, pos, v)
                k, v = cache.k.to(k.dtype), cache.v.to(v.dtype)
        else:
            norm_x, _, _, _ = block.norm1(x, text, temb)
            full_rope = None if rope is None else tuple(r[None, :, None, :] for r in rope)
            k, v = project_kv(torch.cat([norm_text, norm_x], dim=1), full_rope)
            if kv == "cache":
                dtype = cache.dtype or k.dtype
                cache.k, cache.v = k.to(dtype).clone(), v.to(dtype).clone()
        q = split(attn.to_q(torch.cat([norm_text, norm_rows], dim=1)))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        q_text, q_rows = q[:, :n_text], q[:, n_text:]
        if rope_rows is not None:
            q_rows = _rope_bshd(q_rows, *rope_rows)
        out_rows, lse = attention_fn(q_rows, k, v)
        out_text = F.scaled_dot_product_attention(q_text.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)
        out = torch.cat([out_text, out_rows.to(out_text.dtype)], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.reshape(out.shape[0], out.shape[1], -1)))
        attn_text, attn_rows = out[:, :n_text], out[:, n_text:]
        h = x_rows + gate * attn_rows
        e = text + enc_gate * attn_text
        norm_h, norm_e, gate_ff, enc_gate_ff = block.norm2(h, e, temb)
        ff = block.ff(torch.cat([norm_e, norm_h], dim=1))
        h = h + gate_ff * ff[:, n_text:]
        e = e + enc_gate_ff * ff[:, :n_text]
        if cache is not None:
            cache.stream = e
        return h, lse


def _rope_bshd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (interleaved pairs) on ``x`` `[B, S, H, D]`, tables `[B or 1, S, 1, D]`."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


COGVIDEOX = register_adapter(CogVideoXAdapter())
