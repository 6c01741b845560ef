"""Breathing traces: synthetic irregular breathing, normalisation, rate, and helical slice timing.

Conventions (DESIGN.md), written once here:

* Amplitude is dimensionless: 0 = typical end-exhale, 1 = typical end-inhale of the session it was
  normalised on (:func:`normalise_amplitude`, robust percentiles). Values outside [0, 1] are legal
  (deep breaths, baseline drift).
* Rate is d amplitude / dt in 1/s (:func:`rate`).
* A per-slice trace has one value per axial slice of the scan it describes: slice ``z`` of a fast
  helical scan is acquired at time ``t_z`` (:class:`HelicalScan`), so its value is the trace at ``t_z``
  (:func:`per_slice_amplitude`, :func:`per_slice_rate`).

Synthetic traces keep sampling separate from building: :func:`sample_trace_draws` makes every random
choice (per-cycle periods, peak amplitudes, deep breaths, pauses, drift, noise) and
:func:`build_trace` turns those draws into the curve deterministically. :func:`synthetic_trace` does
both from a seed. Each cycle starts at end-exhale and follows the shape of Lujan et al. (1999),
"A method for incorporating organ motion due to breathing into 3D dose calculations", Med. Phys. 26(5):
``a(u) = b_i * cos^{2n}(pi * (u' - 1/2))`` over the cycle phase ``u`` in [0, 1), where ``u'`` is ``u``
skewed so that the inhale takes ``inhale_fraction`` of the cycle. ``cos^{2n}`` is flat near its zeros,
so the curve dwells near end-exhale and peaks briefly at ``b_i``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
from scipy.signal import savgol_filter

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid

__all__ = [
    "TraceConfig",
    "TraceDraws",
    "BreathingTrace",
    "ScanDirection",
    "HelicalScan",
    "sample_trace_config",
    "sample_trace_draws",
    "build_trace",
    "synthetic_trace",
    "normalise_amplitude",
    "rate",
    "axial_slice_positions_mm",
    "per_slice_amplitude",
    "per_slice_rate",
]

# Per-cycle periods and peaks are normal draws clipped to +/- this many standard deviations, so a
# cycle can never have a non-positive period or peak (hence the coefficient-of-variation limit below).
_CLIP_SIGMAS = 2.5
_MAX_CV = 0.35
_DRIFT_COMPONENTS = 3
_DEFAULT_RATE_WINDOW_S = 0.2


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value):
        raise BreathcastError(f"{name} must be a finite number, got {value}")
    return value


def _check_range(
    name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise BreathcastError(f"{name} must be in {left}{low}, {high}{right}, got {value}")


def _check_pair(name: str, pair: tuple[float, float], low: float) -> tuple[float, float]:
    if len(pair) != 2:
        raise BreathcastError(f"{name} must be a (low, high) pair, got {pair}")
    lo, hi = (_finite(name, v) for v in pair)
    if not low <= lo <= hi:
        raise BreathcastError(f"{name} must satisfy {low} <= low <= high, got {pair}")
    return lo, hi


@dataclass(frozen=True)
class TraceConfig:
    """How a synthetic breathing trace is made (see the module docstring for the cycle shape).

    Args:
        duration_s: length of the trace, s (> 0).
        sample_rate_hz: samples per second (> 0); the trace has ``round(duration_s * sample_rate_hz)``
            samples at ``k / sample_rate_hz``.
        mean_period_s: mean breathing-cycle period, s (> 0); pauses come on top of it.
        period_cv: coefficient of variation of the per-cycle period, in [0, 0.35].
        amplitude_cv: coefficient of variation of the per-cycle peak amplitude, in [0, 0.35].
        shape_n: Lujan's exponent n of ``cos^{2n}``, 1..3; larger dwells longer at end-exhale.
        inhale_fraction: fraction of a cycle spent inhaling, in (0, 1); below 0.5 the inhale is
            shorter than the exhale.
        deep_breath_probability: chance that a cycle is a deep breath, in [0, 1].
        deep_breath_scale: (low, high) uniform range of the deep-breath peak multiplier (>= 1).
        pause_probability: chance of a hold at end-exhale after a cycle, in [0, 1].
        pause_duration_s: (low, high) uniform range of a pause, s (> 0).
        drift_amplitude: largest slow baseline drift, dimensionless (>= 0).
        drift_period_s: typical period of the drift, s (> 0); components are drawn in
            [0.5, 2] x this.
        noise_std: standard deviation of additive white noise per sample, dimensionless (>= 0).

    Example:
        >>> TraceConfig(duration_s=30.0).n_samples
        750
    """

    duration_s: float = 60.0
    sample_rate_hz: float = 25.0
    mean_period_s: float = 4.0
    period_cv: float = 0.12
    amplitude_cv: float = 0.1
    shape_n: int = 2
    inhale_fraction: float = 0.4
    deep_breath_probability: float = 0.05
    deep_breath_scale: tuple[float, float] = (1.4, 1.8)
    pause_probability: float = 0.05
    pause_duration_s: tuple[float, float] = (1.0, 3.0)
    drift_amplitude: float = 0.05
    drift_period_s: float = 60.0
    noise_std: float = 0.01

    def __post_init__(self) -> None:
        for name in ("duration_s", "sample_rate_hz", "mean_period_s", "drift_period_s"):
            value = _finite(name, getattr(self, name))
            if value <= 0:
                raise BreathcastError(f"{name} must be positive, got {value}")
            object.__setattr__(self, name, value)
        for name in ("period_cv", "amplitude_cv"):
            value = _finite(name, getattr(self, name))
            _check_range(name, value, 0.0, _MAX_CV)
            object.__setattr__(self, name, value)
        for name in ("deep_breath_probability", "pause_probability"):
            value = _finite(name, getattr(self, name))
            _check_range(name, value, 0.0, 1.0)
            object.__setattr__(self, name, value)
        for name in ("drift_amplitude", "noise_std"):
            value = _finite(name, getattr(self, name))
            if value < 0:
                raise BreathcastError(f"{name} must be >= 0, got {value}")
            object.__setattr__(self, name, value)
        inhale = _finite("inhale_fraction", self.inhale_fraction)
        _check_range("inhale_fraction", inhale, 0.0, 1.0, low_open=True, high_open=True)
        object.__setattr__(self, "inhale_fraction", inhale)
        if int(self.shape_n) != self.shape_n or not 1 <= int(self.shape_n) <= 3:
            raise BreathcastError(f"shape_n must be an integer in 1..3, got {self.shape_n}")
        object.__setattr__(self, "shape_n", int(self.shape_n))
        object.__setattr__(self, "deep_breath_scale", _check_pair("deep_breath_scale", self.deep_breath_scale, 1.0))
        pause = _check_pair("pause_duration_s", self.pause_duration_s, 0.0)
        if pause[0] <= 0:
            raise BreathcastError(f"pause_duration_s must be positive, got {self.pause_duration_s}")
        object.__setattr__(self, "pause_duration_s", pause)
        if self.n_samples < 2:
            raise BreathcastError(
                "a trace needs at least 2 samples; "
                f"duration_s * sample_rate_hz = {self.duration_s * self.sample_rate_hz}"
            )

    @property
    def n_samples(self) -> int:
        """Number of samples N of the trace."""
        return int(round(self.duration_s * self.sample_rate_hz))

    @property
    def time_s(self) -> np.ndarray:
        """(N,) float64 sample times, s, starting at 0."""
        return np.arange(self.n_samples, dtype=np.float64) / self.sample_rate_hz


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.float64, copy=True)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class TraceDraws:
    """Every random choice behind one synthetic trace; :func:`build_trace` makes the curve from them.

    Args:
        start_offset_s: how far into the first cycle the trace starts, s (in [0, first period)).
        periods_s: (C,) breathing period of each cycle, s.
        peaks: (C,) peak amplitude b_i of each cycle (deep-breath multiplier included), dimensionless.
        pauses_s: (C,) end-exhale hold after each cycle, s (0 where there is none).
        drift_periods_s: (K,) periods of the drift's sinusoids, s.
        drift_phases: (K,) their phases, rad.
        drift_weights: (K,) their weights, non-negative, summing to 1.
        noise: (N,) standard-normal noise, one per sample (scaled by ``noise_std`` when building).
    """

    start_offset_s: float
    periods_s: np.ndarray
    peaks: np.ndarray
    pauses_s: np.ndarray
    drift_periods_s: np.ndarray
    drift_phases: np.ndarray
    drift_weights: np.ndarray
    noise: np.ndarray

    def __post_init__(self) -> None:
        for name in ("periods_s", "peaks", "pauses_s", "drift_periods_s", "drift_phases", "drift_weights", "noise"):
            object.__setattr__(self, name, _readonly(getattr(self, name)))
        n_cycles = self.periods_s.shape
        if self.peaks.shape != n_cycles or self.pauses_s.shape != n_cycles or self.periods_s.ndim != 1:
            raise BreathcastError(
                f"periods_s, peaks and pauses_s must be (C,) alike, got {self.periods_s.shape}, "
                f"{self.peaks.shape}, {self.pauses_s.shape}"
            )
        if np.any(self.periods_s <= 0) or np.any(self.pauses_s < 0):
            raise BreathcastError("cycle periods must be positive and pauses non-negative")


@dataclass(frozen=True, eq=False)
class BreathingTrace:
    """A breathing amplitude over time.

    Args:
        time_s: (N,) float64 sample times, s, strictly increasing (uniform or not), N >= 2.
        amplitude: (N,) float64 dimensionless amplitude (0 end-exhale, 1 end-inhale).

    Example:
        >>> tr = BreathingTrace(np.array([0.0, 1.0, 2.0]), np.array([0.0, 0.5, 1.0]))
        >>> tr.amplitude_at(np.array([0.5, 1.5])).tolist()
        [0.25, 0.75]
        >>> [round(float(r), 9) for r in rate(tr)]
        [0.5, 0.5, 0.5]
    """

    time_s: np.ndarray
    amplitude: np.ndarray

    def __post_init__(self) -> None:
        time_s = _readonly(self.time_s)
        amplitude = _readonly(self.amplitude)
        if time_s.ndim != 1 or amplitude.shape != time_s.shape:
            raise BreathcastError(
                f"time_s and amplitude must both be (N,), got {time_s.shape} and {amplitude.shape}"
            )
        if time_s.size < 2:
            raise BreathcastError(f"a trace needs at least 2 samples, got {time_s.size}")
        if not (np.all(np.isfinite(time_s)) and np.all(np.isfinite(amplitude))):
            raise BreathcastError("trace time_s and amplitude must be finite (no NaN or inf)")
        if np.any(np.diff(time_s) <= 0):
            raise BreathcastError("trace time_s must be strictly increasing")
        object.__setattr__(self, "time_s", time_s)
        object.__setattr__(self, "amplitude", amplitude)

    def __len__(self) -> int:
        return int(self.time_s.size)

    @property
    def duration_s(self) -> float:
        """Time from the first to the last sample, s."""
        return float(self.time_s[-1] - self.time_s[0])

    @property
    def sample_rate_hz(self) -> float:
        """1 / median sample interval, Hz."""
        return float(1.0 / np.median(np.diff(self.time_s)))

    def _check_times(self, times_s: np.ndarray) -> np.ndarray:
        times = np.asarray(times_s, dtype=np.float64)
        if not np.all(np.isfinite(times)):
            raise BreathcastError("times must be finite and lie within the trace; got NaN or inf")
        if times.size and (times.min() < self.time_s[0] or times.max() > self.time_s[-1]):
            raise BreathcastError(
                f"times must lie within the trace [{self.time_s[0]:.3f}, {self.time_s[-1]:.3f}] s, "
                f"got [{times.min():.3f}, {times.max():.3f}] s"
            )
        return times

    def amplitude_at(self, times_s: np.ndarray) -> np.ndarray:
        """Amplitude at ``times_s`` (any shape, s, inside the trace) by linear interpolation (same shape)."""
        times = self._check_times(times_s)
        return np.interp(times, self.time_s, self.amplitude)

    def rate_at(self, times_s: np.ndarray, smoothing_window_s: float = _DEFAULT_RATE_WINDOW_S) -> np.ndarray:
        """Rate (1/s) at ``times_s`` (any shape, s): :func:`rate`, then linear interpolation (same shape)."""
        times = self._check_times(times_s)
        return np.interp(times, self.time_s, rate(self, smoothing_window_s))


class ScanDirection(str, Enum):
    """Which way the table carries the patient through the beam."""

    CRANIO_CAUDAL = "cranio-caudal"
    """Head first: the most superior slice is acquired first."""
    CAUDO_CRANIAL = "caudo-cranial"
    """Feet first: the most inferior slice is acquired first."""


@dataclass(frozen=True)
class HelicalScan:
    """Timing of a fast helical CT: when each axial slice passes the beam centre.

    The table speed is ``pitch * collimation_mm / rotation_time_s`` unless ``table_speed_override_mm_s``
    is given (:meth:`with_table_speed`). Slice positions are mm along the patient axis, superior
    positive (LPS z). The first slice in scan order (the most superior for cranio-caudal, the most
    inferior for caudo-cranial) is acquired at ``start_time_s``, and slice z at
    ``t_z = start_time_s + |z - z_first| / table_speed``.

    Args:
        rotation_time_s: gantry rotation time, s (> 0).
        pitch: table feed per rotation over the collimation (> 0), dimensionless.
        collimation_mm: total beam collimation along z, mm (> 0).
        start_time_s: time the first slice is acquired, s (on the trace's time base).
        direction: :class:`ScanDirection` or its string value.
        table_speed_override_mm_s: table speed, mm/s (> 0); None to derive it from the above.

    Example:
        >>> scan = HelicalScan(rotation_time_s=0.5, pitch=1.0, collimation_mm=40.0, start_time_s=1.0)
        >>> scan.table_speed_mm_s
        80.0
        >>> scan.slice_times(np.array([100.0, 50.0, 0.0])).tolist()
        [1.0, 1.625, 2.25]
    """

    rotation_time_s: float = 0.28
    pitch: float = 1.2
    collimation_mm: float = 38.4
    start_time_s: float = 0.0
    direction: ScanDirection = ScanDirection.CRANIO_CAUDAL
    table_speed_override_mm_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("rotation_time_s", "pitch", "collimation_mm"):
            value = _finite(name, getattr(self, name))
            if value <= 0:
                raise BreathcastError(f"{name} must be positive, got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "start_time_s", _finite("start_time_s", self.start_time_s))
        if self.table_speed_override_mm_s is not None:
            speed = _finite("table_speed_override_mm_s", self.table_speed_override_mm_s)
            if speed <= 0:
                raise BreathcastError(f"table_speed_override_mm_s must be positive, got {speed}")
            object.__setattr__(self, "table_speed_override_mm_s", speed)
        try:
            direction = ScanDirection(self.direction)
        except ValueError:
            valid = ", ".join(repr(d.value) for d in ScanDirection)
            raise BreathcastError(f"scan direction must be one of {valid}, got {self.direction!r}") from None
        object.__setattr__(self, "direction", direction)

    @classmethod
    def with_table_speed(
        cls,
        table_speed_mm_s: float,
        start_time_s: float = 0.0,
        direction: ScanDirection | str = ScanDirection.CRANIO_CAUDAL,
    ) -> HelicalScan:
        """A scan given by its table speed (mm/s) directly."""
        return cls(start_time_s=start_time_s, direction=direction, table_speed_override_mm_s=table_speed_mm_s)

    @property
    def table_speed_mm_s(self) -> float:
        """Table speed, mm/s."""
        if self.table_speed_override_mm_s is not None:
            return self.table_speed_override_mm_s
        return self.pitch * self.collimation_mm / self.rotation_time_s

    def slice_times(self, slice_positions_mm: np.ndarray) -> np.ndarray:
        """Acquisition time of each slice.

        Args:
            slice_positions_mm: (Z,) slice centres along the patient axis, mm, superior positive, any order.

        Returns:
            (Z,) float64 times, s, in the order of ``slice_positions_mm``.
        """
        z = np.asarray(slice_positions_mm, dtype=np.float64)
        if z.ndim != 1 or z.size == 0 or not np.all(np.isfinite(z)):
            raise BreathcastError(f"slice positions must be a non-empty finite (Z,) array, got shape {z.shape}")
        z_first = z.max() if self.direction is ScanDirection.CRANIO_CAUDAL else z.min()
        return self.start_time_s + np.abs(z - z_first) / self.table_speed_mm_s

    def duration_s(self, slice_positions_mm: np.ndarray) -> float:
        """Time from the first to the last slice of ``slice_positions_mm`` (Z,) mm, s."""
        times = self.slice_times(slice_positions_mm)
        return float(times.max() - times.min())


def axial_slice_positions_mm(grid: Grid) -> np.ndarray:
    """(Z,) float64 LPS z (mm, superior positive) of the centre of each slice of ``grid``.

    Example:
        >>> axial_slice_positions_mm(Grid((3, 2, 2), spacing=(1.0, 1.0, 2.5), origin=(0.0, 0.0, -10.0))).tolist()
        [-10.0, -7.5, -5.0]
    """
    index = np.zeros((grid.shape[0], 3))
    index[:, 0] = np.arange(grid.shape[0])
    return grid.index_to_lps(index)[:, 2]


def sample_trace_config(rng: np.random.Generator, base: TraceConfig | None = None) -> TraceConfig:
    """Draw one patient's breathing habits around ``base`` (duration and sample rate are kept).

    Ranges (uniform): mean period 3-5.5 s, period cv 0.08-0.18, amplitude cv 0.06-0.15, shape_n 1-3,
    inhale fraction 0.33-0.5, deep-breath probability 0.02-0.08, pause probability 0-0.08, drift 0.02-0.1,
    noise 0.005-0.015.

    Args:
        rng: the random generator (consumed).
        base: the configuration to vary; :class:`TraceConfig` defaults when None.

    Returns:
        A new, validated :class:`TraceConfig`.
    """
    base = TraceConfig() if base is None else base
    return replace(
        base,
        mean_period_s=float(rng.uniform(3.0, 5.5)),
        period_cv=float(rng.uniform(0.08, 0.18)),
        amplitude_cv=float(rng.uniform(0.06, 0.15)),
        shape_n=int(rng.integers(1, 4)),
        inhale_fraction=float(rng.uniform(0.33, 0.5)),
        deep_breath_probability=float(rng.uniform(0.02, 0.08)),
        pause_probability=float(rng.uniform(0.0, 0.08)),
        drift_amplitude=float(rng.uniform(0.02, 0.1)),
        noise_std=float(rng.uniform(0.005, 0.015)),
    )


def _clipped_normal(rng: np.random.Generator, mean: float, cv: float, size: int) -> np.ndarray:
    draws = rng.standard_normal(size)
    return mean * (1.0 + cv * np.clip(draws, -_CLIP_SIGMAS, _CLIP_SIGMAS))


def sample_trace_draws(config: TraceConfig, rng: np.random.Generator) -> TraceDraws:
    """Make every random choice of a synthetic trace (see :class:`TraceDraws`).

    Periods and peaks are normal (mean ``mean_period_s`` resp. 1, cv from ``config``) clipped to
    +/- 2.5 standard deviations; enough cycles are drawn to cover ``duration_s`` from any start offset.

    Args:
        config: the trace configuration.
        rng: the random generator (consumed).

    Returns:
        The draws for :func:`build_trace`.
    """
    shortest = config.mean_period_s * (1.0 - _CLIP_SIGMAS * config.period_cv)
    longest = config.mean_period_s * (1.0 + _CLIP_SIGMAS * config.period_cv)
    n_cycles = int(np.ceil((config.duration_s + longest) / shortest)) + 1
    periods = _clipped_normal(rng, config.mean_period_s, config.period_cv, n_cycles)
    peaks = _clipped_normal(rng, 1.0, config.amplitude_cv, n_cycles)
    deep = rng.random(n_cycles) < config.deep_breath_probability
    peaks = np.where(deep, peaks * rng.uniform(*config.deep_breath_scale, size=n_cycles), peaks)
    paused = rng.random(n_cycles) < config.pause_probability
    pauses = np.where(paused, rng.uniform(*config.pause_duration_s, size=n_cycles), 0.0)
    start_offset = float(rng.uniform(0.0, periods[0]))
    drift_periods = config.drift_period_s * rng.uniform(0.5, 2.0, size=_DRIFT_COMPONENTS)
    drift_phases = rng.uniform(0.0, 2.0 * np.pi, size=_DRIFT_COMPONENTS)
    weights = rng.random(_DRIFT_COMPONENTS) + 0.1
    noise = rng.standard_normal(config.n_samples)
    return TraceDraws(
        start_offset_s=start_offset,
        periods_s=periods,
        peaks=peaks,
        pauses_s=pauses,
        drift_periods_s=drift_periods,
        drift_phases=drift_phases,
        drift_weights=weights / weights.sum(),
        noise=noise,
    )


def build_trace(config: TraceConfig, draws: TraceDraws) -> BreathingTrace:
    """Build the trace from its draws, deterministically (Lujan et al. 1999 cycle shape).

    Within cycle i (phase u in [0, 1) over ``periods_s[i]``), with f = ``inhale_fraction``:
    ``u' = u / (2 f)`` for u < f, else ``1/2 + (u - f) / (2 (1 - f))``, and
    ``a = peaks[i] * cos(pi * (u' - 1/2)) ** (2 n)``; then ``pauses_s[i]`` at 0, then cycle i + 1.
    Drift ``drift_amplitude * sum_k w_k sin(2 pi t / T_k + phi_k)`` and ``noise_std * noise`` are added.

    Args:
        config: the trace configuration (shape, timing, drift and noise scales).
        draws: from :func:`sample_trace_draws` (or made by hand).

    Returns:
        A :class:`BreathingTrace` of ``config.n_samples`` uniform samples from t = 0.
    """
    t = config.time_s
    if draws.noise.shape != t.shape:
        raise BreathcastError(f"draws hold {draws.noise.size} noise samples; the config needs {t.size}")
    cycle_lengths = draws.periods_s + draws.pauses_s
    starts = np.concatenate([[0.0], np.cumsum(cycle_lengths)])
    timeline = t + draws.start_offset_s
    if timeline[-1] >= starts[-1]:
        raise BreathcastError(
            f"draws cover {starts[-1] - draws.start_offset_s:.1f} s; the config needs {config.duration_s:.1f} s"
        )
    cycle = np.searchsorted(starts, timeline, side="right") - 1
    local = timeline - starts[cycle]
    period = draws.periods_s[cycle]
    u = np.minimum(local / period, 1.0)  # u >= 1 is the pause after the cycle: amplitude 0 there
    f = config.inhale_fraction
    skewed = np.where(u < f, u / (2.0 * f), 0.5 + (u - f) / (2.0 * (1.0 - f)))
    amplitude = draws.peaks[cycle] * np.cos(np.pi * (skewed - 0.5)) ** (2 * config.shape_n)
    amplitude = np.where(local < period, amplitude, 0.0)
    drift = np.sin(2.0 * np.pi * t[:, None] / draws.drift_periods_s[None, :] + draws.drift_phases[None, :])
    amplitude = amplitude + config.drift_amplitude * (drift @ draws.drift_weights)
    amplitude = amplitude + config.noise_std * draws.noise
    return BreathingTrace(t, amplitude)


def synthetic_trace(config: TraceConfig, seed: int | np.random.SeedSequence) -> BreathingTrace:
    """A synthetic irregular breathing trace, deterministic from ``seed`` (numpy Generator).

    Example:
        >>> a = synthetic_trace(TraceConfig(duration_s=20.0), seed=3)
        >>> b = synthetic_trace(TraceConfig(duration_s=20.0), seed=3)
        >>> len(a), bool(np.array_equal(a.amplitude, b.amplitude))
        (500, True)
    """
    rng = np.random.default_rng(seed)
    return build_trace(config, sample_trace_draws(config, rng))


def normalise_amplitude(
    raw: np.ndarray, low_percentile: float = 5.0, high_percentile: float = 95.0
) -> tuple[np.ndarray, float, float]:
    """Map a raw surrogate signal to amplitude: its low percentile to 0, its high percentile to 1.

    Args:
        raw: (N,) raw surrogate values (any unit), larger = more inhaled, finite.
        low_percentile: percentile taken as the typical end-exhale level.
        high_percentile: percentile taken as the typical end-inhale level.

    Returns:
        (amplitude (N,) float64 dimensionless, exhale_level, inhale_level), the levels in raw units.

    Example:
        >>> amp, lo, hi = normalise_amplitude(np.arange(101.0))
        >>> lo, hi, float(amp[50])
        (5.0, 95.0, 0.5)
    """
    values = np.asarray(raw, dtype=np.float64)
    if values.ndim != 1 or values.size < 2 or not np.all(np.isfinite(values)):
        raise BreathcastError(f"raw trace must be a finite (N,) array with N >= 2, got shape {values.shape}")
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise BreathcastError(
            f"percentiles must satisfy 0 <= low < high <= 100, got {low_percentile} and {high_percentile}"
        )
    exhale, inhale = (float(v) for v in np.percentile(values, [low_percentile, high_percentile]))
    if not inhale > exhale:
        raise BreathcastError(
            f"raw trace is flat between its {low_percentile}th and {high_percentile}th percentiles ({exhale}); "
            "no breathing to normalise"
        )
    return (values - exhale) / (inhale - exhale), exhale, inhale


def rate(trace: BreathingTrace, smoothing_window_s: float = _DEFAULT_RATE_WINDOW_S) -> np.ndarray:
    """Breathing rate d amplitude / dt, 1/s.

    Savitzky-Golay first derivative (polynomial order 2, ``mode="interp"`` at the ends) over the odd
    number of samples (>= 3) closest to ``smoothing_window_s``; 0.2 s is 5 samples at 25 Hz and 3 at
    10 Hz, where it equals central differences. Non-uniform traces are interpolated linearly onto a
    uniform grid at their median interval, differentiated there and interpolated back. With
    ``smoothing_window_s = 0`` (or a trace shorter than the window) it is plain central differences
    on the samples as they are (``numpy.gradient``, second order inside, first order at the ends).

    Args:
        trace: the trace.
        smoothing_window_s: Savitzky-Golay window, s (>= 0).

    Returns:
        (N,) float64 rate at ``trace.time_s``, 1/s.
    """
    window_s = _finite("smoothing_window_s", smoothing_window_s)
    if window_s < 0:
        raise BreathcastError(f"smoothing_window_s must be >= 0, got {window_s}")
    t, a = trace.time_s, trace.amplitude
    if window_s == 0:
        return np.gradient(a, t)
    dt = float(np.median(np.diff(t)))
    window = max(3, int(round(window_s / dt)))
    window += 1 - window % 2
    uniform = bool(np.all(np.abs(np.diff(t) - dt) <= 1e-6 * dt))
    if uniform:
        if t.size < window:
            return np.gradient(a, t)
        return savgol_filter(a, window, polyorder=2, deriv=1, delta=dt, mode="interp")
    n_uniform = int(np.floor((t[-1] - t[0]) / dt)) + 1
    t_uniform = t[0] + dt * np.arange(n_uniform)
    if n_uniform < window:
        return np.gradient(a, t)
    a_uniform = np.interp(t_uniform, t, a)
    r_uniform = savgol_filter(a_uniform, window, polyorder=2, deriv=1, delta=dt, mode="interp")
    return np.interp(t, t_uniform, r_uniform)


def per_slice_amplitude(trace: BreathingTrace, slice_times_s: np.ndarray) -> np.ndarray:
    """One amplitude per axial slice: the trace at each slice's acquisition time.

    Args:
        trace: the breathing trace during the scan.
        slice_times_s: (Z,) acquisition times, s (from :meth:`HelicalScan.slice_times`).

    Returns:
        (Z,) float64 dimensionless amplitude.
    """
    return trace.amplitude_at(np.asarray(slice_times_s, dtype=np.float64))


def per_slice_rate(
    trace: BreathingTrace, slice_times_s: np.ndarray, smoothing_window_s: float = _DEFAULT_RATE_WINDOW_S
) -> np.ndarray:
    """One rate per axial slice (1/s): :func:`rate` of the trace at each slice's acquisition time (Z,)."""
    return trace.rate_at(np.asarray(slice_times_s, dtype=np.float64), smoothing_window_s)
