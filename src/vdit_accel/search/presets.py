"""Versioned JSON presets: the single artifact that calibration and search write and configs load.

A preset records what it was made for (model id, geometry, steps, seed), the method's config as a
dict (loaded back through the config's own validation, unknown keys rejected), and how it was made
(calibration or search record). Shipped presets live in ``vdit_accel/presets/`` and are named by file
stem; any other path works too.

Example:
    >>> from vdit_accel.methods.timeripple import TimeRippleConfig
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "tr.json"
    >>> _ = save_preset(p, "timeripple", TimeRippleConfig(), model_id="m", geometry=[16, 64, 64], steps=50, seed=0)
    >>> load_preset(p, method="timeripple") == TimeRippleConfig()
    True
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vdit_accel.config_io import check_int, check_sequence, check_str, find_non_finite
from vdit_accel.errors import ConfigError, WeightsError
from vdit_accel.ops.schedule import MAX_STEPS

logger = logging.getLogger(__name__)

PRESET_FORMAT = "vdit-accel/preset"
PRESET_VERSION = 1
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
MAX_SEED = 2**63 - 1
MAX_GEOMETRY = 4096  # frames, height or width recorded in a preset
_REQUIRED = ("format", "version", "method", "model_id", "geometry", "steps", "seed", "config")


def save_preset(path: str | Path, method: str, config: Any, *, model_id: str, geometry: list[int], steps: int,
                seed: int, record: dict | None = None) -> Path:
    """Write a preset file; ``config`` is a method config with ``to_dict()``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": PRESET_FORMAT,
        "version": PRESET_VERSION,
        "method": method,
        "model_id": model_id,
        "geometry": list(geometry),
        "steps": int(steps),
        "seed": int(seed),
        "config": config.to_dict(),
        "record": record or {},
    }
    path.write_text(json.dumps(data, indent=1))
    return path


