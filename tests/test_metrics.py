"""Tests for breathcast.metrics against hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import ndimage

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.metrics import (
    centroid_mm,
    dice,
    dice_per_bucket,
    endpoint_error_mm,
    folded_voxels,
    lung_region_mask,
    masked_mse,
    ms_ssim,
    ms_ssim_scales,
    mse,
    target_error_mm,
)


def smooth_texture(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A (Z, Y, X) float32 image in [0, 1] with structure at a few scales."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape), sigma=1.5)
    image = (image - image.min()) / (image.max() - image.min())
    return image.astype(np.float32)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), 0.0),
        (np.zeros((2, 2, 2)), np.full((2, 2, 2), 0.5), 0.25),
        (np.array([[[0.0, 1.0, 0.0, 0.2]]]), np.array([[[0.0, 0.0, 0.5, 0.2]]]), (1.0 + 0.25) / 4),
    ],
)
def test_mse_known_values(a, b, expected):
    """MSE of small arrays equals the hand value."""
    assert_allclose(mse(a, b), expected, rtol=0, atol=1e-12)


def test_masked_mse_counts_only_the_mask():
    """Differences outside the mask do not count; inside, the mean is over masked voxels only."""
    a = np.zeros((1, 2, 3))
    b = np.array([[[1.0, 0.5, 9.0], [0.0, 9.0, 9.0]]])
    mask = np.array([[[True, True, False], [True, False, False]]])
    assert_allclose(masked_mse(a, b, mask), (1.0 + 0.25 + 0.0) / 3, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mse(np.zeros((2, 2, 2)), np.zeros((2, 2, 3))), r"same shape, got \(2, 2, 2\) and \(2, 2, 3\)"),
        (lambda: masked_mse(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), np.zeros((2, 2, 2), bool)), "no voxels"),
        (lambda: masked_mse(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), np.ones((2, 2), bool)), r"shape \(2, 2, 2\)"),
    ],
)
def test_mse_rejects(call, match):
    """Mismatched shapes and empty masks are refused with a reason."""
    with pytest.raises(BreathcastError, match=match):
        call()


@pytest.mark.parametrize(
    ("margin_mm", "count", "extent_zyx"),
    [
        # Lattice points with (2 dz)^2 + dy^2 + dx^2 <= r^2, counted by hand per slice dz.
        (2.0, 13 + 2 * 1, (3, 5, 5)),  # dz = 0: 13 in a radius-2 disc; dz = +-1: the centre only
        (3.0, 29 + 2 * 21, (3, 7, 7)),  # discs of r^2 = 9 and 5
        (4.0, 49 + 2 * 37 + 2 * 1, (5, 9, 9)),  # r^2 = 16, 12, and 0 at dz = +-2
        (0.0, 1, (1, 1, 1)),
    ],
)
def test_lung_region_mask_single_voxel_anisotropic(margin_mm, count, extent_zyx):
    """One voxel dilated with spacing (x, y, z) = (1, 1, 2) mm is the exact ellipsoid of lattice points."""
    grid = Grid((11, 11, 11), spacing=(1.0, 1.0, 2.0))
    lung = np.zeros(grid.shape, bool)
    lung[5, 5, 5] = True
    region = lung_region_mask(lung, grid, margin_mm=margin_mm)
    assert region.dtype == bool and int(region.sum()) == count
    filled = np.argwhere(region)
    assert tuple(filled.max(axis=0) - filled.min(axis=0) + 1) == extent_zyx
    assert_allclose(filled.mean(axis=0), [5, 5, 5], rtol=0, atol=1e-12)


def test_lung_region_mask_default_is_10_mm():
    """The default margin is the paper's 10 mm: 2 slices of 5 mm and 10 pixels of 1 mm."""
    grid = Grid((9, 25, 25), spacing=(1.0, 1.0, 5.0))
    lung = np.zeros(grid.shape, bool)
    lung[4, 12, 12] = True
    region = lung_region_mask(lung, grid)
    assert region[4, 12, 2] and region[4, 12, 22] and not region[4, 12, 1]
    assert region[2, 12, 12] and region[6, 12, 12] and not region[1, 12, 12]
    assert not lung_region_mask(np.zeros(grid.shape, bool), grid).any()


