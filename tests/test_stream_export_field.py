"""breathcast export-field: a predicted field as DICOM REG / NIfTI / MHA, and the warped CT as a DICOM series."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from stream_fixtures import D, tiny_package  # noqa: F401 - fixtures

from breathcast.cli import main
from breathcast.io.dicom_io import read_ct_series, write_ct_series
from breathcast.geometry import Grid, Volume
from breathcast.io.registration_export import read_exported_field
from breathcast.engine.predictor import PredictorConfig, load_predictor
from breathcast.stream.export_field import state_window, trace_window


@pytest.fixture(scope="module")
def dicom_plan(tmp_path_factory):
    grid = Grid.centered((D, D, D), (200.0, 200.0, 160.0))
    hu = np.random.default_rng(0).uniform(-1000, 400, size=grid.shape).round().astype(np.float32)
    folder = tmp_path_factory.mktemp("plan") / "ct"
    write_ct_series(Volume(hu, grid), folder)
    return folder


def test_dicom_registration_of_a_state_and_the_warped_ct(tiny_package, dicom_plan, tmp_path):  # noqa: F811
    out, warped = tmp_path / "reg.dcm", tmp_path / "warped"
    args = ["export-field", "--package", str(tiny_package.path), "--plan-source", "dicom", "--plan-path", str(dicom_plan),
            "--plan-amplitude", "0", "--amplitude", "0.9", "--rate", "0.2", "--out", str(out), "--warped-ct", str(warped)]  # fmt: skip
    assert main(args) == 0
    u, grid = read_exported_field(out)
    series = read_ct_series(dicom_plan)
    predictor = load_predictor(tiny_package, _plan_from(series), PredictorConfig(path="direct", mode="snapshot"))
    expected = predictor.predict(state_window(predictor, 0.9, 0.2)).displacement
    assert grid.shape == (D, D, D)
    np.testing.assert_allclose(u, expected, atol=1e-4)
    warped_series = read_ct_series(warped)
    assert warped_series.identity.frame_of_reference_uid == series.identity.frame_of_reference_uid
    assert warped_series.identity.series_instance_uid != series.identity.series_instance_uid
    assert warped_series.volume.shape == series.volume.shape
    reg = pydicom.dcmread(out)  # the REG lists the plan (source) and the warped CT (its registered images)
    assert [r.ReferencedSOPInstanceUID for r in reg.ReferencedImageSequence] == list(warped_series.identity.sop_instance_uids)
    source = reg.DeformableRegistrationSequence[0].ReferencedImageSequence
    assert [r.ReferencedSOPInstanceUID for r in source] == list(series.identity.sop_instance_uids)
    assert [item.SeriesInstanceUID for item in reg.ReferencedSeriesSequence] == [
        series.identity.series_instance_uid, warped_series.identity.series_instance_uid]  # fmt: skip
    for k in (0, D - 1):  # each warped slice names its plan slice and the REG that warped it
        ct = pydicom.dcmread(warped_series.files[k])
        assert ct.SourceImageSequence[0].ReferencedSOPInstanceUID == series.identity.sop_instance_uids[k]
        assert ct.SourceInstanceSequence[0].ReferencedSOPInstanceUID == reg.SOPInstanceUID
        referenced = {item.SeriesInstanceUID: item for item in ct.ReferencedSeriesSequence}
        assert set(referenced) == {series.identity.series_instance_uid, reg.SeriesInstanceUID}
        assert len(referenced[series.identity.series_instance_uid].ReferencedInstanceSequence) == D
    if shutil.which("dciodvfy"):
        import subprocess

        for path in (out, warped_series.files[0]):
            report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            assert not [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


def _plan_from(series):
    from breathcast.engine.predictor import Plan

    return Plan(series.volume, np.zeros(series.volume.shape[0]), frame_of_reference_uid=series.identity.frame_of_reference_uid)


def test_field_from_a_trace_window_on_another_grid(tiny_package, tmp_path):  # noqa: F811
    out = tmp_path / "u.mha"
    args = ["export-field", "--package", str(tiny_package.path), "--plan-source", "simulated", "--seed", "1",
            "--trace", "simulated:3", "--at", "20", "--field-shape", "8", "8", "8", "--out", str(out)]  # fmt: skip
    # The simulated default patient is 64³ and the tiny package 16³: the plan is resampled to the model grid.
    assert main(args) == 0
    u, grid = read_exported_field(out)
    assert u.shape == (3, 8, 8, 8) and np.isfinite(u).all() and np.abs(u).max() > 0


def test_existing_warped_ct_folder_is_refused_before_anything_is_written(tiny_package, dicom_plan, tmp_path, capsys):  # noqa: F811
    """A warped-CT folder that is taken stops the export before the REG (which would reference it) is written."""
    (tmp_path / "warped").mkdir()
    (tmp_path / "warped" / "x").write_text("")
    args = ["export-field", "--package", str(tiny_package.path), "--plan-source", "dicom", "--plan-path", str(dicom_plan),
            "--plan-amplitude", "0", "--amplitude", "0.9", "--out", str(tmp_path / "reg.dcm"), "--warped-ct", str(tmp_path / "warped")]  # fmt: skip
    assert main(args) == 2
    assert "warped: already exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warped"]


def test_bad_requests_end_with_one_line(tiny_package, tmp_path, capsys):  # noqa: F811
    base = ["export-field", "--package", str(tiny_package.path)]
    assert main([*base, "--out", str(tmp_path / "u.dcm"), "--amplitude", "1"]) == 2
    assert "must reference the planning CT" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "u.mha")]) == 2
    assert "give a breathing state" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "u.mha"), "--trace", "simulated:3", "--at", "0.5"]) == 2
    assert "needs" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_trace_window_resamples_onto_the_model_time_base(tiny_package):  # noqa: F811
    from breathcast.engine.predictor import Plan

    grid = Grid.centered((D, D, D), (100.0, 100.0, 100.0))
    predictor = load_predictor(tiny_package, Plan(Volume(np.zeros(grid.shape, np.float32), grid), np.zeros(D)))
    t = np.arange(0.0, 10.0, 0.1)
    window = trace_window(predictor, t, 2.0 * t, 9.0)
    assert window.shape == (predictor.trace.window_samples,)
    np.testing.assert_allclose(window[[0, -1]], [2.0 * (9.0 - predictor.trace.window_duration_s), 18.0])
