"""MagCache's per-model magnitude-ratio curve: measured on the model with diffusers' calibrate mode.

MagCache needs ``mag_ratios`` for the model it runs on (diffusers ships curves only for a few real
checkpoints). :func:`calibrate_mag_ratios` runs one dense generation with
``MagCacheConfig(calibrate=True)`` and captures the curve diffusers reports at the end; the curve is
stored as JSON beside this module, keyed by model id, and :func:`load_mag_ratios` reads it back.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from vdit_accel.errors import WeightsError

RATIOS_FILE = Path(__file__).parent / "magcache_ratios.json"


def load_mag_ratios(model_id: str) -> list[float]:
    """The stored ratio curve for ``model_id``; :class:`WeightsError` if none was calibrated."""
    table = json.loads(RATIOS_FILE.read_text()) if RATIOS_FILE.is_file() else {}
    if model_id not in table:
        raise WeightsError(
            f"no MagCache ratios for model {model_id!r} (have {sorted(table)}): run "
            "`vdit-accel calibrate magcache` first"
        )
    return [float(r) for r in table[model_id]["ratios"]]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.curves: list[list[float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "MagCache Calibration Results:" in msg:
            self.curves.append([float(x) for x in ast.literal_eval(msg.split(":", 1)[1].strip())])


def calibrate_mag_ratios(sampler, prompt: str, gen_cfg, write: bool = True) -> list[float]:
    """Measure the cond-branch ratio curve with one dense generation; optionally store it."""
    from diffusers import MagCacheConfig

    transformer = sampler.model.transformer
    capture = _Capture()
    log = logging.getLogger("diffusers.hooks.mag_cache")
    old_level = log.level
    log.addHandler(capture)
    log.setLevel(logging.INFO)
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=gen_cfg.steps))
    try:
        sampler(prompt, gen_cfg, progress=False)
    finally:
        transformer.disable_cache()
        log.removeHandler(capture)
        log.setLevel(old_level)
    if not capture.curves:
        raise WeightsError("MagCache calibration produced no ratio curve")
    ratios = capture.curves[0]
    if write:
        table = json.loads(RATIOS_FILE.read_text()) if RATIOS_FILE.is_file() else {}
        table[sampler.model.config.model_id] = {"steps": gen_cfg.steps, "prompt": prompt, "ratios": ratios}
        RATIOS_FILE.write_text(json.dumps(table, indent=1))
    return ratios
