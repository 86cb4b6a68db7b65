"""The dense baseline as a registered method: applies nothing, so the harness treats it like the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vdit_accel.registry import Method, OperatingPoint, register_method


@dataclass(frozen=True)
class DenseConfig:
    """No acceleration."""


@dataclass
class DenseHandle:
    stats: dict = field(default_factory=dict)

    def remove(self) -> None:
        pass


def apply_dense(transformer: torch.nn.Module, config: DenseConfig) -> DenseHandle:
    return DenseHandle()


register_method(
    Method("dense", DenseConfig, apply_dense, "the unaccelerated model"),
    [OperatingPoint("dense", "dense", {}, lambda env: DenseConfig())],
)
