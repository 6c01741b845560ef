"""Helical slice-time alignment: a breathing trace -> one amplitude (and rate) per axial slice of a scan.

The paper's "padded, aligned and re-sampled" step. The timing of each slice is the core's
:class:`breathcast.traces.HelicalScan` (slice z at ``t_z = start + |z - z_first| / table_speed``); this module
adds what a real acquisition needs around it:

* scan parameters as the scanner reports them (:class:`ScanParameters`: rotation time, pitch, collimation
  or table speed, slice spacing and count or explicit positions, scan start, direction), validated with
  one-line errors;
* the scan's place on the trace clock: the rising edge of an X-ray-on (TTL) column when the recording has
  one (the k-th edge for the k-th scan of a session), else a given offset;
* resampling the trace to the slice times (:func:`breathcast.traces.per_slice_amplitude`, ``per_slice_rate``),
  after checking that the whole scan lies inside the trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.traces import BreathingTrace, HelicalScan, ScanDirection, per_slice_amplitude, per_slice_rate

__all__ = ["ScanParameters", "SliceTrace", "xray_on_edges", "scan_start_time", "align_scan"]


@dataclass(frozen=True)
class ScanParameters:
    """A fast helical scan as the scanner describes it.

    Slice positions are ``first_slice_mm + k * slice_spacing_mm`` for k = 0 .. n_slices-1 (mm along the patient
    axis, superior positive, i.e. LPS z), unless ``slice_positions_mm`` gives them. The table speed is
    ``pitch * collimation_mm / rotation_time_s`` unless ``table_speed_mm_s`` is given.

    Args:
        rotation_time_s: gantry rotation time, s (> 0).
        pitch: table feed per rotation / collimation (> 0).
        collimation_mm: total collimation, mm (> 0).
        table_speed_mm_s: table speed, mm/s (> 0); None to derive it.
        slice_spacing_mm: distance between reconstructed axial slices, mm (> 0).
        n_slices: number of slices (>= 1).
        first_slice_mm: LPS z of slice 0, mm.
        scan_start_s: when the first slice (in scan order) is acquired, s after the X-ray-on edge (or after the
            trace's time 0 when there is no TTL column and no offset).
        direction: "cranio-caudal" (head first: the most superior slice first) or "caudo-cranial".
        slice_positions_mm: explicit (Z,) LPS z of the slices, overriding spacing, count and first slice.

    Example:
        >>> p = ScanParameters(rotation_time_s=0.5, pitch=1.0, collimation_mm=40.0, slice_spacing_mm=5.0, n_slices=3)
        >>> p.helical(start_time_s=10.0).slice_times(p.positions_mm()).tolist()  # 80 mm/s; z = 0, 5, 10 mm
        [10.125, 10.0625, 10.0]
    """

    rotation_time_s: float = 0.28
    pitch: float = 1.0
    collimation_mm: float = 38.4
    table_speed_mm_s: float | None = None
    slice_spacing_mm: float = 5.0
    n_slices: int = 64
    first_slice_mm: float = 0.0
    scan_start_s: float = 0.0
    direction: str = ScanDirection.CRANIO_CAUDAL.value
    slice_positions_mm: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is None:
                return
            value = float(value)
            if not (math.isfinite(value) and value > 0):
                raise BreathcastError(f"scan parameter {name} must be a positive number, got {getattr(self, name)}")
            object.__setattr__(self, name, value)

        for name in ("rotation_time_s", "pitch", "collimation_mm", "table_speed_mm_s", "slice_spacing_mm"):
            positive(name)
        if int(self.n_slices) != self.n_slices or self.n_slices < 1:
            raise BreathcastError(f"scan parameter n_slices must be a positive integer, got {self.n_slices}")
        for name in ("first_slice_mm", "scan_start_s"):
            if not math.isfinite(float(getattr(self, name))):
                raise BreathcastError(f"scan parameter {name} must be finite, got {getattr(self, name)}")
        if self.slice_positions_mm is not None:
            z = np.asarray(self.slice_positions_mm, dtype=np.float64)
            if z.ndim != 1 or z.size == 0 or not np.all(np.isfinite(z)):
                raise BreathcastError(f"slice_positions_mm must be a non-empty list of finite mm values, got {self.slice_positions_mm}")
            if np.unique(z).size != z.size:
                raise BreathcastError("slice_positions_mm holds the same position twice")
            object.__setattr__(self, "slice_positions_mm", tuple(float(v) for v in z))
        try:
            object.__setattr__(self, "direction", ScanDirection(self.direction).value)
        except ValueError:
            valid = ", ".join(repr(d.value) for d in ScanDirection)
            raise BreathcastError(f"scan direction must be one of {valid}, got {self.direction!r}") from None
        speed = self.speed_mm_s
        if speed > 1000.0:  # faster than any scanner's table (the fastest are ~ 740 mm/s)
            raise BreathcastError(f"table speed {speed:.0f} mm/s is not a real scanner's; check the pitch, collimation and rotation time")

    @property
    def speed_mm_s(self) -> float:
        """Table speed, mm/s."""
        if self.table_speed_mm_s is not None:
            return float(self.table_speed_mm_s)
        return self.pitch * self.collimation_mm / self.rotation_time_s

    def positions_mm(self) -> np.ndarray:
        """(Z,) float64 LPS z of each slice, mm, in array order."""
        if self.slice_positions_mm is not None:
            return np.asarray(self.slice_positions_mm, dtype=np.float64)
        return self.first_slice_mm + self.slice_spacing_mm * np.arange(int(self.n_slices), dtype=np.float64)

    def helical(self, start_time_s: float) -> HelicalScan:
        """The core :class:`HelicalScan` with its first slice acquired at ``start_time_s`` (trace clock, s)."""
        return HelicalScan.with_table_speed(self.speed_mm_s, start_time_s=start_time_s, direction=self.direction)

    def duration_s(self) -> float:
        """Time from the first to the last slice, s."""
        return float(np.ptp(self.positions_mm()) / self.speed_mm_s)


@dataclass(frozen=True)
class SliceTrace:
    """A scan's per-slice trace.

    Args:
        slice_times_s: (Z,) acquisition time of each slice on the trace clock, s.
        positions_mm: (Z,) LPS z of each slice, mm.
        amplitude: (Z,) dimensionless amplitude at each slice's time.
        rate: (Z,) d amplitude/dt at each slice's time, 1/s.
        xray_on_s: the X-ray-on time the scan was placed at (None when placed by an offset).
    """

    slice_times_s: np.ndarray
    positions_mm: np.ndarray
    amplitude: np.ndarray
    rate: np.ndarray
    xray_on_s: float | None


def xray_on_edges(time_s: np.ndarray, xray_on: np.ndarray) -> np.ndarray:
    """Times (s) of the rising edges (off -> on) of an X-ray-on / TTL column; a column on from its first sample counts.

    Example:
        >>> xray_on_edges(np.arange(6.0), np.array([0, 1, 1, 0, 1, 0])).tolist()
        [1.0, 4.0]
    """
    on = np.asarray(xray_on).astype(bool)
    t = np.asarray(time_s, dtype=np.float64)
    if on.shape != t.shape:
        raise BreathcastError(f"X-ray-on column has shape {on.shape}; the trace has {t.shape}")
    rising = np.flatnonzero(on[1:] & ~on[:-1]) + 1
    if on.size and on[0]:
        rising = np.concatenate([[0], rising])
    return t[rising]


def scan_start_time(
    time_s: np.ndarray, xray_on: np.ndarray | None = None, scan_index: int = 0, offset_s: float | None = None, where: str = "trace"
) -> tuple[float, float | None]:
    """Where the scan's clock starts on the trace clock: the ``scan_index``-th X-ray-on edge, else ``offset_s``.

    Returns:
        (start, the X-ray-on edge time or None).
    """
    if xray_on is not None:
        edges = xray_on_edges(time_s, xray_on)
        if edges.size == 0:
            raise BreathcastError(f"{where}: the X-ray-on (TTL) column never switches on; give the scan's time offset instead")
        if not 0 <= scan_index < edges.size:
            raise BreathcastError(f"{where}: scan {scan_index} asked for, but the X-ray-on column has {edges.size} edge(s)")
        return float(edges[scan_index]), float(edges[scan_index])
    if offset_s is None:
        offset_s = 0.0
    if not math.isfinite(float(offset_s)):
        raise BreathcastError(f"{where}: scan offset must be finite, got {offset_s}")
    return float(offset_s), None


def align_scan(
    trace: BreathingTrace,
    scan: ScanParameters,
    xray_on: np.ndarray | None = None,
    scan_index: int = 0,
    offset_s: float | None = None,
    where: str = "trace",
) -> SliceTrace:
    """One amplitude and rate per axial slice of a helical scan, with the scan aligned to the trace.

    Args:
        trace: the normalised breathing trace (its own clock, s).
        scan: the scan's parameters (``scan_start_s`` is counted from the X-ray-on edge or the offset).
        xray_on: (N,) X-ray-on / TTL column sampled with the trace, or None.
        scan_index: which X-ray-on edge is this scan's (0 = the first).
        offset_s: without an X-ray-on column, the trace time the scan's clock starts at (default 0).
        where: the name (file) used in error messages.

    Returns:
        The :class:`SliceTrace`.

    Example:
        >>> tr = BreathingTrace(np.arange(0.0, 10.0, 0.1), np.arange(0.0, 10.0, 0.1) / 10.0)
        >>> on = (tr.time_s >= 2.0).astype(int)
        >>> p = ScanParameters(table_speed_mm_s=100.0, slice_spacing_mm=10.0, n_slices=3, scan_start_s=0.5)
        >>> s = align_scan(tr, p, xray_on=on)
        >>> s.slice_times_s.round(6).tolist(), s.amplitude.round(6).tolist()
        ([2.7, 2.6, 2.5], [0.27, 0.26, 0.25])
    """
    start, edge = scan_start_time(trace.time_s, xray_on, scan_index, offset_s, where)
    positions = scan.positions_mm()
    times = scan.helical(start + scan.scan_start_s).slice_times(positions)
    first, last = float(trace.time_s[0]), float(trace.time_s[-1])
    if times.min() < first or times.max() > last:
        raise BreathcastError(
            f"{where}: the scan runs from {times.min():.3f} to {times.max():.3f} s ({scan.duration_s():.2f} s long), "
            f"outside the trace's {first:.3f} to {last:.3f} s; check the scan start, offset and table speed"
        )
    return SliceTrace(times, positions, per_slice_amplitude(trace, times), per_slice_rate(trace, times), edge)
