"""Context parallelism (CP) through diffusers' own engine: Ulysses, Ring or both, with vdit-accel's methods.

diffusers 0.42 shards a transformer's sequence with ``model.enable_parallelism(config=ContextParallelConfig(...))``:
split hooks cut the token sequence into contiguous shards before ``blocks.0`` (and the RoPE tables), a gather hook
joins them after ``proj_out``, and every self-attention processor calls ``dispatch_attention_fn`` with the config,
which runs Ulysses (all-to-all: full sequence, local heads inside the op) or Ring (K/V passed around, partial
results merged by their log-sum-exp). vdit-accel adds nothing to that engine; this module holds what it needs:

- :func:`cpu_workarounds`: the two diffusers-on-CPU traps (``torch.accelerator.device_count() == 0`` divides by
  zero in ``_resolve_parallel_config``; ``logger.warning_once`` exists only once ``transformers`` is imported),
  worked around inside a ``with`` block and restored after; nothing is patched at import.
- :func:`enable_context_parallel`: ``enable_parallelism`` with a CPU device mesh, the workarounds, a token-count
  check (uneven shards are refused with :class:`ParallelError` naming the grid) and, where the attention backend
  cannot return the LSE that Ring needs (diffusers' ``native`` on CPU), :class:`LSEAttnProcessor` on the video
  self-attention modules.
- :func:`cp_rows_attention`: Astraea's row-subset attention through the engine (``_templated_context_parallel_
  attention`` with our LSE-returning op :func:`lse_forward_op`): each rank's selected query rows meet the keys and
  values of *all* tokens, through the all-to-all (Ulysses) or the ring passes (Ring).
- :func:`lifted_cp_hooks`: lets a method be applied *after* ``enable_parallelism``: the CP split/gather hooks are
  taken off while the method's hooks go in and put back outermost, so the method sees each rank's shard exactly
  as if it had been applied first.

Example:
    >>> from diffusers import WanTransformer3DModel
    >>> m = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    ...                           text_dim=8, freq_dim=16, ffn_dim=16, num_layers=1)
    >>> cp_config_of(m) is None  # no enable_parallelism: single process
    True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vdit_accel.errors import VditAccelError

logger = logging.getLogger(__name__)

CP_HOOK_PREFIXES = ("cp_input---", "cp_output---")
CHECK_HOOK = "vdit_accel.cp_check"
TIMERIPPLE_IN_ASTRAEA_ROWS = (
    "TimeRipple with Astraea under context parallelism is not supported: Astraea's selected rows meet every rank's "
    "K/V through the engine's all-to-all (cp_rows_attention), which does not call TimeRipple's rows_attention, so "
    "TimeRipple would act only on Astraea's dense steps. Use one of the two under context parallelism")


class ParallelError(VditAccelError, RuntimeError):
    """A context-parallel setting cannot work (uneven shards, heads that do not split, an unsupported method, a
    rank that failed); the message names the bad value and what works."""


# ------------------------------------------------------------------------------------------ CPU workarounds
@contextlib.contextmanager
def cpu_workarounds() -> Iterator[None]:
    """Scoped fixes for diffusers 0.42.1 context parallelism on a CPU-only machine; restored on exit.

    1. ``torch.accelerator.device_count()`` is 0 on CPU and ``ModelMixin._resolve_parallel_config`` computes
       ``rank % device_count()``: inside the block it reports 1 (only when it reported 0).
    2. The CP input hook calls ``logger.warning_once`` (for a 1-D timestep), a method ``transformers`` adds to
       ``logging.Logger`` on import; without it the parallel forward raises ``AttributeError``. Inside the block
       diffusers' context-parallel logger gets an instance ``warning_once`` (only when it has none).

    Example:
        >>> before = torch.accelerator.device_count
        >>> with cpu_workarounds():
        ...     _ = torch.accelerator.device_count()
        >>> torch.accelerator.device_count is before
        True
    """
    from diffusers.hooks import context_parallel as cp_hooks

    restore = []
    if torch.accelerator.device_count() == 0:
        original = torch.accelerator.device_count
        torch.accelerator.device_count = lambda: 1
        restore.append(lambda: setattr(torch.accelerator, "device_count", original))
    cp_logger = cp_hooks.logger
    if not hasattr(cp_logger, "warning_once"):
        seen: set[str] = set()

        def warning_once(msg, *args, **kwargs):
            if msg not in seen:
                seen.add(msg)
                cp_logger.warning(msg, *args, **kwargs)

        cp_logger.warning_once = warning_once
        restore.append(lambda: delattr(cp_logger, "warning_once"))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


# ------------------------------------------------------------------------------------------- inspection
def cp_config_of(module: torch.nn.Module):
    """The ``ContextParallelConfig`` of a transformer with ``enable_parallelism`` (CP part), else ``None``."""
    config = getattr(module, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None) if config is not None else None


def processor_cp_config(processor):
    """The ``ParallelConfig`` an attention processor was given by ``enable_parallelism`` when it has CP, else None."""
    config = getattr(processor, "_parallel_config", None)
    if config is None or getattr(config, "context_parallel_config", None) is None:
        return None
    return config


def cp_hook_names(module: torch.nn.Module) -> list[str]:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    return [n for n in registry._hook_order if n.startswith(CP_HOOK_PREFIXES)]


def is_cp_hook(name: str) -> bool:
    """Whether a diffusers hook name is one of the context-parallel split/gather hooks."""
    return name.startswith(CP_HOOK_PREFIXES)


@contextlib.contextmanager
def lifted_cp_hooks(transformer: torch.nn.Module) -> Iterator[None]:
    """Take diffusers' CP split/gather hooks off ``transformer``'s modules; put them back, outermost, on exit.

    Hooks registered inside the block then sit *inside* the CP hooks, as if they had been registered before
    ``enable_parallelism``: a block hook on ``blocks.0`` sees the rank's shard, not the full sequence.
    """
    lifted = []
    for module in transformer.modules():
        for name in cp_hook_names(module):
            registry = module._diffusers_hook
            lifted.append((module, name, registry.get_hook(name)))
            registry.remove_hook(name, recurse=False)
    try:
        yield
    finally:
        from diffusers.hooks import HookRegistry

        for module, name, hook in lifted:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


# ------------------------------------------------------------------------------------ LSE attention op
def lse_forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
    """A diffusers templated-CP ``forward_op`` on :func:`~vdit_accel.ops.attention.row_subset_attention`: any
    number of query rows against all given keys, with the natural-log LSE Ring needs. Inference only."""
    from vdit_accel.ops.attention import row_subset_attention

    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ParallelError(f"lse_forward_op takes no attn_mask/dropout/causal/GQA (got attn_mask="
                            f"{attn_mask is not None}, dropout_p={dropout_p}, is_causal={is_causal}, "
                            f"enable_gqa={enable_gqa})")
    out, lse = row_subset_attention(query, key, value, scale=scale)
    return (out, lse) if return_lse else out


def cp_rows_attention(q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parallel_config
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-subset attention under context parallelism: ``(out [B,k,H,D], lse [B,k,H])`` of this rank's selected
    query rows against the keys/values of every rank's tokens.

    Ulysses: the rows (``k`` per rank, equal on every rank) and the local K/V go through the all-to-all; the op
    sees every rank's rows with the full key set and local heads. Ring: the rows stay, K/V shards are gathered and
    the partial results merged by LSE. Every rank must call it with the same ``k`` (Astraea's per-rank top-k).
    """
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    out, lse = _templated_context_parallel_attention(q_sel, k, v, None, 0.0, False, None, False, True,
                                                     forward_op=lse_forward_op, backward_op=None,
                                                     _parallel_config=parallel_config)
    return out.to(q_sel.dtype), lse.float()


