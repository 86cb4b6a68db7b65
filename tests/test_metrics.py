"""PSNR / SSIM against hand-computed values and against skimage called directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from vdit_accel.bench.metrics import (
    WORST_PATCH_SIDE,
    check_metric,
    psnr,
    psnr_per_frame,
    ssim,
    temporal_psnr,
    worst_patch_psnr,
)
from vdit_accel.errors import ConfigError

SHAPE = (3, 4, 16, 16)  # [3, F, H, W]


def _video(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape)


def test_psnr_constant_offset_matches_formula():
    a = _video()
    expected = 10 * math.log10(2.0**2 / 0.1**2)  # MSE = 0.01 on a data range of 2
    assert psnr(a, a + 0.1) == pytest.approx(expected, abs=1e-9)
    assert psnr(a + 0.1, a) == pytest.approx(expected, abs=1e-9)


def test_psnr_partial_error_and_data_range():
    a = np.zeros(SHAPE)
    b = a.copy()
    b[:, :, :8] = 0.2  # half the pixels off by 0.2: MSE = 0.5 * 0.04 = 0.02
    assert psnr(a, b) == pytest.approx(10 * math.log10(4.0 / 0.02), abs=1e-9)
    assert psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(1.0 / 0.02), abs=1e-9)


def test_psnr_identical_is_inf_and_tensors_match_arrays():
    a = _video(1)
    assert psnr(a, a) == math.inf
    b = a + np.random.default_rng(2).normal(0, 0.05, SHAPE)
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    assert psnr(ta, tb) == pytest.approx(psnr(a.astype(np.float32), b.astype(np.float32)), abs=1e-6)
    assert isinstance(psnr(ta, tb), float)


def test_psnr_per_frame_hand_case():
    a = np.zeros(SHAPE)
    b = a.copy()
    b[:, 1] += 0.2  # frame 1: MSE 0.04
    b[:, 3] -= 0.1  # frame 3: MSE 0.01
    got = psnr_per_frame(a, b)
    assert got.shape == (SHAPE[1],)
    assert got[0] == math.inf and got[2] == math.inf
    assert got[1] == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-9)
    assert got[3] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-9)


def test_ssim_identical_is_one():
    a = _video(3)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_skimage_per_frame_mean():
    a = _video(4)
    b = np.clip(a + np.random.default_rng(5).normal(0, 0.2, SHAPE), -1, 1)
    frames_a, frames_b = a.transpose(1, 2, 3, 0), b.transpose(1, 2, 3, 0)  # [F, H, W, 3]
    direct = np.mean(
        [structural_similarity(fa, fb, data_range=2.0, channel_axis=-1) for fa, fb in zip(frames_a, frames_b)]
    )
    got = ssim(a, b)
    assert got == pytest.approx(direct, abs=1e-12)
    assert 0.0 < got < 0.99  # noise must lower it


def test_ssim_constant_frames_analytic():
    # constant frames have no variance: SSIM reduces to the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a = np.full(SHAPE, 0.5)
    b = np.full(SHAPE, 0.3)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.5 * 0.3 + c1) / (0.5**2 + 0.3**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-9)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ConfigError, match=r"\(3, 4, 16, 16\).*\(3, 4, 16, 8\)"):
        psnr(np.zeros(SHAPE), np.zeros((3, 4, 16, 8)))
    with pytest.raises(ConfigError, match="same shape"):
        ssim(np.zeros(SHAPE), np.zeros((3, 5, 16, 16)))
    with pytest.raises(ConfigError, match="same shape"):
        psnr_per_frame(torch.zeros(SHAPE), torch.zeros((3, 4, 8, 16)))


def test_bad_layout_range_and_size_raise():
    with pytest.raises(ConfigError, match=r"\[3, F, H, W\]"):
        psnr(np.zeros((4, 16, 16)), np.zeros((4, 16, 16)))
    with pytest.raises(ConfigError, match="data_range"):
        psnr(np.zeros(SHAPE), np.zeros(SHAPE), data_range=0.0)
    with pytest.raises(ConfigError, match="7x7"):
        ssim(np.zeros((3, 2, 5, 5)), np.zeros((3, 2, 5, 5)))


def _worst_patch_reference(a: np.ndarray, b: np.ndarray, patch: int, data_range: float = 2.0) -> float:
    """Plain loops over frames and patches: the reference twin of worst_patch_psnr."""
    worst = 0.0
    for f in range(a.shape[1]):
        for i in range(0, a.shape[2], patch):
            for j in range(0, a.shape[3], patch):
                err = a[:, f, i:i + patch, j:j + patch] - b[:, f, i:i + patch, j:j + patch]
                worst = max(worst, float(np.mean(err**2)))
    return math.inf if worst == 0 else 10 * math.log10(data_range**2 / worst)


def test_worst_patch_psnr_finds_one_damaged_patch():
    a = np.zeros((3, 4, 32, 48))
    b = a.copy()
    b[:, 2, 16:32, 32:48] = 0.2  # one 16x16 patch of one frame: MSE 0.04 there
    assert WORST_PATCH_SIDE == 16
    assert worst_patch_psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-9)
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 / (0.04 / 24)), abs=1e-9)  # 24 patches: diluted
    b[:, 0] += 0.01  # a small error everywhere else does not move the worst patch
    assert worst_patch_psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-9)


def test_worst_patch_psnr_edge_patches_are_their_own_size():
    a = np.zeros((3, 2, 20, 20))  # 16 + 4: the last row and column of patches are 4 pixels wide
    b = a.copy()
    b[:, 1, 16:, 16:] = 0.2  # exactly the 4x4 corner patch: its MSE is 0.04, not diluted by padding
    assert worst_patch_psnr(a, b) == pytest.approx(20.0, abs=1e-9)
    b[:, 1, 16:, 16:] = 0.0
    b[:, 1, 12:16, 12:16] = 0.2  # the same 16 pixels inside the 16x16 top-left patch: MSE 0.04 / 16
    assert worst_patch_psnr(a, b) == pytest.approx(10 * math.log10(4 / (0.04 / 16)), abs=1e-9)


@pytest.mark.parametrize("shape, patch",
                         [((3, 3, 20, 37), 16), ((3, 2, 8, 8), 16), ((3, 5, 17, 9), 4), ((3, 1, 7, 7), 1)])
def test_worst_patch_psnr_matches_the_loop_reference(shape, patch):
    a, b = _video(6, shape), _video(7, shape)
    b[:, -1, -1, -1] += 3.0  # one bad pixel in the last (edge) patch
    assert worst_patch_psnr(a, b, patch=patch) == pytest.approx(_worst_patch_reference(a, b, patch), abs=1e-9)
    assert worst_patch_psnr(a, b, patch=patch) <= psnr(a, b)
    assert worst_patch_psnr(a, a, patch=patch) == math.inf


def test_worst_patch_larger_than_the_frame_is_the_worst_frame():
    a, b = _video(8, (3, 4, 8, 8)), _video(9, (3, 4, 8, 8))
    assert worst_patch_psnr(a, b) == pytest.approx(float(np.min(psnr_per_frame(a, b))), abs=1e-9)


def test_temporal_psnr_sees_flicker_that_per_frame_psnr_misses():
    a = np.random.default_rng(10).integers(-7, 7, (3, 6, 16, 16)) / 8  # eighths: every sum below is exact
    steady = a + 0.125  # every frame off by +1/8
    flicker = a + 0.125 * np.array([1, -1, 1, -1, 1, -1]).reshape(1, 6, 1, 1)  # sign alternates per frame
    np.testing.assert_allclose(psnr_per_frame(a, steady), psnr_per_frame(a, flicker), atol=1e-9)  # equal per frame
    assert psnr(a, steady) == pytest.approx(psnr(a, flicker), abs=1e-9)
    assert temporal_psnr(a, steady) == math.inf
    # every difference is off by 1/4 on a peak of 4 (differences of [-1, 1] values span [-2, 2])
    assert temporal_psnr(a, flicker) == pytest.approx(10 * math.log10(4.0**2 / 0.25**2), abs=1e-9)


def test_temporal_psnr_one_changed_frame():
    a = np.zeros((3, 3, 4, 4))
    b = a.copy()
    b[:, 1] = 0.2  # differences: +0.2 then -0.2, MSE 0.04 over both difference frames
    assert temporal_psnr(a, b) == pytest.approx(10 * math.log10(16 / 0.04), abs=1e-9)
    assert temporal_psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-9)


def test_nan_is_refused_and_inf_is_valid():
    a = np.zeros(SHAPE)
    b = a.copy()
    b[0, 0, 0, 0] = np.nan
    for metric in (psnr, ssim, worst_patch_psnr, temporal_psnr):
        with pytest.raises(ConfigError, match="video b has 1 non-finite values"):
            metric(a, b)
    assert check_metric("psnr", math.inf) == math.inf and check_metric("psnr", 31.5) == 31.5
    with pytest.raises(ConfigError, match="temporal_psnr_mean=nan is not a number"):
        check_metric("temporal_psnr_mean", float("nan"))


def test_new_metrics_reject_bad_arguments():
    with pytest.raises(ConfigError, match="at least 2 frames: got F=1"):
        temporal_psnr(np.zeros((3, 1, 8, 8)), np.zeros((3, 1, 8, 8)))
    with pytest.raises(ConfigError, match=r"patch=0 is out of range: accepted an integer in \[1, inf\)"):
        worst_patch_psnr(np.zeros(SHAPE), np.zeros(SHAPE), patch=0)
    with pytest.raises(ConfigError, match="same shape"):
        worst_patch_psnr(np.zeros(SHAPE), np.zeros((3, 4, 16, 8)))
