"""Astraea's token selection math (paper §1, Eq. 4) as pure tensor functions.

Per compute block and denoising step, Astraea scores every token and recomputes the top-``k`` of them::

    S_token = w_α · S_sig + w_β · exp(n)        S_sig = LSE(t-1) · Δ_token(t)

- ``LSE`` is the row log-sum-exp of the token's attention the last time it was computed (:func:`reduce_head_lse`
  turns the per-head ``[B, N, H]`` LSE of :mod:`vdit_accel.ops.attention` into one scalar per token);
- ``Δ`` is how far the token's block input moved since it was last computed (:func:`input_delta`);
- ``n`` is the number of consecutive steps the token was *not* selected (:func:`update_skips`).

The paper leaves the norm of Δ, the head reduction and the scaling of ``S_sig`` against ``exp(n)`` open (§1 [I]);
each is a named choice here (``NORMS``, ``LSE_REDUCTIONS``, ``SIGNAL_NORMALISATIONS``) with a documented default.
Every op has a ``*_reference`` twin written with plain Python loops, or is simple enough to be its own reference.
"""

from __future__ import annotations

import math

import torch

from vdit_accel.errors import ConfigError, check_choice, check_range

NORMS = ("l1", "l2", "rel_l2")
LSE_REDUCTIONS = ("mean", "max", "logsumexp")
SIGNAL_NORMALISATIONS = ("mean", "max", "none")
MAX_SKIP_EXPONENT = 80  # exp(80) ~ 5.5e34 still fits float32 (overflow at ~88.7); larger skip counts saturate


# ------------------------------------------------------------------------------------------------ validation
def _check_2d(**tensors: torch.Tensor) -> tuple[int, int]:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ConfigError(f"shapes {shapes} are not accepted: expected one shape [B, N] for all")
    return first


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is out of range: accepted [0.0, inf)")
    check_range(name, float(value), lo=0.0)
    return float(value)


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ConfigError(f"k={k!r} is out of range: accepted an int in [0, {n}] (N={n} tokens)")
    return k


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ----------------------------------------------------------------------------------------------------- signals
def input_delta(x: torch.Tensor, x_prev: torch.Tensor, norm: str = "l2", *, eps: float = 1e-6) -> torch.Tensor:
    """Per-token change ``Δ`` of a block's input since the token was last computed.

    - ``"l1"``: mean absolute change over channels, ``mean_c |x - x_prev|``;
    - ``"l2"`` (default): root-mean-square change over channels, ``sqrt(mean_c (x - x_prev)²)``; same scale as l1 and
      independent of ``C``, so weights transfer between model widths;
    - ``"rel_l2"``: relative change ``||x - x_prev||₂ / (||x_prev||₂ + eps)``, invariant to the token's magnitude.

    Args:
        x (`torch.Tensor` of shape `[B, N, C]`): current block input.
        x_prev (`torch.Tensor` of shape `[B, N, C]`): block input when each token was last computed.
        norm (`str`, *optional*, defaults to `"l2"`): one of ``NORMS``.
        eps (`float`, *optional*, defaults to `1e-6`): ``rel_l2`` denominator floor, ``>= 0``.

    Returns:
        `torch.Tensor` of shape `[B, N]`: float32 (float64 for float64 inputs), ``>= 0``.

    Example:
        >>> x, x_prev = torch.tensor([[[3.0, -4.0]]]), torch.zeros(1, 1, 2)
        >>> [round(input_delta(x, x_prev, n).item(), 4) for n in ("l1", "l2")]
        [3.5, 3.5355]
    """
    check_choice("norm", norm, NORMS)
    check_range("eps", eps, lo=0.0)
    if x.dim() != 3 or x.shape != x_prev.shape or x.shape[-1] < 1:
        raise ConfigError(
            f"x.shape={tuple(x.shape)}, x_prev.shape={tuple(x_prev.shape)} are not accepted: expected one shape "
            "[B, N, C] with C >= 1"
        )
    dtype = _float_dtype(x, x_prev)
    dx = x.to(dtype) - x_prev.to(dtype)  # a new tensor: the l1 / l2 passes below run in place on it
    if norm == "l1":
        return dx.abs_().mean(dim=-1)
    if norm == "l2":
        return dx.square_().mean(dim=-1).sqrt_()
    return torch.linalg.vector_norm(dx, dim=-1) / (torch.linalg.vector_norm(x_prev.to(dtype), dim=-1) + eps)