class LSEAttnProcessor:
    """Video self-attention through diffusers' CP engine with an LSE-returning op (Ring on CPU).

    diffusers' ``native`` backend, the only CP-capable one on CPU, cannot return the LSE Ring merges with. This
    processor computes Q/K/V as the stock processor does (the adapter's ``wan_qkv``), runs
    :func:`cp_rows_attention` with every row, and projects the output (``wan_attention_output``); cross-attention
    calls go to the original processor. Not a fork: the projection code is the adapter's.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, original) -> None:
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or self._parallel_config is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from vdit_accel.adapters.wan import wan_attention_output, wan_qkv

        q, k, v = wan_qkv(attn, hidden_states, rotary_emb)
        out, _ = cp_rows_attention(q, k, v, self._parallel_config)
        return wan_attention_output(attn, out, q)


# ------------------------------------------------------------------------------------------ enabling CP
class _TokenCheckHook:
    """Root pre-forward check: the token count and head count must split over the CP mesh (refused, not padded)."""

    def __init__(self, ulysses: int, ring: int, heads: int, adapter) -> None:
        self.ulysses, self.ring, self.heads, self.adapter = ulysses, ring, heads, adapter

    def __call__(self, module, args, kwargs):
        layout = self.adapter.layout(module, args, kwargs)
        check_split(layout.grid, self.heads, ulysses=self.ulysses, ring=self.ring)


def check_split(grid: tuple[int, int, int], heads: int, *, ulysses: int, ring: int) -> None:
    """Raise :class:`ParallelError` unless ``T'·H'·W'`` tokens split evenly over ``ulysses·ring`` ranks (diffusers'
    equipartition; gloo's all-gather needs equal sizes too) and ``heads`` over ``ulysses``.

    Example:
        >>> check_split((3, 5, 7), 2, ulysses=2, ring=1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vdit_accel.parallel.cp.ParallelError: grid (3, 5, 7) has 105 tokens, not divisible by the 2 context-parallel...
    """
    world = ulysses * ring
    tokens = grid[0] * grid[1] * grid[2]
    if tokens % world:
        raise ParallelError(f"grid {tuple(grid)} has {tokens} tokens, not divisible by the {world} context-parallel "
                            f"ranks: choose frames/height/width whose token count is a multiple of {world} (e.g. an "
                            "even latent frame count)")
    if heads % ulysses:
        raise ParallelError(f"{heads} attention heads do not split over ulysses_degree={ulysses}: use a Ulysses "
                            f"degree that divides {heads}, or Ring (ring_degree) for the rest")


def enable_context_parallel(transformer: torch.nn.Module, *, ulysses: int = 1, ring: int = 1,
                            lse_processor: bool | None = None, adapter=None, _cfg: int = 1):
    """``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree, ring_degree))`` on the current
    process group, CPU or GPU, with the checks and workarounds above. Returns the ``ParallelConfig``.

    Args:
        ulysses, ring (`int`): degrees; ``ulysses * ring`` must equal the world size.
        lse_processor (`bool | None`): put :class:`LSEAttnProcessor` on the video self-attention modules; ``None``:
            when Ring is used and the active backend cannot return the LSE (diffusers' ``native``).

    Raises:
        ParallelError: no process group, degrees that do not match the world size, heads that do not split.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from vdit_accel.adapters import resolve_adapter

    if not (dist.is_available() and dist.is_initialized()):
        raise ParallelError("no torch.distributed process group: launch with torchrun (or vdit_accel.parallel."
                            "launch.spawn) and call dist.init_process_group first")
    world = dist.get_world_size()
    for name, d in (("ulysses", ulysses), ("ring", ring)):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ParallelError(f"{name}={d!r} is out of range: accepted an int >= 1")
    if ulysses * ring == 1:
        raise ParallelError("ulysses=1 x ring=1 splits nothing: context parallelism needs ulysses * ring >= 2 (CFG "
                            "parallelism alone, without a sequence split, is not supported)")
    if ulysses * ring * _cfg != world:
        raise ParallelError(f"cfg={_cfg} x ulysses={ulysses} x ring={ring} = {ulysses * ring * _cfg} ranks, but the "
                            f"world size is {world}: the degrees must multiply to the world size")
    adapter = adapter or resolve_adapter(transformer)
    plan, local = adapter.context_parallel_plan(transformer)
    if plan is None and getattr(transformer, "_cp_plan", None) is None:
        raise ParallelError(f"{type(transformer).__name__} has no context-parallel plan (diffusers defines none for "
                            f"the {adapter.family!r} family and its adapter gives none): context parallelism works "
                            "on the families diffusers plans (Wan, LTX-Video); run this model on one process")
    if ring > 1:  # before any collective: every rank refuses alike
        _refuse_timeripple_under_ring(transformer, adapter, ring)
    heads = getattr(transformer.config, "num_attention_heads", None)
    if heads is not None and heads % ulysses:
        check_split((1, 1, world), heads, ulysses=ulysses, ring=ring)
    device_type = torch._C._get_accelerator().type
    full = dist.device_mesh.init_device_mesh(device_type, (_cfg, ring, ulysses),
                                             mesh_dim_names=("cfg", "ring", "ulysses"))
    mesh = full["ring", "ulysses"]  # this rank's CFG group: its own context-parallel mesh
    if lse_processor is None:
        backend, _ = _AttentionBackendRegistry.get_active_backend()
        lse_processor = ring > 1 and getattr(backend, "value", str(backend)) == "native"
    if lse_processor and adapter.family != "wan":
        raise ParallelError(f"Ring on a backend without LSE needs LSEAttnProcessor, which is written for Wan; the "
                            f"{adapter.family!r} family has none: use Ulysses only, or an attention backend that "
                            "returns the LSE (e.g. flash on GPU)")
    if lse_processor:
        for block in adapter.blocks(transformer):
            attn = adapter.self_attention(block)
            attn.set_processor(LSEAttnProcessor(attn.get_processor()))
    with cpu_workarounds():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring,
                                                                    mesh=mesh), cp_plan=plan)
    for attn in local:  # the adapter's local attentions (e.g. LTX's cross-attention on unsplit text)
        attn.processor._parallel_config = None
    if heads is not None:
        hook = _TokenCheckHook(ulysses, ring, heads, adapter)
        transformer._vdit_cp_check = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    if _cfg > 1:
        return CfgParallel(group=full["cfg"].get_group(), branch=full.get_local_rank("cfg"))
    return transformer._parallel_config


