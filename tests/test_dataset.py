"""The on-disk dataset format: NIfTI geometry, field units, sidecars, atomic writes, clear errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from breathcast.io.dataset import (
    open_dataset,
    read_field,
    read_patient,
    read_volume,
    write_field,
    write_volume,
)
from grids import OBLIQUE

from breathcast.errors import BreathcastError, DatasetError
from breathcast.geometry import Grid, Volume, field_to_lps_mm
from breathcast.sim.simulator import save_patient



def test_volume_round_trip_keeps_values_and_geometry(tmp_path):
    """A volume written and read back has the same voxels, spacing, origin and direction."""
    array = np.arange(np.prod(OBLIQUE.shape), dtype=np.int16).reshape(OBLIQUE.shape)
    write_volume(Volume(array, OBLIQUE), tmp_path / "v.nii.gz")
    back = read_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.grid.affine, OBLIQUE.affine, atol=1e-5)


def test_nifti_affine_is_ras():
    """NIfTI positions are RAS: the voxel at LPS (x, y, z) is stored at (-x, -y, z)."""
    path_grid = Grid((2, 2, 2), (1.0, 1.0, 1.0), origin=(10.0, 20.0, 30.0))
    from breathcast.io.dataset import grid_to_nifti_affine

    ras = grid_to_nifti_affine(path_grid) @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(ras[:3], [-10.0, -20.0, 30.0])


def test_field_is_stored_in_lps_mm_itk_layout(tmp_path):
    """Fields go to disk as (X, Y, Z, 1, 3) LPS mm and come back in voxels unchanged."""
    rng = np.random.default_rng(1)
    u = rng.normal(size=(3, *OBLIQUE.shape)).astype(np.float32)
    write_field(u, OBLIQUE, tmp_path / "f.nii.gz")
    raw = nib.load(str(tmp_path / "f.nii.gz"))
    assert raw.shape == (6, 5, 4, 1, 3)
    assert raw.header.get_intent()[0] == "vector"
    lps = field_to_lps_mm(u, OBLIQUE)
    np.testing.assert_allclose(np.asarray(raw.dataobj)[2, 1, 3, 0, :], lps[:, 3, 1, 2], atol=1e-6)
    back, grid = read_field(tmp_path / "f.nii.gz")
    np.testing.assert_allclose(back, u, atol=1e-5)
    assert grid.shape == OBLIQUE.shape


def test_simulated_patient_round_trip(tmp_path, small_patient):
    """A simulated patient written to disk reads back with scans, traces, labels and true fields."""
    save_patient(small_patient, tmp_path / "ds")
    dataset = open_dataset(tmp_path / "ds")
    assert dataset.kind == "simulated" and dataset.patients == [small_patient.patient_id]
    record = read_patient(dataset, small_patient.patient_id)
    assert len(record.scans) == len(small_patient.scans)
    scan, truth = record.scans[3], small_patient.scans[3]
    np.testing.assert_allclose(scan.image.array, np.rint(truth.image_hu), atol=0)
    np.testing.assert_allclose(scan.field, truth.field, atol=1e-4)
    np.testing.assert_allclose(scan.amplitude, truth.amplitude)
    np.testing.assert_array_equal(scan.labels, truth.labels)
    assert record.metadata["simulator"]["seed"] == small_patient.seed
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_failed_write_leaves_nothing_half_written(tmp_path, small_patient):
    """A patient whose scan is inconsistent is not written at all, and the dataset index is untouched."""
    broken = [{"image_hu": small_patient.scans[0].image_hu, "amplitude": np.zeros(3), "rate": np.zeros(3),
               "slice_times_s": np.zeros(3)}]
    from breathcast.io.dataset import write_patient

    with pytest.raises(BreathcastError, match="amplitude has shape"):
        write_patient(tmp_path / "ds", "p", small_patient.grid, broken, np.zeros(2), np.zeros(2))
    assert list((tmp_path / "ds").iterdir()) == []


@pytest.fixture()
def dataset_on_disk(tmp_path, small_patient):
    save_patient(small_patient, tmp_path / "ds")
    return tmp_path / "ds", small_patient.patient_id


def test_missing_trace_names_the_file(dataset_on_disk):
    """A scan sidecar without its per-slice amplitude is refused, naming the sidecar."""
    root, pid = dataset_on_disk
    sidecar = root / pid / "scan_02.json"
    data = json.loads(sidecar.read_text())
    del data["amplitude"]
    sidecar.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"scan_02\.json: no 'amplitude' entry"):
        read_patient(open_dataset(root), pid)


def test_mismatched_trace_length_names_the_file(dataset_on_disk):
    """A per-slice trace of the wrong length is refused with both lengths and the file."""
    root, pid = dataset_on_disk
    sidecar = root / pid / "scan_01.json"
    data = json.loads(sidecar.read_text())
    data["rate"] = data["rate"][:-1]
    sidecar.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"scan_01\.json: 'rate' has 47 values; the scan has 48 slices"):
        read_patient(open_dataset(root), pid)


def test_missing_volume_and_missing_dataset_are_clear(dataset_on_disk, tmp_path):
    """Missing files and folders are named in the error."""
    root, pid = dataset_on_disk
    (root / pid / "scan_04.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"scan_04\.nii\.gz: file is missing"):
        read_patient(open_dataset(root), pid)
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"dataset\.json: file is missing"):
        open_dataset(tmp_path / "empty")


def test_simpleitk_reads_a_written_field_as_lps_millimetres(tmp_path):
    """ITK reads our NIfTI fields with the components we wrote (LPS mm), not flipped as it does for DISPVECT."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK not installed (optional cross-check)")
    from breathcast.io.dataset import write_field
    from breathcast.geometry import Grid, field_to_lps_mm

    grid = Grid((3, 4, 5), spacing=(1.0, 2.0, 3.0), origin=(10.0, -5.0, 2.0))
    u = np.random.default_rng(0).normal(size=(3, *grid.shape)).astype(np.float32)
    write_field(u, grid, tmp_path / "u.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "u.nii.gz"))
    read = sitk.GetArrayFromImage(image).reshape(*grid.shape, 3)
    np.testing.assert_allclose(read, field_to_lps_mm(u, grid).transpose(1, 2, 3, 0), atol=1e-6)
