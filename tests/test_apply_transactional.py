"""Apply/remove are transactional: a failed apply leaves the model exactly as it was (parameters, torch hooks,
attention processors, diffusers hook registries and their hooks, instance-level ``forward`` overrides), and handles
removed in any order restore the model bit-exactly (same output as the untouched model, nothing left behind)."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

import vdit_accel
from vdit_accel.context import CONTEXT_HOOK
from vdit_accel.errors import CompositionError, ConfigError, VditAccelError
from vdit_accel.instrument.sampler import GenerationConfig, Sampler
from vdit_accel.methods.astraea import AstraeaConfig, apply_astraea
from vdit_accel.methods.sparse_attention import SparseAttentionConfig, apply_sparse_attention
from vdit_accel.methods.timeripple import TimeRippleConfig, apply_timeripple
from vdit_accel.registry import method_for
from vdit_accel.testing import TINY_PROMPT, tiny_model

STEPS = 4
GEN = GenerationConfig(steps=STEPS, guidance=3.0, seed=5)
ASTRAEA = AstraeaConfig(budgets=(1.0, 0.5, 0.0, 0.5), num_steps=STEPS)
TIMERIPPLE = TimeRippleConfig(fixed_threshold=2.0, i_min=1, i_max=2, num_steps=STEPS)
FBC = FirstBlockCacheConfig(threshold=0.3)
TAYLORSEER = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                   cache_identifiers=[r"^blocks\.\d+$"])


def snapshot(model: torch.nn.Module) -> dict:
    """Everything apply/remove may touch, per submodule, in comparable form."""
    out = {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "modules": {}}
    for name, m in model.named_modules():
        registry = m.__dict__.get("_diffusers_hook")
        out["modules"][name] = {
            "registry": None if registry is None else list(registry.hooks),
            "forward_override": "forward" in m.__dict__,
            "torch_hooks": (len(m._forward_hooks), len(m._forward_pre_hooks)),
            "processor": id(m.processor) if hasattr(m, "processor") else None,
        }
    return out


def assert_same(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["params"].keys() == after["params"].keys()
    assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])


def _gen(model) -> torch.Tensor:
    return Sampler(model)(TINY_PROMPT, GEN, progress=False)


def _apply_one(model, config):
    return method_for(config).apply(model.transformer, config)


@pytest.fixture(scope="module")
def dense() -> torch.Tensor:
    return _gen(tiny_model())


# ---- a failed apply changes nothing ----

FAILING_SPECS = {
    "steps_not_an_int": ([ASTRAEA, TIMERIPPLE], {"steps": 2.5}),
    "same_method_twice_in_a_list": ([ASTRAEA, AstraeaConfig(num_steps=STEPS)], {}),
    "second_member_fails_after_the_first_applied": ([ASTRAEA, TimeRippleConfig(layers=(7,), num_steps=STEPS,
                                                                               i_min=1, i_max=2)], {}),
    "astraea_then_cache_then_failing_timeripple": ([FBC, ASTRAEA, TimeRippleConfig(layers=(9,), num_steps=STEPS,
                                                                                  i_min=1, i_max=2)], {}),
    "steps_zero": ([ASTRAEA, FBC], {"steps": 0}),
    "unknown_preset": ([ASTRAEA, "no-such-preset"], {}),
}


@pytest.mark.parametrize("case", sorted(FAILING_SPECS))
def test_failed_api_apply_leaves_the_untouched_model_exactly_as_it_was(case, dense):
    model = tiny_model()
    before = snapshot(model)
    spec, kw = FAILING_SPECS[case]
    with pytest.raises(VditAccelError):
        vdit_accel.apply(model, spec, **kw)
    assert_same(before, snapshot(model))
    assert torch.equal(_gen(model), dense)


@pytest.mark.parametrize("first", ["astraea", "timeripple"])
def test_a_second_apply_of_the_same_method_is_refused_and_changes_nothing(first, dense):
    model = tiny_model()
    config = {"astraea": ASTRAEA, "timeripple": TIMERIPPLE}[first]
    handle = _apply_one(model, config)
    expected = _gen(model)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="already applied"):
        _apply_one(model, config)
    with pytest.raises(ConfigError, match="more than once|already applied"):
        vdit_accel.apply(model, [config])
    assert_same(before, snapshot(model))
    assert torch.equal(_gen(model), expected)
    handle.remove()
    assert torch.equal(_gen(model), dense)


def test_a_refused_composition_changes_nothing(dense):
    """A diffusers block cache enabled before Astraea would be bypassed: refused, and the cache stays as it was."""
    model = tiny_model()
    model.transformer.enable_cache(FBC)
    before = snapshot(model)
    with pytest.raises(CompositionError):
        apply_astraea(model.transformer, ASTRAEA)
    assert_same(before, snapshot(model))
    model.transformer.disable_cache()
    assert torch.equal(_gen(model), dense)


def _fail_at_second_block(monkeypatch, model, method: str) -> None:
    """Make the method's per-block installation raise on the model's second block: Astraea's block-hook
    registration, the processor installation of the processor methods."""
    from diffusers.hooks import HookRegistry

    from vdit_accel.adapters import ModelAdapter

    second = model.transformer.blocks[1]
    if method == "astraea":
        original = HookRegistry.register_hook

        def failing(self, hook, name):
            if self._module_ref is second:
                raise RuntimeError("simulated failure on the second block")
            return original(self, hook, name)

        monkeypatch.setattr(HookRegistry, "register_hook", failing)
    else:
        original = ModelAdapter.install_processor

        def failing(self, attn, processor):
            if any(a is attn for a in second.modules()):
                raise RuntimeError("simulated failure on the second block")
            return original(self, attn, processor)

        monkeypatch.setattr(ModelAdapter, "install_processor", failing)


def test_a_failing_block_registration_rolls_back_the_blocks_already_hooked(dense, monkeypatch):
    """Astraea installs one hook per block: a failure at the last block (of two) through ``apply`` is rolled back:
    the other blocks' hooks and the context hook go, and the model keeps no registry it did not have."""
    model = tiny_model()
    pristine = snapshot(model)
    _fail_at_second_block(monkeypatch, model, "astraea")
    with pytest.raises(RuntimeError, match="simulated"):
        vdit_accel.apply(model, [ASTRAEA, TIMERIPPLE])
    monkeypatch.undo()
    assert_same(pristine, snapshot(model))
    assert torch.equal(_gen(model), dense)


