"""Motion statistics: known fields and point sets, the pull-back sign, and DIR-Lab/POPI through the same path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, field_to_lps_mm
from breathcast.io.landmarks import LandmarkPairs, read_dirlab_case, read_dirlab_cases, read_popi
from breathcast.sim.anatomy import LUNG_LABELS
from breathcast.sim.motion import build_motion_field
from breathcast.sim.motion_statistics import (
    N_BINS,
    field_statistics,
    landmark_statistics,
    lung_shift,
    motion_statistics,
    population_statistics,
    si_ap_gradient,
)
from breathcast.sim.simulator import SimulationConfig, simulate_patient
from tests.conftest import shared_data_file
from tests.grids import OBLIQUE

TINY = Grid.centered((8, 6, 6), extent_mm=(30.0, 30.0, 40.0))  # 5 mm voxels


def _translation_lps_mm(grid: Grid, lps_mm: tuple[float, float, float]) -> np.ndarray:
    return np.broadcast_to(np.asarray(lps_mm, dtype=np.float32)[:, None, None, None], (3, *grid.shape)).copy()


def test_pure_si_translation_gives_si_only_and_inferior() -> None:
    """Pull-back u_z = +4 mm (inhale tissue came from superior): d = (0, 0, -4), shares 0 : 0 : 1."""
    stats = field_statistics(_translation_lps_mm(TINY, (0.0, 0.0, 4.0)), np.ones(TINY.shape, bool), TINY, seed=1)
    np.testing.assert_allclose(stats.component_ratio, [0.0, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(stats.signed_mean_mm, [0.0, 0.0, -4.0], atol=1e-6)
    assert stats.mean_magnitude_mm == pytest.approx(4.0) and stats.fraction_above == 0.0
    np.testing.assert_allclose(stats.bin_mean_magnitude_mm[stats.bin_counts > 0], 4.0, atol=1e-6)


def test_voxel_field_on_an_oblique_grid_is_read_in_lps() -> None:
    """One row (index j) on OBLIQUE is -1.5 mm LPS z: pull-back +1 row means the lungs moved 1.5 mm superior."""
    u = np.zeros((3, *OBLIQUE.shape), np.float32)
    u[1] = 1.0  # dy, voxels
    stats = field_statistics(field_to_lps_mm(u, OBLIQUE), np.ones(OBLIQUE.shape, bool), OBLIQUE)
    np.testing.assert_allclose(stats.signed_mean_mm, [0.0, 0.0, 1.5], atol=1e-5)
    np.testing.assert_allclose(stats.component_ratio, [0.0, 0.0, 1.0], atol=1e-6)


def test_points_are_exhale_positions_inside_the_exhale_lungs() -> None:
    """With lungs in the lower half and u_z = +10 mm, the exhale positions x + u(x), not x, lie in the mask."""
    mask = np.zeros(TINY.shape, bool)
    mask[:4] = True  # slices below z = 0 (index z grows superior on this axial grid)
    mask_top_mm = TINY.index_to_lps(np.array([3.0, 0.0, 0.0]))[2]
    stats = field_statistics(_translation_lps_mm(TINY, (0.0, 0.0, 10.0)), mask, TINY)
    assert stats.z_extent_mm[1] <= mask_top_mm + 1e-6
    assert stats.n_points == 2 * TINY.shape[1] * TINY.shape[2]  # the two inhale slices that map into it


def test_subsampling_is_seeded() -> None:
    """n_points below the lung voxels draws that many, the same for the same seed."""
    field = _translation_lps_mm(TINY, (1.0, 2.0, 3.0))
    a, b = (field_statistics(field, np.ones(TINY.shape, bool), TINY, n_points=50, seed=3) for _ in range(2))
    assert a.n_points == 50 and a.z_extent_mm.tolist() == b.z_extent_mm.tolist()
    np.testing.assert_allclose(a.component_ratio, [1 / 6, 2 / 6, 3 / 6])


def test_profile_bins_base_to_apex_and_ignore_the_frame() -> None:
    """|d| falling from base to apex fills the bins in decreasing order; moving the points by 100 mm changes nothing."""
    z = np.linspace(-80.0, 80.0, 201)
    q = np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=1)
    d = np.zeros_like(q)
    d[:, 2] = -(80.0 - z) / 10.0  # 16 mm at the base, 0 at the apex
    stats = motion_statistics("ramp", q, d)
    assert len(stats.bin_mean_magnitude_mm) == N_BINS and np.all(np.diff(stats.bin_mean_magnitude_mm) < 0)
    shifted = motion_statistics("ramp", q + np.array([5.0, -7.0, 100.0]), d)
    np.testing.assert_allclose(shifted.bin_mean_magnitude_mm, stats.bin_mean_magnitude_mm)
    assert stats.fraction_above == pytest.approx(np.mean(np.abs(d[:, 2]) > 10.0))


def test_anterior_posterior_bins_run_front_to_back() -> None:
    """|d| growing towards the back (+y) fills the anterior-posterior bins in increasing order, whatever the z."""
    rng = np.random.default_rng(0)
    q = rng.uniform(-60.0, 60.0, size=(400, 3))
    d = np.zeros_like(q)
    d[:, 2] = -(q[:, 1] + 70.0) / 10.0  # 1 mm at the front, 13 mm at the back
    stats = motion_statistics("back", q, d)
    assert np.all(np.diff(stats.ap_bin_mean_magnitude_mm) > 0)
    assert np.all(np.abs(np.diff(stats.bin_mean_magnitude_mm)) < 1.0)  # no trend along z
    population = population_statistics([stats, motion_statistics("front", q * [1, -1, 1], d)])
    np.testing.assert_allclose(population.ap_profile, np.ones(N_BINS), atol=0.05)  # mirrored: the means cancel


def test_si_ap_gradient_tells_the_back_moving_more_from_the_back_reaching_lower() -> None:
    """Lungs whose back reaches lower than their front: motion that grows only towards the base still rises from
    front to back in the anterior-posterior profile, but its gradient at equal height is ~0; adding 4 mm more at the
    back than at the front reads back as 4 mm over the mean |d_z|."""
    rng = np.random.default_rng(2)
    y, z = rng.uniform(0.0, 100.0, 4000), rng.uniform(0.0, 200.0, 4000)
    keep = z > 60.0 - 0.6 * y  # the front of the lungs ends 60 mm higher than their back
    q = np.stack([np.zeros(keep.sum()), y[keep], z[keep]], axis=1)
    d = np.zeros_like(q)
    d[:, 2] = -(14.0 - 0.06 * q[:, 2])  # 14 mm at z = 0, 2 mm at the apex
    by_height = motion_statistics("height", q, d)
    assert by_height.ap_bin_mean_magnitude_mm[-1] > 1.2 * by_height.ap_bin_mean_magnitude_mm[0]
    assert abs(by_height.si_ap_gradient) < 0.02
    d[:, 2] -= 4.0 * q[:, 1] / 100.0
    assert si_ap_gradient(q, d) == pytest.approx(4.0 / np.abs(d[:, 2]).mean(), rel=0.03)


def test_dirlab_lungs_move_more_at_the_back_at_equal_height() -> None:
    """Every DIR-Lab case moves more at the back of its lungs than at their front at equal height: 1.53 of the mean
    |d_z| on average (SD 0.58), the number the simulators' front-back gain is set to (bench_motion_realism)."""
    gradients = [si_ap_gradient(c.exhale_mm, c.displacement_mm)
                 for c in read_dirlab_cases(shared_data_file("landmarks/dirlab"))]
    assert min(gradients) > 0.5
    assert np.mean(gradients) == pytest.approx(1.53, abs=0.01) and np.std(gradients) == pytest.approx(0.58, abs=0.01)


