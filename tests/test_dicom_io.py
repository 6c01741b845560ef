"""DICOM CT series: reading (sorting, rescale, geometry, refusals), writing (derived series, atomic), round trips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from breathcast.io import dicom_io
from breathcast.io.dicom_io import read_ct_series, write_ct_series
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume
from tests.conftest import shared_data_file

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_slice(
    path: Path,
    pixels: np.ndarray,
    position: tuple[float, float, float],
    orientation: tuple[float, ...] = AXIAL,
    spacing: tuple[float, float] = (0.8, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    series_uid: str = "1.2.3.4.1",
    frame_uid: str = "1.2.3.4.9",
    slice_location: float = 0.0,
) -> str:
    """One single-frame CT slice written with plain pydicom (independent of breathcast's writer)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "P1"
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = "1.2.3.4.2"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 99.0  # deliberately wrong: spacing must come from positions
    ds.SliceLocation = slice_location  # deliberately misleading: sorting must not use it
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def make_series(
    folder: Path,
    n: int = 6,
    shape: tuple[int, int] = (10, 12),
    dz: float = 2.5,
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    orientation: tuple[float, ...] = AXIAL,
    seed: int = 0,
    **options,
) -> tuple[np.ndarray, list[str]]:
    """A tiny series, files in shuffled order; returns (expected HU in ascending normal order, SOP UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    expected, uids = [], []
    for rank, k in enumerate(rng.permutation(n)):
        pixels = rng.integers(0, 3000, size=shape)
        slope, intercept = (1.0, -1024.0) if k % 2 else (2.0, -1000.0)  # slopes may differ per slice
        position = tuple(np.asarray(origin) + normal * dz * k)
        uid = write_slice(
            folder / f"IM{rank:03d}",
            pixels,
            position,
            orientation,
            slope=slope,
            intercept=intercept,
            slice_location=-float(k),
            **options,
        )
        expected.append((k, pixels * slope + intercept, uid))
    expected.sort(key=lambda item: item[0])
    return np.stack([e[1] for e in expected]).astype(np.float32), [e[2] for e in expected]


def test_reads_sorted_by_position_with_per_slice_rescale(tmp_path):
    """Slices sort along the normal (not by SliceLocation or file name); each slice's rescale applies."""
    hu, uids = make_series(tmp_path / "ct")
    ct = read_ct_series(tmp_path / "ct")
    assert_array_equal(ct.volume.array, hu)
    assert ct.volume.array.dtype == np.float32
    grid = ct.volume.grid
    assert grid.shape == (6, 10, 12)
    assert grid.spacing == (0.7, 0.8, 2.5)  # (column spacing, row spacing, from positions)
    assert grid.origin == (-10.0, -20.0, 30.0)
    assert grid.frame_of_reference_uid == "1.2.3.4.9"
    assert list(ct.identity.sop_instance_uids) == uids
    assert (ct.identity.patient_id, ct.identity.study_instance_uid) == ("P1", "1.2.3.4.2")


def test_oblique_orientation_places_every_slice(tmp_path):
    """An oblique, rotated series: the grid maps each voxel index to its slice's ImagePositionPatient."""
    c, s = np.cos(0.4), np.sin(0.4)
    orientation = (c, s, 0.0, 0.0, 0.0, -1.0)  # rows tilted in the axial plane, columns towards the feet
    make_series(tmp_path / "ct", n=4, orientation=orientation, origin=(5.0, 6.0, 7.0))
    ct = read_ct_series(tmp_path / "ct")
    grid = ct.volume.grid
    assert np.linalg.det(grid.direction_matrix) == pytest.approx(1.0)
    for k, path in enumerate(ct.files):
        ipp = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
        assert_allclose(grid.index_to_lps(np.array([k, 0, 0])), ipp, atol=1e-9)
    assert_allclose(
        grid.index_to_lps(np.array([0, 1, 1])) - grid.origin, 0.8 * np.array([0, 0, -1]) + 0.7 * np.array([c, s, 0])
    )


def test_ignores_non_image_objects_and_other_files(tmp_path):
    """An RTSTRUCT and a text file beside the slices do not disturb reading."""
    make_series(tmp_path / "ct", n=3)
    shutil.copy(get_testdata_file("rtstruct.dcm"), tmp_path / "ct" / "rs.dcm")
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    assert read_ct_series(tmp_path / "ct").volume.shape == (3, 10, 12)


def _gap(folder: Path) -> None:
    make_series(folder, n=6)
    victim = sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[3]
    victim.unlink()


def _uneven(folder: Path) -> None:
    for k, z in enumerate((0.0, 2.0, 4.0, 7.0, 9.0)):
        write_slice(folder / f"s{k}", np.zeros((4, 4)), (0.0, 0.0, z))


def _tilt(folder: Path) -> None:
    for k in range(4):
        write_slice(folder / f"s{k}", np.zeros((4, 4)), (0.0, 0.5 * k, 2.0 * k))  # y drifts: gantry tilt


def _mixed(folder: Path) -> None:
    make_series(folder / "a", n=3, series_uid="1.2.3.4.100")
    make_series(folder / "b", n=4, series_uid="1.2.3.4.200")


def _mr(folder: Path) -> None:
    make_series(folder, n=3, modality="MR")


def _no_dicom(folder: Path) -> None:
    (folder / "readme.txt").write_text("hello")


def _single(folder: Path) -> None:
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")


def _duplicate(folder: Path) -> None:
    for k in range(3):
        write_slice(folder / f"s{k}", np.zeros((4, 4)), (0.0, 0.0, 2.0 * min(k, 1)))


def _rows_differ(folder: Path) -> None:
    write_slice(folder / "s0", np.zeros((4, 4)), (0.0, 0.0, 0.0))
    write_slice(folder / "s1", np.zeros((4, 5)), (0.0, 0.0, 2.0))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_no_dicom, r"ct: no DICOM files"),
        (_mixed, r"ct: 2 image series are mixed here .*1\.2\.3\.4\.100.*choose one by its SeriesInstanceUID"),
        (_gap, r"ct: missing slices: a gap of 5\.000 mm \(1 slices of 2\.500 mm\) between IM"),
        (_uneven, r"ct: uneven slice spacing: 3\.000 mm between s2 and s3"),
        (_tilt, r"s1: slice positions are not along the slice normal \(gantry tilt"),
        (_mr, r"IM000: modality is MR; a planning CT series must be CT"),
        (_single, r"CT_small.dcm: a single slice"),
        (_duplicate, r"s2: same slice position as s1"),
        (_rows_differ, r"s1: Columns 5 differs from s0"),
    ],
    ids=["no-dicom", "mixed", "gap", "uneven", "tilt", "not-ct", "single-slice", "duplicate", "size-differs"],
)
def test_refusals_name_the_file_or_folder(tmp_path, make, match):
    """Each bad input is refused with one line naming the folder or the file at fault."""
    folder = tmp_path / "ct"
    folder.mkdir()
    make(folder)
    with pytest.raises(BreathcastError, match=match) as info:
        read_ct_series(folder)
    assert "\n" not in str(info.value)


