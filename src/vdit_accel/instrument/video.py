"""Video tensors <-> uint8 frames <-> MP4/GIF files (imageio + imageio-ffmpeg).

Example:
    >>> import torch
    >>> frames = to_frames(torch.zeros(3, 2, 8, 8))
    >>> frames.shape, frames.dtype
    ((2, 8, 8, 3), dtype('uint8'))
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from vdit_accel.errors import WeightsError

MP4_SCALE = 4  # clips are 64 px: upscale (nearest) before encoding so H.264's 16-px macroblocks and
# chroma subsampling do not smear the content


def to_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """A video in [-1, 1] of shape `[3, F, H, W]` -> uint8 frames `[F, H, W, 3]`."""
    v = video.detach().float().cpu().numpy() if torch.is_tensor(video) else np.asarray(video, np.float32)
    v = np.clip((v + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(v.transpose(1, 2, 3, 0))


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write uint8 frames `[F, H, W, 3]` as MP4 (``.mp4``) or GIF (``.gif``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp4":
        big = frames.repeat(MP4_SCALE, axis=1).repeat(MP4_SCALE, axis=2)
        iio.imwrite(path, big, fps=fps, codec="libx264", quality=9, macro_block_size=1,
                    pixelformat="yuv444p")
    elif path.suffix == ".gif":
        iio.imwrite(path, frames.repeat(2, axis=1).repeat(2, axis=2), duration=1000 / fps, loop=0)
    else:
        raise ValueError(f"video suffix {path.suffix!r} is not accepted: use .mp4 or .gif")
    return path


def read_video(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read an MP4/GIF to uint8 frames `[F, H, W, 3]`, area-downsampled to ``size`` pixels if given.

    A clip smaller than ``size`` (or not a multiple of it) is instead downsampled by ``MP4_SCALE``, the factor
    :func:`write_video` upscales by, when that divides it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"video file {str(path)!r} is missing")
    frames = np.asarray(iio.imread(path))
    if frames.ndim == 3:
        frames = frames[None]
    frames = frames[..., :3]
    if size is not None and (frames.shape[1] < size or frames.shape[1] % size):
        size = frames.shape[1] // MP4_SCALE if frames.shape[1] % MP4_SCALE == 0 else None
    if size is not None and frames.shape[1] != size:
        f = frames.shape[1] // size
        frames = frames.reshape(frames.shape[0], size, f, size, f, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    return frames
