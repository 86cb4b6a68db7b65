import dataclasses

import pytest
import torch

from vdit_accel.context import acquire_context, release_context
from vdit_accel.errors import ConfigError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.testing import TINY_PROMPT


def test_generation_is_bit_deterministic(tiny_model):
    s = Sampler(tiny_model)
    a = s(TINY_PROMPT, GenerationConfig(steps=3, guidance=4.0, seed=7), progress=False)
    b = s(TINY_PROMPT, GenerationConfig(steps=3, guidance=4.0, seed=7), progress=False)
    c = s(TINY_PROMPT, GenerationConfig(steps=3, guidance=4.0, seed=8), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps=0"), ({"guidance": -0.5}, "guidance=-0.5"), ({"seed": -1}, "seed=-1"),
    ({"flow_shift": 0.0}, r"flow_shift=0.0 is out of range: accepted finite values in \(0.0, 100.0\]"),
])
def test_bad_generation_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig(**kw)


def test_guidance_none_is_the_models_guidance(tiny_model):
    s = Sampler(tiny_model)
    assert tiny_model.config.guidance == 5.0 and s.guidance(GenerationConfig()) == 5.0
    default = s(TINY_PROMPT, GenerationConfig(steps=3, seed=7), progress=False)
    same = s(TINY_PROMPT, GenerationConfig(steps=3, seed=7, guidance=5.0), progress=False)
    tiny_model.config = dataclasses.replace(tiny_model.config, guidance=2.0)  # read by the sampler only
    own = s(TINY_PROMPT, GenerationConfig(steps=3, seed=7), progress=False)
    explicit = s(TINY_PROMPT, GenerationConfig(steps=3, seed=7, guidance=2.0), progress=False)
    assert torch.equal(default, same) and torch.equal(own, explicit) and not torch.equal(default, own)
    with pytest.raises(ConfigError, match=r"guidance=-1.0 is out of range: accepted finite values in \[0.0, 50.0\]"):
        dataclasses.replace(tiny_model.config, guidance=-1.0)


def test_flow_shift_none_is_the_models_shift(tiny_model):
    s = Sampler(tiny_model)
    default = s(TINY_PROMPT, GenerationConfig(steps=3, seed=7), progress=False)
    same = s(TINY_PROMPT, GenerationConfig(steps=3, seed=7, flow_shift=tiny_model.config.flow_shift), progress=False)
    other = s(TINY_PROMPT, GenerationConfig(steps=3, seed=7, flow_shift=9.0), progress=False)
    assert torch.equal(default, same) and not torch.equal(default, other)


def test_bad_geometry_before_compute(tiny_model):
    with pytest.raises(ConfigError, match="width=6"):
        Sampler(tiny_model)(TINY_PROMPT, GenerationConfig(steps=1, width=6), progress=False)


def test_context_hook_sees_grid_step_and_branch(tiny_model):
    seen = []
    hook = acquire_context(tiny_model.transformer)
    tiny_model.transformer.register_forward_hook(lambda *a: seen.append(hook.current))
    try:
        Sampler(tiny_model)(TINY_PROMPT, GenerationConfig(steps=3, guidance=2.0), progress=False)
    finally:
        release_context(tiny_model.transformer)
    assert [(c.branch, c.step_index) for c in seen] == [
        ("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1), ("cond", 2), ("uncond", 2)]
    assert all(c.grid.as_tuple() == (2, 2, 2) and c.num_steps == 3 for c in seen)
    assert hook.current is None  # reset at the end of the generation


def test_context_counts_steps_without_a_pipeline_context(tiny_model):
    hook = acquire_context(tiny_model.transformer, num_steps=5)
    try:
        x = torch.zeros(1, 3, 4, 8, 8)
        emb = tiny_model.encode_prompts([TINY_PROMPT])
        steps = []
        for t in (900.0, 500.0):
            tiny_model.transformer(x, torch.tensor([t]), emb)
            steps.append((hook.current.branch, hook.current.step_index, hook.current.timestep))
    finally:
        release_context(tiny_model.transformer)
    assert steps == [("default", 0, 900.0), ("default", 1, 500.0)]
    assert tiny_model.transformer._diffusers_hook.get_hook("vdit_accel.context") is None
