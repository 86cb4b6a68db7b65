"""TimeRipple: channel-wise partial attention-score reuse, as pure tensor functions.

A query (or key) element ``x[b, s, h, c]`` is *reusable along axis a* (``t``, ``h`` or ``w``) when the token lies in a
non-overlapping window of ``window`` tokens along ``a`` (of size >= 2), is not the window's first token, and the
windowed population std ``Δ`` of channel ``c`` (paper Eq. 3) is below the axis threshold. A reused element takes the
partial scores ``q_ic·k_jc`` of its window's first token. That is exactly ordinary attention on "resolved" copies
``q̃, k̃`` in which every reused element holds its source's (resolved) value, so the fast path is resolve + SDPA and
the savings are counted analytically from the masks ("QK savings", never a speedup).

Layout: ``[B, S, H, D]`` post-RoPE tensors (diffusers). Video tokens are frame-major raster,
``index = text_prefix + t*Hg*Wg + h*Wg + w`` over ``grid = (T, Hg, Wg)``; text tokens (``text_prefix`` before,
``text_suffix`` after) are never reused and never sources. Every op has a plain-PyTorch ``*_reference`` twin.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vdit_accel.errors import ConfigError, check_choice, check_range

AXES = ("t", "h", "w")
MIN_DELTA = "min_delta"
_REFERENCE_MAX_ELEMENTS = 1 << 22  # B*H*S*S*D cap for the explicit partial-score tensor (32 MiB at float64)

Thresholds = float | dict[str, float] | torch.Tensor
RopeGroup = slice | torch.Tensor
"""The channels of one RoPE group: a slice of the head dim (the same channels in every head), or a bool `[H, D]`
mask (a family whose axes interleave differently per head, e.g. LTX-Video)."""
THRESHOLD_MODES = ("shared", "per_axis", "per_channel")


def _check_int(name: str, value: int, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} is not accepted: expected an int in [{lo}, inf)")
    check_range(name, value, lo=lo)
    return value


def _check_layout(x: torch.Tensor, grid, text_prefix: int, text_suffix: int) -> tuple[int, int, int]:
    _check_int("text_prefix", text_prefix, 0)
    _check_int("text_suffix", text_suffix, 0)
    if x.dim() != 4:
        raise ConfigError(f"x.shape={tuple(x.shape)} is not accepted: expected 4 dims [B, S, H, D]")
    grid = tuple(grid)
    if len(grid) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in grid):
        raise ConfigError(f"grid={grid!r} is not accepted: expected three positive ints (T, Hg, Wg)")
    need = text_prefix + math.prod(grid) + text_suffix
    if x.shape[1] != need:
        raise ConfigError(
            f"grid={grid} with text_prefix={text_prefix} and text_suffix={text_suffix} needs S={need} tokens, "
            f"got S={x.shape[1]}"
        )
    return grid


def _check_axes(axes) -> tuple[str, ...]:
    axes = tuple(axes)
    if not axes or len(set(axes)) != len(axes) or any(a not in AXES for a in axes):
        raise ConfigError(f"axes={axes!r} is not accepted: use distinct axis names from {list(AXES)}")
    return axes


def _check_priority(priority: str, axes: tuple[str, ...]) -> None:
    ordering = isinstance(priority, str) and len(set(priority)) == len(priority)
    if priority != MIN_DELTA and not (ordering and set(axes) <= set(priority) <= set(AXES)):
        raise ConfigError(
            f"priority={priority!r} is not accepted: use {MIN_DELTA!r} or an ordering of {''.join(AXES)!r} "
            f"that covers axes {list(axes)}"
        )


def _theta_per_axis(thresholds: Thresholds, axes: tuple[str, ...], d: int) -> dict[str, float | torch.Tensor]:
    """Validate ``thresholds`` and return one float, or one ``[D]`` tensor, per axis."""
    if isinstance(thresholds, torch.Tensor) and thresholds.dim() == 0:  # one θ, kept on the device (compile path)
        if not torch.compiler.is_compiling() and not bool(thresholds >= 0):  # validated on the host when traced
            raise ConfigError(f"thresholds={thresholds.item()!r} is out of range: accepted [0.0, inf]")
        return dict.fromkeys(axes, thresholds)
    if isinstance(thresholds, torch.Tensor):
        if tuple(thresholds.shape) != (len(axes), d):
            raise ConfigError(
                f"thresholds.shape={tuple(thresholds.shape)} is not accepted: expected [len(axes), D] = "
                f"[{len(axes)}, {d}]"
            )
        bad = None if torch.compiler.is_compiling() else thresholds[thresholds.isnan() | (thresholds < 0)]
        if bad is not None and bad.numel():
            raise ConfigError(f"thresholds contains {bad[0].item()!r}, out of range: accepted [0.0, inf]")
        return {a: thresholds[i] for i, a in enumerate(axes)}
    if isinstance(thresholds, dict):
        if set(thresholds) != set(axes):
            raise ConfigError(
                f"thresholds keys {sorted(thresholds)} are not accepted: give one threshold per axis of {list(axes)}"
            )
        named = {a: (f"thresholds[{a!r}]", thresholds[a]) for a in axes}
    else:
        named = {a: ("thresholds", thresholds) for a in axes}
    for name, value in named.values():
        if not float(value) >= 0.0:  # also rejects NaN
            raise ConfigError(f"{name}={value!r} is out of range: accepted [0.0, inf]")
    return {a: float(value) for a, (_, value) in named.items()}


@torch.compiler.disable
def _all_zero(thetas: dict[str, float | torch.Tensor]) -> bool:
    return all(bool((t == 0).all()) if isinstance(t, torch.Tensor) else t == 0.0 for t in thetas.values())


def _window_geometry(grid, axis: str, window: int, text_prefix: int, text_suffix: int, device):
    n = math.prod(grid)
    a = AXES.index(axis)
    stride = math.prod(grid[a + 1 :])
    idx = torch.arange(n, device=device)
    c = (idx // stride) % grid[a]
    start = c - c % window  # a window of size 1 holds only its first token, so `c != start` marks sizes >= 2
    anchor = torch.arange(text_prefix + n + text_suffix, device=device)
    anchor[text_prefix : text_prefix + n] = idx - (c - start) * stride + text_prefix
    valid = torch.zeros(anchor.shape, dtype=torch.bool, device=device)
    valid[text_prefix : text_prefix + n] = c != start
    return anchor, valid


def window_delta(
    x: torch.Tensor, grid: tuple[int, int, int], axis: str, window: int = 2, text_prefix: int = 0, text_suffix: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windowed population std Δ (paper Eq. 3) of every element along one token axis.

    Windows are non-overlapping: ``[0..K-1], [K..2K-1], ...`` along ``axis``; a trailing partial window uses its actual
    size, and a window of size 1 has no reuse. For ``K = 2``, ``Δ = |a0 - a1| / 2``.

    Args:
        x (`torch.Tensor`): `[B, S, H, D]` post-RoPE queries or keys.
        grid (`tuple[int, int, int]`): video token grid `(T, Hg, Wg)`; `S = text_prefix + T*Hg*Wg + text_suffix`.
        axis (`str`): one of `AXES`.
        window (`int`, defaults to 2): window size K, in `[2, inf)`.
        text_prefix (`int`, defaults to 0): text tokens before the video tokens.
        text_suffix (`int`, defaults to 0): text tokens after the video tokens.

    Returns:
        delta: `[B, S, H, D]` in float32 (float64 if `x` is float64), 0 on text tokens.
        anchor_index: `[S]` long, token index of the window's first token (the reuse source); itself for text.
        valid: `[S]` bool, the token is in a window of size >= 2 and is not its first token.

    Example:
        >>> x = torch.tensor([0.0, 1.0, 5.0]).view(1, 3, 1, 1)
        >>> delta, anchor, valid = window_delta(x, (1, 1, 3), "w")
        >>> delta.flatten().tolist(), anchor.tolist(), valid.tolist()
        ([0.5, 0.5, 0.0], [0, 0, 2], [False, True, False])
    """
    grid = _check_layout(x, grid, text_prefix, text_suffix)
    check_choice("axis", axis, AXES)
    window = _check_int("window", window, 2)
    a, n = AXES.index(axis), math.prod(grid)
    size, nw = grid[a], -(-grid[a] // window)
    dtype = torch.promote_types(x.dtype, torch.float32)
    v = x[:, text_prefix : text_prefix + n].to(dtype).unflatten(1, grid).movedim(1 + a, 1)  # [B, n_a, ..., H, D]
    v = torch.cat([v, v.new_zeros((v.shape[0], nw * window - size, *v.shape[2:]))], dim=1).unflatten(1, (nw, window))
    member = (torch.arange(nw * window, device=x.device) < size).to(dtype).view(nw, window, *[1] * (v.dim() - 3))
    count = member.sum(1, keepdim=True)
    mean = (v * member).sum(2, keepdim=True) / count
    delta = ((((v - mean) ** 2) * member).sum(2, keepdim=True) / count).sqrt().expand_as(v)
    out = x.new_zeros(x.shape, dtype=dtype)
    out[:, text_prefix : text_prefix + n] = delta.flatten(1, 2)[:, :size].movedim(1, 1 + a).flatten(1, 3)
    anchor, valid = _window_geometry(grid, axis, window, text_prefix, text_suffix, x.device)
    return out, anchor, valid


@dataclass(frozen=True)
class ReuseMasks:
    """Per-axis reuse decisions for one tensor (queries or keys).

    Args:
        per_axis (`dict[str, torch.Tensor]`): axis -> `[B, S, H, D]` bool, valid and `Δ < θ` along that axis.
        delta (`dict[str, torch.Tensor]`): axis -> `[B, S, H, D]` windowed std Δ.
        anchor (`dict[str, torch.Tensor]`): axis -> `[S]` long, the reuse source token along that axis.
    """

    per_axis: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.per_axis)

    @property
    def any(self) -> torch.Tensor:
        """`[B, S, H, D]` bool: the element is reused along at least one axis (the paper's OR aggregation)."""
        return functools.reduce(torch.logical_or, self.per_axis.values())


