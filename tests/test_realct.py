"""Real-anatomy patients: motion built on the segmentation (sliding, still spine), augmentation, the dataset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from breathcast.errors import BreathcastError
from breathcast.geometry import Volume, field_to_lps_mm
from breathcast.io.dataset import open_dataset, read_patient
from breathcast.model_box import resample_to_spacing
from breathcast.sim.realct import (
    AnatomySource,
    build_real_motion_field,
    build_realct_anatomy,
    load_anatomy_source,
    simulate_realct_dataset,
    simulate_realct_patient,
)
from breathcast.sim.motion_statistics import field_statistics
from breathcast.sim.simulator import SimulationConfig
from breathcast.warp import count_folds
from tests.conftest import shared_data_file

CONFIG = SimulationConfig(grid_size=32, n_scans=3, crop_probability=0.0)


@pytest.fixture(scope="module")
def source(small_patient) -> AnatomySource:
    """The cartoon's rest CT standing in for a real one (the real ones are tested below when present)."""
    return AnatomySource("cartoon-ct", resample_to_spacing(Volume(small_patient.reference_hu, small_patient.grid), 3.0))


@pytest.fixture(scope="module")
def anatomy(source):
    return build_realct_anatomy(source, np.random.default_rng(3), CONFIG)


def _mean_motion(anatomy, mask_fine: np.ndarray, amplitude: float = 1.0) -> float:
    u = field_to_lps_mm(anatomy.motion_field.displacement(amplitude, 0.0), anatomy.grid)
    f = mask_fine.shape[0] // anatomy.grid.shape[0]
    mask = mask_fine[f // 2 :: f, f // 2 :: f, f // 2 :: f]
    return float(np.linalg.norm(u[:, mask], axis=0).mean())


def test_the_spine_stays_while_the_lung_base_moves(source):
    """Sliding at the pleura: the vertebrae move < 1 mm at amplitude 1 while the lowest lung fifth moves > 3 mm.

    On the 64³ grid the models use (6.25 mm voxels): on a 32³ one the vertebrae's voxels reach into the lungs'
    shear layer and read up to 1.4 mm on some patients."""
    config = dataclasses.replace(CONFIG, grid_size=64)
    anatomy = build_realct_anatomy(source, np.random.default_rng(3), config)
    seg = anatomy.segmentation
    lungs = seg.lungs
    slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    z = np.arange(lungs.shape[0])[:, None, None]
    base = lungs & (z <= slices[0] + 0.2 * np.ptp(slices))
    assert _mean_motion(anatomy, seg.spine) < 1.0
    assert _mean_motion(anatomy, base) > 3.0 * max(_mean_motion(anatomy, seg.spine), 0.5)
    assert _mean_motion(anatomy, ~seg.body) < 1.0


@pytest.mark.parametrize("amplitude, rate", [(1.0, 0.0), (1.6, 0.8), (-0.3, -0.5)])
def test_the_motion_does_not_fold(anatomy, amplitude, rate):
    """det(I + grad u) > 0 everywhere for deep breaths and below exhale too."""
    assert count_folds(anatomy.motion_field.displacement(amplitude, rate)) == 0


def test_a_posterior_gain_moves_the_back_of_the_lungs_more(anatomy):
    """posterior_gain > 0: the back half of the lungs moves more than the front half, the mean stays close."""
    seg = anatomy.segmentation
    lungs = seg.lungs
    back = np.zeros_like(lungs)
    rows = np.flatnonzero(lungs.any(axis=(0, 2)))
    back[:, (rows[0] + rows[-1]) // 2 :, :] = True  # canonical frame: +y index is posterior
    f = CONFIG.supersampling

    def si_mm(field, mask):
        u = field_to_lps_mm(field.displacement(1.0, 0.0), anatomy.grid)
        return float(np.abs(u[2][mask[f // 2 :: f, f // 2 :: f, f // 2 :: f]]).mean())

    def with_gain(gain):
        base = dataclasses.replace(anatomy.motion.base, posterior_gain=gain, shift_height=0.0, shift_lateral=0.0)
        return build_real_motion_field(seg, dataclasses.replace(anatomy.motion, base=base), anatomy.grid)

    uniform, graded = with_gain(0.0), with_gain(0.8)
    assert si_mm(graded, lungs & back) > 1.15 * si_mm(uniform, lungs & back)
    assert si_mm(graded, lungs & ~back) < 0.9 * si_mm(uniform, lungs & ~back)
    assert si_mm(graded, lungs) == pytest.approx(si_mm(uniform, lungs), rel=0.2)


def test_the_lungs_shift_posterior_with_height_and_away_from_the_midline(anatomy):
    """MotionParams.shift_height and shift_lateral of 0.4 read back through the landmark statistic
    (:func:`~breathcast.sim.motion_statistics.lung_shift`) as 0.2-0.5 more than without them (~0.3: the shift tapers
    to 0 at the pleura)."""
    f = CONFIG.supersampling
    lungs = anatomy.segmentation.lungs[f // 2 :: f, f // 2 :: f, f // 2 :: f]

    def shift(height, lateral):
        base = dataclasses.replace(anatomy.motion.base, shift_height=height, shift_lateral=lateral)
        field = build_real_motion_field(anatomy.segmentation, dataclasses.replace(anatomy.motion, base=base), anatomy.grid)
        return field_statistics(field_to_lps_mm(field.displacement(1.0, 0.0), anatomy.grid), lungs, anatomy.grid).lung_shift

    gained = shift(0.4, 0.4)[1:] - shift(0.0, 0.0)[1:]
    assert np.all((gained > 0.2) & (gained < 0.5)), gained


def test_the_motion_moves_tissue_inferior_on_inhale(anatomy):
    """Pull-back at inhale: what is seen in the lungs came from further superior (+z), as the real landmarks move."""
    u = field_to_lps_mm(anatomy.motion_field.displacement(1.0, 0.0), anatomy.grid)
    f = CONFIG.supersampling
    lungs = anatomy.segmentation.lungs[f // 2 :: f, f // 2 :: f, f // 2 :: f]
    assert u[2][lungs].mean() > 1.0


def test_a_patient_is_deterministic_and_written_in_the_dataset_format(source, tmp_path):
    """Same seed, same scans; the dataset folder reads back with its scans, traces and fields."""
    a = simulate_realct_patient(source, 11, CONFIG)
    b = simulate_realct_patient(source, 11, CONFIG)
    np.testing.assert_array_equal(a.scans[1].image_hu, b.scans[1].image_hu)
    assert not np.array_equal(a.scans[0].field, a.scans[1].field)
    simulate_realct_dataset(tmp_path / "d", [source], 2, CONFIG, seed=1)
    dataset = open_dataset(tmp_path / "d")
    record = read_patient(dataset, dataset.patients[0])
    assert len(record.scans) == CONFIG.n_scans and record.scans[0].field is not None
    assert record.metadata["simulator"]["anatomy"]["source"] == "cartoon-ct"


def test_a_source_whose_header_reverses_front_and_back_is_flipped(small_patient, tmp_path):
    """A CT whose anatomy contradicts its header's anterior-posterior axis is flipped, and that is recorded."""
    import nibabel as nib

    from breathcast.io.dataset import grid_to_nifti_affine

    flipped = np.ascontiguousarray(small_patient.reference_hu[:, ::-1, :])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(flipped.transpose(2, 1, 0), grid_to_nifti_affine(small_patient.grid)), path)
    source = load_anatomy_source(path)
    assert source.flipped_anterior_posterior


def test_a_source_whose_slices_run_feet_to_head_is_refused(thorax64, tmp_path):
    """A CT whose trachea lies below its lungs' middle is not flipped by guesswork: the source is refused, saying why."""
    import nibabel as nib

    from breathcast.io.dataset import grid_to_nifti_affine

    upside_down = np.ascontiguousarray(thorax64.reference_hu[::-1])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(upside_down.transpose(2, 1, 0), grid_to_nifti_affine(thorax64.grid)), path)
    with pytest.raises(BreathcastError, match="superior-inferior direction contradicts its anatomy"):
        load_anatomy_source(path)


def test_real_ct_patient():
    """On a real 4D-Lung CT: a patient with a still spine and no folds (skipped without ../shared/data)."""
    source = load_anatomy_source(shared_data_file("ct/lungct-examples/lungct-0103-phase5.nii.gz"))
    anatomy = build_realct_anatomy(source, np.random.default_rng(0), CONFIG)
    assert _mean_motion(anatomy, anatomy.segmentation.spine) < 1.0
    assert count_folds(anatomy.motion_field.displacement(1.0, 0.0)) == 0
