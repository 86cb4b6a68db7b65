"""A deterministic prompt-adherence scorer for clips of the embedded model's caption grammar (no learning).

:func:`analyse` measures what a clip shows: its bright objects (colour, shape, motion, with the raw per-frame
centroids, areas and shape descriptors) and its background (colour and kind). :func:`score` compares that analysis
with a prompt, attribute by attribute: colour, shape and motion per prompt object, then background colour and
background kind. Prompt objects are matched to detected objects by colour; a prompt object with no detected object
of its colour gets all three of its attributes wrong.

How it measures (thresholds are derived from the renderer's constants in :mod:`vdit_accel.instrument.dataset` and
:mod:`vdit_accel.instrument.captions`, and checked on rendered, MP4 round-tripped and perturbed clips):

- **Objects.** Background pixels never exceed the brightest background colour plus the full gradient swing, nor
  the frame's median by more than that swing, while object colours peak at full intensity: such bright pixels
  seed an object mask, the background under and around them is filled in by normalised convolution, and every
  pixel is unmixed as ``background + alpha * (reference colour - background)`` against each object colour
  (two passes, the second without everything the first attributed to objects). Pixels whose best colour
  explains them with ``alpha >= 0.5`` form per-colour masks; thin colour fringes inside a blob of another colour
  (anti-aliasing, compression) take that colour. Per frame the largest 4-connected component of each colour
  (above a minimum size) is tracked; a colour counts as an object when present in at least half the frames with
  a smooth track (noise blobs jump around).
- **Motion.** Straight-line fits of the centroid and of the log-area over time give the net displacement and the
  area ratio last/first; a displacement above a fraction of the frame is a move along its dominant axis,
  otherwise a large area ratio is grow/shrink, otherwise still.
- **Shape.** Fill ratio of the bounding box, top- and bottom-corner occupancy, the vertical centroid offset in the
  bounding box and solidity, as medians over the middle frames, classified by the nearest prototype; prototypes
  are measured once (cached) on clean renders of each shape over the rendered size range.
- **Background.** Kind: a texture drifts (the RMS change of background pixels across 3/4 of the clip exceeds the
  change between neighbouring frames, so incoherent noise cancels) or is not planar (residual of a plane fit to
  the time-median background); a static planar background is a gradient when the plane has a clear slope,
  otherwise solid. Colour: the nearest background colour to the median for solid and texture, and to the plane's
  value at the top-left corner for a gradient (the renderer's ramp is zero there, so this is the base colour even
  where the ramp darkens or clips at black).

Example:
    >>> from vdit_accel.instrument.dataset import render, spec_for_caption
    >>> from vdit_accel.instrument.captions import parse_caption
    >>> from vdit_accel.instrument.video import to_frames
    >>> prompt = "a red circle moves left on a blue gradient background"
    >>> spec = spec_for_caption(parse_caption(prompt), np.random.default_rng(0))
    >>> result = score(to_frames(render(spec)), prompt)
    >>> result.adherence, result.all_correct
    (1.0, True)
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage import measure
from skimage.morphology import convex_hull_image
from tqdm.auto import tqdm

from vdit_accel.errors import ConfigError
from vdit_accel.instrument.captions import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    SHAPES,
    BackgroundCaption,
    Caption,
    ObjectCaption,
    format_caption,
    parse_caption,
)
from vdit_accel.instrument.dataset import (
    GRADIENT_AMPLITUDE,
    GROWTH,
    SIZE_FRACTION,
    TEXTURE_AMPLITUDE,
    ObjectSpec,
    VideoSpec,
    check_layout,
    render,
    sample_spec,
)
from vdit_accel.instrument.video import read_video, to_frames, write_video

if TYPE_CHECKING:
    from skimage.measure._regionprops import RegionProperties

# ---- geometry of the bench clips -------------------------------------------------------------------------------
REFERENCE_SIZE = 64  # pixel thresholds below are stated at 64 px and scale with the frame area
UINT8_MAX = 255.0
MIN_SIDE_PX = 8  # smallest frame side analysed

# ---- object pixels ---------------------------------------------------------------------------------------------
_BG_MAX_VALUE = max(max(c) for c in BACKGROUND_COLOURS.values()) + 2 * GRADIENT_AMPLITUDE  # brightest background
_OBJ_MIN_VALUE = min(max(c) for c in OBJECT_COLOURS.values())  # every object colour peaks at full intensity
SEED_BRIGHTNESS = (_BG_MAX_VALUE + _OBJ_MIN_VALUE) / 2  # max-channel value that surely is an object pixel
# a gradient spans 2 * GRADIENT_AMPLITUDE, so no background pixel exceeds the frame's median value by more than that;
# the margin keeps dimmed objects (generated clips) out of the background estimate too
SEED_CONTRAST = 2 * GRADIENT_AMPLITUDE + 0.05
SEED_DILATION_PX = 2  # anti-aliased fringe kept out of the background estimate around seeds
BG_FILL_SIGMA_PX = 8.0  # normalised-convolution scale filling in the background under objects (at 64 px)
ALPHA_MIN = 0.5  # coverage above which a pixel belongs to an object
LABEL_ALPHA_MIN = 0.2  # coverage above which a colour may explain a pixel (the label is chosen before ALPHA_MIN)
MINORITY_FRACTION = 0.2  # a thin colour holding less of a connected blob than this is a fringe of its majority
FULL_3X3 = np.ones((3, 3), bool)  # 8-neighbourhood structuring element
FRAME_3X3 = FULL_3X3[None]  # the same within each frame of an [F, H, W] stack (no growth across time)
EPS = 1e-6  # guards divisions by (near) zero weights and norms
UNMIX_RESIDUAL_MAX = 0.25  # RGB distance in [0, 1] units left unexplained by the best object colour
MIN_BLOB_PX = 8  # smallest connected component kept as an object (at 64 px; smallest rendered object ~26 px)
PRESENCE_MIN = 0.5  # fraction of frames in which a colour must show a blob to count as an object
# A rendered object moves at most 0.4 / 15 frame per frame at 16 frames; blobs of noise jump around at random.
MAX_JUMP = 0.1  # median centroid step between frames, in frame sizes, above which a track is not one object

# ---- motion ----------------------------------------------------------------------------------------------------
# The shortest rendered travel is 0.12 frame (two-object up/down lanes, the floor in dataset._sample_object) and a
# growing triangle's centroid drifts by a third of its half-size change (at most ~0.05 frame): the displacement
# threshold sits halfway between the two.
MIN_RENDERED_TRAVEL = 0.12
_MAX_GROW_DRIFT = SIZE_FRACTION[1] / 2 * (GROWTH[1] - 1) / 3
MOVE_THRESHOLD = (MIN_RENDERED_TRAVEL + _MAX_GROW_DRIFT) / 2  # net displacement (frame sizes) that is a move
# Rendered growth multiplies the area by at least GROWTH[0] ** 2 = 2.56 while still objects keep ~1; the threshold
# is set low in that gap to accept generated clips that grow less than the renderer does.
AREA_RATIO_THRESHOLD = 1.4  # last/first area ratio above which an object grows (below its inverse: shrinks)

# ---- shape -----------------------------------------------------------------------------------------------------
CORNER_FRACTION = 0.25  # side of the corner cells, as a fraction of the bounding-box side
MID_FRAMES = (0.25, 0.75)  # span of the clip (progress 0..1) whose frames describe the shape
PROTOTYPE_SAMPLES = 24  # clean renders per shape (sizes over the rendered range, random sub-pixel positions)
DESCRIPTORS: tuple[str, ...] = ("fill", "top_corners", "bottom_corners", "v_offset", "solidity")
# scale of each descriptor in the prototype distance: about twice its spread over rendered sizes and positions
DESCRIPTOR_SCALE = {"fill": 0.1, "top_corners": 0.2, "bottom_corners": 0.2, "v_offset": 0.05, "solidity": 0.1}

# ---- background ------------------------------------------------------------------------------------------------
BG_GUARD_PX = 2  # pixels around objects left out of background statistics (anti-aliasing, blur)
BG_SMOOTH_PX = 2.0  # denoising scale for background statistics (textures have wavelengths of 40+ px at 64 px)
MIN_BG_PIXELS = 16  # fewest shared background pixels for a frame pair to count
CLIP_LEVEL = 2.0 / UINT8_MAX  # channel values at or below this are treated as clipped at black
# A texture drifts by TEXTURE_DRIFT frame widths per frame with an amplitude of TEXTURE_AMPLITUDE; the drift is
# measured as the RMS change across 3/4 of the clip in excess of the RMS change between neighbouring frames.
TEXTURE_GAP_FRACTION = 0.75
TEXTURE_CHANGE_THRESHOLD = 0.012  # RMS drift change above which the background moves (a texture)
TEXTURE_RESIDUAL_THRESHOLD = 0.5 * TEXTURE_AMPLITUDE / 3  # std of the non-planar part of a static background
MIN_PLANE_FRACTION = 0.02  # fraction of unclipped background pixels needed to fit the plane on them alone
# min peak-to-peak of the fitted plane: a rendered gradient spans 2 * GRADIENT_AMPLITUDE = 0.3 (a clipped dark one,
# fitted where it is not clipped, still extrapolates to > 0.1); flat backgrounds under noise stay below 0.01
GRADIENT_RANGE_THRESHOLD = 0.04


@dataclass(frozen=True, eq=False)
class DetectedObject:
    """One object found in a clip, with the raw measurements behind its names.

    Args:
        colour (`str`): nearest object colour (a key of ``OBJECT_COLOURS``).
        shape (`str`): nearest shape prototype (one of ``SHAPES``).
        motion (`str`): one of ``MOTIONS``.
        centroids (`np.ndarray` float64 `[F, 2]`): (x, y) centroid per frame in pixels, NaN where absent.
        areas (`np.ndarray` float64 `[F]`): blob area per frame in pixels, 0 where absent.
        descriptors (`dict[str, float]`): shape descriptors averaged over the middle frames (see ``DESCRIPTORS``).
        shape_distances (`dict[str, float]`): scaled distance of the descriptors to each shape prototype.
        displacement (`tuple[float, float]`): fitted net (dx, dy) over the clip, in frame widths / heights.
        area_ratio (`float`): fitted area ratio last/first frame.
        presence (`float`): fraction of frames in which the object was found.
    """

    colour: str
    shape: str
    motion: str
    centroids: np.ndarray
    areas: np.ndarray
    descriptors: dict[str, float]
    shape_distances: dict[str, float]
    displacement: tuple[float, float]
    area_ratio: float
    presence: float


@dataclass(frozen=True)
class DetectedBackground:
    """The background of a clip.

    Args:
        colour (`str`): nearest background colour (a key of ``BACKGROUND_COLOURS``).
        kind (`str`): ``"solid"``, ``"gradient"`` or ``"texture"``.
        rgb (`tuple[float, float, float]`): the estimate (in [0, 1]) that was named.
        temporal_change (`float`): mean absolute change of background pixels half a clip apart.
        plane_range (`float`): peak-to-peak value of the plane fitted to the time-median background.
        plane_residual (`float`): standard deviation of the background around that plane.
    """

    colour: str
    kind: str
    rgb: tuple[float, float, float]
    temporal_change: float
    plane_range: float
    plane_residual: float


@dataclass(frozen=True, eq=False)
class Analysis:
    """What :func:`analyse` found in a clip.

    Args:
        objects (`tuple[DetectedObject, ...]`): detected objects, largest first.
        background (`DetectedBackground`): the detected background.
        object_mask (`np.ndarray` bool `[F, H, W]`): pixels attributed to any object.
    """

    objects: tuple[DetectedObject, ...]
    background: DetectedBackground
    object_mask: np.ndarray

    @property
    def caption(self) -> Caption | None:
        """The detection as a caption (``None`` unless one or two objects of distinct colours were found)."""
        if not 1 <= len(self.objects) <= 2:
            return None
        objs = tuple(ObjectCaption(o.colour, o.shape, o.motion) for o in self.objects)
        return Caption(objs, BackgroundCaption(self.background.colour, self.background.kind))


@dataclass(frozen=True)
class ObjectScore:
    """Per-attribute verdicts for one prompt object (``detected`` is None when no object has its colour)."""

    prompt: ObjectCaption
    colour: bool
    shape: bool
    motion: bool
    detected: ObjectCaption | None


@dataclass(frozen=True, eq=False)
class ScoreResult:
    """How well a clip shows its prompt.

    Args:
        prompt (`str`): the scored prompt.
        objects (`tuple[ObjectScore, ...]`): one verdict per prompt object, in prompt order.
        background_colour (`bool`): whether the background colour matches.
        background_kind (`bool`): whether the background kind matches.
        adherence (`float`): fraction of correct attributes (3 per object + 2 for the background).
        all_correct (`bool`): every attribute is correct.
        extra_objects (`tuple[str, ...]`): colours of detected objects that the prompt does not name (reported,
            not scored).
        analysis (`Analysis`): the raw analysis of the clip.
    """

    prompt: str
    objects: tuple[ObjectScore, ...]
    background_colour: bool
    background_kind: bool
    adherence: float
    all_correct: bool
    extra_objects: tuple[str, ...]
    analysis: Analysis

    @property
    def attributes(self) -> dict[str, bool]:
        """Flat ``{name: verdict}``: ``object{i}.colour|shape|motion``, ``background.colour|kind``."""
        out: dict[str, bool] = {}
        for i, o in enumerate(self.objects):
            out[f"object{i}.colour"] = o.colour
            out[f"object{i}.shape"] = o.shape
            out[f"object{i}.motion"] = o.motion
        out["background.colour"] = self.background_colour
        out["background.kind"] = self.background_kind
        return out


# ================================================================================================================
# object pixels
# ================================================================================================================


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        got = type(frames).__name__ if not isinstance(frames, np.ndarray) else f"ndarray of {frames.dtype}"
        raise ConfigError(f"frames must be a uint8 np.ndarray [F, H, W, 3], got {got}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1 or min(frames.shape[1:3]) < MIN_SIDE_PX:
        raise ConfigError(f"frames must have shape [F >= 1, H >= 8, W >= 8, 3], got {tuple(frames.shape)}")
    if frames.shape[1] != frames.shape[2]:
        raise ConfigError(f"frames must be square (H == W): got shape {tuple(frames.shape)}")
    return frames.astype(np.float32) / UINT8_MAX


def _fill_background(video: np.ndarray, bg_mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Normalised convolution: background RGB everywhere from the pixels of ``bg_mask``; `[F, H, W, 3]`."""
    w = bg_mask.astype(np.float32)
    sig = (0.0, sigma_px, sigma_px)
    den = ndimage.gaussian_filter(w, sig, mode="nearest", truncate=4.0)
    out = np.empty_like(video)
    fallback = np.array([np.median(video[..., c][bg_mask]) if bg_mask.any() else 0.0 for c in range(3)])
    for c in range(3):
        num = ndimage.gaussian_filter(video[..., c] * w, sig, mode="nearest", truncate=4.0)
        out[..., c] = np.where(den > EPS, num / np.maximum(den, EPS), fallback[c])
    return out


