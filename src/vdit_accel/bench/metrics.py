"""Fidelity metrics between a reference video and an accelerated one: PSNR, SSIM, worst-patch and temporal PSNR.

Mean PSNR hides local and temporal damage, so the bench also reports :func:`worst_patch_psnr` (the PSNR of the
worst ``WORST_PATCH_SIDE``-pixel square of any frame: a smeared object in one corner) and :func:`temporal_psnr`
(the PSNR of the frame-to-frame differences against the reference's: flicker that per-frame PSNR cannot see).
Videos with a non-finite value are refused, so no metric here is ever NaN; :func:`check_metric` guards what
is recorded.

Videos are `[3, F, H, W]` (channels, frames, height, width) in [-1, 1], as the sampler returns them, so the
default ``data_range`` is 2. Inputs may be `torch.Tensor` or `np.ndarray`; they are compared in float64.

Example:
    >>> import numpy as np
    >>> a = np.zeros((3, 2, 16, 16), np.float32)
    >>> round(psnr(a, a + 0.1), 4)  # constant error 0.1 on a data range of 2: 10 * log10(4 / 0.01)
    26.0206
    >>> ssim(a, a)
    1.0
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from vdit_accel.errors import ConfigError

VIDEO_DATA_RANGE = 2.0  # videos live in [-1, 1]
RGB_CHANNELS = 3
SSIM_WINDOW = 7  # skimage's default window side; frames must be at least this large
WORST_PATCH_SIDE = 16  # pixels: the side of the squares worst_patch_psnr tiles each frame into


def _as_video(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_pair(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, data_range: float
) -> tuple[np.ndarray, np.ndarray]:
    if not data_range > 0:  # also rejects NaN
        raise ConfigError(f"data_range={data_range!r} is out of range: accepted (0.0, inf)")
    va, vb = _as_video(a), _as_video(b)
    if va.shape != vb.shape:
        raise ConfigError(f"videos must have the same shape: got a {tuple(va.shape)} and b {tuple(vb.shape)}")
    if va.ndim != 4 or va.shape[0] != RGB_CHANNELS:
        raise ConfigError(f"videos must have shape [3, F, H, W]: got {tuple(va.shape)}")
    if va.size == 0:
        raise ConfigError(f"videos must not be empty: got shape {tuple(va.shape)}")
    for name, v in (("a", va), ("b", vb)):
        bad = int(np.count_nonzero(~np.isfinite(v)))
        if bad:
            raise ConfigError(f"video {name} has {bad} non-finite values (NaN or inf): accepted finite values only")
    return va, vb


def _psnr_from_mse(mse: np.ndarray | float, data_range: float) -> np.ndarray:
    mse = np.asarray(mse, dtype=np.float64)
    out = np.full(mse.shape, np.inf)
    positive = mse > 0
    out[positive] = 10.0 * np.log10(data_range**2 / mse[positive])
    return out


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, data_range: float = VIDEO_DATA_RANGE) -> float:
    """Peak signal-to-noise ratio over the whole video: ``10 * log10(data_range ** 2 / MSE)``.

    Args:
        a (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): reference video.
        b (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): compared video.
        data_range (`float`, defaults to 2.0): peak-to-peak range of the values (2 for [-1, 1]).

    Returns:
        `float`: PSNR in dB; ``inf`` for identical videos.

    Raises:
        ConfigError: if the shapes differ (the message names both), are not `[3, F, H, W]`, or
            ``data_range <= 0``.

    Example:
        >>> a = np.zeros((3, 1, 4, 4))
        >>> psnr(a, a)
        inf
        >>> round(psnr(a, a + 0.2), 3)
        20.0
    """
    va, vb = _check_pair(a, b, data_range)
    return float(_psnr_from_mse(np.mean((va - vb) ** 2), data_range))


def psnr_per_frame(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, data_range: float = VIDEO_DATA_RANGE
) -> np.ndarray:
    """PSNR of each frame (MSE over channels, height and width).

    Args:
        a (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): reference video.
        b (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): compared video.
        data_range (`float`, defaults to 2.0): peak-to-peak range of the values.

    Returns:
        `np.ndarray` float64 of shape `[F]`: PSNR in dB per frame, ``inf`` where a frame is identical.

    Raises:
        ConfigError: as :func:`psnr`.

    Example:
        >>> a = np.zeros((3, 2, 4, 4))
        >>> b = a.copy()
        >>> b[:, 1] += 0.2
        >>> psnr_per_frame(a, b).round(3).tolist()
        [inf, 20.0]
    """
    va, vb = _check_pair(a, b, data_range)
    mse = np.mean((va - vb) ** 2, axis=(0, 2, 3))
    return _psnr_from_mse(mse, data_range)


def ssim(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, data_range: float = VIDEO_DATA_RANGE) -> float:
    """Structural similarity: the mean over frames of ``skimage.metrics.structural_similarity`` on `[H, W, 3]`.

    Each frame uses skimage's defaults (7x7 uniform window, K1 = 0.01, K2 = 0.03) with ``channel_axis=-1``,
    so its SSIM is the mean over the three channels.

    Args:
        a (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): reference video.
        b (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): compared video.
        data_range (`float`, defaults to 2.0): peak-to-peak range of the values.

    Returns:
        `float`: mean SSIM over frames, 1.0 for identical videos.

    Raises:
        ConfigError: as :func:`psnr`, or if a frame is smaller than 7x7 pixels.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a = rng.uniform(-1, 1, (3, 2, 16, 16))
        >>> ssim(a, a), ssim(a, a + rng.normal(0, 0.5, a.shape)) < 0.9
        (1.0, True)
    """
    va, vb = _check_pair(a, b, data_range)
    if min(va.shape[2:]) < SSIM_WINDOW:
        raise ConfigError(f"ssim needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels: got {va.shape[2:]}")
    values = [
        structural_similarity(
            va[:, f].transpose(1, 2, 0), vb[:, f].transpose(1, 2, 0), data_range=data_range, channel_axis=-1
        )
        for f in range(va.shape[1])
    ]
    return float(np.mean(values))


def worst_patch_psnr(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    data_range: float = VIDEO_DATA_RANGE,
    patch: int = WORST_PATCH_SIDE,
) -> float:
    """PSNR of the worst spatial patch of any frame: the largest per-patch MSE over all frames and patches.

    Each frame is tiled from its top-left corner into ``patch x patch`` squares; where ``H`` or ``W`` is not a
    multiple of ``patch`` the last row or column of patches is narrower (it covers the remaining pixels and
    counts like any other patch), and a frame smaller than ``patch`` is one patch. A patch's MSE is over its
    three channels and pixels.

    Args:
        a (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): reference video.
        b (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): compared video.
        data_range (`float`, defaults to 2.0): peak-to-peak range of the values.
        patch (`int`, defaults to ``WORST_PATCH_SIDE`` = 16): patch side in pixels, at least 1.

    Returns:
        `float`: PSNR in dB of the worst patch, ``inf`` for identical videos; never above :func:`psnr`.

    Raises:
        ConfigError: as :func:`psnr`, or if ``patch < 1``.

    Example:
        >>> a = np.zeros((3, 2, 32, 32))
        >>> b = a.copy()
        >>> b[:, 1, :16, :16] = 0.2  # one patch of one frame: MSE 0.04 there, 0.04 / 8 over the video
        >>> round(worst_patch_psnr(a, b), 3), round(psnr(a, b), 3)
        (20.0, 29.031)
    """
    va, vb = _check_pair(a, b, data_range)
    if isinstance(patch, bool) or not isinstance(patch, int | np.integer) or patch < 1:
        raise ConfigError(f"patch={patch!r} is out of range: accepted an integer in [1, inf)")
    _, _, h, w = va.shape
    sq = np.sum((va - vb) ** 2, axis=0)  # [F, H, W]
    rows, cols = np.arange(0, h, patch), np.arange(0, w, patch)
    sums = np.add.reduceat(np.add.reduceat(sq, rows, axis=1), cols, axis=2)  # [F, H / patch, W / patch]
    sizes = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w)))  # pixels per patch
    mse = sums / (RGB_CHANNELS * sizes)
    return float(_psnr_from_mse(np.max(mse), data_range))


def temporal_psnr(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, data_range: float = VIDEO_DATA_RANGE
) -> float:
    """PSNR of the frame-to-frame differences: ``b[:, 1:] - b[:, :-1]`` against ``a[:, 1:] - a[:, :-1]``.

    A video whose frames each carry the same error (a constant offset) has the reference's motion and scores
    ``inf``; one whose error changes sign from frame to frame flickers and scores low, even when every frame's
    PSNR is the same. Differences of values in a range of ``data_range`` span ``2 * data_range``, which is
    the peak used.

    Args:
        a (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): reference video, ``F >= 2``.
        b (`torch.Tensor` or `np.ndarray` of shape `[3, F, H, W]`): compared video.
        data_range (`float`, defaults to 2.0): peak-to-peak range of the video values.

    Returns:
        `float`: PSNR in dB of the differences `[3, F - 1, H, W]`; ``inf`` when they are identical.

    Raises:
        ConfigError: as :func:`psnr`, or if the videos have fewer than 2 frames.

    Example:
        >>> a = np.zeros((3, 3, 4, 4))
        >>> temporal_psnr(a, a + 0.1)  # same error on every frame: no flicker
        inf
        >>> flicker = a + 0.1 * np.array([1, -1, 1]).reshape(1, 3, 1, 1)  # differences off by 0.2
        >>> round(temporal_psnr(a, flicker), 3)  # 10 * log10(4 ** 2 / 0.2 ** 2)
        26.021
    """
    va, vb = _check_pair(a, b, data_range)
    if va.shape[1] < 2:
        raise ConfigError(f"temporal_psnr needs at least 2 frames: got F={va.shape[1]}")
    da, db = np.diff(va, axis=1), np.diff(vb, axis=1)
    return float(_psnr_from_mse(np.mean((da - db) ** 2), 2.0 * data_range))


def check_metric(name: str, value: float) -> float:
    """Return ``value`` as a float if it can be recorded: a number or ``+inf`` (identical videos); NaN is refused.

    Example:
        >>> check_metric("psnr", float("inf"))
        inf
        >>> check_metric("psnr", float("nan"))
        Traceback (most recent call last):
        ...
        vdit_accel.errors.ConfigError: psnr=nan is not a number: accepted a finite value or inf, never NaN
    """
    value = float(value)
    if value != value:
        raise ConfigError(f"{name}={value!r} is not a number: accepted a finite value or inf, never NaN")
    return value


__all__ = ["check_metric", "psnr", "psnr_per_frame", "ssim", "temporal_psnr", "worst_patch_psnr"]
