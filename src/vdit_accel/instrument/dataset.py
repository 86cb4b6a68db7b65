"""Procedural captioned videos: the embedded model's training data, deterministic from a seed.

Each clip shows one or two anti-aliased objects (4 shapes, 8 colours, 7 motions) over a smooth
background (5 colours; solid, gradient, or a slowly drifting texture). Sizes and speeds are relative
to the frame, so the same spec renders at any resolution (used by the training curriculum). At the
bench geometry (16x64x64 pixels, patch (2, 4, 4)) objects are 4-6 tokens wide and move at most about
one token per latent frame: smooth at the token scale, as real video latents are.

A fixed set of (colour, shape, motion) combinations is held out: it never appears in training, and
:func:`heldout_prompts` lists one prompt per held-out combination for the adherence benchmark.

Example:
    >>> rng = np.random.default_rng(0)
    >>> spec = sample_spec(rng)
    >>> render(spec, frames=16, height=64, width=64).shape
    (3, 16, 64, 64)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vdit_accel.errors import ConfigError
from vdit_accel.instrument.captions import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    MOTIONS,
    OBJECT_COLOURS,
    SHAPES,
    BackgroundCaption,
    Caption,
    ObjectCaption,
    format_caption,
)

TRAVEL_FRACTION = (0.25, 0.4)  # displacement over the clip, in frame widths (single object)
SIZE_FRACTION = (0.25, 0.34)  # object diameter, in frame widths (embedded-wan-v1's range)
MAX_SIZE = 0.5  # the largest diameter a grown object (x 1.9) still fits the frame with
GROWTH = (1.6, 1.9)  # size ratio last/first frame for "grow" (inverse for "shrink")
EDGE_PX_AT_64 = 1.0  # anti-aliasing ramp width at 64 px
GRADIENT_AMPLITUDE = 0.15
TEXTURE_AMPLITUDE = 0.1
TEXTURE_DRIFT = 0.5 / 64  # frame widths per frame
CROSS_ARM = 0.4  # arm half-thickness relative to the half-size
#: Where objects start. ``uniform``: anywhere their path stays inside the frame (embedded-wan-v1).
#: ``anchored``: the path is centred in the frame (or in the object's lane), so the layout follows from
#: the caption and only size, travel, growth and the background vary between clips.
#: ``anchored-scene``: ``anchored``, and the background's direction and phase are fixed too
#: (``ANCHORED_BG_POSE``), so a gradient always ramps the same way and a texture starts from the same pattern.
LAYOUTS = ("uniform", "anchored", "anchored-scene")
#: (direction, phase) of every background in the ``anchored-scene`` layout, radians: ramps darkest at top left
ANCHORED_BG_POSE = (np.pi / 4, 0.0)


@dataclass(frozen=True)
class ObjectSpec:
    """One object: what the caption says plus where it starts and how far it goes (frame units)."""

    caption: ObjectCaption
    x0: float
    y0: float
    size: float
    travel: float
    growth: float


@dataclass(frozen=True)
class VideoSpec:
    """A full clip: objects plus the background's caption and its hidden parameters."""

    objects: tuple[ObjectSpec, ...]
    background: BackgroundCaption
    bg_direction: float  # gradient / texture angle, radians
    bg_phase: float

    @property
    def caption(self) -> Caption:
        return Caption(tuple(o.caption for o in self.objects), self.background)

    @property
    def text(self) -> str:
        return format_caption(self.caption)


def _combo_index(colour: str, shape: str, motion: str) -> tuple[int, int, int]:
    return list(OBJECT_COLOURS).index(colour), SHAPES.index(shape), MOTIONS.index(motion)


def is_heldout(colour: str, shape: str, motion: str) -> bool:
    """Whether a (colour, shape, motion) combination is held out of training (about 1 in 11).

    Every colour, shape and motion still appears in training, only not in this combination.
    """
    c, s, m = _combo_index(colour, shape, motion)
    return (c + 3 * s + 5 * m) % 11 == 0


def heldout_combos() -> list[tuple[str, str, str]]:
    """All held-out (colour, shape, motion) combinations, in a fixed order."""
    return [
        (c, s, m)
        for c in OBJECT_COLOURS
        for s in SHAPES
        for m in MOTIONS
        if is_heldout(c, s, m)
    ]


