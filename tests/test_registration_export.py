"""Field export: DICOM Deformable Spatial Registration (build, validate, write, read back), MHA and NIfTI."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from pydicom.data import get_testdata_file

from breathcast.io.dicom_io import CTSeries, read_ct_series, save_dataset, write_ct_series
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume, field_to_lps_mm
from breathcast.io.registration_export import (
    build_deformable_registration,
    export_field,
    read_deformable_registration,
    read_exported_field,
    read_field_mha,
    validate_deformable_registration,
    write_deformable_registration,
    write_field_mha,
)

DEFORMABLE_REG = "1.2.840.10008.5.1.4.1.1.66.3"


@pytest.fixture
def plan(tmp_path) -> CTSeries:
    """A tiny planning CT (8 x 12 x 16, anisotropic voxels), written and read so it has real UIDs."""
    grid = Grid((8, 12, 16), (1.5, 1.25, 2.5), origin=(-20.0, -30.0, 10.0))
    write_ct_series(Volume(np.zeros(grid.shape, np.float32), grid), tmp_path / "plan")
    return read_ct_series(tmp_path / "plan")


def random_field(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, (3, *shape)).astype(np.float32)


def test_dicom_round_trip_gives_the_same_field(plan, tmp_path):
    """Written and read back, the field is the same mm LPS field (float32-exact) on the same grid."""
    grid = plan.volume.grid
    u = random_field(grid.shape)
    path = write_deformable_registration(u, grid, plan.identity, tmp_path / "reg.dcm")
    back = read_deformable_registration(path)
    assert back.grid == grid
    assert_array_equal(back.field_lps_mm, field_to_lps_mm(u, grid))
    assert_allclose(back.field_voxels(), u, rtol=1e-6, atol=1e-6)
    assert back.source_frame_of_reference_uid == grid.frame_of_reference_uid
    assert back.referenced_sop_instance_uids == plan.identity.sop_instance_uids


def test_known_translation_is_stored_as_lps_mm_x_fastest(plan, tmp_path):
    """One voxel along each array axis is stored as (x, y, z) mm with x fastest: (1.5, 2.5, 7.5) per voxel."""
    grid = plan.volume.grid
    u = np.zeros((3, *grid.shape), np.float32)
    u[0], u[1], u[2] = 3.0, 2.0, 1.0  # (dz, dy, dx) voxels
    ds = pydicom.dcmread(write_deformable_registration(u, grid, plan.identity, tmp_path / "reg.dcm"))
    item = ds.DeformableRegistrationSequence[0].DeformableRegistrationGridSequence[0]
    data = np.frombuffer(item.VectorGridData, "<f4").reshape(8, 12, 16, 3)
    assert_array_equal(data[0, 0, 0], [1.5, 2.5, 7.5])
    assert list(item.GridDimensions) == [16, 12, 8]
    assert list(item.GridResolution) == [1.5, 1.25, 2.5]
    assert list(item.ImagePositionPatient) == [-20.0, -30.0, 10.0]
    assert list(item.ImageOrientationPatient) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_object_is_structurally_complete(plan, tmp_path):
    """Required modules and references are there; VectorGridData is VR OF of 3 * nx * ny * nz * 4 bytes."""
    grid = plan.volume.grid
    ds = pydicom.dcmread(
        write_deformable_registration(random_field(grid.shape), grid, plan.identity, tmp_path / "r.dcm")
    )
    assert validate_deformable_registration(ds) == []
    assert (ds.SOPClassUID, ds.Modality, ds.file_meta.TransferSyntaxUID) == (
        DEFORMABLE_REG,
        "REG",
        "1.2.840.10008.1.2.1",
    )
    assert ds.FrameOfReferenceUID == plan.identity.frame_of_reference_uid
    assert ds.StudyInstanceUID == plan.identity.study_instance_uid
    assert ds.SeriesInstanceUID != plan.identity.series_instance_uid
    for keyword in ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions"):
        assert ds.get(keyword), keyword  # Enhanced General Equipment: Type 1
    item = ds.DeformableRegistrationSequence[0]
    assert item.SourceFrameOfReferenceUID == plan.identity.frame_of_reference_uid
    assert [r.ReferencedSOPInstanceUID for r in item.ReferencedImageSequence] == list(plan.identity.sop_instance_uids)
    for key in ("PreDeformationMatrixRegistrationSequence", "PostDeformationMatrixRegistrationSequence"):
        assert list(item[key].value[0].FrameOfReferenceTransformationMatrix) == np.eye(4).ravel().tolist()
    element = item.DeformableRegistrationGridSequence[0]["VectorGridData"]
    assert element.VR == "OF" and len(element.value) == 3 * 8 * 12 * 16 * 4
    series = ds.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == plan.identity.series_instance_uid
    assert len(series.ReferencedInstanceSequence) == 8


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda ds: delattr(ds, "FrameOfReferenceUID"), "FrameOfReferenceUID is missing"),
        (lambda ds: setattr(ds, "Manufacturer", ""), "Manufacturer is empty"),
        (lambda ds: setattr(ds, "Modality", "CT"), "Modality is 'CT'"),
        (
            lambda ds: setattr(
                ds.DeformableRegistrationSequence[0].DeformableRegistrationGridSequence[0], "VectorGridData", b"\0" * 12
            ),
            "VectorGridData has 12 bytes, GridDimensions say 18432",
        ),
    ],
    ids=["no-frame", "empty-manufacturer", "wrong-modality", "short-data"],
)
def test_validator_finds_damage(plan, damage, problem):
    """The structural validator reports each kind of damage in words."""
    grid = plan.volume.grid
    ds = build_deformable_registration(random_field(grid.shape), grid, plan.identity)
    damage(ds)
    assert any(problem in p for p in validate_deformable_registration(ds)), validate_deformable_registration(ds)


def test_field_on_the_model_grid(plan, tmp_path):
    """A field on a coarser model grid over the same field of view keeps that grid."""
    grid = plan.volume.grid.with_shape((4, 6, 8))
    u = random_field(grid.shape, seed=3)
    back = read_deformable_registration(write_deformable_registration(u, grid, plan.identity, tmp_path / "reg.dcm"))
    assert_allclose(back.grid.affine, grid.affine, atol=1e-12)
    assert_allclose(back.field_voxels(), u, atol=1e-6)


def test_left_handed_grid_is_written_as_the_same_field(plan, tmp_path):
    """DICOM grids are right-handed: a field on a left-handed grid comes back reversed, equal in patient space."""
    source = plan.volume.grid
    direction = np.diag([1.0, 1.0, -1.0])
    grid = Grid(
        source.shape, source.spacing, source.origin, tuple(map(tuple, direction)), source.frame_of_reference_uid
    )
    u = random_field(grid.shape, seed=4)
    back = read_deformable_registration(write_deformable_registration(u, grid, plan.identity, tmp_path / "reg.dcm"))
    assert np.linalg.det(back.grid.direction_matrix) == pytest.approx(1.0)
    k = np.array([0, 5, 7])
    flipped = np.array([grid.shape[0] - 1, 5, 7])
    assert_allclose(back.grid.index_to_lps(flipped), grid.index_to_lps(k))
    assert_array_equal(back.field_lps_mm[:, flipped[0], 5, 7], field_to_lps_mm(u, grid)[:, 0, 5, 7])


def test_other_frame_of_reference_is_refused(plan):
    """A field on a grid of another Frame of Reference cannot reference this plan."""
    source = plan.volume.grid
    grid = Grid(source.shape, source.spacing, source.origin, source.direction, "1.2.3.999")
    with pytest.raises(BreathcastError, match="Frame of Reference 1.2.3.999, the plan in"):
        build_deformable_registration(random_field(grid.shape), grid, plan.identity)


def test_nan_field_is_refused_and_nothing_written(plan, tmp_path):
    """NaN displacements are refused before any file exists."""
    grid = plan.volume.grid
    u = random_field(grid.shape)
    u[1, 2, 3, 4] = np.nan
    with pytest.raises(BreathcastError, match="NaN"):
        write_deformable_registration(u, grid, plan.identity, tmp_path / "reg.dcm")
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]


def test_reading_a_ct_as_registration_is_refused():
    """A CT file is not a registration: refused with its SOP class."""
    with pytest.raises(BreathcastError, match=r"CT_small\.dcm: SOP Class 1.2.840.10008.5.1.4.1.1.2 is not Deformable"):
        read_deformable_registration(get_testdata_file("CT_small.dcm"))


def test_non_identity_matrices_are_refused(plan, tmp_path):
    """A registration whose post-deformation matrix is not identity is refused (composition unsupported)."""
    grid = plan.volume.grid
    ds = build_deformable_registration(random_field(grid.shape), grid, plan.identity)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    ds.DeformableRegistrationSequence[0].PostDeformationMatrixRegistrationSequence[
        0
    ].FrameOfReferenceTransformationMatrix = shifted.ravel().tolist()
    save_dataset(ds, tmp_path / "reg.dcm")
    with pytest.raises(BreathcastError, match="PostDeformationMatrixRegistrationSequence is not identity"):
        read_deformable_registration(tmp_path / "reg.dcm")


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nii", ".dcm"])
def test_export_round_trip_by_suffix(plan, tmp_path, suffix):
    """export_field writes each format by its suffix; read_exported_field gives the voxel field back."""
    grid = plan.volume.grid
    u = random_field(grid.shape, seed=5)
    path = export_field(u, grid, tmp_path / f"field{suffix}", plan=plan.identity)
    back, back_grid = read_exported_field(path)
    assert_allclose(back, u, atol=1e-5)
    assert_allclose(back_grid.affine, grid.affine, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mha_on_an_oblique_grid(tmp_path):
    """MHA keeps an oblique direction: the header lists each index axis's direction in turn."""
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    grid = Grid((3, 4, 5), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), tuple(map(tuple, rotation)))
    u = random_field(grid.shape, seed=6)
    path = write_field_mha(u, grid, tmp_path / "u.mha")
    assert b"TransformMatrix = 0.0 1.0 0.0 -1.0 0.0 0.0 0.0 0.0 1.0\n" in path.read_bytes()[:400]
    back, back_grid = read_field_mha(path)
    assert back_grid == grid
    assert_allclose(back, u, atol=1e-5)


