"""Helpers for result records: JSON-safe values and the command line that reproduces a run.

Example:
    >>> json_clean({"a": float("inf"), "b": (1, 2.123456789123)})
    {'a': None, 'b': [1, 2.12345679]}
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import torch


def json_clean(x):
    """JSON-safe copy: numpy/torch values to Python, floats rounded to 8 digits, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): json_clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_clean(v) for v in x]
    if isinstance(x, torch.Tensor | np.ndarray):
        return json_clean(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return round(x, 8) if math.isfinite(x) else None
    return x


def command_line(script: str | Path, argv: list[str]) -> str:
    """The shell command that reproduces a script's run (environment, interpreter, script relative to cwd, args)."""
    path = Path(script).resolve()
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    envs = [f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", "OMP_NUM_THREADS") if k in os.environ]
    return " ".join([*envs, shlex.quote(sys.executable), shlex.quote(str(path)), *map(shlex.quote, argv)])


def write_json(path: str | Path, doc: dict) -> Path:
    """Write ``json_clean(doc)`` to ``path`` (parents created, indented, strict JSON); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_clean(doc), indent=1, allow_nan=False))
    return path