@pytest.mark.parametrize(
    ("shape", "kernel_size", "expected"),
    [((64, 64, 64), 7, 4), ((64, 64, 64), 11, 3), ((32, 32, 32), 7, 3), ((16, 16, 16), 7, 2), ((7, 64, 64), 7, 1)],
)
def test_ms_ssim_scales_rule(shape, kernel_size, expected):
    """The number of scales is the largest whose coarsest level still holds one kernel."""
    assert ms_ssim_scales(shape, kernel_size) == expected


def test_ms_ssim_identical_is_one():
    """MS-SSIM of an image with itself is 1."""
    image = smooth_texture((32, 32, 32))
    assert_allclose(ms_ssim(image, image), 1.0, rtol=0, atol=1e-5)


def test_ms_ssim_decreases_with_noise():
    """Adding more noise, or a constant shift, lowers MS-SSIM below 1, monotonically with the noise."""
    image = smooth_texture((32, 32, 32))
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(image.shape).astype(np.float32)
    scores = [ms_ssim(np.clip(image + s * noise, 0, 1), image) for s in (0.01, 0.05, 0.1, 0.2)]
    assert all(0.0 < s < 1.0 for s in scores)
    assert all(earlier > later for earlier, later in zip(scores, scores[1:]))
    shifted = ms_ssim(np.clip(image + 0.1, 0, 1), image)
    assert 0.0 < shifted < 1.0 - 1e-3


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((6, 32, 32), {}, r"too small for MS-SSIM with kernel_size 7"),
        ((16, 16, 16), {"scales": 3}, r"fits 1\.\.2 MS-SSIM scales, got scales=3"),
        ((16, 16, 16), {"kernel_size": 6}, "odd and >= 3, got 6"),
    ],
)
def test_ms_ssim_rejects(shape, kwargs, match):
    """Volumes too small for the window, or too many scales, are refused with a reason."""
    image = np.zeros(shape, np.float32)
    with pytest.raises(BreathcastError, match=match):
        ms_ssim(image, image, **kwargs)


def test_folded_voxels():
    """No folds for zero and a gentle field; every voxel folds when d(u_x)/dx = -2 (det = -1)."""
    shape = (4, 5, 6)
    zero = np.zeros((3, *shape), np.float32)
    assert folded_voxels(zero) == 0
    gentle = zero.copy()
    gentle[2] = 0.3 * np.arange(shape[2])[None, None, :]
    assert folded_voxels(gentle) == 0
    folding = zero.copy()
    folding[2] = -2.0 * np.arange(shape[2])[None, None, :]
    assert folded_voxels(folding) == math.prod(shape)


def test_folded_voxels_rejects_bad_shape():
    """A field without its 3 components is refused before any kernel runs."""
    with pytest.raises(BreathcastError, match=r"shape \(3, Z, Y, X\), got \(2, 4, 4, 4\)"):
        folded_voxels(np.zeros((2, 4, 4, 4)))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
        ([1, 1, 0, 0], [0, 1, 1, 0], 0.5),  # half overlap
        ([1, 1, 1, 1], [1, 1, 0, 0], 2 * 2 / 6),
        ([1, 1, 0, 0], [0, 0, 1, 1], 0.0),
        ([1, 0, 0, 0], [0, 0, 0, 0], 0.0),  # one empty
        ([0, 0, 0, 0], [0, 0, 0, 0], math.nan),  # both empty: undefined
    ],
)
def test_dice_known_values(a, b, expected):
    """Dice of small masks equals the hand value (NaN when both are empty)."""
    assert_allclose(dice(np.array(a, bool), np.array(b, bool)), expected, rtol=0, atol=1e-12, equal_nan=True)


def test_dice_per_bucket():
    """Each bucket joins its labels; a bucket absent from both maps is NaN."""
    a = np.array([[[1, 1, 2, 2, 3, 0]]])
    b = np.array([[[1, 2, 2, 2, 0, 0]]])
    buckets = {"ones": (1,), "ones-and-twos": (1, 2), "threes": [3], "absent": (9, 10)}
    got = dice_per_bucket(a, b, buckets)
    assert list(got) == list(buckets)
    assert_allclose(
        [got["ones"], got["ones-and-twos"], got["threes"], got["absent"]],
        [2 * 1 / 3, 1.0, 0.0, math.nan],
        rtol=0,
        atol=1e-12,
        equal_nan=True,
    )


