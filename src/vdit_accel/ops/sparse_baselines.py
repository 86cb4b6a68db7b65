"""Baselines that *remove* attention work without reusing anything: the comparison of TimeRipple's central claim.

TimeRipple's paper claims that reusing the partial scores of similar tokens beats masking or skipping the same
amount of attention. These are the masking / skipping / static-sparsity baselines, each a pure tensor function with
a plain-PyTorch ``*_reference`` twin (float64, explicit masks or loops):

- **top-k key masking** (`key_mass_scores` -> `topk_key_keep` -> `masked_key_attention`): per (batch, head) keep
  the keys with the largest attention mass, estimated cheaply from block-mean-pooled queries, and drop the others
  (the softmax renormalises over the kept keys: "reusing zero" for the dropped ones).
- **similarity-selected key skipping** (`similarity_key_keep` -> `masked_key_attention`): drop the keys whose whole
  k (all heads) is most similar to their window anchor (TimeRipple's relative windowed spread, `ops.timeripple_tokens`)
  but *without* TimeRipple's merge: no mean value, no ``+log(count)`` logit bias. At the count TimeRipple removes at
  θ it drops exactly the keys TimeRipple merges (a key is merged iff its smallest spread is < θ).
- **static query-row skipping** (`static_row_skip_roots` -> `row_skip_attention`): skip a given number of query rows
  chosen by position only (a low-discrepancy order over the tokens that are not the first of their window on some
  axis) and give each skipped row the output of the nearest computed row (its window anchor along one axis, else
  two, else the window corner, which is always computed). TimeRipple's query dedup is the same mechanism with rows
  chosen by similarity.
- **static spatio-temporal tile windows** (`tile_window_mask` / `tile_window_attention`): the kind of mask
  sliding-tile / neighbourhood attention (and the spatial/temporal windows of Sparse-VideoGen or radial attention)
  use. Tokens form tiles of ``tile = (tt, th, tw)`` tokens; a query tile attends to a window of ``window = (wt, wh,
  ww)`` tiles around it, shifted inward at the grid border so every window has the same size (NATTEN-style).
  Fast paths: ``"blocked"`` (query tiles sharing a window form one group; one gather + SDPA per group; exact) and
  ``"flex"`` (``torch.nn.attention.flex_attention`` with a block mask on tile-ordered tokens). On CPU (torch 2.13)
  compiled flex_attention at 4,096 tokens, 12 x 128 heads and 50% block density ran no faster than dense SDPA (one
  measurement on a shared machine), so ``"blocked"`` is the CPU default; eager flex_attention is only for small
  tests.

Layouts are ``[B, S, H, D]`` (diffusers' ``dispatch_attention_fn``); ``grid = (T, Hg, Wg)``, tokens in (t, h, w)
order after ``text_prefix`` text tokens (text tokens are never dropped or skipped, and in the tile-window mask text
tokens attend and are attended densely).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F

from vdit_accel.errors import ConfigError
from vdit_accel.ops.timeripple import AXES, _check_axes, _check_priority
from vdit_accel.ops.timeripple_tokens import token_decisions, token_decisions_reference

TILE_BACKENDS = ("auto", "blocked", "flex", "reference")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class SparseStats:
    """What one baseline call removed: fractions of query rows and keys not computed and the share of dense
    ``Q·Kᵀ`` (and ``P·V``) work run (means over the batch)."""

    rows_removed: float
    keys_removed: float
    attn_work: float


# ------------------------------------------------------------------------------------------------ checks
def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ConfigError(f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} are not accepted: "
                          "expected q and k [B, S, H, D] and v [B, S, H, Dv]")


def _check_grid(s: int, grid, text_prefix: int, text_suffix: int) -> tuple[int, int, int]:
    if len(grid) != 3 or any(not isinstance(g, int) or g < 1 for g in grid):
        raise ConfigError(f"grid={grid!r} is not accepted: three ints >= 1 (T, Hg, Wg)")
    if text_prefix < 0 or text_suffix < 0 or text_prefix + math.prod(grid) + text_suffix != s:
        raise ConfigError(f"grid={tuple(grid)} with text_prefix={text_prefix}, text_suffix={text_suffix} does not "
                          f"match S={s} tokens")
    return tuple(int(g) for g in grid)


def _drop_counts(n_drop, b: int, limit: int) -> list[int]:
    counts = [n_drop] * b if isinstance(n_drop, int) and not isinstance(n_drop, bool) else list(n_drop)
    if len(counts) != b or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ConfigError(f"n_drop={n_drop!r} is not accepted: an int >= 0 or one per batch item ({b})")
    if any(c > limit for c in counts):
        raise ConfigError(f"n_drop={n_drop!r} is out of range: at most {limit} here")
    return [int(c) for c in counts]


# ------------------------------------------------------------------------------------------------ top-k keys
def key_mass_scores(q: torch.Tensor, k: torch.Tensor, *, query_pool: int = 64,
                    scale: float | None = None) -> torch.Tensor:
    """Estimated attention mass of every key per (batch, head), from block-mean-pooled queries.

    Queries are averaged over consecutive blocks of ``query_pool`` tokens (the last block may be shorter); the mass
    of key ``j`` is the mean over blocks of ``softmax_j(q̄_blk · k_j * scale)``. Costs ``S/query_pool`` query rows of
    attention scores.

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]`.
        query_pool (`int`, defaults to 64): tokens per pooled query (>= 1).
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.

    Returns:
        `[B, H, S]` float32 (float64 for float64 inputs) masses; each (b, h) row sums to 1.

    Example:
        >>> q = k = torch.ones(1, 4, 1, 2)
        >>> key_mass_scores(q, k, query_pool=2).tolist()
        [[[0.25, 0.25, 0.25, 0.25]]]
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ConfigError(f"q/k shapes {tuple(q.shape)}/{tuple(k.shape)} are not accepted: [B, S, H, D] each")
    if isinstance(query_pool, bool) or not isinstance(query_pool, int) or query_pool < 1:
        raise ConfigError(f"query_pool={query_pool!r} is not accepted: an int >= 1")
    b, s, h, d = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb = -(-s // query_pool)
    blk = torch.arange(s, device=q.device) // query_pool
    pooled = torch.zeros(b, nb, h, d, dtype=acc, device=q.device).index_add_(1, blk, q.to(acc))
    pooled = pooled / torch.bincount(blk, minlength=nb).to(acc).view(1, nb, 1, 1)
    scores = torch.einsum("bnhd,bshd->bhns", pooled, k.to(acc)) * scale
    return scores.softmax(-1).mean(2)


def key_mass_scores_reference(q: torch.Tensor, k: torch.Tensor, *, query_pool: int = 64,
                              scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch twin of `key_mass_scores`: a loop over query blocks in float64.

    Example:
        >>> q = k = torch.ones(1, 4, 1, 2)
        >>> key_mass_scores_reference(q, k, query_pool=3).tolist()
        [[[0.25, 0.25, 0.25, 0.25]]]
    """
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    total = torch.zeros(b, h, s, dtype=torch.float64)
    starts = range(0, s, query_pool)
    for st in starts:
        qb = q[:, st : st + query_pool].double().mean(1)  # [B, H, D]
        logits = torch.einsum("bhd,bshd->bhs", qb, k.double()) * scale
        total += logits.softmax(-1)
    return (total / len(starts)).to(q.device)


def topk_key_keep(scores: torch.Tensor, n_drop) -> list[torch.Tensor]:
    """Indices of the keys to keep per batch item: the ``S - n_drop`` largest scores of every head (sorted).

    Args:
        scores (`torch.Tensor`): `[B, H, S]` (e.g. `key_mass_scores`).
        n_drop (`int | list[int]`): keys dropped per head, one count for all batch items or one per item.

    Returns:
        `list` of B long tensors `[H, S - n_drop[b]]` of ascending key indices.

    Example:
        >>> topk_key_keep(torch.tensor([[[0.1, 0.5, 0.2, 0.9]]]), 2)[0].tolist()
        [[1, 3]]
    """
    if scores.dim() != 3:
        raise ConfigError(f"scores.shape={tuple(scores.shape)} is not accepted: [B, H, S]")
    b, _, s = scores.shape
    counts = _drop_counts(n_drop, b, s - 1)
    return [scores[bi].topk(s - c, dim=-1).indices.sort(-1).values for bi, c in enumerate(counts)]


def topk_key_keep_reference(scores: torch.Tensor, n_drop) -> list[torch.Tensor]:
    """Plain twin of `topk_key_keep`: a stable descending sort per head, first ``S - n_drop`` indices.

    Example:
        >>> topk_key_keep_reference(torch.tensor([[[0.1, 0.5, 0.2, 0.9]]]), 2)[0].tolist()
        [[1, 3]]
    """
    b, h, s = scores.shape
    counts = _drop_counts(n_drop, b, s - 1)
    out = []
    for bi in range(b):
        rows = []
        for hi in range(h):
            order = sorted(range(s), key=lambda j: (-float(scores[bi, hi, j]), j))
            rows.append(sorted(order[: s - counts[bi]]))
        out.append(torch.tensor(rows, dtype=torch.long).view(h, s - counts[bi]))
    return out


# ------------------------------------------------------------------------------------------------ similarity keys
def _similarity_keep(spread: dict[str, torch.Tensor], n_drop, s: int) -> list[torch.Tensor]:
    best = torch.stack(list(spread.values())).min(0).values  # [B, S], inf where no axis can reuse
    b = best.shape[0]
    limits = [int(torch.isfinite(best[bi]).sum()) for bi in range(b)]
    counts = _drop_counts(n_drop, b, s)
    if any(c > lim for c, lim in zip(counts, limits)):
        raise ConfigError(f"n_drop={n_drop!r} is out of range: at most {limits} keys have a window anchor here")
    out = []
    for bi, c in enumerate(counts):
        order = torch.sort(best[bi], stable=True).indices  # ascending spread, index order on ties
        keep = torch.ones(s, dtype=torch.bool, device=best.device)
        keep[order[:c]] = False
        out.append(keep.nonzero().squeeze(1).view(1, -1))
    return out


def similarity_key_keep(k: torch.Tensor, grid: tuple[int, int, int], n_drop, *, window: int = 2,
                        axes: tuple[str, ...] = AXES, text_prefix: int = 0,
                        text_suffix: int = 0) -> list[torch.Tensor]:
    """Keys to keep after dropping the ``n_drop`` keys most similar to their window anchor (shared by all heads).

    Similarity is TimeRipple's relative windowed spread of the whole key (every head; `ops.timeripple_tokens`),
    the smallest over ``axes``; ties break by token index. Window anchors and text tokens are never dropped.

    Args:
        k (`torch.Tensor`): `[B, S, H, D]` post-RoPE keys.
        grid, window, axes, text_prefix, text_suffix: as `token_decisions`.
        n_drop (`int | list[int]`): keys dropped, one count or one per batch item.

    Returns:
        `list` of B long tensors `[1, S - n_drop[b]]` (ascending; the leading 1 broadcasts over heads).

    Example:
        >>> k = torch.arange(8.0).view(1, 8, 1, 1) + 1
        >>> similarity_key_keep(k, (1, 1, 8), 2)[0].tolist()
        [[0, 1, 2, 3, 4, 6]]
    """
    dec = token_decisions([k], grid, 0.0, window=window, axes=axes, text_prefix=text_prefix,
                          text_suffix=text_suffix)
    return _similarity_keep(dec.spread, n_drop, k.shape[1])


def similarity_key_keep_reference(k: torch.Tensor, grid: tuple[int, int, int], n_drop, *, window: int = 2,
                                  axes: tuple[str, ...] = AXES, text_prefix: int = 0,
                                  text_suffix: int = 0) -> list[torch.Tensor]:
    """Plain twin of `similarity_key_keep` (spreads from `token_decisions_reference`, float64 loops).

    Example:
        >>> k = torch.arange(8.0).view(1, 8, 1, 1) + 1
        >>> similarity_key_keep_reference(k, (1, 1, 8), 2)[0].tolist()
        [[0, 1, 2, 3, 4, 6]]
    """
    dec = token_decisions_reference([k], grid, 0.0, window=window, axes=axes, text_prefix=text_prefix,
                                    text_suffix=text_suffix)
    b, s = k.shape[:2]
    counts = _drop_counts(n_drop, b, s)
    out = []
    for bi in range(b):
        best = [min(float(dec.spread[a][bi, j]) for a in dec.spread) for j in range(s)]
        finite = [j for j in range(s) if math.isfinite(best[j])]
        if counts[bi] > len(finite):
            raise ConfigError(f"n_drop={n_drop!r} is out of range: at most {len(finite)} keys have a window anchor")
        drop = set(sorted(finite, key=lambda j: (best[j], j))[: counts[bi]])
        out.append(torch.tensor([j for j in range(s) if j not in drop], dtype=torch.long).view(1, -1))
    return out


# ------------------------------------------------------------------------------------------------ masked keys
def masked_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: list[torch.Tensor], *,
                         scale: float | None = None) -> tuple[torch.Tensor, SparseStats]:
    """Attention over the kept keys only (dropped keys get probability 0; the softmax renormalises the rest).

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]`; v (`torch.Tensor`): `[B, S, H, Dv]`.
        keep (`list[torch.Tensor]`): per batch item, long `[H, K_b]` (per head) or `[1, K_b]` (all heads) key
            indices, as `topk_key_keep` / `similarity_key_keep` return.
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.

    Returns:
        out `[B, S, H, Dv]` in `v.dtype`; `SparseStats` (rows_removed 0).

    Example:
        >>> q, k = torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
        >>> v = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)
        >>> masked_key_attention(q, k, v, [torch.tensor([[0, 1]])])[0].flatten().tolist()
        [1.5, 1.5, 1.5]
    """
    _check_qkv(q, k, v)
    b, s, h, _ = q.shape
    if len(keep) != b:
        raise ConfigError(f"keep has {len(keep)} entries, expected one per batch item ({b})")
    outs, removed = [], 0.0
    for bi, idx in enumerate(keep):
        if idx.dim() != 2 or idx.shape[0] not in (1, h) or idx.dtype != torch.long or idx.shape[1] < 1:
            raise ConfigError(f"keep[{bi}].shape={tuple(idx.shape)} is not accepted: long [H or 1, K >= 1]")
        qb = q[bi].transpose(0, 1)[None]  # [1, H, S, D]
        if idx.shape[0] == 1:
            kb = k[bi].index_select(0, idx[0]).transpose(0, 1)[None]
            vb = v[bi].index_select(0, idx[0]).transpose(0, 1)[None]
        else:
            kt, vt = k[bi].transpose(0, 1), v[bi].transpose(0, 1)  # [H, S, *]
            kb = kt.gather(1, idx[..., None].expand(h, idx.shape[1], kt.shape[-1]))[None]
            vb = vt.gather(1, idx[..., None].expand(h, idx.shape[1], vt.shape[-1]))[None]
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale)[0].transpose(0, 1))
        removed += 1.0 - idx.shape[1] / s
    removed /= b
    return torch.stack(outs), SparseStats(0.0, removed, 1.0 - removed)


def masked_key_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: list[torch.Tensor], *,
                                   scale: float | None = None) -> torch.Tensor:
    """Plain twin of `masked_key_attention`: dense float64 attention with ``-inf`` on the dropped keys.

    Example:
        >>> q, k = torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
        >>> v = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)
        >>> masked_key_attention_reference(q, k, v, [torch.tensor([[1, 2]])]).flatten().tolist()
        [4.0, 4.0, 4.0]
    """
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = torch.zeros(b, h, 1, s, dtype=torch.bool)
    for bi, idx in enumerate(keep):
        for hi in range(h):
            mask[bi, hi, 0, idx[min(hi, idx.shape[0] - 1)].cpu()] = True
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    return torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v.double()).to(v.dtype)


# ------------------------------------------------------------------------------------------------ query rows
def _static_candidates(grid, window: int, axes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(coords [N, 3], can_skip [N]) of the video tokens: a token can be skipped iff it is not the first of its
    window along some axis of ``axes`` (windows of size 1 do not count)."""
    tg, hg, wg = grid
    coords = torch.stack(torch.meshgrid(torch.arange(tg), torch.arange(hg), torch.arange(wg), indexing="ij"),
                         -1).reshape(-1, 3)
    can = torch.zeros(coords.shape[0], dtype=torch.bool)
    for a in axes:
        ai = AXES.index(a)
        c, n = coords[:, ai], grid[ai]
        start = c - c % window
        size = torch.clamp(n - start, max=window)
        can |= (c != start) & (size > 1)
    return coords, can