def test_export_refusals(plan, tmp_path):
    """A DICOM export needs the plan; an unknown suffix is named."""
    grid = plan.volume.grid
    u = random_field(grid.shape)
    with pytest.raises(BreathcastError, match=r"field\.dcm: a DICOM registration must reference the planning CT"):
        export_field(u, grid, tmp_path / "field.dcm")
    with pytest.raises(BreathcastError, match=r"field\.vtk: unknown field format"):
        export_field(u, grid, tmp_path / "field.vtk")


def test_mha_reads_in_simpleitk(plan, tmp_path):
    """When SimpleITK is installed, it reads the MHA as a 3-component field with the same geometry and values."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK not installed (optional cross-check)")
    grid = plan.volume.grid
    u = random_field(grid.shape, seed=7)
    image = sitk.ReadImage(str(write_field_mha(u, grid, tmp_path / "u.mha")))
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert_allclose(image.GetOrigin(), grid.origin)
    assert_allclose(image.GetSpacing(), grid.spacing)
    assert_allclose(sitk.GetArrayFromImage(image), field_to_lps_mm(u, grid).transpose(1, 2, 3, 0))


def _dciodvfy_errors(path) -> tuple[str, list[str]]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    report = result.stdout + result.stderr
    return report, [line for line in report.splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_exported_registration_passes_dciodvfy(plan, tmp_path):
    """dicom3tools' verifier finds no errors in an exported object, and does find them in a damaged one."""
    grid = plan.volume.grid
    ds = build_deformable_registration(random_field(grid.shape), grid, plan.identity)
    report, errors = _dciodvfy_errors(save_dataset(ds, tmp_path / "reg.dcm"))
    assert "DeformableSpatialRegistration" in report
    assert errors == [], report
    del ds.FrameOfReferenceUID
    del ds.DeviceSerialNumber
    _, errors = _dciodvfy_errors(save_dataset(ds, tmp_path / "broken.dcm"))
    assert len(errors) >= 2


