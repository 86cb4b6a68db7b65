"""Adapter for diffusers' ``LTXVideoTransformer3DModel`` (LTX-Video).

LTX's self-attention (``transformer_blocks[i].attn1``) is video-only; text enters through cross-attention
(``attn2``, with the text attention mask), so there are no text tokens in self-attention. The transformer takes
packed tokens ``[B, S, C]`` and the token grid as the ``num_frames``/``height``/``width`` arguments (frame-major
raster). RoPE is applied to the flattened ``[B, S, H*D]`` q/k before the heads are split, with the three axes
interleaved pair by pair over the whole inner dimension (``LTXVideoRotaryPosEmbed``): a head's channels are not
contiguous (t, h, w) groups, and the interleaving restarts per head only when ``D`` is a multiple of 6, so
:meth:`LTXAdapter.rope_groups` returns bool ``[H, D]`` channel masks (:func:`ltx_rope_groups`).

Example:
    >>> from diffusers import LTXVideoTransformer3DModel
    >>> m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12,
    ...                                cross_attention_dim=24, num_layers=1, caption_channels=16)
    >>> LTXAdapter().blocks(m)[0].attn1.heads
    2
"""

from __future__ import annotations

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from vdit_accel.adapters import AttentionCall, ModelAdapter, TokenLayout, context_parallel_world, register_adapter
from vdit_accel.errors import ConfigError
from vdit_accel.ops.rows import gather_rows, scatter_rows_

_ROOT_ARGS = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "num_frames", "height",
              "width")
_PROC_ARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "encoder_attention_mask")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    return dict(zip(names, args)) | kwargs


class LTXAdapter(ModelAdapter):
    family = "ltx"
    model_classes = (LTXVideoTransformer3DModel,)

    def layout(self, model, args, kwargs) -> TokenLayout:
        values = _bind(_ROOT_ARGS, args, kwargs)
        x = values["hidden_states"]  # [B, S, C] packed; under context parallelism this rank's S / P shard
        grid = tuple(int(values[n]) if values.get(n) is not None else -1 for n in ("num_frames", "height", "width"))
        world = context_parallel_world(model)  # the CP plan splits the root's hidden_states, not the grid arguments
        if min(grid) < 1 or grid[0] * grid[1] * grid[2] not in {x.shape[1], x.shape[1] * world}:
            shard = f" (a 1/{world} context-parallel shard)" if world > 1 else ""
            raise ConfigError(f"num_frames/height/width={grid} do not describe the {x.shape[1]} packed tokens{shard}: "
                              "pass the latent token grid, as LTXPipeline does")
        return TokenLayout(grid, 0, 0, x.shape[0])

    def context_parallel_plan(self, model):
        """diffusers' LTX plan without its text split, and the cross-attentions (``attn2``) local.

        diffusers 0.42.1's plan splits ``encoder_hidden_states`` and ``encoder_attention_mask`` over the ranks and
        runs cross-attention through the Ulysses op; the stock processor then views the text mask with *all* heads
        against the op's local heads and a text shard against the gathered text, and the call fails on any masked
        prompt (as ``LTXPipeline`` always passes). Unsplit text with a local cross-attention (each rank's queries
        against the whole text, as Wan's plan and processor do) is the one-process computation exactly, with no
        all-to-all for the text.
        """
        plan = dict(model._cp_plan)
        plan[""] = {k: v for k, v in plan[""].items() if k == "hidden_states"}
        return plan, [block.attn2 for block in model.transformer_blocks]

    def timestep(self, args, kwargs):
        return _bind(_ROOT_ARGS, args, kwargs).get("timestep")

    def blocks(self, model):
        return list(model.transformer_blocks)

    def self_attention(self, block):
        return block.attn1

    def rope_groups(self, model) -> dict[str, torch.Tensor]:
        """Bool `[H, D]` masks of the channels each axis rotates (see :func:`ltx_rope_groups`)."""
        return ltx_rope_groups(model.config.num_attention_heads, model.config.attention_head_dim)

    # ---------------------------------------------------------------------------------- self-attention call
    def qkv(self, attn, args, kwargs) -> AttentionCall | None:
        """``LTXVideoAttnProcessor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)``
        up to its attention call, for self-attention calls (``encoder_hidden_states is None``)."""
        values = _bind(_PROC_ARGS, args, kwargs)
        if values.get("encoder_hidden_states") is not None:
            return None
        x, mask = values["hidden_states"], values.get("attention_mask")
        if mask is not None:
            b, s, _ = x.shape
            mask = attn.prepare_attention_mask(mask, s, b).view(b, attn.heads, -1, mask.shape[-1])
        q, k, v = _project(attn, x, values.get("image_rotary_emb"))
        proc = attn.get_processor()
        return AttentionCall(q, k, v, 0, 0, mask, getattr(proc, "_attention_backend", None),
                             getattr(proc, "_parallel_config", None))

    def attention_output(self, attn, out, call):
        out = out.flatten(2, 3).to(call.q.dtype)
        return attn.to_out[1](attn.to_out[0](out))

    # ------------------------------------------------------------------------------------------ block calls
    def block_rows_forward(self, block, args, kwargs, idx, attention_fn, *, kv="all", cache=None):
        """An ``LTXVideoTransformerBlock`` for the rows ``idx`` `[B, k]` (same ``kv`` modes as Wan's; cross-attention
        runs stock on the rows). Returns (rows `[B, k, C]`, lse `[B, k, H]`)."""
        values = _bind(_BLOCK_ARGS, args, kwargs)
        x, text, temb = values["hidden_states"], values["encoder_hidden_states"], values["temb"]
        rope = values.get("image_rotary_emb")
        if kv == "cache" and cache is None:
            raise ConfigError("kv='cache' needs a RowCache")
        b = x.size(0)
        table = block.scale_shift_table
        ada = table[None, None].to(temb.device) + temb.reshape(b, temb.size(1), table.shape[0], -1)
        full = ada.unbind(dim=2)  # each [B, 1 or S, C]
        sub = [m if m.shape[1] == 1 else gather_rows(m, idx) for m in full]
        shift, scale = full[0], full[1]
        s_shift, s_scale, s_gate, s_shift_mlp, s_scale_mlp, s_gate_mlp = sub
        attn = block.attn1
        x_rows = gather_rows(x, idx)
        rope_rows = None if rope is None else tuple(gather_rows(r, idx) for r in rope)
        norm_rows = block.norm1(x_rows) * (1 + s_scale) + s_shift
        q, k_rows, v_rows = _project(attn, norm_rows, rope_rows)
        if kv == "rows":
            k, v = k_rows, v_rows
        elif kv == "cache" and cache.k is not None:
            scatter_rows_(cache.k, idx, k_rows)
            scatter_rows_(cache.v, idx, v_rows)
            k, v = cache.k.to(q.dtype), cache.v.to(q.dtype)
        else:
            norm_x = block.norm1(x) * (1 + scale) + shift
            _, k, v = _project(attn, norm_x, rope, query=False)
            if kv == "cache":
                dtype = cache.dtype or k.dtype
                cache.k, cache.v = k.to(dtype).clone(), v.to(dtype).clone()
        out, lse = attention_fn(q, k, v)
        h = x_rows + self.attention_output(attn, out, AttentionCall(q, k, v)) * s_gate
        h = h + block.attn2(h, encoder_hidden_states=text, image_rotary_emb=None,
                            attention_mask=values.get("encoder_attention_mask"))
        norm_h = block.norm2(h) * (1 + s_scale_mlp) + s_shift_mlp
        return h + block.ff(norm_h) * s_gate_mlp, lse


