"""Ingest real 5DCT data: DICOM free-breathing scans + a raw breathing recording -> one dataset patient.

The steps (``breathcast ingest``, docs/dicom.md "Ingesting real 5DCT"):

1. read every scan's CT series (:func:`breathcast.io.dicom_io.read_ct_series`); all must share one Frame of
   Reference and one geometry (shape, spacing, origin, direction), else a one-line error names the folder;
2. optionally resample the scans to a model grid (same field of view, :func:`breathcast.geometry.resample_volume`);
3. calibrate the recording once (:func:`breathcast.calibration.surrogate.calibrate_surrogate`): raw ->
   normalised amplitude (0 typical end-exhale, 1 typical end-inhale);
4. place each scan on the recording's clock (a given start time, or the k-th X-ray-on edge) and sample the
   calibrated trace at each axial slice's acquisition time (:func:`breathcast.calibration.alignment.align_scan`);
5. write the patient with :func:`breathcast.io.dataset.write_patient` (kind "real", no reference, fields or labels).

Everything that can fail is checked before anything is written, and ``write_patient`` itself writes into a
hidden folder renamed into place, so a failed ingest leaves no patient folder.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


import breathcast
from breathcast.calibration.alignment import ScanParameters, align_scan, scan_start_time
from breathcast.calibration.readers import CsvLayout, read_recording
from breathcast.calibration.surrogate import CalibrationSettings, calibrate_surrogate
from breathcast.io.dataset import write_patient
from breathcast.io.dicom_io import CTSeries, read_ct_series
from breathcast.errors import BreathcastError
from breathcast.geometry import grid_difference, resample_volume
from breathcast.traces import BreathingTrace, axial_slice_positions_mm

__all__ = ["ScanSpec", "IngestConfig", "load_ingest_config", "ingest_patient"]

_PATIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ScanSpec:
    """One free-breathing scan: where its DICOM series is and how it was acquired.

    The scan's clock starts at ``start_time_s`` on the recording's clock, or (``use_xray_on``) at an X-ray-on
    edge of the recording: edge ``xray_edge`` (default: the k-th edge for the k-th scan that uses X-ray-on).
    The first slice in scan order is acquired ``scan_start_s`` after that. Slice positions come from the
    series' grid (LPS z of each slice centre).

    Args:
        folder: folder of the CT series.
        direction: "cranio-caudal" or "caudo-cranial".
        rotation_time_s: gantry rotation time, s.
        pitch: helical pitch (table feed per rotation / collimation).
        collimation_mm: total collimation, mm.
        table_speed_mm_s: table speed, mm/s; None to derive it from pitch, collimation and rotation time.
        start_time_s: recording time (s) the scan's clock starts at; required unless ``use_xray_on``.
        use_xray_on: place the scan at an X-ray-on edge of the recording instead.
        xray_edge: which edge (0-based); None for the k-th.
        scan_start_s: delay from the scan's clock start to its first slice, s.
        series_uid: SeriesInstanceUID when the folder holds several series.

    Example:
        >>> ScanSpec("scan0", direction="caudo-cranial", start_time_s=4.0).parameters((0.0, 5.0)).n_slices
        2
    """

    folder: Path
    direction: str = "cranio-caudal"
    rotation_time_s: float = 0.28
    pitch: float = 1.0
    collimation_mm: float = 38.4
    table_speed_mm_s: float | None = None
    start_time_s: float | None = None
    use_xray_on: bool = False
    xray_edge: int | None = None
    scan_start_s: float = 0.0
    series_uid: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if self.use_xray_on and self.start_time_s is not None:
            raise BreathcastError(f"{self.folder}: give start_time_s or use_xray_on, not both")
        if not self.use_xray_on:
            if self.start_time_s is None:
                raise BreathcastError(f"{self.folder}: the scan needs start_time_s (s on the recording's clock) or use_xray_on")
            if not math.isfinite(float(self.start_time_s)):
                raise BreathcastError(f"{self.folder}: start_time_s must be finite, got {self.start_time_s}")

    def parameters(self, positions_mm: tuple[float, ...]) -> ScanParameters:
        """The :class:`ScanParameters` of this scan with slices at ``positions_mm`` (LPS z, mm, array order)."""
        return ScanParameters(
            rotation_time_s=self.rotation_time_s,
            pitch=self.pitch,
            collimation_mm=self.collimation_mm,
            table_speed_mm_s=self.table_speed_mm_s,
            n_slices=len(positions_mm),
            scan_start_s=self.scan_start_s,
            direction=self.direction,
            slice_positions_mm=tuple(positions_mm),
        )


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest and where.

    Args:
        scans: the patient's free-breathing scans, in acquisition order.
        recording: the raw breathing recording (CSV, optical-marker file, Varian RPM .vxp).
        patient_id: the patient's folder name in the dataset.
        out: the dataset folder (created if needed; other patients are kept).
        recording_format: "csv", "marker", "vxp", or None to guess from the file.
        csv_layout: columns of a CSV recording (default: ``time``, ``amplitude``).
        calibration: calibration settings of the recording.
        model_grid: (Z, Y, X) to resample the scans to (same field of view), or None to keep the DICOM grid.
    """

    scans: list[ScanSpec]
    recording: Path
    patient_id: str
    out: Path
    recording_format: str | None = None
    csv_layout: CsvLayout | None = None
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    model_grid: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "recording", Path(self.recording))
        object.__setattr__(self, "out", Path(self.out))
        if not self.scans:
            raise BreathcastError("ingest needs at least one scan")
        if not _PATIENT_ID.match(str(self.patient_id)):
            raise BreathcastError(f"patient id {self.patient_id!r} is not a plain folder name (letters, digits, . _ -)")
        if self.model_grid is not None:
            shape = tuple(int(n) for n in self.model_grid)
            if len(shape) != 3 or min(shape) < 2:
                raise BreathcastError(f"model grid must be three sizes >= 2 (Z, Y, X), got {self.model_grid}")
            object.__setattr__(self, "model_grid", shape)


