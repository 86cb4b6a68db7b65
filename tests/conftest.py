"""Shared fixtures: a seeded tiny random model (fast, exactness tests), the shipped embedded model, and the scaling
model's script as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def parallel_scaling():
    """``benchmarks/parallel_scaling.py`` as a module (registered as ``parallel_scaling``)."""
    spec = importlib.util.spec_from_file_location(
        "parallel_scaling", Path(__file__).resolve().parent.parent / "benchmarks" / "parallel_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["parallel_scaling"] = mod
    spec.loader.exec_module(mod)
    return mod
