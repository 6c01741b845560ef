"""The canonical frame end to end: the same anatomy stored in every patient orientation (DICOM, NIfTI) reaches the
model identically, and fields, targets and the warped CT go back to each plan's own layout, physically the same."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from stream_fixtures import tiny_package  # noqa: F401 - fixture

from breathcast.canonical import PATIENT_POSITIONS, canonical_frame, position_direction, reorient, to_canonical
from breathcast.cli import main
from breathcast.engine.predictor import Plan, PredictorConfig, load_predictor
from breathcast.errors import PlanRejected
from breathcast.geometry import Grid, Volume, field_from_lps_mm, field_to_lps_mm
from breathcast.io.dataset import read_volume, write_volume
from breathcast.io.dicom_io import read_ct_series, write_ct_series
from breathcast.io.registration_export import read_exported_field
from breathcast.stream.export_field import FieldRequest, export_predicted_field, state_window

POSITIONS = list(PATIENT_POSITIONS)
TARGET_LPS_MM = (14.0, -9.0, 20.0)


@pytest.fixture(scope="module")
def anatomy() -> Volume:
    """A canonical (identity direction) CT of 12 x 20 x 24 voxels, anisotropic, asymmetric along every axis."""
    grid = Grid((12, 20, 24), (8.0, 9.0, 12.0), origin=(-92.0, -85.5, -66.0), frame_of_reference_uid="1.2.826.0.1.3680043.8.498.77")
    hu = np.random.default_rng(3).uniform(-1000, 400, size=grid.shape).round().astype(np.float32)
    hu[:4, :8, :5] = 300.0  # a bright block in one corner
    return Volume(hu, grid)


PLAN_AMPLITUDE = np.linspace(0.05, 0.6, 12)  # per canonical slice, inferior to superior


def _plan_of(series) -> Plan:
    """The plan of a series read from disk: its per-slice trace laid out in the series' own slice order."""
    frame = canonical_frame(series.volume.grid)
    amplitude = PLAN_AMPLITUDE[::-1] if frame.flips[0] else PLAN_AMPLITUDE
    uid = series.identity.frame_of_reference_uid
    return Plan(series.volume, amplitude, np.array([TARGET_LPS_MM]), uid, "orientation test")


def _physical(u_voxels: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """A field as (3, Z, Y, X) mm LPS on the canonical grid of its points: comparable across layouts."""
    frame = canonical_frame(grid)
    return np.ascontiguousarray(frame.to_canonical_array(field_to_lps_mm(u_voxels, grid))), frame.canonical


@pytest.mark.parametrize("position", POSITIONS)
def test_dicom_series_in_each_position_reads_back_as_the_same_anatomy(anatomy, tmp_path, position):
    """Written for each PatientPosition, a series carries that position's IOP and reads back, canonical, unchanged."""
    write_ct_series(anatomy, tmp_path / "ct", orientation=position)
    first = pydicom.dcmread(tmp_path / "ct" / "CT00001.dcm")
    assert first.PatientPosition == position
    assert_allclose([float(v) for v in first.ImageOrientationPatient], np.ravel(PATIENT_POSITIONS[position]))
    series = read_ct_series(tmp_path / "ct")
    assert_allclose(series.volume.grid.direction_matrix, position_direction(position))
    canonical, _ = to_canonical(series.volume)
    assert_array_equal(canonical.array, anatomy.array)
    assert canonical.grid.shape == anatomy.grid.shape
    assert_allclose(canonical.grid.origin, anatomy.grid.origin, atol=1e-9)
    assert_allclose(canonical.grid.spacing, anatomy.grid.spacing, atol=1e-9)


@pytest.mark.parametrize(
    "direction",
    [
        ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),  # RAS+ NIfTI as most tools write it
        ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),  # LAS (radiological), left-handed
        ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # axes permuted
        ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),  # permuted and flipped
    ],
)
def test_nifti_with_any_axis_aligned_affine_reads_back_as_the_same_anatomy(anatomy, tmp_path, direction):
    """A NIfTI volume whose affine permutes or flips the axes reaches the canonical frame unchanged."""
    stored = reorient(anatomy, np.asarray(direction))
    assert_allclose(stored.grid.direction_matrix, direction)
    write_volume(Volume(stored.array.astype(np.int16), stored.grid), tmp_path / "ct.nii.gz")
    canonical, _ = to_canonical(read_volume(tmp_path / "ct.nii.gz", np.float32))
    assert_array_equal(canonical.array, anatomy.array)
    assert_allclose(canonical.grid.origin, anatomy.grid.origin, atol=1e-4)


