"""Transactional apply and clean removal for everything that installs diffusers hooks or attention processors.

An apply may change, on each module of a transformer: the hooks of its diffusers ``HookRegistry`` (and create
the registry, ``module._diffusers_hook``, where there was none), the instance-level ``forward`` override a
registry installs, the attention processor, and the shared root context hook (its user count, step count and
planners). :func:`capture` records these, :func:`restore` puts them back exactly, and :func:`transactional` wraps
an apply so that a failure anywhere inside leaves the model as it was. A successful apply tags the registries it
installed into (:func:`mark_created`); after a removal :func:`drop_empty_created` drops the ones left empty, so
the model holds no registry, and no ``forward`` override, that it did not have before the first apply.

Used by every method's ``apply_x`` (:mod:`vdit_accel.methods`) and by :func:`vdit_accel.apply` around a whole
composition. The tag lives on the registry object, never on the module.

Example:
    >>> import torch
    >>> from diffusers.hooks import HookRegistry, ModelHook
    >>> m = torch.nn.Linear(2, 2)
    >>> before = set(m.__dict__)
    >>> with transactional([m]):
    ...     HookRegistry.check_if_exists_or_initialize(m).register_hook(ModelHook(), "demo")
    >>> m._diffusers_hook.remove_hook("demo", recurse=False)
    >>> drop_empty_created([m])
    >>> set(m.__dict__) == before
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vdit_accel.context import CONTEXT_HOOK

CREATED = "_vdit_accel_created"  # set on a hook registry an apply installed into (True: the apply created it)


@dataclass(frozen=True)
class ModuleState:
    """What an apply may change on one module, as :func:`capture` saw it."""

    module: torch.nn.Module
    hooks: dict | None  # name -> hook object of its diffusers HookRegistry (None: the module had no registry)
    forward_override: bool  # an instance-level ``forward`` (a registry installs one)
    processor: Any  # its attention processor, if it is an attention module
    context: tuple | None  # the root context hook's checkpoint, if the module holds one
    tag: bool | None  # its registry's CREATED tag (None: untagged or no registry)


@dataclass(frozen=True)
class Snapshot:
    """:func:`capture`'s record: the roots and the state of each of their submodules."""

    roots: list[torch.nn.Module]
    states: list[ModuleState]


def capture(modules: list[torch.nn.Module]) -> Snapshot:
    """The state of every submodule of ``modules``: diffusers hooks, ``forward`` override, processor, context."""
    states = []
    for root in modules:
        for m in root.modules():
            registry = m.__dict__.get("_diffusers_hook")
            hooks = None if registry is None else dict(registry.hooks)
            context = None if hooks is None else hooks.get(CONTEXT_HOOK)
            states.append(ModuleState(m, hooks, "forward" in m.__dict__,
                                      m.get_processor() if hasattr(m, "get_processor") else None,
                                      None if context is None else context.checkpoint(),
                                      getattr(registry, CREATED, None)))
    return Snapshot(list(modules), states)


def restore(snapshot: Snapshot) -> None:
    """Put every module back as :func:`capture` saw it: hooks added since removed (last first), processors reset,
    the context hook's checkpoint restored, and the registries, tags and ``forward`` overrides created since
    dropped."""
    for st in snapshot.states:
        m = st.module
        registry = m.__dict__.get("_diffusers_hook")
        if registry is not None:
            before = st.hooks or {}
            for name in reversed(list(registry.hooks)):
                if before.get(name) is not registry.hooks[name]:
                    registry.remove_hook(name, recurse=False)
            context = registry.hooks.get(CONTEXT_HOOK)
            if context is not None and st.context is not None:
                context.rollback(st.context)
        if st.processor is not None and m.get_processor() is not st.processor:
            m.set_processor(st.processor)
        if registry is None or registry.hooks:
            continue
        if not st.forward_override:
            m.__dict__.pop("forward", None)
        if st.hooks is None:
            del m._diffusers_hook
        elif st.tag is None:
            registry.__dict__.pop(CREATED, None)
        else:
            setattr(registry, CREATED, st.tag)
    _invalidate(snapshot.roots)


def mark_created(snapshot: Snapshot) -> None:
    """Tag the hook registries an apply installed hooks into on modules without a ``forward`` override: with
    ``True`` when the registry did not exist before (see :func:`drop_empty_created`). Already tagged ones (by an
    inner apply) keep their tag."""
    for st in snapshot.states:
        registry = st.module.__dict__.get("_diffusers_hook")
        if registry is not None and not st.forward_override and not hasattr(registry, CREATED):
            if st.hooks is None or registry.hooks:
                setattr(registry, CREATED, st.hooks is None)


def drop_empty_created(modules: list[torch.nn.Module]) -> None:
    """After a removal: a tagged registry that is now empty drops the ``forward`` override its hooks left (the
    module's own ``forward`` is found on its class again) and, if an apply created it, goes too; so whichever
    handle is removed last, the module is as it was before the first apply."""
    for root in modules:
        for m in root.modules():
            registry = m.__dict__.get("_diffusers_hook")
            if registry is None or not hasattr(registry, CREATED) or registry.hooks:
                continue
            m.__dict__.pop("forward", None)
            if getattr(registry, CREATED):
                del m._diffusers_hook
            else:
                delattr(registry, CREATED)
    _invalidate(modules)


@contextlib.contextmanager
def transactional(modules: list[torch.nn.Module]) -> Iterator[Snapshot]:
    """Run an apply: on any exception inside, :func:`restore` the modules and re-raise; on success,
    :func:`mark_created` the registries it installed into. Nests (an inner apply inside an outer one)."""
    snapshot = capture(modules)
    try:
        yield snapshot
    except BaseException:
        restore(snapshot)
        raise
    mark_created(snapshot)


def _invalidate(roots: list[torch.nn.Module]) -> None:
    """Forget the child-registry lists diffusers caches on the roots' registries (``cache_context`` walks them):
    registries were created or dropped below."""
    for root in roots:
        registry = root.__dict__.get("_diffusers_hook")
        if registry is not None:
            registry.invalidate_child_registries_cache()
