"""Grid, Volume, HU scaling, resampling and the one field-units conversion."""

from __future__ import annotations

import numpy as np
import pytest
from grids import OBLIQUE

from breathcast.errors import BreathcastError
from breathcast.geometry import (
    Grid,
    Volume,
    field_from_lps_mm,
    field_to_lps_mm,
    hu_to_unit,
    resample_field,
    resample_volume,
    unit_to_hu,
)


def test_index_to_lps_follows_itk_convention():
    """Voxel [k, j, i] sits at origin + direction @ (spacing * (i, j, k))."""
    k, j, i = 3, 2, 1
    expected = np.asarray(OBLIQUE.origin) + OBLIQUE.direction_matrix @ (np.asarray(OBLIQUE.spacing) * [i, j, k])
    np.testing.assert_allclose(OBLIQUE.index_to_lps(np.array([k, j, i])), expected, atol=1e-12)
    np.testing.assert_allclose(OBLIQUE.lps_to_index(expected), [k, j, i], atol=1e-12)


@pytest.mark.parametrize("grid", [Grid((3, 4, 5), (1.0, 2.0, 3.0)), OBLIQUE])
def test_field_to_lps_mm_round_trip_and_displacement_of_points(grid):
    """Converting a field to LPS mm moves points exactly as the voxel field does; and converts back."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, *grid.shape)).astype(np.float32)
    lps = field_to_lps_mm(u, grid)
    index = np.stack(np.indices(grid.shape), axis=-1).reshape(-1, 3).astype(float)
    moved_index = index + u.reshape(3, -1).T
    expected_mm = grid.index_to_lps(moved_index) - grid.index_to_lps(index)
    np.testing.assert_allclose(lps.reshape(3, -1).T, expected_mm, atol=1e-5)
    np.testing.assert_allclose(field_from_lps_mm(lps, grid), u, atol=1e-5)


def test_field_shape_is_checked():
    """A field that does not match the grid is refused with the expected shape in the message."""
    with pytest.raises(BreathcastError, match=r"field must have shape \(3, 3, 4, 5\)"):
        field_to_lps_mm(np.zeros((3, 3, 4, 4)), Grid((3, 4, 5), (1.0, 1.0, 1.0)))


def test_hu_scaling_round_trip():
    """HU in [-1000, 400] maps linearly to [0, 1] and back; outside values are clipped."""
    hu = np.array([-1500.0, -1000.0, 0.0, 400.0, 1200.0])
    unit = hu_to_unit(hu)
    np.testing.assert_allclose(unit, [0.0, 0.0, 1000.0 / 1400.0, 1.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(unit_to_hu(unit[1:4]), hu[1:4], atol=1e-3)


def test_with_shape_keeps_field_of_view():
    """A resampled grid covers the same field of view with voxel edges aligned."""
    grid = Grid((10, 20, 40), (1.0, 2.0, 3.0), origin=(5.0, 6.0, 7.0))
    half = grid.with_shape((5, 10, 20))
    assert half.extent_mm == pytest.approx(grid.extent_mm)
    first_edge = np.asarray(grid.origin) - 0.5 * np.asarray(grid.spacing)
    np.testing.assert_allclose(np.asarray(half.origin) - 0.5 * np.asarray(half.spacing), first_edge)


def test_resample_volume_preserves_a_linear_ramp_and_labels():
    """Trilinear resampling reproduces a linear ramp in the interior; labels stay labels."""
    grid = Grid((16, 16, 16), (1.0, 1.0, 1.0))
    z = np.arange(16, dtype=np.float32)[:, None, None] * np.ones((16, 16, 16), np.float32)
    up = resample_volume(Volume(z, grid), (32, 16, 16))
    centres = (np.arange(32) + 0.5) / 2 - 0.5  # source index of each new slice centre
    np.testing.assert_allclose(up.array[2:-2, 8, 8], centres[2:-2], atol=1e-5)
    labels = (z > 7).astype(np.uint8)
    down = resample_volume(Volume(labels, grid), (8, 8, 8), labels=True)
    assert down.array.dtype == np.uint8 and set(np.unique(down.array)) == {0, 1}


def test_resample_field_rescales_components():
    """A constant 1-voxel field becomes a 2-voxel field on a grid twice as fine."""
    grid = Grid((4, 4, 4), (2.0, 2.0, 2.0))
    u = np.ones((3, 4, 4, 4), np.float32)
    fine, fine_grid = resample_field(u, grid, (8, 8, 8))
    np.testing.assert_allclose(fine, 2.0, atol=1e-6)
    np.testing.assert_allclose(field_to_lps_mm(fine, fine_grid), 2.0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (0, 4, 4), "spacing": (1, 1, 1)}, "shape must be three positive"),
        ({"shape": (4, 4, 4), "spacing": (1, -1, 1)}, "spacing must be three positive"),
        ({"shape": (4, 4, 4), "spacing": (1, 1, 1), "direction": ((1, 0, 0), (1, 0, 0), (0, 0, 1))}, "orthonormal"),
    ],
)
def test_bad_grids_are_refused(kwargs, message):
    """Impossible grids raise a one-line BreathcastError saying what is wrong."""
    with pytest.raises(BreathcastError, match=message):
        Grid(**kwargs)


def test_volume_repr_is_readable():
    """The repr names shape, spacing, dtype and memory."""
    text = repr(Volume(np.zeros((2, 3, 4), np.float32), Grid((2, 3, 4), (1.0, 2.0, 3.0))))
    assert "shape (Z, Y, X): (2, 3, 4)" in text and "spacing (x, y, z): (1.00, 2.00, 3.00) mm" in text