def _refuse_timeripple_under_ring(transformer: torch.nn.Module, adapter, ring: int) -> None:
    """TimeRipple's processors need the whole token grid (the Ulysses op has it, Ring never does): refuse Ring before
    ``enable_parallelism`` when they are installed (``parallel.timeripple``)."""
    from vdit_accel.methods.timeripple import TimeRippleProcessor
    from vdit_accel.parallel.timeripple import check_timeripple_parallel

    if any(isinstance(adapter.self_attention(b).get_processor(), TimeRippleProcessor)
           for b in adapter.blocks(transformer)):
        check_timeripple_parallel(ring)


@dataclass(frozen=True)
class CfgParallel:
    """This rank's place in CFG parallelism: its CFG group (one rank per branch, same CP position) and its branch
    (0: cond, 1: uncond)."""

    group: object
    branch: int


def enable_cfg_context_parallel(transformer: torch.nn.Module, *, ulysses: int = 1, ring: int = 1,
                                adapter=None) -> CfgParallel:
    """CFG parallelism composed with context parallelism: ``2 x ulysses x ring`` ranks; the first half runs the
    cond branch, the second the uncond branch, each half one CP mesh of ``ulysses x ring`` over the sequence.
    Sample with :func:`cfg_parallel_generate`. Raises :class:`ParallelError` as :func:`enable_context_parallel`."""
    return enable_context_parallel(transformer, ulysses=ulysses, ring=ring, adapter=adapter, _cfg=2)