def test_mixed_series_chosen_by_uid(tmp_path):
    """With a SeriesInstanceUID the wanted series of a mixed folder is read; an unknown UID is refused."""
    _mixed(tmp_path)
    assert read_ct_series(tmp_path, series_uid="1.2.3.4.200").volume.shape[0] == 4
    with pytest.raises(BreathcastError, match="no image series with SeriesInstanceUID 9.9"):
        read_ct_series(tmp_path, series_uid="9.9")


def test_missing_folder_is_refused(tmp_path):
    """A path that is not a folder is refused by name."""
    with pytest.raises(BreathcastError, match="nothere: not a folder"):
        read_ct_series(tmp_path / "nothere")


def test_pydicom_ct_small_loads_as_a_series(tmp_path):
    """pydicom's bundled CT_small.dcm alone is one slice (refused above); stacked as 3 slices it loads exactly."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    for k in range(3):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [
            ds.ImagePositionPatient[0],
            ds.ImagePositionPatient[1],
            float(ds.ImagePositionPatient[2]) + 5 * k,
        ]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / f"s{k}.dcm")
    ct = read_ct_series(tmp_path)
    assert ct.volume.shape == (3, 128, 128)
    assert_array_equal(ct.volume.array[1], expected.astype(np.float32))
    assert ct.volume.grid.spacing[2] == pytest.approx(5.0)
    assert ct.volume.grid.origin == pytest.approx((-158.135803, -179.035797, -75.699997))


def test_round_trip_keeps_geometry_and_hu_exactly(tmp_path):
    """read -> write -> read: identical grid and HU; new series and instance UIDs, same study and frame."""
    make_series(tmp_path / "ct", n=5, dz=1.25)
    ct = read_ct_series(tmp_path / "ct")
    written = write_ct_series(ct.volume, tmp_path / "out", reference=ct.identity, description="warped, state 3")
    back = read_ct_series(tmp_path / "out")
    assert back.volume.grid == ct.volume.grid
    assert_array_equal(back.volume.array, ct.volume.array)
    assert back.identity.series_instance_uid == written.series_instance_uid != ct.identity.series_instance_uid
    assert back.identity.sop_instance_uids == written.sop_instance_uids
    assert not set(written.sop_instance_uids) & set(ct.identity.sop_instance_uids)
    assert (back.identity.study_instance_uid, back.identity.frame_of_reference_uid, back.identity.patient_id) == (
        ct.identity.study_instance_uid,
        ct.identity.frame_of_reference_uid,
        "P1",
    )
    ds = pydicom.dcmread(back.files[0])
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.SeriesDescription == "warped, state 3"
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation) == (1, 0, 1)


def test_write_rounds_fractional_hu_and_keeps_arbitrary_geometry(tmp_path):
    """Non-integer HU round to the nearest HU; a rotated grid with long decimals comes back within 1e-9 mm."""
    rotation = np.array([[np.cos(0.3), 0, np.sin(0.3)], [0, 1, 0], [-np.sin(0.3), 0, np.cos(0.3)]])
    grid = Grid(
        (3, 5, 4),
        (0.123456789, 1.0 / 3.0, 2.0 / 7.0),
        (-12.3456789, 1.0 / 7.0, 3.14159265),
        tuple(map(tuple, rotation)),
    )
    hu = np.random.default_rng(1).uniform(-1000, 1000, grid.shape).astype(np.float32)
    write_ct_series(Volume(hu, grid), tmp_path / "out")
    back = read_ct_series(tmp_path / "out")
    assert_allclose(back.volume.array, hu, atol=0.5)
    assert_allclose(back.volume.grid.affine, grid.affine, atol=1e-9)


def test_writer_refuses_an_existing_folder_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A non-empty target is refused untouched; a failure mid-series leaves neither target nor temporary files."""
    volume = Volume(np.zeros((4, 3, 3), np.float32), Grid((4, 3, 3), (1.0, 1.0, 1.0)))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(BreathcastError, match="busy: already exists"):
        write_ct_series(volume, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]

    calls = []
    real_save = dicom_io._save

    def failing_save(ds, path, shown):
        calls.append(path)
        if len(calls) == 3:
            raise BreathcastError(f"cannot write {shown}: disk full")
        real_save(ds, path, shown)

    monkeypatch.setattr(dicom_io, "_save", failing_save)
    with pytest.raises(BreathcastError, match="disk full"):
        write_ct_series(volume, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_writer_refuses_nan(tmp_path):
    """NaN HU cannot be stored as integers: refused before anything is written."""
    volume = Volume(np.full((2, 2, 2), np.nan, np.float32), Grid((2, 2, 2), (1.0, 1.0, 1.0)))
    with pytest.raises(BreathcastError, match="NaN"):
        write_ct_series(volume, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_writer_refuses_unknown_orientations_and_mismatched_uids(tmp_path):
    """An unknown PatientPosition, or allocated UIDs for another slice count, are refused before writing."""
    volume = Volume(np.zeros((2, 4, 4), np.float32), Grid((2, 4, 4), (1.0, 1.0, 2.0)))
    with pytest.raises(BreathcastError, match="unknown patient position 'XYZ'; one of HFS, HFP, FFS"):
        write_ct_series(volume, tmp_path / "out", orientation="XYZ")
    with pytest.raises(BreathcastError, match="series identity has 3 SOP Instance UIDs; the volume 2 slices"):
        write_ct_series(volume, tmp_path / "out", identity=dicom_io.new_series_identity(None, 3))
    assert not (tmp_path / "out").exists()


def test_allocated_uids_are_the_written_ones(tmp_path):
    """UIDs allocated with new_series_identity (so a REG can reference the images first) are those written."""
    volume = Volume(np.zeros((3, 4, 4), np.float32), Grid((3, 4, 4), (1.0, 1.0, 2.0)))
    identity = dicom_io.new_series_identity(None, 3)
    written = write_ct_series(volume, tmp_path / "out", identity=identity)
    back = read_ct_series(tmp_path / "out").identity
    assert back.sop_instance_uids == written.sop_instance_uids == identity.sop_instance_uids
    assert back.series_instance_uid == identity.series_instance_uid


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
@pytest.mark.parametrize("orientation", [None, "FFS", "HFDR"])
def test_written_ct_slice_passes_dciodvfy(tmp_path, orientation):
    """A written CT slice (head-first, feet-first, decubitus) has no errors under dicom3tools' IOD verifier."""
    volume = Volume(np.zeros((2, 4, 5), np.float32), Grid((2, 4, 5), (1.0, 1.0, 2.0)))
    write_ct_series(volume, tmp_path / "out", orientation=orientation)
    result = subprocess.run(["dciodvfy", str(tmp_path / "out" / "CT00001.dcm")], capture_output=True, text=True)
    report = result.stdout + result.stderr
    assert "CTImage" in report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report


@pytest.fixture(scope="module")
def popi():
    """The real POPI planning CT (Philips, 141 x 512 x 512), read once."""
    return read_ct_series(shared_data_file("ct/popi-phase00"))


def test_popi_loads_with_correct_geometry(popi):
    """The POPI thorax: 141 slices of 512², 0.977 mm pixels, 2 mm slices, slice 0 the lowest (z -164.5)."""
    grid = popi.volume.grid
    assert grid.shape == (141, 512, 512)
    assert grid.spacing == (0.9765625, 0.9765625, 2.0)
    assert grid.origin == (-250.0, -164.0, -164.5)
    assert grid.direction == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    assert grid.frame_of_reference_uid == popi.identity.frame_of_reference_uid != ""
    assert len(popi.identity.sop_instance_uids) == 141
    assert float(pydicom.dcmread(popi.files[0], stop_before_pixels=True).ImagePositionPatient[2]) == -164.5
    air, body = popi.volume.array[70, 5, 5], popi.volume.array[70, 256, 256]
    assert air < -900 and -1100 < np.median(popi.volume.array) < 200 and body > air
    assert popi.volume.array.min() == -1024.0


def test_popi_round_trip_is_exact(popi, tmp_path):
    """Twelve real slices written as a derived series read back with the same grid and HU."""
    source = popi.volume.grid
    origin = tuple(source.index_to_lps(np.array([60, 0, 0])))
    grid = Grid((12, 512, 512), source.spacing, origin, source.direction, source.frame_of_reference_uid)
    crop = Volume(popi.volume.array[60:72].copy(), grid)
    write_ct_series(Volume(crop.array, grid), tmp_path / "out", reference=popi.identity)
    back = read_ct_series(tmp_path / "out")
    assert back.volume.grid == grid
    assert_array_equal(back.volume.array, crop.array)