def _unmix(video: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best object colour per pixel as ``bg + alpha * (colour - bg)``.

    Returns:
        label (`np.ndarray` int `[F, H, W]`, index into ``OBJECT_COLOURS``), alpha (`[F, H, W]`) and residual
        (`[F, H, W]`, RGB distance left unexplained).
    """
    d = np.moveaxis(video - bg, -1, 0)  # [3, F, H, W]
    bgc = np.moveaxis(bg, -1, 0)
    label = np.zeros(video.shape[:3], np.int64)
    best_alpha = np.zeros(video.shape[:3], np.float32)
    best_resid = np.full(video.shape[:3], np.inf, np.float32)
    for k, ref in enumerate(OBJECT_COLOURS.values()):
        v = [ref[c] - bgc[c] for c in range(3)]  # colour minus background, per channel
        vv = np.maximum(v[0] * v[0] + v[1] * v[1] + v[2] * v[2], EPS)
        alpha = np.maximum((d[0] * v[0] + d[1] * v[1] + d[2] * v[2]) / vv, 0.0)
        r = [d[c] - alpha * v[c] for c in range(3)]
        resid = np.sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2])
        better = (alpha >= LABEL_ALPHA_MIN) & (resid < best_resid)  # an edge pixel keeps its own colour's label
        label[better] = k
        best_alpha[better] = alpha[better]
        best_resid[better] = resid[better]
    return label, best_alpha, best_resid


def _object_pixels(video: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel object colour label (-1 for background) and the background estimate."""
    value = video.max(-1)  # [F, H, W]
    typical = np.median(value.reshape(value.shape[0], -1), axis=1)[:, None, None]  # objects cover < half a frame
    seeds = (value > SEED_BRIGHTNESS) | (value > typical + SEED_CONTRAST)  # bright, or much brighter than usual
    guard = max(1, round(SEED_DILATION_PX * scale))
    bg_mask = ~ndimage.binary_dilation(seeds, FRAME_3X3, iterations=guard)
    bg = _fill_background(video, bg_mask, BG_FILL_SIGMA_PX * scale)
    label, alpha, resid = _unmix(video, bg)
    obj = (alpha >= ALPHA_MIN) & (resid <= UNMIX_RESIDUAL_MAX)
    # second pass: refit the background without everything the unmixing attributed to objects
    bg_mask = ~ndimage.binary_dilation(obj | seeds, FRAME_3X3, iterations=guard)
    bg = _fill_background(video, bg_mask, BG_FILL_SIGMA_PX * scale)
    label, alpha, resid = _unmix(video, bg)
    obj = (alpha >= ALPHA_MIN) & (resid <= UNMIX_RESIDUAL_MAX)
    return _absorb_minorities(np.where(obj, label, -1)), bg


def _absorb_minorities(labels: np.ndarray) -> np.ndarray:
    """Relabel colour fringes (anti-aliasing, compression, blur) to the colour of the object they border.

    Within each 8-connected blob of object pixels, a colour is a fringe when it holds less than
    ``MINORITY_FRACTION`` of the blob and none of its pixels there survives a one-pixel erosion (a band at most
    two pixels wide); its pixels take the blob's majority colour. A small object that touches a large one keeps
    its colour since its interior survives the erosion.

    Args:
        labels (`np.ndarray` int `[F, H, W]`): colour index per pixel, -1 for background.

    Returns:
        `np.ndarray` int `[F, H, W]`: the relabelled pixels.
    """
    k = len(OBJECT_COLOURS)
    out = labels.copy()
    for i in range(labels.shape[0]):
        comps = measure.label(labels[i] >= 0, connectivity=2)
        n = int(comps.max())
        if n == 0:
            continue
        obj = comps > 0
        counts = np.bincount((comps[obj] - 1) * k + labels[i][obj], minlength=n * k).reshape(n, k)
        minor = (counts > 0) & (counts < MINORITY_FRACTION * counts.sum(1, keepdims=True))
        for colour in np.nonzero(minor.any(0))[0]:
            core = ndimage.binary_erosion(labels[i] == colour, FULL_3X3)
            has_core = np.bincount(comps[core], minlength=n + 1)[1:] > 0
            minor[:, colour] &= ~has_core
        if not minor.any():
            continue
        relabel = np.where(minor, counts.argmax(1, keepdims=True), np.arange(k)[None])  # [n, k]
        out[i][obj] = relabel[comps[obj] - 1, labels[i][obj]]
    return out


# ================================================================================================================
# shape descriptors
# ================================================================================================================


def _descriptors(mask: np.ndarray) -> dict[str, float]:
    """Shape descriptors of one binary blob `[h, w]` cropped to its bounding box."""
    h, w = mask.shape
    area = float(mask.sum())
    ch, cw = max(1, round(CORNER_FRACTION * h)), max(1, round(CORNER_FRACTION * w))
    top = (mask[:ch, :cw].mean() + mask[:ch, -cw:].mean()) / 2
    bottom = (mask[-ch:, :cw].mean() + mask[-ch:, -cw:].mean()) / 2
    ys = np.nonzero(mask)[0]
    v_off = ((ys.mean() + 0.5) - h / 2) / h
    hull = float(convex_hull_image(mask).sum())
    return {
        "fill": area / (h * w),
        "top_corners": float(top),
        "bottom_corners": float(bottom),
        "v_offset": float(v_off),
        "solidity": area / max(hull, 1.0),
    }


@functools.cache
def _shape_prototypes() -> dict[str, dict[str, float]]:
    """Mean descriptors of each shape, measured on clean still renders over the rendered size range (cached)."""
    rng = np.random.default_rng(0)
    lo = SIZE_FRACTION[0] * 0.85 / GROWTH[1]  # smallest rendered (two-object lane, shrunk) ...
    hi = SIZE_FRACTION[1]  # ... up to a full-size object (mid frames of grow/shrink stay in this range)
    black = max(BACKGROUND_COLOURS["black"])
    protos: dict[str, dict[str, float]] = {}
    for shape in SHAPES:
        acc: dict[str, list[float]] = {k: [] for k in DESCRIPTORS}
        for size in np.geomspace(lo, hi, PROTOTYPE_SAMPLES):
            objs = (ObjectSpec(ObjectCaption("white", shape, "still"), *rng.uniform(0.35, 0.65, 2), size, 0.0, 1.0),)
            spec = VideoSpec(objs, BackgroundCaption("black", "solid"), 0.0, 0.0)
            frame = to_frames(render(spec, frames=1))[0].astype(np.float32) / UINT8_MAX
            alpha = (frame.max(-1) - black) / (1.0 - black)  # a white object on a flat black background
            blob = _largest_blob(alpha >= ALPHA_MIN, 1)
            if blob is None:
                continue
            for k, v in _descriptors(blob.image).items():
                acc[k].append(v)
        protos[shape] = {k: float(np.mean(v)) for k, v in acc.items()}
    return protos


def _classify_shape(desc: dict[str, float]) -> tuple[str, dict[str, float]]:
    dists = {
        shape: float(np.sqrt(sum(((desc[k] - proto[k]) / DESCRIPTOR_SCALE[k]) ** 2 for k in DESCRIPTORS)))
        for shape, proto in _shape_prototypes().items()
    }
    return min(dists, key=dists.get), dists


# ================================================================================================================
# objects over time
# ================================================================================================================


def _largest_blob(mask: np.ndarray, min_px: int) -> RegionProperties | None:
    """The largest 4-connected component of a 2-D mask (``skimage`` RegionProps), or None below ``min_px``."""
    if not mask.any():
        return None
    regions = measure.regionprops(measure.label(mask, connectivity=1))
    best = max(regions, key=lambda r: r.area)
    return best if best.area >= min_px else None


def _fit_line(t: np.ndarray, y: np.ndarray) -> float:
    """Slope of the least-squares line through (t, y)."""
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum() / max((tc * tc).sum(), EPS))