def test_field_to_stored_keeps_every_displacement_at_its_point(anatomy):
    """A canonical field taken to a stored FFDR layout has, at each physical point, the same mm LPS displacement."""
    stored = reorient(anatomy, position_direction("FFDR"))
    frame = canonical_frame(stored.grid)
    u = np.random.default_rng(0).normal(0.0, 1.0, (3, *anatomy.shape)).astype(np.float32)
    u_stored, grid = frame.field_to_stored(u, anatomy.grid)
    assert grid == stored.grid
    point = np.array([3, 7, 11])  # a canonical voxel, and the stored voxel at the same place
    index = np.round(grid.lps_to_index(anatomy.grid.index_to_lps(point))).astype(int)
    assert_allclose(field_to_lps_mm(u_stored, grid)[:, index[0], index[1], index[2]],
                    field_to_lps_mm(u, anatomy.grid)[:, point[0], point[1], point[2]], atol=1e-5)  # fmt: skip


def test_field_onto_another_box_is_exact_inside_and_held_outside():
    """A field linear in position, on a box that covers part of a CT: exact where they overlap, the face value beyond."""
    from breathcast.canonical import field_onto

    box = Grid((10, 12, 14), (6.0, 5.0, 4.0), origin=(-30.0, -20.0, -10.0))
    ct = Grid((9, 16, 20), (5.0, 4.5, 7.0), origin=(-60.0, -40.0, -25.0))
    a, b = np.array([[0.02, 0.0, 0.01], [0.0, -0.03, 0.0], [0.01, 0.02, 0.05]]), np.array([1.0, -2.0, 3.0])

    def centres(grid: Grid) -> np.ndarray:
        return grid.index_to_lps(np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1))

    u_box = field_from_lps_mm(np.moveaxis(centres(box) @ a.T + b, -1, 0).astype(np.float32), box)  # u = A x + b mm
    u = field_to_lps_mm(field_onto(u_box, box, ct), ct)
    lps = centres(ct)
    low, high = box.index_to_lps(np.zeros(3)), box.index_to_lps(np.asarray(box.shape) - 1.0)
    inside = np.all((lps >= low) & (lps <= high), axis=-1)
    assert inside.any() and not inside.all()
    assert_allclose(u, np.moveaxis(np.clip(lps, low, high) @ a.T + b, -1, 0), atol=1e-4)  # x held at the box's faces


def test_oblique_plan_is_refused_in_one_line(tiny_package):  # noqa: F811
    """A plan whose axes are rotated (not along LPS) is rejected at load with the orientation named."""
    c, s = np.cos(0.3), np.sin(0.3)
    grid = Grid((16, 16, 16), (10.0, 10.0, 10.0), direction=((c, -s, 0.0), (s, c, 0.0), (0.0, 0.0, 1.0)))
    plan = Plan(Volume(np.zeros(grid.shape, np.float32), grid), np.zeros(16))
    with pytest.raises(PlanRejected, match=r"^plan rejected: oblique geometry \(ImageOrientationPatient 0\.955336\\0\.29552") as info:
        load_predictor(tiny_package, plan)
    assert "\n" not in str(info.value)


def test_sagittal_plan_is_refused(anatomy, tiny_package):  # noqa: F811
    """A plan stored in sagittal slices cannot place its per-slice trace along z: refused."""
    sagittal = reorient(anatomy, np.array([(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)]).T)
    with pytest.raises(PlanRejected, match="slices are not axial"):
        load_predictor(tiny_package, Plan(sagittal, np.zeros(sagittal.shape[0])))


