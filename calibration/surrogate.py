"""Surrogate calibration: a raw breathing recording -> the normalised amplitude of DESIGN.md, and back live.

Offline, :func:`calibrate_surrogate` turns a :class:`~breathcast.calibration.readers.RawRecording` into a
:class:`SurrogateCalibration` and a :class:`CalibrationResult`:

1. **Clean.** Samples the format marks invalid are dropped. Spikes — a sample far from the running median
   of its neighbours (``spike_threshold`` robust deviations, and at least ``spike_min_fraction`` of the
   signal's 5-95 % range) — are dropped, per coordinate for a 3D marker. Gaps longer than
   ``dropout_factor`` sample intervals are dropouts: bridged by linear interpolation when shorter than
   ``max_gap_s``, otherwise they split the recording into segments and no cycle spans them.
2. **Principal axis** (3D markers): the first principal component of the clean positions around their
   median: the one line the marker moves along most.
3. **Sign**: inhale-positive. Breathing dwells at end-exhale, so the median of the signal lies nearer the
   end-exhale extreme; the sign puts that extreme low (``sign`` overrides it).
4. **Cycles**: on the signal resampled to a uniform grid and lightly smoothed, end-inhale peaks are the
   peaks with a prominence of at least ``min_prominence`` of the 5-95 % range, at least ``min_period_s``
   apart; end-exhale troughs are the minima between consecutive peaks (and before the first / after the
   last when the signal falls that far there). A cycle is a peak: the count is the number of breaths.
5. **Levels**: end-exhale level = median of the troughs, end-inhale level = median of the peaks (not the
   raw min and max), optionally after removing a baseline drift (a running median of the troughs over
   ``drift_window_s``).

The calibration file maps a raw sample to amplitude with one function, :meth:`SurrogateCalibration.apply`
(one scalar value or one 3D position), whose vectorised twin :meth:`~SurrogateCalibration.apply_array` gives
the same numbers. The daemon's stateful wrapper :class:`LiveCalibrator` adds what needs memory: spike
rejection (a rate of change no breath makes) and, when the calibration asks for it, causal baseline-drift
tracking from detected end-exhales. The offline amplitude of :func:`calibrate_surrogate` is computed with the
same :class:`LiveCalibrator` when drift tracking is on, and with :meth:`~SurrogateCalibration.apply_array`
otherwise: same numbers offline and live.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.signal import find_peaks

import breathcast
from breathcast.calibration.readers import RawRecording
from breathcast.checksums import sha256_file
from breathcast.errors import BreathcastError

__all__ = [
    "CALIBRATION_FORMAT",
    "CalibrationSettings",
    "SurrogateCalibration",
    "Cycles",
    "CalibrationResult",
    "LiveCalibrator",
    "calibrate_surrogate",
    "detect_cycles",
    "detect_spikes",
    "breathing_band_fraction",
]

CALIBRATION_FORMAT = "breathcast-surrogate-calibration"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CalibrationSettings:
    """How a recording is calibrated (see the module docstring for each step).

    Args:
        sign: "auto" (end-exhale dwell decides), "+" (the raw axis already rises on inhale) or "-".
        track_drift: remove a slow baseline drift before taking the levels, and track it live.
        drift_window_s: running-median window over the end-exhale troughs (offline), and the time constant of
            the live tracker, s.
        spike_threshold: a spike deviates from the 5-sample running median by more than this many robust
            standard deviations of such deviations ...
        spike_min_fraction: ... and by at least this fraction of the 5-95 % range of the signal.
        dropout_factor: a gap longer than this many median sample intervals is a dropout.
        max_gap_s: dropouts up to this long are bridged by interpolation; longer ones split the recording, s.
        min_period_s: shortest breathing period accepted (peaks closer than this are one breath), s.
        min_prominence: a breath's peak must rise this fraction of the 5-95 % range above its surroundings.
        smoothing_s: Gaussian smoothing (sigma) of the signal for cycle detection only, s.
    """

    sign: str = "auto"
    track_drift: bool = False
    drift_window_s: float = 30.0
    spike_threshold: float = 8.0
    spike_min_fraction: float = 0.2
    dropout_factor: float = 2.5
    max_gap_s: float = 1.0
    min_period_s: float = 1.5
    min_prominence: float = 0.3
    smoothing_s: float = 0.15

    def __post_init__(self) -> None:
        if self.sign not in ("auto", "+", "-"):
            raise BreathcastError(f"sign must be 'auto', '+' or '-', got {self.sign!r}")
        for name in ("drift_window_s", "spike_threshold", "dropout_factor", "min_period_s", "min_prominence"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise BreathcastError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("spike_min_fraction", "max_gap_s", "smoothing_s"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise BreathcastError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SurrogateCalibration:
    """The calibration file: raw sample -> amplitude (0 typical end-exhale, 1 typical end-inhale).

    ``amplitude = ((raw - centre) · axis - exhale_level) / (inhale_level - exhale_level)``, with ``axis`` the
    inhale-positive unit principal axis (3D) or ±1 (a scalar signal).

    Args:
        signal: "scalar" or "position3d".
        centre: (1,) or (3,) raw units: the median position the projection is taken around.
        axis: (1,) or (3,) unit vector, inhale-positive.
        exhale_level, inhale_level: projected raw units (inhale > exhale).
        raw_units: unit of the raw samples (mm, cm, V, ...).
        max_rate_per_s: fastest plausible |d amplitude/dt|, 1/s; faster changes are spikes (live).
        track_drift: whether :class:`LiveCalibrator` tracks the end-exhale baseline.
        drift_time_constant_s: time constant of that tracking, s.
        source: where it was made from (file, sha256, format, samples, duration).
        summary: the recording's report numbers (:meth:`CalibrationResult.summary`).
        created: UTC time; breathcast_version: the version that made it.

    Example:
        >>> cal = SurrogateCalibration("scalar", (0.0,), (-1.0,), exhale_level=-2.0, inhale_level=8.0)
        >>> cal.apply(2.0), cal.apply(-8.0)  # raw 2 -> projected -2 = end-exhale; raw -8 -> 8 = end-inhale
        (0.0, 1.0)
        >>> cal.apply_array(np.array([2.0, -3.0, -8.0])).tolist()
        [0.0, 0.5, 1.0]
    """

    signal: str
    centre: tuple[float, ...]
    axis: tuple[float, ...]
    exhale_level: float
    inhale_level: float
    raw_units: str = "arbitrary"
    max_rate_per_s: float = 10.0
    track_drift: bool = False
    drift_time_constant_s: float = 30.0
    source: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    breathcast_version: str = breathcast.__version__

    def __post_init__(self) -> None:
        if self.signal not in ("scalar", "position3d"):
            raise BreathcastError(f"calibration signal must be 'scalar' or 'position3d', got {self.signal!r}")
        n = 1 if self.signal == "scalar" else 3
        centre = tuple(float(c) for c in self.centre)
        axis = tuple(float(a) for a in self.axis)
        if len(centre) != n or len(axis) != n or not all(map(math.isfinite, centre + axis)):
            raise BreathcastError(f"a {self.signal} calibration needs a finite centre and axis of {n} value(s), got {centre}, {axis}")
        if abs(math.sqrt(sum(a * a for a in axis)) - 1.0) > 1e-6:
            raise BreathcastError(f"calibration axis must be a unit vector, got {axis}")
        lo, hi = float(self.exhale_level), float(self.inhale_level)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise BreathcastError(f"end-inhale level ({hi}) must be above end-exhale level ({lo})")
        if not (self.max_rate_per_s > 0 and self.drift_time_constant_s > 0):
            raise BreathcastError("max_rate_per_s and drift_time_constant_s must be positive")
        object.__setattr__(self, "centre", centre)
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "exhale_level", lo)
        object.__setattr__(self, "inhale_level", hi)

    @property
    def n_components(self) -> int:
        """1 for a scalar surrogate, 3 for a marker position."""
        return len(self.axis)

    def apply(self, raw: float | np.ndarray) -> float:
        """One raw sample (a number, or an (x, y, z) position) -> amplitude (dimensionless); NaN stays NaN."""
        values = np.asarray(raw, dtype=np.float64).reshape(-1)
        if values.size != self.n_components:
            raise BreathcastError(f"a {self.signal} calibration takes {self.n_components} value(s) per sample, got {values.size}")
        projected = 0.0
        for value, c, a in zip(values, self.centre, self.axis):
            projected += (float(value) - c) * a
        return (projected - self.exhale_level) / (self.inhale_level - self.exhale_level)

    def apply_array(self, raw: np.ndarray) -> np.ndarray:
        """(N,) scalar samples or (N, 3) positions -> (N,) float64 amplitude, the same numbers as :meth:`apply`."""
        values = np.asarray(raw, dtype=np.float64)
        if self.n_components == 1 and values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        expected = "(N,)" if self.n_components == 1 else "(N, 3)"
        if (self.n_components == 1 and values.ndim != 1) or (self.n_components == 3 and (values.ndim != 2 or values.shape[1] != 3)):
            raise BreathcastError(f"a {self.signal} calibration takes samples of shape {expected}, got {values.shape}")
        values = values.reshape(values.shape[0], -1)
        projected = np.zeros(values.shape[0])
        for i, (c, a) in enumerate(zip(self.centre, self.axis)):  # the same sum, in the same order, as apply
            projected += (values[:, i] - c) * a
        return (projected - self.exhale_level) / (self.inhale_level - self.exhale_level)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "format_version": _FORMAT_VERSION, **dataclasses.asdict(self),
                "units": {"amplitude": "dimensionless (0 typical end-exhale, 1 typical end-inhale)",
                          "centre, exhale_level, inhale_level": f"raw ({self.raw_units})", "max_rate_per_s": "1/s",
                          "drift_time_constant_s": "s"}}  # fmt: skip

    def save(self, path: Path) -> Path:
        """Write the calibration as JSON, atomically (temporary file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
            os.replace(tmp, path)
        except (OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise BreathcastError(f"cannot write calibration {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return path

    @classmethod
    def load(cls, path: Path) -> SurrogateCalibration:
        """Read a calibration written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BreathcastError(f"{path}: not a readable calibration file ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise BreathcastError(f"{path}: not a {CALIBRATION_FORMAT} file")
        if int(data.get("format_version", -1)) > _FORMAT_VERSION:
            raise BreathcastError(f"{path}: calibration format version {data['format_version']} is newer than this breathcast reads")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise BreathcastError(f"{path}: malformed calibration ({exc})") from None


class LiveCalibrator:
    """The daemon's per-sample calibration: :meth:`SurrogateCalibration.apply` plus spike rejection and drift.

    ``update`` returns NaN for a sample that is invalid, not finite, or a spike (a change faster than
    ``max_rate_per_s`` from the last accepted sample; after one second of such rejections the new level is
    accepted, so a real shift is not refused forever). With ``track_drift``, end-exhale troughs are detected
    causally (a minimum confirmed once the signal rose 0.3 above it) and the baseline offset follows them with
    the calibration's time constant; the offset is subtracted from every later sample.

    Example:
        >>> cal = SurrogateCalibration("scalar", (0.0,), (1.0,), 0.0, 10.0, max_rate_per_s=5.0)
        >>> live = LiveCalibrator(cal)
        >>> [live.update(t, v) for t, v in [(0.0, 1.0), (0.1, 2.0), (0.2, 90.0), (0.3, 3.0)]]
        [0.1, 0.2, nan, 0.3]
    """

    _CONFIRM = 0.3  # amplitude rise (fall) that confirms a trough (peak)
    _RELEASE_S = 1.0

    def __init__(self, calibration: SurrogateCalibration) -> None:
        self.calibration = calibration
        self.offset = 0.0
        self.rejected = 0
        self._last_t: float | None = None
        self._last_a = 0.0
        self._rejecting_since: float | None = None
        self._seeking_trough = True
        self._extreme = math.inf
        self._extreme_t = 0.0
        self._last_trough_t: float | None = None

    def update(self, time_s: float, raw: float | np.ndarray, valid: bool = True) -> float:
        """One sample at ``time_s`` (s, increasing) -> amplitude, or NaN (see the class docstring)."""
        cal = self.calibration
        if not valid:
            return math.nan
        a = cal.apply(raw)
        if not math.isfinite(a):
            return math.nan
        a -= self.offset
        t = float(time_s)
        if self._last_t is not None:
            dt = max(t - self._last_t, 1e-3)
            if abs(a - self._last_a) / dt > cal.max_rate_per_s:
                if self._rejecting_since is None:
                    self._rejecting_since = t
                if t - self._rejecting_since < self._RELEASE_S:
                    self.rejected += 1
                    return math.nan
        self._rejecting_since = None
        self._last_t, self._last_a = t, a
        if cal.track_drift:
            self._track(t, a)
        return a

    def _track(self, t: float, a: float) -> None:
        if self._seeking_trough:
            if a < self._extreme:
                self._extreme, self._extreme_t = a, t
            elif a > self._extreme + self._CONFIRM:  # trough confirmed: pull the baseline towards it
                since = self._extreme_t - (self._last_trough_t if self._last_trough_t is not None else self._extreme_t - 4.0)
                gain = 1.0 - math.exp(-max(since, 0.0) / self.calibration.drift_time_constant_s)
                self.offset += gain * self._extreme
                self._last_trough_t = self._extreme_t
                self._seeking_trough, self._extreme = False, a
        else:
            if a > self._extreme:
                self._extreme = a
            elif a < self._extreme - self._CONFIRM:
                self._seeking_trough, self._extreme, self._extreme_t = True, a, t

    def process(self, time_s: np.ndarray, raw: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """A whole recording through :meth:`update`, sample by sample: (N,) amplitude (NaN where rejected)."""
        t = np.asarray(time_s, dtype=np.float64)
        raw = np.asarray(raw, dtype=np.float64)
        ok = np.ones(t.shape, bool) if valid is None else np.asarray(valid, bool)
        return np.array([self.update(t[i], raw[i], bool(ok[i])) for i in range(t.size)], dtype=np.float64)


# --- offline: cleaning, cycles, levels ----------------------------------------------------------------------------


def detect_spikes(values: np.ndarray, threshold: float = 8.0, min_deviation: float = 0.0) -> np.ndarray:
    """(N,) bool: samples far from the running median of 5 (robust z > ``threshold`` and > ``min_deviation``).

    Example:
        >>> x = np.sin(np.linspace(0, 6, 60)); x[30] += 3.0
        >>> np.flatnonzero(detect_spikes(x, min_deviation=0.5)).tolist()
        [30]
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < 5:
        return np.zeros(x.shape, bool)
    deviation = np.abs(x - ndimage.median_filter(x, size=5, mode="nearest"))
    scale = 1.4826 * float(np.median(deviation))
    scale = max(scale, 1e-12)
    return (deviation > threshold * scale) & (deviation > min_deviation)


_BAND_HZ = (0.05, 1.0)  # 3 to 60 breaths per minute
_MIN_BAND_FRACTION = 0.5


def breathing_band_fraction(time_s: np.ndarray, signal: np.ndarray) -> float:
    """Fraction of the (linearly detrended) signal's variance at 0.05-1 Hz, on a uniform resampling.

    Breathing puts nearly all of it there; white noise at 10 Hz sampling about a fifth.

    Example:
        >>> t = np.arange(0, 60, 0.1)
        >>> round(breathing_band_fraction(t, np.sin(2 * np.pi * t / 4)), 2)
        1.0
    """
    t = np.asarray(time_s, dtype=np.float64)
    dt = float(np.median(np.diff(t)))
    grid = t[0] + dt * np.arange(int(np.floor((t[-1] - t[0]) / dt)) + 1)
    x = np.interp(grid, t, np.asarray(signal, dtype=np.float64))
    x = x - np.polyval(np.polyfit(grid, x, 1), grid)
    power = np.abs(np.fft.rfft(x)) ** 2
    freq = np.fft.rfftfreq(x.size, dt)
    total = float(power[1:].sum())
    if total <= 0:
        return 0.0
    return float(power[(freq >= _BAND_HZ[0]) & (freq <= _BAND_HZ[1])].sum() / total)


@dataclass(frozen=True)
class Cycles:
    """Breath cycles found in a signal.

    Args:
        peak_times_s, peak_values: (P,) end-inhale peaks (raw projected units).
        trough_times_s, trough_values: (T,) end-exhale troughs.
        segments: (start_s, end_s) of the contiguous pieces searched (long dropouts split them).
    """

    peak_times_s: np.ndarray
    peak_values: np.ndarray
    trough_times_s: np.ndarray
    trough_values: np.ndarray
    segments: list[tuple[float, float]]

    @property
    def count(self) -> int:
        """Breaths found: the number of end-inhale peaks."""
        return int(self.peak_times_s.size)


def _uniform_segments(t: np.ndarray, s: np.ndarray, dt: float, max_gap_s: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split at gaps > max_gap_s; resample each piece uniformly at dt (linear interpolation bridges short gaps)."""
    breaks = np.flatnonzero(np.diff(t) > max(max_gap_s, 1.5 * dt)) + 1
    pieces = []
    for ts, ss in zip(np.split(t, breaks), np.split(s, breaks)):
        if ts.size < 3:
            continue
        grid = ts[0] + dt * np.arange(int(np.floor((ts[-1] - ts[0]) / dt)) + 1)
        pieces.append((grid, np.interp(grid, ts, ss)))
    return pieces


def _level(values: np.ndarray, i: int) -> float:
    """The signal's level at an extremum found on the smoothed signal: the median of the 3 raw samples there
    (smoothing would pull a sharp peak down; one raw sample carries its noise)."""
    return float(np.median(values[max(i - 1, 0) : i + 2]))


def detect_cycles(time_s: np.ndarray, signal: np.ndarray, settings: CalibrationSettings = CalibrationSettings()) -> Cycles:
    """End-inhale peaks and end-exhale troughs of an inhale-positive signal (see the module docstring, step 4).

    Args:
        time_s: (N,) s, increasing (gaps allowed).
        signal: (N,) inhale-positive raw signal.
        settings: prominence, minimum period, smoothing, largest bridged gap.

    Example:
        >>> t = np.arange(1, 41, 0.1); s = np.cos(np.pi * t / 4) ** 4  # a breath every 4 s: peaks at 4, 8, .., 40 s
        >>> detect_cycles(t, s).count
        10
    """
    t = np.asarray(time_s, dtype=np.float64)
    s = np.asarray(signal, dtype=np.float64)
    dt = float(np.median(np.diff(t)))
    lo, hi = np.percentile(s, [5, 95])
    prominence = settings.min_prominence * (hi - lo)
    peaks_t, peaks_v, troughs_t, troughs_v, segments = [], [], [], [], []
    for grid, values in _uniform_segments(t, s, dt, settings.max_gap_s):
        segments.append((float(grid[0]), float(grid[-1])))
        smooth = ndimage.gaussian_filter1d(values, settings.smoothing_s / dt, mode="nearest") if settings.smoothing_s > 0 else values
        # Pad with the segment's low level so that a peak at an edge can still be found, if it is prominent.
        pad = np.full(3, lo)
        padded = np.concatenate([pad, smooth, pad])
        found, _ = find_peaks(padded, prominence=prominence, distance=max(1, int(round(settings.min_period_s / dt))))
        found = found - pad.size
        found = found[(found >= 1) & (found < smooth.size - 1)]  # a peak is a maximum seen on both sides
        for i, p in enumerate(found):  # troughs between peaks, and before the first / after the last
            peaks_t.append(grid[p])
            peaks_v.append(_level(values, p))
            start = found[i - 1] if i > 0 else 0
            window = smooth[start : p + 1]
            m = start + int(np.argmin(window))
            if i > 0 or smooth[p] - smooth[m] >= prominence and m > 0:
                troughs_t.append(grid[m])
                troughs_v.append(_level(values, m))
        if found.size:
            tail = smooth[found[-1] :]
            m = found[-1] + int(np.argmin(tail))
            if smooth[found[-1]] - smooth[m] >= prominence and m < smooth.size - 1:
                troughs_t.append(grid[m])
                troughs_v.append(_level(values, m))
    order = np.argsort(troughs_t)
    return Cycles(np.asarray(peaks_t), np.asarray(peaks_v), np.asarray(troughs_t)[order], np.asarray(troughs_v)[order], segments)


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """Everything the calibration of one recording found (the report's content).

    Args:
        recording: the raw recording.
        calibration: the calibration file's content.
        time_s: (M,) times of the clean samples, s.
        projected: (M,) inhale-positive projected raw signal of the clean samples (raw units).
        amplitude: (M,) normalised amplitude of the clean samples (the same function as live).
        drift: (M,) baseline drift removed before the levels (raw units; zeros without drift tracking).
        cycles: the breath cycles (in projected raw units, drift not removed).
        spike_times_s: times of the samples dropped as spikes.
        invalid_count: samples the format marked invalid (or not finite).
        dropouts: (start_s, end_s) of each gap longer than ``dropout_factor`` sample intervals.
    """

    recording: RawRecording
    calibration: SurrogateCalibration
    time_s: np.ndarray
    projected: np.ndarray
    amplitude: np.ndarray
    drift: np.ndarray
    cycles: Cycles
    spike_times_s: np.ndarray
    invalid_count: int
    dropouts: list[tuple[float, float]]

    def summary(self) -> dict[str, Any]:
        """Period, amplitude, irregularity, drift, cycles, spikes, dropouts: JSON-ready numbers."""
        c = self.cycles
        peak_intervals = []
        for start, end in c.segments:
            inside = c.peak_times_s[(c.peak_times_s >= start) & (c.peak_times_s <= end)]
            peak_intervals.extend(np.diff(inside))
        peak_intervals = np.asarray(peak_intervals)
        drift_removed = np.interp(c.peak_times_s, self.time_s, self.drift) if c.count else np.zeros(0)
        trough_drift = np.interp(c.trough_times_s, self.time_s, self.drift) if c.trough_times_s.size else np.zeros(0)
        # Per-cycle depth: each peak above the mean of the troughs around it.
        depths = []
        for tp, vp, dp in zip(c.peak_times_s, c.peak_values, drift_removed):
            near = np.abs(c.trough_times_s - tp) < 1.5 * (np.median(peak_intervals) if peak_intervals.size else 10.0)
            if near.any():
                depths.append(vp - dp - float(np.mean(c.trough_values[near] - trough_drift[near])))
        depths = np.asarray(depths)
        span = self.calibration.inhale_level - self.calibration.exhale_level
        slope = 0.0
        if c.trough_times_s.size >= 3 and np.ptp(c.trough_times_s) > 0:
            slope = float(np.polyfit(c.trough_times_s, c.trough_values, 1)[0]) * 60.0

        def cv(x: np.ndarray) -> float | None:
            return float(np.std(x) / np.mean(x)) if x.size >= 2 and np.mean(x) > 0 else None

        period_cv, depth_cv = cv(peak_intervals), cv(depths)
        parts = [v for v in (period_cv, depth_cv) if v is not None]
        rec = self.recording
        norm_peaks = (c.peak_values - drift_removed - self.calibration.exhale_level) / span if c.count else np.zeros(0)
        norm_troughs = (c.trough_values - trough_drift - self.calibration.exhale_level) / span if c.trough_times_s.size else np.zeros(0)
        return {
            "file": Path(rec.path).name,
            "format": rec.format,
            "duration_s": rec.duration_s,
            "samples": len(rec),
            "sample_rate_hz": 1.0 / rec.sample_interval_s if rec.sample_interval_s > 0 else None,
            "cycles": c.count,
            "period_s": float(np.median(peak_intervals)) if peak_intervals.size else None,
            "period_cv": period_cv,
            "amplitude_raw": float(np.median(depths)) if depths.size else span,
            "amplitude_cv": depth_cv,
            "irregularity": float(np.sqrt(np.sum(np.square(parts)))) if parts else None,
            "drift_raw_per_min": slope,
            "drift_amplitude_per_min": slope / span,
            "end_exhale_normalised_median": float(np.median(norm_troughs)) if norm_troughs.size else None,
            "end_inhale_normalised_median": float(np.median(norm_peaks)) if norm_peaks.size else None,
            "spikes": int(self.spike_times_s.size),
            "spike_times_s": [round(float(x), 3) for x in self.spike_times_s[:50]],
            "invalid_samples": self.invalid_count,
            "dropouts": len(self.dropouts),
            "dropout_total_s": float(sum(e - s for s, e in self.dropouts)),
            "longest_dropout_s": float(max((e - s for s, e in self.dropouts), default=0.0)),
            "timestamps_repaired": int(rec.header.get("timestamps_repaired_from_frame", 0)),
            "raw_units": rec.units,
            "axis": list(self.calibration.axis),
        }


def _sha256(path: str) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def calibrate_surrogate(recording: RawRecording, settings: CalibrationSettings = CalibrationSettings()) -> CalibrationResult:
    """Calibrate a raw recording (see the module docstring for the steps).

    Raises:
        BreathcastError: too few valid samples, a flat signal, or fewer than two breaths — "no breathing" —
            naming the file.
    """
    where = recording.path or "recording"
    t_all, v_all = recording.time_s, recording.values
    ok = recording.valid.copy()
    invalid_count = int((~ok).sum())
    if ok.sum() < 10:
        raise BreathcastError(f"{where}: {int(ok.sum())} valid sample(s); a calibration needs a recording of several breaths")
    v2 = v_all.reshape(len(recording), -1)
    spikes = np.zeros(ok.shape, bool)
    # A spike must be large against the breathing motion: the largest 5-95 % range over the coordinates.
    ranges = np.ptp(np.percentile(v2[ok], [5, 95], axis=0), axis=0)
    min_deviation = settings.spike_min_fraction * float(np.max(ranges))
    for j in range(v2.shape[1]):  # per coordinate, on the valid samples
        x = v2[ok, j]
        found = detect_spikes(x, settings.spike_threshold, min_deviation)
        spikes[np.flatnonzero(ok)[found]] = True
    keep = ok & ~spikes
    t, v = t_all[keep], v2[keep]
    dt = float(np.median(np.diff(t)))
    gaps = np.flatnonzero(np.diff(t) > settings.dropout_factor * dt)
    dropouts = [(float(t[i]), float(t[i + 1])) for i in gaps]

    # Principal axis and sign.
    centre = np.median(v, axis=0)
    if v.shape[1] == 3:
        _, _, vt = np.linalg.svd(v - centre, full_matrices=False)
        axis = vt[0]
    else:
        axis = np.ones(1)
    s = (v - centre) @ axis
    lo, hi = np.percentile(s, [5, 95])
    if not hi - lo > 1e-9 * max(1.0, float(np.abs(centre).max())):
        raise BreathcastError(f"{where}: the signal is flat (5-95 % range {hi - lo:.3g} {recording.units}); no breathing in it")
    if settings.sign == "auto":
        flip = np.median(s) - lo > hi - np.median(s)  # the dwell (median) must sit near the low, end-exhale end
    else:
        flip = settings.sign == "-"
    if flip:
        axis, s = -axis, -s
    # Deterministic orientation of a 3D axis is the sign alone; store a unit vector.
    axis = axis / np.linalg.norm(axis)

    band = breathing_band_fraction(t, s)
    if band < _MIN_BAND_FRACTION:
        raise BreathcastError(
            f"{where}: only {band:.0%} of the signal's variance is at breathing frequencies "
            f"({_BAND_HZ[0]}-{_BAND_HZ[1]} Hz); no breathing in this recording"
        )
    cycles = detect_cycles(t, s, settings)
    if cycles.count < 2 or cycles.trough_times_s.size < 2:
        raise BreathcastError(
            f"{where}: found {cycles.count} breath(s) in {recording.duration_s:.0f} s; no breathing in this recording "
            "(or lower --min-prominence)"
        )
    drift = np.zeros_like(s)
    troughs_t, troughs_v = cycles.trough_times_s, cycles.trough_values
    if settings.track_drift:
        half = settings.drift_window_s / 2
        baseline = np.array([np.median(troughs_v[np.abs(troughs_t - tt) <= half]) for tt in troughs_t])
        drift = np.interp(t, troughs_t, baseline) - float(np.median(troughs_v))
    exhale = float(np.median(troughs_v - np.interp(troughs_t, t, drift)))
    inhale = float(np.median(cycles.peak_values - np.interp(cycles.peak_times_s, t, drift)))
    if not inhale > exhale:
        raise BreathcastError(f"{where}: end-inhale level is not above end-exhale level; no breathing in this recording")
    span = inhale - exhale
    # Fastest plausible change: well above anything the clean recording does (in amplitude per second).
    rates = np.abs(np.diff(s)) / np.maximum(np.diff(t), 1e-3) / span
    max_rate = max(2.0, 3.0 * float(np.percentile(rates, 99.5)))
    calibration = SurrogateCalibration(
        signal="position3d" if v.shape[1] == 3 else "scalar",
        centre=tuple(float(c) for c in centre),
        axis=tuple(float(a) for a in axis),
        exhale_level=exhale,
        inhale_level=inhale,
        raw_units=recording.units,
        max_rate_per_s=max_rate,
        track_drift=settings.track_drift,
        drift_time_constant_s=settings.drift_window_s,
        source={"file": Path(recording.path).name if recording.path else "", "sha256": _sha256(recording.path) if recording.path else None,
                "format": recording.format, "samples": len(recording), "duration_s": recording.duration_s,
                "settings": dataclasses.asdict(settings)},  # fmt: skip
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    raw_clean = v if v.shape[1] == 3 else v[:, 0]
    if settings.track_drift:
        amplitude = LiveCalibrator(calibration).process(t, raw_clean)
    else:
        amplitude = calibration.apply_array(raw_clean)
    result = CalibrationResult(recording, calibration, t, s, amplitude, drift, cycles, t_all[spikes], invalid_count, dropouts)
    return dataclasses.replace(result, calibration=dataclasses.replace(calibration, summary=result.summary()))
