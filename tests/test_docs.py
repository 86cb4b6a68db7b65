"""Documentation cannot drift: every config's docstring documents exactly its fields."""

import dataclasses
import re

import pytest

from vdit_accel.bench.harness import BenchConfig
from vdit_accel.instrument.model import EmbeddedConfig
from vdit_accel.instrument.sampler import GenerationConfig
from vdit_accel.instrument.train import TrainConfig
from vdit_accel.methods.astraea import AstraeaConfig
from vdit_accel.methods.timeripple import TimeRippleConfig
from vdit_accel.search.evolution import EvolutionConfig


def _documented(cls) -> set[str]:
    args = cls.__doc__.split("Args:", 1)[1]
    names = set()
    for line in args.splitlines():
        if not re.match(r"\s{8}[a-z_]", line):
            continue
        for group in re.findall(r"(?:^\s{8}|\),\s)([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*) \(`", line):
            names |= {n.strip() for n in group.split(",")}
    return names


@pytest.mark.parametrize("cls", [TimeRippleConfig, AstraeaConfig, EmbeddedConfig, GenerationConfig, TrainConfig,
                                 EvolutionConfig])
def test_config_docstrings_match_fields(cls):
    assert _documented(cls) == {f.name for f in dataclasses.fields(cls)}


def test_bench_config_fields_are_cli_flags():
    from vdit_accel.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    flags = {a.dest for a in bench._actions}
    assert {f.name for f in dataclasses.fields(BenchConfig)} <= flags
    defaults = {a.dest: a.default for a in bench._actions}
    for f in dataclasses.fields(BenchConfig):
        assert defaults[f.name] == getattr(BenchConfig(), f.name) or f.name == "quick"