def _motion(
    centroids: np.ndarray, areas: np.ndarray, size: tuple[int, int]
) -> tuple[str, tuple[float, float], float]:
    """Motion name, fitted net displacement (dx, dy) in frame sizes and fitted area ratio last/first frame."""
    f = len(areas)
    present = areas > 0
    t = np.arange(f, dtype=np.float64)[present]
    span = f - 1
    dx = _fit_line(t, centroids[present, 0]) * span / size[1]
    dy = _fit_line(t, centroids[present, 1]) * span / size[0]
    ratio = float(np.exp(_fit_line(t, np.log(areas[present])) * span))
    if max(abs(dx), abs(dy)) > MOVE_THRESHOLD:
        if abs(dx) >= abs(dy):
            motion = "right" if dx > 0 else "left"
        else:
            motion = "down" if dy > 0 else "up"
    elif ratio > AREA_RATIO_THRESHOLD:
        motion = "grow"
    elif ratio < 1.0 / AREA_RATIO_THRESHOLD:
        motion = "shrink"
    else:
        motion = "still"
    return motion, (float(dx), float(dy)), ratio


def _median_jump(centroids: np.ndarray, size: tuple[int, int]) -> float:
    """Median centroid step between consecutive frames where the object is present, in frame sizes."""
    steps = np.diff(centroids, axis=0) / np.array([size[1], size[0]])
    steps = np.linalg.norm(steps[~np.isnan(steps).any(1)], axis=1)
    return float(np.median(steps)) if len(steps) else 0.0