def reduce_head_lse(lse: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Reduce the per-head attention LSE to one importance scalar per token.

    ``"mean"`` (default) weighs heads equally; ``"max"`` keeps a token that matters to any single head;
    ``"logsumexp"`` is ``ln Σ_h exp(lse_h)``, the log of the token's total unnormalised attention mass over heads,
    between ``max`` and ``max + ln(H)``.

    Args:
        lse (`torch.Tensor` of shape `[B, N, H]`): per-head row LSE (``row_subset_attention``'s second output).
        how (`str`, *optional*, defaults to `"mean"`): one of ``LSE_REDUCTIONS``.

    Returns:
        `torch.Tensor` of shape `[B, N]`, in ``lse``'s dtype.

    Example:
        >>> reduce_head_lse(torch.tensor([[[1.0, 3.0]]]), "max").tolist()
        [[3.0]]
    """
    check_choice("how", how, LSE_REDUCTIONS)
    if lse.dim() != 3 or lse.shape[-1] < 1:
        raise ConfigError(f"lse.shape={tuple(lse.shape)} is not accepted: expected [B, N, H] with H >= 1")
    if how == "mean":
        return lse.mean(dim=-1)
    if how == "max":
        return lse.amax(dim=-1)
    return torch.logsumexp(lse, dim=-1)


# ------------------------------------------------------------------------------------------------------ scores
def token_scores(
    lse: torch.Tensor,
    delta: torch.Tensor,
    skips: torch.Tensor,
    *,
    w_alpha: float = 1.0,
    w_beta: float = 0.5,
    normalize: str = "mean",
) -> torch.Tensor:
    """Astraea's token score ``S = w_α · norm(lse · Δ) + w_β · exp(n)`` (paper Eq. 4).

    The signal ``lse · Δ`` is normalised per batch row, by the row's mean absolute value (``"mean"``), by its max
    absolute value (``"max"``), or not at all (``"none"``; the paper's literal formula, whose balance against
    ``exp(n)`` then depends on the model's LSE and activation scales). Dividing by an absolute statistic keeps the
    sign of each token's signal.

    Why ``"mean"`` is the default: the normalised signal has mean magnitude 1 whatever the model, resolution or
    step, so ``w_β`` has a fixed meaning. With ``w_β = 0.5`` the penalty alone, ``0.5·eⁿ``, is already comparable to
    a typical signal after one skip (``0.5·e ≈ 1.36``), outranks a just-computed typical token (``1 + 0.5``) after
    two, and outranks one with ``r`` times the mean signal once ``0.5·eⁿ > r + 0.5``, i.e. ``n > ln(2r + 1)`` (4 skips
    for ``r = 10``). The penalty thus acts as a bounded-staleness refresh: a skipped token is recomputed within
    about ``ceil(N/k) + ln(1 + 2·w_α·M/w_β)`` steps, ``M`` being the largest normalised signal (``<= N`` for
    "mean", ``<= 1`` for "max"; checked by simulation in the tests). With ``w_β = 0`` there is no such bound.

    The LSE is used as-is. It is ``>= max_j score_j`` and ``>= mean_j score_j + ln(S)``, so with thousands of keys
    it is positive in practice; a negative LSE gives a negative signal (the token ranks below a static one), and
    the penalty still guarantees its refresh. Skip counts above ``MAX_SKIP_EXPONENT`` saturate instead of
    overflowing to ``inf``.

    Args:
        lse (`torch.Tensor` of shape `[B, N]`): per-token LSE from the last time each token was computed.
        delta (`torch.Tensor` of shape `[B, N]`): per-token input change (:func:`input_delta`).
        skips (`torch.Tensor` of shape `[B, N]`, integer dtype): consecutive steps each token was not selected.
        w_alpha (`float`, *optional*, defaults to `1.0`): signal weight, ``>= 0``.
        w_beta (`float`, *optional*, defaults to `0.5`): staleness-penalty weight, ``>= 0``.
        normalize (`str`, *optional*, defaults to `"mean"`): one of ``SIGNAL_NORMALISATIONS``.

    Returns:
        `torch.Tensor` of shape `[B, N]`: float32 (float64 if ``lse`` or ``delta`` is float64).

    Example:
        >>> lse, delta = torch.tensor([[2.0, 2.0, 2.0]]), torch.tensor([[1.0, 2.0, 0.0]])
        >>> token_scores(lse, delta, torch.tensor([[0, 0, 3]])).tolist()  # [1, 2, 0] + 0.5·exp([0, 0, 3])
        [[1.5, 2.5, 10.042768478393555]]
    """
    check_choice("normalize", normalize, SIGNAL_NORMALISATIONS)
    w_alpha, w_beta = _check_weight("w_alpha", w_alpha), _check_weight("w_beta", w_beta)
    _check_2d(lse=lse, delta=delta, skips=skips)
    if skips.is_floating_point() or skips.is_complex() or skips.dtype == torch.bool:
        raise ConfigError(f"skips.dtype={skips.dtype} is not accepted: expected an integer dtype (torch.long)")
    dtype = _float_dtype(lse, delta)
    sig = lse.to(dtype) * delta.to(dtype)
    if normalize != "none" and sig.shape[-1] > 0:
        mag = sig.abs()
        denom = mag.mean(dim=-1, keepdim=True) if normalize == "mean" else mag.amax(dim=-1, keepdim=True)
        sig = torch.where(denom > 0, sig / denom, torch.zeros_like(sig))
    penalty = torch.exp(skips.clamp(max=MAX_SKIP_EXPONENT).to(dtype))
    return w_alpha * sig + w_beta * penalty


def token_scores_reference(
    lse: torch.Tensor,
    delta: torch.Tensor,
    skips: torch.Tensor,
    *,
    w_alpha: float = 1.0,
    w_beta: float = 0.5,
    normalize: str = "mean",
) -> torch.Tensor:
    """Plain-Python-loop twin of :func:`token_scores` (float64 arithmetic; for small ``B·N``).

    Example:
        >>> lse, delta, n = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 3.0]]), torch.tensor([[1, 0]])
        >>> torch.allclose(token_scores_reference(lse, delta, n), token_scores(lse, delta, n))
        True
    """
    check_choice("normalize", normalize, SIGNAL_NORMALISATIONS)
    w_alpha, w_beta = _check_weight("w_alpha", w_alpha), _check_weight("w_beta", w_beta)
    b, n = _check_2d(lse=lse, delta=delta, skips=skips)
    out = torch.empty(b, n, dtype=_float_dtype(lse, delta))
    for row in range(b):
        sig = [float(lse[row, i]) * float(delta[row, i]) for i in range(n)]
        mags = [abs(s) for s in sig]
        denom = 1.0
        if normalize == "mean" and n:
            denom = sum(mags) / n
        elif normalize == "max" and n:
            denom = max(mags)
        for i in range(n):
            s = sig[i] / denom if denom > 0 else 0.0
            out[row, i] = w_alpha * s + w_beta * math.exp(min(int(skips[row, i]), MAX_SKIP_EXPONENT))
    return out.to(lse.device)


# --------------------------------------------------------------------------------------------------- selection
def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest-scoring tokens per batch row, in ascending token order.

    Ties go to the lower token index (a stable descending sort, not ``torch.topk``, whose tie order is
    unspecified). NaN scores rank above everything, so a broken score forces a recompute rather than a stale
    reuse. The ascending output order makes the gathers/scatters of the selected rows cache-friendly.

    Args:
        scores (`torch.Tensor` of shape `[B, N]`): token scores (:func:`token_scores`).
        k (`int`): tokens to keep per row, in ``[0, N]`` (:func:`budget_to_count`).

    Returns:
        `torch.Tensor` of shape `[B, k]`, ``torch.long``, each row strictly increasing.

    Example:
        >>> select_topk(torch.tensor([[0.5, 2.0, 0.5, 2.0, 1.0]]), 3).tolist()  # 2.0, 2.0, then 1.0
        [[1, 3, 4]]
    """
    if scores.dim() != 2:
        raise ConfigError(f"scores.shape={tuple(scores.shape)} is not accepted: expected [B, N]")
    n = scores.shape[-1]
    _check_k(k, n)
    if 0 < k < n and scores.device.type == "cpu" and not torch.compiler.is_compiling():
        # On CPU, the stable sort's first k without the full sort (~2x faster at N = 2048): every score above the
        # k-th largest, then the lowest-index ties of the k-th largest (ties are common: a token whose input did
        # not move since it was last computed scores exactly its staleness penalty). A NaN kept by topk (it ranks
        # NaN highest, as the sort does) makes the k-th largest NaN: the sort below decides. Not on accelerators:
        # the check and nonzero() would sync the host every block call, where the sort does not.
        kth = torch.topk(scores, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # [B, 1]
        if not bool(kth.isnan().any()):
            above = scores > kth
            tie = scores == kth
            need = k - above.sum(dim=-1, keepdim=True)
            keep = above | (tie & (tie.cumsum(dim=-1) <= need))
            return keep.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: ascending token order per row
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


def select_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Plain-Python twin of :func:`select_topk`: ``sorted`` by (NaN first, score descending, index ascending).

    Example:
        >>> select_topk_reference(torch.tensor([[0.5, 2.0, 0.5, 2.0, 1.0]]), 3).tolist()
        [[1, 3, 4]]
    """
    if scores.dim() != 2:
        raise ConfigError(f"scores.shape={tuple(scores.shape)} is not accepted: expected [B, N]")
    _check_k(k, scores.shape[-1])
    rows = []
    for row in scores.tolist():
        ranked = sorted(range(len(row)), key=lambda i: (0, 0.0, i) if math.isnan(row[i]) else (1, -row[i], i))
        rows.append(sorted(ranked[:k]))
    return torch.tensor(rows, dtype=torch.long, device=scores.device).view(scores.shape[0], k)


def update_skips(skips: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Next skip counters: 0 for the selected tokens, ``n + 1`` for the others (out of place).

    Args:
        skips (`torch.Tensor` of shape `[B, N]`, integer dtype): current counters ``n``.
        idx (`torch.Tensor` of shape `[B, k]`, long): selected token indices (:func:`select_topk`).

    Returns:
        `torch.Tensor` of shape `[B, N]`, same dtype as ``skips``.

    Example:
        >>> update_skips(torch.tensor([[2, 0, 5]]), torch.tensor([[2]])).tolist()
        [[3, 1, 0]]
    """
    if skips.dim() != 2 or idx.dim() != 2 or idx.shape[0] != skips.shape[0]:
        raise ConfigError(
            f"skips.shape={tuple(skips.shape)}, idx.shape={tuple(idx.shape)} are not accepted: expected [B, N], [B, k]"
        )
    return (skips + 1).scatter(1, idx, 0)


def budget_to_count(budget: float, n: int) -> int:
    """Number of tokens to recompute for a budget fraction: ``round_half_up(budget·n)``, within ``[0, n]``.

    The product is first rounded to 9 decimals so that grid budgets such as ``0.35·10`` do not fall just below
    ``.5`` through float error. A small positive budget may round to 0 tokens, which means the whole step is
    reused (the paper's ``θ = 0``); callers that must compute at least one token clamp themselves.

    Args:
        budget (`float`): fraction of tokens to compute, in ``[0, 1]``.
        n (`int`): number of tokens ``N``, ``>= 0``.

    Returns:
        `int` in ``[0, n]``.

    Example:
        >>> budget_to_count(0.35, 10), budget_to_count(0.5, 3), budget_to_count(0.004, 100)
        (4, 2, 0)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} is out of range: accepted an int in [0, inf)")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"budget={budget!r} is out of range: accepted [0, 1]")
    if not 0.0 <= budget <= 1.0:  # also rejects NaN
        raise ConfigError(f"budget={budget!r} is out of range: accepted [0, 1]")
    return min(max(math.floor(round(budget * n, 9) + 0.5), 0), n)
