"""Astraea's budget search on a real model: fitness, baselines and the cheap-evaluation tricks.

Fitness of a schedule = MSE of the final latent against the dense final latent, averaged over a small
prompt set with fixed seeds (the paper's definition). The paper spends ~82 GPU-hours per model; to fit a
laptop CPU this search uses (each measured, see ``record["fidelity"]``):

- **Batched evaluation**: the prompts run as one batch per candidate.
- **Dense references computed once** per fidelity level and kept for the whole search (and the re-rank).
- **Memoisation**: a genome is never evaluated twice (in :func:`vdit_accel.search.evolution.evolve`).
- **A proxy geometry**: the EA evaluates candidates at a smaller pixel geometry (default 8x32x32 -> 256 tokens,
  the first curriculum stage the model was trained at) and without classifier-free guidance; the final
  population's best few are re-ranked at the full geometry with guidance. Rank agreement between the proxy and
  the full fitness over the re-ranked candidates is reported.

Baselines at the same target: the uniform schedule and a greedy allocator driven by measured single-step
sensitivities (each step alone at budgets 0 and 0.5, every other step dense; piecewise-linear in between).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vdit_accel._faults import fault_point
from vdit_accel.errors import ConfigError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.search.evolution import EvolutionConfig, evolve, greedy_schedule, uniform_schedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fidelity:
    """Where a fitness is evaluated: pixel geometry (None = the model's), guidance, steps."""

    geometry: tuple[int, int, int] | None
    guidance: float
    steps: int


WORKDIR_IDENTITY = "identity.json"


def weights_digest(model) -> str:
    """SHA-256 of a model's state dict (keys and raw tensor bytes, in key order)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def claim_workdir(workdir: Path, sampler: Sampler, prompts: list[str]) -> None:
    """Tie a search's checkpoint folder to one model and prompt list, or check that it is theirs.

    Its dense references and EA state are only valid for the model and prompts that made them, and their file names
    do not say which: a folder of another model (say embedded-wan-v1's ``runs/search-astraea-50`` reused for v2), or
    one written before this record existed, raises ``ConfigError`` instead of being resumed silently.
    """
    ident = {"model_id": sampler.model.config.model_id, "weights_sha256": weights_digest(sampler.model),
             "prompts": list(prompts)}
    path = workdir / WORKDIR_IDENTITY
    if path.is_file():
        try:
            have = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"checkpoint folder {str(workdir)!r} has a corrupt {WORKDIR_IDENTITY} ({e}): remove the "
                              "folder or give another (--checkpoint)") from e
        if not isinstance(have, dict):
            raise ConfigError(f"checkpoint folder {str(workdir)!r} has a corrupt {WORKDIR_IDENTITY}: remove the "
                              "folder or give another (--checkpoint)")
        diff = [k for k in ident if have.get(k) != ident[k]]
        if diff:
            raise ConfigError(f"checkpoint folder {str(workdir)!r} belongs to another search (its {', '.join(diff)} "
                              f"differ; model {have.get('model_id')!r}): give another folder (--checkpoint) or "
                              "remove it")
        return
    if workdir.is_dir() and any(p.name != path.name + ".tmp" for p in workdir.iterdir()):
        raise ConfigError(f"checkpoint folder {str(workdir)!r} holds files but no {WORKDIR_IDENTITY} (written before "
                          "searches recorded their model): give another folder (--checkpoint) or remove it")
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ident, indent=1))
    os.replace(tmp, path)


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def write_reference(path: Path, latents: torch.Tensor) -> None:
    """Write a dense reference (safetensors, with the SHA-256 of its payload in the header) under a temporary name,
    then move it into place: a kill never leaves a half-written reference under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"latents": latents.contiguous()}, str(tmp), metadata={"sha256": _tensor_digest(latents)})
    fault_point("search_write")
    os.replace(tmp, path)


