"""Fidelity metrics between a reference video and an accelerated one: PSNR and SSIM.

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


__all__ = ["psnr", "psnr_per_frame", "ssim"]