def _track(labels: np.ndarray, scale: float) -> list[DetectedObject]:
    f, h, w = labels.shape
    min_px = max(2, round(MIN_BLOB_PX * scale**2))
    names = list(OBJECT_COLOURS)
    mid_lo, mid_hi = (round(p * (f - 1)) for p in MID_FRAMES)
    found = []
    for k, name in enumerate(names):
        mask_k = labels == k
        if mask_k.sum() < min_px * f * PRESENCE_MIN:
            continue
        centroids = np.full((f, 2), np.nan)
        areas = np.zeros(f)
        descs: list[dict[str, float]] = []
        for i in range(f):
            blob = _largest_blob(mask_k[i], min_px)
            if blob is None:
                continue
            cy, cx = blob.centroid
            centroids[i] = (cx + 0.5, cy + 0.5)
            areas[i] = blob.area
            if mid_lo <= i <= mid_hi:
                descs.append(_descriptors(blob.image))
        presence = float((areas > 0).mean())
        if presence < PRESENCE_MIN or _median_jump(centroids, (h, w)) > MAX_JUMP:
            continue
        if not descs:  # absent in the middle: describe whatever frames there are
            descs = [_descriptors(_largest_blob(mask_k[i], min_px).image) for i in np.nonzero(areas)[0]]
        desc = {key: float(np.median([d[key] for d in descs])) for key in DESCRIPTORS}
        shape, dists = _classify_shape(desc)
        motion, disp, ratio = _motion(centroids, areas, (h, w))
        centroids.setflags(write=False)
        areas.setflags(write=False)
        found.append(DetectedObject(name, shape, motion, centroids, areas, desc, dists, disp, ratio, presence))
    found.sort(key=lambda o: -float(np.median(o.areas[o.areas > 0])))
    return found


