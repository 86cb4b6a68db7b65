"""Structured TimeRipple: reuse that removes whole query rows and key rows, so attention really does less work.

Element-level reuse (``ops.timeripple``) only ever substitutes values (Q̃/K̃) and then runs dense attention. Two
exact identities turn *row*-level equality into less work for any SDPA kernel, per (batch, head):

- **query dedup**: rows with identical q̃ have identical output rows. Attention runs on the unique rows only and
  every duplicate gathers its root's output row.
- **key merge**: keys with identical k̃ have identical logits, so a group of ``c`` of them is one key whose value is
  the mean of their values and whose logit gets ``+ log(c)`` (an additive ``attn_mask`` bias):
  ``Σ_{j∈g} e^{s} v_j = e^{s + log c} · mean_g(v)``.

Variants (``VARIANTS``), each a decision rule followed by the same exact dedup + merge op:

- ``"exact_sim"``: the paper's element-level decisions, Q̃/K̃ then dense SDPA (``timeripple_attention``).
- ``"exact_rows"``: the same element-level decisions and the same Q̃/K̃ (so the same output up to float rounding),
  but rows that came out *entirely* equal to their window anchor's row are removed. Exact w.r.t. ``exact_sim``.
- ``"token_rows"``: decisions per (batch, token, head) row: a row reuses its whole vector from its anchor along axis
  ``a`` when at least ``row_fraction`` of its ``D`` channels pass the element criterion along ``a`` (axes tried in
  ``priority`` order; ``"min_delta"`` ranks axes by the row's mean Δ). Exact w.r.t. its own Q̃/K̃ simulation, an
  approximation of ``exact_sim`` (the error is measured, see ``benchmarks/timeripple_op.py``).

Duplicate rows are found by exact equality with the anchors (``duplicate_roots``), so the dedup never changes the
math: whatever rule produced Q̃/K̃, the structured op equals dense attention on them up to float rounding. Heads
keep different numbers of rows; the fast path pads every head to the largest count (padded keys get a ``-inf``
bias) and runs one SDPA call, so its work is ``attn_work = max_q·max_k / S²``, reported next to the true removed
fractions. Data-dependent shapes: this op syncs (``.item()``); a compiled region calls it through the opaque custom op
of ``ops.timeripple_compile``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vdit_accel.errors import ConfigError, check_choice
from vdit_accel.ops.timeripple import (
    AXES,
    MIN_DELTA,
    ReuseMasks,
    ReuseStats,
    Thresholds,
    _build_stats,
    _check_axes,
    _check_priority,
    _chosen,
    _prepare,
    resolve_reuse,
    resolve_reuse_reference,
    timeripple_attention,
    timeripple_attention_reference,
)
from vdit_accel.ops.timeripple_tokens import (
    token_decisions_reference,
    token_dedup_attention_reference,
    token_stats,
    tokens_timeripple_attention,
)

VARIANTS = ("exact_sim", "exact_rows", "token_rows", "tokens")
DEFAULT_ROW_FRACTION = 0.9


@dataclass(frozen=True)
class DedupStats:
    """What one structured attention call removed.

    Args:
        rows_removed (`float`): fraction of the `B*H*S` query rows not computed (duplicates of a root row).
        keys_removed (`float`): fraction of the `B*H*S` keys merged into another key.
        attn_work (`float`): `max_q·max_k / S²`, the share of dense score work the padded fast path runs.
    """

    rows_removed: float
    keys_removed: float
    attn_work: float


def check_row_fraction(row_fraction: float) -> float:
    if isinstance(row_fraction, bool) or not isinstance(row_fraction, int | float) or not 0.0 < row_fraction <= 1.0:
        raise ConfigError(f"row_fraction={row_fraction!r} is out of range: accepted (0.0, 1.0]")
    return float(row_fraction)


def row_masks(masks: ReuseMasks, row_fraction: float = DEFAULT_ROW_FRACTION) -> ReuseMasks:
    """Token-level decisions from element-level ones: a whole row passes axis `a` when enough channels pass it.

    Args:
        masks (`ReuseMasks`): element masks from `reuse_masks`, `[B, S, H, D]` per axis.
        row_fraction (`float`, defaults to 0.9): in `(0, 1]`; the row passes axis `a` when the fraction of its `D`
            channels passing along `a` is `>= row_fraction`.

    Returns:
        `ReuseMasks` whose masks and Δ are constant along `D` (Δ is the row mean), same anchors.

    Example:
        >>> from vdit_accel.ops.timeripple import reuse_masks
        >>> m = row_masks(reuse_masks(torch.zeros(1, 8, 1, 4), (2, 2, 2), 1.0), 0.5)
        >>> m.any[0, :, 0, 0].tolist()
        [False, True, True, True, True, True, True, True]
    """
    row_fraction = check_row_fraction(row_fraction)
    per_axis = {a: (m.float().mean(-1, keepdim=True) >= row_fraction).expand_as(m) for a, m in masks.per_axis.items()}
    delta = {a: d.mean(-1, keepdim=True).expand_as(d) for a, d in masks.delta.items()}
    return ReuseMasks(per_axis, delta, dict(masks.anchor))


def _anchor_order(masks: ReuseMasks, priority: str) -> list[torch.Tensor]:
    names = list(masks.axes) if priority == MIN_DELTA else [p for p in priority if p in masks.anchor]
    return [masks.anchor[a] for a in names]


def duplicate_roots(x: torch.Tensor, anchors: list[torch.Tensor]) -> torch.Tensor:
    """Root row of every `(b, h, s)`: follow anchors whose row is *exactly* equal, until a row with none.

    Args:
        x (`torch.Tensor`): `[B, S, H, D]`, typically a resolved Q̃ or K̃.
        anchors (`list[torch.Tensor]`): `[S]` long anchor indices (e.g. `ReuseMasks.anchor` values), tried in order;
            an anchor must precede its token (`anchor[s] <= s`), `anchor[s] == s` means none.

    Returns:
        `[B, H, S]` long: `root[b, h, s] <= s`, `x[b, root, h] == x[b, s, h]` exactly, `root[root] == root`.

    Example:
        >>> x = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(1, 4, 1, 1)
        >>> duplicate_roots(x, [torch.tensor([0, 0, 2, 2]), torch.tensor([0, 1, 0, 1])]).flatten().tolist()
        [0, 0, 2, 2]
    """
    b, s, h, _ = x.shape
    ar = torch.arange(s, device=x.device)
    parent = ar.view(1, 1, s).expand(b, h, s).clone()
    for anchor in anchors:
        anchor = anchor.to(x.device)
        if anchor.shape != (s,) or bool((anchor > ar).any()):
            raise ConfigError(f"anchor of shape {tuple(anchor.shape)} is not accepted: expected [S={s}], anchor <= s")
        equal = (x == x.index_select(1, anchor)).all(-1).permute(0, 2, 1) & (anchor != ar)  # [B, H, S]
        parent = torch.where(equal & (parent == ar), anchor.expand(b, h, s), parent)
    for _ in range(s):  # pointer jumping to the fixed point (chains are at most len(anchors) long)
        nxt = parent.gather(2, parent)
        if torch.equal(nxt, parent):
            return parent
        parent = nxt
    raise ConfigError("anchors form a cycle")  # pragma: no cover - anchors precede their tokens


def row_roots(masks: ReuseMasks, priority: str = "thw") -> torch.Tensor:
    """Roots of row-level decisions (`row_masks`) without resolving: follow each reused row's chosen anchor.

    A root is a row that reuses nothing, so its resolved value is its own value: attention on the roots can read the
    unresolved tensor (what the fast path of `"token_rows"` does; no Q̃/K̃ is materialised).

    Args:
        masks (`ReuseMasks`): row-level masks (constant along `D`), see `row_masks`.
        priority (`str`, defaults to `"thw"`): see `resolve_reuse`.

    Returns:
        `[B, H, S]` long roots, as `duplicate_roots` on the resolved tensor (up to coincidental equal rows).

    Example:
        >>> from vdit_accel.ops.timeripple import reuse_masks
        >>> row_roots(row_masks(reuse_masks(torch.zeros(1, 8, 1, 2), (2, 2, 2), 1.0))).flatten().tolist()
        [0, 0, 0, 0, 0, 0, 0, 0]
    """
    _check_priority(priority, masks.axes)
    chosen = _chosen(masks, priority)
    first = next(iter(chosen.values()))
    b, s, h, _ = first.shape
    ar = torch.arange(s, device=first.device)
    parent = ar.view(1, 1, s).expand(b, h, s)
    for a, m in chosen.items():
        parent = torch.where(m[..., 0].permute(0, 2, 1), masks.anchor[a].to(first.device).expand(b, h, s), parent)
    for _ in range(s):
        nxt = parent.gather(2, parent)
        if torch.equal(nxt, parent):
            return parent
        parent = nxt
    raise ConfigError("anchors form a cycle")  # pragma: no cover - anchors precede their tokens


def _check_roots(root: torch.Tensor, b: int, h: int, s: int, name: str) -> None:
    ar = torch.arange(s, device=root.device)
    if root.shape != (b, h, s) or root.dtype != torch.long:
        raise ConfigError(f"{name}.shape={tuple(root.shape)} is not accepted: expected long [B, H, S]=[{b}, {h}, {s}]")
    if bool((root > ar).any()) or bool((root < 0).any()) or not torch.equal(root.gather(2, root), root):
        raise ConfigError(f"{name} is not accepted: roots must satisfy 0 <= root[s] <= s and root[root] == root")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ConfigError(
            f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} are not accepted: expected "
            "q and k [B, S, H, D] and v [B, S, H, Dv]"
        )


def dedup_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_root: torch.Tensor,
    k_root: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, DedupStats]:
    """Attention computed on unique query rows against merged keys (one padded SDPA call), scattered back.

    Exact when every row equals its root row (`duplicate_roots` guarantees it): equals dense attention on `q, k, v`
    up to float rounding (the merged value means and the `log(count)` bias are the only reordering).

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]`.
        v (`torch.Tensor`): `[B, S, H, Dv]`.
        q_root, k_root (`torch.Tensor`): `[B, H, S]` long roots (see `duplicate_roots`); the identity removes nothing.
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.

    Returns:
        out: `[B, S, H, Dv]` in `v.dtype`.
        stats (`DedupStats`): removed fractions and the padded work share.

    Example:
        >>> q = k = v = torch.ones(1, 4, 1, 2)
        >>> root = torch.zeros(1, 1, 4, dtype=torch.long)
        >>> out, st = dedup_attention(q, k, v, root, root)
        >>> torch.allclose(out, v), st.rows_removed, st.keys_removed
        (True, 0.75, 0.75)
    """
    _check_qkv(q, k, v)
    b, s, h, d = q.shape
    _check_roots(q_root, b, h, s, "q_root")
    _check_roots(k_root, b, h, s, "k_root")
    ar = torch.arange(s, device=q.device)
    q_is, k_is = q_root == ar, k_root == ar  # [B, H, S]
    nq, nk = q_is.sum(-1), k_is.sum(-1)
    mq, mk = int(nq.max()), int(nk.max())
    q_order = torch.argsort((~q_is).to(torch.int8), dim=-1, stable=True)[..., :mq]  # roots first, in token order
    k_order = torch.argsort((~k_is).to(torch.int8), dim=-1, stable=True)[..., :mk]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, *]
    q_u = qh.gather(2, q_order.unsqueeze(-1).expand(b, h, mq, d))
    k_u = kh.gather(2, k_order.unsqueeze(-1).expand(b, h, mk, d))
    merged = bool((nk < s).any())
    if merged:
        acc = torch.promote_types(v.dtype, torch.float32)
        ones = torch.ones_like(k_root, dtype=acc)
        count = torch.zeros(b, h, s, dtype=acc, device=v.device).scatter_add_(2, k_root, ones)
        v_sum = torch.zeros(vh.shape, dtype=acc, device=v.device).scatter_add_(
            2, k_root.unsqueeze(-1).expand(vh.shape), vh.to(acc)
        )
        c_u = count.gather(2, k_order)  # 0 on padded (non-root) keys
        v_u = (v_sum.gather(2, k_order.unsqueeze(-1).expand(b, h, mk, v.shape[-1])) / c_u.clamp_min(1).unsqueeze(-1))
        v_u = v_u.to(v.dtype)
        bias = c_u.log().to(q.dtype).unsqueeze(2)  # [B, H, 1, mk]: log(count), -inf on padding
    else:
        v_u, bias = vh.gather(2, k_order.unsqueeze(-1).expand(b, h, mk, v.shape[-1])), None
    out_u = F.scaled_dot_product_attention(q_u, k_u, v_u, attn_mask=bias, scale=scale)  # [B, H, mq, Dv]
    pos = torch.zeros(b, h, s, dtype=torch.long, device=q.device)
    pos.scatter_(2, q_order, torch.arange(mq, device=q.device).expand(b, h, mq))
    out = out_u.gather(2, pos.gather(2, q_root).unsqueeze(-1).expand(b, h, s, v.shape[-1]))
    total = b * h * s
    stats = DedupStats(1.0 - int(nq.sum()) / total, 1.0 - int(nk.sum()) / total, mq * mk / (s * s))
    return out.transpose(1, 2), stats


def dedup_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_root: torch.Tensor,
    k_root: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, DedupStats]:
    """Plain-PyTorch twin of `dedup_attention`: one (batch, head) at a time, explicit float64 softmax.

    Example:
        >>> q = k = v = torch.ones(1, 4, 1, 2)
        >>> root = torch.zeros(1, 1, 4, dtype=torch.long)
        >>> torch.allclose(dedup_attention_reference(q, k, v, root, root)[0], v)
        True
    """
    _check_qkv(q, k, v)
    b, s, h, d = q.shape
    _check_roots(q_root, b, h, s, "q_root")
    _check_roots(k_root, b, h, s, "k_root")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty(b, s, h, v.shape[-1], dtype=torch.float64)
    n_rows = n_keys = 0
    for bi in range(b):
        for hi in range(h):
            qr, kr = q_root[bi, hi].tolist(), k_root[bi, hi].tolist()
            rows = sorted(set(qr))
            keys = sorted(set(kr))
            n_rows, n_keys = n_rows + len(rows), n_keys + len(keys)
            count = torch.tensor([kr.count(j) for j in keys], dtype=torch.float64)
            v_mean = torch.stack([v[bi, [i for i in range(s) if kr[i] == j], hi].double().mean(0) for j in keys])
            scores = q[bi, rows, hi].double() @ k[bi, keys, hi].double().T * scale + count.log()
            o = scores.softmax(-1) @ v_mean
            for i in range(s):
                out[bi, i, hi] = o[rows.index(qr[i])]
    total = b * h * s
    stats = DedupStats(1.0 - n_rows / total, 1.0 - n_keys / total, float("nan"))
    return out.to(device=v.device, dtype=v.dtype), stats


def _structured(resolver, attention, fallback, q, k, v, *, grid, thresholds, variant, row_fraction, window, axes,
                priority, text_prefix, text_suffix, reuse_q, reuse_k, scale, rope_groups):
    check_choice("variant", variant, VARIANTS)
    if variant == "tokens":
        if row_fraction is not None:
            raise ConfigError(f"row_fraction={row_fraction!r} is not accepted with variant='tokens'")
        kw = dict(grid=grid, window=window, axes=axes, priority=priority, text_prefix=text_prefix,
                  text_suffix=text_suffix)
        if attention is dedup_attention:
            out, stats, _ = tokens_timeripple_attention(q, k, v, thresholds=thresholds, reuse_q=reuse_q,
                                                        reuse_k=reuse_k, scale=scale, rope_groups=rope_groups, **kw)
            return out, stats
        dec = token_decisions_reference([x for x, on in ((q, reuse_q), (k, reuse_k)) if on], theta=thresholds, **kw)
        qr, kr = (dec.root if reuse_q else None), (dec.root if reuse_k else None)
        out = token_dedup_attention_reference(q, k, v, qr, kr, scale=scale)
        _, dstats = dedup_attention(q, k, v, *(  # removed fractions only; the output comes from the reference
            torch.arange(q.shape[1]).expand(q.shape[0], q.shape[2], -1) if r is None else
            r[:, None, :].expand(-1, q.shape[2], -1).contiguous() for r in (qr, kr)), scale=scale)
        return out, token_stats(dec, q.shape, _check_axes(axes), reuse_q, reuse_k, dstats, rope_groups)
    row_fraction = check_row_fraction(DEFAULT_ROW_FRACTION if row_fraction is None else row_fraction)
    q_masks = k_masks = None
    if variant != "exact_sim":
        q_masks, k_masks = _prepare(
            q, k, v, grid, thresholds, window, axes, priority, text_prefix, text_suffix, reuse_q, reuse_k
        )
    if q_masks is None and k_masks is None:  # exact_sim, or nothing reused (every threshold 0)
        return fallback(
            q, k, v, grid=grid, thresholds=thresholds, window=window, axes=axes, priority=priority,
            text_prefix=text_prefix, text_suffix=text_suffix, reuse_q=reuse_q, reuse_k=reuse_k, scale=scale,
            rope_groups=rope_groups,
        )
    if variant == "token_rows":
        q_masks = None if q_masks is None else row_masks(q_masks, row_fraction)
        k_masks = None if k_masks is None else row_masks(k_masks, row_fraction)
    b, s, h, _ = q.shape
    identity = torch.arange(s, device=q.device).expand(b, h, s)
    if variant == "token_rows" and attention is dedup_attention:  # roots reuse nothing: no Q̃/K̃ needed
        qt, kt = q, k
        q_root = identity if q_masks is None else row_roots(q_masks, priority)
        k_root = identity if k_masks is None else row_roots(k_masks, priority)
    else:
        qt = q if q_masks is None else resolver(q, q_masks, priority=priority)
        kt = k if k_masks is None else resolver(k, k_masks, priority=priority)
        q_root = identity if q_masks is None else duplicate_roots(qt, _anchor_order(q_masks, priority))
        k_root = identity if k_masks is None else duplicate_roots(kt, _anchor_order(k_masks, priority))
    out, dstats = attention(qt, kt, v, q_root, k_root, scale=scale)
    stats = _build_stats(q_masks, k_masks, q.shape, _check_axes(axes), rope_groups)
    stats = dataclasses.replace(stats, rows_removed=dstats.rows_removed, keys_removed=dstats.keys_removed,
                                attn_work=dstats.attn_work)
    return out, stats


def structured_timeripple_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    thresholds: Thresholds,
    variant: str = "exact_rows",
    row_fraction: float | None = None,
    window: int = 2,
    axes: tuple[str, ...] = AXES,
    priority: str = "thw",
    text_prefix: int = 0,
    text_suffix: int = 0,
    reuse_q: bool = True,
    reuse_k: bool = True,
    scale: float | None = None,
    rope_groups: dict[str, slice] | None = None,
) -> tuple[torch.Tensor, ReuseStats]:
    """TimeRipple with structured removal of duplicate query rows and keys (see the module docstring).

    With every threshold 0, or `variant="exact_sim"`, this is `timeripple_attention` (bit for bit).

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]` post-RoPE queries and keys.
        v (`torch.Tensor`): `[B, S, H, Dv]` values.
        grid, thresholds, window, axes, priority, text_prefix, text_suffix, reuse_q, reuse_k, scale, rope_groups:
            see `timeripple_attention`.
        variant (`str`, defaults to `"exact_rows"`): one of `VARIANTS`.
        row_fraction (`float | None`, defaults to `None`): for `"token_rows"`, in `(0, 1]`; `None` is
            `DEFAULT_ROW_FRACTION`. Validated for every variant, used by `"token_rows"` only.

    Returns:
        out: `[B, S, H, Dv]`, same dtype as `v`.
        stats (`ReuseStats`): reuse fractions of the decisions taken, and `rows_removed`, `keys_removed`, `attn_work`.

    Example:
        >>> q = k = v = torch.zeros(1, 8, 2, 6)
        >>> out, st = structured_timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=1.0, variant="token_rows")
        >>> st.rows_removed, st.keys_removed
        (0.875, 0.875)
    """
    return _structured(
        resolve_reuse, dedup_attention, timeripple_attention, q, k, v, grid=grid, thresholds=thresholds,
        variant=variant, row_fraction=row_fraction, window=window, axes=axes, priority=priority,
        text_prefix=text_prefix, text_suffix=text_suffix, reuse_q=reuse_q, reuse_k=reuse_k, scale=scale,
        rope_groups=rope_groups,
    )


def structured_timeripple_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    thresholds: Thresholds,
    variant: str = "exact_rows",
    row_fraction: float | None = None,
    window: int = 2,
    axes: tuple[str, ...] = AXES,
    priority: str = "thw",
    text_prefix: int = 0,
    text_suffix: int = 0,
    reuse_q: bool = True,
    reuse_k: bool = True,
    scale: float | None = None,
    rope_groups: dict[str, slice] | None = None,
) -> tuple[torch.Tensor, ReuseStats]:
    """Reference twin of `structured_timeripple_attention`: loop resolver and per-head float64 dedup (small sizes).

    Example:
        >>> q = k = v = torch.randn(1, 8, 2, 6, dtype=torch.float64)
        >>> fast, _ = structured_timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=0.5)
        >>> ref, _ = structured_timeripple_attention_reference(q, k, v, grid=(2, 2, 2), thresholds=0.5)
        >>> torch.allclose(fast, ref)
        True
    """
    return _structured(
        resolve_reuse_reference, dedup_attention_reference, timeripple_attention_reference, q, k, v, grid=grid,
        thresholds=thresholds, variant=variant, row_fraction=row_fraction, window=window, axes=axes, priority=priority,
        text_prefix=text_prefix, text_suffix=text_suffix, reuse_q=reuse_q, reuse_k=reuse_k, scale=scale,
        rope_groups=rope_groups,
    )
