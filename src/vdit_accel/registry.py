"""Method registry: every acceleration method (ours and the peers) is a small registered object.

A :class:`Method` has a name, a config class and an ``apply(transformer, config) -> handle`` function;
the handle has ``.stats`` and ``.remove()``. :func:`apply` dispatches on the config's type through a
dict (no ``isinstance`` chain). Bench operating points (a labelled method setting) are registered
beside the methods so the harness only ever drives methods through this registry.

Example:
    >>> import vdit_accel.methods  # registers the built-in methods
    >>> "dense" in method_names()
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vdit_accel.errors import ConfigError


class Handle(Protocol):
    """What ``apply`` returns: live statistics and a way to restore the model exactly."""

    stats: Any

    def remove(self) -> None: ...


@dataclass(frozen=True)
class Method:
    """A registered acceleration method."""

    name: str
    config_cls: type
    apply: Callable[[torch.nn.Module, Any], Handle]
    description: str = ""


@dataclass(frozen=True)
class BenchEnv:
    """What an operating point may need to build its config: the sampler (timestep callback) and steps."""

    sampler: Any
    steps: int
    model_id: str


@dataclass(frozen=True)
class OperatingPoint:
    """One labelled setting of a method, as the bench harness runs it."""

    label: str
    method: str
    settings: dict
    make_config: Callable[[BenchEnv], Any] = field(compare=False)


_METHODS: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}
_POINTS: dict[str, list[OperatingPoint]] = {}


def register_method(method: Method, points: list[OperatingPoint] = ()) -> Method:
    """Register a method and its bench operating points."""
    _METHODS[method.name] = method
    _BY_CONFIG[method.config_cls] = method
    _POINTS[method.name] = list(points)
    return method


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"method {name!r} is unknown: choose one of {method_names()}")
    return _METHODS[name]


def transformer_of(model_or_pipe: Any) -> torch.nn.Module:
    """The denoising transformer of a pipeline (``.transformer``), or the module itself."""
    module = getattr(model_or_pipe, "transformer", model_or_pipe)
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{type(model_or_pipe).__name__} is neither a transformer nor a pipeline with one")
    return module


def method_for(config: Any) -> Method:
    """The registered method whose config class is ``type(config)``."""
    method = _BY_CONFIG.get(type(config))
    if method is None:
        known = sorted(c.__name__ for c in _BY_CONFIG)
        raise ConfigError(f"no method takes a {type(config).__name__}: accepted config classes are {known}")
    return method


def apply(model_or_pipe: Any, config: Any) -> Handle:
    """Apply the method whose config class is ``type(config)``; returns its removable handle."""
    return method_for(config).apply(transformer_of(model_or_pipe), config)


def operating_points(spec: str) -> list[OperatingPoint]:
    """Resolve a comma-separated list of method names (all their points) or point labels.

    Example: ``"dense,fbc,timeripple-75"``.
    """
    all_points = {p.label: p for pts in _POINTS.values() for p in pts}
    out: list[OperatingPoint] = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name in _POINTS:
            out.extend(_POINTS[name])
        elif name in all_points:
            out.append(all_points[name])
        else:
            raise ConfigError(
                f"method or operating point {name!r} is unknown: methods {method_names()}, "
                f"points {sorted(all_points)}"
            )
    if not out:
        raise ConfigError(f"methods={spec!r} selects nothing: give at least one method")
    return out