def test_expansion_is_the_slope_across_the_lungs_per_si_motion() -> None:
    """d_x = 3 mm per normalised LR position and d_y = -1 mm per AP position, d_z = -10 mm: expansion (0.3, -0.1);
    zero-mean noise on d leaves it, and a pure translation has none."""
    rng = np.random.default_rng(1)
    q = rng.uniform(-50.0, 50.0, size=(3000, 3))
    span = np.percentile(q, 99, axis=0) - np.percentile(q, 1, axis=0)
    d = np.stack([3.0 * q[:, 0] / span[0], -1.0 * q[:, 1] / span[1], np.full(len(q), -10.0)], axis=1)
    np.testing.assert_allclose(motion_statistics("grow", q, d).expansion, [0.3, -0.1], atol=1e-6)
    noisy = motion_statistics("noisy", q, d + rng.normal(0.0, 1.0, d.shape))
    np.testing.assert_allclose(noisy.expansion, [0.3, -0.1], atol=0.02)
    moved = motion_statistics("moved", q, np.tile([2.0, 1.0, -10.0], (len(q), 1)))
    np.testing.assert_allclose(moved.expansion, [0.0, 0.0], atol=1e-9)


def test_population_of_two() -> None:
    """Means 2 and 4 mm: mean 3, SD 1 (ddof 0), range 2-4; shares averaged."""
    q = np.stack([np.zeros(3), np.zeros(3), np.array([0.0, 10.0, 20.0])], axis=1)
    a = motion_statistics("a", q, np.tile([0.0, 0.0, -2.0], (3, 1)))
    b = motion_statistics("b", q, np.tile([4.0, 0.0, 0.0], (3, 1)))
    population = population_statistics([a, b])
    assert (population.mean_of_means_mm, population.std_of_means_mm) == pytest.approx((3.0, 1.0))
    np.testing.assert_allclose(population.range_of_means_mm, [2.0, 4.0])
    np.testing.assert_allclose(population.component_ratio, [0.5, 0.0, 0.5])
    profiles = np.array([a.bin_mean_magnitude_mm / 2.0, b.bin_mean_magnitude_mm / 4.0])
    filled = np.isfinite(profiles).all(axis=0)  # bins with points in both samples
    assert filled.any()
    np.testing.assert_allclose(population.bin_profile_sd[filled], profiles[:, filled].std(axis=0))
    assert population.to_dict()["names"] == ["a", "b"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: motion_statistics("flat", np.zeros((4, 3)), np.ones((4, 3))), "no superior-inferior extent"),
        (lambda: motion_statistics("short", np.zeros((1, 3)), np.zeros((1, 3))), "N >= 2"),
        (lambda: field_statistics(np.zeros((3, 2, 2, 2)), np.ones(TINY.shape, bool), TINY), "field must be"),
        (lambda: field_statistics(_translation_lps_mm(TINY, (0, 0, 0)), np.zeros(TINY.shape, bool), TINY),
         "fewer than 2 inhale voxels"),
        (lambda: population_statistics([]), "at least one sample"),
    ],
)
def test_bad_input(call, message: str) -> None:
    """Wrong shapes, empty lungs and degenerate samples are refused with the reason."""
    with pytest.raises(BreathcastError, match=message):
        call()


