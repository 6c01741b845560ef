"""Surrogate calibration: cycles against hand counts, normalisation, spikes and dropouts, live == offline, files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from breathcast.calibration.readers import RawRecording, read_marker
from breathcast.calibration.report import format_summary, write_calibration
from breathcast.calibration.surrogate import (
    CalibrationSettings,
    LiveCalibrator,
    SurrogateCalibration,
    calibrate_surrogate,
)
from breathcast.cli import main
from breathcast.errors import BreathcastError
from tests.conftest import shared_data_file

# Hand counts of end-inhale peaks (breaths). Counted by eye on plots of each file's marker position projected
# on its principal axis (80 s per row, a tick every 5 s), one peak per breath; small bumps on the end-exhale
# plateau (< a third of a breath's height) are not breaths. A peak is counted when the signal is seen to rise
# to it and fall from it inside the recording.
#   201205101522-LAC (138 s): 12 peaks in 0-80 s (2, 8.5, 16, 22, 29, 35.5, 43, 50, 56.5, 61.5, 68, 73.5 s),
#       9 in 80-138 s (80.5, 87.5, 94.5, 102, 109, 115, 120.5, 128, 134.5 s): 21.
#   201205111055-LAC (117 s): 14 in 0-80 s (1, 6.5, 12.5, 18, 23.5, 29, 34, 40, 45, 51, 56, 62.5, 69, 77.5 s),
#       6 in 80-117 s (83, 93, 97, 105, 110, 115.5 s): 20.
#   201205101534-LAC (130 s): 13 in 0-80 s (4.8, 10.8, 17, 22, 27.5, 33.5, 40, 46.5, 52.5, 58.5, 64, 69.5, 75.5 s),
#       8 in 80-130 s (81.5, 87.5, 93, 99.5, 106, 112.5, 120, 127 s): 21.
HAND_COUNTS = {
    "201205101522-LAC-1-N-138-6.csv": 21,
    "201205111055-LAC-1-N-117-6.csv": 20,
    "201205101534-LAC-1-NO-130-6.csv": 21,
}
MARKERS = "traces/extmarker/"


@pytest.mark.parametrize("name, count", sorted(HAND_COUNTS.items()))
def test_cycles_match_hand_count(name, count):
    """Detected breaths on real marker recordings match the hand count within one."""
    result = calibrate_surrogate(read_marker(shared_data_file(MARKERS + name)))
    assert abs(result.cycles.count - count) <= 1, (result.cycles.count, count)


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
@pytest.mark.parametrize("drift", [False, True])
def test_normalisation_puts_exhale_at_0_and_inhale_at_1(name, drift):
    """After calibration each cycle's end-exhale is near 0 and end-inhale near 1 (real recordings)."""
    result = calibrate_surrogate(read_marker(shared_data_file(MARKERS + name)), CalibrationSettings(track_drift=drift))
    amp, t, c = result.amplitude, result.time_s, result.cycles
    troughs = np.interp(c.trough_times_s, t, amp)
    peaks = np.interp(c.peak_times_s, t, amp)
    assert abs(np.median(troughs)) < 0.1 and abs(np.median(peaks) - 1.0) < 0.15
    assert np.mean(np.abs(troughs) < 0.25) >= 0.8  # most single end-exhales, not only their median
    assert np.mean(np.abs(peaks - 1.0) < 0.35) >= 0.8
    summary = result.calibration.summary
    assert summary["cycles"] == c.count and 3.0 < summary["period_s"] < 9.0 and summary["amplitude_raw"] > 5.0


def test_real_spike_is_removed_and_reported():
    """The 2012-05-10 15:19 LAC recording has a two-sample spike at 86.5 s: removed, reported, cycles kept."""
    result = calibrate_surrogate(read_marker(shared_data_file(MARKERS + "201205101519-LAC-1-T-222-6.csv")))
    spikes = result.calibration.summary["spike_times_s"]
    assert any(abs(s - 86.55) < 0.2 for s in spikes)
    assert not np.isin(result.spike_times_s, result.time_s).any()


def test_injected_spike_and_dropout_are_handled_and_reported():
    """A real recording with a 20 mm spike and a 3 s dropout: same breaths (within 1), both reported."""
    path = shared_data_file(MARKERS + "201205101522-LAC-1-N-138-6.csv")
    clean = read_marker(path)
    values = clean.values.copy()
    values[400] += (0.0, 0.0, 20.0)  # one sample 20 mm off
    keep = (clean.time_s < 60.0) | (clean.time_s > 63.0)  # 3 s of samples lost
    broken = RawRecording(clean.time_s[keep], values[keep], clean.valid[keep], str(path), "marker", "mm")
    base = calibrate_surrogate(clean)
    result = calibrate_surrogate(broken)
    summary = result.calibration.summary
    assert summary["spikes"] >= 1 and any(abs(s - clean.time_s[400]) < 0.01 for s in summary["spike_times_s"])
    assert summary["dropouts"] == 1 and 2.9 < summary["dropout_total_s"] < 3.3
    assert abs(result.cycles.count - base.cycles.count) <= 1
    assert abs(result.calibration.exhale_level - base.calibration.exhale_level) < 0.3  # mm
    assert "spikes removed 1, dropouts 1" in format_summary(summary)