def _subsets(axes: tuple[str, ...], priority: str) -> list[tuple[int, ...]]:
    order = [AXES.index(a) for a in priority if a in axes]
    out = []
    for r in range(1, len(order) + 1):
        out += [tuple(c) for c in combinations(order, r)]
    return out


def static_row_skip_roots(grid: tuple[int, int, int], n_skip: int, *, window: int = 2,
                          axes: tuple[str, ...] = AXES, priority: str = "thw", text_prefix: int = 0,
                          text_suffix: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Roots of a static query-row skip: ``n_skip`` rows chosen by position only, each taking the nearest computed row.

    Skippable rows are those that are not the first token of their window along some axis (the same candidates as
    TimeRipple's, so at most 7/8 of the rows on even grids with ``window=2``). They are ranked by a low-discrepancy
    (golden-ratio) sequence over the token index, so the skipped rows spread evenly over the grid; the first
    ``n_skip`` are skipped. A skipped row's root is the first computed token among its window anchors along one axis
    (in ``priority`` order), then along two axes, then the window corner (always computed).

    Args:
        grid (`tuple[int, int, int]`): `(T, Hg, Wg)`.
        n_skip (`int`): rows to skip (at most the number of skippable rows).
        window (`int`, defaults to 2), axes (`tuple[str, ...]`), priority (`str`, defaults "thw"): window size,
            axes and anchor order (an axis order; "min_delta" has no meaning without data and is rejected).
        text_prefix, text_suffix (`int`): text token counts (never skipped).

    Returns:
        `[S]` long roots (`root[s] == s` for computed rows; `root[root] == root`).

    Example:
        >>> static_row_skip_roots((1, 1, 4), 2).tolist()
        [0, 0, 2, 2]
    """
    axes = _check_axes(axes)
    if priority == "min_delta" or sorted(priority) != sorted("".join(AXES)):
        raise ConfigError(f"priority={priority!r} is not accepted: a permutation of 'thw' (static skipping has no "
                          "data for 'min_delta')")
    _check_priority(priority, axes)
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"window={window!r} is out of range: an int >= 2")
    grid = _check_grid(text_prefix + math.prod(grid) + text_suffix, grid, text_prefix, text_suffix)
    coords, can = _static_candidates(grid, window, axes)
    n = coords.shape[0]
    cand = can.nonzero().squeeze(1)
    if isinstance(n_skip, bool) or not isinstance(n_skip, int) or not 0 <= n_skip <= cand.numel():
        raise ConfigError(f"n_skip={n_skip!r} is out of range: accepted [0, {cand.numel()}] on grid {grid}")
    rank = torch.frac(cand.double() * _GOLDEN)
    skipped = torch.zeros(n, dtype=torch.bool)
    skipped[cand[torch.sort(rank, stable=True).indices[:n_skip]]] = True
    strides = torch.tensor([grid[1] * grid[2], grid[2], 1])
    root = torch.arange(n)
    chosen = torch.zeros(n, dtype=torch.bool)
    starts = coords - coords % window
    for sub in _subsets(axes, priority):
        src = coords.clone()
        applicable = torch.ones(n, dtype=torch.bool)
        for ai in sub:
            applicable &= coords[:, ai] != starts[:, ai]
            src[:, ai] = starts[:, ai]
        idx = (src * strides).sum(1)
        ok = skipped & ~chosen & applicable & ~skipped[idx]
        root = torch.where(ok, idx, root)
        chosen |= ok
    if bool((skipped & ~chosen).any()):  # pragma: no cover - the window corner is never skipped
        raise RuntimeError("a skipped row found no computed source")
    full = torch.arange(text_prefix + n + text_suffix)
    full[text_prefix : text_prefix + n] = root + text_prefix
    return full.to(device)


def static_row_skip_roots_reference(grid: tuple[int, int, int], n_skip: int, *, window: int = 2,
                                    axes: tuple[str, ...] = AXES, priority: str = "thw", text_prefix: int = 0,
                                    text_suffix: int = 0) -> torch.Tensor:
    """Plain twin of `static_row_skip_roots`: python loops over tokens and anchor candidates.

    Example:
        >>> static_row_skip_roots_reference((1, 1, 4), 2).tolist()
        [0, 0, 2, 2]
    """
    tg, hg, wg = grid
    coords = [(t, h, w) for t in range(tg) for h in range(hg) for w in range(wg)]

    def skippable(c):
        for a in axes:
            ai = AXES.index(a)
            st = c[ai] - c[ai] % window
            if c[ai] != st and min(window, grid[ai] - st) > 1:
                return True
        return False

    cand = [i for i, c in enumerate(coords) if skippable(c)]
    if not 0 <= n_skip <= len(cand):
        raise ConfigError(f"n_skip={n_skip!r} is out of range: accepted [0, {len(cand)}]")
    ranked = sorted(cand, key=lambda i: ((i * _GOLDEN) % 1.0, i))
    skipped = set(ranked[:n_skip])
    order = [AXES.index(a) for a in priority if a in axes]
    subsets = [s for r in range(1, len(order) + 1) for s in combinations(order, r)]
    root = list(range(len(coords)))
    for i in skipped:
        c = coords[i]
        for sub in subsets:
            if any(c[ai] % window == 0 for ai in sub):
                continue
            src = list(c)
            for ai in sub:
                src[ai] = c[ai] - c[ai] % window
            j = (src[0] * hg + src[1]) * wg + src[2]
            if j not in skipped:
                root[i] = j
                break
    return torch.tensor(list(range(text_prefix)) + [r + text_prefix for r in root]
                        + list(range(text_prefix + len(coords), text_prefix + len(coords) + text_suffix)))


def row_skip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, root: torch.Tensor, *,
                       scale: float | None = None) -> tuple[torch.Tensor, SparseStats]:
    """Attention for the computed query rows only (``root[s] == s``); a skipped row copies its root's output.

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]`; v (`torch.Tensor`): `[B, S, H, Dv]`.
        root (`torch.Tensor`): `[S]` long (all batch items) or `[B, S]`, with `root[root] == root`.
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.

    Returns:
        out `[B, S, H, Dv]`; `SparseStats` (keys_removed 0).

    Example:
        >>> q = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1); k = torch.zeros(1, 3, 1, 1)
        >>> v = torch.arange(3.0).view(1, 3, 1, 1)
        >>> round(row_skip_attention(q, k, v, torch.tensor([0, 0, 2]))[1].rows_removed, 4)
        0.3333
    """
    _check_qkv(q, k, v)
    b, s = q.shape[:2]
    roots = root.expand(b, s) if root.dim() == 1 else root
    if roots.shape != (b, s) or roots.dtype != torch.long:
        raise ConfigError(f"root.shape={tuple(root.shape)} is not accepted: long [S] or [B, S]")
    ar = torch.arange(s, device=q.device)
    outs, removed = [], 0.0
    for bi in range(b):
        r = roots[bi]
        if not torch.equal(r.gather(0, r), r):
            raise ConfigError("root is not accepted: root[root] must equal root (no chains)")
        is_root = r == ar
        u = is_root.nonzero().squeeze(1)
        pos = (is_root.cumsum(0) - 1).gather(0, r)
        qb = q[bi].index_select(0, u).transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(qb, k[bi].transpose(0, 1)[None], v[bi].transpose(0, 1)[None],
                                             scale=scale)[0].transpose(0, 1)
        outs.append(out.index_select(0, pos))
        removed += 1.0 - u.numel() / s
    removed /= b
    return torch.stack(outs), SparseStats(removed, 0.0, 1.0 - removed)


def row_skip_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, root: torch.Tensor, *,
                                 scale: float | None = None) -> torch.Tensor:
    """Plain twin of `row_skip_attention`: dense float64 attention, then every row takes its root's row.

    Example:
        >>> q = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1); k = torch.arange(3.0).view(1, 3, 1, 1)
        >>> out = row_skip_attention_reference(q, k, k, torch.tensor([0, 0, 2]))
        >>> bool(out[0, 0] == out[0, 1])
        True
    """
    b, s, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    dense = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v.double())
    roots = root.expand(b, s) if root.dim() == 1 else root
    out = torch.stack([dense[bi, roots[bi]] for bi in range(b)])
    return out.to(v.dtype)


# ------------------------------------------------------------------------------------------------ tile windows
def _check_tiles(grid, tile, window) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    if len(tile) != 3 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile):
        raise ConfigError(f"tile={tile!r} is not accepted: three ints >= 1 (tokens per tile along t, h, w)")
    if any(g % t for g, t in zip(grid, tile)):
        raise ConfigError(f"tile={tuple(tile)} does not divide grid={tuple(grid)}: choose tiles that do")
    n_tiles = tuple(g // t for g, t in zip(grid, tile))
    if len(window) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= n
                               for w, n in zip(window, n_tiles)):
        raise ConfigError(f"window={window!r} is out of range: three ints in [1, tiles per axis {n_tiles}]")
    return n_tiles, tuple(int(w) for w in window)


def _window_start(c: torch.Tensor, w: int, n: int) -> torch.Tensor:
    return torch.clamp(c - (w - 1) // 2, min=0, max=n - w)


def tile_window_density(grid: tuple[int, int, int], tile: tuple[int, int, int],
                        window: tuple[int, int, int]) -> float:
    """Share of video (query, key) pairs the tile-window mask keeps: ``Π_a window_a / tiles_a`` (exact, since
    every window has the same size).

    Example:
        >>> tile_window_density((4, 32, 32), (1, 8, 8), (4, 3, 3))
        0.5625
    """
    n_tiles, window = _check_tiles(grid, tile, window)
    return math.prod(w / n for w, n in zip(window, n_tiles))


def tile_window_mask(grid: tuple[int, int, int], tile: tuple[int, int, int], window: tuple[int, int, int], *,
                     text_prefix: int = 0, text_suffix: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The static mask as a dense `[S, S]` bool (True = the query row attends to the key column).

    Video query token in tile ``c`` (per axis ``c_a = coord_a // tile_a``) attends to video keys whose tile index
    is in ``[start_a, start_a + window_a)`` on every axis,
    ``start_a = clamp(c_a - (window_a - 1)//2, 0, n_a - window_a)``.
    Text tokens attend to everything and are attended by everything.

    Example:
        >>> tile_window_mask((1, 1, 4), (1, 1, 1), (1, 1, 2)).int().tolist()
        [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    n_tiles, window = _check_tiles(grid, tile, window)
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    tc = coords // torch.tensor(tile)
    ok = torch.ones(coords.shape[0], coords.shape[0], dtype=torch.bool)
    for a in range(3):
        st = _window_start(tc[:, a], window[a], n_tiles[a])
        ok &= (tc[None, :, a] >= st[:, None]) & (tc[None, :, a] < st[:, None] + window[a])
    n = coords.shape[0]
    s = text_prefix + n + text_suffix
    full = torch.ones(s, s, dtype=torch.bool)
    full[text_prefix : text_prefix + n, text_prefix : text_prefix + n] = ok
    return full.to(device)


def tile_window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                    grid: tuple[int, int, int], tile: tuple[int, int, int],
                                    window: tuple[int, int, int], text_prefix: int = 0, text_suffix: int = 0,
                                    scale: float | None = None) -> torch.Tensor:
    """Plain twin of `tile_window_attention`: dense float64 attention under `tile_window_mask`.

    Example:
        >>> q = k = torch.zeros(1, 4, 1, 1); v = torch.arange(4.0).view(1, 4, 1, 1)
        >>> tile_window_attention_reference(q, k, v, grid=(1, 1, 4), tile=(1, 1, 1), window=(1, 1, 2)).flatten()
        tensor([0.5000, 1.5000, 2.5000, 2.5000])
    """
    _check_qkv(q, k, v)
    b, s, h, d = q.shape
    _check_grid(s, grid, text_prefix, text_suffix)
    mask = tile_window_mask(grid, tile, window, text_prefix=text_prefix, text_suffix=text_suffix, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v.double()).to(v.dtype)


@dataclass(frozen=True)
class TilePlan:
    """Precomputed token groups of a tile-window mask (video tokens only, indices into the full sequence).

    Args:
        groups (`list[tuple[torch.Tensor, torch.Tensor]]`): per distinct window, (query token indices, key token
            indices), long; the query sets partition the video tokens.
        tile_order (`torch.Tensor`): `[N]` long, video token indices in tile order (tile after tile, each tile in
            (t, h, w) order), for block-mask backends.
        density (`float`): kept share of video (query, key) pairs.
    """

    groups: list
    tile_order: torch.Tensor
    density: float


def tile_plan(grid: tuple[int, int, int], tile: tuple[int, int, int], window: tuple[int, int, int], *,
              text_prefix: int = 0, device: torch.device | str = "cpu") -> TilePlan:
    """Group the query tiles that share one key window (with border-shifted windows there are at most
    ``Π_a (n_a - window_a + 1)`` groups), and the tile order of the tokens.

    Example:
        >>> p = tile_plan((1, 1, 4), (1, 1, 1), (1, 1, 2))
        >>> [(g[0].tolist(), g[1].tolist()) for g in p.groups]
        [([0], [0, 1]), ([1], [1, 2]), ([2, 3], [2, 3])]
    """
    n_tiles, window = _check_tiles(grid, tile, window)
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    tc = coords // torch.tensor(tile)
    starts = torch.stack([_window_start(tc[:, a], window[a], n_tiles[a]) for a in range(3)], -1)  # [N, 3]
    key = (starts[:, 0] * (n_tiles[1] + 1) + starts[:, 1]) * (n_tiles[2] + 1) + starts[:, 2]
    groups = []
    for kv in torch.unique(key):
        qi = (key == kv).nonzero().squeeze(1)
        st = starts[qi[0]]
        inside = torch.ones(coords.shape[0], dtype=torch.bool)
        for a in range(3):
            inside &= (tc[:, a] >= st[a]) & (tc[:, a] < st[a] + window[a])
        ki = inside.nonzero().squeeze(1)
        groups.append(((qi + text_prefix).to(device), (ki + text_prefix).to(device)))
    tile_id = (tc[:, 0] * n_tiles[1] + tc[:, 1]) * n_tiles[2] + tc[:, 2]
    order = torch.sort(tile_id, stable=True).indices + text_prefix
    return TilePlan(groups, order.to(device), tile_window_density(grid, tile, window))


def _tile_blocked(q, k, v, plan: TilePlan, text_prefix: int, text_suffix: int, scale):
    b, s, h, _ = q.shape
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, *] views
    out = torch.empty(b, h, s, v.shape[-1], dtype=v.dtype, device=v.device)
    text = torch.cat([torch.arange(text_prefix), torch.arange(s - text_suffix, s)]).to(q.device)
    for qi, ki in plan.groups:
        kk = torch.cat([text, ki]) if text.numel() else ki
        o = F.scaled_dot_product_attention(qt.index_select(2, qi), kt.index_select(2, kk), vt.index_select(2, kk),
                                           scale=scale)
        out.index_copy_(2, qi, o)
    if text.numel():
        out.index_copy_(2, text, F.scaled_dot_product_attention(qt.index_select(2, text), kt, vt, scale=scale))
    return out.transpose(1, 2)


_FLEX_COMPILED = None


def _flex_fn(compiled: bool):
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def tile_block_mask(grid: tuple[int, int, int], tile: tuple[int, int, int], window: tuple[int, int, int], *,
                    device: torch.device | str = "cpu"):
    """flex_attention ``BlockMask`` of the tile-window mask on tile-ordered video tokens (block = one tile).

    Example:
        >>> bm = tile_block_mask((1, 4, 4), (1, 2, 2), (1, 1, 1))
        >>> tuple(bm.shape)
        (1, 1, 16, 16)
    """
    from torch.nn.attention.flex_attention import create_block_mask

    n_tiles, window = _check_tiles(grid, tile, window)
    tile_n = math.prod(tile)
    nt = torch.tensor(n_tiles, device=device)
    win = torch.tensor(window, device=device)

    def tile_coord(idx):
        tid = idx // tile_n
        return tid // (nt[1] * nt[2]), (tid // nt[2]) % nt[1], tid % nt[2]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= 0
        for a, (cq, ck) in enumerate(zip(tile_coord(q_idx), tile_coord(kv_idx))):
            st = torch.clamp(cq - (win[a] - 1) // 2, min=0)
            st = torch.minimum(st, nt[a] - win[a])
            ok = ok & (ck >= st) & (ck < st + win[a])
        return ok

    n = math.prod(grid)
    return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=tile_n)


def tile_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int, int],
                          tile: tuple[int, int, int], window: tuple[int, int, int], text_prefix: int = 0,
                          text_suffix: int = 0, scale: float | None = None, backend: str = "auto",
                          plan: TilePlan | None = None, block_mask=None,
                          compiled: bool = True) -> tuple[torch.Tensor, SparseStats]:
    """Static spatio-temporal tile-window attention (see `tile_window_mask`).

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]`; v (`torch.Tensor`): `[B, S, H, Dv]`.
        grid, tile, window, text_prefix, text_suffix: see `tile_window_mask`.
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.
        backend (`str`, defaults to "auto"): "blocked" (one gather + SDPA per group of query tiles sharing a window),
            "flex" (flex_attention with `tile_block_mask` on tile-ordered tokens; no text tokens), "reference"
            (`tile_window_attention_reference`) or "auto" ("flex" on CUDA without text tokens, else "blocked").
        plan (`TilePlan | None`), block_mask: precomputed `tile_plan` / `tile_block_mask` (built when `None`).
        compiled (`bool`, defaults to True): "flex" through `torch.compile` (eager flex_attention is slow; use
            False only at test sizes).

    Returns:
        out `[B, S, H, Dv]`; `SparseStats` (attn_work = the mask density over video tokens).

    Example:
        >>> q = k = torch.zeros(1, 4, 1, 1); v = torch.arange(4.0).view(1, 4, 1, 1)
        >>> tile_window_attention(q, k, v, grid=(1, 1, 4), tile=(1, 1, 1), window=(1, 1, 2))[0].flatten()
        tensor([0.5000, 1.5000, 2.5000, 2.5000])
    """
    _check_qkv(q, k, v)
    s = q.shape[1]
    grid = _check_grid(s, grid, text_prefix, text_suffix)
    if backend not in TILE_BACKENDS:
        raise ConfigError(f"backend={backend!r} is not accepted: choose one of {list(TILE_BACKENDS)}")
    if backend == "auto":
        backend = "flex" if q.is_cuda and text_prefix == text_suffix == 0 else "blocked"
    density = tile_window_density(grid, tile, window)
    stats = SparseStats(0.0, 0.0, density)
    if backend == "reference":
        return tile_window_attention_reference(q, k, v, grid=grid, tile=tile, window=window, text_prefix=text_prefix,
                                               text_suffix=text_suffix, scale=scale), stats
    plan = plan if plan is not None else tile_plan(grid, tile, window, text_prefix=text_prefix, device=q.device)
    if backend == "blocked":
        return _tile_blocked(q, k, v, plan, text_prefix, text_suffix, scale), stats
    if text_prefix or text_suffix:
        raise ConfigError("backend='flex' is not accepted with text tokens: use 'blocked'")
    bm = block_mask if block_mask is not None else tile_block_mask(grid, tile, window, device=q.device)
    order = plan.tile_order
    qt, kt, vt = (x.index_select(1, order).transpose(1, 2) for x in (q, k, v))
    o = _flex_fn(compiled)(qt, kt, vt, block_mask=bm, scale=scale).transpose(1, 2)
    out = torch.empty_like(o)
    out.index_copy_(1, order, o)
    return out, stats