def reuse_masks(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    thresholds: Thresholds,
    *,
    window: int = 2,
    axes: tuple[str, ...] = AXES,
    text_prefix: int = 0,
    text_suffix: int = 0,
) -> ReuseMasks:
    """Which elements of `x` may reuse partial scores, per axis: valid (see `window_delta`) and `Δ < θ` (strict).

    Args:
        x (`torch.Tensor`): `[B, S, H, D]` post-RoPE queries or keys.
        grid (`tuple[int, int, int]`): `(T, Hg, Wg)`.
        thresholds (`float | dict[str, float] | torch.Tensor`): θ >= 0 shared by all axes, one per axis, a 0-d
            tensor (one θ on the device: no host sync, no recompile per value), or a `[len(axes), D]` tensor (per axis
            and channel); tensors are validated on the host only (not while ``torch.compile`` traces). θ = 0 reuses
            nothing; θ = inf reuses every valid element.
        window (`int`, defaults to 2): window size K.
        axes (`tuple[str, ...]`, defaults to `AXES`): axes checked, distinct names from `AXES`.
        text_prefix (`int`, defaults to 0), text_suffix (`int`, defaults to 0): text token counts.

    Example:
        >>> m = reuse_masks(torch.zeros(1, 8, 1, 2), (2, 2, 2), float("inf"))
        >>> m.any.float().mean().item()
        0.875
    """
    axes = _check_axes(axes)
    _check_layout(x, grid, text_prefix, text_suffix)
    window = _check_int("window", window, 2)
    thetas = _theta_per_axis(thresholds, axes, x.shape[-1])
    per_axis, deltas, anchors = {}, {}, {}
    for a in axes:
        delta, anchor, valid = window_delta(x, grid, a, window, text_prefix, text_suffix)
        theta = thetas[a].to(delta) if isinstance(thetas[a], torch.Tensor) else thetas[a]
        per_axis[a] = valid.view(1, -1, 1, 1) & (delta < theta)
        deltas[a], anchors[a] = delta, anchor
    return ReuseMasks(per_axis, deltas, anchors)


