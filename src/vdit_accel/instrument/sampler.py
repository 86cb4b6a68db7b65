"""Text-to-video sampling with diffusers' flow-matching scheduler, the way ``WanPipeline`` does it.

The loop is WanPipeline's denoising loop without the text encoder and VAE: each step calls the
transformer once per CFG branch inside ``transformer.cache_context("cond" | "uncond", step_index=i,
num_inference_steps=N, ...)`` (so diffusers' caches and our hooks see the same context a pipeline
gives them), combines the two predictions with classifier-free guidance, and advances a
``FlowMatchEulerDiscreteScheduler``. Stateful hooks are reset before and after each generation, as
pipelines do. On CPU the result is bit-deterministic for a seed.

Example:
    >>> from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel
    >>> model = EmbeddedModel(EmbeddedConfig.tiny())
    >>> video = generate(model, "a red circle grows on a gray background", GenerationConfig(steps=2), progress=False)
    >>> video.shape
    torch.Size([3, 4, 8, 8])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from vdit_accel.errors import ConfigError, check_range
from vdit_accel.instrument.model import EmbeddedModel, check_geometry


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings.

    Args:
        steps (`int`, defaults 50): denoising steps (the papers' setting), >= 1.
        guidance (`float | None`): classifier-free guidance scale, >= 0; <= 1 runs no uncond branch; ``None`` =
            the model's ``guidance`` (5.0 for embedded-wan-v1).
        seed (`int`, defaults 0): noise seed, >= 0.
        frames, height, width (`int | None`): pixel geometry; ``None`` = the model's bench geometry.
        flow_shift (`float | None`): the scheduler's timestep shift, > 0; ``None`` = the model's
            ``flow_shift``. A larger shift spends more of the steps at high noise.
    """

    steps: int = 50
    guidance: float | None = None
    seed: int = 0
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    flow_shift: float | None = None

    def __post_init__(self) -> None:
        check_range("steps", self.steps, lo=1)
        if self.guidance is not None:
            check_range("guidance", self.guidance, lo=0.0)
        check_range("seed", self.seed, lo=0)
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise ConfigError(f"flow_shift={self.flow_shift!r} is out of range: accepted (0, inf) or None")

    def replace(self, **kw) -> GenerationConfig:
        return dataclasses.replace(self, **kw)


class Sampler:
    """Runs generations and exposes ``current_timestep`` (what diffusers' PAB/FasterCache callbacks read)."""

    def __init__(self, model: EmbeddedModel) -> None:
        self.model = model
        self.current_timestep: float | None = None

    def geometry(self, cfg: GenerationConfig) -> tuple[int, int, int]:
        mc = self.model.config
        g = (cfg.frames or mc.frames, cfg.height or mc.height, cfg.width or mc.width)
        check_geometry(*g, mc.patch_size)
        return g

    def flow_shift(self, cfg: GenerationConfig) -> float:
        """The scheduler shift of a generation: ``cfg.flow_shift``, or the model's where that is ``None``."""
        return self.model.config.flow_shift if cfg.flow_shift is None else cfg.flow_shift

    def guidance(self, cfg: GenerationConfig) -> float:
        """The CFG scale of a generation: ``cfg.guidance``, or the model's where that is ``None``."""
        return self.model.config.guidance if cfg.guidance is None else cfg.guidance

    def initial_noise(self, cfg: GenerationConfig, batch: int = 1) -> torch.Tensor:
        """Seeded Gaussian noise `[B, 3, F, H, W]` (one generator per call, on CPU)."""
        f, h, w = self.geometry(cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        return torch.randn(batch, 3, f, h, w, generator=gen)

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, cfg: GenerationConfig = GenerationConfig(), *, progress: bool = True,
                 latents: torch.Tensor | None = None,
                 on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Generate videos.

        Args:
            prompts: B prompts in the caption grammar (checked before any compute).
            cfg: sampling settings.
            latents: optional initial noise `[B, 3, F, H, W]` (default: seeded noise).
            on_step: called as ``on_step(i, latents)`` after each step.

        Returns:
            `[B, 3, F, H, W]` videos in [-1, 1] (clamped), or `[3, F, H, W]` for a single string prompt.
        """
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            raise ConfigError("prompts=[] is not accepted: give at least one prompt")
        transformer = self.model.transformer
        cond = self.model.encode_prompts(prompts)  # validates every prompt
        guidance = self.guidance(cfg)
        use_cfg = guidance > 1.0
        uncond = self.model.encode_prompts([""] * len(prompts)) if use_cfg else None
        x = self.initial_noise(cfg, len(prompts)) if latents is None else latents.clone()
        scheduler = FlowMatchEulerDiscreteScheduler(shift=self.flow_shift(cfg))
        scheduler.set_timesteps(cfg.steps)
        transformer._reset_stateful_cache()
        try:
            for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="generate")):
                self.current_timestep = float(t)
                timestep = t.expand(x.shape[0])
                ctx = dict(step_index=i, num_inference_steps=cfg.steps, timestep=t, sigma=float(scheduler.sigmas[i]))
                with transformer.cache_context("cond", **ctx):
                    pred = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond,
                                       return_dict=False)[0]
                if use_cfg:
                    with transformer.cache_context("uncond", **ctx):
                        pred_u = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                                             return_dict=False)[0]
                    pred = pred_u + guidance * (pred - pred_u)
                x = scheduler.step(pred, t, x, return_dict=False)[0]
                if on_step is not None:
                    on_step(i, x)
        finally:
            transformer._reset_stateful_cache()
            self.current_timestep = None
        x = x.clamp(-1, 1)
        return x[0] if single else x


def generate(model: EmbeddedModel, prompts: list[str] | str, cfg: GenerationConfig = GenerationConfig(),
             progress: bool = True) -> torch.Tensor:
    """One-call generation; see :class:`Sampler`."""
    return Sampler(model)(prompts, cfg, progress=progress)
