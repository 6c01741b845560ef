"""Classical thorax segmentation: against the cartoon's truth, and on the real CTs of ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest

from breathcast.canonical import to_canonical
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume
from breathcast.metrics import dice
from breathcast.model_box import resample_to_spacing
from breathcast.segmentation import segment_thorax
from breathcast.sim.anatomy import LUNG_LABELS, Label
from tests.conftest import shared_data_file


@pytest.fixture(scope="module")
def cartoon(small_patient):
    """The 48³ cartoon patient's rest CT and its segmentation at 3 mm."""
    volume = resample_to_spacing(Volume(small_patient.reference_hu, small_patient.grid), 3.0)
    return volume, segment_thorax(volume)


def test_lungs_match_the_cartoons_truth(small_patient, cartoon):
    """The segmented lungs overlap the simulator's lung labels (Dice >= 0.85 at 48³)."""
    volume, seg = cartoon
    truth = np.isin(small_patient.reference_labels, LUNG_LABELS)
    coarse = seg.lungs[1::3][:, 1::3][:, :, 1::3]  # not exact voxel centres; enough for a Dice
    from scipy import ndimage

    truth_fine = ndimage.zoom(truth.astype(np.uint8), np.asarray(seg.lungs.shape) / truth.shape, order=0).astype(bool)
    assert dice(seg.lungs, truth_fine) >= 0.85, coarse.shape


def test_spine_lies_behind_the_lungs_and_outside_the_moving_cavity(cartoon):
    """The vertebral column is found posterior to the lungs, and the cavity that moves keeps clear of it."""
    _, seg = cartoon
    assert seg.spine_ml > 10.0 and seg.spine_offset_mm > 10.0
    assert seg.anterior_posterior_ok
    assert not (seg.cavity & seg.spine).any()
    assert (seg.cavity & seg.lungs).sum() >= 0.98 * seg.lungs.sum()


def test_a_front_back_flip_contradicts_the_anatomy(cartoon):
    """The same voxels with the anterior-posterior axis reversed are flagged."""
    volume, _ = cartoon
    flipped = volume.with_array(np.ascontiguousarray(volume.array[:, ::-1, :]))
    assert not segment_thorax(flipped).anterior_posterior_ok


def test_no_lungs_is_one_clear_error():
    """A water cylinder has no lungs: one line saying so."""
    grid = Grid((20, 40, 40), (5.0, 5.0, 5.0), origin=(-100.0, -100.0, -50.0))
    z, y, x = np.indices(grid.shape)
    water = np.where((y - 20) ** 2 + (x - 20) ** 2 < 15**2, 0.0, -1000.0).astype(np.float32)
    with pytest.raises(BreathcastError, match="no lungs found"):
        segment_thorax(Volume(water, grid))


def test_segmentation_needs_the_canonical_frame(cartoon):
    """A volume that is not canonical is refused with what to do."""
    volume, _ = cartoon
    g = volume.grid
    flipped = Grid(g.shape, g.spacing, g.origin, direction=((-1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
    with pytest.raises(BreathcastError, match="to_canonical"):
        segment_thorax(Volume(volume.array, flipped))


def _real_ct(relative: str) -> Volume:
    """A CT of ../shared/data (DICOM folder or NIfTI) in the canonical frame; skips when it is absent."""
    path = shared_data_file(relative)
    if path.is_dir():
        from breathcast.io.dicom_io import read_ct_series

        volume = read_ct_series(path).volume
    else:
        from breathcast.io.dataset import read_volume

        volume = read_volume(path)
    return to_canonical(volume)[0]


@pytest.mark.parametrize("relative, ap_ok", [
    ("ct/popi-phase00", True),
    ("ct/lungct-examples/lungct-0103-phase5.nii.gz", True),
    # Its NIfTI header says RAS, but the spine lies at the header's anterior side and the couch in front of it.
    ("ct/lungct-examples/lungct-0001-phase5.nii.gz", False),
])
def test_real_ct_lungs_and_orientation(relative, ap_ok):
    """On the real CTs: two lungs of a plausible volume, bone found, and the header's orientation judged (head to
    feet by the trachea: right as stored, wrong with the slices reversed)."""
    canonical = resample_to_spacing(_real_ct(relative), 3.0)
    seg = segment_thorax(canonical)
    assert 1500.0 < seg.lung_volume_ml() < 8000.0
    assert (seg.labels == Label.LUNG_LEFT).any() and (seg.labels == Label.LUNG_RIGHT).any()
    assert seg.anterior_posterior_ok is ap_ok
    z = canonical.grid.origin[2] + canonical.grid.spacing[2] * np.arange(canonical.shape[0])
    for keep in (np.ones(len(z), bool), z >= z[0] + 60.0, z <= z[-1] - 60.0):  # whole; cropped 60 mm from below, above
        grid = Grid((int(keep.sum()),) + canonical.shape[1:], canonical.grid.spacing, (*canonical.grid.origin[:2], float(z[keep][0])))
        cropped = Volume(np.ascontiguousarray(canonical.array[keep]), grid)
        assert segment_thorax(cropped).superior_inferior_ok is True
        assert segment_thorax(cropped.with_array(np.ascontiguousarray(cropped.array[::-1]))).superior_inferior_ok is False


@pytest.mark.parametrize("relative", ["ct/popi-phase00", "ct/lungct-examples/lungct-0103-phase5.nii.gz",
                                      "ct/lungct-examples/lungct-0001-phase5.nii.gz"])
def test_the_spine_spans_the_lungs_on_real_ct(relative):
    """The vertebral column is found over every lung slice and kept out of the moving cavity, also on 4D-Lung 0001,
    whose crop cuts the vertebral arches off (one vertebra alone was taken for the spine there, and the cavity
    swallowed the rest)."""
    canonical = _real_ct(relative)
    if relative.endswith("0001-phase5.nii.gz"):  # its header's front-back axis is reversed (see above)
        canonical = canonical.with_array(np.ascontiguousarray(canonical.array[:, ::-1, :]))
    seg = segment_thorax(resample_to_spacing(canonical, 3.0))
    lung_slices = np.flatnonzero(seg.lungs.any(axis=(1, 2)))
    spine_slices = seg.spine.any(axis=(1, 2))[lung_slices[0] : lung_slices[-1] + 1]
    assert spine_slices.mean() > 0.9
    assert not (seg.spine & seg.cavity).any()