# ================================================================================================================
# background
# ================================================================================================================


def _plane_fit(img: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane per channel over the valid pixels.

    Args:
        img (`np.ndarray` `[H, W, 3]`): values.
        valid (`np.ndarray` bool `[H, W, 3]`): pixels to fit, per channel.

    Returns:
        coefficients `[3, 3]` (per channel: constant, x, y with x, y in frame units from the top-left corner) and
        the fitted planes `[H, W, 3]`.
    """
    h, w, _ = img.shape
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    design = np.stack([np.ones_like(xx), xx, yy], -1)  # [H, W, 3]
    coefs = np.zeros((3, 3))
    planes = np.zeros_like(img, dtype=np.float64)
    for c in range(3):
        m = valid[..., c]
        if m.sum() < 3:
            coefs[c, 0] = float(np.median(img[..., c]))
        else:
            coefs[c] = np.linalg.lstsq(design[m], img[..., c][m], rcond=None)[0]
        planes[..., c] = design @ coefs[c]
    return coefs, planes


def _nearest_background(rgb: np.ndarray) -> str:
    names = list(BACKGROUND_COLOURS)
    refs = np.array(list(BACKGROUND_COLOURS.values()))
    return names[int(np.linalg.norm(refs - rgb, axis=1).argmin())]


def _mean_square_change(video: np.ndarray, bg_mask: np.ndarray, gap: int) -> float:
    """Mean over frame pairs ``gap`` apart of the mean squared change of pixels that are background in both
    frames, each channel's median change (a global flicker) removed first."""
    values = []
    for i in range(video.shape[0] - gap):
        both = bg_mask[i] & bg_mask[i + gap]
        if both.sum() < MIN_BG_PIXELS:
            continue
        diff = (video[i + gap] - video[i])[both]  # [N, 3]
        values.append(float(((diff - np.median(diff, axis=0)) ** 2).mean()))
    return float(np.mean(values)) if values else 0.0


def _background(video: np.ndarray, obj_mask: np.ndarray, scale: float) -> DetectedBackground:
    """Background colour and kind of `video` `[F, H, W, 3]` in [0, 1], ignoring `obj_mask` `[F, H, W]`."""
    f = video.shape[0]
    guard = max(1, round(BG_GUARD_PX * scale))
    bg_mask = ~ndimage.binary_dilation(obj_mask, FRAME_3X3, iterations=guard)
    smooth = _fill_background(video, bg_mask, BG_SMOOTH_PX * scale)  # denoised background, objects filled in
    far = max(1, round(TEXTURE_GAP_FRACTION * (f - 1)))
    # a drift grows with the time gap, incoherent noise (and flicker, removed by the median) does not
    excess = _mean_square_change(smooth, bg_mask, far) - _mean_square_change(smooth, bg_mask, 1)
    temporal = float(np.sqrt(max(0.0, excess)))
    # spatial structure of the time-median background
    masked = np.where(bg_mask[..., None], smooth, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels covered in every frame stay NaN
        still = np.nanmedian(masked, axis=0)  # [H, W, 3]
    seen = ~np.isnan(still)
    if not seen.any():
        still, seen = np.median(video, axis=0), np.ones(video.shape[1:], bool)
    still = np.where(seen, still, 0.0)
    lum = still.mean(-1)
    # a dark ramp clips at black: fit the plane where no channel clipped, if enough such pixels remain
    valid = seen.all(-1)
    unclipped = valid & (still > CLIP_LEVEL).all(-1)
    if unclipped.sum() >= MIN_PLANE_FRACTION * valid.sum():
        valid = unclipped
    _, plane = _plane_fit(np.repeat(lum[..., None], 3, -1), np.repeat(valid[..., None], 3, -1))
    plane = plane[..., 0]
    plane_range = float(plane.max() - plane.min())
    residual = float((lum - plane)[valid].std())
    if temporal > TEXTURE_CHANGE_THRESHOLD or residual > TEXTURE_RESIDUAL_THRESHOLD:
        kind = "texture"  # moving or not planar
    elif plane_range > GRADIENT_RANGE_THRESHOLD:
        kind = "gradient"  # static, planar, sloped
    else:
        kind = "solid"  # static and flat
    if kind == "gradient":
        unclipped = seen & (still > CLIP_LEVEL)
        coefs, _ = _plane_fit(still, unclipped)
        rgb = np.clip(coefs[:, 0], 0.0, 1.0)  # value at the top-left corner, where the rendered ramp is zero
    else:
        rgb = np.median(video[bg_mask], axis=0) if bg_mask.any() else np.median(video.reshape(-1, 3), axis=0)
    return DetectedBackground(
        _nearest_background(rgb), kind, tuple(float(x) for x in rgb), temporal, plane_range, residual
    )


# ================================================================================================================
# public API
# ================================================================================================================


def analyse(frames: np.ndarray) -> Analysis:
    """Detect the objects and the background of a clip.

    Args:
        frames (`np.ndarray` uint8 `[F, H, W, 3]`): the clip, e.g. from :func:`to_frames` or :func:`read_video`.
            Thresholds are stated at 64 px and scale with the frame size. A single frame (a GIF whose identical
            frames were merged) is accepted: its objects are "still" and its background static.

    Returns:
        `Analysis`: detected objects (largest first) and background, with raw measurements.

    Raises:
        ConfigError: if ``frames`` is not a uint8 array of shape `[F >= 1, H >= 8, W >= 8, 3]`.

    Example:
        >>> frames = np.zeros((16, 64, 64, 3), np.uint8)
        >>> a = analyse(frames)
        >>> len(a.objects), a.background.colour, a.background.kind
        (0, 'black', 'solid')
    """
    video = _check_frames(frames)
    scale = float(np.sqrt(video.shape[1] * video.shape[2])) / REFERENCE_SIZE
    labels, _ = _object_pixels(video, scale)
    objects = _track(labels, scale)
    obj_mask = labels >= 0
    obj_mask.setflags(write=False)
    return Analysis(tuple(objects), _background(video, obj_mask, scale), obj_mask)


def score(frames: np.ndarray, prompt: str) -> ScoreResult:
    """Score how well a clip shows its prompt, attribute by attribute.

    Args:
        frames (`np.ndarray` uint8 `[F, H, W, 3]`): the clip.
        prompt (`str`): a prompt in the caption grammar (see :func:`parse_caption`).

    Returns:
        `ScoreResult`: per-attribute verdicts, ``adherence`` (fraction correct) and the analysis.

    Raises:
        PromptError: if the prompt does not parse.
        ConfigError: if ``frames`` has the wrong type or shape.

    Example:
        >>> frames = np.zeros((16, 64, 64, 3), np.uint8)
        >>> r = score(frames, "a red circle grows on a black background")
        >>> r.attributes["object0.colour"], r.background_colour, round(r.adherence, 2)
        (False, True, 0.4)
    """
    caption = parse_caption(prompt)
    analysis = analyse(frames)
    by_colour = {o.colour: o for o in analysis.objects}
    verdicts = []
    for obj in caption.objects:
        det = by_colour.get(obj.colour)
        if det is None:
            verdicts.append(ObjectScore(obj, False, False, False, None))
        else:
            found = ObjectCaption(det.colour, det.shape, det.motion)
            verdicts.append(ObjectScore(obj, True, det.shape == obj.shape, det.motion == obj.motion, found))
    bg_colour = analysis.background.colour == caption.background.colour
    bg_kind = analysis.background.kind == caption.background.kind
    flags = [v for o in verdicts for v in (o.colour, o.shape, o.motion)] + [bg_colour, bg_kind]
    extra = tuple(o.colour for o in analysis.objects if o.colour not in {c.colour for c in caption.objects})
    return ScoreResult(
        prompt=format_caption(caption),
        objects=tuple(verdicts),
        background_colour=bg_colour,
        background_kind=bg_kind,
        adherence=sum(flags) / len(flags),
        all_correct=all(flags),
        extra_objects=extra,
        analysis=analysis,
    )


def score_file(path: str | Path, prompt: str, size: int = REFERENCE_SIZE) -> ScoreResult:
    """Score an MP4/GIF file: :func:`score` of :func:`read_video` (area-downsampled to ``size`` pixels).

    Args:
        path (`str` or `Path`): the video file.
        prompt (`str`): a prompt in the caption grammar.
        size (`int`, defaults to 64): side the frames are downsampled to before analysis.

    Returns:
        `ScoreResult`.

    Raises:
        VideoError: if the file is missing, empty, truncated, unreadable or not square (checked after the
            prompt).
        PromptError: if the prompt does not parse.

    Example:
        >>> import tempfile
        >>> from vdit_accel.instrument.dataset import render, spec_for_caption
        >>> from vdit_accel.instrument.captions import parse_caption
        >>> from vdit_accel.instrument.video import to_frames, write_video
        >>> prompt = "a green square shrinks on a gray textured background"
        >>> frames = to_frames(render(spec_for_caption(parse_caption(prompt), np.random.default_rng(1))))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     score_file(write_video(frames, f"{tmp}/clip.mp4"), prompt).all_correct
        True
    """
    parse_caption(prompt)  # a bad prompt is reported before the video is decoded
    return score(read_video(path, size=size), prompt)


def ground_truth_accuracy(
    n_clips: int = 200, seed: int = 0, through_mp4: bool = False, workdir: str | Path | None = None,
    size_range: tuple[float, float] = SIZE_FRACTION, layout: str = "uniform", progress: bool = False,
) -> dict[str, float | int]:
    """Attribute accuracy of the scorer on ground-truth clips (the scorer's own acceptance measurement).

    Clips are drawn with :func:`sample_spec` (half with held-out combinations, a third with two objects) and
    rendered at 16x64x64; each is scored against its own caption, so every attribute should be correct.

    Args:
        n_clips (`int`, defaults to 200): number of clips.
        seed (`int`, defaults to 0): seed of the clip stream.
        through_mp4 (`bool`, defaults to False): write every clip as MP4 and read it back before scoring.
        workdir (`str` or `Path`, *optional*): folder for the MP4 files (a temporary folder if None).
        size_range (`tuple[float, float]`, defaults to ``SIZE_FRACTION``): the clips' object diameters (frame
            widths), as in :func:`sample_spec`.
        layout (`str`, defaults to "uniform"): where objects start (one of ``LAYOUTS``), as in :func:`sample_spec`.
        progress (`bool`, defaults to False): a tqdm bar over the clips on stderr.

    Returns:
        `dict`: ``overall`` (fraction of correct attributes), ``all_correct`` (fraction of clips with every
        attribute correct), ``n_clips``, ``n_attributes`` and one accuracy per attribute kind: ``object_colour``,
        ``object_shape``, ``object_motion``, ``background_colour``, ``background_kind``.

    Example:
        >>> acc = ground_truth_accuracy(n_clips=4, seed=1)
        >>> acc["overall"] >= 0.9
        True
    """
    if n_clips < 1:
        raise ConfigError(f"n_clips={n_clips!r} is out of range: accepted [1, inf)")
    check_layout(layout)
    rng = np.random.default_rng(seed)
    keys = ("object_colour", "object_shape", "object_motion", "background_colour", "background_kind")
    hits = {k: [] for k in keys}
    full = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        for i in tqdm(range(n_clips), disable=not progress, desc="score ground truth"):
            spec = sample_spec(rng, two_object_prob=1 / 3, heldout=bool(i % 2), size_range=size_range,
                               layout=layout)
            frames = to_frames(render(spec))
            if through_mp4:
                frames = read_video(write_video(frames, folder / f"clip{i:04d}.mp4"), size=frames.shape[1])
            res = score(frames, spec.text)
            for o in res.objects:
                hits["object_colour"].append(o.colour)
                hits["object_shape"].append(o.shape)
                hits["object_motion"].append(o.motion)
            hits["background_colour"].append(res.background_colour)
            hits["background_kind"].append(res.background_kind)
            full.append(res.all_correct)
    n_attr = sum(len(v) for v in hits.values())
    out: dict[str, float | int] = {
        "overall": sum(sum(v) for v in hits.values()) / n_attr,
        "all_correct": float(np.mean(full)),
        "n_clips": n_clips,
        "n_attributes": n_attr,
    }
    out.update({k: float(np.mean(v)) for k, v in hits.items()})
    return out


__all__ = [
    "Analysis",
    "DetectedBackground",
    "DetectedObject",
    "ObjectScore",
    "ScoreResult",
    "analyse",
    "ground_truth_accuracy",
    "score",
    "score_file",
]
