"""TimeRipple on whole tokens: one cheap decision per token (all heads, Q and K together), then less attention.

The ``"tokens"`` variant. Element decisions (``ops.timeripple``) build ``[B, S, H, D]`` masks per axis and then
resolve Q̃/K̃; that costs more than attention on small models and removes no work. Here a token ``s`` reuses its
*whole* q and k (every head) from its window anchor along axis ``a`` when the **relative windowed spread** of the
window is below θ::

    rel_a(window) = sqrt( Σ_{h,c} Var_window(x[., h, c]) / Σ_{h,c} Mean_window(x[., h, c]²) )   for x in {q, k}

(the windowed std Δ of paper Eq. 3, pooled over heads and channels as an L2 norm and divided by the window's RMS;
for ``K = 2`` it is ``‖a − b‖ / sqrt(2(‖a‖² + ‖b‖²))``, in ``[0, 1]``). The decision takes the larger of the q and
k spreads, so one decision serves both sides. It is a handful of vectorised reductions on a
``[B, T, Hg, Wg, H·D]`` view: no per-token loops and no element masks. θ is therefore *relative* (scale free) for
this variant, not the absolute Δ threshold of the element variants.

Given the per-token roots (``root[b, s]``: the token whose q/k ``s`` takes; chains of anchors are followed), the
attention is exact for those reused values: unique query tokens are computed (one ``index_select`` serves every
head), duplicates gather their root's output, and keys sharing a root merge into one key with the mean value and a
``+log(count)`` logit bias passed as a ``[1, 1, 1, U]`` additive ``attn_mask`` (measured on CPU: the mask adds ~4%
to SDPA, an extra head-dim channel carrying the bias makes SDPA 2.6x slower at D = 128 -> 129). Plain SDPA then runs on
``[1, H, U, D]`` with no padding. Every op has a plain-PyTorch ``*_reference`` twin.

Backends of `token_dedup_attention` (keyword ``backend``, or `tokens_backend(...)` for a block of calls):
``"torch"`` is the path above; ``"triton"`` runs the same structured form in one Triton kernel
(``ops.timeripple_triton.biased_attention_triton``: unique rows over merged keys with the float32 ``log(count)``
bias per key, no ``attn_mask`` tensor); ``"auto"`` (default) takes Triton on CUDA tensors when triton imports and
the torch path otherwise (CPU by default: nothing changes there). Forcing ``"triton"`` where it cannot run raises
``TritonUnavailableError`` (a ``ConfigError``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vdit_accel.errors import ConfigError, check_choice
from vdit_accel.ops.timeripple import (
    AXES,
    MIN_DELTA,
    ReuseStats,
    _check_axes,
    _check_int,
    _check_layout,
    _check_priority,
    _window_geometry,
)
from vdit_accel.ops.timeripple_triton import TritonUnavailableError, biased_attention_triton, triton_usable

_TINY = 1e-30  # guards the RMS denominator of an all-zero window (spread 0: identical tokens)

logger = logging.getLogger(__name__)

TOKENS_BACKENDS = ("auto", "torch", "triton")
_backend_override: str | None = None
_warned: set[tuple] = set()
_failed: set[tuple] = set()  # (device, dtype, D, Dv) where the kernel raised under "auto": SDPA from then on


def set_tokens_backend(name: str | None) -> str | None:
    """Force the backend of `token_dedup_attention` calls that pass ``backend="auto"``; return the previous one.

    Args:
        name (`str | None`): one of `TOKENS_BACKENDS`; ``"auto"`` or ``None`` restores the automatic choice.

    Example:
        >>> previous = set_tokens_backend("torch")
        >>> set_tokens_backend(previous)
        'torch'
    """
    global _backend_override
    if name is not None:
        check_choice("backend", name, TOKENS_BACKENDS)
    previous, _backend_override = _backend_override, (None if name == "auto" else name)
    return previous


@contextlib.contextmanager
def tokens_backend(name: str | None) -> Iterator[None]:
    """Context manager form of `set_tokens_backend` (restores the previous choice on exit).

    Example:
        >>> q = k = v = torch.ones(1, 4, 2, 3)
        >>> with tokens_backend("torch"):
        ...     out, st = token_dedup_attention(q, k, v, None, None)
    """
    previous = set_tokens_backend(name)
    try:
        yield
    finally:
        set_tokens_backend(previous)


def resolve_tokens_backend(backend: str, device: torch.device | str) -> str:
    """The backend (``"torch"`` or ``"triton"``) a call with `backend` on `device` runs.

    ``"auto"`` defers to `set_tokens_backend`'s choice when one is set, else takes Triton on CUDA when it can run
    there (else the torch path, with a one-time warning on CUDA). A forced ``"triton"`` that cannot run raises.

    Raises:
        ConfigError: `backend` is not one of `TOKENS_BACKENDS`.
        TritonUnavailableError: ``"triton"`` is forced (here or by `set_tokens_backend`) and cannot run on `device`.

    Example:
        >>> resolve_tokens_backend("auto", "cpu")
        'torch'
    """
    return _resolve(backend, device)[0]


def _resolve(backend: str, device: torch.device | str) -> tuple[str, bool]:
    """`(backend to run, whether "triton" was forced)`; see `resolve_tokens_backend`."""
    check_choice("backend", backend, TOKENS_BACKENDS)
    if backend == "auto" and _backend_override is not None:
        backend = _backend_override
    device = torch.device(device)
    if backend == "torch":
        return "torch", False
    ok, why = triton_usable(device)
    if backend == "triton":
        if not ok:
            raise TritonUnavailableError(f"backend='triton' is not accepted here: {why}; use backend='torch' "
                                         "or 'auto'")
        return "triton", True
    if device.type == "cuda":
        if ok:
            return "triton", False
        _warn_once(("auto", device.type), f"tokens variant: {why}")
    return "torch", False


def _warn_once(key: tuple, reason: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s; using the torch SDPA path (same results, slower)", reason)


def _attend_unique(qb, kb, vb, bias, scale, use_triton: bool, forced: bool) -> torch.Tensor:
    """Attention of `qb` `[Uq, H, D]` over `kb` `[Uk, H, D]`, `vb` `[Uk, H, Dv]` with the per-key logit bias
    `bias` `[Uk]` (or `None`) -> `[Uq, H, Dv]`. On the Triton path a kernel error under ``"auto"`` falls back to
    SDPA (one-time warning, and that device/dtype/head dim stays on SDPA); a forced ``"triton"`` raises it."""
    key = ("kernel", str(qb.device), qb.dtype, qb.shape[-1], vb.shape[-1])
    if use_triton and (forced or key not in _failed):
        try:  # [1, U, H, *] views in place; the float32 bias goes to the kernel as one value per key
            kbias = None if bias is None else bias.float()[None]
            return biased_attention_triton(qb[None], kb[None], vb[None], kbias, scale=scale)[0][0]
        except Exception as e:
            if forced:
                raise
            _failed.add(key)
            _warn_once(key, f"tokens variant: the Triton kernel failed on {key[1:]} ({type(e).__name__}: {e})")
    mask = None if bias is None else bias.to(qb.dtype).view(1, 1, 1, -1)
    return F.scaled_dot_product_attention(
        qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None], attn_mask=mask, scale=scale
    )[0].transpose(0, 1)


@dataclass(frozen=True)
class TokenDecisions:
    """Per-token reuse decisions of one attention call.

    Args:
        root (`torch.Tensor`): `[B, S]` long; `root[b, s] <= s` is the token whose q/k token `s` takes
            (`root[root] == root`; text tokens and non-reused tokens are their own root).
        spread (`dict[str, torch.Tensor]`): axis -> `[B, S]` relative windowed spread (inf where the token cannot
            reuse along the axis: first token of its window, windows of size 1, text).
        anchor (`dict[str, torch.Tensor]`): axis -> `[S]` long, the window's first token.
        theta (`float`): the threshold the decisions were taken at.
    """

    root: torch.Tensor
    spread: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    theta: float
    index_cache: dict = field(default_factory=dict, compare=False, repr=False)
    """What `token_dedup_attention` derives from `root` alone (unique tokens, positions, counts), kept with the
    decisions so that decisions used again (``TimeRippleConfig.decision_interval``) do not derive it again."""

    @property
    def reused(self) -> float:
        """Fraction of the `B*S` tokens that take another token's q/k."""
        ar = torch.arange(self.root.shape[1], device=self.root.device)
        return float((self.root != ar).float().mean())