# ---- removal in any order restores the model ----

COMBOS = {
    "timeripple+astraea": [TIMERIPPLE, ASTRAEA],
    "astraea+timeripple+fbc": [ASTRAEA, TIMERIPPLE, FBC],
    "astraea+taylorseer": [ASTRAEA, TAYLORSEER],
}


def _orders():
    for name, configs in COMBOS.items():
        for perm in itertools.permutations(range(len(configs))):
            yield pytest.param(name, perm, id=f"{name}-remove{''.join(map(str, perm))}")


@pytest.mark.parametrize(("combo", "removal"), list(_orders()))
def test_handles_removed_in_any_order_restore_the_model_bit_exactly(combo, removal, dense):
    model = tiny_model()
    pristine = snapshot(model)
    configs = COMBOS[combo]
    handles = [vdit_accel.apply(model, c) for c in configs]  # one handle each, in an order that composes
    accelerated = _gen(model)
    assert not torch.equal(accelerated, dense)
    for i in removal:
        handles[i].remove()
    assert_same(pristine, snapshot(model))
    assert torch.equal(_gen(model), dense)


def test_two_transformers_with_timeripple_removed_in_the_order_applied(dense):
    """Two TimeRipple handles (one per transformer) removed first-applied-first: both models are restored. (Each
    model first generates once: a generation itself leaves diffusers' empty hook registry on the transformer, from
    ``_reset_stateful_cache``, with or without any method.)"""
    a, b = tiny_model(), tiny_model()
    for m in (a, b):
        assert torch.equal(_gen(m), dense)
    pristine = {id(m): snapshot(m) for m in (a, b)}
    ha, hb = vdit_accel.apply(a, TIMERIPPLE), vdit_accel.apply(b, TIMERIPPLE)
    out_a, out_b = _gen(a), _gen(b)
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, dense)
    ha.remove()
    assert torch.equal(_gen(a), dense) and torch.equal(_gen(b), out_b)  # b still accelerated
    hb.remove()
    for m in (a, b):
        assert_same(pristine[id(m)], snapshot(m))
        assert torch.equal(_gen(m), dense)