def _ds_values(ds: pydicom.Dataset) -> list[str]:
    """Every DS value of a dataset (nested sequences too), as the strings stored."""
    out = []
    for element in ds.iterall():
        if element.VR == "DS" and element.value not in (None, ""):
            values = element.value if element.VM > 1 else [element.value]
            out += [str(v) for v in values]
    return out


@pytest.mark.parametrize("shape", [(7, 11, 13), (3, 9, 14), (8, 12, 16)])
def test_any_field_shape_reads_strictly_with_short_ds(plan, tmp_path, shape):
    """A field grid whose origin/spacing have long decimal expansions: DS <= 16 chars, strict pydicom reads it."""
    grid = plan.volume.grid.with_shape(shape)  # e.g. spacing 1.5 * 16 / 13 = 1.8461538461538463 mm
    u = random_field(grid.shape, seed=5)
    path = write_deformable_registration(u, grid, plan.identity, tmp_path / "reg.dcm")
    with pydicom.config.strict_reading():
        ds = pydicom.dcmread(path)
        values = _ds_values(ds)
    assert values and max(len(v) for v in values) <= 16
    back = read_deformable_registration(path)
    assert_allclose(back.grid.affine, grid.affine, atol=1e-9)
    assert_allclose(back.field_voxels(), u, atol=1e-5)
    if shutil.which("dciodvfy"):
        report, errors = _dciodvfy_errors(path)
        assert errors == [], report


