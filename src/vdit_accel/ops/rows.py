"""Gathering and scattering token rows: what every row-subset method (Astraea's selected rows) does per block call.

``torch.gather`` / ``Tensor.scatter_`` address every element through an index tensor as large as the rows;
here a row is one contiguous slice, so the flattened ``index_select`` / ``index_copy_`` copy it whole (on a 2-core
CPU at 819 of 2048 rows of dim 128: 14 µs against 117 µs for the gather, 45 µs against 132 µs for the scatter).
The values are the same bits: both move data, neither computes. Each op has its ``torch.gather`` /
``torch.scatter`` twin (``*_reference``), which also takes the inputs the fast path does not (non-contiguous).

Shapes: ``x`` is `[B, N, ...]` (any trailing dims, or none), ``idx`` is `[B, k]` long with each row's indices
distinct and in ``[0, N)`` (as :func:`vdit_accel.ops.astraea.select_topk` returns them). ``x`` with ``B = 1`` and
``idx`` with ``B > 1`` broadcasts ``x`` over the batch (rotary tables are `[1, N, 1, D]`).
"""

from __future__ import annotations

import torch

from vdit_accel.errors import ConfigError


def _check(x: torch.Tensor, idx: torch.Tensor) -> None:
    if x.dim() < 2 or idx.dim() != 2 or x.shape[0] not in (1, idx.shape[0]) or idx.dtype != torch.long:
        raise ConfigError(f"x.shape={tuple(x.shape)}, idx.shape={tuple(idx.shape)}, idx.dtype={idx.dtype} are not "
                          "accepted: expected x [B or 1, N, ...] and idx [B, k] torch.long")


def _flat(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Row offsets `[B·k]` of ``idx`` `[B, k]` into a `[B·N, ...]` view (no offset needed for one batch row)."""
    if idx.shape[0] == 1:
        return idx.reshape(-1)
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * n).reshape(-1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``x``: ``out[b, j] = x[b, idx[b, j]]``.

    Args:
        x (`torch.Tensor` of shape `[B, N, ...]` or `[1, N, ...]`): source rows.
        idx (`torch.Tensor` of shape `[B, k]`, long): row indices in ``[0, N)``.

    Returns:
        `torch.Tensor` of shape `[B, k, ...]`, a new contiguous tensor.

    Example:
        >>> gather_rows(torch.arange(6.0).view(1, 3, 2), torch.tensor([[2, 0]])).tolist()
        [[[4.0, 5.0], [0.0, 1.0]]]
    """
    _check(x, idx)
    if not x.is_contiguous():
        return gather_rows_reference(x, idx)
    b, k = idx.shape
    rest = x.shape[2:]
    if x.shape[0] == 1:  # one source row set, shared by every batch row
        return x[0].index_select(0, idx.reshape(-1)).view(b, k, *rest)
    return x.reshape(b * x.shape[1], *rest).index_select(0, _flat(idx, x.shape[1])).view(b, k, *rest)


def gather_rows_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:func:`gather_rows` with ``torch.gather`` (any strides)."""
    _check(x, idx)
    if x.shape[0] == 1 and idx.shape[0] > 1:
        x = x.expand(idx.shape[0], *x.shape[1:])
    shape = idx.shape + (1,) * (x.dim() - 2)
    return torch.gather(x, 1, idx.view(shape).expand(*idx.shape, *x.shape[2:]))


def scatter_rows_(dst: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write ``rows`` into ``dst`` in place at ``idx``: ``dst[b, idx[b, j]] = rows[b, j]``; returns ``dst``.

    Args:
        dst (`torch.Tensor` of shape `[B, N, ...]`): destination, written in place.
        idx (`torch.Tensor` of shape `[B, k]`, long): distinct row indices per batch row, in ``[0, N)``.
        rows (`torch.Tensor` of shape `[B, k, ...]`): the rows, cast to ``dst``'s dtype.

    Example:
        >>> scatter_rows_(torch.zeros(1, 3), torch.tensor([[2]]), torch.tensor([[7.0]])).tolist()
        [[0.0, 0.0, 7.0]]
    """
    _check(dst, idx)
    if dst.shape[0] != idx.shape[0] or tuple(rows.shape) != tuple(idx.shape) + tuple(dst.shape[2:]):
        raise ConfigError(f"dst.shape={tuple(dst.shape)}, idx.shape={tuple(idx.shape)}, rows.shape="
                          f"{tuple(rows.shape)} are not accepted: expected [B, N, ...], [B, k], [B, k, ...]")
    if not dst.is_contiguous():
        return scatter_rows_reference_(dst, idx, rows)
    b, k = idx.shape
    rest = dst.shape[2:]
    dst.view(b * dst.shape[1], *rest).index_copy_(0, _flat(idx, dst.shape[1]),
                                                  rows.to(dst.dtype).reshape(b * k, *rest))
    return dst


def scatter_rows_reference_(dst: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """:func:`scatter_rows_` with ``Tensor.scatter_`` (any strides)."""
    shape = idx.shape + (1,) * (dst.dim() - 2)
    return dst.scatter_(1, idx.view(shape).expand(*idx.shape, *dst.shape[2:]), rows.to(dst.dtype))
