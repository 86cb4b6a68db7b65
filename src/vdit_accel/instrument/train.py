"""Flow-matching training of the embedded model: seeded, checkpointed, resumable after a kill.

Every batch and every noise draw is a pure function of ``(seed, step)``, and the optimiser and EMA
states are checkpointed as safetensors (scalars in JSON), so a run killed at any point and resumed
from its last checkpoint ends with the same weights as an uninterrupted run (on the same machine and
thread count). A curriculum of stages trains first at low resolution (cheap), then at the bench
geometry.

Example (a few seconds; the real recipe is ``TrainConfig()``):
    >>> cfg = TrainConfig(stages=(Stage(4, 8, 8, 2, 2),), checkpoint_every=1)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vdit_accel._faults import fault_point
from vdit_accel.config_io import check_bool, check_float, check_int, check_sequence, check_str, config_from_dict
from vdit_accel.errors import ConfigError, WeightsError
from vdit_accel.instrument.dataset import SIZE_FRACTION, check_layout, check_size
from vdit_accel.instrument.dataset import batch as data_batch
from vdit_accel.instrument.model import MAX_SIZES, EmbeddedConfig, EmbeddedModel, check_geometry
from vdit_accel.validate import MAX_FLOW_SHIFT

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
MAX_TRAIN_STEPS = 10_000_000
MAX_BATCH = 4096


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: pixel geometry, number of optimiser steps and batch size."""

    frames: int
    height: int
    width: int
    steps: int
    batch: int

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            check_int(f"stage {name}", getattr(self, name), lo=1, hi=MAX_SIZES[name])
        check_int("stage steps", self.steps, lo=1, hi=MAX_TRAIN_STEPS)
        check_int("stage batch", self.batch, lo=1, hi=MAX_BATCH)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe.

    Args:
        seed (`int`, defaults 0): the only source of randomness.
        stages (`tuple[Stage, ...]`): the curriculum, low resolution first.
        lr (`float`, defaults 1e-3), warmup (`int`, defaults 200): AdamW peak rate and linear warm-up;
            cosine decay to 10% over the whole run.
        weight_decay (`float`, defaults 0.01).
        ema_decay (`float`, defaults 0.999): the shipped weights are the EMA.
        caption_dropout (`float`, defaults 0.1): fraction of empty captions (for CFG).
        bf16 (`bool`, defaults True): CPU bf16 autocast for the forward/backward pass.
        checkpoint_every (`int`, defaults 100): steps between checkpoints.
        layout (`str`, defaults "uniform"): where the training clips' objects start
            (``dataset.LAYOUTS``).
        timestep_shift (`float` or `tuple[float, ...]`, optional): the shift of the training noise levels,
            ``t = shift * u / (1 + (shift - 1) * u)`` with ``u`` logit-normal; ``None`` (the default) uses the
            model's ``flow_shift`` (the sampler's). A larger shift trains more at high noise, where the caption
            alone decides the layout: shift 3 puts 3% of the samples above t = 0.95, shift 12 about 30%. A
            tuple is a mixture: sample ``i`` of each batch uses ``shift[i % len(shift)]``.
        object_size (`tuple[float, float]`, defaults ``dataset.SIZE_FRACTION``): the training objects' diameter
            range in frame widths (``dataset.check_size``).
    """

    seed: int = 0
    stages: tuple[Stage, ...] = (
        Stage(8, 32, 32, 2400, 24),
        Stage(16, 64, 64, 700, 8),
    )
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    bf16: bool = True
    checkpoint_every: int = 100
    layout: str = "uniform"
    timestep_shift: float | tuple[float, ...] | None = None
    object_size: tuple[float, float] = SIZE_FRACTION

    def __post_init__(self) -> None:
        check_int("seed", self.seed, lo=0, hi=MAX_SEED)
        stages = check_sequence("stages", self.stages)
        if not stages:
            raise ConfigError("stages=() is not accepted: give at least one stage")
        fields = {f.name for f in dataclasses.fields(Stage)}
        for i, st in enumerate(stages):
            if not isinstance(st, (Stage, dict)):
                raise ConfigError(f"stages[{i}]={st!r} is not accepted: a Stage or a dict of {sorted(fields)}")
        object.__setattr__(self, "stages", tuple(s if isinstance(s, Stage) else config_from_dict(Stage, s)
                                                 for s in stages))
        check_float("lr", self.lr, lo=0.0, hi=1.0, lo_open=True)
        check_int("warmup", self.warmup, lo=0, hi=MAX_TRAIN_STEPS)
        check_float("weight_decay", self.weight_decay, lo=0.0, hi=1.0)
        check_float("ema_decay", self.ema_decay, lo=0.0, hi=1.0)
        check_float("caption_dropout", self.caption_dropout, lo=0.0, hi=1.0)
        if not self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout={self.caption_dropout} is out of range: accepted [0, 1)")
        check_bool("bf16", self.bf16)
        check_int("checkpoint_every", self.checkpoint_every, lo=1, hi=MAX_TRAIN_STEPS)
        check_str("layout", self.layout)
        check_layout(self.layout)
        size = check_sequence("object_size", self.object_size)
        if len(size) != 2:
            raise ConfigError(f"object_size={self.object_size!r} is not accepted: a (lo, hi) pair")
        size = tuple(check_float(f"object_size[{i}]", v, lo=0.0) for i, v in enumerate(size))
        object.__setattr__(self, "object_size", check_size(size))
        if self.timestep_shift is not None:
            shifts = self.timestep_shift if isinstance(self.timestep_shift, (list, tuple)) else (self.timestep_shift,)
            ok = bool(shifts) and all(not isinstance(v, bool) and isinstance(v, (int, float)) and
                                      0 < v <= MAX_FLOW_SHIFT for v in shifts)
            if not ok:
                raise ConfigError(f"timestep_shift={self.timestep_shift!r} is out of range: accepted a value or a "
                                  f"non-empty tuple of values in (0, {MAX_FLOW_SHIFT}], or None")
            if isinstance(self.timestep_shift, (list, tuple)):
                object.__setattr__(self, "timestep_shift", tuple(float(v) for v in shifts))

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> Stage:
        for s in self.stages:
            if step < s.steps:
                return s
            step -= s.steps
        return self.stages[-1]


#: Named recipes (``vdit-accel train --recipe``). ``scratch`` made the shipped ``embedded-wan-v1`` (51 min
#: on 2 cores). ``finetune`` continues from saved weights with 16-frame stages at 32 and 64 px on a fresh
#: data seed (42 min); from v1 it lowered the loss (0.030 -> 0.026) but not the held-out adherence, so
#: its result is recorded in ``docs/results/instrument/finetune/``, not shipped.
RECIPES: dict[str, TrainConfig] = {
    "scratch": TrainConfig(),
    "finetune": TrainConfig(seed=1, stages=(Stage(16, 32, 32, 1200, 16), Stage(16, 64, 64, 1300, 8)),
                            lr=5e-4, warmup=100),
}


@dataclass(frozen=True)
class Phase:
    """One link of a chained recipe: train ``model`` with ``recipe``, starting from the previous link's release.

    A link may change the model config where the weights allow it (``EmbeddedModel.start_from``: e.g. switching
    ``pooled_text`` on adds zero-started modules); each link restarts the optimiser and the learning-rate schedule.
    """

    name: str
    model: EmbeddedConfig
    recipe: TrainConfig


_V2_MODEL = EmbeddedConfig(model_id="vdit-accel/embedded-wan-v2", position_channels=True, prediction="sample")
_V2_HIGH_NOISE = TrainConfig(seed=3, stages=(Stage(16, 64, 64, 400, 8),), lr=5e-4, warmup=50, checkpoint_every=50,
                             layout="anchored", timestep_shift=10.0)

#: Chained recipes (``vdit-accel train --recipe``; ``docs/instrument.md``).
#: ``v2`` trains the session-6 model in one run from scratch (held-out adherence 0.95 / 0.93 on seeds 0 / 1 at its
#: CFG 2, 0.87 / 0.89 at CFG 5; ``V2_WEIGHTS_DIR``, the shipped default since session 7): anchored layout, position
#: channels, x0 prediction and pooled caption text,
#: 1,000 steps at 32 px then 5,000 at the bench geometry, every batch half at noise shift 10 (where the caption
#: decides) and half at shift 3, objects 0.38-0.46 of the frame. 6,000 steps, 104 min on 2 cores. Its sampler
#: default is CFG 2 (``EmbeddedConfig.guidance``), chosen after training on training-distribution prompts.
#: ``v2-lineage`` remakes the best model of sessions 3-4 (0.79 / 0.81) as the fine-tunes it was made by: anchored
#: layout, position channels and x0 prediction at 32 px, then at the bench geometry; then high-noise training
#: (shift 10), larger objects, and pooled caption text in the modulation. 5,000 steps, 94 min on 2 cores.
CHAINS: dict[str, tuple[Phase, ...]] = {
    "v2": (
        Phase("direct", dataclasses.replace(_V2_MODEL, pooled_text=True, guidance=2.0),
              TrainConfig(seed=9, stages=(Stage(16, 32, 32, 1000, 16), Stage(16, 64, 64, 5000, 8)), lr=1e-3,
                          warmup=200, checkpoint_every=50, layout="anchored", timestep_shift=(10.0, 3.0),
                          object_size=(0.38, 0.46))),
    ),
    "v2-lineage": (
        Phase("anchored-32", _V2_MODEL, TrainConfig(seed=0, stages=(Stage(16, 32, 32, 1000, 16),),
                                                    checkpoint_every=100, layout="anchored")),
        Phase("anchored-64", _V2_MODEL, TrainConfig(seed=2, stages=(Stage(16, 64, 64, 1500, 8),), lr=1e-3,
                                                    warmup=100, checkpoint_every=50, layout="anchored")),
        Phase("high-noise", _V2_MODEL, _V2_HIGH_NOISE),
        Phase("large", _V2_MODEL, dataclasses.replace(_V2_HIGH_NOISE, seed=4, stages=(Stage(16, 64, 64, 600, 8),),
                                                      object_size=(0.38, 0.46))),
        Phase("pooled", dataclasses.replace(_V2_MODEL, pooled_text=True),
              dataclasses.replace(_V2_HIGH_NOISE, seed=5, stages=(Stage(16, 64, 64, 1500, 8),),
                                  object_size=(0.38, 0.46))),
    ),
}


def phase_dir(out_dir: str | Path, index: int, phase: Phase) -> Path:
    """Run folder of link ``index`` (0-based) of a chain: ``out_dir/<index+1>-<name>``."""
    return Path(out_dir) / f"{index + 1}-{phase.name}"


def train_chain(out_dir: str | Path, phases: tuple[Phase, ...], progress: bool = True) -> EmbeddedModel:
    """Train the links of a chained recipe in order, each from the previous link's release; resumable.

    Link ``k`` trains in ``phase_dir(out_dir, k, phase)`` (rerun to resume: a link with a release is done and
    skipped); the last link's release is copied to ``out_dir/release``.

    Returns:
        The last link's model (EMA weights).
    """
    if not phases:
        raise ConfigError("phases=() is not accepted: give at least one phase")
    out_dir = Path(out_dir)
    init_from: Path | None = None
    model = None
    for k, phase in enumerate(phases):
        run = phase_dir(out_dir, k, phase)
        release = run / "release"
        if (release / "training.json").is_file():
            logger.info("phase %d (%s) is done: %s", k + 1, phase.name, release)
            model = None
        else:
            model = train(run, phase.recipe, phase.model, progress=progress, init_from=init_from)
        init_from = release
    shutil.copytree(init_from, out_dir / "release", dirs_exist_ok=True)
    return model if model is not None else EmbeddedModel.load(out_dir / "release")


def recipe(name: str, seed: int | None = None) -> TrainConfig:
    """The named recipe (``RECIPES``), optionally with another seed; unknown names raise ``ConfigError``."""
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r} is not known: accepted {sorted(RECIPES)} (chained: {sorted(CHAINS)})")
    cfg = RECIPES[name]
    return cfg if seed is None else dataclasses.replace(cfg, seed=seed)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.total_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def flow_matching_loss(model: EmbeddedModel, videos: torch.Tensor, texts: list[str], gen: torch.Generator,
                       shift: float | tuple[float, ...]) -> torch.Tensor:
    """Rectified-flow loss: x_t = (1 - t) x0 + t eps, target eps - x0, t = shift(logit-normal).

    ``shift`` is one value or a per-sample cycle (sample ``i`` uses ``shift[i % len(shift)]``).

    Args:
        videos: `[B, 3, F, H, W]` clean clips in [-1, 1].
    """
    b = videos.shape[0]
    u = torch.sigmoid(torch.randn(b, generator=gen))
    if isinstance(shift, tuple):
        shift = torch.tensor([shift[i % len(shift)] for i in range(b)])
    t = shift * u / (1 + (shift - 1) * u)
    eps = torch.randn(videos.shape, generator=gen)
    tt = t.view(b, 1, 1, 1, 1)
    x_t = (1 - tt) * videos + tt * eps
    cond = model.encode_prompts(texts)
    pred = model.transformer(x_t, timestep=t * 1000, encoder_hidden_states=cond, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), eps - videos)


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optim.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_digest(state: dict) -> str:
    """SHA-256 of a ``state.json`` body without its own ``digest`` (canonical JSON)."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _save_checkpoint(ckpt: Path, model, ema, opt, step: int, record: dict, settings: dict | None = None) -> None:
    """Write the resumable state as ``ckpt/step-NNNNNNN/`` (weights, EMA, optimiser tensors), then ``state.json``
    naming that folder, with the SHA-256 of each file and of itself (a damaged checkpoint is detected on resume).
    ``state.json`` is replaced atomically and last, so a kill at any point leaves it naming a complete folder: the
    new one, or the previous one (still there until the new ``state.json`` is in place)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    folder = ckpt / f"step-{step:07d}"
    shutil.rmtree(folder, ignore_errors=True)  # a partial folder of a killed save of this same step
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    fault_point("train_write")
    save_file({k: v.detach().contiguous() for k, v in ema.items()}, str(folder / "ema.safetensors"))
    fault_point("train_write")
    opt_tensors, opt_scalars = {}, {}
    for pid, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            key = f"{pid}.{name}"
            if torch.is_tensor(value):
                opt_tensors[key] = value.contiguous()
            else:
                opt_scalars[key] = value
    save_file(opt_tensors, str(folder / "optim.safetensors"))
    fault_point("train_write")
    state = {"step": step, "files": folder.name, "opt_scalars": opt_scalars, "record": record,
             "sha256": {name: _sha256(folder / name) for name in CHECKPOINT_FILES}}
    if settings is not None:
        state["settings"] = settings
    state["digest"] = _state_digest(state)
    tmp = ckpt / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    fault_point("train_write")
    tmp.replace(ckpt / "state.json")
    for old in ckpt.iterdir():  # earlier folders; the loose files and tmp/ of checkpoints made before step folders
        if old.is_dir() and old.name != folder.name and (old.name.startswith("step-") or old.name == "tmp"):
            shutil.rmtree(old)
        elif old.name in CHECKPOINT_FILES:
            old.unlink()


def _read_state(ckpt: Path) -> dict:
    """``ckpt/state.json``, checked against its digest; :class:`WeightsError` if it is damaged."""
    path = ckpt / "state.json"
    remedy = f"remove {str(ckpt)!r} to train from the start"
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"training checkpoint {str(path)!r} is corrupt ({e}): {remedy}") from e
    if not isinstance(state, dict) or not {"step", "record", "opt_scalars"} <= set(state):
        raise WeightsError(f"training checkpoint {str(path)!r} is not a training state: {remedy}")
    if "digest" in state and state["digest"] != _state_digest(state):
        raise WeightsError(f"training checkpoint {str(path)!r} is corrupt (its SHA-256 does not match): {remedy}")
    return state


def _load_checkpoint(ckpt: Path, model, ema, opt, state: dict) -> tuple[int, dict]:
    files = ckpt / state.get("files", "")  # checkpoints written before step folders keep their files in ckpt
    remedy = f"remove {str(ckpt)!r} to train from the start"
    tensors_of = {}
    for name in CHECKPOINT_FILES:
        path = files / name
        if not path.is_file():
            raise WeightsError(f"training checkpoint file {str(path)!r} is missing: {remedy}")
        want = state.get("sha256", {}).get(name)
        if want is not None and _sha256(path) != want:
            raise WeightsError(f"training checkpoint file {str(path)!r} is corrupt (its SHA-256 does not match the "
                               f"one recorded in state.json): {remedy}")
        try:
            tensors_of[name] = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"training checkpoint file {str(path)!r} is not readable ({e}): {remedy}") from e
    try:
        model.load_state_dict(tensors_of["model.safetensors"])
    except RuntimeError as e:
        raise WeightsError(f"training checkpoint {str(files)!r} does not fit this model ({e}): {remedy}") from e
    ema.update(tensors_of["ema.safetensors"])
    tensors = tensors_of["optim.safetensors"]
    sd = opt.state_dict()
    per: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(state["opt_scalars"].items()):
        pid, name = key.split(".", 1)
        per.setdefault(int(pid), {})[name] = value
    sd["state"] = per
    opt.load_state_dict(sd)
    return state["step"], state["record"]


def run_settings(cfg: TrainConfig, model_cfg: EmbeddedConfig, init_from: str | Path | None) -> dict:
    """What a training run depends on (recipe, model config, starting weights); a run folder made with other
    settings is not resumed (:func:`check_resume`)."""
    init = None
    if init_from is not None:
        weights = Path(init_from) / "model.safetensors"
        init = {"path": str(Path(init_from).resolve()),
                "model_sha256": _sha256(weights) if weights.is_file() else None}
    return json.loads(json.dumps({"recipe": dataclasses.asdict(cfg), "model": model_cfg.to_dict(),
                                  "init_from": init}))


def _differences(have, want, prefix: str = "") -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want), key=str):
            out += _differences(have.get(k), want.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if have == want else [f"{prefix}: {have!r:.80} in the checkpoint, {want!r:.80} now"]


def check_resume(ckpt: Path, state: dict, settings: dict) -> None:
    """Raise :class:`ConfigError` naming every difference unless the checkpoint was made with ``settings``.

    A checkpoint written before settings were recorded is compared on what its record holds (seed, init_from)."""
    have = state.get("settings")
    if have is None:
        rec = state.get("record", {})
        old_init = rec.get("init_from")
        have = {"recipe": {"seed": rec.get("seed")},
                "init_from": None if old_init is None else {"path": str(Path(old_init).resolve())}}
        want = {"recipe": {"seed": settings["recipe"]["seed"]},
                "init_from": None if settings["init_from"] is None else {"path": settings["init_from"]["path"]}}
    else:
        want = settings
    diff = _differences(have, want)
    if diff:
        raise ConfigError(f"run folder {str(ckpt.parent)!r} holds a training run with other settings "
                          f"({'; '.join(diff)}): resume with the same --recipe/--seed/--init-from/--model-id, or "
                          "give another --out")


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), model_cfg: EmbeddedConfig = EmbeddedConfig(),
          max_steps: int | None = None, progress: bool = True, init_from: str | Path | None = None) -> EmbeddedModel:
    """Train (or resume) into ``out_dir``; write the EMA weights, training record and loss plot.

    Args:
        out_dir: run folder; ``out_dir/checkpoint`` holds the resumable state.
        max_steps: stop after this many total steps (for tests and time-boxed runs); resumable.
        init_from: a saved model folder to start from (fine-tuning) instead of random initialisation.

    Returns:
        The model holding the EMA weights.
    """
    for s in cfg.stages:
        check_geometry(s.frames, s.height, s.width, model_cfg.patch_size)
    if max_steps is not None:
        check_int("max_steps", max_steps, lo=1)
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    settings = run_settings(cfg, model_cfg, init_from)
    state = _read_state(ckpt) if (ckpt / "state.json").is_file() else None
    if state is not None:  # before any compute: a run folder of other settings is refused, not resumed
        check_resume(ckpt, state, settings)
    torch.manual_seed(cfg.seed)
    model = EmbeddedModel(model_cfg)
    if init_from is not None:
        model.start_from(init_from)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.99),
    )
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    step, record = 0, {"loss": [], "wall_s": 0.0, "seed": cfg.seed,
                       "init_from": None if init_from is None else str(init_from)}
    if state is not None:
        step, record = _load_checkpoint(ckpt, model, ema, opt, state)
        logger.info("resumed from step %d", step)
    record.setdefault("threads", torch.get_num_threads())  # the training's, not the release writer's
    shift = model_cfg.flow_shift if cfg.timestep_shift is None else cfg.timestep_shift
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    bar = tqdm(total=cfg.total_steps, initial=step, disable=not progress, desc="train")
    t_last = time.perf_counter()
    while step < end:
        stage = cfg.stage_at(step)
        videos, texts = data_batch(cfg.seed, step, stage.batch, stage.frames, stage.height, stage.width,
                                   cfg.caption_dropout, cfg.layout, cfg.object_size)
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) % 2**64)
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = flow_matching_loss(model, torch.from_numpy(videos), texts, gen, shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(d).add_(v.float(), alpha=1 - d)
        step += 1
        record["loss"].append(float(loss.detach()))
        fault_point("train_step")
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(record['loss'][-50:]):.4f}", res=f"{stage.frames}x{stage.height}")
        if step % cfg.checkpoint_every == 0 or step == end:
            now = time.perf_counter()
            record["wall_s"] += now - t_last
            t_last = now
            _save_checkpoint(ckpt, model, ema, opt, step, record, settings)
    bar.close()
    final = EmbeddedModel(model_cfg)
    final.load_state_dict({k: v.to(final.state_dict()[k].dtype) for k, v in ema.items()})
    if step >= cfg.total_steps:
        write_release(out_dir, final, cfg, record)
    return final.eval()


def _parent_record(init_from: str | None) -> dict | None:
    """The training record of the weights a fine-tune started from (``training.json``), if they have one."""
    if init_from is None:
        return None
    path = Path(init_from) / "training.json"
    if not path.is_file():
        return None
    parent = json.loads(path.read_text())
    return {k: parent[k] for k in ("steps", "seed", "init_from", "wall_time_s", "threads", "recipe",
                                   "final_loss_mean_last_100", "loss", "parent", "total_steps", "total_wall_time_s")
            if k in parent}


def write_release(out_dir: Path, model: EmbeddedModel, cfg: TrainConfig, record: dict) -> None:
    """Write the shippable weights, the training record (JSON) and the loss curve (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = out_dir / "release"
    parent = _parent_record(record.get("init_from"))
    training = {
        "steps": len(record["loss"]),
        "seed": record["seed"],
        "init_from": record.get("init_from"),
        "wall_time_s": round(record["wall_s"], 1),
        "threads": record.get("threads", torch.get_num_threads()),
        "recipe": dataclasses.asdict(cfg),
        "final_loss_mean_last_100": float(np.mean(record["loss"][-100:])),
    }
    parent_loss: list[float] = []
    if parent is not None:  # lineage: the weights this run started from, and the totals of both runs
        parent_loss = parent.pop("loss", [])
        training["parent"] = parent
        training["total_steps"] = parent.get("total_steps", parent["steps"]) + training["steps"]
        training["total_wall_time_s"] = round(parent.get("total_wall_time_s", parent["wall_time_s"])
                                              + training["wall_time_s"], 1)
    model.save(rel, extra={"training": training})
    (rel / "training.json").write_text(json.dumps({**training, "loss": record["loss"]}, indent=0))
    loss = np.array(parent_loss + record["loss"])
    k = 25
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if len(loss) > k else loss
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(loss, alpha=0.3, lw=0.6, label="loss")
    ax.plot(np.arange(len(smooth)) + (len(loss) - len(smooth)), smooth, label=f"mean of {k}")
    edge = len(parent_loss)
    if parent_loss:
        ax.axvline(edge, color="red", ls="--", lw=0.8, label="fine-tune starts")
    for s in cfg.stages[:-1]:
        edge += s.steps
        ax.axvline(edge, color="gray", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    minutes = training.get("total_wall_time_s", training["wall_time_s"]) / 60
    ax.set_title(f"embedded model training (seed {record['seed']}, {minutes:.0f} min CPU in all)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(rel / "loss.png", dpi=100)
    plt.close(fig)
