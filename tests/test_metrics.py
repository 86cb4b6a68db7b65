"""PSNR / SSIM against hand-computed values and against skimage called directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from vdit_accel.bench.metrics import psnr, psnr_per_frame, ssim
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
