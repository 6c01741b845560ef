"""RT Structure Sets: reading, Frame of Reference checks, masks on the CT and model grids, mask -> RTSTRUCT -> mask."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from pydicom.data import get_testdata_file

from breathcast.io.dicom_io import CTSeries, read_ct_series, write_ct_series
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume
from breathcast.io.rtstruct import (
    mask_to_contours,
    polygon_cover,
    read_rtstruct,
    resample_mask,
    roi_mask,
    write_rtstruct,
    write_rtstruct_contours,
)
from breathcast.metrics import centroid_mm

PYDICOM_FRAME = "1.2.826.0.1.3680043.8.498.2010020400001.2"  # the Frame of Reference of pydicom's rtstruct.dcm


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture
def ct(tmp_path) -> CTSeries:
    """A 16 x 32 x 32 CT series on an anisotropic grid, written and read back (so it has real UIDs)."""
    grid = Grid((16, 32, 32), (1.5, 1.25, 2.5), origin=(-20.0, -30.0, 10.0))
    write_ct_series(Volume(np.full(grid.shape, -1000.0, np.float32), grid), tmp_path / "ct")
    return read_ct_series(tmp_path / "ct")


def ball(grid: Grid, centre_mm: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    return np.linalg.norm(grid.index_to_lps(zyx) - np.asarray(centre_mm), axis=-1) < radius_mm


def voxel_centre_polygon(grid: Grid, k: int, rows_columns: list[tuple[int, int]]) -> np.ndarray:
    """(N, 3) mm LPS polygon on slice k whose vertices are the centres of voxels (row j, column i)."""
    return grid.index_to_lps(np.array([(k, j, i) for j, i in rows_columns], dtype=float))


def test_voxel_centres_on_a_contour_belong_to_the_roi(ct, tmp_path):
    """Contours through voxel centres (as rt-utils/OpenCV draw them) give back every edge voxel, holes too."""
    grid = ct.volume.grid
    ell = [(4, 3), (4, 20), (10, 20), (10, 9), (25, 9), (25, 3)]  # a concave L, vertices at voxel centres
    outer, hole = [(2, 2), (2, 28), (20, 28), (20, 2)], [(6, 6), (6, 24), (16, 24), (16, 6)]
    contours = {"L": [voxel_centre_polygon(grid, 5, ell)],
                "frame": [voxel_centre_polygon(grid, 8, outer), voxel_centre_polygon(grid, 8, hole)]}  # fmt: skip
    write_rtstruct_contours(contours, grid, ct.identity, tmp_path / "rs.dcm")
    structures = read_rtstruct(tmp_path / "rs.dcm")
    expected = np.zeros(grid.shape, bool)
    expected[5, 4:11, 3:21] = True
    expected[5, 4:26, 3:10] = True
    assert_array_equal(roi_mask(structures, "L", grid), expected)
    expected = np.zeros(grid.shape, bool)
    expected[8, 2:21, 2:29] = True
    expected[8, 7:16, 7:24] = False  # the hole's inside; its outline stays in the ROI
    assert_array_equal(roi_mask(structures, "frame", grid), expected)


def test_polygon_cover_on_edges_vertices_and_outside():
    """Points on edges and vertices are on the contour, never 'inside'; the even-odd rule holds elsewhere."""
    square = np.array([[0.0, 0.0], [0.0, 4.0], [4.0, 4.0], [4.0, 0.0]])
    points = np.array([[2.0, 2.0], [0.0, 0.0], [4.0, 2.0], [2.0, 4.0], [5.0, 2.0], [-1.0, -1.0], [3.9, 0.2]])
    inside, edge = polygon_cover(square, points)
    assert inside.tolist() == [True, False, False, False, False, False, True]
    assert edge.tolist() == [False, True, True, True, False, False, False]


def _analytic_shape(kind: str, grid: Grid) -> tuple[list[np.ndarray], np.ndarray]:
    """Contours (fine polygons, mm LPS, one per slice) of a sphere or a concave five-pointed star solid, and the
    truth: voxels whose centre lies inside the analytic shape."""
    centre, radius = np.array([2.3, -8.1, 25.2]), 9.0

    def r_xy(theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        r0 = np.sqrt(np.clip(radius**2 - (z - centre[2]) ** 2, 0.0, None))
        return r0 * (1.0 + 0.35 * np.cos(5.0 * theta)) if kind == "star" else r0

    polygons = []
    theta = np.linspace(0.0, 2.0 * np.pi, 720, endpoint=False)
    for k in range(grid.shape[0]):
        z = float(grid.index_to_lps(np.array([k, 0.0, 0.0]))[2])
        r = r_xy(theta, np.full(theta.shape, z))
        if r.max() > 0.5:
            polygons.append(np.column_stack([centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta), np.full(theta.size, z)]))
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    p = grid.index_to_lps(zyx) - centre
    truth = np.hypot(p[..., 0], p[..., 1]) < r_xy(np.arctan2(p[..., 1], p[..., 0]), p[..., 2] + centre[2])
    return polygons, truth


@pytest.mark.parametrize("kind", ["sphere", "star"])
def test_analytic_shapes_rasterise_to_the_truth(ct, tmp_path, kind):
    """A sphere and a concave star drawn as fine polygons: Dice >= 0.97, centroid within 0.05 mm of the truth."""
    grid = ct.volume.grid
    polygons, truth = _analytic_shape(kind, grid)
    write_rtstruct_contours({kind: polygons}, grid, ct.identity, tmp_path / "rs.dcm")
    mask = roi_mask(read_rtstruct(tmp_path / "rs.dcm"), kind, grid)
    assert dice(mask, truth) >= 0.97
    assert np.linalg.norm(centroid_mm(mask, grid) - centroid_mm(truth, grid)) <= 0.05


def _plastimatch_mask(ct_folder, rtstruct, roi: str, out) -> np.ndarray:
    """plastimatch's own rasterisation of ``roi``: it reads the CT series and the structure set itself."""
    import SimpleITK as sitk

    for args in (["--input", str(ct_folder), "--output-img", str(out / "ct.mha")],
                 ["--input", str(rtstruct), "--fixed", str(out / "ct.mha"), "--output-prefix", str(out / "rois"),
                  "--prefix-format", "mha"]):  # fmt: skip
        result = subprocess.run(["plastimatch", "convert", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rois" / f"{roi}.mha"))).astype(bool)


@pytest.mark.skipif(shutil.which("plastimatch") is None, reason="plastimatch (Debian package plastimatch) not installed")
@pytest.mark.parametrize("kind", ["sphere", "star"])
def test_masks_agree_with_plastimatch(tmp_path, kind):
    """plastimatch, an independent reader and rasteriser, agrees: Dice >= 0.97, centroids within 0.05 mm."""
    grid = Grid((16, 40, 36), (1.25, 1.1, 2.0), origin=(-20.0, -30.0, 10.0))
    write_ct_series(Volume(np.full(grid.shape, -1000.0, np.float32), grid), tmp_path / "ct")
    series = read_ct_series(tmp_path / "ct")
    polygons, _ = _analytic_shape(kind, series.volume.grid)
    write_rtstruct_contours({kind: polygons}, series.volume.grid, series.identity, tmp_path / "rs.dcm")
    ours = roi_mask(read_rtstruct(tmp_path / "rs.dcm"), kind, series.volume.grid)
    theirs = _plastimatch_mask(tmp_path / "ct", tmp_path / "rs.dcm", kind, tmp_path)
    assert theirs.shape == ours.shape
    assert dice(ours, theirs) >= 0.97
    assert np.linalg.norm(centroid_mm(ours, series.volume.grid) - centroid_mm(theirs, series.volume.grid)) <= 0.05


def test_sphere_round_trip_dice(ct, tmp_path):
    """mask -> RTSTRUCT -> mask: a sphere comes back with Dice > 0.95 (here: identical)."""
    grid = ct.volume.grid
    sphere = ball(grid, (3.3, -11.0, 29.0), 11.0)
    write_rtstruct({"GTV": sphere}, grid, ct.identity, tmp_path / "rs.dcm")
    back = roi_mask(read_rtstruct(tmp_path / "rs.dcm"), "GTV", grid)
    assert dice(sphere, back) > 0.95
    assert_array_equal(back, sphere)


def test_hole_and_several_rois(ct, tmp_path):
    """A shell (a contour inside another on the same slice is a hole) and a second ROI both come back exactly."""
    grid = ct.volume.grid
    shell = ball(grid, (0.0, -10.0, 30.0), 14.0) & ~ball(grid, (0.0, -10.0, 30.0), 7.0)
    box = np.zeros(grid.shape, bool)
    box[2:5, 1:4, 20:31] = True
    write_rtstruct({"shell": shell, "box": box}, grid, ct.identity, tmp_path / "rs.dcm")
    structures = read_rtstruct(tmp_path / "rs.dcm")
    assert structures.roi_names == ["shell", "box"]
    assert structures.frame_of_reference_uid == grid.frame_of_reference_uid
    assert structures.referenced_series_uids == (ct.identity.series_instance_uid,)
    assert_array_equal(roi_mask(structures, "shell", grid), shell)
    assert_array_equal(roi_mask(structures, "BOX", grid), box)  # names match case-insensitively


def test_contours_are_planar_mm_on_their_slices(ct):
    """Contour points lie on the plane of their slice, in mm, around the voxel centres they enclose."""
    grid = ct.volume.grid
    mask = np.zeros(grid.shape, bool)
    mask[3, 10, 10] = True
    (contour,) = mask_to_contours(mask, grid)
    assert_allclose(contour[:, 2], grid.index_to_lps(np.array([3, 10, 10]))[2])
    centre = grid.index_to_lps(np.array([3, 10, 10]))
    assert_allclose(np.abs(contour[:, :2] - centre[:2]).max(axis=0), (0.75, 0.625))  # half a voxel (x, y)


def test_mask_on_model_grid_keeps_volume_and_centroid(ct, tmp_path):
    """A ROI resampled to a coarser model grid keeps its volume within 15 % and its centroid within 1 mm."""
    grid = ct.volume.grid
    sphere = ball(grid, (3.3, -11.0, 29.0), 9.0)
    write_rtstruct({"GTV": sphere}, grid, ct.identity, tmp_path / "rs.dcm")
    mask = Volume(roi_mask(read_rtstruct(tmp_path / "rs.dcm"), "GTV", grid), grid)
    coarse = resample_mask(mask, (8, 16, 16))
    assert coarse.array.dtype == bool and coarse.grid.shape == (8, 16, 16)

    def volume_mm3(v: Volume) -> float:
        return float(v.array.sum() * np.prod(v.grid.spacing))

    def centroid_mm(v: Volume) -> np.ndarray:
        return v.grid.index_to_lps(np.argwhere(v.array).mean(axis=0))

    assert volume_mm3(coarse) == pytest.approx(volume_mm3(mask), rel=0.15)
    assert np.linalg.norm(centroid_mm(coarse) - centroid_mm(mask)) < 1.0


def test_other_frame_of_reference_is_refused(ct, tmp_path):
    """A structure set drawn on another scan (another Frame of Reference) is refused, naming the file."""
    grid = ct.volume.grid
    write_rtstruct({"GTV": ball(grid, (0.0, -10.0, 30.0), 8.0)}, grid, ct.identity, tmp_path / "rs.dcm")
    other = Grid(grid.shape, grid.spacing, grid.origin, grid.direction, frame_of_reference_uid="1.2.3.999")
    with pytest.raises(BreathcastError, match=r"rs\.dcm: structure set is in Frame of Reference .* another scan"):
        roi_mask(read_rtstruct(tmp_path / "rs.dcm"), "GTV", other)


def test_unknown_roi_lists_the_names(ct, tmp_path):
    """Asking for a ROI that is not there says which ones are."""
    grid = ct.volume.grid
    write_rtstruct({"GTV": ball(grid, (0.0, -10.0, 30.0), 8.0)}, grid, ct.identity, tmp_path / "rs.dcm")
    with pytest.raises(BreathcastError, match=r"rs\.dcm: no ROI named 'CTV'; it has \['GTV'\]"):
        roi_mask(read_rtstruct(tmp_path / "rs.dcm"), "CTV", grid)


def test_contours_off_the_slices_are_refused(ct, tmp_path):
    """Rasterising on a grid whose slices are not the ones the contours were drawn on is refused."""
    grid = ct.volume.grid
    write_rtstruct({"GTV": ball(grid, (0.0, -10.0, 30.0), 8.0)}, grid, ct.identity, tmp_path / "rs.dcm")
    shifted = Grid(
        grid.shape,
        grid.spacing,
        (grid.origin[0], grid.origin[1], grid.origin[2] + 1.0),
        grid.direction,
        grid.frame_of_reference_uid,
    )
    with pytest.raises(BreathcastError, match="is not on a slice of the CT grid"):
        roi_mask(read_rtstruct(tmp_path / "rs.dcm"), "GTV", shifted)


def test_pydicom_rtstruct_reads_and_rasterises(tmp_path):
    """pydicom's rtstruct.dcm (no preamble): three ROIs; its rectangles fill a grid in its own frame."""
    structures = read_rtstruct(get_testdata_file("rtstruct.dcm"))
    assert structures.roi_names == ["patient", "Isocenter 1", "Isocenter 2"]
    assert structures.frame_of_reference_uid == PYDICOM_FRAME
    grid = Grid((3, 32, 42), (10.0, 10.0, 10.0), origin=(-205.0, -155.0, -200.0), frame_of_reference_uid=PYDICOM_FRAME)
    mask = roi_mask(structures, "patient", grid)
    assert mask.sum(axis=(1, 2)).tolist() == [1200, 1200, 1200]  # x in (-200, 200), y in (-150, 150)
    with pytest.raises(BreathcastError, match="ROI 'Isocenter 1' has no CLOSED_PLANAR contours \\(POINT\\)"):
        roi_mask(structures, "Isocenter 1", grid)


def test_pydicom_rtstruct_against_pydicom_ct_is_refused(tmp_path):
    """pydicom's rtstruct.dcm and CT_small.dcm are different scans: refused for the other frame of reference."""
    ct_small = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    grid = Grid((1, 128, 128), (0.661468, 0.661468, 5.0), frame_of_reference_uid=str(ct_small.FrameOfReferenceUID))
    with pytest.raises(BreathcastError, match=r"rtstruct\.dcm: structure set is in Frame of Reference"):
        roi_mask(read_rtstruct(get_testdata_file("rtstruct.dcm")), "patient", grid)


def test_non_rtstruct_is_refused():
    """A CT file given as a structure set is refused with its modality."""
    with pytest.raises(BreathcastError, match=r"CT_small\.dcm: modality is CT; expected an RT Structure Set"):
        read_rtstruct(get_testdata_file("CT_small.dcm"))


def test_writer_is_atomic(ct, tmp_path):
    """A failing write (the target is a folder) leaves no temporary file behind."""
    grid = ct.volume.grid
    (tmp_path / "out.dcm").mkdir()
    with pytest.raises(BreathcastError, match="out.dcm: is a folder"):
        write_rtstruct({"GTV": ball(grid, (0.0, -10.0, 30.0), 8.0)}, grid, ct.identity, tmp_path / "out.dcm")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_written_rtstruct_passes_dciodvfy(ct, tmp_path):
    """A written structure set has no errors under dicom3tools' IOD verifier."""
    grid = ct.volume.grid
    path = write_rtstruct({"GTV": ball(grid, (0.0, -10.0, 30.0), 8.0)}, grid, ct.identity, tmp_path / "rs.dcm")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    report = result.stdout + result.stderr
    assert "RTStructureSet" in report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