def _chosen(masks: ReuseMasks, priority: str) -> dict[str, torch.Tensor]:
    """Mutually exclusive `[B, S, H, D]` masks: the axis each reused element takes its value from."""
    if priority == MIN_DELTA:
        stacked = torch.stack([torch.where(masks.per_axis[a], masks.delta[a], float("inf")) for a in masks.axes])
        winner, reused = stacked.argmin(0), masks.any  # argmin returns the first minimum: ties go to `axes` order
        return {a: reused & (winner == i) for i, a in enumerate(masks.axes)}
    out, taken = {}, None
    for a in (p for p in priority if p in masks.per_axis):
        m = masks.per_axis[a]
        out[a] = m if taken is None else m & ~taken
        taken = m if taken is None else taken | m
    return out


@torch.compiler.disable
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def resolve_reuse(x: torch.Tensor, masks: ReuseMasks, *, priority: str = "thw") -> torch.Tensor:
    """Substitute each reused element by its source's resolved value, so attention on the result reuses scores.

    A source may itself reuse along another axis; iterating ``x̃ = where(chosen_a, x̃[anchor_a], x)`` reaches a
    fixed point in at most ``len(axes)`` hops (anchors are window-first tokens, so each axis is used once per chain).

    Args:
        x (`torch.Tensor`): `[B, S, H, D]`.
        masks (`ReuseMasks`): from `reuse_masks(x, ...)`.
        priority (`str`, defaults to `"thw"`): an ordering of the axes (first wins when several pass) or
            `"min_delta"` (the passing axis with the smallest Δ wins; ties go to `masks.axes` order).

    Returns:
        `[B, S, H, D]` resolved tensor, same dtype as `x`.

    Example:
        >>> x = torch.arange(8.0).view(1, 8, 1, 1)
        >>> resolve_reuse(x, reuse_masks(x, (2, 2, 2), float("inf"))).flatten().tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    _check_priority(priority, masks.axes)
    chosen = _chosen(masks, priority)
    out = x
    if torch.compiler.is_compiling():  # no data-dependent exit in a graph: every hop (idempotent at the fixed point)
        for _ in range(len(chosen) + 1):
            nxt = x
            for a, m in chosen.items():
                nxt = torch.where(m, out.index_select(1, masks.anchor[a]), nxt)
            out = nxt
        return out
    for _ in range(len(chosen) + 1):
        nxt = x
        for a, m in chosen.items():
            nxt = torch.where(m, out.index_select(1, masks.anchor[a]), nxt)
        if _same(nxt, out):
            return nxt
        out = nxt
    raise ConfigError(f"masks do not resolve within {len(chosen) + 1} hops: anchors form a cycle or too long a chain")


def resolve_reuse_reference(x: torch.Tensor, masks: ReuseMasks, *, priority: str = "thw") -> torch.Tensor:
    """Plain-Python twin of `resolve_reuse`: follows each element's chain token by token (small sizes only).

    Example:
        >>> x = torch.arange(8.0).view(1, 8, 1, 1)
        >>> m = reuse_masks(x, (2, 2, 2), float("inf"))
        >>> torch.equal(resolve_reuse_reference(x, m), resolve_reuse(x, m))
        True
    """
    _check_priority(priority, masks.axes)
    order = list(masks.axes) if priority == MIN_DELTA else [p for p in priority if p in masks.per_axis]
    passes = {a: masks.per_axis[a].tolist() for a in order}
    deltas = {a: masks.delta[a].tolist() for a in order}
    anchors = {a: masks.anchor[a].tolist() for a in order}
    values = x.tolist()
    b_, s_, h_, d_ = x.shape
    out = [[[[0.0] * d_ for _ in range(h_)] for _ in range(s_)] for _ in range(b_)]
    for b, s, h, d in itertools.product(range(b_), range(s_), range(h_), range(d_)):
        cur = s
        for _ in range(len(order) + 1):
            passing = [a for a in order if passes[a][b][cur][h][d]]
            if not passing:
                break
            if priority == MIN_DELTA:
                source_axis = min(passing, key=lambda a: deltas[a][b][cur][h][d])
            else:
                source_axis = passing[0]
            cur = anchors[source_axis][cur]
        else:
            raise ConfigError(f"element (b={b}, s={s}, h={h}, d={d}) does not resolve within {len(order)} hops")
        out[b][s][h][d] = values[b][cur][h][d]
    return torch.tensor(out, dtype=x.dtype, device=x.device)


def _source_index(masks: ReuseMasks | None, priority: str, shape: torch.Size) -> torch.Tensor:
    """`[B, H, D, S]` long: the one-hop source token of each element (itself when not reused)."""
    s = shape[1]
    src = torch.arange(s).view(1, s, 1, 1).expand(shape)
    if masks is not None:
        _check_priority(priority, masks.axes)
        for a, m in _chosen(masks, priority).items():
            src = torch.where(m.cpu(), masks.anchor[a].cpu().view(1, s, 1, 1), src)
    if bool((src > torch.arange(s).view(1, s, 1, 1)).any()):
        raise ConfigError("masks are not accepted: a reuse source must precede its token (anchor <= token index)")
    return src.permute(0, 2, 3, 1)


def partial_score_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_masks: ReuseMasks | None,
    k_masks: ReuseMasks | None,
    *,
    priority: str = "thw",
    scale: float | None = None,
) -> torch.Tensor:
    """The paper's literal scheme: an explicit partial-score tensor `P[b, h, i, j, c]`, float64, small sizes only.

    Non-reused `(i, c)` and `(j, c)` get `q_ic·k_jc`; a reused query element copies row `i'` of its source (same `j`,
    `c`), a reused key element copies column `j'`. Sources precede their tokens, so columns then rows are filled in
    increasing token order. Then `S_ij = Σ_c P_ijc` and `softmax(S·scale) @ v`.

    Args:
        q, k, v (`torch.Tensor`): `[B, S, H, D]`, with `B*H*S*S*D <= 2**22`.
        q_masks, k_masks (`ReuseMasks | None`): reuse decisions for q and k; `None` reuses nothing.
        priority (`str`, defaults to `"thw"`): see `resolve_reuse`.
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.

    Returns:
        `[B, S, H, D]` attention output, computed in float64, returned in `q.dtype`.

    Example:
        >>> q = k = v = torch.eye(4, dtype=torch.float64).view(1, 4, 1, 4)
        >>> out = partial_score_attention_reference(q, k, v, None, None)
        >>> torch.allclose(out, timeripple_attention(q, k, v, grid=(1, 2, 2), thresholds=0.0)[0])
        True
    """
    b, s, h, d = q.shape
    n = b * h * s * s * d
    if n > _REFERENCE_MAX_ELEMENTS:
        raise ConfigError(f"B*H*S*S*D={n} is out of range: accepted [1, {_REFERENCE_MAX_ELEMENTS}]")
    q_src, k_src = _source_index(q_masks, priority, q.shape), _source_index(k_masks, priority, k.shape)
    p = torch.einsum("bihc,bjhc->bhijc", q.double().cpu(), k.double().cpu())  # [B, H, S(i), S(j), D]
    for j in range(s):  # reused key elements copy their source column
        idx = k_src[:, :, :, j].view(b, h, 1, 1, d).expand(b, h, s, 1, d)
        p[:, :, :, j, :] = p.gather(3, idx).squeeze(3)
    for i in range(s):  # reused query elements copy their source row
        idx = q_src[:, :, :, i].view(b, h, 1, 1, d).expand(b, h, 1, s, d)
        p[:, :, i, :, :] = p.gather(2, idx).squeeze(2)
    scores = p.sum(-1) * (1.0 / math.sqrt(d) if scale is None else scale)
    out = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v.double().cpu())
    return out.to(device=q.device, dtype=q.dtype)


def _prepare(q, k, v, grid, thresholds, window, axes, priority, text_prefix, text_suffix, reuse_q, reuse_k):
    """Validate every argument; return the q and k masks, or `None` for each side that reuses nothing."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ConfigError(
            f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} are not accepted: expected "
            "q and k [B, S, H, D] and v [B, S, H, Dv]"
        )
    axes = _check_axes(axes)
    _check_layout(q, grid, text_prefix, text_suffix)
    _check_int("window", window, 2)
    _check_priority(priority, axes)
    thetas = _theta_per_axis(thresholds, axes, q.shape[-1])
    if _all_zero(thetas):
        return None, None
    kw = dict(window=window, axes=axes, text_prefix=text_prefix, text_suffix=text_suffix)
    q_masks = reuse_masks(q, grid, thresholds, **kw) if reuse_q else None
    k_masks = reuse_masks(k, grid, thresholds, **kw) if reuse_k else None
    return q_masks, k_masks


