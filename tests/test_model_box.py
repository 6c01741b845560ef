"""The lung-centred model box and the plan check: placement, resampling, refusals with the reason."""

from __future__ import annotations

import numpy as np
import pytest

from breathcast.errors import PlanRejected
from breathcast.geometry import Grid, Volume
from breathcast.model_box import NO_TRACHEA_WARNING, check_plan, lung_centred_grid, model_box_of_simulation, model_box_volume, resample_onto


def test_resample_onto_the_same_grid_is_the_identity():
    """Sampling a volume at its own voxel centres returns it."""
    grid = Grid((6, 7, 8), (2.0, 3.0, 4.0), origin=(-5.0, 10.0, 3.0))
    array = np.random.default_rng(0).normal(size=grid.shape).astype(np.float32)
    np.testing.assert_allclose(resample_onto(Volume(array, grid), grid).array, array, atol=1e-5)


def test_resample_onto_places_by_position_and_fills_outside():
    """A voxel lands where its LPS position is in the target grid; beyond the source it is the fill value."""
    src = Grid((4, 4, 4), (1.0, 1.0, 1.0))
    array = np.zeros(src.shape, np.float32)
    array[1, 2, 3] = 100.0
    target = Grid((8, 8, 8), (1.0, 1.0, 1.0), origin=(-2.0, -2.0, -2.0))
    out = resample_onto(Volume(array, src), target, fill=-7.0).array
    assert out[3, 4, 5] == pytest.approx(100.0)
    assert out[0, 0, 0] == pytest.approx(-7.0)


def test_the_box_is_centred_on_the_lungs(small_patient):
    """The plan's model grid is the fixed-size box centred on its lungs, whatever the CT's own field of view."""
    volume = Volume(small_patient.reference_hu, small_patient.grid)
    boxed, check = model_box_volume(volume, (32, 32, 32), (400.0, 400.0, 320.0))
    centre = boxed.grid.index_to_lps(np.array([15.5, 15.5, 15.5]))
    np.testing.assert_allclose(centre, check.lung_centre_lps_mm, atol=1e-6)
    assert boxed.grid.extent_mm == pytest.approx((400.0, 400.0, 320.0))
    moved = Volume(volume.array, Grid(volume.grid.shape, volume.grid.spacing, tuple(np.asarray(volume.grid.origin) + [30.0, -20.0, 40.0])))
    np.testing.assert_allclose(check_plan(moved).lung_centre_lps_mm, check.lung_centre_lps_mm + [30.0, -20.0, 40.0], atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda hu: np.full_like(hu, 20.0), "no lungs found"),
        (lambda hu: hu + 400.0, "implausible HU calibration"),
        (lambda hu: np.ascontiguousarray(hu[:, ::-1, :]), "anterior-posterior direction contradicts its anatomy"),
    ],
)
def test_a_plan_the_model_does_not_know_is_rejected_with_the_reason(small_patient, change, message):
    """No lungs, shifted HU, a front-back flip: PlanRejected, its message says why."""
    volume = Volume(change(small_patient.reference_hu.copy()), small_patient.grid)
    with pytest.raises(PlanRejected, match=message):
        check_plan(volume)


def test_a_plan_cut_through_the_lungs_gets_a_warning(small_patient):
    """A CT whose field of view ends inside the lungs is served with a warning naming the cut."""
    grid = small_patient.grid
    lung_z = np.flatnonzero(np.isin(small_patient.reference_labels, (4, 5)).any(axis=(1, 2)))
    keep = slice(int(lung_z.mean()), grid.shape[0])
    cut = Grid((grid.shape[0] - keep.start,) + grid.shape[1:], grid.spacing,
               (grid.origin[0], grid.origin[1], grid.origin[2] + grid.spacing[2] * keep.start))
    check = check_plan(Volume(small_patient.reference_hu[keep], cut))
    assert any("cut at the base" in w for w in check.warnings)


def test_a_plan_upside_down_is_rejected_and_one_without_trachea_is_served_with_a_warning(thorax64):
    """The trachea tells head from feet: above the lungs' middle as stored; slices in reverse order are refused; a
    field of view below the carina cannot tell, and the plan says so (at 64³ the cartoon's trachea is visible)."""
    patient = thorax64
    hu, grid = patient.reference_hu, patient.grid
    assert NO_TRACHEA_WARNING not in check_plan(Volume(hu, grid)).warnings
    with pytest.raises(PlanRejected, match="superior-inferior direction contradicts its anatomy"):
        check_plan(Volume(np.ascontiguousarray(hu[::-1]), grid))
    lung_z = np.flatnonzero(np.isin(patient.reference_labels, (4, 5)).any(axis=(1, 2)))
    keep = int(lung_z.mean())  # the lower half of the lungs and below
    lower = Grid((keep,) + grid.shape[1:], grid.spacing, grid.origin)
    assert NO_TRACHEA_WARNING in check_plan(Volume(np.ascontiguousarray(hu[:keep]), lower)).warnings


def test_manifest_box_comes_from_the_simulation_config():
    """Data made in the lung box records it; data on its own field of view records none."""
    assert model_box_of_simulation({"box_jitter_mm": [1, 1, 1], "field_of_view_mm": [400, 400, 320]}) == {
        "anchor": "lungs", "extent_mm": [400.0, 400.0, 320.0]}
    assert model_box_of_simulation({"field_of_view_mm": [400, 400, 320]}) == {} == model_box_of_simulation(None)


def test_lung_centred_grid_doctest_geometry():
    """The box's voxel centres are symmetric about its centre."""
    grid = lung_centred_grid(np.array([1.0, 2.0, 3.0]), (4, 6, 8), (80.0, 60.0, 40.0))
    first, last = grid.index_to_lps(np.zeros(3)), grid.index_to_lps(np.array([3.0, 5.0, 7.0]))
    np.testing.assert_allclose(0.5 * (first + last), [1.0, 2.0, 3.0])
