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

from vdit_accel.errors import OutputPathError, VideoError
from vdit_accel.validate import atomic_write

VIDEO_EXTENSIONS = (".mp4", ".gif")
MP4_SCALE = 4  # clips are 64 px: upscale (nearest) before encoding so H.264's 16-px macroblocks and
# chroma subsampling do not smear the content


def to_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """A video in [-1, 1] of shape `[3, F, H, W]` -> uint8 frames `[F, H, W, 3]`."""
    v = video.detach().float().cpu().numpy() if torch.is_tensor(video) else np.asarray(video, np.float32)
    v = np.clip((v + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(v.transpose(1, 2, 3, 0))


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write uint8 frames `[F, H, W, 3]` as MP4 (``.mp4``) or GIF (``.gif``); returns the path.

    The file is written under a temporary name in the same folder and renamed when complete, so an
    interrupted write never leaves a half-written ``path`` (an existing ``path`` is replaced only then).

    Raises:
        OutputPathError: an extension other than ``.mp4``/``.gif``, or ``path`` is a directory.
    """
    path = Path(path)
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise OutputPathError(f"video path {str(path)!r} has suffix {path.suffix!r}: "
                              f"accepted {list(VIDEO_EXTENSIONS)}")
    if path.is_dir():
        raise OutputPathError(f"video path {str(path)!r} is a directory: name a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        if path.suffix.lower() == ".mp4":
            big = frames.repeat(MP4_SCALE, axis=1).repeat(MP4_SCALE, axis=2)
            iio.imwrite(tmp, big, fps=fps, codec="libx264", quality=9, macro_block_size=1,
                        pixelformat="yuv444p")
        else:
            iio.imwrite(tmp, frames.repeat(2, axis=1).repeat(2, axis=2), duration=1000 / fps, loop=0)
    return path


def read_video(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read an MP4/GIF to uint8 frames `[F, H, W, 3]`, area-downsampled to ``size`` pixels if given.

    A clip smaller than ``size`` (or not a multiple of it) is instead downsampled by ``MP4_SCALE``, the factor
    :func:`write_video` upscales by, when that divides it.

    Raises:
        VideoError: the file is missing, empty, truncated or unreadable, has no frames, or (with ``size``) is not
            square.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file {str(path)!r} is missing")
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise VideoError(f"video file {str(path)!r} has suffix {path.suffix!r}: accepted {list(VIDEO_EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise VideoError(f"video file {str(path)!r} is empty (0 bytes)")
    try:
        frames = np.asarray(iio.imread(path))
    except (OSError, SyntaxError, ValueError, IndexError) as e:  # what imageio's ffmpeg and pillow readers raise
        raise VideoError(f"video file {str(path)!r} is truncated or not a readable MP4/GIF: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] < 3:
        raise VideoError(f"video file {str(path)!r} holds no RGB frames: shape {tuple(frames.shape)}")
    if size is not None and frames.shape[1] != frames.shape[2]:
        raise VideoError(f"video file {str(path)!r} is {frames.shape[2]}x{frames.shape[1]} pixels: accepted "
                         "square clips only (width == height)")
    frames = frames[..., :3]
    if size is not None and (frames.shape[1] < size or frames.shape[1] % size):
        size = frames.shape[1] // MP4_SCALE if frames.shape[1] % MP4_SCALE == 0 else None
    if size is not None and frames.shape[1] != size:
        f = frames.shape[1] // size
        frames = frames.reshape(frames.shape[0], size, f, size, f, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    return frames