def synthetic(n_breaths: int = 15, period: float = 4.0, rate_hz: float = 25.0, flip: bool = False, drift_per_s: float = 0.0):
    """A scalar bellows-like recording: cos^4 breaths from 2 V (exhale) to 5 V (inhale), optionally inverted."""
    t = np.arange(0, n_breaths * period, 1 / rate_hz)
    v = 2.0 + 3.0 * np.sin(np.pi * t / period) ** 4 + drift_per_s * t
    v = -v if flip else v
    return RawRecording(t, v, np.ones(t.size, bool), "", "csv", "V")


@pytest.mark.parametrize("flip", [False, True])
def test_sign_is_inhale_positive(flip):
    """An inverted signal gets a negative axis: amplitude rises on inhale either way."""
    result = calibrate_surrogate(synthetic(flip=flip))
    assert result.calibration.axis == ((-1.0,) if flip else (1.0,))
    assert result.cycles.count == 15
    sign = -1.0 if flip else 1.0
    cal = result.calibration
    np.testing.assert_allclose([cal.apply(sign * 2.0), cal.apply(sign * 5.0)], [0.0, 1.0], atol=0.02)  # 2 V exhale, 5 V inhale
    assert result.amplitude.min() > -0.05 and result.amplitude.max() < 1.05


def test_drift_is_measured_and_tracked():
    """A 0.6 V/min baseline drift is reported and, tracked, leaves end-exhale near 0 at the end too."""
    rec = synthetic(n_breaths=30, drift_per_s=0.01)
    fixed = calibrate_surrogate(rec)
    tracked = calibrate_surrogate(rec, CalibrationSettings(track_drift=True, drift_window_s=20.0))
    assert abs(tracked.calibration.summary["drift_raw_per_min"] - 0.6) < 0.05
    late = tracked.time_s > 100
    # Untracked, the late end-exhales sit 0.2 above 0 (the levels are the session's medians); tracked, they follow.
    assert abs(np.nanmin(tracked.amplitude[late])) < 0.1 < np.nanmin(fixed.amplitude[late])


def test_apply_and_apply_array_agree_scalar_and_3d():
    """The per-sample function and its vectorised twin give the same numbers (the daemon's and offline)."""
    rng = np.random.default_rng(0)
    axis = rng.normal(size=3)
    cal3 = SurrogateCalibration("position3d", tuple(rng.normal(size=3)), tuple(axis / np.linalg.norm(axis)), -1.3, 4.2)
    raw3 = rng.normal(scale=10.0, size=(500, 3))
    np.testing.assert_array_equal(cal3.apply_array(raw3), [cal3.apply(x) for x in raw3])
    cal1 = SurrogateCalibration("scalar", (0.5,), (-1.0,), 0.2, 3.0)
    raw1 = rng.normal(size=500)
    np.testing.assert_array_equal(cal1.apply_array(raw1), [cal1.apply(float(x)) for x in raw1])
    with pytest.raises(BreathcastError, match="takes 3 value"):
        cal3.apply(1.0)


@pytest.mark.parametrize("drift", [False, True])
def test_offline_amplitude_is_the_live_function(drift):
    """The offline calibrated trace equals feeding the clean samples one by one to a fresh LiveCalibrator."""
    rec = read_marker(shared_data_file(MARKERS + "201205111055-LAC-1-N-117-6.csv"))
    result = calibrate_surrogate(rec, CalibrationSettings(track_drift=drift))
    raw = rec.values[np.isin(rec.time_s, result.time_s)]
    live = LiveCalibrator(result.calibration)
    one_by_one = np.array([live.update(t, x) for t, x in zip(result.time_s, raw)])
    np.testing.assert_allclose(one_by_one, result.amplitude, rtol=0, atol=1e-12)
    if not drift:
        np.testing.assert_allclose(result.amplitude, result.calibration.apply_array(raw), rtol=0, atol=1e-12)


