"""Shared fixtures: a seeded tiny random model (fast, exactness tests) and the shipped embedded model."""

from __future__ import annotations

import pytest
import torch

from vdit_accel.instrument.model import EmbeddedModel
from vdit_accel.testing import tiny_model as make_tiny_model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_model() -> EmbeddedModel:
    return make_tiny_model()


@pytest.fixture(scope="session")
def embedded_model() -> EmbeddedModel:
    return EmbeddedModel.load()
