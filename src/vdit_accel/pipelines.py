"""A user's diffusers video pipeline as a model vdit-accel can generate with, calibrate and search on.

- :func:`load_pipeline`: ``DiffusionPipeline.from_pretrained(folder)`` from local files only, in a dtype, on a
  device (typed errors before any weights are read: a missing folder, an unknown dtype or device).
- :func:`pipeline_model_id`: the id presets record and compare (``model_id`` of a preset): the pipeline's
  ``_name_or_path`` (the folder it was loaded from), else its transformer class and a hash of its config.
- :class:`PipelineSampler`: the interface the calibration and the budget search use from the embedded
  :class:`~vdit_accel.instrument.sampler.Sampler` (``model.transformer``, ``model.config.model_id``,
  ``model.encode_prompts``, ``geometry``, ``guidance``, ``initial_noise``, ``__call__(prompts, gen, latents=...)``)
  over a diffusers pipeline. Its "latents" are the pipeline's latents (``output_type="latent"``): the searches
  compare final latents, as they do on the embedded model (whose latents are pixels).

Example:
    >>> from vdit_accel.pipelines import DTYPES
    >>> sorted(DTYPES)
    ['bfloat16', 'float16', 'float32']
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vdit_accel.errors import ConfigError, UnsupportedModelError
from vdit_accel.instrument.sampler import GenerationConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; :class:`ConfigError` naming it otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not accepted: a torch device such as 'cpu' or 'cuda:0'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} is not accepted: no CUDA device is available here (accepted: 'cpu')")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"device={device!r} is not accepted: one of cpu, cuda[:N], mps, xpu")
    return dev


def load_pipeline(folder: str | Path, *, dtype: str = "float32", device: str = "cpu") -> Any:
    """``DiffusionPipeline.from_pretrained(folder, local_files_only=True)`` in ``dtype`` on ``device``.

    Without ``accelerate`` installed, diffusers refuses to load models that keep some modules in float32
    (``_keep_in_fp32_modules``, e.g. Wan's transformer); those components are then built from their config and
    their safetensors weights here (strict key match), the float32 modules kept in float32.

    Raises:
        ConfigError: ``folder`` is not a saved pipeline (no ``model_index.json``), or an unknown dtype / device.
    """
    from diffusers import DiffusionPipeline

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not accepted: one of {sorted(DTYPES)}")
    dev = check_device(device)
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"--model={str(folder)!r} is not a saved diffusers pipeline: no model_index.json in it "
                          "(save one with pipe.save_pretrained(folder))")
    torch_dtype = DTYPES[dtype]
    spec = json.loads(index.read_text())
    components = _preload_fp32_keeping_models(folder, spec, torch_dtype)
    import diffusers

    # the pipeline's own class: DiffusionPipeline.from_pretrained would drop the preloaded components
    cls = getattr(diffusers, str(spec.get("_class_name")), None) or DiffusionPipeline
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        cls = DiffusionPipeline
    pipe = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch_dtype, **components)
    return pipe.to(dev)


def _preload_fp32_keeping_models(folder: Path, index: dict, dtype: torch.dtype) -> dict:
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        return {}
    import diffusers
    from safetensors.torch import load_file

    out = {}
    for name, spec in index.items():
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == "diffusers" and spec[1]):
            continue
        cls = getattr(diffusers, spec[1], None)
        keep = getattr(cls, "_keep_in_fp32_modules", None)
        if cls is None or not keep or not hasattr(cls, "from_config"):
            continue
        sub = folder / name
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{str(sub)!r} has no safetensors weights: accepted only safetensors (no pickle)")
        model = cls.from_config(cls.load_config(str(sub)))
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        model.load_state_dict(state, strict=True)
        if dtype != torch.float32:  # diffusers' own rule: the listed modules (any part of the name) stay float32
            for mod_name, mod in model.named_modules():
                if any(k in mod_name.split(".") for k in keep):
                    continue
                for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
                    if t.is_floating_point():
                        t.data = t.data.to(dtype)
        out[name] = model.eval()
    return out


def pipeline_model_id(pipe: Any) -> str:
    """The id a preset made on ``pipe`` records: ``vdit_accel.api.model_id_of`` (``_name_or_path``: the folder a
    pipeline was loaded from), else ``<TransformerClass>@config-sha256:<16 hex>`` of the transformer's config."""
    from vdit_accel.api import model_id_of

    found = model_id_of(pipe)
    if found:
        return found
    transformer = getattr(pipe, "transformer", pipe)
    config = {k: v for k, v in dict(getattr(transformer, "config", {})).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{type(transformer).__name__}@config-sha256:{digest}"


@dataclass(frozen=True)
class _Config:
    model_id: str


class _PipelineModel:
    """What the searches read from ``sampler.model``: ``transformer``, ``config.model_id``, ``encode_prompts``
    (prompt validation), ``state_dict`` (the weights digest that ties a checkpoint folder to a model)."""

    def __init__(self, pipe: Any, model_id: str) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.config = _Config(model_id)

    def encode_prompts(self, prompts: list[str]) -> None:
        bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ConfigError(f"prompts {bad!r} are not accepted: non-empty strings")

    def state_dict(self) -> dict:
        return self.transformer.state_dict()


class PipelineSampler:
    """The embedded ``Sampler``'s interface over a diffusers video pipeline (see the module docstring).

    Args:
        pipe: a diffusers video pipeline with one denoiser ``transformer`` whose ``__call__`` takes ``prompt``,
            ``height``, ``width``, ``num_frames``, ``num_inference_steps``, ``guidance_scale``, ``generator``,
            ``latents`` and ``output_type`` (Wan, CogVideoX, HunyuanVideo, LTX-Video).
        frames, height, width (`int | None`): the default geometry (``GenerationConfig`` fields left ``None``);
            ``None``: the pipeline's own defaults.
        guidance (`float | None`): the default CFG scale; ``None``: the pipeline's.
        call_kwargs (`dict | None`): more arguments for every pipeline call (e.g. ``max_sequence_length``).

    Raises:
        UnsupportedModelError: a pipeline with a second denoiser (``transformer_2``): the calibrations apply to
            ``transformer`` only, so the measured stats would mix an accelerated and a dense expert.
    """

    def __init__(self, pipe: Any, *, frames: int | None = None, height: int | None = None,
                 width: int | None = None, guidance: float | None = None, call_kwargs: dict | None = None) -> None:
        if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
            raise UnsupportedModelError(f"{type(pipe).__name__} has no `transformer`: accepted a diffusers video "
                                        "pipeline")
        if isinstance(getattr(pipe, "transformer_2", None), torch.nn.Module):
            raise UnsupportedModelError(f"{type(pipe).__name__} has two denoisers (transformer_2): calibration and "
                                        "search accelerate `transformer` only; accepted pipelines with one denoiser")
        params = inspect.signature(pipe.__call__).parameters
        missing = [n for n in ("prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale",
                               "generator", "latents", "output_type") if n not in params]
        if missing:
            raise UnsupportedModelError(f"{type(pipe).__name__}.__call__ lacks {missing}: accepted text-to-video "
                                        "pipelines (Wan, CogVideoX, HunyuanVideo, LTX-Video)")

        def default(name: str, given):
            return given if given is not None else params[name].default

        self.pipe = pipe
        self.model = _PipelineModel(pipe, pipeline_model_id(pipe))
        self.defaults = (default("num_frames", frames), default("height", height), default("width", width))
        self.default_guidance = float(default("guidance_scale", guidance))
        self.call_kwargs = dict(call_kwargs or {})
        self.current_timestep: float | None = None

    def geometry(self, cfg: GenerationConfig) -> tuple[int, int, int]:
        """``(frames, height, width)`` in pixels: ``cfg``'s, or the sampler's defaults where ``None``."""
        return tuple(d if v is None else v for v, d in zip((cfg.frames, cfg.height, cfg.width), self.defaults))

    def guidance(self, cfg: GenerationConfig) -> float:
        return self.default_guidance if cfg.guidance is None else cfg.guidance

    def flow_shift(self, cfg: GenerationConfig) -> float:
        """Refused: a pipeline keeps its denoising loop and its scheduler's shift inside ``__call__``, so nothing
        can re-run one of its steps from outside (what the joint search's segment-error table does)."""
        raise UnsupportedModelError(
            f"{type(self.pipe).__name__} keeps its denoising loop (scheduler shift, per-family conditioning) inside "
            "__call__: the joint search's segment-error table (allocators 'dp' and 'greedy'), which re-runs single "
            "steps of the sampler's own loop, runs on the embedded model only; on a pipeline use the allocators "
            "'uniform', 'evolution' or 'refine', which score whole generations")

    def _geometry_kwargs(self, cfg: GenerationConfig) -> dict:
        f, h, w = self.geometry(cfg)
        return dict(num_frames=f, height=h, width=w)

    def initial_noise(self, cfg: GenerationConfig, batch: int = 1) -> torch.Tensor:
        """Seeded initial latents `[B, ...]` (the pipeline's own layout) from ``pipe.prepare_latents``."""
        t = self.pipe.transformer
        gen = torch.Generator().manual_seed(cfg.seed)
        latents = self.pipe.prepare_latents(batch_size=batch, num_channels_latents=t.config.in_channels,
                                            dtype=torch.float32, device=torch.device("cpu"), generator=gen,
                                            **self._geometry_kwargs(cfg))
        return latents / float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0))

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, cfg: GenerationConfig = GenerationConfig(), *,
                 progress: bool = True, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Final latents of a generation of every prompt (batched; seeded noise when ``latents`` is None)."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        self.model.encode_prompts(prompts)
        if latents is None:
            latents = self.initial_noise(cfg, len(prompts))
        device = self.pipe.transformer.device
        self.pipe.set_progress_bar_config(disable=not progress)
        out = self.pipe(prompt=prompts, num_inference_steps=cfg.steps, guidance_scale=self.guidance(cfg),
                        latents=latents.to(device=device),
                        generator=torch.Generator().manual_seed(cfg.seed), output_type="latent",
                        **self._geometry_kwargs(cfg), **self.call_kwargs).frames
        out = out.float().cpu()
        return out[0] if single else out