def ltx_rope_groups(heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """LTX-Video's RoPE channel -> axis map, as bool `[H, D]` masks per axis (``"t"``, ``"h"``, ``"w"``).

    ``LTXVideoRotaryPosEmbed(dim=H*D)`` builds ``dim // 6`` frequencies per axis, lays the angles out as
    ``[frequency, axis]`` (``freqs.transpose(-1, -2).flatten(2)``), repeats each angle for the two channels of its
    rotated pair (``repeat_interleave(2)``) and prepends ``dim % 6`` unrotated channels (cos 1, sin 0). So channel
    ``c = h*D + d`` of the flattened q/k is unrotated when ``c < dim % 6``, and otherwise belongs to axis
    ``((c - dim % 6) // 2) % 3`` (0 = t, 1 = h, 2 = w). Unrotated channels belong to no group. The map is the same in
    every head only when ``D`` is a multiple of 6 (then ``dim % 6 == 0``); LTX-Video's own 32 x 64 is not (heads
    start at different phases of the t, h, w cycle).

    Example:
        >>> g = ltx_rope_groups(2, 10)  # dim 20: channels 0, 1 unrotated, then pairs t, h, w, t, h, w, ...
        >>> ["".join(a if g[a][h, d] else "" for a in "thw") or "-" for h in range(2) for d in range(0, 10, 2)]
        ['-', 't', 'h', 'w', 't', 'h', 'w', 't', 'h', 'w']
    """
    inner = heads * head_dim
    pad = inner % 6
    c = torch.arange(inner)
    axis = torch.where(c < pad, -1, torch.div(c - pad, 2, rounding_mode="floor") % 3).view(heads, head_dim)
    return {a: axis == i for i, a in enumerate(("t", "h", "w"))}


def _project(attn, x: torch.Tensor, rope, query: bool = True):
    """Post-norm, post-RoPE q (``None`` unless ``query``), k and v `[B, S, H, D]` of ``x`` `[B, S, C]`, as the stock
    processor computes them (RoPE tables `[B, S, H*D]` on the flattened channels)."""
    q = attn.norm_q(attn.to_q(x)) if query else None
    k = attn.norm_k(attn.to_k(x))
    v = attn.to_v(x)
    if rope is not None:
        q = apply_rotary_emb(q, rope) if query else None
        k = apply_rotary_emb(k, rope)
    split = (attn.heads, -1)
    return (None if q is None else q.unflatten(2, split)), k.unflatten(2, split), v.unflatten(2, split)


LTX = register_adapter(LTXAdapter())
