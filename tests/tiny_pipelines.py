"""Tiny random-init diffusers transformers and pipelines for the family tests, built offline.

Every builder seeds torch before constructing, so two calls give identical weights. Text encoders come from
``transformers`` (a test-only dependency) with tiny configs; tokenizers are word-level ``tokenizers``
objects wrapped in ``PreTrainedTokenizerFast`` (nothing is downloaded). Sizes follow diffusers' own tests
(``num_layers`` 1-2, 2 heads), with head dims large enough for each family's RoPE split.
"""

from __future__ import annotations

import torch

WORDS = "a red circle moves left on blue background green square jumps right cat dog runs".split()
PROMPT = "a red circle moves left"


def word_tokenizer(max_length: int = 16):
    """A word-level fast tokenizer over :data:`WORDS` (pad 0, eos 1, unk 2), padding to ``max_length``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_t5(d_model: int = 16, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


# ------------------------------------------------------------------------------------------------- CogVideoX
def tiny_cogvideox(rope: bool = True, seed: int = 0, num_layers: int = 2):
    """``CogVideoXTransformer3DModel``: 2 heads x 16 channels, text 6 tokens of 16, RoPE (5B/1.5) or sincos (2B)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=num_layers, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, use_rotary_positional_embeddings=rope,
        use_learned_positional_embeddings=False).eval()


def cogvideox_inputs(model, batch: int = 2, frames: int = 3, size: int = 8, text: int = 6, seed: int = 1):
    """Root-call kwargs: latents `[B, F, C, H, W]`, text `[B, L, 16]`, timestep, and RoPE tables if the model uses
    them (computed as ``CogVideoXPipeline`` does)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(batch, frames, 4, size, size, generator=g),
              encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
              timestep=torch.tensor([500] * batch), return_dict=False)
    if model.config.use_rotary_positional_embeddings:
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        p = model.config.patch_size
        kw["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=model.config.attention_head_dim, crops_coords=((0, 0), (size // p, size // p)),
            grid_size=(size // p, size // p), temporal_size=frames)
    return kw


def cogvideox_pipeline(rope: bool = True):
    """``CogVideoXPipeline`` from tiny parts (VAE 4x temporal, 8x spatial compression; 16x16 video, 9 frames)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    return CogVideoXPipeline(tokenizer=word_tokenizer(6), text_encoder=tiny_t5(16), vae=vae,
                             transformer=tiny_cogvideox(rope), scheduler=CogVideoXDDIMScheduler())


COGVIDEOX_CALL = dict(height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=2.0,
                      max_sequence_length=6, output_type="latent")


# ------------------------------------------------------------------------------------------------------ Wan
def tiny_wan(seed: int = 0, **overrides):
    """``WanTransformer3DModel``: 2 heads x 12 channels, 2 layers, text 16."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=16, ffn_dim=24, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanTransformer3DModel(**(cfg | overrides)).eval()


def tiny_wan_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def wan_pipeline(two_experts: bool = False, expand_timesteps: bool = False, boundary_ratio: float = 0.6,
                 shift: float = 1.0):
    """``WanPipeline`` from tiny parts: Wan2.1 (one denoiser), Wan2.2 A14B (``transformer_2`` with
    ``boundary_ratio``) or Wan2.2 TI2V-5B style (``expand_timesteps``: per-token timesteps). With ``shift=1`` and 4
    steps the timesteps are 1000, 750, 500, 250: ``boundary_ratio=0.6`` gives two steps to each expert."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    kw = {}
    if two_experts:
        kw = dict(transformer_2=tiny_wan(seed=1), boundary_ratio=boundary_ratio)
    return WanPipeline(tokenizer=word_tokenizer(16), text_encoder=tiny_t5(16), vae=tiny_wan_vae(),
                       transformer=tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                       expand_timesteps=expand_timesteps, **kw)


WAN_CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=2.0, max_sequence_length=16,
                output_type="latent")


def tiny_wan_vace(seed: int = 0):
    """``WanVACETransformer3DModel``: the tiny Wan with control blocks after main blocks 0 and 1."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=24, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=8).eval()


def tiny_skyreels_v2(seed: int = 0):
    """``SkyReelsV2Transformer3DModel`` with the tiny Wan sizes."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=24, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()


def wan_inputs(batch: int = 2, frames: int = 2, size: int = 8, text: int = 5, seed: int = 1, **extra):
    """Root-call kwargs of the Wan family: latents `[B, 4, F, H, W]`, timestep `[B]`, text `[B, L, 16]`."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
                timestep=torch.tensor([700.0] * batch),
                encoder_hidden_states=torch.randn(batch, text, 16, generator=g), return_dict=False, **extra)


# ------------------------------------------------------------------------------------------------------ LTX
def tiny_ltx(seed: int = 0):
    """``LTXVideoTransformer3DModel``: 2 heads x 12 channels, 2 layers, 8 latent channels, text 16."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
                                      num_layers=2, caption_channels=16).eval()


def ltx_inputs(batch: int = 2, grid=(2, 4, 4), text: int = 5, seed: int = 1):
    """Root-call kwargs: packed latents `[B, T*H*W, 8]`, text `[B, L, 16]` with its mask, timestep, token grid."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    mask = torch.ones(batch, text)
    mask[:, -1] = 0  # one padded text token: the cross-attention mask matters
    return dict(hidden_states=torch.randn(batch, t * h * w, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 16, generator=g), timestep=torch.tensor([700] * batch),
                encoder_attention_mask=mask, num_frames=t, height=h, width=w, return_dict=False)


def ltx_pipeline():
    """``LTXPipeline`` from tiny parts (VAE 4x spatial, 4x temporal compression, as diffusers' tests build it)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=tiny_t5(16),
                       tokenizer=word_tokenizer(16), transformer=tiny_ltx())


LTX_CALL = dict(height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=2.0, max_sequence_length=16,
                output_type="latent")


# ----------------------------------------------------------------------------------------------- HunyuanVideo
def tiny_hunyuan_video(seed: int = 0):
    """``HunyuanVideoTransformer3DModel``: 2 heads x 16 channels (RoPE axes 4/6/6), one dual- and one
    single-stream block, text 16 (Llama width), pooled 8 (CLIP width), guidance embedding."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).eval()


def hunyuan_inputs(batch: int = 2, frames: int = 2, size: int = 4, text: int = 5, padded: int = 0, seed: int = 1):
    """Root-call kwargs: latents `[B, 4, F, H, W]`, text `[B, L, 16]` with its mask (``padded`` masked tokens at
    the end of the second prompt), pooled `[B, 8]`, timestep, guidance."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    if padded:
        mask[-1, -padded:] = 0
    return dict(hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
                timestep=torch.tensor([700] * batch),
                encoder_hidden_states=torch.randn(batch, text, 16, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(batch, 8, generator=g), guidance=torch.tensor([6000.0] * batch),
                return_dict=False)


def hunyuan_video_pipeline():
    """``HunyuanVideoPipeline`` from tiny parts: Llama (2 layers, width 16) + CLIP text encoders, word tokenizers,
    VAE 8x spatial / 4x temporal."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    vocab = len(WORDS) + 3
    llama = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=8,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=word_tokenizer(16), transformer=tiny_hunyuan_video(),
                                vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=clip,
                                tokenizer_2=word_tokenizer(77))


HUNYUAN_CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=6.0,
                    max_sequence_length=16, prompt_template={"template": "{}", "crop_start": 0}, output_type="latent")
