"""The 5DCT simulator: anatomy, motion, helical acquisition, ground truth, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from breathcast.sim.anatomy import DICE_BUCKETS, LUNG_LABELS, Label, render_phantom, sample_anatomy
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, field_to_lps_mm, hu_to_unit
from breathcast.metrics import lung_region_mask, masked_mse
from breathcast.sim.motion import (
    APEX_TAPER_MM,
    MotionParams,
    build_motion_field,
    posterior_profile,
    sample_motion,
    si_height_profile,
)
from breathcast.sim.simulator import SimulationConfig, pair_field, simulate_patient
from breathcast.traces import axial_slice_positions_mm
from breathcast.warp import compose, count_folds, integrate_velocity, invert, warp_image


def test_phantom_has_every_dice_bucket_and_a_tumour_in_a_lung():
    """All ten of the paper's buckets are present, and the tumour sits inside the lungs."""
    anatomy = sample_anatomy(np.random.default_rng(3))
    grid = Grid.centered((48, 48, 48), (400.0, 400.0, 320.0))
    hu, labels = render_phantom(anatomy, grid)
    for bucket, ids in DICE_BUCKETS.items():
        assert np.isin(labels, ids).sum() > 0, bucket
    tumour = np.argwhere(labels == Label.TUMOUR)
    assert len(tumour) > 0
    lung_hu = hu[np.isin(labels, (Label.LUNG_LEFT, Label.LUNG_RIGHT))]
    assert -950 < lung_hu.mean() < -750  # aerated lung
    assert hu[labels == Label.BONE].mean() > 250


def test_motion_is_largest_at_the_diaphragm_and_slides_at_the_chest_wall():
    """SI motion at amplitude 1 peaks near the diaphragm at the configured size (times the front-to-back gain at
    the back), fades to its apex fraction at the apex and to nothing above it, spares the spine."""
    rng = np.random.default_rng(5)
    anatomy, motion = sample_anatomy(rng), sample_motion(rng)
    grid = Grid.centered((48, 48, 48), (400.0, 400.0, 320.0))
    field = build_motion_field(anatomy, motion, grid)
    si_mm = field_to_lps_mm(field.displacement(1.0, 0.0), grid)[2]
    peak = si_mm.max()
    ratio = max(motion.right_to_left, 1.0) * float(posterior_profile(np.array(1.0), motion.posterior_gain))
    assert motion.si_amplitude_mm * 0.95 <= peak <= motion.si_amplitude_mm * ratio * 1.05
    z = axial_slice_positions_mm(grid)
    cx = grid.shape[2] // 2 + 8  # inside the left lung
    assert si_mm[z > anatomy.apex_z + APEX_TAPER_MM, :, cx].max() < 0.01 * peak
    spine = grid.lps_to_index(np.array([0.0, anatomy.spine_y, 0.0])).round().astype(int)
    assert abs(si_mm[:, spine[1], spine[2]]).max() < 0.1 * peak


def test_the_height_profile_runs_from_the_diaphragm_to_the_apex_fraction_and_fades_above_the_apex():
    """1 on the diaphragm, falling with height to ``apex_fraction`` at the apex, then to 0 within
    :data:`APEX_TAPER_MM` above it; with ``apex_fraction`` 0 the power law of before."""
    motion = MotionParams(10.0, 1.0, 1.0, 0.3, 0.1, 1.0, apex_exponent=1.5, apex_fraction=0.2)
    z = np.array([-100.0, -50.0, 0.0, 100.0, 100.0 + APEX_TAPER_MM / 2, 100.0 + APEX_TAPER_MM, 200.0])
    profile = si_height_profile(z, np.full_like(z, -100.0), 100.0, motion)
    np.testing.assert_allclose(profile[[0, 3, 4, 5, 6]], [1.0, 0.2, 0.1, 0.0, 0.0], atol=1e-12)
    assert np.all(np.diff(profile) <= 0)
    np.testing.assert_allclose(profile[2], 0.2 + 0.8 * 0.5**1.5)
    before = si_height_profile(z, np.full_like(z, -100.0), 100.0, MotionParams(10.0, 1.0, 1.0, 0.3, 0.1, 1.0, 1.5))
    np.testing.assert_allclose(before, np.clip((100.0 - z) / 200.0, 0.0, 1.0) ** 1.5)


@pytest.mark.parametrize("amplitude, rate", [(1.0, 0.0), (1.8, 1.5), (-0.3, -1.5)])
def test_motion_does_not_fold_even_for_deep_breaths(amplitude, rate):
    """det(I + grad u) > 0 everywhere for normal, deep and below-exhale states."""
    rng = np.random.default_rng(11)
    anatomy = sample_anatomy(rng)
    motion = sample_motion(rng)
    grid = Grid.centered((48, 48, 48), (400.0, 400.0, 320.0))
    u = build_motion_field(anatomy, motion, grid).displacement(amplitude, rate)
    assert count_folds(u) == 0


