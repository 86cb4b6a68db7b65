"""Adapter for diffusers' ``HunyuanVideoTransformer3DModel``.

HunyuanVideo runs *joint* self-attention in two kinds of blocks, both returning ``(video, text)``: dual-stream
``transformer_blocks`` (separate text projections ``add_q/k/v_proj``) and single-stream
``single_transformer_blocks`` (one projection over ``[video; text]``). In both the sequence is video first, then
the text (``text_suffix`` = the text length), and the attention mask (``[B, 1, 1, N]`` bool) masks the text
padding keys. RoPE (axes ``rope_axes_dim``, e.g. 16/56/56) is applied to the video part of q and k only, with
interleaved pairs over contiguous (t, h, w) channel groups. Video tokens are frame-major raster over
``(F / patch_size_t, H / p, W / p)``.

The row-subset block (Astraea) honours the text padding (the pipeline always pads the prompt to
``max_sequence_length``): the block's key-padding mask goes to the row attention op as ``key_mask`` `[B, S]` (the
masked keys are dropped, so the rows are exactly the stock block's), and text queries take the stock masked op.

Example:
    >>> from diffusers import HunyuanVideoTransformer3DModel
    >>> m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
    ...     attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
    ...     patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
    >>> HunyuanVideoAdapter().rope_groups(m)
    {'t': slice(0, 4, None), 'h': slice(4, 10, None), 'w': slice(10, 16, None)}
"""

from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock,
)

from vdit_accel.adapters import AttentionCall, ModelAdapter, TokenLayout, register_adapter
from vdit_accel.errors import UnsupportedModelError
from vdit_accel.ops.rows import gather_rows

_ROOT_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")
_PROC_ARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "attention_mask", "image_rotary_emb")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    values = dict(zip(names, args)) | kwargs
    if "freqs_cis" in values:  # the dual-stream block's name for the rotary tables
        values["image_rotary_emb"] = values.pop("freqs_cis")
    return values