@pytest.fixture(scope="module")
def exports(anatomy, tiny_package, tmp_path_factory):  # noqa: F811
    """For every position: the plan written as DICOM in it, then export-field's REG, MHA, warped CT and targets."""
    out = {}
    for position in POSITIONS:
        root = tmp_path_factory.mktemp(position)
        write_ct_series(anatomy, root / "ct", orientation=position)
        series = read_ct_series(root / "ct")
        predictor = load_predictor(tiny_package, _plan_of(series), PredictorConfig(path="direct", mode="snapshot"))
        window = state_window(predictor, 0.9, 0.3)
        export_predicted_field(predictor, window, FieldRequest(root / "reg.dcm", warped_ct=root / "warped"), series.identity)
        export_predicted_field(predictor, window, FieldRequest(root / "u.mha", shape=series.volume.shape), series.identity)
        out[position] = (root, series)
    return out


@pytest.mark.parametrize("position", POSITIONS[1:])
@pytest.mark.parametrize("name", ["reg.dcm", "u.mha"])
def test_same_anatomy_gives_the_same_physical_field_in_every_position(exports, position, name):
    """REG (model grid) and MHA (plan grid, --field-shape in the plan's order) agree with HFS within 0.1 mm."""
    reference, grid_reference = _physical(*read_exported_field(exports["HFS"][0] / name))
    field, grid = _physical(*read_exported_field(exports[position][0] / name))
    assert grid.shape == grid_reference.shape
    assert_allclose(grid.origin, grid_reference.origin, atol=1e-3)
    assert np.abs(reference).max() > 0.5  # a field that moves things
    assert np.abs(field - reference).max() <= 0.1


@pytest.mark.parametrize("position", POSITIONS)
def test_exports_are_in_the_plans_own_layout(exports, position):
    """The MHA field is on the plan's own grid; the REG's grid has its third axis +z; both read strictly."""
    root, series = exports[position]
    _, grid = read_exported_field(root / "u.mha")
    assert grid.shape == series.volume.shape
    assert_allclose(grid.direction_matrix, series.volume.grid.direction_matrix)
    with pydicom.config.strict_reading():
        reg = pydicom.dcmread(root / "reg.dcm")
        item = reg.DeformableRegistrationSequence[0].DeformableRegistrationGridSequence[0]
        iop = np.array([float(v) for v in item.ImageOrientationPatient])
    assert np.cross(iop[:3], iop[3:])[2] > 0.99


@pytest.mark.parametrize("position", POSITIONS[1:])
def test_same_target_motion_and_warped_ct_in_every_position(exports, position):
    """The predicted target and the warped CT (read back, canonical) are those of the HFS plan."""
    targets = {p: json.loads((exports[p][0] / "reg.target.json").read_text())["targets"][0] for p in ("HFS", position)}
    assert_allclose(targets[position]["predicted_lps_mm"], targets["HFS"]["predicted_lps_mm"], atol=0.1)
    assert np.linalg.norm(targets["HFS"]["displacement_lps_mm"]) > 0.1
    warped = {p: read_ct_series(exports[p][0] / "warped") for p in ("HFS", position)}
    assert_allclose(warped[position].volume.grid.direction_matrix, exports[position][1].volume.grid.direction_matrix)
    assert_array_equal(to_canonical(warped[position].volume)[0].array, to_canonical(warped["HFS"].volume)[0].array)


def test_export_field_cli_prints_and_writes_the_target(anatomy, tiny_package, tmp_path, capsys):  # noqa: F811
    """export-field on a feet-first DICOM plan with --target prints and writes the predicted target (mm LPS)."""
    write_ct_series(anatomy, tmp_path / "ct", orientation="FFS")
    np.save(tmp_path / "amplitude.npy", PLAN_AMPLITUDE[::-1])  # the FFS series' slices run superior to inferior
    args = ["export-field", "--package", str(tiny_package.path), "--plan-source", "dicom", "--plan-path", str(tmp_path / "ct"),
            "--plan-amplitude", str(tmp_path / "amplitude.npy"), "--target", *map(str, TARGET_LPS_MM),
            "--amplitude", "0.9", "--rate", "0.3", "--out", str(tmp_path / "u.nii.gz")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "u.target.json").read_text())
    assert data["units"] == "mm, patient LPS (x, y, z)" and data["field"] == "u.nii.gz"
    (target,) = data["targets"]
    assert_allclose(target["planned_lps_mm"], TARGET_LPS_MM)
    assert_allclose(np.subtract(target["predicted_lps_mm"], TARGET_LPS_MM), target["displacement_lps_mm"], atol=1e-9)
    assert "target 0: (" + ", ".join(f"{v:.2f}" for v in target["predicted_lps_mm"]) + ") mm LPS" in printed
    series = read_ct_series(tmp_path / "ct")
    predictor = load_predictor(tiny_package, _plan_of(series), PredictorConfig(path="direct", mode="snapshot"))
    expected = predictor.predict(state_window(predictor, 0.9, 0.3)).target_lps_mm[0]
    assert_allclose(target["predicted_lps_mm"], expected, atol=1e-6)


