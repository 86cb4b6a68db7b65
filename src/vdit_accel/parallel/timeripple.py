"""TimeRipple under diffusers' context parallelism: the reuse runs inside the Ulysses attention op.

A TimeRipple processor under context parallelism receives the rank's sequence shard (`[B, N/P, H, D]` after RoPE),
which is not a whole ``(T', H', W')`` grid: a token's t/h/w window neighbours may sit on another rank. Inside
diffusers' Ulysses attention op, after the all-to-all, each rank holds the *full* sequence with ``H/P`` heads. So
:func:`ulysses_timeripple_attention` hands the processor's q/k/v to diffusers' ``_templated_context_parallel_
attention`` with an op that runs the processor's own reuse attention (``TimeRippleProcessor._reuse_attention``:
``ops.timeripple`` masks and ``resolve_reuse``, or ``ops.timeripple_tokens``) on the rank's heads of every token.

- Element decisions ("exact_sim", "exact_rows", "token_rows"; θ "shared" or "per_axis") are per (token, head,
  channel) or per (token, head): no communication, the same numbers as one process.
- What pools over heads is reduced over the Ulysses group (:class:`HeadGroup`): the "per_channel" threshold's mean
  |q| (all-reduce of each rank's mean) and the "tokens" variant's per-token spread sums (all-reduce of each rank's
  channel sums, through ``token_decisions(channel_sum=)``), so every rank decides on all heads, as one process does.
  The sums are added in another order than on one process (float rounding of the threshold / spread).
- Ring (and Ring in a Ulysses x Ring mesh) is refused with :class:`ParallelError`: the op then sees K/V shards in
  turn, and the token grid is never whole on one rank.

Example:
    >>> check_timeripple_parallel(ring_degree=1)  # pure Ulysses: accepted
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vdit_accel.parallel.cp import ParallelError


@dataclass(frozen=True)
class HeadGroup:
    """The Ulysses ranks that hold the other heads of the same tokens inside the attention op (equal shares).

    Args:
        group: the ``torch.distributed`` process group of the Ulysses mesh.
        size (`int`): its rank count ``P``.
        rank (`int`): this rank's place in it (which ``H/P`` heads the all-to-all gives it).
    """

    group: Any
    size: int
    rank: int = 0

    def local_groups(self, groups: dict) -> dict:
        """RoPE groups for this rank's heads: bool `[H, D]` masks (per-head channel maps, e.g. LTX's) keep the rows
        of the ``H/P`` heads the Ulysses all-to-all gives this rank (the ``rank``-th contiguous share); head-dim
        slices (the same channels in every head) pass unchanged."""
        def rows(g):
            if not isinstance(g, torch.Tensor):
                return g
            share = g.shape[0] // self.size
            return g[self.rank * share:(self.rank + 1) * share]

        return {name: rows(g) for name, g in groups.items()}

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the group's ranks (a new tensor; every rank gets the same one)."""
        import torch.distributed as dist

        out = x.contiguous().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of each rank's ``x`` (a mean over equal head shares is the mean over all heads)."""
        return self.sum(x) / self.size


def check_timeripple_parallel(ring_degree: int, ulysses_anything: bool = False) -> None:
    """Raise :class:`ParallelError` unless TimeRipple can run under these context-parallel settings: no Ring
    (``ring_degree == 1``: pure Ulysses) and equal head shares (``ulysses_anything`` off).

    Example:
        >>> check_timeripple_parallel(2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vdit_accel.parallel.cp.ParallelError: TimeRipple under Ring context parallelism (ring_degree=2) is not...
    """
    if ring_degree > 1:
        raise ParallelError(
            f"TimeRipple under Ring context parallelism (ring_degree={ring_degree}) is not supported: Ring passes "
            "K/V shards from rank to rank and no rank ever holds the whole token grid that the reuse windows (t, h, "
            "w neighbours) need. Use Ulysses only (ulysses_degree = the rank count; it must divide the heads), "
            "where the reuse runs inside the attention op on the full sequence")
    if ulysses_anything:
        raise ParallelError("TimeRipple under Ulysses with ulysses_anything=True is not supported (uneven head "
                            "shares); use ulysses_anything=False with a head count the Ulysses degree divides")


def check_parallel_config(parallel_config) -> None:
    """:func:`check_timeripple_parallel` for a diffusers ``ParallelConfig`` (as ``enable_parallelism`` sets it);
    anything else set as a processor's ``_parallel_config`` is refused with :class:`ParallelError`."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or not hasattr(cp, "ring_degree"):
        got = type(parallel_config).__name__
        raise ParallelError(f"TimeRipple under context parallelism needs diffusers' ParallelConfig with a "
                            f"ContextParallelConfig (as enable_parallelism sets it); got {got}")
    check_timeripple_parallel(cp.ring_degree, cp.ulysses_anything)


def ulysses_timeripple_attention(processor, call, plan) -> torch.Tensor:
    """A TimeRipple processor's reuse attention for one call under Ulysses: `[B, N/P, H, D]` out for this rank's shard.

    The shard's q/k/v go through diffusers' Ulysses all-to-all; inside the op, ``processor._reuse_attention`` runs on
    the full sequence with this rank's ``H/P`` heads (grid and θ from ``plan``, as on one process) and records the
    stats of those heads; the output comes back through the reverse all-to-all.

    Args:
        processor (`TimeRippleProcessor`): the calling processor (config, stats, layer).
        call (`AttentionCall`): the shard's post-RoPE q/k/v and the ``parallel_config``.
        plan (`_CallPlan`): the call's θ (> 0), grid, branch and step.

    Raises:
        ParallelError: Ring or ``ulysses_anything`` (:func:`check_parallel_config`), or an attention mask (the
            masked path runs the adapter's attention op, which would decide reuse on the shard).
    """
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    config = call.parallel_config
    check_parallel_config(config)
    if call.mask is not None:
        raise ParallelError("TimeRipple under context parallelism takes no attention mask (a family whose "
                            "self-attention is masked, e.g. HunyuanVideo's text padding): run it on one process")
    cp = config.context_parallel_config
    heads = HeadGroup(cp._ulysses_mesh.get_group(), cp.ulysses_degree, cp._ulysses_mesh.get_local_rank())

    def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa or return_lse or scale is not None:
            raise ParallelError("TimeRipple's Ulysses op takes no mask, dropout, causal, GQA, LSE or scale")
        return processor._reuse_attention(query, key, value, call, plan, heads)

    return _templated_context_parallel_attention(call.q, call.k, call.v, None, 0.0, False, None, False, False,
                                                 forward_op=forward_op, backward_op=None, _parallel_config=config)