def test_dirlab_case1_statistics() -> None:
    """DIR-Lab case 1 through the statistics: 3.89 mm, SI-dominant, inferior, the base moving most."""
    stats = landmark_statistics(read_dirlab_case(shared_data_file("landmarks/dirlab/case01.csv")))
    assert stats.mean_magnitude_mm == pytest.approx(3.89, abs=0.005)
    assert stats.component_ratio[2] > 0.6 and stats.signed_mean_mm[2] < 0
    assert stats.bin_mean_magnitude_mm[0] > 3 * stats.bin_mean_magnitude_mm[-1]


def test_popi_statistics() -> None:
    """POPI through the statistics: 5.6 mm mean, moving inferior."""
    stats = landmark_statistics(read_popi(shared_data_file("landmarks/popi")))
    assert stats.mean_magnitude_mm == pytest.approx(5.6, abs=0.05) and stats.signed_mean_mm[2] < 0


def test_landmark_and_field_paths_agree_on_a_translation() -> None:
    """The same 3 mm inferior motion reads the same from landmark pairs and from a pull-back field."""
    exhale = np.stack([np.zeros(5), np.zeros(5), np.linspace(0.0, 40.0, 5)], axis=1)
    pairs = landmark_statistics(LandmarkPairs("pairs", exhale, exhale + np.array([0.0, 0.0, -3.0])))
    field = field_statistics(_translation_lps_mm(TINY, (0.0, 0.0, 3.0)), np.ones(TINY.shape, bool), TINY)
    np.testing.assert_allclose(pairs.signed_mean_mm, field.signed_mean_mm, atol=1e-6)
    np.testing.assert_allclose(pairs.component_ratio, field.component_ratio, atol=1e-9)


def test_cartoon_patient_moves_like_lungs() -> None:
    """A 24³ cartoon patient at amplitude 1: inferior on inhale, SI-dominant, the base moving more than the apex."""
    patient = simulate_patient(5, SimulationConfig(grid_size=24, n_scans=1, supersampling=1, noise_hu=0.0))
    motion = build_motion_field(patient.anatomy, patient.motion, patient.grid)
    field = field_to_lps_mm(motion.displacement(1.0, 0.0), patient.grid)
    stats = field_statistics(field, np.isin(patient.reference_labels, LUNG_LABELS), patient.grid)
    assert stats.signed_mean_mm[2] < 0 and stats.component_ratio[2] > 0.5
    assert stats.bin_mean_magnitude_mm[0] > 2 * stats.bin_mean_magnitude_mm[-1]