def test_nifti_plan_gets_its_field_in_its_own_layout(anatomy, exports, tiny_package, tmp_path):  # noqa: F811
    """A left-handed (LAS) NIfTI plan: the MHA field is on its own grid, and physically the HFS DICOM plan's."""
    from breathcast.stream.config import PlanSpec
    from breathcast.stream.plans import build_plan

    stored = reorient(anatomy, np.diag([1.0, -1.0, 1.0]))
    write_volume(Volume(stored.array.astype(np.int16), stored.grid), tmp_path / "ct.nii.gz")
    np.save(tmp_path / "amplitude.npy", PLAN_AMPLITUDE)  # slice axis not reversed in LAS
    spec = PlanSpec(source="nifti", path=str(tmp_path / "ct.nii.gz"), amplitude=str(tmp_path / "amplitude.npy"),
                    target_lps_mm=(TARGET_LPS_MM,))  # fmt: skip
    predictor = load_predictor(tiny_package, build_plan(spec), PredictorConfig(path="direct", mode="snapshot"))
    request = FieldRequest(tmp_path / "u.mha", shape=stored.shape)
    export_predicted_field(predictor, state_window(predictor, 0.9, 0.3), request)
    u, grid = read_exported_field(tmp_path / "u.mha")
    assert_allclose(grid.direction_matrix, stored.grid.direction_matrix)
    field, _ = _physical(u, grid)
    reference, _ = _physical(*read_exported_field(exports["HFS"][0] / "u.mha"))
    assert np.abs(field - reference).max() <= 0.1


@pytest.mark.parametrize("position", ["HFS", "FFP", "HFDL"])
def test_rtstruct_target_is_the_same_point_in_every_position(anatomy, tmp_path, position):
    """A plan's --rtstruct/--roi target (the ROI's centroid) is the same LPS point however the CT is stored."""
    from breathcast.io.rtstruct import write_rtstruct_contours
    from breathcast.stream.config import PlanSpec
    from breathcast.stream.plans import build_plan

    write_ct_series(anatomy, tmp_path / "ct", orientation=position)
    series = read_ct_series(tmp_path / "ct")
    grid = series.volume.grid
    square = [(-30.0, -20.0), (6.0, -20.0), (6.0, 16.0), (-30.0, 16.0)]  # x, y mm, between voxel centres
    slices = [grid.index_to_lps(np.array([k, 0.0, 0.0]))[2] for k in range(grid.shape[0])]
    polygons = [np.array([(x, y, z) for x, y in square]) for z in slices if -6.0 < z < 30.0]
    write_rtstruct_contours({"GTV": polygons}, grid, series.identity, tmp_path / "rs.dcm")
    plan = build_plan(PlanSpec(source="dicom", path=str(tmp_path / "ct"), amplitude=0.0, rtstruct=str(tmp_path / "rs.dcm"), roi="GTV"))
    # inside: voxel centres x -28..4 mm (5), y -13.5..13.5 mm (4), on the slices z = 6 and 18 mm
    expected = np.mean([(x, y) for x in np.arange(-92.0, 100.0, 8.0) for y in np.arange(-85.5, 95.0, 9.0)
                        if -30 <= x <= 6 and -20 <= y <= 16], axis=0)  # fmt: skip
    assert_allclose(plan.target_lps_mm[0], (*expected, 12.0), atol=1e-6)
