"""The embedded text-to-video model: diffusers' ``WanTransformer3DModel`` plus a small caption encoder.

The "latent" is the RGB video itself in [-1, 1] (no VAE). Captions are word ids from
:mod:`vdit_accel.instrument.captions`, embedded by a learned table plus learned positions, and reach
the transformer through Wan's own text projection and cross-attention, exactly as T5 embeddings do in
Wan2.1. Weights are stored as one safetensors file beside a validated ``config.json``; nothing is
pickled.

Example:
    >>> cfg = EmbeddedConfig.tiny()
    >>> model = EmbeddedModel(cfg)
    >>> model.encode_prompts(["a red circle grows on a gray background"]).shape
    torch.Size([1, 20, 16])
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vdit_accel.errors import ConfigError, WeightsError
from vdit_accel.instrument.captions import MAX_CAPTION_TOKENS, VOCAB, tokenize

WEIGHTS_DIR = Path(__file__).parent / "weights" / "embedded-wan-v1"
CONFIG_FORMAT = "vdit-accel/embedded-model"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class EmbeddedConfig:
    """Architecture and geometry of the embedded model.

    Args:
        model_id (`str`): identifier recorded in presets and results.
        frames, height, width (`int`, defaults 16, 64, 64): bench geometry in pixels.
        patch_size (`tuple[int, int, int]`, defaults (2, 4, 4)): (t, h, w) patch; 16x64x64 -> 8x16x16 tokens.
        num_heads (`int`, defaults 2), head_dim (`int`, defaults 64): attention shape; dim = heads * head_dim.
        num_layers (`int`, defaults 4), ffn_dim (`int`, defaults 256): transformer depth and MLP width.
        text_dim (`int`, defaults 64): caption embedding width.
        freq_dim (`int`, defaults 64): sinusoidal timestep embedding width.
        max_text_len (`int`, defaults 20): padded caption length.
        vocab (`tuple[str, ...]`): caption vocabulary (index 0 is padding).
        flow_shift (`float`, defaults 3.0): flow-matching timestep shift used by the sampler.
        caption_mixer (`bool`, defaults False): add to every caption token an MLP summary of the whole
            caption, so that any cross-attention read carries every attribute (see ``CaptionEncoder``).
    """

    model_id: str = "vdit-accel/embedded-wan-v1"
    frames: int = 16
    height: int = 64
    width: int = 64
    patch_size: tuple[int, int, int] = (2, 4, 4)
    num_heads: int = 2
    head_dim: int = 64
    num_layers: int = 4
    ffn_dim: int = 256
    text_dim: int = 64
    freq_dim: int = 64
    max_text_len: int = MAX_CAPTION_TOKENS
    vocab: tuple[str, ...] = field(default=VOCAB)
    flow_shift: float = 3.0
    caption_mixer: bool = False

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width", "num_heads", "head_dim", "num_layers", "ffn_dim", "text_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} is out of range: accepted [1, inf)")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "vocab", tuple(self.vocab))
        check_geometry(self.frames, self.height, self.width, self.patch_size)

    @classmethod
    def tiny(cls) -> EmbeddedConfig:
        """A random-init test configuration (2 layers, 2 heads of 24, 4x8x8 pixels -> 2x2x2 tokens)."""
        return cls(
            model_id="vdit-accel/tiny-test",
            frames=4,
            height=8,
            width=8,
            num_layers=2,
            head_dim=24,
            ffn_dim=32,
            text_dim=16,
            freq_dim=32,
        )

    def wan_kwargs(self) -> dict:
        """Constructor arguments of the ``WanTransformer3DModel``."""
        return dict(
            patch_size=self.patch_size,
            num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim,
            in_channels=3,
            out_channels=3,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["vocab"] = list(self.vocab)
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> EmbeddedConfig:
        d = dict(d)
        if d.pop("format", None) != CONFIG_FORMAT or d.pop("version", None) != CONFIG_VERSION:
            raise WeightsError(f"config is not a {CONFIG_FORMAT} v{CONFIG_VERSION} file")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise WeightsError(f"config has unknown keys {unknown}: accepted {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise WeightsError(f"config is malformed: {e}") from e


def check_geometry(frames: int, height: int, width: int, patch_size: tuple[int, int, int]) -> None:
    """Raise :class:`ConfigError` unless each size is a positive multiple of its patch size."""
    for name, size, p in zip(("frames", "height", "width"), (frames, height, width), patch_size):
        if size < p or size % p:
            raise ConfigError(
                f"{name}={size} is not accepted: it must be a positive multiple of the patch size {p} "
                f"(patch_size={tuple(patch_size)})"
            )


class CaptionEncoder(nn.Module):
    """Word-embedding table plus learned positions: ids [B, L] -> embeddings [B, L, text_dim].

    With ``mixer``, an MLP of the whole (flattened) caption is added to every token, so each token also
    carries the full caption: a model with few cross-attention heads need not find each attribute's word.
    """

    def __init__(self, vocab_size: int, max_len: int, text_dim: int, mixer: bool = False) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, text_dim)
        self.positions = nn.Parameter(torch.zeros(max_len, text_dim))
        nn.init.normal_(self.words.weight, std=1.0)
        nn.init.normal_(self.positions, std=0.5)
        self.mixer = None
        if mixer:
            self.mixer = nn.Sequential(nn.Linear(max_len * text_dim, 4 * text_dim), nn.GELU(),
                                       nn.Linear(4 * text_dim, text_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.words(ids) + self.positions[: ids.shape[1]]
        if self.mixer is not None:
            emb = emb + self.mixer(emb.flatten(1)).unsqueeze(1)
        return emb


class EmbeddedModel(nn.Module):
    """The caption encoder and the Wan transformer, held together for training, saving and sampling."""

    def __init__(self, config: EmbeddedConfig) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = CaptionEncoder(len(config.vocab), config.max_text_len, config.text_dim,
                                           mixer=config.caption_mixer)
        self.transformer = WanTransformer3DModel(**config.wan_kwargs())

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (``""`` = unconditional) -> caption embeddings ``[B, L, text_dim]``."""
        if tuple(self.config.vocab) != VOCAB:
            raise WeightsError("the weights were trained on another caption vocabulary")
        ids = tokenize(prompts, self.config.max_text_len)
        return self.text_encoder(ids.to(self.text_encoder.positions.device))

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` (plus optional ``extra`` keys) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"model_id": self.config.model_id})
        (directory / "config.json").write_text(json.dumps({**self.config.to_dict(), **(extra or {})}, indent=1))

    @classmethod
    def load(cls, directory: str | Path | None = None) -> EmbeddedModel:
        """Load a saved model (``None``: the shipped one, ``WEIGHTS_DIR``); raise :class:`WeightsError` on a
        missing, corrupt or mismatched file."""
        directory = Path(WEIGHTS_DIR if directory is None else directory)
        cfg_path, w_path = directory / "config.json", directory / "model.safetensors"
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise WeightsError(f"weight file {str(p)!r} is missing")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{str(cfg_path)!r} is not valid JSON: {e}") from e
        raw = {k: v for k, v in raw.items() if k != "training"}
        model = cls(EmbeddedConfig.from_dict(raw))
        try:
            state = load_file(str(w_path))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{str(w_path)!r} is not a readable safetensors file: {e}") from e
        missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
        if missing or unexpected:
            raise WeightsError(
                f"{str(w_path)!r} does not match its config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise WeightsError(f"{str(w_path)!r} does not match its config: {e}") from e
        return model.eval()