def test_motion_is_not_the_linear_5d_model():
    """The field is nonlinear in amplitude: u(1) != 2 u(0.5) beyond numerical noise (Low's model would be exact)."""
    rng = np.random.default_rng(2)
    anatomy, motion = sample_anatomy(rng), sample_motion(rng)
    field = build_motion_field(anatomy, motion, Grid.centered((24, 24, 24), (400.0, 400.0, 320.0)))
    u1, u_half = field.displacement(1.0, 0.0), field.displacement(0.5, 0.0)
    assert np.abs(u1 - 2 * u_half).max() > 0.05 * np.abs(u1).max()


def test_each_slice_is_acquired_at_its_own_breathing_state(small_patient):
    """A scan's per-slice trace is the session trace at the slice times, and slice times follow the table."""
    for scan in small_patient.scans:
        np.testing.assert_allclose(scan.amplitude, small_patient.trace.amplitude_at(scan.slice_times_s))
        steps = np.diff(scan.slice_times_s)
        assert np.all(steps > 0) or np.all(steps < 0)
    directions = {scan.direction for scan in small_patient.scans}
    assert directions == {"cranio-caudal", "caudo-cranial"}


def test_ground_truth_warps_the_reference_onto_each_scan(small_patient):
    """Warping the rest anatomy with a scan's true field reproduces it: masked MSE < 5% of no deformation.

    The scans were rendered from the anatomy at twice the resolution, so this is not the same computation
    run twice. With cubic-spline warping every scan passes by far; our trilinear kernel adds interpolation
    error comparable to the motion itself on scans that move less than a voxel, so it is held to the bar
    over the patient's scans together.
    """
    p = small_patient
    reference = hu_to_unit(p.reference_hu)
    mask = lung_region_mask(np.isin(p.reference_labels, LUNG_LABELS), p.grid, margin_mm=10.0)
    index = np.indices(p.grid.shape, dtype=np.float32)
    trilinear_total = no_deformation_total = 0.0
    for scan in p.scans:
        image = hu_to_unit(scan.image_hu)
        no_deformation = masked_mse(reference, image, mask)
        cubic = ndimage.map_coordinates(reference, index + scan.field, order=3, mode="nearest")
        assert masked_mse(cubic, image, mask) < 0.05 * no_deformation
        trilinear_total += masked_mse(warp_image(reference, scan.field), image, mask)
        no_deformation_total += no_deformation
    assert trilinear_total < 0.05 * no_deformation_total


def test_simulation_is_deterministic_from_the_seed():
    """The same seed gives bit-identical scans, fields and traces; another seed does not."""
    config = SimulationConfig(grid_size=16, n_scans=2)
    a, b, c = simulate_patient(4, config), simulate_patient(4, config), simulate_patient(5, config)
    np.testing.assert_array_equal(a.scans[1].image_hu, b.scans[1].image_hu)
    np.testing.assert_array_equal(a.scans[1].field, b.scans[1].field)
    np.testing.assert_array_equal(a.trace.amplitude, b.trace.amplitude)
    assert not np.array_equal(a.scans[1].image_hu, c.scans[1].image_hu)


def test_patients_vary():
    """Patient variability: body size, diaphragm motion 5-25 mm, tumour place and size differ."""
    rng = np.random.default_rng(0)
    motions = [sample_motion(rng).si_amplitude_mm for _ in range(200)]
    assert 5.0 <= min(motions) < 8.0 and 22.0 < max(motions) <= 25.0
    anatomies = [sample_anatomy(rng) for _ in range(20)]
    assert len({round(a.body_half_width) for a in anatomies}) > 5
    assert len({a.tumours[0].center_mm for a in anatomies}) == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"grid_size": 8}, "at least 16"), ({"n_scans": 0}, "at least one scan"), ({"supersampling": 0}, "supersampling")],
)
def test_bad_simulation_config_is_refused(kwargs, message):
    """Impossible configurations fail at construction with a clear message."""
    with pytest.raises(BreathcastError, match=message):
        SimulationConfig(**kwargs)


def test_pair_field_maps_one_scan_onto_another(small_patient):
    """The true moving -> fixed field, made from two stored fields, warps the moving scan onto the fixed one."""
    p = small_patient
    mask = lung_region_mask(np.isin(p.reference_labels, LUNG_LABELS), p.grid, margin_mm=10.0)
    amplitudes = [scan.amplitude.mean() for scan in p.scans]
    moving, fixed = p.scans[int(np.argmin(amplitudes))], p.scans[int(np.argmax(amplitudes))]
    u = pair_field(moving.field, fixed.field)
    warped = warp_image(hu_to_unit(moving.image_hu), u)
    no_deformation = masked_mse(hu_to_unit(moving.image_hu), hu_to_unit(fixed.image_hu), mask)
    assert masked_mse(warped, hu_to_unit(fixed.image_hu), mask) < 0.1 * no_deformation
    assert count_folds(u) == 0


def test_integrate_then_invert_is_identity_inside_the_body(small_patient):
    """exp(v) for a breathing-like velocity, composed with its inverse, is within 0.05 voxel of identity in the body."""
    p = small_patient
    v = build_motion_field(p.anatomy, p.motion, p.grid).displacement(1.5, 1.0)  # a realistic velocity field
    u = integrate_velocity(v)
    residual = np.abs(compose(u, invert(u)))
    body = p.reference_labels > 0
    assert residual.max(axis=0)[body].max() < 0.05