@torch.no_grad()
def cfg_parallel_generate(model, prompt: str, gen, cfg: CfgParallel) -> torch.Tensor:
    """:class:`~vdit_accel.instrument.sampler.Sampler`'s loop for one prompt with the two CFG branches on the two
    halves of the ranks: each rank calls the transformer once per step, for its own branch (inside
    ``cache_context("cond" | "uncond")``, so per-branch caches stay as on one process), the two predictions are
    exchanged by ``all_gather`` in the rank's CFG group, and every rank combines them and steps the scheduler as
    the one-process sampler does. Returns the `[3, F, H, W]` video on every rank.

    Raises:
        ParallelError: guidance <= 1 (no uncond branch to put on the other ranks).
    """
    import torch.distributed as dist
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vdit_accel.instrument.sampler import Sampler

    sampler = Sampler(model)
    guidance = sampler.guidance(gen)
    if guidance <= 1.0:
        raise ParallelError(f"guidance={guidance} runs no uncond branch: CFG parallelism needs guidance > 1")
    transformer = model.transformer
    name, emb = ("cond", model.encode_prompts([prompt])) if cfg.branch == 0 else ("uncond", model.encode_prompts([""]))
    x = sampler.initial_noise(gen, 1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sampler.flow_shift(gen))
    scheduler.set_timesteps(gen.steps)
    transformer._reset_stateful_cache()
    try:
        for i, t in enumerate(scheduler.timesteps):
            ctx = dict(step_index=i, num_inference_steps=gen.steps, timestep=t, sigma=float(scheduler.sigmas[i]))
            with transformer.cache_context(name, **ctx):
                mine = transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb,
                                   return_dict=False)[0].contiguous()
            both = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(both, mine, group=cfg.group)
            pred, pred_u = both
            pred = pred_u + guidance * (pred - pred_u)
            if getattr(gen, "check_finite", False) and not bool(torch.isfinite(pred).all()):  # as Sampler checks
                from vdit_accel.errors import NonFiniteError

                raise NonFiniteError(f"the guided prediction at step {i} (t={float(t):.1f}) is not finite", step=i)
            x = scheduler.step(pred, t, x, return_dict=False)[0]
    finally:
        transformer._reset_stateful_cache()
    return x.clamp(-1, 1)[0]


def simulate_rank_selection(handle, groups: int) -> None:
    """Make an Astraea handle on *one* process select as ``groups`` context-parallel ranks would: top-k of its
    budget within each of ``groups`` contiguous sequence shards, each shard's scores normalised on their own (the
    reference that Astraea under CP is tested against, and the fidelity study's per-rank arm). ``groups=1``: the
    global top-k again."""
    from vdit_accel.methods.astraea import BLOCK_HOOK

    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ParallelError(f"groups={groups!r} is out of range: accepted an int >= 1")
    for block in handle.blocks:
        block._diffusers_hook.get_hook(BLOCK_HOOK).selection_groups = groups
