"""The row-removing TimeRipple variants as one opaque ``torch.library`` op, so that they compile without breaks.

"exact_rows", "token_rows" and "tokens" (``ops.timeripple_structured``, ``ops.timeripple_tokens``) remove query rows
and keys whose number is known only after the reuse decisions, on the device: ``nonzero()``, ``.item()`` and
``torch.equal`` fixed points, that is data-dependent shapes that break a ``torch.compile`` graph and that
``fullgraph=True`` refuses. Their *output* shape never depends on what was removed (every row gets its root's output
row), so the whole call (decisions, unique-row gather, merged-key SDPA, scatter back) is registered as the custom op
``vdit_accel::timeripple_rows_attention``, with a fake implementation that returns the query's shape. Dynamo sees one
op with static shapes and never the removed counts: no graph break, no recompile per count, and no bucketing is
needed (the row counts never reach a graph, so they add no compiled variants).

The op runs the eager function of its variant, so a compiled call computes exactly what an eager call computes. Its
statistics (the :class:`ReuseStats` of the call: reuse fractions per axis and RoPE group, QK savings per head, rows
and keys removed, attention work) come back as a fixed-shape float64 CPU tensor (``stats_size`` values, see
:func:`pack_stats`), which a compiled caller stores without reading it; :func:`unpack_stats` rebuilds the record on
the host, outside the compiled region. Inside the op the decisions still sync with the device (as they do eager):
the op removes the graph breaks, not the host syncs.
"""

from __future__ import annotations

import torch

from vdit_accel.errors import ConfigError, check_choice
from vdit_accel.ops.timeripple import ReuseStats, RopeGroup, mode_thresholds
from vdit_accel.ops.timeripple_structured import VARIANTS, structured_timeripple_attention
from vdit_accel.ops.timeripple_tokens import tokens_timeripple_attention

OP_NAME = "vdit_accel::timeripple_rows_attention"
_REMOVAL_FIELDS = 3  # rows_removed, keys_removed, attn_work


def stats_size(n_axes: int, n_groups: int, heads: int) -> int:
    """Length of a packed :class:`ReuseStats`: q/k reuse, q/k per axis, q/k per group, QK savings, per head, removal.

    Example:
        >>> stats_size(3, 3, 2)
        20
    """
    return 2 + 2 * n_axes + 2 * n_groups + 1 + heads + _REMOVAL_FIELDS


def pack_stats(stats: ReuseStats, axes: tuple[str, ...], groups: tuple[str, ...], heads: int) -> torch.Tensor:
    """`stats` as a float64 CPU tensor of `stats_size(len(axes), len(groups), heads)` values (exact round trip).

    Example:
        >>> st = ReuseStats(0.5, 0.25, {"t": 0.5}, {"t": 0.25}, {}, {}, 0.625, [0.625], 0.5, 0.25, 0.375)
        >>> unpack_stats(pack_stats(st, ("t",), (), 1), ("t",), (), 1) == st
        True
    """
    values = [stats.q_reuse, stats.k_reuse, *(stats.q_reuse_per_axis[a] for a in axes),
              *(stats.k_reuse_per_axis[a] for a in axes), *(stats.q_reuse_per_group[g] for g in groups),
              *(stats.k_reuse_per_group[g] for g in groups), stats.qk_savings, *stats.qk_savings_per_head,
              stats.rows_removed, stats.keys_removed, stats.attn_work]
    if len(values) != stats_size(len(axes), len(groups), heads):
        raise ConfigError(f"stats of {len(stats.qk_savings_per_head)} heads do not pack as {heads} heads")
    return torch.tensor(values, dtype=torch.float64)


def unpack_stats(packed: torch.Tensor, axes: tuple[str, ...], groups: tuple[str, ...], heads: int) -> ReuseStats:
    """Inverse of :func:`pack_stats` (one host read of the tensor)."""
    v = packed.tolist()
    a, g = len(axes), len(groups)
    at = iter(range(len(v)))

    def take(n: int) -> list[float]:
        return [v[next(at)] for _ in range(n)]

    q_all, k_all = take(2)
    q_axis, k_axis = dict(zip(axes, take(a))), dict(zip(axes, take(a)))
    q_group, k_group = dict(zip(groups, take(g))), dict(zip(groups, take(g)))
    (savings,) = take(1)
    per_head = take(heads)
    rows, keys, work = take(_REMOVAL_FIELDS)
    return ReuseStats(q_all, k_all, q_axis, k_axis, q_group, k_group, savings, per_head, rows, keys, work)


