"""Readers of raw surrogate recordings: marker files, RPM .vxp, generic CSV, and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from breathcast.calibration.readers import CsvLayout, RecordingFormat, guess_format, read_csv, read_marker, read_recording, read_vxp
from breathcast.errors import BreathcastError
from tests.conftest import shared_data_file

# A small .vxp as Varian RPM writes it: [Header] key=value lines, then [Data] rows
# amplitude (cm), phase (rad), timestamp (ms), validflag, ttlin, mark ("Z" end-exhale, "P" end-inhale), ttlout.
VXP = """CRC=4E3F
[Header]
CRC=4E3F
Version=1.6
Data_layout=amplitude,phase,timestamp,validflag,ttlin,mark,ttlout
Patient_ID=ANON0001
Date=05-18-2012
Total_study_time=2.000
Samples_per_second=30
Scale_factor=10.0
[Data]
"""


def write_vxp(path: Path, n: int = 300, dropout: slice | None = None, beam_on_s: float = 3.0) -> Path:
    """A 10 s RPM recording at 30 Hz: 4 s breaths of 0.8 cm, beam on from ``beam_on_s``."""
    t_ms = np.round(np.arange(n) * 1000.0 / 30.0).astype(int)
    t = t_ms / 1000.0
    amplitude = 0.8 * np.sin(np.pi * t / 4.0) ** 4 - 0.2
    phase = (2 * np.pi * t / 4.0) % (2 * np.pi)
    rows = []
    for i in range(n):
        valid = 0 if dropout is not None and dropout.start <= i < dropout.stop else 1
        mark = "P" if i and (t[i] % 4.0) < 1 / 30 and i % 2 == 0 else ""
        rows.append(f"{amplitude[i]:.4f},{phase[i]:.4f},{t_ms[i]},{valid},0,{mark},{int(t[i] >= beam_on_s)}")
    path.write_text(VXP + "\n".join(rows) + "\n")
    return path


def test_read_marker_file_drops_padding_and_repairs_timestamps():
    """The shared marker file: decimal commas, mm, the trailing all-zero row dropped, off-cadence stamps repaired."""
    rec = read_marker(shared_data_file("traces/extmarker/201205111055-LAC-1-N-117-6.csv"))
    assert rec.is_3d and rec.units == "mm" and rec.format == "marker"
    assert len(rec) == 1172
    assert rec.header["timestamps_repaired_from_frame"] == 2  # frames 60 and 66 stamped "2" and "2,2" ms
    np.testing.assert_allclose(rec.values[0], [-461.9, 13.2, 74.0])
    assert np.all(np.diff(rec.time_s) > 0.05)  # nothing left off the 100 ms cadence by more than half a sample
    assert guess_format(shared_data_file("traces/extmarker/201205111055-LAC-1-N-117-6.csv")) is RecordingFormat.MARKER


def test_read_vxp(tmp_path):
    """RPM .vxp: header parsed, amplitude scaled, validflag, TTL out as X-ray-on, marks and phase kept."""
    rec = read_vxp(write_vxp(tmp_path / "session.vxp", dropout=slice(100, 110)))
    assert rec.header["rpm"]["Patient_ID"] == "ANON0001" and rec.header["rpm"]["Samples_per_second"] == "30"
    assert len(rec) == 300 and not rec.is_3d
    assert rec.valid.sum() == 290
    assert rec.columns["xray_on"][rec.time_s >= 3.0].all() and not rec.columns["xray_on"][rec.time_s < 2.99].any()
    np.testing.assert_allclose(rec.values.max(), 10.0 * (0.8 - 0.2), atol=0.05)  # cm x Scale_factor 10 = mm
    assert set(rec.columns) >= {"phase", "ttl_in", "ttl_out", "mark", "xray_on"}
    assert guess_format(tmp_path / "session.vxp") is RecordingFormat.VXP


def test_read_generic_csv_with_decimal_commas_and_mapping(tmp_path):
    """Column mapping, semicolons, decimal commas, ms, a validity and an X-ray-on column."""
    path = tmp_path / "belt.csv"
    path.write_text("t_ms;belt_V;ok;beam\n0;1,5;1;0\n40;1,75;1;0\n80;2,0;0;1\n120;x;1;1\n")
    layout = CsvLayout(time_column="t_ms", value_columns=("belt_V",), decimal=",", time_unit="ms",
                       valid_column="ok", xray_column="beam", units="V")  # fmt: skip
    rec = read_csv(path, layout)
    np.testing.assert_allclose(rec.time_s, [0.0, 0.04, 0.08, 0.12])
    assert rec.values[:3].tolist() == [1.5, 1.75, 2.0]
    assert rec.valid.tolist() == [True, True, False, False]  # flagged invalid; unreadable value
    assert rec.columns["xray_on"].tolist() == [False, False, True, True]
    assert rec.header["layout"]["separator"] == ";"


@pytest.mark.parametrize(
    "content, fmt, match",
    [
        ("", "marker", "is empty"),
        ("   \n\n", "csv", "is empty"),
        ('"Frame";"Timestamp";"x";"y";"z"\n', "marker", "no data rows"),
        ("time,amplitude\nabc,1\n", "csv", "line 2: time 'abc' is not a number"),
        ("time,volts\n0,1\n", "csv", "no column 'amplitude'"),
        ("[Header]\nVersion=1\n", "vxp", "no \\[Data\\] section"),
        ("[Header]\nVersion=1\n[Data]\n", "vxp", "has no rows"),
        ("[Header]\n[Data]\n0.1,0,abc,1,0,,0\n", "vxp", "timestamp 'abc' is not a number"),
    ],
)
def test_bad_recordings_give_one_line_errors(tmp_path, content, fmt, match):
    """Empty, header-only or unreadable recordings: a one-line error naming the file."""
    path = tmp_path / f"bad.{fmt}"
    path.write_text(content)
    with pytest.raises(BreathcastError, match=match) as info:
        read_recording(path, fmt)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_binary_recordings(tmp_path):
    """A missing file and a binary file are refused by name."""
    with pytest.raises(BreathcastError, match="recording not found"):
        read_recording(tmp_path / "nope.csv")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(BreathcastError, match="binary data"):
        read_recording(binary, "csv")
    with pytest.raises(BreathcastError, match="unknown recording format"):
        read_recording(binary, "xlsx")