def test_live_calibrator_rejects_spikes_and_invalid_samples():
    """Live: a jump no breath makes, an invalid flag and NaN give NaN; a lasting shift is accepted after 1 s."""
    cal = SurrogateCalibration("scalar", (0.0,), (1.0,), 0.0, 1.0, max_rate_per_s=3.0)
    live = LiveCalibrator(cal)
    out = [live.update(0.1 * i, v) for i, v in enumerate([0.1, 0.2, 5.0, 0.3])]
    assert np.isnan(out[2]) and out[3] == pytest.approx(0.3)
    assert np.isnan(live.update(0.4, 0.3, valid=False)) and np.isnan(live.update(0.5, float("nan")))
    shifted = [live.update(0.6 + 0.1 * i, 3.0) for i in range(15)]
    assert np.isnan(shifted[0]) and shifted[-1] == pytest.approx(3.0)


def test_calibration_file_round_trip(tmp_path):
    """save/load keep every number; a foreign JSON is refused."""
    result = calibrate_surrogate(synthetic())
    path = result.calibration.save(tmp_path / "calib.json")
    loaded = SurrogateCalibration.load(path)
    assert loaded == result.calibration
    assert json.loads(path.read_text())["format"] == "breathcast-surrogate-calibration"
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(BreathcastError, match="not a breathcast-surrogate-calibration file"):
        SurrogateCalibration.load(tmp_path / "other.json")


@pytest.mark.parametrize(
    "values, match",
    [
        (np.full(600, 3.0), "the signal is flat"),
        (np.random.default_rng(1).normal(size=600), "no breathing in this recording"),
        (np.full(5, 3.0), "valid sample"),
    ],
)
def test_no_breathing_is_a_clear_error(values, match):
    """A flat or noise-only recording: a one-line error saying there is no breathing."""
    t = np.arange(values.size) * 0.1
    with pytest.raises(BreathcastError, match=match):
        calibrate_surrogate(RawRecording(t, values, np.ones(t.size, bool), "flat.csv", "csv"))


def test_cli_calibrate_surrogate_writes_json_and_png(tmp_path, capsys):
    """`breathcast calibrate surrogate` on a marker file: calibration file, report PNG, printed summary."""
    path = shared_data_file(MARKERS + "201205101522-LAC-1-N-138-6.csv")
    out, png = tmp_path / "calib.json", tmp_path / "report.png"
    assert main(["calibrate", "surrogate", str(path), "--out", str(out), "--report", str(png), "--track-drift"]) == 0
    text = capsys.readouterr().out
    assert "cycles 21" in text and "period" in text and "drift" in text
    cal = SurrogateCalibration.load(out)
    assert cal.signal == "position3d" and cal.track_drift and cal.summary["cycles"] == 21
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_generic_csv_and_vxp(tmp_path, capsys):
    """CSV with a column mapping and decimal commas, and an RPM .vxp, through the CLI."""
    rec = synthetic(rate_hz=10.0)
    lines = ["zeit;signal"] + [f"{t:.1f};{v:.4f}".replace(".", ",") for t, v in zip(rec.time_s, rec.values)]
    (tmp_path / "belt.csv").write_text("\n".join(lines) + "\n")
    args = ["calibrate", "surrogate", str(tmp_path / "belt.csv"), "--out", str(tmp_path / "c.json"), "--format", "csv",
            "--time-column", "zeit", "--value-columns", "signal", "--decimal", ","]  # fmt: skip
    assert main(args) == 0 and "cycles 15" in capsys.readouterr().out
    from tests.test_calibration_readers import write_vxp

    vxp = write_vxp(tmp_path / "s.vxp", n=900, dropout=slice(400, 420))
    assert main(["calibrate", "surrogate", str(vxp), "--out", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "cycles 7" in out or "cycles 8" in out  # 30 s of 4 s breaths, the first at 2 s
    assert SurrogateCalibration.load(tmp_path / "v.json").summary["invalid_samples"] == 20


@pytest.mark.parametrize(
    "content, match",
    [("", "is empty"), ("time,amplitude\n" + "".join(f"{i / 10},1.0\n" for i in range(300)), "flat")],
)
def test_cli_bad_recording_exits_2_and_writes_nothing(tmp_path, capsys, content, match):
    """An empty or breathless recording: exit 2, one line on stderr, no calibration or report file."""
    path = tmp_path / "r.csv"
    path.write_text(content)
    out, png = tmp_path / "calib.json", tmp_path / "r.png"
    assert main(["calibrate", "surrogate", str(path), "--out", str(out), "--report", str(png), "--format", "csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("breathcast: error:") and match in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


def test_write_calibration_refuses_a_missing_folder(tmp_path):
    """Writing into a folder that does not exist fails before anything is written."""
    result = calibrate_surrogate(synthetic())
    with pytest.raises(BreathcastError, match="does not exist"):
        write_calibration(result, tmp_path / "nope" / "c.json", tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
    assert dataclasses.is_dataclass(result.calibration)
