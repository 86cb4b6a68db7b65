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

from vdit_accel import validate
from vdit_accel.config_io import check_bool, check_int, check_sequence, check_str
from vdit_accel.errors import ChecksumError, ConfigError, VditAccelError, WeightsError
from vdit_accel.instrument.captions import MAX_CAPTION_TOKENS, VOCAB, tokenize

#: the shipped default (``vdit-accel train --recipe v2``, session 6): every preset and published figure is for it.
V2_WEIGHTS_DIR = Path(__file__).parent / "weights" / "embedded-wan-v2"
#: the first model (``--recipe scratch``), the default until session 7; ``docs/results/v1/`` holds its figures.
#: Load it with ``--weights V1_WEIGHTS_DIR`` (its own CFG 5 follows from its config).
V1_WEIGHTS_DIR = Path(__file__).parent / "weights" / "embedded-wan-v1"
WEIGHTS_DIR = V2_WEIGHTS_DIR
CONFIG_FORMAT = "vdit-accel/embedded-model"
CONFIG_VERSION = 1
PREDICTIONS = ("velocity", "sample")
MIN_SIGMA_FOR_SAMPLE = 0.05  # x0 -> velocity divides by the noise level; below this it is held
NO_OP_MODULES = ("pooled_caption.",)  # start as a no-op: a fine-tune may start from weights without them
ROPE_MAX_SEQ_LEN = 64  # rotary table length: at most this many patches per axis (frames, height, width)
WEIGHTS_FILE = "model.safetensors"
CHECKSUM_KEY = "weights_sha256"  # config.json: {file name: SHA-256 hex}, verified on load
NOT_CONFIG_KEYS = ("training", CHECKSUM_KEY)  # records in config.json beside the architecture
MAX_PATCH = 16
MAX_VOCAB = 100_000
#: upper bounds of the integer fields (a config.json asking for more is refused before anything is allocated)
MAX_SIZES = {"frames": 1024, "height": 4096, "width": 4096, "num_heads": 128, "head_dim": 512, "num_layers": 128,
             "ffn_dim": 65536, "text_dim": 8192, "freq_dim": 4096, "max_text_len": 4096}


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
        guidance (`float`, defaults 5.0): the classifier-free guidance scale the sampler uses for this model when a
            generation does not set one (``GenerationConfig.guidance=None``), >= 0; chosen per model on
            training-distribution prompts (v2: 2.0, ``docs/instrument.md``). Read by the sampler only.
        caption_mixer (`bool`, defaults False): add to every caption token an MLP summary of the whole
            caption, so that any cross-attention read carries every attribute (see ``CaptionEncoder``).
        position_channels (`bool`, defaults False): concatenate three fixed coordinate channels (t, y, x
            in [-1, 1]) to the transformer's input, as Wan2.1 image-to-video concatenates its condition
            channels (``in_channels`` 6 instead of 3; see ``position_grid``). Wan's only position signal is
            RoPE, which is relative: without these channels a token cannot tell where in the frame it is.
        prediction (`str`, defaults "velocity"): what the transformer's last layer predicts. "velocity"
            (Wan's own parameterisation) or "sample": it predicts the clean clip x0 and a forward hook
            turns it into the velocity ``(x_t - x0) / max(t, 0.05)``, so callers always receive a
            velocity. A pixel patch (2*4*4*3 = 96 values) is nearly as wide as the model (128): x0 is a
            smooth, low-dimensional target, the velocity carries the full-rank noise (Li & He, "Back to
            Basics: Let Denoising Generative Models Denoise", 2025).
        pooled_text (`bool`, defaults False): add a projection of the mean caption embedding to the timestep
            embedding, so the caption also drives every block's adaLN modulation (as the pooled CLIP vector
            does in HunyuanVideo and SD3), not only the cross-attention. A forward hook on Wan's
            ``condition_embedder`` adds it (see ``PooledCaption``); its last layer starts at zero, so a model
            fine-tuned from weights without it starts out computing exactly what they did.
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
    guidance: float = 5.0
    caption_mixer: bool = False
    position_channels: bool = False
    prediction: str = "velocity"
    pooled_text: bool = False

    def __post_init__(self) -> None:
        check_str("model_id", self.model_id)
        if not isinstance(self.prediction, str) or self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction={self.prediction!r} is not known: accepted {list(PREDICTIONS)}")
        for name, hi in MAX_SIZES.items():
            check_int(name, getattr(self, name), lo=1, hi=hi)
        validate.check_guidance(self.guidance)
        validate.check_flow_shift(self.flow_shift)
        patch = check_sequence("patch_size", self.patch_size, max_len=3)
        if len(patch) != 3:
            raise ConfigError(f"patch_size={self.patch_size!r} is not accepted: three ints (t, h, w) >= 1")
        object.__setattr__(self, "patch_size", tuple(check_int(f"patch_size[{i}]", p, lo=1, hi=MAX_PATCH)
                                                     for i, p in enumerate(patch)))
        vocab = check_sequence("vocab", self.vocab, max_len=MAX_VOCAB)
        if len(vocab) < 2:
            raise ConfigError(f"vocab has {len(vocab)} entries: accepted at least 2 (index 0 is padding)")
        object.__setattr__(self, "vocab", tuple(check_str(f"vocab[{i}]", w) for i, w in enumerate(vocab)))
        for name in ("caption_mixer", "position_channels", "pooled_text"):
            check_bool(name, getattr(self, name))
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
            in_channels=6 if self.position_channels else 3,
            out_channels=3,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=ROPE_MAX_SEQ_LEN,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["vocab"] = list(self.vocab)
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> EmbeddedConfig:
        """The config of a ``config.json`` object; :class:`WeightsError` if it is not one of ours (format, version,
        unknown keys), :class:`ConfigError` naming the field if a value is out of range or of the wrong type."""
        if not isinstance(d, dict):
            raise WeightsError(f"config is {type(d).__name__} {d!r:.60}: a {CONFIG_FORMAT} JSON object is expected")
        d = dict(d)
        fmt, version = d.pop("format", None), d.pop("version", None)
        if fmt != CONFIG_FORMAT or version != CONFIG_VERSION or isinstance(version, bool):
            raise WeightsError(f"config is not a {CONFIG_FORMAT} v{CONFIG_VERSION} file (format={fmt!r:.60}, "
                               f"version={version!r:.20})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise WeightsError(f"config has unknown keys {unknown}: accepted {sorted(known)}")
        return cls(**d)


def _read_config_json(path: Path) -> dict:
    """A ``config.json`` as a dict; NaN/Infinity refused (:class:`ConfigError`), anything not a readable JSON
    object a :class:`WeightsError`."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"), parse_constant=lambda token: _refuse_constant(token, path))
    except VditAccelError:
        raise
    except UnicodeDecodeError as e:
        raise WeightsError(f"{str(path)!r} is not valid JSON: not UTF-8 text ({e})") from e
    except RecursionError as e:
        raise WeightsError(f"{str(path)!r} is not valid JSON: nested too deeply to be a model config") from e
    except ValueError as e:  # json.JSONDecodeError, and integers too long to parse
        raise WeightsError(f"{str(path)!r} is not valid JSON: {e}") from e
    except OSError as e:
        raise WeightsError(f"{str(path)!r} cannot be read: {e}") from e
    if not isinstance(raw, dict):
        raise WeightsError(f"{str(path)!r} holds a {type(raw).__name__}: expected a JSON object")
    return raw


def read_model_config(path: str | Path) -> EmbeddedConfig:
    """Parse a model folder's ``config.json`` (its training record and checksums are ignored) into an
    :class:`EmbeddedConfig`, without reading or verifying the weights (:meth:`EmbeddedModel.load` does).

    Raises:
        WeightsError: the file is unreadable, not JSON, not an object, or not one of ours.
        ConfigError: a value is out of range, non-finite or of the wrong type (the message names the field).
    """
    path = Path(path)
    raw = _read_config_json(path)
    try:
        return EmbeddedConfig.from_dict({k: v for k, v in raw.items() if k not in NOT_CONFIG_KEYS})
    except WeightsError as e:
        raise WeightsError(f"{str(path)!r}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"{str(path)!r}: {e}") from e


def check_geometry(frames: int, height: int, width: int, patch_size: tuple[int, int, int]) -> None:
    """Raise :class:`ConfigError` unless each size is an int, a positive multiple of its patch size and within
    the rotary table (``ROPE_MAX_SEQ_LEN`` patches per axis); see :func:`vdit_accel.validate.check_geometry`."""
    validate.check_geometry(frames, height, width, patch_size, max_positions=ROPE_MAX_SEQ_LEN)


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


def position_grid(frames: int, height: int, width: int) -> torch.Tensor:
    """Pixel-centre coordinates ``[3, F, H, W]``: channel 0 is time, 1 is y, 2 is x, each from -1 to 1.

    Relative to the clip, so the same grid shape appears at every resolution of the training curriculum.
    """
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in (frames, height, width)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _concat_position_channels(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the transformer: video ``[B, 3, F, H, W]`` -> ``[B, 6, F, H, W]``."""
    if args:
        x, args = args[0], args[1:]
    else:
        x = kwargs.pop("hidden_states")
    if x.shape[1] == 3:
        grid = position_grid(*x.shape[2:]).to(device=x.device, dtype=x.dtype)
        x = torch.cat([x, grid.expand(x.shape[0], *grid.shape)], dim=1)
    return args, {**kwargs, "hidden_states": x}


def _sample_to_velocity(module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of an x0-predicting transformer: ``v = (x_t - x0) / max(t, MIN_SIGMA_FOR_SAMPLE)``.

    ``x_t`` is the first 3 channels of the input ``[B, C, F, H, W]``; ``t = timestep / 1000`` ``[B]``.
    """
    x_t = (args[0] if args else kwargs["hidden_states"])[:, :3]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    sigma = (timestep.to(torch.float32) / 1000).clamp(min=MIN_SIGMA_FOR_SAMPLE).view(-1, 1, 1, 1, 1)
    x0 = output[0] if isinstance(output, tuple) else output.sample
    v = ((x_t.float() - x0.float()) / sigma).to(x0.dtype)
    if isinstance(output, tuple):
        return (v, *output[1:])
    output.sample = v
    return output


class PooledCaption(nn.Module):
    """Mean caption embedding -> a vector for the timestep embedding: ``[B, L, text_dim]`` -> ``[B, dim]``.

    The last layer is zero-initialised: a fresh ``PooledCaption`` adds nothing.
    """

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.proj[2].weight)
        nn.init.zeros_(self.proj[2].bias)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        return self.proj(captions.mean(dim=1))


class EmbeddedModel(nn.Module):
    """The caption encoder and the Wan transformer, held together for training, saving and sampling.

    With ``config.position_channels`` the transformer carries a forward pre-hook that appends the
    coordinate channels, and with ``config.prediction == "sample"`` a forward hook that turns its x0 into a
    velocity: every caller (sampler, training, methods, caches) passes the 3-channel video and gets a
    velocity back, as from any Wan transformer.
    """

    def __init__(self, config: EmbeddedConfig) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = CaptionEncoder(len(config.vocab), config.max_text_len, config.text_dim,
                                           mixer=config.caption_mixer)
        self.transformer = WanTransformer3DModel(**config.wan_kwargs())
        if config.position_channels:
            self.transformer.register_forward_pre_hook(_concat_position_channels, with_kwargs=True)
        if config.prediction == "sample":
            self.transformer.register_forward_hook(_sample_to_velocity, with_kwargs=True)
        self.pooled_caption = None
        if config.pooled_text:
            self.pooled_caption = PooledCaption(config.text_dim, config.num_heads * config.head_dim)
            self.transformer.condition_embedder.register_forward_hook(self._add_pooled_caption, with_kwargs=True)

    def _add_pooled_caption(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        """Forward hook of Wan's ``condition_embedder``: ``temb += PooledCaption(captions)``, and the blocks'
        modulation ``timestep_proj`` recomputed from it by the embedder's own layers.

        ``captions`` is the embedder's input ``[B, L, text_dim]``; ``temb`` is ``[B, dim]`` (or
        ``[B, S, dim]`` with per-token timesteps, as in Wan2.2 TI2V).
        """
        captions = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        temb, _, text, image = output
        pooled = self.pooled_caption(captions).to(temb.dtype)
        temb = temb + (pooled.unsqueeze(1) if temb.ndim == 3 else pooled)
        return temb, module.time_proj(module.act_fn(temb)), text, image

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
        w_path = directory / WEIGHTS_FILE
        with validate.atomic_write(w_path) as tmp:
            save_file(tensors, str(tmp), metadata={"model_id": self.config.model_id})
            digest = validate.sha256_file(tmp)
        config = {**self.config.to_dict(), **(extra or {}), CHECKSUM_KEY: {WEIGHTS_FILE: digest}}
        with validate.atomic_write(directory / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=1))

    def start_from(self, directory: str | Path) -> None:
        """Copy the weights of a saved model (a fine-tune's start); modules that begin as a no-op
        (``pooled_caption``) may be absent from it and keep their initialisation. Other mismatches raise
        :class:`WeightsError`."""
        state = EmbeddedModel.load(directory).state_dict()
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a shape mismatch
            raise WeightsError(f"the weights in {str(directory)!r} do not fit this config: {e}") from e
        if unexpected or any(not k.startswith(NO_OP_MODULES) for k in missing):
            raise WeightsError(f"the weights in {str(directory)!r} do not fit this config: missing "
                               f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")

    @classmethod
    def load(cls, directory: str | Path | None = None, *, require_checksum: bool = False) -> EmbeddedModel:
        """Load a saved model (``None``: the shipped one, ``WEIGHTS_DIR``).

        The weights file is verified against the SHA-256 its ``config.json`` records (``weights_sha256``; written
        by :meth:`save` and present in the shipped models) and every tensor is checked finite.

        Args:
            directory (`str | Path | None`): the model folder (``config.json`` + ``model.safetensors``).
            require_checksum (`bool`, defaults False): refuse a folder whose config records no checksum.

        Raises:
            WeightsError: a missing, corrupt or mismatched file, non-finite weights, or (``require_checksum``) no
                recorded checksum; :class:`ChecksumError` (a ``WeightsError``) when the SHA-256 differs.
        """
        directory = Path(WEIGHTS_DIR if directory is None else directory)
        cfg_path, w_path = directory / "config.json", directory / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise WeightsError(f"weight file {str(p)!r} is missing")
        raw = _read_config_json(cfg_path)
        _verify_checksum(raw.get(CHECKSUM_KEY), w_path, cfg_path, require_checksum)
        model = cls(EmbeddedConfig.from_dict({k: v for k, v in raw.items() if k not in NOT_CONFIG_KEYS}))
        try:
            state = load_file(str(w_path))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{str(w_path)!r} is not a readable safetensors file: {e}") from e
        for name, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise WeightsError(f"{str(w_path)!r}: tensor {name!r} has {bad} non-finite values (NaN or inf) of "
                                   f"{t.numel()}: weights must be finite")
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


def _refuse_constant(token: str, path: Path):
    """``json.loads`` hook: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON numbers; refuse them."""
    raise ConfigError(f"{str(path)!r}: value {token} is not accepted: every number must be finite")


def _verify_checksum(recorded, w_path: Path, cfg_path: Path, required: bool) -> None:
    """Compare ``w_path``'s SHA-256 with the one ``config.json`` records (``{"model.safetensors": hex}``)."""
    if recorded is None:
        if required:
            raise WeightsError(f"{str(cfg_path)!r} records no {CHECKSUM_KEY}: save the model with "
                               "EmbeddedModel.save (or vdit-accel train) to record one")
        return
    if not isinstance(recorded, dict) or not isinstance(recorded.get(WEIGHTS_FILE), str):
        raise WeightsError(f"{str(cfg_path)!r}: {CHECKSUM_KEY}={recorded!r} is not accepted: expected "
                           f"{{{WEIGHTS_FILE!r}: <64 hex digits>}}")
    actual = validate.sha256_file(w_path)
    if actual != recorded[WEIGHTS_FILE].lower():
        raise ChecksumError(f"{str(w_path)!r} has SHA-256 {actual}, but {str(cfg_path)!r} records "
                            f"{recorded[WEIGHTS_FILE]!r}: the weights file is corrupt or was replaced")
