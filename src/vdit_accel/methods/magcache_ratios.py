"""MagCache's per-model magnitude-ratio curve: measured on the model with diffusers' calibrate mode.

MagCache needs ``mag_ratios`` for the model it runs on (diffusers ships curves only for a few real
checkpoints). :func:`calibrate_mag_ratios` runs one dense generation with
``MagCacheConfig(calibrate=True)`` and captures the curve diffusers reports at the end. Curves are JSON tables
keyed by model id: the shipped ones beside this module (read-only at run time), new ones where the user names
(``vdit-accel calibrate magcache --out``, default ``runs/magcache_ratios.json``). :func:`load_mag_ratios` reads
``runs/magcache_ratios.json`` (relative to the working folder) first when it exists, then the shipped table.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from vdit_accel import validate
from vdit_accel.errors import ConfigError, WeightsError

RATIOS_FILE = Path(__file__).parent / "magcache_ratios.json"  # shipped curves (never written at run time)
USER_RATIOS_FILE = Path("runs") / "magcache_ratios.json"  # default output of `vdit-accel calibrate magcache`


def _read_table(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"MagCache ratio table {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(table, dict):
        raise WeightsError(f"MagCache ratio table {str(path)!r} holds a {type(table).__name__}: expected an object")
    return table


def load_mag_ratios(model_id: str) -> list[float]:
    """The ratio curve for ``model_id``: from ``runs/magcache_ratios.json`` if it has one, else the shipped table;
    :class:`WeightsError` if none was calibrated or a ratio is not a finite positive number."""
    user, shipped = _read_table(USER_RATIOS_FILE), _read_table(RATIOS_FILE)
    table, source = (user, USER_RATIOS_FILE) if model_id in user else (shipped, RATIOS_FILE)
    if model_id not in table:
        raise WeightsError(
            f"no MagCache ratios for model {model_id!r} (have {sorted({**shipped, **user})}): run "
            "`vdit-accel calibrate magcache` first"
        )
    entry = table[model_id]
    ratios = entry.get("ratios") if isinstance(entry, dict) else None
    if not isinstance(ratios, list) or not ratios:
        raise WeightsError(f"{str(source)!r}: the entry of {model_id!r} has no list of ratios")
    try:
        return [validate.check_float(f"ratios[{i}]", r, lo=0.0, lo_open=True) for i, r in enumerate(ratios)]
    except ConfigError as e:
        raise WeightsError(f"{str(source)!r}, model {model_id!r}: {e}") from e


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.curves: list[list[float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "MagCache Calibration Results:" in msg:
            self.curves.append([float(x) for x in ast.literal_eval(msg.split(":", 1)[1].strip())])


def calibrate_mag_ratios(sampler, prompt: str, gen_cfg, write: bool = True, out: str | Path = USER_RATIOS_FILE,
                         progress: bool = False) -> list[float]:
    """Measure the cond-branch ratio curve with one dense generation; optionally store it.

    Args:
        sampler: a :class:`~vdit_accel.instrument.sampler.Sampler` of the model.
        prompt (`str`): the calibration prompt.
        gen_cfg: the :class:`~vdit_accel.instrument.sampler.GenerationConfig` (its ``steps`` is the curve length).
        write (`bool`, defaults True): add the curve to the table at ``out`` (other models' entries kept).
        out (`str | Path`, defaults ``runs/magcache_ratios.json``): the table written; never the shipped one.
        progress (`bool`, defaults False): the generation's tqdm bar.

    Raises:
        OutputPathError: ``out`` is not a writable ``.json`` path (checked before the generation).
        WeightsError: no curve was reported.
    """
    if write:
        out = validate.check_output_path(out, (".json",), overwrite=True, name="out")
        if out.resolve() == RATIOS_FILE.resolve():
            raise ConfigError(f"out={str(out)!r} is the shipped table inside the package: write under ./runs/ or "
                              "another folder you name")
        table = _read_table(out)  # a corrupt table is reported before compute
    from diffusers import MagCacheConfig

    transformer = sampler.model.transformer
    capture = _Capture()
    log = logging.getLogger("diffusers.hooks.mag_cache")
    old_level = log.level
    log.addHandler(capture)
    log.setLevel(logging.INFO)
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=gen_cfg.steps))
    try:
        sampler(prompt, gen_cfg, progress=progress)
    finally:
        transformer.disable_cache()
        log.removeHandler(capture)
        log.setLevel(old_level)
    if not capture.curves:
        raise WeightsError("MagCache calibration produced no ratio curve")
    ratios = capture.curves[0]
    if write:
        table[sampler.model.config.model_id] = {"steps": gen_cfg.steps, "prompt": prompt, "ratios": ratios}
        with validate.atomic_write(out) as tmp:
            tmp.write_text(json.dumps(table, indent=1))
    return ratios