def _axis_spread(v: torch.Tensor, n2: torch.Tensor, dim: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed (Σ_c Var, Σ_c mean square) of `v` `[B, T, Hg, Wg, C]` along grid dim `dim`, broadcast to tokens.

    `n2` is `Σ_c v²` per token (`[B, T, Hg, Wg]`, computed once per tensor); `Σ_c Var = mean_j n2_j − ‖mean_j v_j‖²`,
    so each axis costs one window mean of `v` and one norm of the (1/K as large) mean.
    """
    n = v.shape[dim]
    full = n // window * window
    var_parts, ms_parts = [], []
    for start, size, k in ((0, full, window), (full, n - full, n - full)):
        if size == 0:
            continue
        part, n2p = v.narrow(dim, start, size), n2.narrow(dim, start, size)
        shape = part.shape[:dim] + (size // k, k) + part.shape[dim + 1 :]
        ms = n2p.reshape(shape[:-1]).mean(dim + 1, keepdim=True)
        mean = part.reshape(shape).mean(dim + 1)
        var = (ms - torch.linalg.vector_norm(mean, dim=-1).square().unsqueeze(dim + 1)).clamp_min(0.0)
        if k == 1:
            var = torch.full_like(var, float("inf"))  # a window of size 1 has no reuse
        var_parts.append(var.expand(shape[:-1]).reshape(part.shape[:-1]))
        ms_parts.append(ms.expand(shape[:-1]).reshape(part.shape[:-1]))
    if len(var_parts) == 1:
        return var_parts[0], ms_parts[0]
    return torch.cat(var_parts, dim), torch.cat(ms_parts, dim)


def _roots_from_parent(parent: torch.Tensor, n_axes: int) -> torch.Tensor:
    # chains are at most n_axes long (an anchor is the first token of its window along the axis it was reached by)
    for _ in range(max(1, math.ceil(math.log2(n_axes + 1)))):
        parent = parent.gather(1, parent)
    return parent


def _parent(spread: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], theta: float, priority: str):
    first = next(iter(spread.values()))
    b, s = first.shape
    ar = torch.arange(s, device=first.device).expand(b, s)
    axes = tuple(spread)
    if priority == MIN_DELTA:
        stacked = torch.stack([spread[a] for a in axes])  # [A, B, S]
        best, winner = stacked.min(0)
        src = torch.stack([anchors[a].to(first.device).expand(b, s) for a in axes]).gather(0, winner[None])[0]
        return torch.where(best < theta, src, ar)
    parent = ar
    for a in reversed([p for p in priority if p in spread]):  # the first axis in priority order wins
        parent = torch.where(spread[a] < theta, anchors[a].to(first.device).expand(b, s), parent)
    return parent


def _check_tokens(xs, grid, window, axes, priority, text_prefix, text_suffix, theta):
    if not xs:
        raise ConfigError("xs=[] is not accepted: give at least one [B, S, H, D] tensor (q and/or k)")
    for x in xs:
        _check_layout(x, grid, text_prefix, text_suffix)
        if x.shape[:2] != xs[0].shape[:2]:
            raise ConfigError(f"shapes {[tuple(t.shape) for t in xs]} are not accepted: B and S must match")
    axes = _check_axes(axes)
    _check_int("window", window, 2)
    _check_priority(priority, axes)
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta >= 0:
        raise ConfigError(f"theta={theta!r} is out of range: accepted a float in [0, inf]")
    return axes


def token_decisions(
    xs: list[torch.Tensor],
    grid: tuple[int, int, int],
    theta: float,
    *,
    window: int = 2,
    axes: tuple[str, ...] = AXES,
    priority: str = "thw",
    text_prefix: int = 0,
    text_suffix: int = 0,
    channel_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TokenDecisions:
    """One reuse decision per token from the relative windowed spread of every tensor in `xs` (the largest wins).

    Args:
        xs (`list[torch.Tensor]`): `[B, S, H, D]` post-RoPE tensors deciding together (e.g. `[q, k]`); `H, D` may
            differ between them.
        grid (`tuple[int, int, int]`): `(T, Hg, Wg)`, `S = text_prefix + T*Hg*Wg + text_suffix`.
        theta (`float`): relative spread threshold in `[0, inf]` (strict `<`); 0 reuses nothing, and since the
            spread is at most 1, any θ > 1 reuses every token that can reuse (7/8 on even grids with `K = 2`).
        window (`int`, defaults to 2): window size K (non-overlapping windows; a trailing partial window uses
            its size).
        axes (`tuple[str, ...]`, defaults to `AXES`), priority (`str`, defaults to `"thw"`): as `resolve_reuse`
            (`"min_delta"` takes the passing axis with the smallest spread).
        text_prefix (`int`, defaults to 0), text_suffix (`int`, defaults to 0): text token counts (never reused).
        channel_sum (`Callable | None`, defaults to `None`): when this process holds only some of the heads (Ulysses
            context parallelism), sums a per-token channel sum `[B, T, Hg, Wg]` over the processes that hold the
            others (an all-reduce), so every process decides on all heads; `None`: `xs` hold every head.

    Returns:
        `TokenDecisions` (roots `[B, S]`).

    Example:
        >>> x = torch.ones(1, 8, 2, 4)
        >>> token_decisions([x, x], (2, 2, 2), 0.5).root.flatten().tolist()
        [0, 0, 0, 0, 0, 0, 0, 0]
    """
    axes = _check_tokens(xs, grid, window, axes, priority, text_prefix, text_suffix, theta)
    b, s = xs[0].shape[:2]
    n = math.prod(grid)
    spread, anchors = {}, {}
    vids = []
    for x in xs:
        vid = x[:, text_prefix : text_prefix + n].reshape(b, *grid, -1)
        vid = vid.float() if vid.dtype in (torch.float16, torch.bfloat16) else vid
        vids.append((vid, torch.linalg.vector_norm(vid, dim=-1).square()))
    for a in axes:
        rel = None
        for vid, n2 in vids:
            var, ms = _axis_spread(vid, n2, 1 + AXES.index(a), window)
            if channel_sum is not None:
                var, ms = channel_sum(var), channel_sum(ms)
            r = (var / ms.clamp_min(_TINY)).sqrt().reshape(b, n)
            rel = r if rel is None else torch.maximum(rel, r)
        anchor, valid = _window_geometry(grid, a, window, text_prefix, text_suffix, xs[0].device)
        full = torch.full((b, s), float("inf"), dtype=rel.dtype, device=rel.device)
        full[:, text_prefix : text_prefix + n] = rel
        spread[a] = full.masked_fill(~valid.view(1, s), float("inf"))
        anchors[a] = anchor
    root = _roots_from_parent(_parent(spread, anchors, theta, priority), len(axes))
    return TokenDecisions(root, spread, anchors, float(theta))


def token_decisions_reference(
    xs: list[torch.Tensor],
    grid: tuple[int, int, int],
    theta: float,
    *,
    window: int = 2,
    axes: tuple[str, ...] = AXES,
    priority: str = "thw",
    text_prefix: int = 0,
    text_suffix: int = 0,
) -> TokenDecisions:
    """Plain-PyTorch twin of `token_decisions`: explicit loops over tokens and windows in float64 (small sizes).

    Example:
        >>> x = torch.ones(1, 8, 2, 4)
        >>> token_decisions_reference([x], (2, 2, 2), 0.5).root.flatten().tolist()
        [0, 0, 0, 0, 0, 0, 0, 0]
    """
    axes = _check_tokens(xs, grid, window, axes, priority, text_prefix, text_suffix, theta)
    b, s = xs[0].shape[:2]
    tg, hg, wg = grid
    coords = [(t, h, w) for t in range(tg) for h in range(hg) for w in range(wg)]
    spread = {a: torch.full((b, s), float("inf"), dtype=torch.float64) for a in axes}
    anchors = {a: torch.arange(s) for a in axes}
    for i, c in enumerate(coords):
        for a in axes:
            ai = AXES.index(a)
            start = c[ai] - c[ai] % window
            members = [c[:ai] + (j,) + c[ai + 1 :] for j in range(start, min(start + window, grid[ai]))]
            idx = [text_prefix + (m[0] * hg + m[1]) * wg + m[2] for m in members]
            anchors[a][text_prefix + i] = idx[0]
            if c[ai] == start:
                continue
            for bi in range(b):
                rels = []
                for x in xs:
                    w = x[bi, idx].double().reshape(len(idx), -1)  # [K, H*D]
                    var = ((w - w.mean(0)) ** 2).mean(0).sum()
                    ms = (w**2).mean(0).sum()
                    rels.append(float((var / max(float(ms), _TINY)) ** 0.5))
                spread[a][bi, text_prefix + i] = max(rels)
    names = list(axes) if priority == MIN_DELTA else [p for p in priority if p in axes]
    parent = torch.arange(s).repeat(b, 1)
    for bi in range(b):
        for i in range(s):
            passing = [a for a in names if float(spread[a][bi, i]) < theta]
            if priority == MIN_DELTA and passing:
                passing = [min(passing, key=lambda a: (float(spread[a][bi, i]), names.index(a)))]
            if passing:
                parent[bi, i] = anchors[passing[0]][i]
    root = parent.clone()
    for bi in range(b):
        for i in range(s):
            r = i
            while int(parent[bi, r]) != r:
                r = int(parent[bi, r])
            root[bi, i] = r
    dev = xs[0].device
    spread = {a: v.to(dev) for a, v in spread.items()}
    return TokenDecisions(root.to(dev), spread, {a: v.to(dev) for a, v in anchors.items()}, float(theta))


@dataclass(frozen=True)
class TokenDedupStats:
    """What one `token_dedup_attention` call removed (fractions over `B*S`; work share of dense scores)."""

    rows_removed: float
    keys_removed: float
    attn_work: float


KEY_MERGES = ("root", "mean")
"""How the keys of one root's group merge into one key: the root's key (TimeRipple's K̃), or the group's mean."""


def substitute_keys(k: torch.Tensor, root: torch.Tensor, key_merge: str = "root") -> torch.Tensor:
    """`k̃` `[B, S, H, D]`: every key replaced by its root's key (``"root"``) or by the mean key of its root's group
    (``"mean"``), the keys a merged-key attention attends with, in full (no keys removed).

    Args:
        k (`torch.Tensor`): `[B, S, H, D]`; root (`torch.Tensor`): `[B, S]` long roots (`TokenDecisions.root`).
        key_merge (`str`): one of :data:`KEY_MERGES`.

    Example:
        >>> k = torch.arange(4.0).view(1, 4, 1, 1)
        >>> root = torch.tensor([[0, 0, 2, 2]])
        >>> substitute_keys(k, root, "mean").flatten().tolist()
        [0.5, 0.5, 2.5, 2.5]
    """
    check_choice("key_merge", key_merge, KEY_MERGES)
    at = root[..., None, None].expand(k.shape)
    if key_merge == "root":
        return k.gather(1, at)
    acc = torch.promote_types(k.dtype, torch.float32)  # group sums by root, over the group sizes, read at each root
    sums = torch.zeros(k.shape, dtype=acc, device=k.device).scatter_add_(1, at, k.to(acc))
    counts = torch.zeros(root.shape, dtype=acc, device=k.device).scatter_add_(
        1, root, torch.ones(root.shape, dtype=acc, device=k.device))
    return (sums / counts.clamp(min=1)[..., None, None]).gather(1, at).to(k.dtype)


def _check_root(root: torch.Tensor | None, b: int, s: int, name: str) -> None:
    if root is None:
        return
    if root.shape != (b, s) or root.dtype != torch.long:
        raise ConfigError(f"{name}.shape={tuple(root.shape)} is not accepted: expected long [B, S]=[{b}, {s}]")


def token_dedup_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_root: torch.Tensor | None,
    k_root: torch.Tensor | None,
    *,
    scale: float | None = None,
    backend: str = "auto",
    key_merge: str = "root",
    index_cache: dict | None = None,
) -> tuple[torch.Tensor, TokenDedupStats]:
    """Attention on unique query tokens against merged keys (all heads at once), gathered back.

    Equals dense attention on `q̃[b, s] = q[b, q_root[b, s]]`, `k̃[b, s] = k[b, k_root[b, s]]` and `v` up to float
    rounding: duplicate queries copy their root's output; the keys of one root merge into the root's key with the
    mean value and `+log(count)` on its logit (additive `attn_mask`). With ``key_merge="mean"`` the merged key is
    the mean key of the root's group instead (`k̃[b, s]` = that mean for every member): the logits' first-order
    error over the group cancels, ``Σ_i exp(q·k_i) v_i ≈ n exp(q·k̄) v̄`` up to second order in the spread, where the
    root's key leaves a first-order error (see ``docs/timeripple.md``).

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]`.
        v (`torch.Tensor`): `[B, S, H, Dv]`.
        q_root, k_root (`torch.Tensor | None`): `[B, S]` long roots (`root[root] == root`, `root[s] <= s`), e.g.
            `TokenDecisions.root`; `None` removes nothing on that side.
        scale (`float | None`, defaults to `None`): score scale, `1/sqrt(D)` when `None`.
        backend (`str`, defaults to `"auto"`): `"torch"` (SDPA with an additive `attn_mask`), `"triton"` (the
            biased flash kernel of `ops.timeripple_triton`, float32 bias) or `"auto"` (see `resolve_tokens_backend`).
        key_merge (`str`, defaults to `"root"`): the merged key of a group, `"root"` (the root's key: TimeRipple's
            K̃ substitution) or `"mean"` (the group's mean key, one more `index_add_` over `[S, H, D]`).
        index_cache (`dict | None`, defaults to `None`): where to keep (and find) what the roots alone determine
            (unique tokens, each token's position among them, the key counts); valid only for these very roots,
            e.g. `TokenDecisions.index_cache`. `None`: derived on every call.

    Returns:
        out: `[B, S, H, Dv]` in `v.dtype`; stats (`TokenDedupStats`).

    Raises:
        ConfigError: bad shapes or roots, or an unknown `backend`; `TritonUnavailableError` (a `ConfigError`) when
            `"triton"` is forced where it cannot run.

    Example:
        >>> q = k = v = torch.ones(1, 4, 2, 3)
        >>> root = torch.zeros(1, 4, dtype=torch.long)
        >>> out, st = token_dedup_attention(q, k, v, root, root)
        >>> torch.allclose(out, v), st.rows_removed, st.keys_removed
        (True, 0.75, 0.75)
    """
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ConfigError(f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} are not accepted: "
                          "expected q and k [B, S, H, D] and v [B, S, H, Dv]")
    b, s = q.shape[:2]
    _check_root(q_root, b, s, "q_root")
    _check_root(k_root, b, s, "k_root")
    check_choice("key_merge", key_merge, KEY_MERGES)
    chosen, forced = _resolve(backend, q.device)
    ar = torch.arange(s, device=q.device)
    outs, nq_all, nk_all, work = [], 0, 0, 0.0
    acc = torch.promote_types(v.dtype, torch.float32)
    cache = {} if index_cache is None else index_cache

    def unique(side: str, bi: int, root: torch.Tensor):
        """(unique tokens u, each token's index into u; for keys also the count of each unique token and its log)
        of one item's roots, or None when every token is its own root."""
        key = (side, bi, acc)
        if key not in cache:
            is_root = root == ar
            u = is_root.nonzero().squeeze(1)
            if u.numel() == s:
                cache[key] = None
            else:
                pos = (is_root.cumsum(0) - 1).gather(0, root)  # index into u of every token's root
                cache[key] = (u, pos)
                if side == "k":  # merged keys weigh by their counts; unique queries need none
                    count = torch.zeros(u.numel(), dtype=acc, device=v.device).index_add_(
                        0, pos, torch.ones(s, dtype=acc, device=v.device))
                    cache[key] += (count, count.log())
        return cache[key]

    for bi in range(b):  # B is 1 or 2 (CFG); unique counts differ per item, so no padding is needed this way
        qb, kb, vb = q[bi], k[bi], v[bi]  # [S, H, *]
        q_pos = None
        found = None if q_root is None else unique("q", bi, q_root[bi])
        if found is not None:
            u, q_pos = found
            qb = qb.index_select(0, u)
        bias = None
        found = None if k_root is None else unique("k", bi, k_root[bi])
        if found is not None:
            u, k_pos, count, bias = found  # bias: log(count) [Uk]
            vsum = torch.zeros((u.numel(),) + vb.shape[1:], dtype=acc, device=v.device).index_add_(
                0, k_pos, vb.to(acc))
            vb = (vsum / count.view(-1, 1, 1)).to(v.dtype)
            if key_merge == "mean":
                ksum = torch.zeros((u.numel(),) + kb.shape[1:], dtype=acc, device=k.device).index_add_(
                    0, k_pos, kb.to(acc))
                kb = (ksum / count.view(-1, 1, 1)).to(k.dtype)
            else:
                kb = kb.index_select(0, u)
        out = _attend_unique(qb, kb, vb, bias, scale, chosen == "triton", forced)  # [Uq, H, Dv]
        if q_pos is not None:
            out = out.index_select(0, q_pos)
        outs.append(out)
        nq_all, nk_all = nq_all + qb.shape[0], nk_all + kb.shape[0]
        work += qb.shape[0] * kb.shape[0] / (s * s)
    stats = TokenDedupStats(1.0 - nq_all / (b * s), 1.0 - nk_all / (b * s), work / b)
    return torch.stack(outs), stats


def token_dedup_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_root: torch.Tensor | None,
    k_root: torch.Tensor | None,
    *,
    scale: float | None = None,
    key_merge: str = "root",
) -> torch.Tensor:
    """Plain-PyTorch twin of `token_dedup_attention`: substitute the roots' q/k (``key_merge="mean"``: every key by
    the mean key of its root's group), then float64 dense attention.

    Example:
        >>> q = k = v = torch.ones(1, 4, 2, 3)
        >>> root = torch.zeros(1, 4, dtype=torch.long)
        >>> torch.allclose(token_dedup_attention_reference(q, k, v, root, root), v)
        True
    """
    b, s, _, d = q.shape
    ident = torch.arange(s, device=q.device).expand(b, s)
    qr = q_root if q_root is not None else ident
    kr = k_root if k_root is not None else ident
    qt = q.double().gather(1, qr[..., None, None].expand(q.shape))
    kt = substitute_keys(k.double(), kr, key_merge)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", qt, kt) * scale
    out = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v.double())
    return out.to(v.dtype)


def token_stats(dec: TokenDecisions | None, shape: torch.Size, axes: tuple[str, ...], reuse_q: bool, reuse_k: bool,
                dstats: TokenDedupStats, rope_groups: dict[str, slice] | None) -> ReuseStats:
    """`ReuseStats` of a token-level call: a reused token reuses every channel of every head, so the element
    fractions equal the token fractions and `qk_savings = 1 - (1 - r_q)(1 - r_k)`."""
    r = 0.0 if dec is None else dec.reused
    per_axis = {a: 0.0 if dec is None else float((dec.spread[a] < dec.theta).float().mean()) for a in axes}
    zeros = dict.fromkeys(axes, 0.0)
    rq, rk = (r if reuse_q else 0.0), (r if reuse_k else 0.0)
    savings = 1.0 - (1.0 - rq) * (1.0 - rk)
    groups = rope_groups or {}
    return ReuseStats(rq, rk, per_axis if reuse_q else zeros, per_axis if reuse_k else zeros,
                      dict.fromkeys(groups, rq), dict.fromkeys(groups, rk), savings, [savings] * shape[2],
                      dstats.rows_removed, dstats.keys_removed, dstats.attn_work)


def tokens_timeripple_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    thresholds: float,
    window: int = 2,
    axes: tuple[str, ...] = AXES,
    priority: str = "thw",
    text_prefix: int = 0,
    text_suffix: int = 0,
    reuse_q: bool = True,
    reuse_k: bool = True,
    scale: float | None = None,
    rope_groups: dict[str, slice] | None = None,
    decisions: TokenDecisions | None = None,
    backend: str = "auto",
    key_merge: str = "root",
) -> tuple[torch.Tensor, ReuseStats, TokenDecisions | None]:
    """The ``"tokens"`` variant end to end: `token_decisions` on the sides that reuse, then `token_dedup_attention`.

    Args:
        q, k (`torch.Tensor`): `[B, S, H, D]` post-RoPE; v (`torch.Tensor`): `[B, S, H, Dv]`.
        thresholds (`float`): the relative spread threshold θ (one shared value; dict/tensor thresholds are
            rejected: this variant has no per-axis or per-channel θ).
        grid, window, axes, priority, text_prefix, text_suffix: see `token_decisions`.
        reuse_q, reuse_k (`bool`): which sides reuse; both decide together when both reuse.
        scale, rope_groups: see `timeripple_attention`.
        decisions (`TokenDecisions | None`, defaults to `None`): decisions to use instead of computing them (e.g.
            kept from an earlier call); their root must be `[B, S]`.
        backend (`str`, defaults to `"auto"`): attention backend, see `token_dedup_attention`.
        key_merge (`str`, defaults to `"root"`): the merged key of a group, see `token_dedup_attention`.

    Returns:
        out `[B, S, H, Dv]`, stats (`ReuseStats` with `rows_removed`, `keys_removed`, `attn_work`), and the
        decisions used (`None` when θ = 0: dense SDPA).

    Example:
        >>> q = k = v = torch.zeros(1, 8, 2, 6)
        >>> out, st, _ = tokens_timeripple_attention(q, k, v, grid=(2, 2, 2), thresholds=0.5)
        >>> st.rows_removed, st.keys_removed
        (0.875, 0.875)
    """
    if isinstance(thresholds, dict | torch.Tensor):
        raise ConfigError("thresholds for the 'tokens' variant is one float (a relative spread); per-axis and "
                          "per-channel thresholds are not accepted (threshold_mode='shared')")
    if not (reuse_q or reuse_k):
        raise ConfigError("reuse_q=False and reuse_k=False reuse nothing: enable at least one")
    axes = _check_axes(axes)
    dec = decisions
    if dec is None and thresholds > 0:
        xs = [x for x, on in ((q, reuse_q), (k, reuse_k)) if on]
        dec = token_decisions(xs, grid, thresholds, window=window, axes=axes, priority=priority,
                              text_prefix=text_prefix, text_suffix=text_suffix)
    elif dec is None:
        _check_tokens([q], grid, window, axes, priority, text_prefix, text_suffix, thresholds)
    root = None if dec is None else dec.root
    out, dstats = token_dedup_attention(q, k, v, root if reuse_q else None, root if reuse_k else None, scale=scale,
                                        backend=backend, key_merge=key_merge,
                                        index_cache=None if dec is None else dec.index_cache)
    return out, token_stats(dec, q.shape, axes, reuse_q, reuse_k, dstats, rope_groups), dec