def heldout_prompts() -> list[str]:
    """One single-object prompt per held-out combination, with a deterministic background."""
    bgs = list(BACKGROUND_COLOURS)
    out = []
    for i, (c, s, m) in enumerate(heldout_combos()):
        bg = BackgroundCaption(bgs[i % len(bgs)], BACKGROUND_KINDS[(i // len(bgs)) % 3])
        out.append(format_caption(Caption((ObjectCaption(c, s, m),), bg)))
    return out


def check_layout(layout: str) -> None:
    """Raise :class:`ConfigError` naming ``layout`` and the accepted values unless it is one of ``LAYOUTS``."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not known: accepted {list(LAYOUTS)}")


def check_size(size: tuple[float, float]) -> tuple[float, float]:
    """Return ``size`` as a ``(lo, hi)`` float pair; raise :class:`ConfigError` unless 0 < lo <= hi <= MAX_SIZE."""
    lo, hi = (float(v) for v in size)
    if not 0 < lo <= hi <= MAX_SIZE:
        raise ConfigError(f"object size range {(lo, hi)} is not accepted: need 0 < lo <= hi <= {MAX_SIZE}")
    return lo, hi


def _sample_object(rng: np.random.Generator, caption: ObjectCaption, lane: tuple[float, float],
                   layout: str = "uniform", size_range: tuple[float, float] = SIZE_FRACTION) -> ObjectSpec:
    """Place an object so that it stays inside the frame (and inside its vertical lane).

    ``layout`` (one of ``LAYOUTS``) says whether the start is drawn uniformly from the feasible range or
    put at its middle (a path centred in the lane); the random stream is consumed the same way in both.
    ``size_range`` is the range of the diameter (frame widths; 0.85 of it in a two-object lane).
    """
    y_lo, y_hi = lane
    size = rng.uniform(*size_range) * (0.85 if y_hi - y_lo < 1 else 1.0)
    growth = 1.0
    if caption.motion == "grow":
        growth = rng.uniform(*GROWTH)
    elif caption.motion == "shrink":
        growth = 1.0 / rng.uniform(*GROWTH)
    half_max = size * max(growth, 1.0) / 2
    travel = 0.0
    if caption.motion in ("left", "right"):
        travel = rng.uniform(*TRAVEL_FRACTION)
    elif caption.motion in ("up", "down"):
        travel = min(rng.uniform(*TRAVEL_FRACTION), max(0.12, (y_hi - y_lo) - 2 * half_max - 0.02))
    x_lo, x_hi = half_max + 0.02, 1 - half_max - 0.02
    yl, yh = y_lo + half_max + 0.01, y_hi - half_max - 0.01
    if caption.motion == "left":
        x_lo += travel
    elif caption.motion == "right":
        x_hi -= travel
    elif caption.motion == "up":
        yl += travel
    elif caption.motion == "down":
        yh -= travel
    x0 = rng.uniform(x_lo, max(x_lo, x_hi))
    y0 = rng.uniform(yl, max(yl, yh))
    if layout != "uniform":
        x0, y0 = (x_lo + x_hi) / 2, (yl + yh) / 2  # the lane centre, also where a grown object overflows
    return ObjectSpec(caption, float(x0), float(y0), float(size), float(travel), float(growth))


def sample_spec(rng: np.random.Generator, two_object_prob: float = 0.25, heldout: bool = False,
                layout: str = "uniform", size_range: tuple[float, float] = SIZE_FRACTION) -> VideoSpec:
    """Draw a random clip spec.

    Args:
        rng (`np.random.Generator`): the source of randomness (the only one).
        two_object_prob (`float`, defaults to 0.25): probability of a two-object clip.
        heldout (`bool`, defaults to False): if False, held-out combinations are never drawn.
        layout (`str`, defaults to "uniform"): where objects start, one of ``LAYOUTS``.
        size_range (`tuple[float, float]`, defaults to ``SIZE_FRACTION``): object diameters drawn from, in frame
            widths (see :func:`check_size`); the random stream is the same for every range.
    """
    check_layout(layout)
    size_range = check_size(size_range)
    n_obj = 2 if rng.random() < two_object_prob else 1
    colours = list(OBJECT_COLOURS)
    captions: list[ObjectCaption] = []
    while len(captions) < n_obj:
        cap = ObjectCaption(
            colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], MOTIONS[rng.integers(len(MOTIONS))]
        )
        if is_heldout(cap.colour, cap.shape, cap.motion) != heldout and not (heldout and captions):
            continue
        if captions and captions[0].colour == cap.colour:
            continue
        captions.append(cap)
    lanes = [(0.0, 1.0)] if n_obj == 1 else [(0.0, 0.5), (0.5, 1.0)]
    objects = tuple(_sample_object(rng, cap, lane, layout, size_range) for cap, lane in zip(captions, lanes))
    bgs = list(BACKGROUND_COLOURS)
    background = BackgroundCaption(bgs[rng.integers(len(bgs))], BACKGROUND_KINDS[rng.integers(3)])
    return VideoSpec(objects, background, *_background_pose(rng, layout))


def spec_for_caption(caption: Caption, rng: np.random.Generator, layout: str = "uniform",
                     size_range: tuple[float, float] = SIZE_FRACTION) -> VideoSpec:
    """A random placement of the objects a caption names (ground-truth scorer checks, ideal-gap estimates).

    ``layout`` and ``size_range`` as in :func:`sample_spec`.
    """
    check_layout(layout)
    size_range = check_size(size_range)
    lanes = [(0.0, 1.0)] if len(caption.objects) == 1 else [(0.0, 0.5), (0.5, 1.0)]
    objects = tuple(_sample_object(rng, cap, lane, layout, size_range) for cap, lane in zip(caption.objects, lanes))
    return VideoSpec(objects, caption.background, *_background_pose(rng, layout))


def _background_pose(rng: np.random.Generator, layout: str) -> tuple[float, float]:
    """The background's (direction, phase): random, or ``ANCHORED_BG_POSE`` (drawn anyway: same random stream)."""
    pose = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))
    return ANCHORED_BG_POSE if layout == "anchored-scene" else pose


def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (frame units) of a shape of half-size ``r`` centred at 0."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.sqrt(dx**2 + dy**2) - r
    if shape == "square":
        return np.maximum(ax, ay) - r * 0.9
    if shape == "cross":
        arm = CROSS_ARM * r
        return np.minimum(np.maximum(ax - r, ay - arm), np.maximum(ax - arm, ay - r))
    if shape == "triangle":  # apex up, base down, inside the box [-r, r]^2
        side = (2 * ax - (dy + r)) / np.sqrt(5.0)  # the two slanted edges
        return np.maximum(side, dy - r)
    raise ValueError(f"unknown shape {shape!r}: choose one of {list(SHAPES)}")


def _background(spec: VideoSpec, t: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Background RGB in [0, 1], shape [3, F, H, W]."""
    base = np.array(BACKGROUND_COLOURS[spec.background.colour], dtype=np.float32)[:, None, None, None]
    u = np.cos(spec.bg_direction) * xx + np.sin(spec.bg_direction) * yy  # [1, H, W]
    if spec.background.kind == "solid":
        delta = np.zeros((1, *u.shape[1:]), np.float32)[None]
    elif spec.background.kind == "gradient":
        span = np.abs(np.cos(spec.bg_direction)) + np.abs(np.sin(spec.bg_direction))
        delta = (GRADIENT_AMPLITUDE * 2 * (u / span)).astype(np.float32)[None]
    else:
        v = -np.sin(spec.bg_direction) * xx + np.cos(spec.bg_direction) * yy
        drift = TEXTURE_DRIFT * t[:, None, None]
        ph = spec.bg_phase
        wave = (
            np.sin(2 * np.pi * 1.5 * (u - drift) + ph)
            + np.sin(2 * np.pi * 1.1 * (v + 0.5 * drift) + 2 * ph)
            + np.sin(2 * np.pi * 0.8 * (u + v - drift) + 3 * ph)
        ) / 3
        delta = (TEXTURE_AMPLITUDE * wave).astype(np.float32)[None]
    return np.clip(base + delta, 0.0, 1.0)


def render(spec: VideoSpec, frames: int = 16, height: int = 64, width: int = 64) -> np.ndarray:
    """Render a spec to a video.

    Args:
        spec (`VideoSpec`): what to draw.
        frames, height, width (`int`): output size F, H, W in pixels (H == W expected; sizes are relative).

    Returns:
        `np.ndarray` float32 of shape `[3, F, H, W]` in [-1, 1].
    """
    t = np.arange(frames, dtype=np.float32)
    s = t / max(frames - 1, 1)  # progress 0..1
    yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]
    xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, None, :]
    video = _background(spec, t, yy, xx)
    edge = EDGE_PX_AT_64 / 64 * (64 / width) * 1.0
    for obj in spec.objects:
        m = obj.caption.motion
        sign = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(m, (0, 0))
        cx = obj.x0 + sign[0] * obj.travel * s
        cy = obj.y0 + sign[1] * obj.travel * s
        r = obj.size / 2 * obj.growth**s  # geometric growth
        sdf = _shape_sdf(obj.caption.shape, xx - cx[:, None, None], yy - cy[:, None, None], r[:, None, None])
        alpha = np.clip(0.5 - sdf / edge, 0.0, 1.0).astype(np.float32)[None]
        colour = np.array(OBJECT_COLOURS[obj.caption.colour], dtype=np.float32)[:, None, None, None]
        video = video * (1 - alpha) + colour * alpha
    return (video * 2 - 1).astype(np.float32)


def batch(seed: int, index: int, size: int, frames: int, height: int, width: int, caption_dropout: float = 0.1,
          layout: str = "uniform", size_range: tuple[float, float] = SIZE_FRACTION):
    """Batch ``index`` of the training stream for ``seed``: deterministic and independent of history.

    ``layout`` and ``size_range`` are passed to :func:`sample_spec`.

    Returns:
        (`np.ndarray` [B, 3, F, H, W], `list[str]` of B captions, "" where dropped for CFG).
    """
    rng = np.random.default_rng([seed, index])
    videos, texts = [], []
    for _ in range(size):
        spec = sample_spec(rng, layout=layout, size_range=size_range)
        videos.append(render(spec, frames, height, width))
        texts.append("" if rng.random() < caption_dropout else spec.text)
    return np.stack(videos), texts
