"""breathcast ingest: DICOM series + raw recording -> a real dataset patient (calibration/ingest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from breathcast.calibration.ingest import IngestConfig, ScanSpec, ingest_patient, load_ingest_config
from breathcast.cli import main
from breathcast.io.dataset import open_dataset, read_patient
from breathcast.io.dicom_io import write_ct_series
from breathcast.errors import BreathcastError
from breathcast.geometry import Volume
from breathcast.sim.simulator import SimulationConfig, simulate_patient

CONFIG = SimulationConfig(grid_size=16, n_scans=3)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three simulated scans written as DICOM (one Frame of Reference), the trace as CSV, a manifest."""
    root = tmp_path_factory.mktemp("ingest")
    patient = simulate_patient(3, CONFIG)
    reference = None
    folders = []
    for k, scan in enumerate(patient.scans):
        folder = root / f"scan{k}"
        identity = write_ct_series(Volume(scan.image_hu, patient.grid), folder, reference=reference, series_number=k + 1)
        reference = reference or identity
        folders.append(folder)
    csv = root / "trace.csv"
    rows = [f"{float(t)!r},{float(a)!r}" for t, a in zip(patient.trace.time_s, patient.trace.amplitude)]
    csv.write_text("time,amplitude\n" + "\n".join(rows) + "\n")
    scans = [
        {"folder": f.name, "start_time_s": float(s.slice_times_s.min()), "direction": s.direction,
         "rotation_time_s": CONFIG.rotation_time_s, "pitch": CONFIG.pitch, "collimation_mm": CONFIG.collimation_mm}
        for f, s in zip(folders, patient.scans)
    ]  # fmt: skip
    manifest = {"patient_id": "p0", "recording": {"path": "trace.csv", "format": "csv"}, "scans": scans}
    (root / "ingest.json").write_text(json.dumps(manifest))
    return {"root": root, "patient": patient, "folders": folders, "manifest": manifest}


def _write_manifest(case: dict, name: str, **changes: object) -> Path:
    manifest = json.loads(json.dumps(case["manifest"]))
    manifest.update(changes)
    path = case["root"] / name
    path.write_text(json.dumps(manifest))
    return path


def test_ingest_matches_simulator(case: dict, tmp_path: Path) -> None:
    out = tmp_path / "data"
    assert main(["ingest", "--config", str(case["root"] / "ingest.json"), "--out", str(out)]) == 0
    index = open_dataset(out)
    assert index.kind == "real" and index.patients == ["p0"]
    record = read_patient(index, "p0")
    sim = case["patient"]
    assert record.reference is None and record.metadata["ingest"]["frame_of_reference_uid"]
    for got, want in zip(record.scans, sim.scans):
        assert got.field is None and got.labels is None
        np.testing.assert_allclose(got.slice_times_s, want.slice_times_s, atol=1e-3)
        # The calibration normalises with its own levels: equal up to an affine map.
        assert np.corrcoef(got.amplitude, want.amplitude)[0, 1] > 0.99
        np.testing.assert_allclose(got.image.array, want.image_hu, atol=0.51)  # int16 rounding
        sidecar = json.loads((record.path / f"{got.name}.json").read_text())
        assert sidecar["direction"] == want.direction
    got = np.concatenate([s.amplitude for s in record.scans])
    want = np.concatenate([s.amplitude for s in sim.scans])
    slope, intercept = np.polyfit(want, got, 1)
    np.testing.assert_allclose(slope * want + intercept, got, atol=0.02 * np.ptp(got))
    assert record.trace_time_s.size > 100


def test_ingest_resamples_to_model_grid(case: dict, tmp_path: Path) -> None:
    config = load_ingest_config(case["root"] / "ingest.json", tmp_path / "data")
    config = IngestConfig(**{**config.__dict__, "model_grid": (8, 8, 8)})
    folder = ingest_patient(config)
    record = read_patient(open_dataset(folder.parent), "p0")
    assert record.scans[0].image.shape == (8, 8, 8) and record.scans[0].amplitude.shape == (8,)


def _refused(config_path: Path, out: Path, capsys: pytest.CaptureFixture, expect: str) -> None:
    assert main(["ingest", "--config", str(config_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("breathcast: error:") and "\n" not in err and expect in err, err
    assert not (out / "p0").exists()
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".p0")]


def test_folder_without_dicom(case: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = case["root"] / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("no images here")
    scans = case["manifest"]["scans"][:1] + [{**case["manifest"]["scans"][1], "folder": "empty"}]
    _refused(_write_manifest(case, "nodicom.json", scans=scans), tmp_path / "data", capsys, "empty")


def test_different_frame_of_reference(case: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sim = case["patient"]
    other = case["root"] / "otherfor"
    if not other.exists():
        write_ct_series(Volume(sim.scans[1].image_hu, sim.grid), other)  # a new study and Frame of Reference
    scans = case["manifest"]["scans"][:1] + [{**case["manifest"]["scans"][1], "folder": "otherfor"}]
    _refused(_write_manifest(case, "for.json", scans=scans), tmp_path / "data", capsys, "Frame of Reference")


def test_scan_outside_trace(case: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scans = [dict(s) for s in case["manifest"]["scans"]]
    scans[2]["start_time_s"] = 1000.0
    _refused(_write_manifest(case, "late.json", scans=scans), tmp_path / "data", capsys, "outside the trace")


def test_scan_spec_needs_a_start() -> None:
    with pytest.raises(BreathcastError, match="start_time_s"):
        ScanSpec("x")
    with pytest.raises(BreathcastError, match="not both"):
        ScanSpec("x", start_time_s=1.0, use_xray_on=True)


def test_xray_on_placement(case: dict, tmp_path: Path) -> None:
    sim = case["patient"]
    starts = [float(s.slice_times_s.min()) for s in sim.scans]
    t = sim.trace.time_s
    on = np.zeros(t.size, int)
    for s in sim.scans:
        on[(t >= s.slice_times_s.min() - 1e-9) & (t <= s.slice_times_s.max())] = 1
    edges = [float(t[np.searchsorted(t, s - 1e-9)]) for s in starts]
    csv = case["root"] / "trace_xray.csv"
    rows = [f"{float(a)!r},{float(b)!r},{c}" for a, b, c in zip(t, sim.trace.amplitude, on)]
    csv.write_text("time,amplitude,beam\n" + "\n".join(rows) + "\n")
    scans = [{k: v for k, v in s.items() if k != "start_time_s"} | {"use_xray_on": True, "scan_start_s": st - e}
             for s, st, e in zip(case["manifest"]["scans"], starts, edges)]  # fmt: skip
    path = _write_manifest(case, "xray.json", scans=scans, recording={"path": "trace_xray.csv", "format": "csv", "xray_column": "beam"})
    folder = ingest_patient(load_ingest_config(path, tmp_path / "data"))
    record = read_patient(open_dataset(folder.parent), "p0")
    for got, want in zip(record.scans, sim.scans):
        np.testing.assert_allclose(got.slice_times_s, want.slice_times_s, atol=1e-3)