def timeripple_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    thresholds: Thresholds,
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
    """TimeRipple attention: resolve reused q/k elements, then ordinary SDPA (exactly the partial-score reuse).

    When every threshold is 0 (or neither side reuses) no mask is computed and the output is plain SDPA, bit for bit.

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]` post-RoPE queries and keys.
        v (`torch.Tensor`): `[B, S, H, Dv]` values (never reused).
        grid, thresholds, window, axes, text_prefix, text_suffix: see `reuse_masks`.
        priority (`str`, defaults to `"thw"`): see `resolve_reuse`.
        reuse_q (`bool`, defaults to `True`), reuse_k (`bool`, defaults to `True`): which side may reuse.
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.
        rope_groups (`dict[str, RopeGroup] | None`, defaults to `None`): channel groups for the per-group stats
            (e.g. `wan_rope_groups(D)`); `None` leaves them empty.

    Returns:
        out: `[B, S, H, Dv]`, same dtype as `v`.
        stats (`ReuseStats`): reuse fractions and QK savings of this call.

    Example:
        >>> q = k = v = torch.randn(1, 8, 2, 6)
        >>> out, stats = timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=float("inf"))
        >>> stats.q_reuse, out.shape
        (0.875, torch.Size([1, 8, 2, 6]))
    """
    q_masks, k_masks = _prepare(
        q, k, v, grid, thresholds, window, axes, priority, text_prefix, text_suffix, reuse_q, reuse_k
    )
    qt = q if q_masks is None else resolve_reuse(q, q_masks, priority=priority)
    kt = k if k_masks is None else resolve_reuse(k, k_masks, priority=priority)
    out = F.scaled_dot_product_attention(qt.transpose(1, 2), kt.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2), _build_stats(q_masks, k_masks, q.shape, _check_axes(axes), rope_groups)