@pytest.mark.parametrize("position", ["FFS", "FFP", "FFDL", "HFP"])
def test_registration_grid_has_its_third_axis_superior(plan, tmp_path, position):
    """A field on a feet-first (or prone) grid is written with row x column = +z, the same field at every point."""
    from breathcast.canonical import canonical_frame, position_direction, reorient

    stored = reorient(plan.volume, position_direction(position)).grid
    u = random_field(stored.shape, seed=6)
    back = read_deformable_registration(write_deformable_registration(u, stored, plan.identity, tmp_path / "reg.dcm"))
    assert_allclose(back.grid.direction_matrix[:, 2], (0.0, 0.0, 1.0), atol=1e-12)
    assert_allclose(back.grid.direction_matrix[:, 0], stored.direction_matrix[:, 0], atol=1e-12)  # rows kept
    for grid, lps in ((stored, field_to_lps_mm(u, stored)), (back.grid, back.field_lps_mm)):
        frame = canonical_frame(grid)  # both on the canonical grid of their points: equal voxel for voxel
        assert_allclose(frame.canonical.origin, plan.volume.grid.origin, atol=1e-9)
        assert_array_equal(frame.to_canonical_array(lps), canonical_frame(stored).to_canonical_array(field_to_lps_mm(u, stored)))


def test_exports_follow_the_umask(plan, tmp_path):
    """REG, MHA, NIfTI and CT series are as readable as the umask allows (022: world-readable), not 0600/0700."""
    import os

    grid = plan.volume.grid
    u = random_field(grid.shape)
    old = os.umask(0o022)
    try:
        files = [export_field(u, grid, tmp_path / name, plan=plan.identity) for name in ("reg.dcm", "u.mha", "u.nii.gz")]
        write_ct_series(Volume(np.zeros(grid.shape, np.float32), grid), tmp_path / "ct", reference=plan.identity)
    finally:
        os.umask(old)
    for path in files + [tmp_path / "ct" / "CT00001.dcm"]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (tmp_path / "ct").stat().st_mode & 0o777 == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
