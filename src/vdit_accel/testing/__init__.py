"""Toy models and constants shared by the test suite (and usable by integrators' own tests)."""

from __future__ import annotations

import torch

TINY_PROMPT = "a red circle moves left on a blue background"


def tiny_model(seed: int = 1234):
    """A seeded random-init :class:`EmbeddedModel` with :meth:`EmbeddedConfig.tiny` (runs in milliseconds)."""
    from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel

    torch.manual_seed(seed)
    return EmbeddedModel(EmbeddedConfig.tiny()).eval()
