"""Readers for raw breathing-surrogate recordings: generic CSV, the shared optical-marker files, Varian RPM .vxp.

Every reader returns a :class:`RawRecording`: sample times (s, from the recording's own clock), the raw
signal ((N,) for a scalar surrogate such as a bellows voltage or the RPM amplitude, (N, 3) for a marker
position in mm), a per-sample validity flag, and the extra columns a format carries (RPM phase, TTL in/out,
marks; a generic CSV's X-ray-on column). Readers do not clean the signal beyond what the format itself says
is not a sample (trailing all-zero rows of the marker files, rows the RPM marks invalid are kept but flagged);
spikes and dropouts are the calibration's job (:mod:`breathcast.calibration.surrogate`).

Errors are one-line :class:`~breathcast.errors.BreathcastError` messages that name the file (and the line).

Formats:

* **marker** (``../shared/data/traces/extmarker``): ``"Frame";"Timestamp";"x";"y";"z"``, semicolons,
  decimal commas, timestamp in ms, positions in mm, 10 Hz; trailing all-zero rows; a few timestamps off the
  100 ms cadence; frames may be skipped.
* **vxp** (Varian RPM "Real-time Position Management" exports): a ``[Header]`` block of ``key=value`` lines
  (``CRC``, ``Version``, ``Data_layout``, ``Patient_ID``, ``Date``, ``Total_study_time``,
  ``Samples_per_second``, ``Scale_factor``), then ``[Data]`` rows
  ``amplitude,phase,timestamp,validflag,ttlin,mark,ttlout``: amplitude in cm (times ``Scale_factor`` when it
  is given), phase in radians (0..2π), timestamp in ms, validflag 1 = valid (0 or negative: tracking lost),
  ttlin/ttlout 0/1 (ttlout is the beam/X-ray gate), mark a phase mark ("Z" at end-exhale, "P" at
  end-inhale, empty otherwise). The header's ``Data_layout`` names the columns when it is present.
* **csv**: any delimited text with a header row, described by a :class:`CsvLayout` (column names, separator,
  decimal comma, time unit).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from breathcast.errors import BreathcastError

__all__ = [
    "RecordingFormat",
    "RawRecording",
    "CsvLayout",
    "read_csv",
    "read_marker",
    "read_vxp",
    "read_recording",
    "guess_format",
]

_MAX_BYTES = 256 * 2**20  # a surrogate recording of days at 100 Hz is far below this


class RecordingFormat(str, Enum):
    """The recording formats the readers know."""

    CSV = "csv"
    MARKER = "marker"
    VXP = "vxp"


@dataclass(frozen=True, eq=False)
class RawRecording:
    """A raw surrogate recording as read from a file.

    Args:
        time_s: (N,) float64 sample times, s, strictly increasing (the reader sorts and drops repeats).
        values: (N,) raw scalar signal (any unit) or (N, 3) marker position (mm).
        valid: (N,) bool; False where the format says the sample is not a measurement.
        path: the file it came from ("" when made in memory).
        format: the :class:`RecordingFormat` value it was read as.
        units: unit of ``values`` ("mm", "cm", "V", "arbitrary", ...).
        columns: extra per-sample columns, each (N,) (e.g. "phase", "ttl_in", "ttl_out", "mark", "xray_on").
        header: format metadata (the RPM header, the CSV layout, rows dropped and why).
    """

    time_s: np.ndarray
    values: np.ndarray
    valid: np.ndarray
    path: str = ""
    format: str = RecordingFormat.CSV.value
    units: str = "arbitrary"
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.path or "recording"
        t = np.asarray(self.time_s, dtype=np.float64)
        v = np.asarray(self.values, dtype=np.float64)
        ok = np.asarray(self.valid, dtype=bool)
        if t.ndim != 1 or t.size == 0:
            raise BreathcastError(f"{where}: no samples")
        if v.shape not in ((t.size,), (t.size, 3)):
            raise BreathcastError(f"{where}: values must be (N,) or (N, 3) with N = {t.size}, got {v.shape}")
        if ok.shape != t.shape:
            raise BreathcastError(f"{where}: valid must be (N,), got {ok.shape}")
        if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
            raise BreathcastError(f"{where}: sample times must be finite and strictly increasing")
        for name, column in self.columns.items():
            if np.asarray(column).shape != t.shape:
                raise BreathcastError(f"{where}: column {name!r} has shape {np.asarray(column).shape}; expected ({t.size},)")
        object.__setattr__(self, "time_s", t)
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "valid", ok & np.all(np.isfinite(v.reshape(t.size, -1)), axis=1))
        object.__setattr__(self, "format", RecordingFormat(self.format).value)

    def __len__(self) -> int:
        return int(self.time_s.size)

    @property
    def is_3d(self) -> bool:
        """True for a marker position (N, 3)."""
        return self.values.ndim == 2

    @property
    def duration_s(self) -> float:
        return float(self.time_s[-1] - self.time_s[0])

    @property
    def sample_interval_s(self) -> float:
        """Median interval between samples, s (0 for a single sample)."""
        return float(np.median(np.diff(self.time_s))) if self.time_s.size > 1 else 0.0


@dataclass(frozen=True)
class CsvLayout:
    """How to read a delimited text recording.

    Args:
        time_column: header name of the time column.
        value_columns: one name (a scalar surrogate) or three (x, y, z marker position).
        separator: field separator; None to sniff it from the header (";", ",", tab).
        decimal: "." or "," (decimal commas, as European exports write).
        time_unit: "s" or "ms".
        valid_column: name of a 0/1 validity column, or None.
        xray_column: name of a 0/1 X-ray-on (beam/TTL) column, or None.
        units: unit of the values, recorded with the recording.
        skip_all_zero_rows: drop rows whose time and values are all 0 (trailing padding).
        extra_columns: more numeric columns to keep, by header name (returned in ``columns``).

    Example:
        >>> CsvLayout(time_column="t", value_columns=("v",), time_unit="s").value_columns
        ('v',)
    """

    time_column: str = "time"
    value_columns: tuple[str, ...] = ("amplitude",)
    separator: str | None = None
    decimal: str = "."
    time_unit: str = "s"
    valid_column: str | None = None
    xray_column: str | None = None
    units: str = "arbitrary"
    skip_all_zero_rows: bool = True
    extra_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "value_columns", tuple(self.value_columns))
        object.__setattr__(self, "extra_columns", tuple(self.extra_columns))
        if len(self.value_columns) not in (1, 3):
            raise BreathcastError(f"value_columns must name 1 (scalar) or 3 (x, y, z) columns, got {self.value_columns}")
        if self.decimal not in (".", ","):
            raise BreathcastError(f"decimal must be '.' or ',', got {self.decimal!r}")
        if self.time_unit not in ("s", "ms"):
            raise BreathcastError(f"time_unit must be 's' or 'ms', got {self.time_unit!r}")
        if self.separator is not None and len(self.separator) != 1:
            raise BreathcastError(f"separator must be one character, got {self.separator!r}")


MARKER_LAYOUT = CsvLayout(time_column="Timestamp", value_columns=("x", "y", "z"), separator=";", decimal=",",
                          time_unit="ms", units="mm", extra_columns=("Frame",))  # fmt: skip
"""The layout of the shared optical-marker recordings."""


def _read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise BreathcastError(f"{path}: recording not found")
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise BreathcastError(f"{path}: {path.stat().st_size} bytes is too large for a breathing recording")
        data = path.read_bytes()
    except OSError as exc:
        raise BreathcastError(f"{path}: cannot read the recording ({exc.strerror or exc})") from None
    if b"\x00" in data[:4096]:
        raise BreathcastError(f"{path}: binary data, not a text recording")
    text = data.decode("utf-8-sig", errors="replace")
    if not text.strip():
        raise BreathcastError(f"{path}: the recording is empty")
    return text


def _number(text: str, decimal: str) -> float:
    text = text.strip().strip('"')
    if decimal == ",":
        text = text.replace(",", ".")
    return float(text) if text else float("nan")


def _finish(path: Path, t: np.ndarray, values: np.ndarray, valid: np.ndarray, columns: dict[str, np.ndarray],
            header: dict[str, Any], fmt: RecordingFormat, units: str) -> RawRecording:  # fmt: skip
    """Sort by time, drop repeated timestamps (keeping the first), build the recording."""
    if t.size == 0:
        raise BreathcastError(f"{path}: no data rows")
    order = np.argsort(t, kind="stable")
    t = t[order]
    keep = np.concatenate([[True], np.diff(t) > 0])
    dropped = int((~keep).sum())
    if dropped:
        header = {**header, "repeated_timestamps_dropped": dropped}
    idx = order[keep]
    return RawRecording(t[keep], values[idx], valid[idx], str(path), fmt.value, units,
                        {k: np.asarray(c)[idx] for k, c in columns.items()}, header)  # fmt: skip


def read_csv(path: Path, layout: CsvLayout = CsvLayout(), fmt: RecordingFormat = RecordingFormat.CSV) -> RawRecording:
    """Read a delimited text recording described by ``layout``.

    Rows that are all zero are dropped (padding), as are rows whose time cannot be read; a value that cannot
    be read makes its sample invalid. Non-increasing timestamps are sorted and repeats dropped.

    Args:
        path: the file.
        layout: column names, separator, decimal mark, time unit.
        fmt: the format recorded in the result.

    Returns:
        The :class:`RawRecording`.
    """
    path = Path(path)
    text = _read_text(path)
    lines = text.splitlines()
    header_line = lines[0]
    separator = layout.separator
    if separator is None:
        counts = {s: header_line.count(s) for s in (";", "\t", ",")}
        separator = max(counts, key=counts.get)
        if counts[separator] == 0:
            raise BreathcastError(f"{path}: cannot tell the separator from the header line {header_line[:60]!r}; give it")
    rows = list(csv.reader(io.StringIO(text), delimiter=separator))
    names = [n.strip().strip('"').strip() for n in rows[0]]
    lookup = {n.lower(): i for i, n in enumerate(names)}

    def index(name: str | None) -> int | None:
        if name is None:
            return None
        if name.lower() not in lookup:
            raise BreathcastError(f"{path}: no column {name!r}; the header has {', '.join(names)}")
        return lookup[name.lower()]

    t_col = index(layout.time_column)
    v_cols = [index(n) for n in layout.value_columns]
    valid_col, xray_col = index(layout.valid_column), index(layout.xray_column)
    extra_cols = [index(n) for n in layout.extra_columns]
    needed = max(i for i in [t_col, *v_cols, valid_col, xray_col, *extra_cols] if i is not None)
    times, values, valid, xray, extra = [], [], [], [], []
    zero_rows = unreadable = 0
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= needed:
            raise BreathcastError(f"{path}, line {line_no}: {len(row)} fields; the layout needs column {needed + 1}")
        try:
            t = _number(row[t_col], layout.decimal)
        except ValueError:
            if line_no == 2 and not times:
                raise BreathcastError(f"{path}, line {line_no}: time {row[t_col]!r} is not a number") from None
            unreadable += 1
            continue
        try:
            v = [_number(row[i], layout.decimal) for i in v_cols]
        except ValueError:
            v = [float("nan")] * len(v_cols)
        if layout.skip_all_zero_rows and t == 0 and all(x == 0 for x in v) and times:
            zero_rows += 1
            continue
        ok = True
        if valid_col is not None:
            try:
                ok = _number(row[valid_col], layout.decimal) > 0
            except ValueError:
                ok = False
        if xray_col is not None:
            try:
                xray.append(_number(row[xray_col], layout.decimal) > 0)
            except ValueError:
                xray.append(False)
        row_extra = []
        for i in extra_cols:
            try:
                row_extra.append(_number(row[i], layout.decimal))
            except ValueError:
                row_extra.append(float("nan"))
        extra.append(row_extra)
        times.append(t)
        values.append(v)
        valid.append(ok)
    if not times:
        raise BreathcastError(f"{path}: no data rows under the header")
    t = np.asarray(times, dtype=np.float64) * (1e-3 if layout.time_unit == "ms" else 1.0)
    if not np.all(np.isfinite(t)):
        raise BreathcastError(f"{path}: time column holds values that are not numbers")
    v = np.asarray(values, dtype=np.float64)
    v = v[:, 0] if v.shape[1] == 1 else v
    columns = {"xray_on": np.asarray(xray, dtype=bool)} if xray_col is not None else {}
    extra_values = np.asarray(extra, dtype=np.float64).reshape(len(times), len(extra_cols))
    columns.update({name.lower(): extra_values[:, i] for i, name in enumerate(layout.extra_columns)})
    header = {"layout": {"time_column": layout.time_column, "value_columns": list(layout.value_columns),
                         "separator": separator, "decimal": layout.decimal, "time_unit": layout.time_unit},
              "all_zero_rows_dropped": zero_rows, "unreadable_rows_dropped": unreadable}  # fmt: skip
    return _finish(path, t, v, np.asarray(valid, dtype=bool), columns, header, fmt, layout.units)


def read_marker(path: Path) -> RawRecording:
    """Read one of the shared optical-marker recordings (``Frame;Timestamp;x;y;z``, decimal commas, ms, mm).

    Example:
        >>> import tempfile, os
        >>> text = '"Frame";"Timestamp";"x";"y";"z"\\n0;0;1,5;2;3\\n6;100;1,5;2;3,25\\n12;200;1,5;2;3,5\\n0;0;0;0;0\\n'
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = Path(d) / "m.csv"; _ = p.write_text(text)
        ...     rec = read_marker(p)
        >>> rec.time_s.tolist(), rec.values[:, 2].tolist(), rec.header["all_zero_rows_dropped"]
        ([0.0, 0.1, 0.2], [3.0, 3.25, 3.5], 1)
    """
    recording = read_csv(path, MARKER_LAYOUT, RecordingFormat.MARKER)
    # The Frame counter is the camera's clock (60 Hz here): a few rows carry a timestamp that is off the
    # 100 ms cadence by seconds (e.g. "2" or "25,6" for frame 768, i.e. 12.8 s). Such a timestamp is
    # replaced by the frame's time, and the count is reported.
    frame = recording.columns["frame"]
    t = recording.time_s
    usable = np.isfinite(frame) & (frame > 0)
    if usable.sum() < 2:
        return recording
    frame_s = float(np.median(t[usable] / frame[usable]))  # seconds per frame
    expected = frame * frame_s
    off = usable & (np.abs(t - expected) > _MARKER_TIME_TOLERANCE_S)
    if not off.any():
        return recording
    fixed_t = np.where(off, expected, t)
    header = {**recording.header, "timestamps_repaired_from_frame": int(off.sum()), "frame_rate_hz": 1.0 / frame_s}
    return _finish(Path(path), fixed_t, recording.values, recording.valid, recording.columns, header,
                   RecordingFormat.MARKER, recording.units)  # fmt: skip


_MARKER_TIME_TOLERANCE_S = 0.05

_VXP_COLUMNS = ("amplitude", "phase", "timestamp", "validflag", "ttlin", "mark", "ttlout")


def read_vxp(path: Path) -> RawRecording:
    """Read a Varian RPM ``.vxp`` export (see the module docstring for the layout).

    The amplitude is returned in cm as RPM writes it (multiplied by ``Scale_factor`` when the header has one);
    ``phase`` (rad), ``ttl_in``, ``ttl_out`` (0/1) and ``mark`` (str) come as columns, and ``xray_on`` is the
    ``ttlout`` column (RPM's beam gate / X-ray-on output). Samples with a validflag <= 0 are invalid.

    Example:
        >>> import tempfile
        >>> text = ("[Header]\\nCRC=1\\nVersion=1.6\\nData_layout=amplitude,phase,timestamp,validflag,ttlin,mark,ttlout\\n"
        ...         "Samples_per_second=30\\nScale_factor=10.0\\n[Data]\\n0.1,0.5,0,1,0,,0\\n0.2,1.0,33,1,0,,1\\n"
        ...         "0.3,1.5,67,0,0,P,1\\n")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = Path(d) / "r.vxp"; _ = p.write_text(text)
        ...     rec = read_vxp(p)
        >>> rec.values.tolist(), rec.valid.tolist(), rec.columns["xray_on"].tolist(), rec.units
        ([1.0, 2.0, 3.0], [True, True, False], [False, True, True], 'mm')
    """
    path = Path(path)
    text = _read_text(path)
    lines = text.splitlines()
    header: dict[str, Any] = {}
    try:
        data_start = next(i for i, line in enumerate(lines) if line.strip().lower() == "[data]")
    except StopIteration:
        raise BreathcastError(f"{path}: not an RPM .vxp file (no [Data] section)") from None
    in_header = False
    for line in lines[:data_start]:
        stripped = line.strip()
        if stripped.lower() == "[header]":
            in_header = True
            continue
        if in_header and "=" in stripped:
            key, value = stripped.split("=", 1)
            header[key.strip()] = value.strip()
    if not in_header:
        raise BreathcastError(f"{path}: not an RPM .vxp file (no [Header] section before [Data])")
    layout = [c.strip().lower() for c in header.get("Data_layout", ",".join(_VXP_COLUMNS)).split(",")]
    missing = [c for c in ("amplitude", "timestamp") if c not in layout]
    if missing:
        raise BreathcastError(f"{path}: Data_layout {header.get('Data_layout')!r} lacks {', '.join(missing)}")
    col = {name: i for i, name in enumerate(layout)}
    scale = 1.0
    if "Scale_factor" in header:
        try:
            scale = float(header["Scale_factor"])
        except ValueError:
            raise BreathcastError(f"{path}: Scale_factor {header['Scale_factor']!r} is not a number") from None
        if not np.isfinite(scale) or scale == 0:
            raise BreathcastError(f"{path}: Scale_factor must be a non-zero number, got {scale}")
    times, amps, valid, phase, ttl_in, ttl_out, marks = [], [], [], [], [], [], []
    for line_no, line in enumerate(lines[data_start + 1 :], start=data_start + 2):
        if not line.strip():
            continue
        fields_ = [f.strip() for f in line.split(",")]
        if len(fields_) < len(layout):
            raise BreathcastError(f"{path}, line {line_no}: {len(fields_)} fields; Data_layout has {len(layout)}")

        def number(name: str, default: float = 0.0) -> float:
            if name not in col or fields_[col[name]] == "":
                return default
            try:
                return float(fields_[col[name]])
            except ValueError:
                raise BreathcastError(f"{path}, line {line_no}: {name} {fields_[col[name]]!r} is not a number") from None

        times.append(number("timestamp", float("nan")))
        amps.append(number("amplitude", float("nan")))
        valid.append(number("validflag", 1.0) > 0)
        phase.append(number("phase", float("nan")))
        ttl_in.append(number("ttlin") > 0)
        ttl_out.append(number("ttlout") > 0)
        marks.append(fields_[col["mark"]] if "mark" in col else "")
    if not times:
        raise BreathcastError(f"{path}: the [Data] section has no rows")
    t = np.asarray(times) * 1e-3
    if not np.all(np.isfinite(t)):
        raise BreathcastError(f"{path}: a timestamp is missing")
    # RPM amplitudes are cm; with a Scale_factor the stored integers/cm values are scaled as the header says.
    values = np.asarray(amps) * scale
    units = "mm" if scale == 10.0 else ("cm" if scale == 1.0 else f"cm x {scale:g}")
    columns = {"phase": np.asarray(phase), "ttl_in": np.asarray(ttl_in), "ttl_out": np.asarray(ttl_out),
               "xray_on": np.asarray(ttl_out), "mark": np.asarray(marks, dtype=object)}  # fmt: skip
    return _finish(path, t, values, np.asarray(valid), columns, {"rpm": header}, RecordingFormat.VXP, units)


def guess_format(path: Path) -> RecordingFormat:
    """The format from the file name and first line: ``.vxp`` or a ``[Header]`` -> vxp; ``"Frame";"Timestamp"`` -> marker."""
    path = Path(path)
    if path.suffix.lower() == ".vxp":
        return RecordingFormat.VXP
    first = _read_text(path).lstrip().splitlines()[0]
    if first.strip().lower() == "[header]":
        return RecordingFormat.VXP
    if re.match(r'^"?frame"?;"?timestamp"?', first.strip(), re.I):
        return RecordingFormat.MARKER
    return RecordingFormat.CSV


def read_recording(path: Path, fmt: RecordingFormat | str | None = None, layout: CsvLayout | None = None) -> RawRecording:
    """Read a recording in ``fmt`` (guessed from the file when None); ``layout`` is for CSV."""
    try:
        fmt = guess_format(path) if fmt is None else RecordingFormat(fmt)
    except ValueError:
        raise BreathcastError(f"unknown recording format {fmt!r}; use one of {', '.join(f.value for f in RecordingFormat)}") from None
    if fmt is RecordingFormat.VXP:
        return read_vxp(path)
    if fmt is RecordingFormat.MARKER:
        return read_marker(path)
    return read_csv(path, layout or CsvLayout())