class _TwoExperts(torch.nn.Module):
    """A pipeline-like object with two denoisers (Wan2.2 A14B's ``transformer`` and ``transformer_2``)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = tiny_model(), tiny_model()
        self.transformer, self.transformer_2 = self.first.transformer, self.second.transformer


@pytest.mark.parametrize("spec", [[TIMERIPPLE], [ASTRAEA, TIMERIPPLE], [ASTRAEA, FBC]], ids=["tr", "astraea+tr",
                                                                                             "astraea+fbc"])
def test_one_handle_over_two_denoisers_removes_everything(spec, dense):
    pipe = _TwoExperts()
    pristine = snapshot(pipe)
    handle = vdit_accel.apply(pipe, spec)
    assert not torch.equal(_gen(pipe.first), dense) and not torch.equal(_gen(pipe.second), dense)
    handle.remove()
    handle.remove()  # idempotent
    assert_same(pristine, snapshot(pipe))
    assert torch.equal(_gen(pipe.first), dense) and torch.equal(_gen(pipe.second), dense)


def test_api_handles_on_one_model_removed_in_the_order_applied(dense):
    model = tiny_model()
    pristine = snapshot(model)
    h1 = vdit_accel.apply(model, ASTRAEA)
    h2 = vdit_accel.apply(model, TIMERIPPLE)
    assert not torch.equal(_gen(model), dense)
    h1.remove()
    h2.remove()
    assert_same(pristine, snapshot(model))
    assert torch.equal(_gen(model), dense)


# ---- each method's own apply is transactional and leaves nothing behind (called directly, not via apply()) ----

SPARSE = SparseAttentionConfig("topk_keys", drop_fraction=0.25, query_pool=2)
DIRECT = {"astraea": (apply_astraea, ASTRAEA), "timeripple": (apply_timeripple, TIMERIPPLE),
          "sparse_attention": (apply_sparse_attention, SPARSE)}


def attributes(model: torch.nn.Module) -> dict[str, set[str]]:
    """The instance attributes of every submodule (a stray ``_diffusers_hook`` or ``forward`` shows here)."""
    return {name: set(m.__dict__) for name, m in model.named_modules()}


@pytest.mark.parametrize("method", sorted(DIRECT))
def test_direct_apply_then_remove_leaves_every_submodule_attribute_identical(method, dense):
    apply_fn, config = DIRECT[method]
    model = tiny_model()
    pristine, attrs = snapshot(model), attributes(model)
    handle = apply_fn(model.transformer, config)
    assert "_diffusers_hook" in model.transformer.__dict__  # the context hook is installed
    accelerated = _gen(model)
    handle.remove()
    handle.remove()  # idempotent
    assert attributes(model) == attrs
    assert_same(pristine, snapshot(model))
    assert torch.equal(_gen(model), dense)
    assert not torch.equal(accelerated, dense)


@pytest.mark.parametrize("method", sorted(DIRECT))
def test_direct_apply_failing_half_way_leaves_the_model_exactly_as_it_was(method, dense, monkeypatch):
    apply_fn, config = DIRECT[method]
    model = tiny_model()
    pristine, attrs = snapshot(model), attributes(model)
    _fail_at_second_block(monkeypatch, model, method)
    with pytest.raises(RuntimeError, match="simulated failure on the second block"):
        apply_fn(model.transformer, config)
    monkeypatch.undo()
    assert attributes(model) == attrs
    assert_same(pristine, snapshot(model))
    assert torch.equal(_gen(model), dense)
    attrs = attributes(model)  # a generation leaves diffusers' empty registry on the transformer, method or not
    handle = apply_fn(model.transformer, config)  # a normal apply still works, and removes cleanly
    assert not torch.equal(_gen(model), dense)
    handle.remove()
    assert attributes(model) == attrs
    assert torch.equal(_gen(model), dense)


@pytest.mark.parametrize("method", ["astraea", "sparse_attention"])
def test_a_failing_direct_apply_keeps_an_applied_method_intact(method, monkeypatch):
    """TimeRipple applied first shares the root context hook: a failed second method restores the hook's users and
    planners, so TimeRipple still acts exactly as before and its removal still restores the model."""
    apply_fn, config = DIRECT[method]
    model = tiny_model()
    attrs = attributes(model)
    handle = apply_timeripple(model.transformer, TIMERIPPLE)
    expected, before = _gen(model), snapshot(model)
    context = model.transformer._diffusers_hook.get_hook(CONTEXT_HOOK)
    users, planners = context.users, dict(context._planners)
    _fail_at_second_block(monkeypatch, model, method)
    with pytest.raises(RuntimeError, match="simulated"):
        apply_fn(model.transformer, config)
    monkeypatch.undo()
    assert_same(before, snapshot(model))
    assert context.users == users and context._planners == planners
    assert torch.equal(_gen(model), expected)
    handle.remove()
    assert attributes(model) == attrs


def test_direct_handles_removed_in_either_order_leave_no_registry(dense):
    for order in ((0, 1), (1, 0)):
        model = tiny_model()
        attrs = attributes(model)
        handles = [apply_astraea(model.transformer, ASTRAEA), apply_timeripple(model.transformer, TIMERIPPLE)]
        assert not torch.equal(_gen(model), dense)
        for i in order:
            handles[i].remove()
        assert attributes(model) == attrs
        assert torch.equal(_gen(model), dense)