class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan_video"
    model_classes = (HunyuanVideoTransformer3DModel,)
    joint_blocks = True

    def layout(self, model, args, kwargs) -> TokenLayout:
        values = _bind(_ROOT_ARGS, args, kwargs)
        x, text = values["hidden_states"], values["encoder_hidden_states"]  # [B, C, F, H, W], [B, L, C_text]
        b, _, f, h, w = x.shape
        p, p_t = model.config.patch_size, model.config.patch_size_t
        return TokenLayout((f // p_t, h // p, w // p), 0, text.shape[1], b)

    def timestep(self, args, kwargs):
        return _bind(_ROOT_ARGS, args, kwargs).get("timestep")

    def blocks(self, model):
        return list(model.transformer_blocks) + list(model.single_transformer_blocks)

    def self_attention(self, block):
        return block.attn

    def rope_groups(self, model) -> dict[str, slice]:
        t, h, w = model.config.rope_axes_dim
        return {"t": slice(0, t), "h": slice(t, t + h), "w": slice(t + h, t + h + w)}

    # ---------------------------------------------------------------------------------- self-attention call
    def qkv(self, attn, args, kwargs) -> AttentionCall | None:
        """``HunyuanVideoAttnProcessor2_0(attn, hidden_states, encoder_hidden_states, attention_mask,
        image_rotary_emb)`` up to its attention call: q, k, v `[B, N + L, H, D]`, video first."""
        values = _bind(_PROC_ARGS, args, kwargs)
        x, text = values["hidden_states"], values.get("encoder_hidden_states")
        if text is None:
            return None
        q, k, v = _project(attn, x, text, values.get("image_rotary_emb"))
        proc = attn.get_processor()
        return AttentionCall(q, k, v, 0, text.shape[1], values.get("attention_mask"),
                             getattr(proc, "_attention_backend", None), getattr(proc, "_parallel_config", None),
                             extra={"n_text": text.shape[1]})

    def attention_output(self, attn, out, call):
        """``(video [B, N, C], text [B, L, C])`` as the stock processor returns them."""
        return _output(attn, out.flatten(2, 3).to(call.q.dtype), call.extra["n_text"])

    def masks_self_attention(self, model) -> bool:
        """Always: the model builds a key-padding mask for every call (all ``True`` when nothing is padded)."""
        return True

    # ------------------------------------------------------------------------------------------ block calls
    def row_kv_modes(self, model) -> tuple[str, ...]:
        return ("all",)

    def block_output(self, args, kwargs, hidden_states, cache=None):
        text = cache.stream if cache is not None and cache.stream is not None else None
        return hidden_states, (_bind(_BLOCK_ARGS, args, kwargs)["encoder_hidden_states"] if text is None else text)

    def block_output_stream(self, output):
        return output[0]

    def block_rows_forward(self, block, args, kwargs, idx, attention_fn, *, kv="all", cache=None):
        """A dual- or single-stream block for the video rows ``idx`` `[B, k]`; every text token is computed too
        (its output left in ``cache.stream``). ``kv="all"`` only. ``attention_fn`` gets the video rows' queries and
        the joint keys (video position ``i`` is key ``i``, text after the video). Returns (rows `[B, k, C]`,
        lse `[B, k, H]`).

        A key-padding ``attention_mask`` (the model's `[B, 1, 1, N + L]` bool mask of text padding) is honoured: the
        video rows' ``attention_fn`` is called with ``key_mask=`` `[B, N + L]` when some key is masked, text queries
        take the stock op with the mask.

        Raises:
            UnsupportedModelError: ``kv`` other than ``"all"``, a token-replace block, or a mask that is not a
                bool key-padding mask (one value per key, broadcast over queries and heads).
        """
        if kv != "all":
            raise UnsupportedModelError(f"kv={kv!r} is not supported on HunyuanVideo's row-subset block: accepted "
                                        "['all']")
        if type(block) not in (HunyuanVideoTransformerBlock, HunyuanVideoSingleTransformerBlock):
            raise UnsupportedModelError(f"{type(block).__name__} has no row-subset block: supported "
                                        "HunyuanVideoTransformerBlock, HunyuanVideoSingleTransformerBlock")
        values = _bind(_BLOCK_ARGS, args, kwargs)
        x, text, temb = values["hidden_states"], values["encoder_hidden_states"], values["temb"]
        mask, rope = values.get("attention_mask"), values.get("image_rotary_emb")
        key_mask = _key_mask(mask, x.shape[0], x.shape[1] + text.shape[1])
        if key_mask is not None:
            fn = attention_fn

            def attention_fn(q, k, v):
                return fn(q, k, v, key_mask=key_mask)
        rope_rows = None if rope is None else tuple(gather_rows(r.unsqueeze(0), idx)[:, :, None, :] for r in rope)
        x_rows = gather_rows(x, idx)
        if isinstance(block, HunyuanVideoTransformerBlock):
            rows, text_out, lse = _dual_rows(block, x, x_rows, text, temb, rope, rope_rows, attention_fn, mask)
        else:
            rows, text_out, lse = _single_rows(block, x, x_rows, idx, text, temb, rope, rope_rows, attention_fn,
                                               mask)
        if cache is not None:
            cache.stream = text_out
        return rows, lse


def _key_mask(mask: torch.Tensor | None, b: int, s: int) -> torch.Tensor | None:
    """The block's attention mask as a key-padding mask `[B, S]` bool, ``None`` when no key is masked.

    Raises:
        UnsupportedModelError: the mask is not bool with one value per key (`[B, 1, 1, S]` or `[B, S]`).
    """
    if mask is None or bool(mask.all()):
        return None
    if mask.dtype != torch.bool or mask.numel() != b * s or mask.shape[0] != b or mask.shape[-1] != s:
        raise UnsupportedModelError(f"attention_mask of shape {tuple(mask.shape)} and dtype {mask.dtype} is not "
                                    f"supported on HunyuanVideo's row-subset block: accepted a bool key-padding mask "
                                    f"[B, 1, 1, S] = [{b}, 1, 1, {s}]")
    return mask.reshape(b, s)


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(2, (heads, -1))


def _project(attn, x: torch.Tensor, text: torch.Tensor, rope, rope_video=None, text_q: bool = True):
    """Post-norm, post-RoPE q, k, v `[B, N + L, H, D]` of video ``x`` `[B, N, C]` and ``text`` `[B, L, C]` as the
    stock processor computes them (``rope_video``: tables already gathered `[B, N, 1, D]` instead of ``rope``)."""
    joint = attn.add_q_proj is None
    tokens = torch.cat([x, text], dim=1) if joint else x
    q, k, v = (_split(f(tokens), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if rope is not None or rope_video is not None:
        n = x.shape[1]

        def rot(t):
            if rope_video is not None:
                return _rope_rows(t, *rope_video)
            return apply_rotary_emb(t, rope, sequence_dim=1)

        if joint:
            q = torch.cat([rot(q[:, :n]), q[:, n:]], dim=1)
            k = torch.cat([rot(k[:, :n]), k[:, n:]], dim=1)
        else:
            q, k = rot(q), rot(k)
    if not joint:
        eq, ek, ev = (_split(f(text), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
    return q, k, v


def _output(attn, out: torch.Tensor, n_text: int):
    """Split merged-head output `[B, N + L, C]` into (video, text) and project each as the stock processor does."""
    video, text = out[:, :-n_text], out[:, -n_text:]
    if getattr(attn, "to_out", None) is not None:
        video = attn.to_out[1](attn.to_out[0](video))
    if getattr(attn, "to_add_out", None) is not None:
        text = attn.to_add_out(text)
    return video, text


def _rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (interleaved pairs, ``sequence_dim=1``) with per-row tables `[B, k, 1, D]`."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _attend(attn, q_rows, q_text, k, v, attention_fn, mask):
    """Video rows through ``attention_fn`` (with LSE), text queries through the stock attention op (with the
    block's ``mask``, as the stock processor)."""
    out_rows, lse = attention_fn(q_rows, k, v)
    proc = attn.get_processor()
    out_text = dispatch_attention_fn(q_text, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                     backend=getattr(proc, "_attention_backend", None), parallel_config=None)
    return torch.cat([out_rows.to(out_text.dtype), out_text], dim=1), lse


def _dual_rows(block, x, x_rows, text, temb, rope, rope_rows, attention_fn, mask):
    attn = block.attn
    norm_x, _, _, _, _ = block.norm1(x, emb=temb)
    norm_rows, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x_rows, emb=temb)
    norm_text, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text, emb=temb)
    _, k, v = _project(attn, norm_x, norm_text, rope)
    q, _, _ = _project(attn, norm_rows, norm_text, None, rope_video=rope_rows)
    n = x_rows.shape[1]
    out, lse = _attend(attn, q[:, :n], q[:, n:], k, v, attention_fn, mask)
    attn_rows, attn_text = _output(attn, out.flatten(2, 3).to(q.dtype), text.shape[1])
    h = x_rows + attn_rows * gate_msa.unsqueeze(1)
    e = text + attn_text * c_gate_msa.unsqueeze(1)
    norm_h = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    norm_e = block.norm2_context(e) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    h = h + gate_mlp.unsqueeze(1) * block.ff(norm_h)
    e = e + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_e)
    return h, e, lse


def _single_rows(block, x, x_rows, idx, text, temb, rope, rope_rows, attention_fn, mask):
    attn = block.attn
    n_text = text.shape[1]
    tokens = torch.cat([x, text], dim=1)
    norm_all, gate = block.norm(tokens, emb=temb)
    norm_x, norm_text = norm_all[:, :-n_text], norm_all[:, -n_text:]
    norm_rows = gather_rows(norm_x, idx)
    _, k, v = _project(attn, norm_x, norm_text, rope)
    q, _, _ = _project(attn, norm_rows, norm_text, None, rope_video=rope_rows)
    n = x_rows.shape[1]
    out, lse = _attend(attn, q[:, :n], q[:, n:], k, v, attention_fn, mask)
    attn_rows, attn_text = _output(attn, out.flatten(2, 3).to(q.dtype), n_text)
    norm_sel = torch.cat([norm_rows, norm_text], dim=1)
    mlp = block.act_mlp(block.proj_mlp(norm_sel))
    hidden = torch.cat([torch.cat([attn_rows, attn_text], dim=1), mlp], dim=2)
    hidden = gate.unsqueeze(1) * block.proj_out(hidden) + torch.cat([x_rows, text], dim=1)
    return hidden[:, :n], hidden[:, n:], lse


HUNYUAN_VIDEO = register_adapter(HunyuanVideoAdapter())
