"""One call for a diffusers user: ``vdit_accel.apply(pipe, spec)`` -> one removable handle.

``spec`` is a method config (:class:`~vdit_accel.methods.astraea.AstraeaConfig`,
:class:`~vdit_accel.methods.timeripple.TimeRippleConfig`, a diffusers cache config), a preset name or JSON
file, or a list of them (composition). Every denoiser of a pipeline is covered (``transformer`` and, for
Wan2.2's two experts, ``transformer_2``). With ``steps`` the schedules are checked against the step count at
apply time and presets over normalised time are resampled to it.

Composition order is fixed, whatever order the list has: Astraea's block hooks first, then processors
(TimeRipple, which Astraea calls through on its selected rows), then diffusers' caches, which wrap Astraea's
blocks. The same method twice is refused before anything is installed; a failure while applying removes
what was already applied and whatever a failing method left half-installed (hooks, processors, the hook
registries and ``forward`` overrides it created): the model is left exactly as it was. Removal undoes everything
in reverse order, and the last removal of handles on a model also drops the empty hook registries the applies
created, so handles removed in any order leave the model as it was before the first apply.

Example:
    >>> import vdit_accel
    >>> from vdit_accel.testing import tiny_model, TINY_PROMPT
    >>> from vdit_accel.instrument.sampler import GenerationConfig, Sampler
    >>> model = tiny_model()
    >>> with vdit_accel.apply(model, [vdit_accel.AstraeaConfig(budgets=(1.0, 0.5, 0.0, 0.5), num_steps=4)]) as h:
    ...     _ = Sampler(model)(TINY_PROMPT, GenerationConfig(steps=4, guidance=1.0), progress=False)
    ...     h.stats["astraea"]["kept_ratio"]
    0.5
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vdit_accel.errors import ConfigError
from vdit_accel.parallel.cp import TIMERIPPLE_IN_ASTRAEA_ROWS, ParallelError, cp_config_of, lifted_cp_hooks
from vdit_accel.transaction import CREATED, capture, drop_empty_created, mark_created, restore

logger = logging.getLogger(__name__)

DENOISERS = ("transformer", "transformer_2")
_ORDER = {"astraea": 0, "timeripple": 1}  # everything else (diffusers caches) after: they wrap block hooks


def denoisers(target: Any) -> dict[str, torch.nn.Module]:
    """The denoising transformers of a pipeline (``transformer``, ``transformer_2``), or ``{"transformer": m}``."""
    if isinstance(target, torch.nn.Module) and not any(isinstance(getattr(target, n, None), torch.nn.Module)
                                                       for n in DENOISERS):
        return {"transformer": target}
    found = {n: getattr(target, n) for n in DENOISERS if isinstance(getattr(target, n, None), torch.nn.Module)}
    if not found:
        raise ConfigError(f"{type(target).__name__} is neither a transformer nor a pipeline with one of {DENOISERS}")
    return found


def model_id_of(target: Any) -> str | None:
    """The id of the model being accelerated, when it says (``config.model_id``, else ``_name_or_path``)."""
    for obj in (target, getattr(target, "transformer", None)):
        config = getattr(obj, "config", None)
        for key in ("model_id", "_name_or_path"):
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, str) and value:
                return value
    return None


def _resolve(item: Any, steps: int | None, model_id: str | None = None) -> Any:
    """A config from a config, a preset name or a preset path; checked or resampled against ``steps``. A preset
    made for another model than ``model_id`` is applied with a warning naming both."""
    from vdit_accel.search.presets import load_preset

    if isinstance(item, (str, Path)):
        return load_preset(item, steps=steps, model_id=model_id)
    if steps is not None and hasattr(item, "num_steps") and item.num_steps != steps:
        if not hasattr(item, "resampled"):
            raise ConfigError(f"{type(item).__name__} has num_steps={item.num_steps} but the generation has "
                              f"steps={steps}: make it for {steps} steps")
        return item.resampled(steps)
    return item


@dataclass
class AccelHandle:
    """What :func:`apply` returns: ``stats`` per method, ``reset()``, ``remove()``, and a context manager."""

    applied: list[tuple[str, str, Any]] = field(default_factory=list)  # (method, denoiser, method handle)
    modules: list[torch.nn.Module] = field(default_factory=list)  # the denoisers
    _removed: bool = False

    @property
    def stats(self) -> dict:
        """``{method: summary}`` (``{method: {denoiser: summary}}`` when a pipeline has several denoisers)."""
        out: dict = {}
        several = len({d for _, d, _ in self.applied}) > 1
        for method, denoiser, handle in self.applied:
            s = getattr(handle, "stats", None)
            summary = s.summary() if hasattr(s, "summary") else (dict(s) if isinstance(s, dict) else {})
            if several:
                out.setdefault(method, {})[denoiser] = summary
            else:
                out[method] = summary
        return out

    def reset(self) -> None:
        """Clear every method's statistics (caches are per generation and reset by the pipeline)."""
        for _, _, handle in self.applied:
            s = getattr(handle, "stats", None)
            if hasattr(s, "reset"):
                s.reset()

    def remove(self) -> None:
        """Undo everything, last applied first; idempotent."""
        if self._removed:
            return
        had = {id(m) for root in self.modules for m in root.modules() if "_diffusers_hook" in m.__dict__}
        for _, _, handle in reversed(self.applied):
            handle.remove()
        for root in self.modules:  # diffusers' disable_cache() creates an empty registry on the transformer
            for m in root.modules():
                registry = m.__dict__.get("_diffusers_hook")
                if id(m) not in had and registry is not None and not registry.hooks and "forward" not in m.__dict__:
                    setattr(registry, CREATED, True)
        drop_empty_created(self.modules)
        self._removed = True

    def __enter__(self) -> AccelHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _check_parallel(target: Any, names: list[str]) -> list[torch.nn.Module]:
    """The denoisers with diffusers' context parallelism enabled; refuse methods that cannot run on its shards."""
    parallel = [m for m in denoisers(target).values() if cp_config_of(m) is not None]
    if parallel and "fbc" in names:
        raise ParallelError("First-Block Cache under context parallelism is not supported: each rank would decide "
                            "to skip from its own shard's first-block residual, the ranks could decide differently, "
                            "and the ones that compute would wait in the attention collectives for the ones that "
                            "skip. Step caches with a fixed schedule (TaylorSeer, MagCache) or Astraea work under "
                            "context parallelism")
    if parallel and "timeripple" in names:
        from vdit_accel.parallel.timeripple import check_parallel_config

        for m in parallel:  # Ulysses: the reuse runs inside the attention op; Ring: refused
            check_parallel_config(m._parallel_config)
        if "astraea" in names:
            raise ParallelError(TIMERIPPLE_IN_ASTRAEA_ROWS)
    return parallel