def timeripple_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    thresholds: Thresholds,
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
    """Reference twin of `timeripple_attention`: loop resolver and float64 softmax math (small sizes only).

    Example:
        >>> q = k = v = torch.randn(1, 8, 2, 6, dtype=torch.float64)
        >>> fast, _ = timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=0.5)
        >>> ref, _ = timeripple_attention_reference(q, k, v, grid=(2, 2, 2), thresholds=0.5)
        >>> torch.allclose(fast, ref)
        True
    """
    q_masks, k_masks = _prepare(
        q, k, v, grid, thresholds, window, axes, priority, text_prefix, text_suffix, reuse_q, reuse_k
    )
    qt = q if q_masks is None else resolve_reuse_reference(q, q_masks, priority=priority)
    kt = k if k_masks is None else resolve_reuse_reference(k, k_masks, priority=priority)
    scores = torch.einsum("bihc,bjhc->bhij", qt.double(), kt.double())
    scores = scores * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    out = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v.double())
    return out.to(v.dtype), _build_stats(q_masks, k_masks, q.shape, _check_axes(axes), rope_groups)


@dataclass(frozen=True)
class ReuseStats:
    """Reuse fractions and analytic QK savings of one TimeRipple attention call.

    Args:
        q_reuse (`float`), k_reuse (`float`): fraction of reused elements over all `B*S*H*D` (text counts as kept).
        q_reuse_per_axis (`dict[str, float]`), k_reuse_per_axis (`dict[str, float]`): fraction of elements whose
            mask for that axis passes (before priority; one element may count for several axes).
        q_reuse_per_group (`dict[str, float]`), k_reuse_per_group (`dict[str, float]`): `q_reuse` restricted to the
            channels of each RoPE group; empty when no groups were given.
        qk_savings (`float`): fraction of the Q·Kᵀ partial products skipped, see `qk_savings`.
        qk_savings_per_head (`list[float]`): the same per head, averaged over the batch.
        rows_removed (`float`, defaults to 0.0), keys_removed (`float`, defaults to 0.0): fraction of the `B*H*S`
            query rows not computed / keys merged away by a structured variant (`ops.timeripple_structured`); 0 for
            the exact simulation, which removes nothing.
        attn_work (`float`, defaults to 1.0): share of the dense score work the attention call ran.
    """

    q_reuse: float
    k_reuse: float
    q_reuse_per_axis: dict[str, float]
    k_reuse_per_axis: dict[str, float]
    q_reuse_per_group: dict[str, float]
    k_reuse_per_group: dict[str, float]
    qk_savings: float
    qk_savings_per_head: list[float]
    rows_removed: float = 0.0
    keys_removed: float = 0.0
    attn_work: float = 1.0


