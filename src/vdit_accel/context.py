"""The one per-call context (grid, step, CFG branch) and the root hook that publishes it.

A single stateful :class:`ContextHook` sits on the transformer's root module. Before every forward it
reads the input shape and the model's patch size (the token grid), the ``timestep`` argument, and the
diffusers ``CacheContext`` (CFG branch name and, where the pipeline gives them, step index and step
count), and publishes a :class:`StepContext` that method processors and block hooks read. Where the
pipeline gives no step index, the hook counts calls per branch. Pipelines reset stateful hooks at the
end of each call (``_reset_stateful_cache``), and so does our sampler, so the counters restart for
every generation.

Compile-friendliness (``docs/compile.md``): the hook is the host side of every method. It runs outside any compiled
region (``torch.compiler.disable``: under a whole-module ``torch.compile`` it is the one graph break per call; under
diffusers' regional ``compile_repeated_blocks`` the root forward is not compiled at all), never syncs with the device
(the ``timestep`` is kept as a tensor and converted only when :attr:`StepContext.timestep` is read), and calls every
registered *planner* (:meth:`ContextHook.add_planner`) with the new context, so methods take their per-call decisions
(step schedule lookups, CFG-branch state, bucketed row counts) here, in Python, and hand the compiled blocks only
values that take a bounded set of values.

Example:
    >>> from vdit_accel.instrument.model import EmbeddedConfig, EmbeddedModel
    >>> import torch
    >>> m = EmbeddedModel(EmbeddedConfig.tiny()).transformer
    >>> hook = acquire_context(m, num_steps=4)
    >>> with m.cache_context("cond"):
    ...     _ = m(torch.zeros(1, 3, 4, 8, 8), torch.tensor([999.0]), torch.zeros(1, 20, 16))
    >>> hook.current.grid, hook.current.step_index, hook.current.branch
    (Grid(t=2, h=2, w=2), 0, 'cond')
    >>> release_context(m)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from vdit_accel.adapters import ModelAdapter, resolve_adapter

logger = logging.getLogger(__name__)

CONTEXT_HOOK = "vdit_accel.context"
DEFAULT_BRANCH = "default"


@dataclass(frozen=True)
class Grid:
    """The video token grid (T', H', W') after patchification."""

    t: int
    h: int
    w: int

    @property
    def tokens(self) -> int:
        return self.t * self.h * self.w

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.t, self.h, self.w)


@dataclass(frozen=True)
class StepContext:
    """What a method needs to know about the current transformer call.

    Args:
        branch (`str`): CFG branch (``"cond"``, ``"uncond"``, ``"cond_uncond"`` or ``"default"``).
        step_index (`int`): 0-based denoising step within this generation.
        num_steps (`int | None`): number of denoising steps, when known.
        timestep_raw (`torch.Tensor | float`): the raw ``timestep`` argument (any shape; NaN when absent), kept
            unconverted so that publishing the context never syncs with the device; :attr:`timestep` converts.
        grid (`Grid`): video token grid.
        text_prefix, text_suffix (`int`): text tokens before/after the video tokens in self-attention.
        batch (`int`): batch size of the call.
    """

    branch: str
    step_index: int
    num_steps: int | None
    timestep_raw: torch.Tensor | float
    grid: Grid
    text_prefix: int
    text_suffix: int
    batch: int

    @property
    def timestep(self) -> float:
        """The ``timestep`` of the first batch element as a float (a device sync when read; NaN when absent)."""
        t = self.timestep_raw
        return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


class _BranchName(BaseState):
    """Placeholder state: diffusers sets the CacheContext on every StateManager of a stateful hook."""

    def reset(self) -> None:  # pragma: no cover - nothing to reset
        pass


class ContextHook(ModelHook):
    """Root hook publishing a :class:`StepContext` before every transformer forward."""

    _is_stateful = True

    def __init__(self, adapter: ModelAdapter, num_steps: int | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.num_steps = num_steps
        self.cache_context = StateManager(_BranchName)  # receives diffusers' CacheContext
        self.current: StepContext | None = None
        self.users = 0
        self._calls: dict[str, int] = {}
        self._planners: dict[str, Callable[[StepContext], None]] = {}

    def add_planner(self, key: str, planner: Callable[[StepContext], None]) -> None:
        """Call ``planner(context)`` after every published context (host side, outside compiled regions)."""
        self._planners[key] = planner

    def remove_planner(self, key: str) -> None:
        self._planners.pop(key, None)

    def checkpoint(self) -> tuple:
        """What an apply may change here (users, step count, planners); see :mod:`vdit_accel.transaction`."""
        return self.users, self.num_steps, dict(self._planners)

    def rollback(self, checkpoint: tuple) -> None:
        """Return to a :meth:`checkpoint` (a failed apply leaves the shared hook as it found it)."""
        self.users, self.num_steps, planners = checkpoint
        self._planners = dict(planners)

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        cc = self.cache_context._context
        branch = cc.name if cc is not None else DEFAULT_BRANCH
        count = self._calls.get(branch, 0)
        self._calls[branch] = count + 1
        step = cc.step_index if cc is not None and cc.step_index is not None else count
        num_steps = cc.num_inference_steps if cc is not None and cc.num_inference_steps else self.num_steps
        layout = self.adapter.layout(module, args, kwargs)
        timestep = self.adapter.timestep(args, kwargs)
        self.current = StepContext(
            branch=branch,
            step_index=int(step),
            num_steps=num_steps,
            timestep_raw=timestep if timestep is not None else float("nan"),
            grid=Grid(*layout.grid),
            text_prefix=layout.text_prefix,
            text_suffix=layout.text_suffix,
            batch=layout.batch,
        )
        for planner in list(self._planners.values()):
            planner(self.current)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self._calls.clear()
        self.current = None
        return module


def acquire_context(transformer: torch.nn.Module, adapter: ModelAdapter | None = None,
                    num_steps: int | None = None) -> ContextHook:
    """Install (or share) the root context hook on ``transformer``; pair with :func:`release_context`."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(CONTEXT_HOOK)
    if hook is None:
        hook = ContextHook(adapter or resolve_adapter(transformer), num_steps)
        registry.register_hook(hook, CONTEXT_HOOK)
        logger.debug("installed context hook on %s", type(transformer).__name__)
    elif num_steps is not None and hook.num_steps not in (None, num_steps):
        logger.warning("context hook already counts %s steps; keeping it", hook.num_steps)
    elif num_steps is not None:
        hook.num_steps = num_steps
    hook.users += 1
    return hook


def release_context(transformer: torch.nn.Module) -> None:
    """Drop one user of the context hook; remove it when no method uses it any more."""
    registry = transformer.__dict__.get("_diffusers_hook")  # never creates one
    hook = None if registry is None else registry.get_hook(CONTEXT_HOOK)
    if hook is None:
        return
    hook.users -= 1
    if hook.users <= 0:
        registry.remove_hook(CONTEXT_HOOK, recurse=False)
