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

from vdit_accel.errors import ConfigError, NonFiniteError
from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.validate import (
    check_finite,
    check_flow_shift,
    check_geometry,
    check_guidance,
    check_int,
    check_seed,
    check_steps,
)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings.

    Every value is checked on construction (:mod:`vdit_accel.validate`), before any compute.

    Args:
        steps (`int`, defaults 50): denoising steps (the papers' setting), an int in [1, 1000].
        guidance (`float | None`): classifier-free guidance scale, finite in [0, 50]; <= 1 runs no uncond branch;
            ``None`` = the model's ``guidance`` (5.0 for embedded-wan-v1).
        seed (`int`, defaults 0): noise seed, an int in [0, 2**63 - 1].
        frames, height, width (`int | None`): pixel geometry, ints >= 1 (multiples of the patch size within the
            model's positional range, checked by the sampler); ``None`` = the model's bench geometry.
        flow_shift (`float | None`): the scheduler's timestep shift, finite in (0, 100]; ``None`` = the model's
            ``flow_shift``. A larger shift spends more of the steps at high noise.
        check_finite (`bool`, defaults True): check the latents before sampling and the model output once per step
            (one host sync per step, none inside the blocks) and stop with :class:`NonFiniteError` naming the step
            and the first non-finite block.
    """

    steps: int = 50
    guidance: float | None = None
    seed: int = 0
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    flow_shift: float | None = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        check_steps(self.steps)
        if self.guidance is not None:
            check_guidance(self.guidance)
        check_seed(self.seed)
        for name in ("frames", "height", "width"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), lo=1)
        if self.flow_shift is not None:
            check_flow_shift(self.flow_shift)
        if not isinstance(self.check_finite, bool):
            raise ConfigError(f"check_finite={self.check_finite!r} is not accepted: a bool")

    def replace(self, **kw) -> GenerationConfig:
        return dataclasses.replace(self, **kw)


class Sampler:
    """Runs generations and exposes ``current_timestep`` (what diffusers' PAB/FasterCache callbacks read)."""

    def __init__(self, model: EmbeddedModel) -> None:
        self.model = model
        self.current_timestep: float | None = None

    def geometry(self, cfg: GenerationConfig) -> tuple[int, int, int]:
        mc = self.model.config
        g = tuple(mc_v if v is None else v for v, mc_v in
                  zip((cfg.frames, cfg.height, cfg.width), (mc.frames, mc.height, mc.width)))
        check_geometry(*g, mc.patch_size, max_positions=self.model.transformer.rope.max_seq_len)
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
        self.geometry(cfg)
        if latents is not None:
            self._check_latents(latents, cfg, len(prompts))
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
                if cfg.check_finite and not bool(torch.isfinite(pred).all()):  # one host sync per step
                    raise self._locate_non_finite(i, ctx, x, timestep, cond, uncond)
                x = scheduler.step(pred, t, x, return_dict=False)[0]
                if on_step is not None:
                    on_step(i, x)
        finally:
            transformer._reset_stateful_cache()
            self.current_timestep = None
        x = x.clamp(-1, 1)
        return x[0] if single else x

    def _check_latents(self, latents: torch.Tensor, cfg: GenerationConfig, batch: int) -> None:
        f, h, w = self.geometry(cfg)
        if not torch.is_tensor(latents) or tuple(latents.shape) != (batch, 3, f, h, w):
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ConfigError(f"latents of shape {got} are not accepted: expected {(batch, 3, f, h, w)}")
        if not latents.is_floating_point():
            raise ConfigError(f"latents of dtype {latents.dtype} are not accepted: expected a floating dtype")
        if cfg.check_finite:
            check_finite("latents", latents)

    def _locate_non_finite(self, step: int, ctx: dict, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                           uncond: torch.Tensor | None) -> NonFiniteError:
        """After a non-finite model output at ``step``: rerun that step's transformer calls with forward hooks on
        the transformer's top-level modules and blocks (hooks exist only during this rerun), and return the error
        naming the step, the CFG branch and the first module whose output was non-finite."""
        transformer = self.model.transformer
        found: list[str] = []
        names = {id(m): n for n, m in transformer.named_children() if n != "blocks"}
        names.update({id(b): f"blocks.{k}" for k, b in enumerate(transformer.blocks)})

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            tensors = out if isinstance(out, (tuple, list)) else (out,)
            if not found and any(torch.is_tensor(t) and not bool(torch.isfinite(t).all()) for t in tensors):
                found.append(names[id(module)])

        modules = [m for n, m in transformer.named_children() if n != "blocks"] + list(transformer.blocks)
        handles = [m.register_forward_hook(hook) for m in modules]
        branch = None
        try:
            for name, text in (("cond", cond), ("uncond", uncond)):
                if text is None:
                    continue
                with transformer.cache_context(name, **ctx):
                    out = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                                      return_dict=False)[0]
                if found or not bool(torch.isfinite(out).all()):
                    branch = name
                    break
        finally:
            for h in handles:
                h.remove()
        if branch is None:
            where = "both branches are finite on rerun: the CFG combination overflowed (guidance too large?)"
        elif found:
            where = f"first non-finite output in the {branch} branch at transformer.{found[0]}"
        else:
            where = f"non-finite in the {branch} branch after the last block (an output hook)"
        return NonFiniteError(f"the model output at step {step} of {ctx['num_inference_steps']} is non-finite "
                              f"(NaN or inf); {where}. Pass check_finite=False (--no-check-finite) to skip "
                              "this check", step=step, branch=branch, block=found[0] if found else None)


def generate(model: EmbeddedModel, prompts: list[str] | str, cfg: GenerationConfig = GenerationConfig(),
             progress: bool = True) -> torch.Tensor:
    """One-call generation; see :class:`Sampler`."""
    return Sampler(model)(prompts, cfg, progress=progress)