def read_reference(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A dense reference written by :func:`write_reference`, or ``None`` when it is missing or damaged (unreadable,
    truncated, bytes flipped: its SHA-256 does not match, wrong shape, non-finite values), so it is rebuilt."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            latents = fh.get_tensor("latents")
    except (SafetensorError, OSError, KeyError) as e:
        logger.warning("dense reference %s is unreadable (%s): rebuilding it", path, e)
        return None
    if tuple(latents.shape) != shape or meta.get("sha256") != _tensor_digest(latents) or \
            not bool(torch.isfinite(latents).all()):
        logger.warning("dense reference %s is damaged (shape, checksum or values): rebuilding it", path)
        return None
    return latents


class ScheduleFitness:
    """Batched fitness: MSE of final latents vs dense over the prompt set, one batch per candidate.

    Args:
        sampler (`Sampler`): the model.
        prompts (`list[str]`): fitness prompts; prompt ``i`` uses seed ``i`` (fixed noise).
        fidelity (`Fidelity`): geometry / guidance / steps.
        base (`AstraeaConfig`): everything but the budgets.
        cache_dir (`Path | None`): where the dense reference is kept (safetensors) across resumes; tied to this
            model and prompt list by ``claim_workdir`` (another model's folder is a ``ConfigError``).
        to_config (`Callable[[np.ndarray], AstraeaConfig] | None`): genome -> config (default: the genome is the
            per-step budgets, other fields from ``base``); e.g. a joint choice-index genome's decoder.
    """

    def __init__(self, sampler: Sampler, prompts: list[str], fidelity: Fidelity, base: AstraeaConfig,
                 cache_dir: Path | None = None,
                 to_config: Callable[[np.ndarray], AstraeaConfig] | None = None) -> None:
        self.sampler, self.prompts, self.fidelity, self.base = sampler, list(prompts), fidelity, base
        self.to_config = to_config or (
            lambda g: dataclasses.replace(base, budgets=tuple(float(b) for b in g), target=None))
        f, h, w = fidelity.geometry or sampler.geometry(GenerationConfig())
        self.gen = GenerationConfig(steps=fidelity.steps, guidance=fidelity.guidance, frames=f, height=h, width=w)
        noise = [sampler.initial_noise(self.gen.replace(seed=i)) for i in range(len(prompts))]
        self.noise = torch.cat(noise)
        self.evaluations = 0
        self.seconds = 0.0
        if cache_dir is not None:
            claim_workdir(Path(cache_dir), sampler, prompts)
        ref_file = None if cache_dir is None else cache_dir / f"dense-{f}x{h}x{w}-g{fidelity.guidance}.safetensors"
        self.reference = None if ref_file is None else read_reference(ref_file, tuple(self.noise.shape))
        if self.reference is None:
            self.reference = self._generate(None)
            if ref_file is not None:
                write_reference(ref_file, self.reference)

    def _generate(self, budgets: np.ndarray | None) -> torch.Tensor:
        handle = None
        if budgets is not None:
            handle = apply_astraea(self.sampler.model.transformer, self.to_config(budgets))
        try:
            return self.sampler(self.prompts, self.gen, progress=False, latents=self.noise)
        finally:
            if handle is not None:
                handle.remove()

    def one(self, genome: np.ndarray) -> float:
        t0 = time.perf_counter()
        out = self._generate(genome)
        self.seconds += time.perf_counter() - t0
        self.evaluations += 1
        fault_point("search_eval")
        return float(((out - self.reference) ** 2).mean())

    def __call__(self, genomes: np.ndarray) -> np.ndarray:
        return np.array([self.one(g) for g in genomes])


def step_sensitivity(fitness: ScheduleFitness, cfg: EvolutionConfig, probe: tuple[float, ...] = (0.0, 0.5),
                     progress: bool = True) -> np.ndarray:
    """Measured error table ``err[step, grid_index]`` for the greedy baseline.

    Each non-dense step is run alone at each ``probe`` budget (all other steps dense); the error at other grid
    budgets is interpolated piecewise-linearly between the probes and 0 at budget 1.
    """
    grid = np.asarray(cfg.grid)
    t, d = cfg.num_steps, cfg.dense_steps
    err = np.zeros((t, grid.size))
    xs = np.array(sorted(set(probe) | {1.0}))
    for i in tqdm(range(d, t), disable=not progress, desc="sensitivity"):
        ys = []
        for b in xs:
            if b >= 1.0:
                ys.append(0.0)
                continue
            genome = np.ones(t)
            genome[i] = b
            ys.append(fitness.one(genome))
        err[i] = np.interp(grid, xs, ys)
    return err


def search_astraea(sampler: Sampler, prompts: list[str], target: float, *, steps: int = 50,
                   evolution: EvolutionConfig | None = None, proxy: Fidelity | None = Fidelity((8, 32, 32), 1.0, 50),
                   full_guidance: float | None = None, rerank: int = 5, base: AstraeaConfig | None = None,
                   workdir: str | Path | None = None, progress: bool = True) -> tuple[AstraeaConfig, dict]:
    """Search a per-step budget schedule for ``target``; return the config and the search record.

    Args:
        evolution: EA settings (defaults: the paper's population 50, 30 children, 30 generations).
        proxy: fidelity of the EA's fitness (``None``: the full fidelity, no re-rank).
        full_guidance: CFG scale of the full fidelity (``None``: the model's ``guidance``).
        rerank: how many of the final population's best to re-evaluate at full fidelity.
        workdir: checkpoint folder (EA state after every generation, dense references); resumable.
    """
    for p in prompts:
        sampler.model.encode_prompts([p])
    base = base or AstraeaConfig(num_steps=steps)
    evolution = evolution or EvolutionConfig(target=target, num_steps=steps, dense_steps=base.dense_steps)
    if evolution.num_steps != steps or evolution.target != target:
        raise ConfigError(f"evolution config (target={evolution.target}, num_steps={evolution.num_steps}) does not "
                          f"match target={target}, steps={steps}")
    workdir = Path(workdir) if workdir is not None else None
    full = Fidelity(None, sampler.guidance(GenerationConfig(guidance=full_guidance)), steps)
    proxy = dataclasses.replace(proxy, steps=steps) if proxy is not None else None
    t0 = time.perf_counter()
    search_fit = ScheduleFitness(sampler, prompts, proxy or full, base, workdir)
    result = evolve(search_fit, evolution, checkpoint=None if workdir is None else workdir / "evolution.json",
                    progress=progress)
    search_s = time.perf_counter() - t0
    record: dict = {"target": target, "prompts": list(prompts), "evolution": result.to_dict(),
                    "search_fitness": dataclasses.asdict(proxy or full), "search_seconds": round(search_s, 1),
                    "search_evaluations": result.evaluations}  # distinct genomes, a resumed run's included
    best = np.asarray(result.best_genome)
    if proxy is not None:
        full_fit = ScheduleFitness(sampler, prompts, full, base, workdir)
        finals = _final_population(workdir, result, rerank)
        proxy_scores = search_fit(finals)
        full_scores = full_fit(finals)
        best = finals[int(np.argmin(full_scores))]
        record["rerank"] = {
            "genomes": finals.tolist(), "proxy_fitness": proxy_scores.tolist(), "full_fitness": full_scores.tolist(),
            "spearman": _spearman(proxy_scores, full_scores),
        }
    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    cfg = dataclasses.replace(base, budgets=tuple(float(b) for b in best), target=None)
    return cfg, record


def _final_population(workdir: Path | None, result, k: int) -> np.ndarray:
    if workdir is not None and (workdir / "evolution.json").is_file():
        state = json.loads((workdir / "evolution.json").read_text())
        parents = np.asarray(state["parents"], dtype=np.float64).reshape(-1, result.cfg.num_steps)
        return parents[:k]
    return np.asarray([result.best_genome])


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def baselines(sampler: Sampler, prompts: list[str], target: float, steps: int, fidelity: Fidelity,
              base: AstraeaConfig | None = None, workdir: Path | None = None, progress: bool = True) -> dict:
    """Uniform and greedy schedules at ``target``, with the greedy's measured sensitivity table."""
    base = base or AstraeaConfig(num_steps=steps)
    cfg = EvolutionConfig(target=target, num_steps=steps, dense_steps=base.dense_steps)
    fit = ScheduleFitness(sampler, prompts, fidelity, base, workdir)
    err = step_sensitivity(fit, cfg, progress=progress)
    return {"uniform": uniform_schedule(cfg).tolist(), "greedy": greedy_schedule(err, cfg).tolist(),
            "sensitivity": err.tolist()}