def preset_path(name_or_path: str | Path) -> Path:
    """A shipped preset name (``timeripple-85``) or a file path."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise ConfigError(f"preset={name_or_path!r} is not accepted: a shipped preset name or a JSON file path")
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        return p
    shipped = PRESETS_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    names = sorted(x.stem for x in PRESETS_DIR.glob("*.json")) if PRESETS_DIR.is_dir() else []
    raise WeightsError(f"preset {str(name_or_path)!r} is neither a file nor a shipped preset: shipped are {names}")


def read_preset(name_or_path: str | Path) -> dict:
    """Read and validate a preset file's envelope: a JSON object with every field of ``_REQUIRED`` of the right
    type, no NaN or infinite number anywhere (:class:`WeightsError` naming the file and the field)."""
    path = preset_path(name_or_path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise WeightsError(f"preset {str(path)!r} is not UTF-8 text: {e}") from e
    except RecursionError as e:
        raise WeightsError(f"preset {str(path)!r} is nested too deeply to be a preset") from e
    except ValueError as e:  # json.JSONDecodeError, and integers too long to parse
        raise WeightsError(f"preset {str(path)!r} is not valid JSON: {e}") from e
    except OSError as e:
        raise WeightsError(f"preset {str(path)!r} cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"preset {str(path)!r} holds {type(data).__name__} {_short(data)}: a preset is a JSON "
                           f"object with the fields {list(_REQUIRED)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing or data.get("format") != PRESET_FORMAT:
        raise WeightsError(f"preset {str(path)!r} is not a {PRESET_FORMAT} file (format={_short(data.get('format'))}, "
                           f"missing {missing})")
    if data["version"] != PRESET_VERSION or isinstance(data["version"], bool):
        raise WeightsError(f"preset {str(path)!r} has version={_short(data['version'])}: accepted {PRESET_VERSION}")
    bad = find_non_finite(data)
    if bad is not None:
        raise WeightsError(f"preset {str(path)!r} has a non-finite number at {bad}: accepted finite numbers only")
    try:
        check_str("method", data["method"])
        check_str("model_id", data["model_id"])
        geometry = check_sequence("geometry", data["geometry"], max_len=3)
        if len(geometry) != 3:
            raise ConfigError(f"geometry={data['geometry']!r} is not accepted: [frames, height, width]")
        for i, g in enumerate(geometry):
            check_int(f"geometry[{i}]", g, lo=1, hi=MAX_GEOMETRY)
        check_int("steps", data["steps"], lo=1, hi=MAX_STEPS)
        check_int("seed", data["seed"], lo=0, hi=MAX_SEED)
        if not isinstance(data["config"], dict):
            raise ConfigError(f"config={_short(data['config'])} is not accepted: a JSON object of the method's fields")
        if not isinstance(data.get("record", {}), dict):
            raise ConfigError(f"record={_short(data['record'])} is not accepted: a JSON object")
    except ConfigError as e:
        raise WeightsError(f"preset {str(path)!r}: {e}") from e
    return data


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_preset(name_or_path: str | Path, *, method: str | None = None, steps: int | None = None,
                model_id: str | None = None) -> Any:
    """Load a preset into its method's config class.

    Raises:
        ConfigError: the preset is for another method or for a method that takes no presets (diffusers' caches), or
            for another step count than ``steps`` and its method
            has no normalised-time resampling (``config.resampled(steps)``; Astraea has it), or a field of its
            config is out of range or of the wrong type (the message names it).
        WeightsError: the file is missing or malformed.
    """
    from vdit_accel.registry import get_method, method_names

    data = read_preset(name_or_path)
    if method is not None and data["method"] != method:
        raise ConfigError(f"preset {str(name_or_path)!r} is for method {data['method']!r}, not {method!r}")
    if model_id is not None and data["model_id"] != model_id:
        logger.warning("preset %s was made for model %s, applied to %s", name_or_path, data["model_id"], model_id)
    import vdit_accel.methods  # noqa: F401  (registers the methods)

    config_cls = get_method(data["method"]).config_cls
    if not hasattr(config_cls, "from_dict"):  # diffusers' caches: configured by their operating points, not presets
        takes = [m for m in method_names() if hasattr(get_method(m).config_cls, "from_dict")]
        raise ConfigError(f"preset {str(name_or_path)!r} is for method {data['method']!r}, which takes no presets: "
                          f"presets exist for {takes}")
    try:
        config = config_cls.from_dict(data["config"])
    except ConfigError as e:
        raise ConfigError(f"preset {str(name_or_path)!r}: {e}") from e
    if steps is not None and data["steps"] != steps:
        if not hasattr(config, "resampled"):
            raise ConfigError(
                f"preset {str(name_or_path)!r} was made for steps={data['steps']}, not steps={steps}: its schedule "
                f"is tied to the step count (method {data['method']!r} has no normalised-time resampling)"
            )
        logger.info("preset %s (made for %d steps) resampled to %d steps", name_or_path, data["steps"], steps)
        config = config.resampled(steps)
    return config


DEFAULT_PRESETS = {"astraea": "astraea-3x", "timeripple": "timeripple-op1.5x"}


def method_config_from_cli(method: str, preset: str | None, steps: int, model_id: str | None = None) -> Any:
    """The config for ``--method`` with an optional ``--preset`` (default: the method's entry of
    ``DEFAULT_PRESETS``, resampled to ``steps``); a preset made for another model than ``model_id`` is applied with
    a warning, as in the bench. A method without a default preset needs ``--preset`` (its default config would
    leave the model dense: a silent no-op)."""
    import vdit_accel.methods  # noqa: F401
    from vdit_accel.registry import get_method

    get_method(method)
    if preset is None:
        if method not in DEFAULT_PRESETS:
            raise ConfigError(f"--method {method} needs --preset: it has no default preset (defaults exist for "
                              f"{sorted(DEFAULT_PRESETS)})")
        preset = DEFAULT_PRESETS[method]
    return load_preset(preset, method=method, steps=steps, model_id=model_id)


def preset_operating_point(method: str, name: str):
    """A bench operating point labelled ``name`` that loads the shipped preset ``name`` for ``method``."""
    from vdit_accel.registry import OperatingPoint

    def make(env):
        return load_preset(name, method=method, steps=env.steps, model_id=env.model_id)

    return OperatingPoint(name, method, {"preset": name}, make)