def test_endpoint_error_constant_offset_anisotropic():
    """A constant (1, 2, 3)-voxel error with spacing (x, y, z) = (0.5, 1, 2) mm is sqrt(2^2 + 2^2 + 1.5^2) mm."""
    grid = Grid((3, 4, 5), spacing=(0.5, 1.0, 2.0))
    u_true = np.random.default_rng(0).standard_normal((3, *grid.shape))
    u_pred = u_true + np.array([1.0, 2.0, 3.0])[:, None, None, None]
    expected = math.sqrt(2.0**2 + 2.0**2 + 1.5**2)
    got = endpoint_error_mm(u_pred, u_true, grid)
    assert set(got) == {"mean", "median", "p95", "max"}
    assert_allclose(list(got.values()), expected, rtol=0, atol=1e-9)


def test_endpoint_error_with_mask():
    """Only masked voxels count: a 4 mm error on the mask, 0 elsewhere, gives 4 mm everywhere in the summary."""
    grid = Grid((2, 2, 2), spacing=(1.0, 1.0, 2.0))
    u_true = np.zeros((3, *grid.shape))
    u_pred = u_true.copy()
    u_pred[0, 0] = 2.0  # two voxels along z = 4 mm, in slice 0
    mask = np.zeros(grid.shape, bool)
    mask[0] = True
    assert_allclose(list(endpoint_error_mm(u_pred, u_true, grid, mask).values()), 4.0, rtol=0, atol=1e-12)
    summary = endpoint_error_mm(u_pred, u_true, grid)
    assert_allclose([summary["mean"], summary["median"], summary["max"]], [2.0, 2.0, 4.0], rtol=0, atol=1e-12)
    with pytest.raises(BreathcastError, match=r"u_pred must have shape \(3, 2, 2, 2\), got \(3, 2, 2\)"):
        endpoint_error_mm(u_pred[:, 0], u_true, grid)


@pytest.mark.parametrize(
    ("direction", "expected_lps"),
    [
        (((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), [-10.0 + 5.5 * 0.8, 20.0 + 2.0 * 1.5, 5.0 + 3.5 * 2.5]),
        # i and j axes flipped (a head-first-prone-like orientation): x and y offsets change sign.
        (((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)), [-10.0 - 5.5 * 0.8, 20.0 - 2.0 * 1.5, 5.0 + 3.5 * 2.5]),
    ],
)
def test_centroid_of_box_is_its_centre(direction, expected_lps):
    """The centroid of a box is its centre, in LPS mm, honouring origin, spacing and direction."""
    grid = Grid((8, 6, 10), spacing=(0.8, 1.5, 2.5), origin=(-10.0, 20.0, 5.0), direction=direction)
    mask = np.zeros(grid.shape, bool)
    mask[2:6, 1:4, 4:8] = True  # centre index (z, y, x) = (3.5, 2, 5.5)
    assert_allclose(centroid_mm(mask, grid), expected_lps, rtol=0, atol=1e-9)


def test_target_error_of_shifted_box():
    """A box moved by 2 slices of 2.5 mm is 5 mm off."""
    grid = Grid((10, 6, 6), spacing=(1.0, 1.0, 2.5), origin=(3.0, -4.0, 100.0))
    true = np.zeros(grid.shape, bool)
    true[2:5, 1:4, 2:5] = True
    pred = np.roll(true, 2, axis=0)
    assert_allclose(target_error_mm(pred, true, grid), 5.0, rtol=0, atol=1e-9)
    assert_allclose(target_error_mm(true, true, grid), 0.0, rtol=0, atol=1e-12)


def test_centroid_of_empty_mask_raises():
    """An empty target has no centroid."""
    grid = Grid((2, 2, 2), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(BreathcastError, match="no voxels; a centroid needs at least one"):
        centroid_mm(np.zeros(grid.shape, bool), grid)