@pytest.mark.parametrize("seed", [5, 6])
def test_the_cartoon_motion_decays_from_the_diaphragm_under_each_column(seed: int) -> None:
    """The decay with height starts on the diaphragm under each point, the rim of the dome as its top: the lowest
    fifth of the lungs moves clearly more than the second (DIR-Lab 1.26x on average). Measured from the dome's top,
    as before 2026-12-06, the lowest two fifths moved alike (1.06-1.08x with the same seeds)."""
    patient = simulate_patient(seed, SimulationConfig(grid_size=24, n_scans=1, supersampling=1, noise_hu=0.0))
    motion = dataclasses.replace(patient.motion, apex_exponent=1.5, apex_fraction=0.0, posterior_gain=0.0)
    field = field_to_lps_mm(build_motion_field(patient.anatomy, motion, patient.grid).displacement(1.0, 0.0), patient.grid)
    bins = field_statistics(field, np.isin(patient.reference_labels, LUNG_LABELS), patient.grid).bin_mean_magnitude_mm
    assert bins[0] > 1.15 * bins[1]


def test_the_cartoon_lungs_shift_front_to_back_as_drawn() -> None:
    """A cartoon patient drawn with shift coefficients (0.4, 0.4) reads back through :func:`lung_shift` at least 0.15
    above the same patient drawn without (the statistic reads 0.3-0.7 of a cartoon's drawn coefficients: the shift
    tapers to 0 at the rib cage, which the cartoon's lateral lungs reach)."""
    patient = simulate_patient(5, SimulationConfig(grid_size=32, n_scans=1, supersampling=1, noise_hu=0.0))
    lungs = np.isin(patient.reference_labels, LUNG_LABELS)

    def read_back(height: float, lateral: float) -> np.ndarray:
        motion = dataclasses.replace(patient.motion, shift_height=height, shift_lateral=lateral)
        field = build_motion_field(patient.anatomy, motion, patient.grid).displacement(1.0, 0.0)
        return field_statistics(field_to_lps_mm(field, patient.grid), lungs, patient.grid).lung_shift[1:]

    assert np.all(read_back(0.4, 0.4) - read_back(0.0, 0.0) > 0.15)


def test_the_cartoon_height_shift_is_centred_on_its_lungs() -> None:
    """The height shift alone (0.4) reads back mostly as the height coefficient, not as a constant front-back shift:
    the cartoon measures height from its lungs' lowest point (the dome's rim), as realct from its lungs' 2nd
    percentile. Measured from the dome's centre, its lungs sat ~1/4 of their height too high and the constant was as
    large as the coefficient (-0.26 against 0.29), moving the cartoon's lungs anterior on inhale where DIR-Lab's
    move neither way (constant -0.04)."""
    patient = simulate_patient(5, SimulationConfig(grid_size=32, n_scans=1, supersampling=1, noise_hu=0.0))
    lungs = np.isin(patient.reference_labels, LUNG_LABELS)

    def read_back(height: float) -> np.ndarray:
        motion = dataclasses.replace(patient.motion, shift_height=height, shift_lateral=0.0)
        field = build_motion_field(patient.anatomy, motion, patient.grid).displacement(1.0, 0.0)
        return field_statistics(field_to_lps_mm(field, patient.grid), lungs, patient.grid).lung_shift

    constant, height, _ = read_back(0.4) - read_back(0.0)
    assert height > 0.2 and abs(constant) < 0.5 * height


def test_dirlab_lungs_shift_posterior_with_height_and_away_from_the_midline() -> None:
    """Nine of DIR-Lab's ten cases have a height coefficient of :func:`lung_shift` of 0.21-0.55, seven a midline one
    of 0.25-0.69; case 3's are 0.24 and 0.69: its upper and lateral lungs move posterior on inhale, its lower medial
    lungs anterior."""
    pairs = read_dirlab_case(shared_data_file("landmarks/dirlab/case03.csv"))
    np.testing.assert_allclose(lung_shift(pairs.exhale_mm, pairs.displacement_mm), [-0.295, 0.235, 0.691], atol=0.005)


def test_the_cartoon_chest_wall_expands_the_lungs_about_their_centre() -> None:
    """The chest-wall basis alone moves the lungs front and back apart without moving them anterior as a whole:
    inside the rib cage it is centred on the cavity. Grown from the spine (0) to the front wall (1) throughout, it
    moved the cartoon's lungs ~0.5 mm anterior on inhale on average, where DIR-Lab's move 0.37 mm posterior."""
    patient = simulate_patient(5, SimulationConfig(grid_size=32, n_scans=1, supersampling=1, noise_hu=0.0))
    lungs = np.isin(patient.reference_labels, LUNG_LABELS)
    chest_wall = build_motion_field(patient.anatomy, patient.motion, patient.grid).chest_wall
    wall_alone = field_statistics(field_to_lps_mm(chest_wall, patient.grid), lungs, patient.grid)
    assert abs(wall_alone.signed_mean_mm[1]) < 0.1 * patient.motion.chest_wall_mm  # was -0.28 x
    assert wall_alone.mean_abs_mm[1] > 0.05 * patient.motion.chest_wall_mm  # moving front and back apart, not still
