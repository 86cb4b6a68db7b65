"""vdit-accel: training-free acceleration of video diffusion transformers (TimeRipple, Astraea).

The public API, loaded on first use (importing the package does nothing else)::

    import vdit_accel
    handle = vdit_accel.apply(pipe, "astraea-3x")          # a preset, a config, or a list of them
    video = pipe(...)
    handle.stats; handle.remove()
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "apply": "vdit_accel.api",
    "AccelHandle": "vdit_accel.api",
    "AstraeaConfig": "vdit_accel.methods.astraea",
    "TimeRippleConfig": "vdit_accel.methods.timeripple",
    "load_preset": "vdit_accel.search.presets",
    "ModelAdapter": "vdit_accel.adapters",
    "register_adapter": "vdit_accel.adapters",
    "VditAccelError": "vdit_accel.errors",
    "ConfigError": "vdit_accel.errors",
    "CompositionError": "vdit_accel.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vdit_accel' has no attribute {name!r}")