def group_masks(groups: dict[str, RopeGroup], heads: int, head_dim: int, device) -> torch.Tensor | None:
    """The RoPE groups as one bool `[G, H, D]` tensor (a slice covers its channels in every head); `None` if none.

    Example:
        >>> group_masks({"t": slice(0, 2), "h": slice(2, 4)}, 1, 4, "cpu").int().tolist()
        [[[1, 1, 0, 0]], [[0, 0, 1, 1]]]
    """
    if not groups:
        return None
    out = torch.zeros(len(groups), heads, head_dim, dtype=torch.bool, device=device)
    for i, sel in enumerate(groups.values()):
        if isinstance(sel, slice):
            out[i, :, sel] = True
        else:
            out[i] = sel.to(device)
    return out


@torch.library.custom_op(OP_NAME, mutates_args=())
def timeripple_rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    groups: torch.Tensor | None,
    grid: list[int],
    variant: str,
    threshold_mode: str,
    axis_scale: list[float],
    row_fraction: float | None,
    window: int,
    axes: str,
    priority: str,
    text_prefix: int,
    text_suffix: int,
    reuse_q: bool,
    reuse_k: bool,
    key_merge: str = "root",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One TimeRipple attention call of any variant, opaque to ``torch.compile``.

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]` post-RoPE; v (`torch.Tensor`): `[B, S, H, Dv]`.
        theta (`torch.Tensor`): 0-d, the base threshold (a tensor, so a θ ramp does not recompile).
        groups (`torch.Tensor | None`): bool `[G, H, D]` RoPE group channels (see `group_masks`), for the stats.
        grid (`list[int]`): `(T, Hg, Wg)`.
        variant (`str`): one of ``ops.timeripple_structured.VARIANTS``.
        threshold_mode (`str`), axis_scale (`list[float]`): see ``ops.timeripple.mode_thresholds``.
        row_fraction (`float | None`): "token_rows" only (see ``structured_timeripple_attention``).
        window, priority, text_prefix, text_suffix, reuse_q, reuse_k: see ``timeripple_attention``.
        axes (`str`): the axes checked, e.g. ``"thw"``.
        key_merge (`str`): "tokens" only, the merged key (``ops.timeripple_tokens.token_dedup_attention``).

    Returns:
        out: `[B, S, H, Dv]` contiguous, `v.dtype`; stats: float64 CPU `[stats_size(len(axes), G, H)]`
        (`unpack_stats` with the group names in the order of `groups`).

    Example:
        >>> q = k = v = torch.zeros(1, 8, 2, 6)
        >>> out, st = timeripple_rows_attention(q, k, v, torch.tensor(0.5), None, [2, 2, 2], "tokens", "shared",
        ...                                     [1.0, 1.0, 1.0], None, 2, "thw", "thw", 0, 0, True, True)
        >>> unpack_stats(st, tuple("thw"), (), 2).rows_removed
        0.875
    """
    check_choice("variant", variant, VARIANTS)
    names = () if groups is None else tuple(str(i) for i in range(groups.shape[0]))
    thresholds = mode_thresholds(float(theta), q, threshold_mode, tuple(axes), tuple(axis_scale))
    kw = dict(grid=tuple(grid), thresholds=thresholds, window=window, axes=tuple(axes), priority=priority,
              text_prefix=text_prefix, text_suffix=text_suffix, reuse_q=reuse_q, reuse_k=reuse_k,
              rope_groups=None if groups is None else dict(zip(names, groups.unbind(0))))
    if variant == "tokens":
        out, stats, _ = tokens_timeripple_attention(q, k, v, key_merge=key_merge, **kw)
    else:
        out, stats = structured_timeripple_attention(q, k, v, variant=variant, row_fraction=row_fraction, **kw)
    return out.contiguous(), pack_stats(stats, tuple(axes), names, q.shape[2])


@timeripple_rows_attention.register_fake
def _(q, k, v, theta, groups, grid, variant, threshold_mode, axis_scale, row_fraction, window, axes, priority,
      text_prefix, text_suffix, reuse_q, reuse_k, key_merge="root"):
    n_groups = 0 if groups is None else groups.shape[0]
    out = v.new_empty((*q.shape[:3], v.shape[3]))
    return out, torch.empty(stats_size(len(axes), n_groups, q.shape[2]), dtype=torch.float64, device="cpu")