def _require(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise BreathcastError(f"{where}: missing '{key}'")
    return data[key]


def load_ingest_config(path: Path, out: Path | None = None) -> IngestConfig:
    """Read an ingest manifest (JSON, or TOML for a ``.toml`` file); relative paths are from its folder.

    Keys: ``patient_id``; ``recording`` {``path``, ``format``, and for CSV ``time_column``, ``value_columns``,
    ``separator``, ``decimal``, ``time_unit``, ``xray_column``, ``valid_column``}; ``scans`` [{``folder``,
    ``start_time_s`` or ``use_xray_on``, ``direction``, ``rotation_time_s``, ``pitch``, ``collimation_mm``, and
    optional ``table_speed_mm_s``, ``xray_edge``, ``scan_start_s``, ``series_uid``}]; optional ``out`` (the
    dataset folder; ``out`` argument wins), ``model_grid`` [Z, Y, X], ``calibration`` {``sign``,
    ``track_drift``, ``min_prominence``, ``min_period_s``}.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except OSError as exc:
        raise BreathcastError(f"{path}: cannot read the ingest manifest ({exc.strerror or exc})") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise BreathcastError(f"{path}: not a valid manifest ({exc})") from None
    if not isinstance(data, dict):
        raise BreathcastError(f"{path}: the manifest must be an object")
    base = path.parent
    where = str(path)
    rec = _require(data, "recording", where)
    if not isinstance(rec, dict):
        raise BreathcastError(f"{path}: 'recording' must be an object with 'path' and 'format'")
    layout = None
    csv_keys = ("time_column", "value_columns", "separator", "decimal", "time_unit", "xray_column", "valid_column", "units")
    if any(k in rec for k in csv_keys):
        kwargs = {k: rec[k] for k in csv_keys if k in rec}
        if isinstance(kwargs.get("value_columns"), str):
            kwargs["value_columns"] = (kwargs["value_columns"],)
        layout = CsvLayout(**kwargs)
    scans_raw = _require(data, "scans", where)
    if not isinstance(scans_raw, list) or not scans_raw:
        raise BreathcastError(f"{path}: 'scans' must be a non-empty list")
    names = {f for f in ScanSpec.__dataclass_fields__}
    scans = []
    for k, entry in enumerate(scans_raw):
        if not isinstance(entry, dict):
            raise BreathcastError(f"{path}: scans[{k}] must be an object")
        unknown = set(entry) - names
        if unknown:
            raise BreathcastError(f"{path}: scans[{k}] has unknown key(s) {sorted(unknown)}")
        entry = dict(entry)
        entry["folder"] = base / str(_require(entry, "folder", f"{where}: scans[{k}]"))
        scans.append(ScanSpec(**entry))
    target = out if out is not None else data.get("out")
    if target is None:
        raise BreathcastError(f"{path}: no output dataset folder (give --out or 'out')")
    cal = data.get("calibration", {})
    settings = CalibrationSettings(**{k: cal[k] for k in ("sign", "track_drift", "min_prominence", "min_period_s") if k in cal})
    grid = data.get("model_grid")
    return IngestConfig(
        scans=scans,
        recording=base / str(_require(rec, "path", f"{where}: recording")),
        patient_id=str(_require(data, "patient_id", where)),
        out=Path(target) if out is not None else base / str(target),
        recording_format=rec.get("format"),
        csv_layout=layout,
        calibration=settings,
        model_grid=tuple(grid) if grid is not None else None,
    )


def _read_scans(specs: list[ScanSpec]) -> list[CTSeries]:
    series: list[CTSeries] = []
    for spec in specs:
        if not spec.folder.is_dir():
            raise BreathcastError(f"{spec.folder}: scan folder does not exist")
        s = read_ct_series(spec.folder, spec.series_uid)
        if series:
            first = series[0]
            frame, first_frame = s.identity.frame_of_reference_uid, first.identity.frame_of_reference_uid
            if frame != first_frame:
                raise BreathcastError(
                    f"{spec.folder}: Frame of Reference {frame} is not that of {specs[0].folder} ({first_frame}); "
                    "all scans of a patient must share one"
                )
            why = grid_difference(first.volume.grid, s.volume.grid)
            if why:
                raise BreathcastError(f"{spec.folder}: geometry differs from {specs[0].folder}: {why}; resample the series to one grid first")
        series.append(s)
    return series


def ingest_patient(config: IngestConfig) -> Path:
    """Turn one patient's DICOM scans and breathing recording into a dataset patient (kind "real").

    Args:
        config: the scans, recording, patient id and dataset folder.

    Returns:
        The patient's folder, ``config.out / config.patient_id``.

    Raises:
        BreathcastError: one line naming the folder or file: no CT series in a folder, series that do not share
            the Frame of Reference or geometry, a recording without breathing, a scan that does not fit inside
            the recording. Nothing is written then.
    """
    series = _read_scans(config.scans)
    grid = series[0].volume.grid
    volumes = [s.volume for s in series]
    if config.model_grid is not None and tuple(config.model_grid) != tuple(grid.shape):
        volumes = [resample_volume(v, config.model_grid) for v in volumes]
        grid = volumes[0].grid

    recording = read_recording(config.recording, config.recording_format, config.csv_layout)
    result = calibrate_surrogate(recording, config.calibration)
    trace = BreathingTrace(result.time_s, result.amplitude)
    xray = recording.columns.get("xray_on")
    positions = tuple(float(z) for z in axial_slice_positions_mm(grid))

    scans: list[dict[str, Any]] = []
    provenance: list[dict[str, Any]] = []
    xray_count = 0
    for spec, s, volume in zip(config.scans, series, volumes):
        where = f"{config.recording} / {spec.folder}"
        params = spec.parameters(positions)
        edge = None
        if spec.use_xray_on:
            if xray is None:
                raise BreathcastError(
                    f"{config.recording}: scan {spec.folder} asks for the X-ray-on edge, but the recording has no X-ray-on column"
                )
            index = spec.xray_edge if spec.xray_edge is not None else xray_count
            xray_count += 1
            start, edge = scan_start_time(recording.time_s, xray, index, where=where)
        else:
            start = float(spec.start_time_s)
        aligned = align_scan(trace, params, offset_s=start, where=where)
        scans.append({
            "image_hu": volume.array,
            "amplitude": aligned.amplitude,
            "rate": aligned.rate,
            "slice_times_s": aligned.slice_times_s,
            "direction": params.direction,
        })
        provenance.append({
            "folder": str(spec.folder),
            "series_instance_uid": s.identity.series_instance_uid,
            "series_description": s.identity.series_description,
            "scan_parameters": {k: v for k, v in asdict(params).items() if k != "slice_positions_mm"},
            "table_speed_mm_s": params.speed_mm_s,
            "clock_start_s": start,
            "xray_on_s": edge,
        })
    first = series[0].identity
    metadata = {
        "ingest": {
            "breathcast_version": breathcast.__version__,
            "frame_of_reference_uid": first.frame_of_reference_uid,
            "study_instance_uid": first.study_instance_uid,
            "source_grid": asdict(series[0].volume.grid),
            "resampled_to": list(grid.shape) if config.model_grid is not None else None,
            "scans": provenance,
        },
        "calibration": result.calibration.to_dict(),
    }
    return write_patient(
        config.out,
        config.patient_id,
        grid,
        scans,
        trace.time_s,
        trace.amplitude,
        metadata=metadata,
        kind="real",
    )