def qk_savings(rq: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
    """QK savings `1 - Σ_c (1 - r_q,c)(1 - r_k,c) / D` from per-channel reuse fractions (never call it a speedup).

    In channel `c` the contraction entry `(i, j, c)` must be computed only when neither `q_ic` nor `k_jc` is reused;
    every other entry is copied. The count of computed entries is exactly `(#kept q in c)·(#kept k in c)`, so the
    product of fractions is exact, not an independence assumption. Assumes the cost of one entry is the same in every
    channel, and counts only the Q·Kᵀ contraction (softmax, P·V and the mask overhead are not included).

    Args:
        rq, rk (`torch.Tensor`): `[..., D]` fractions in `[0, 1]` of tokens whose element in channel `c` is reused.

    Returns:
        `[...]` savings in `[0, 1]`.

    Example:
        >>> qk_savings(torch.full((4,), 0.5), torch.full((4,), 0.5)).item()
        0.75
    """
    if rq.shape != rk.shape:
        raise ConfigError(f"rq.shape={tuple(rq.shape)} and rk.shape={tuple(rk.shape)} are not accepted: must match")
    for name, r in (("rq", rq), ("rk", rk)):
        if not bool(((r >= 0) & (r <= 1)).all()):
            raise ConfigError(f"{name} has a value out of range: accepted [0, 1], got min {r.min().item()!r}")
    return 1.0 - ((1.0 - rq) * (1.0 - rk)).mean(-1)


def _fraction(m: torch.Tensor) -> float:
    return int(m.sum()) / m.numel()


def group_sum(reused: torch.Tensor, group: RopeGroup) -> torch.Tensor:
    """Count of `True` elements of `reused` `[B, S, H, D]` in the channels of `group` (0-d tensor, no host sync)."""
    if isinstance(group, slice):
        return reused[..., group].sum()
    return (reused & group.to(reused.device)).sum()


def group_elements(group: RopeGroup, shape: tuple[int, ...]) -> int:
    """Elements of a `[B, S, H, D]` tensor that `group` covers (the denominator of a per-group fraction)."""
    b, s, h, d = shape
    if isinstance(group, slice):
        return b * s * h * len(range(d)[group])
    return b * s * int(group.sum())


def check_rope_groups(groups: dict[str, RopeGroup] | None, heads: int, head_dim: int) -> None:
    """Raise :class:`ConfigError` unless every group is a non-empty slice of `[0, D)` or a bool `[H, D]` mask."""
    for name, sel in (groups or {}).items():
        if isinstance(sel, torch.Tensor):
            if sel.dtype != torch.bool or tuple(sel.shape) != (heads, head_dim) or not bool(sel.any()):
                raise ConfigError(f"rope_groups[{name!r}] (a tensor of {sel.dtype} {tuple(sel.shape)}) is not "
                                  f"accepted: expected a non-empty bool mask [H, D]=[{heads}, {head_dim}]")
        elif not isinstance(sel, slice) or not range(head_dim)[sel] or (sel.stop or 0) > head_dim:
            raise ConfigError(f"rope_groups[{name!r}]={sel!r} is not accepted: expected a non-empty slice of "
                              f"[0, {head_dim}) or a bool [H, D] mask")


def mode_thresholds(theta: float | torch.Tensor, x: torch.Tensor, mode: str, axes: tuple[str, ...],
                    axis_scale: tuple[float, float, float] = (1.0, 1.0, 1.0), reduce_heads=None) -> Thresholds:
    """The thresholds of a TimeRipple threshold mode at the base threshold `theta`.

    Args:
        theta (`float | torch.Tensor`): the base threshold (a float, or a 0-d tensor when traced).
        x (`torch.Tensor`): `[B, S, H, D]` queries ("per_channel" scales θ by each channel's mean |x|).
        mode (`str`): one of `THRESHOLD_MODES`: "shared" (θ), "per_axis" (θ times `axis_scale` per axis),
            "per_channel" (`[len(axes), D]`: θ times each channel's mean |x| over the head mean).
        axes (`tuple[str, ...]`): the axes checked; axis_scale (`tuple[float, float, float]`): (t, h, w) multipliers.
        reduce_heads (`Callable | None`): for "per_channel" when `x` holds a share of the heads (a Ulysses rank):
            maps this share's `[D]` mean |x| to the mean over every share (``parallel.timeripple.HeadGroup.mean``).

    Example:
        >>> mode_thresholds(0.5, torch.ones(1, 8, 1, 4), "per_axis", ("t", "w"), (1.0, 1.0, 2.0))
        {'t': 0.5, 'w': 1.0}
    """
    check_choice("threshold_mode", mode, THRESHOLD_MODES)
    if mode == "shared":
        return theta
    if mode == "per_axis":
        scale = dict(zip(AXES, axis_scale))
        return {a: theta * scale[a] for a in axes}
    mag = x.detach().abs().float().mean(dim=(0, 1, 2))  # [D]
    if reduce_heads is not None:
        mag = reduce_heads(mag)
    per_channel = theta * mag / mag.mean().clamp_min(1e-12)
    return per_channel.expand(len(axes), -1)


def _side_stats(masks: ReuseMasks | None, shape: torch.Size, axes: tuple[str, ...], groups: dict[str, RopeGroup]):
    """(overall, per-axis, per-group fractions, `[B, H, D]` per-channel rate) of one side; zeros when `None`."""
    if masks is None:
        rate = torch.zeros(shape[0], shape[2], shape[3], dtype=torch.float64)
        return 0.0, dict.fromkeys(axes, 0.0), dict.fromkeys(groups, 0.0), rate
    reused = masks.any
    per_axis = {a: _fraction(m) for a, m in masks.per_axis.items()}
    per_group = {g: int(group_sum(reused, sel)) / group_elements(sel, tuple(shape)) for g, sel in groups.items()}
    return _fraction(reused), per_axis, per_group, reused.sum(1).cpu().double() / shape[1]


@torch.compiler.disable
def _build_stats(q_masks, k_masks, shape, axes, rope_groups) -> ReuseStats:
    check_rope_groups(rope_groups, shape[2], shape[-1])
    q_all, q_axis, q_group, rq = _side_stats(q_masks, shape, axes, rope_groups or {})
    k_all, k_axis, k_group, rk = _side_stats(k_masks, shape, axes, rope_groups or {})
    per_head = qk_savings(rq, rk).mean(0)  # [H]
    return ReuseStats(q_all, k_all, q_axis, k_axis, q_group, k_group, float(per_head.mean()), per_head.tolist())


def reuse_stats(
    q_masks: ReuseMasks | None, k_masks: ReuseMasks | None, rope_groups: dict[str, slice] | None = None
) -> ReuseStats:
    """Stats of a pair of masks (either may be `None`: that side reuses nothing). See `ReuseStats`, `qk_savings`.

    Example:
        >>> m = reuse_masks(torch.zeros(1, 8, 1, 6), (2, 2, 2), float("inf"))
        >>> reuse_stats(m, m, wan_rope_groups(6)).qk_savings
        0.984375
    """
    ref = q_masks if q_masks is not None else k_masks
    if ref is None:
        raise ConfigError("q_masks=None and k_masks=None are not accepted: give at least one")
    shape = next(iter(ref.per_axis.values())).shape
    return _build_stats(q_masks, k_masks, shape, ref.axes, rope_groups)


def wan_rope_groups(head_dim: int) -> dict[str, slice]:
    """Wan's RoPE channel groups: `h = w = 2*(head_dim//6)` channels, `t` the rest, in order t, h, w.

    Example:
        >>> wan_rope_groups(64)
        {'t': slice(0, 24, None), 'h': slice(24, 44, None), 'w': slice(44, 64, None)}
    """
    _check_int("head_dim", head_dim, 6)
    if head_dim % 2:
        raise ConfigError(f"head_dim={head_dim} is not accepted: must be even (RoPE rotates channel pairs)")
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    return {"t": slice(0, t), "h": slice(t, t + hw), "w": slice(t + hw, head_dim)}


@dataclass(frozen=True)
class ThresholdSchedule:
    """Step-sensitive threshold (paper Eq. 4): dense early and at the last step, a linear ramp, then θ_max.

    Args:
        theta_min (`float`): θ at `i_min`, finite, `>= 0`.
        theta_max (`float`): θ at `i_max` and after, finite, `>= theta_min`.
        i_min (`int`): first 0-indexed step that reuses; earlier steps are dense.
        i_max (`int`): last ramp step, `i_min <= i_max < num_steps`.
        num_steps (`int`): sampler steps, `>= 1`; step `num_steps - 1` is dense.
        literal (`bool`, defaults to `False`): Eq. 4 as printed, without `+ θ_min` on the ramp.

    Example:
        >>> ThresholdSchedule.hunyuan_video().at(15)
        0.35
    """

    theta_min: float
    theta_max: float
    i_min: int
    i_max: int
    num_steps: int
    literal: bool = False

    def __post_init__(self):
        for name in ("theta_min", "theta_max"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value!r} is out of range: accepted [0.0, inf)")
        if self.theta_min > self.theta_max:
            raise ConfigError(f"theta_min={self.theta_min!r} is out of range: accepted [0.0, {self.theta_max!r}]")
        _check_int("num_steps", self.num_steps, 1)
        _check_int("i_min", self.i_min, 0)
        _check_int("i_max", self.i_max, 0)
        if self.i_min > self.i_max:
            raise ConfigError(f"i_min={self.i_min} is out of range: accepted [0, {self.i_max}]")
        if self.i_max >= self.num_steps:
            raise ConfigError(f"i_max={self.i_max} is out of range: accepted [{self.i_min}, {self.num_steps - 1}]")

    @classmethod
    def hunyuan_video(cls, num_steps: int = 50) -> ThresholdSchedule:
        """HunyuanVideo's Table 1 values read coherently: θ 0.2 -> 0.5 over steps 10..20 (0-indexed)."""
        return cls(0.2, 0.5, 10, 20, num_steps)

    def at(self, step: int) -> float:
        """Threshold at 0-indexed `step`; 0.0 means dense."""
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ConfigError(f"step={step} is out of range: accepted [0, {self.num_steps - 1}]")
        if step < self.i_min or step == self.num_steps - 1:
            return 0.0
        if step > self.i_max or self.i_min == self.i_max:
            return float(self.theta_max)
        ramp = (step - self.i_min) * (self.theta_max - self.theta_min) / (self.i_max - self.i_min)
        return float(ramp if self.literal else self.theta_min + ramp)

    def values(self) -> list[float]:
        """`at(step)` for every step."""
        return [self.at(i) for i in range(self.num_steps)]