def apply(target: Any, spec: Any, *, steps: int | None = None, adapter: Any = None) -> AccelHandle:
    """Apply one or several accelerations to a pipeline or transformer; see the module docstring.

    Args:
        target: a diffusers pipeline (every denoiser is accelerated) or a transformer module.
        spec: a config, a preset name or path, or a list of them.
        steps (`int`, optional): the generation's step count; schedules are checked or resampled to it.
        adapter (`ModelAdapter`, optional): the model knowledge for a model no registered adapter covers (a user's
            own model; ``docs/adapters.md``), used instead of resolving one by class for every denoiser. Handed to
            the methods that read the model through an adapter (TimeRipple, Astraea); diffusers' caches need none.

    Raises:
        ConfigError: an unknown spec, the same method twice, a schedule for another step count without
            resampling, an ``adapter`` that is not a ``ModelAdapter``; CompositionError: an order that cannot
            work (from the method itself); ParallelError: a method that cannot run under the model's context
            parallelism (TimeRipple under Ring, or with Astraea; First-Block Cache); UnsupportedModelError: no
            adapter for the model (pass ``adapter=``).
    """
    import inspect

    import vdit_accel.methods  # noqa: F401  (registers the built-in methods)
    from vdit_accel.adapters import ModelAdapter
    from vdit_accel.registry import method_for

    if adapter is not None and not isinstance(adapter, ModelAdapter):
        raise ConfigError(f"adapter of type {type(adapter).__name__} is not accepted: a vdit_accel.ModelAdapter "
                          "instance (or None: resolved by the model's class)")
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ConfigError("spec=[] selects nothing: give at least one config or preset")
    model_id = model_id_of(target)
    if model_id is None and not isinstance(target, torch.nn.Module):  # a pipeline built in memory: its config hash
        from vdit_accel.pipelines import pipeline_model_id

        model_id = pipeline_model_id(target)
    configs = [_resolve(item, steps, model_id) for item in items]
    methods = [method_for(c) for c in configs]
    names = [m.name for m in methods]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"methods {dupes} appear more than once in spec: each method at most once")
    order = sorted(range(len(configs)), key=lambda i: _ORDER.get(names[i], len(_ORDER)))
    parallel = _check_parallel(target, names)
    modules = denoisers(target)
    handle = AccelHandle(modules=list(modules.values()))
    before = capture(handle.modules)
    try:
        with contextlib.ExitStack() as stack:  # methods go inside diffusers' context-parallel hooks, whatever order
            for module in parallel:
                stack.enter_context(lifted_cp_hooks(module))
            for denoiser, module in modules.items():
                for i in order:
                    kw = {"adapter": adapter} if adapter is not None and "adapter" in inspect.signature(
                        methods[i].apply).parameters else {}
                    handle.applied.append((names[i], denoiser, methods[i].apply(module, configs[i], **kw)))
                    logger.debug("applied %s to %s", names[i], denoiser)
        for _, _, h in handle.applied:  # a method that computes something itself checks what was added after it
            if hasattr(h, "check"):
                h.check()
    except BaseException:  # the model is put back exactly as it was, whatever failed, then the error goes on
        for _, _, h in reversed(handle.applied):
            h.remove()
        restore(before)  # what a method left half-installed when it failed
        handle._removed = True
        raise
    mark_created(before)  # for diffusers' caches: the methods tag what they install themselves
    return handle
