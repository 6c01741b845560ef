"""The 4DCT path: DICOM phase series in (with every refusal), states from the images, sliding-aware
registration, the 5D model served from the plan's box, the adapted network, and `plan-4dct` end to end.

A 5-phase cartoon 4DCT simulated at 48³ (the plan check needs lungs that a coarser grid blurs), read into a
32³ model box: small enough for 2 cores, real enough that segmentation and registration do their work.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from breathcast.calibration.four_dct import (
    fit_4dct_five_d,
    ingest_4dct,
    phase_states,
    read_4dct_into_box,
    register_phases,
)
from breathcast.cli import main
from breathcast.engine.export import export_linear5d, scan_trace_spec
from breathcast.engine.predictor import Plan, PredictorConfig, PredictorPath, load_predictor
from breathcast.errors import BreathcastError, PlanRejected
from breathcast.geometry import Volume
from breathcast.io.dataset import open_dataset, read_patient
from breathcast.io.dicom_io import read_ct_series, write_ct_series
from breathcast.io.four_dct import read_4dct, write_4dct
from breathcast.metrics import endpoint_error_mm
from breathcast.model_box import MODEL_BOX_MM, NO_TRACHEA_WARNING
from breathcast.sim.anatomy import LUNG_LABELS
from breathcast.sim.four_dct import FourDCTConfig, breathing_cycle, simulate_4dct
from breathcast.sim.simulator import SimulationConfig

BOX = 32
PHASES = 5


@pytest.fixture(scope="module")
def four_dct():
    return simulate_4dct(5, FourDCTConfig(n_phases=PHASES, simulation=SimulationConfig(grid_size=48)))


@pytest.fixture(scope="module")
def folder(four_dct, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("4dct") / "ct"
    write_4dct(four_dct.images_hu, four_dct.grid, four_dct.phase_percent, out, patient_id="sim5")
    return out


@pytest.fixture(scope="module")
def boxed(folder):
    return read_4dct_into_box(folder, grid_size=BOX)


@pytest.fixture(scope="module")
def registered(boxed):
    return register_phases(boxed.images_hu, boxed.grid, boxed.states.reference, boxed.segmentations)


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_breathing_cycle_is_lujan_with_branch_signs():
    a, r = breathing_cycle(np.linspace(0, 0.9, 10), period_s=4.0, peak=1.0, n=2.0)
    assert a[0] == pytest.approx(1.0) and a[5] == pytest.approx(0.0, abs=1e-12)
    assert np.all(r[1:5] < 0) and np.all(r[6:] > 0)  # exhale falls, inhale rises
    assert a[2] < 0.5 * (a[1] + a[3])  # cos^4 lingers near end-exhale: convex on the exhale branch


def test_written_4dct_reads_back_as_its_phases(folder, four_dct):
    phases = read_4dct(folder)
    assert [p.percent for p in phases] == list(four_dct.phase_percent)
    assert {p.percent_from for p in phases} == {"SeriesDescription"}
    assert len({p.series.identity.frame_of_reference_uid for p in phases}) == 1
    assert len({p.series.identity.series_instance_uid for p in phases}) == PHASES
    np.testing.assert_allclose(phases[2].series.volume.array, np.round(four_dct.images_hu[2]), atol=0.5)


def test_states_follow_the_true_cycle(boxed, four_dct):
    states = boxed.states
    assert four_dct.amplitude[states.reference] == pytest.approx(four_dct.amplitude.min())  # 40 % and 60 % tie here
    assert states.branch[int(np.argmax(four_dct.amplitude))] == "end-inhale"
    true = four_dct.amplitude / four_dct.amplitude.max()
    assert np.max(np.abs(states.amplitude - true)) < 0.15
    for k, branch in enumerate(states.branch):
        if branch in ("inhale", "exhale"):
            assert np.sign(states.rate[k]) == np.sign(four_dct.rate[k]), (k, branch)


def test_phase_states_refuse_a_4dct_without_breathing():
    with pytest.raises(BreathcastError, match="no breathing"):
        phase_states(np.array([0.0, 50.0, 75.0]), np.full(3, 3000.0), 4.0)


def _write_vxp(path: Path, period_s: float, duration_s: float = 60.0, rate_hz: float = 25.0) -> Path:
    """An RPM export of Lujan breathing (peak 1, n 2: lingering at end-exhale, which tells the calibration the
    inhale direction): amplitude in cm, phase in radians from end-inhale."""
    t = np.arange(0.0, duration_s, 1.0 / rate_hz)
    phase = (t / period_s) % 1.0
    amplitude, _ = breathing_cycle(phase, period_s, n=2.0)
    rows = [f"{0.3 + 1.2 * a:.5f},{2 * np.pi * p:.5f},{1e3 * s:.1f},1,0,,1" for a, p, s in zip(amplitude, phase, t)]
    header = "[Header]\nCRC=1\nVersion=1.6\nData_layout=amplitude,phase,timestamp,validflag,ttlin,mark,ttlout\nSamples_per_second=25\n[Data]\n"
    path.write_text(header + "\n".join(rows) + "\n")
    return path


def test_states_from_a_recording_with_phase_bins(tmp_path):
    from breathcast.calibration.four_dct import states_from_recording
    from breathcast.calibration.readers import read_recording

    percent = np.arange(10) * 10.0
    states = states_from_recording(read_recording(_write_vxp(tmp_path / "r.vxp", 4.0)), percent, np.ones(10))
    fine = np.linspace(-0.05, 0.05, 101)
    expected = np.array([breathing_cycle(p / 100.0 + fine, 4.0, n=2.0)[0].mean() for p in percent])  # the bin's mean
    np.testing.assert_allclose(states.amplitude, expected, atol=0.03)
    assert states.reference == 5 and states.branch[0] == "end-inhale" and states.period_s == pytest.approx(4.0, abs=0.05)
    true_rate = np.array([breathing_cycle(p / 100.0 + fine, 4.0, n=2.0)[1].mean() for p in percent])
    np.testing.assert_allclose(states.rate, true_rate, atol=0.05)  # 1/s on the recording's own clock
    assert "recording" in states.amplitude_source


def test_recording_without_phase_is_refused(tmp_path):
    from breathcast.calibration.four_dct import states_from_recording
    from breathcast.calibration.readers import RawRecording

    t = np.arange(0, 30, 0.1)
    recording = RawRecording(t, np.sin(2 * np.pi * t / 4), np.ones(t.size, bool), path="trace.csv")
    with pytest.raises(BreathcastError, match="trace.csv: the recording has no phase column"):
        states_from_recording(recording, np.arange(5) * 20.0, np.ones(5))


def test_ingest_takes_the_states_from_the_recording(folder, four_dct, tmp_path):
    vxp = _write_vxp(tmp_path / "rpm.vxp", four_dct.period_s)
    assert main(["ingest-4dct", str(folder), "--out", str(tmp_path / "dataset"), "--grid", str(BOX), "--recording", str(vxp)]) == 0
    record = read_patient(open_dataset(tmp_path / "dataset"), "patient", with_fields=False)
    states = record.metadata["ingest_4dct"]["states"]
    assert "rpm.vxp" in states["amplitude_source"]
    assert states["period_s"] == pytest.approx(four_dct.period_s, rel=0.02)
    amplitude = np.asarray(states["amplitude"])
    assert states["branch"][0] == "end-inhale" and amplitude[0] > 0.8
    assert amplitude[2] == pytest.approx(amplitude[3], abs=0.02) and amplitude[2] < 0.1  # 40 % and 60 %: both near end-exhale


def test_missing_phase_is_refused(folder, tmp_path):
    copy = _copy(folder, tmp_path)
    shutil.rmtree(copy / "phase_02")
    with pytest.raises(BreathcastError, match="not evenly spaced.*phase missing"):
        read_4dct(copy)


def test_mixed_frame_of_reference_is_refused(folder, four_dct, tmp_path):
    copy = _copy(folder, tmp_path)
    shutil.rmtree(copy / "phase_03")
    write_ct_series(Volume(four_dct.images_hu[3], four_dct.grid), copy / "phase_03", description="Gated, 60.0%")
    with pytest.raises(BreathcastError, match="phase_03.*Frame of Reference differs"):
        read_4dct(copy)


def test_inconsistent_geometry_is_refused(folder, four_dct, tmp_path):
    copy = _copy(folder, tmp_path)
    reference = read_ct_series(copy / "phase_00").identity
    shutil.rmtree(copy / "phase_01")
    shifted = dataclasses.replace(four_dct.grid, origin=tuple(np.asarray(four_dct.grid.origin) + [0.0, 0.0, 2.0]))
    write_ct_series(Volume(four_dct.images_hu[1], shifted), copy / "phase_01", reference=reference, description="Gated, 20.0%")
    with pytest.raises(BreathcastError, match="phase_01.*geometry differs.*origin"):
        read_4dct(copy)


def test_series_without_phase_is_refused_and_a_mapping_picks_the_phases(folder, four_dct, tmp_path):
    copy = _copy(folder, tmp_path)
    reference = read_ct_series(copy / "phase_00").identity
    write_ct_series(Volume(four_dct.images_hu.mean(axis=0), four_dct.grid), copy / "average", reference=reference, description="Ave-IP")
    with pytest.raises(BreathcastError, match="average.*no breathing phase"):
        read_4dct(copy)
    mapping = {f"phase_{k:02d}": (20.0 * k + 40.0) % 100.0 for k in range(PHASES)}  # folder name -> percent, not the description's
    phases = read_4dct(copy, mapping)
    assert [p.percent for p in phases] == [0.0, 20.0, 40.0, 60.0, 80.0] and {p.percent_from for p in phases} == {"given"}
    assert phases[0].series.identity.series_description == "Gated, 60.0%"  # phase_03, which the mapping calls 0 %


def test_duplicate_phase_is_refused(folder, four_dct, tmp_path):
    copy = _copy(folder, tmp_path)
    reference = read_ct_series(copy / "phase_00").identity
    write_ct_series(Volume(four_dct.images_hu[0], four_dct.grid), copy / "again", reference=reference, description="Gated, 0.0%")
    with pytest.raises(BreathcastError, match="phase 0.0% appears twice"):
        read_4dct(copy)


def test_feet_first_4dct_gives_the_same_box(four_dct, boxed, tmp_path):
    write_4dct(four_dct.images_hu, four_dct.grid, four_dct.phase_percent, tmp_path / "ffs", orientation="FFS")
    ffs = read_4dct_into_box(tmp_path / "ffs", grid_size=BOX)
    np.testing.assert_allclose(ffs.grid.origin, boxed.grid.origin, atol=1e-3)
    np.testing.assert_allclose(ffs.images_hu, boxed.images_hu, atol=1.0)
    np.testing.assert_allclose(ffs.states.amplitude, boxed.states.amplitude, atol=1e-9)


def test_ingest_writes_a_4dct_patient(folder, tmp_path):
    path, data = ingest_4dct(folder, tmp_path / "dataset", "sim5", grid_size=BOX)
    dataset = open_dataset(tmp_path / "dataset")
    assert dataset.kind == "4dct" and dataset.patients == ["sim5"]
    record = read_patient(dataset, "sim5", with_fields=False)
    assert len(record.scans) == PHASES and record.scans[0].labels is not None
    for scan, amplitude in zip(record.scans, data.states.amplitude):
        np.testing.assert_allclose(scan.amplitude, amplitude)
    sidecar = json.loads((path / "scan_01.json").read_text())
    assert sidecar["branch"] == data.states.branch[1] and sidecar["phase_percent"] == 20.0


def test_refused_ingest_writes_nothing(folder, tmp_path):
    copy = _copy(folder, tmp_path)
    shutil.rmtree(copy / "phase_04")
    assert main(["ingest-4dct", str(copy), "--out", str(tmp_path / "dataset"), "--grid", str(BOX)]) == 2
    assert not (tmp_path / "dataset").exists() or not any((tmp_path / "dataset").iterdir())


def _truth_in_box(four_dct, boxed, phase: int) -> tuple[np.ndarray, np.ndarray]:
    """The true field of a phase and its lungs, resampled into the box (same frame, the box is a sub-grid)."""
    from breathcast.canonical import field_onto, resample_onto

    truth = field_onto(four_dct.fields[phase], four_dct.grid, boxed.grid)
    lungs = resample_onto(Volume(np.isin(four_dct.labels[phase], LUNG_LABELS).astype(np.float32), four_dct.grid), boxed.grid, fill=0.0)
    return truth, lungs.array > 0.5


def test_registration_recovers_most_of_the_true_motion(four_dct, boxed, registered):
    fields, seconds = registered
    inhale = int(np.argmax(four_dct.amplitude))
    truth, lungs = _truth_in_box(four_dct, boxed, inhale)
    moved = endpoint_error_mm(truth, np.zeros_like(truth), boxed.grid, lungs)["mean"]
    error = endpoint_error_mm(fields[inhale], truth, boxed.grid, lungs)["mean"]
    assert moved > 3.0
    assert error < 0.4 * moved, (error, moved)
    assert not fields[boxed.states.reference].any() and len(seconds) == PHASES - 1


@pytest.fixture(scope="module")
def five_d_package(boxed, registered, tmp_path_factory):
    fields, seconds = registered
    model = fit_4dct_five_d(boxed, "sim5", fields, seconds)
    box = {"anchor": "lungs", "extent_mm": list(MODEL_BOX_MM)}
    out = tmp_path_factory.mktemp("linear5d") / "linear5d"
    return export_linear5d(model.coefficients, model.terms, boxed.grid, out, scan_trace_spec(BOX), {}, model_box=box)


def test_five_d_package_serves_the_end_exhale_plan_and_refuses_another(folder, boxed, registered, five_d_package):
    fields, _ = registered
    package = five_d_package
    ref = boxed.states.reference
    volume = read_ct_series(folder / f"phase_{ref:02d}").volume
    predictor = load_predictor(package, Plan(volume, np.zeros(volume.shape[0]), np.zeros((0, 3))), PredictorConfig(path=PredictorPath.LINEAR5D))
    assert predictor.grid.shape == (BOX,) * 3
    inhale = int(np.argmax(boxed.states.amplitude))
    u = predictor.state_displacement(np.full(BOX, 1.0, np.float32), np.zeros(BOX, np.float32))
    lungs = np.isin(boxed.segmentations[inhale].labels, LUNG_LABELS)
    assert endpoint_error_mm(u, fields[inhale], boxed.grid, lungs)["mean"] < 1.0
    other = read_ct_series(folder / f"phase_{inhale:02d}").volume
    with pytest.raises(PlanRejected, match="fitted in a box"):
        load_predictor(package, Plan(other, np.zeros(other.shape[0]), np.zeros((0, 3))), PredictorConfig(path=PredictorPath.LINEAR5D))


def test_daemon_serves_the_five_d_package(folder, boxed, five_d_package, tmp_path, capsys):
    from stream_fixtures import ALWAYS_INSIDE, daemon_clients, healthy, make_config, running_daemon, send_trace, wait_for

    ref = boxed.states.reference
    volume = read_ct_series(folder / f"phase_{ref:02d}").volume
    lungs = np.argwhere(np.isin(boxed.segmentations[ref].labels, LUNG_LABELS))
    target = boxed.grid.index_to_lps(lungs[len(lungs) // 2])  # a point in the lungs
    plan = Plan(volume, np.zeros(volume.shape[0]), target[None], frame_of_reference_uid=volume.grid.frame_of_reference_uid)
    config = make_config(tmp_path, path="linear5d", gating=ALWAYS_INSIDE)
    with running_daemon(config, plan, five_d_package) as daemon, daemon_clients(daemon) as (tx, rx, ctl):
        seq, t0 = healthy(tx, rx)
        status = ctl.status()
        # the simulated phases' trachea is too thin for their voxels: the plan's one warning says so
        assert status["state"] == "running" and status["plan"]["warnings"] == [NO_TRACHEA_WARNING]
        moved = []
        for level in (0.0, 1.0):  # hold end-exhale, then end-inhale, for a whole window each
            seq = send_trace(tx, seq, t0, 150, amplitude=level)
            t0 += 3.0
            message = wait_for(rx, lambda m: m.topic == "target" and m.header["sample_seq"] == seq - 1)
            assert message is not None
            moved.append(np.linalg.norm(message.header["target_displacement_mm"][0]))
        assert moved[0] < 0.5 < moved[1]  # the target stays at end-exhale and moves at end-inhale
        listened = threading.Thread(target=lambda: send_trace(tx, seq, t0, 150, amplitude=0.5, pace=True))
        listened.start()
        code = main(["listen", "--topics", "state", "--publish", daemon.config.endpoints.publish, "--count", "2", "--duration", "10"])
        listened.join()
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("state")]
    assert len(lines) == 2 and f"over {BOX} slices" in lines[0]  # a state-only client's view of the 5D package


def test_adaptation_lowers_the_image_loss(boxed):
    import torch

    from breathcast.engine.plan_4dct import phase_patient
    from breathcast.training.adapt import AdaptConfig, adapt_cvae
    from breathcast.training.cvae import CVAE, CVAEConfig

    torch.manual_seed(0)  # the untrained population's weights; unseeded, they depended on the tests run before
    population = CVAE(CVAEConfig(grid=BOX, channels=(4, 8, 8, 8), latent_dim=4))
    before = {k: v.clone() for k, v in population.state_dict().items()}
    result = adapt_cvae(population, phase_patient(boxed, "sim5"), AdaptConfig(steps=40, learning_rate=1e-3))
    assert result.steps == 40 and result.loss_last < result.loss_first
    assert all((before[k] == v).all() for k, v in population.state_dict().items())  # the population model is untouched


def test_plan_4dct_end_to_end(folder, tmp_path):
    from breathcast.training.cvae import CVAE, CVAEConfig, save_cvae

    population = tmp_path / "population.pt"
    save_cvae(CVAE(CVAEConfig(grid=BOX, channels=(4, 8, 8, 8), latent_dim=4)), population)
    out = tmp_path / "plan"
    code = main(["plan-4dct", str(folder), "--out", str(out), "--grid", str(BOX), "--population", str(population),
                 "--adapt-steps", "3", "--patient-id", "sim5"])  # fmt: skip
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"linear5d", "adapted", "report.json", "report.png"}
    report = json.loads((out / "report.json").read_text())
    assert len(report["phases"]) == PHASES and report["adaptation"]["steps"] == 3
    assert json.loads((out / "adapted" / "manifest.json").read_text())["model_box"]["anchor"] == "lungs"
    reference = report["states"]["reference_phase"]
    for package, path in (("linear5d", "linear5d"), ("adapted", "direct")):  # served as any package is
        field = tmp_path / f"{package}.nii.gz"
        assert main(["export-field", "--package", str(out / package), "--path", path, "--plan-source", "dicom",
                     "--plan-path", str(folder / f"phase_{reference:02d}"), "--plan-amplitude", "0", "--amplitude", "1",
                     "--out", str(field)]) == 0  # fmt: skip
        assert field.is_file()
    assert main(["plan-4dct", str(folder), "--out", str(out), "--grid", str(BOX), "--no-adapt"]) == 2  # not empty: refused


def test_remove_folds_unfolds_and_leaves_a_smooth_field_alone():
    from breathcast.calibration.four_dct import remove_folds
    from breathcast.metrics import folded_voxels

    smooth = np.zeros((3, 12, 12, 12), np.float32)
    smooth[0] = 0.3 * np.sin(np.linspace(0, np.pi, 12))[:, None, None]
    assert remove_folds(smooth) is smooth
    folded = smooth.copy()
    folded[0, 5, 4:8, 4:8] += 3.0  # a plane pushed past its neighbour: det(I + grad u) < 0 there
    folded[0, 6, 4:8, 4:8] -= 3.0
    assert folded_voxels(folded) > 0
    fixed = remove_folds(folded)
    assert folded_voxels(fixed) == 0
    np.testing.assert_array_equal(fixed[:, :2], folded[:, :2])  # far from the fold nothing changes
