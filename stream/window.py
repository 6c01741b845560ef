"""The rolling input window and the input-side fail-safe checks.

Samples arrive at the source's rate (25-100 Hz typically) with source timestamps; the model reads a window of
``trace.window_samples`` (448) amplitudes on its own time base ``trace.sample_interval_s`` (~5.1 ms, one helical
scan, ~2.3 s). :class:`RollingWindow` keeps the accepted samples of the last window and resamples them by
linear interpolation in source time, ending at the newest sample (plus the forecast horizon: the last point is
the forecast amplitude). It also judges every sample (docs/protocol.md "Gate"):

* duplicate seq, or a seq / source time that goes backwards: rejected; HOLD for ``reorder_hold_s``;
* a source-time step that neither the source's own cadence (seconds per seq step, times the seq step) nor the
  daemon's clock explains (``time_jump``): rejected, HOLD for ``reorder_hold_s``; ``restart_after`` backward or
  jumped samples in a row (in order among themselves) are a restarted source: the window restarts
  (``source_restart``, as a changed ``source`` name does);
* invalid flag, NaN or Inf, or an amplitude no breath makes (outside the plausible range, or a step or rate
  beyond the limits against the previous sample: ``implausible_sample``): rejected; HOLD until that time has left
  the window (it would be interpolated over);
* a source-time step over ``max_gap_s``: accepted; HOLD until the gap has left the window;
* an amplitude constant for ``stuck_after_s``: HOLD ``stuck_sensor`` until the flat part has left the window;
* fewer than a window of samples since the (re)start: HOLD ``window_not_full``.

Example:
    >>> from breathcast.engine.package import TraceSpec
    >>> from breathcast.stream.protocol import Sample
    >>> w = RollingWindow(TraceSpec(448, 2.3 / 447, 16))
    >>> for k in range(60):  # 2.4 s at 25 Hz
    ...     a = 0.5 + 0.01 * (k % 2)
    ...     _ = w.add(Sample(k, k * 0.04, amplitude=a), a, now=0.0)
    >>> w.reasons(now=0.0), w.window().shape
    ([], (448,))
    >>> w.add(Sample(59, 2.4, amplitude=0.5), 0.5, now=0.0).value
    'duplicate'
    >>> w.add(Sample(60, 6e8, amplitude=0.5), 0.5, now=0.0).value  # 19 years after 2.4 s, 40 ms later
    'time_jump'
    >>> w.add(Sample(61, 2.44, amplitude=50.0), 50.0, now=0.0).value
    'implausible_sample'
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from breathcast.engine.package import TraceSpec
from breathcast.stream.config import ForecastConfig, PlausibilityConfig, SafetyConfig
from breathcast.stream.forecast import RlsForecaster
from breathcast.stream.protocol import HoldReason, Sample

__all__ = ["NewestSample", "RollingWindow"]


@dataclass(frozen=True)
class NewestSample:
    """The newest accepted sample (what a frame is stamped with)."""

    seq: int
    t_source: float
    t_receive: float
    t_sent: float | None
    amplitude: float


class RollingWindow:
    """Accepted samples of the last window, the faults that still matter, and the resampled window.

    Args:
        trace: the model's window length and time base.
        safety: fail-safe thresholds.
        horizon_s: forecast horizon, s (the window ends this far after the newest sample).
        forecast: the forecaster's settings.
        capacity: most samples kept (enough for a window at 1 kHz).
        plausibility: physiological limits on the amplitude.
    """

    def __init__(self, trace: TraceSpec, safety: SafetyConfig = SafetyConfig(), horizon_s: float = 0.0,
                 forecast: ForecastConfig = ForecastConfig(), capacity: int = 4096,
                 plausibility: PlausibilityConfig = PlausibilityConfig()) -> None:  # fmt: skip
        self.trace, self.safety, self.capacity, self.plausibility = trace, safety, capacity, plausibility
        self.span_s = trace.window_duration_s
        self._offsets = np.arange(trace.window_samples) * trace.sample_interval_s - self.span_s
        self._t = np.empty(capacity)
        self._a = np.empty(capacity)
        self.set_horizon(horizon_s, forecast)
        self.reset()

    def set_horizon(self, horizon_s: float, forecast: ForecastConfig = ForecastConfig()) -> None:
        self.horizon_s = float(horizon_s)
        self.forecaster = RlsForecaster(horizon_s, forecast)

    def reset(self) -> None:
        """Forget samples, seq state and faults (the ``reset`` command, a restarted source)."""
        self._n = 0
        self._start_t: float | None = None
        self.last_seq: int | None = None
        self.last_t: float | None = None
        self.source: str | None = None
        self.newest: NewestSample | None = None
        self._window_faults: dict[HoldReason, float] = {}  # reason -> source time it happened
        self._timed_faults: dict[HoldReason, float] = {}  # reason -> daemon monotonic time it ends
        self._run = 0  # consecutive backward / time-jumped samples, in order among themselves
        self._run_last: tuple[int, float] | None = None
        self._last_now: float | None = None  # daemon time of the last in-order sample
        self._steps: deque[float] = deque(maxlen=32)  # recent source seconds per seq step (the cadence)
        self._previous: tuple[float, float] | None = None  # (t, amplitude) of the last in-order finite sample
        self._flat: list[float] | None = None  # [t_start, t_last, low, high] of the current constant run
        self.forecaster.reset()

    # -- intake ------------------------------------------------------------------------------------------

    def add(self, sample: Sample, amplitude: float, now: float, t_receive: float = 0.0) -> HoldReason | None:
        """Judge one sample (its amplitude already calibrated) at daemon monotonic time ``now``.

        Returns:
            None when accepted, else the rejection reason.
        """
        if sample.source is not None and sample.source != self.source and self.last_seq is not None:
            self._restart(sample.t_source)  # another source: its seq and clock start afresh
        if sample.source is not None:
            self.source = sample.source
        if self.last_seq is not None:
            if sample.seq == self.last_seq:
                return self._timed(HoldReason.DUPLICATE, now)
            backward = sample.seq < self.last_seq or not sample.t_source > self.last_t
            if backward or self._time_jump(sample, now):
                run = self._run_last
                in_run = run is not None and sample.seq == run[0] + 1 and sample.t_source > run[1]
                self._run = self._run + 1 if in_run else 1
                self._run_last = (sample.seq, sample.t_source)
                if self._run < self.safety.restart_after:
                    return self._timed(HoldReason.OUT_OF_ORDER if backward else HoldReason.TIME_JUMP, now)
                self._restart(sample.t_source)  # a restarted source (or a new clock): take it from here
        self._run, self._run_last = 0, None
        gap = self.last_t is not None and sample.t_source - self.last_t > self.safety.max_gap_s
        if self.last_seq is not None:
            self._steps.append((sample.t_source - self.last_t) / (sample.seq - self.last_seq))
        self.last_seq, self.last_t, self._last_now = sample.seq, sample.t_source, now
        if not sample.valid:
            self._window_faults[HoldReason.INVALID_SAMPLE] = sample.t_source
            return HoldReason.INVALID_SAMPLE
        if not math.isfinite(amplitude):
            self._window_faults[HoldReason.NON_FINITE_SAMPLE] = sample.t_source
            return HoldReason.NON_FINITE_SAMPLE
        previous, self._previous = self._previous, (sample.t_source, amplitude)
        if not self._plausible(amplitude, previous, sample.t_source):
            self._window_faults[HoldReason.IMPLAUSIBLE_SAMPLE] = sample.t_source
            return HoldReason.IMPLAUSIBLE_SAMPLE
        if gap:
            self._window_faults[HoldReason.GAP] = sample.t_source
            self.forecaster.reset()
        self._track_flat(sample.t_source, amplitude)
        self._append(sample.t_source, amplitude)
        self.forecaster.update(sample.t_source, amplitude)
        self.newest = NewestSample(sample.seq, sample.t_source, t_receive, sample.t_sent, amplitude)
        return None

    def flag(self, reason: HoldReason, t_source: float) -> None:
        """HOLD with ``reason`` until source time ``t_source`` has left the window (e.g. ``implausible_target``)."""
        self._window_faults[reason] = t_source

    def _restart(self, t_source: float) -> None:
        self.reset()
        self._window_faults[HoldReason.SOURCE_RESTART] = t_source

    def _time_jump(self, sample: Sample, now: float) -> bool:
        """True when the step to ``sample`` is far beyond what the source's cadence or the daemon's clock explain."""
        step = sample.t_source - self.last_t
        slack = self.safety.time_jump_slack_s
        if step <= slack:
            return False
        cadence = float(np.median(self._steps)) if self._steps else 0.0
        waited = 0.0 if self._last_now is None else max(now - self._last_now, 0.0)
        explained = max((sample.seq - self.last_seq) * cadence, waited)
        return step > self.safety.time_jump_factor * explained + slack

    def _plausible(self, amplitude: float, previous: tuple[float, float] | None, t: float) -> bool:
        p = self.plausibility
        lo, hi = p.amplitude_range
        if not lo <= amplitude <= hi:
            return False
        if previous is None:
            return True
        change = abs(amplitude - previous[1])
        return change <= p.max_step and change <= p.max_rate_per_s * (t - previous[0]) + p.noise

    def _track_flat(self, t: float, amplitude: float) -> None:
        if self.safety.stuck_after_s <= 0:
            return
        flat = self._flat
        if flat is not None and max(flat[3], amplitude) - min(flat[2], amplitude) <= self.safety.stuck_tolerance:
            flat[1], flat[2], flat[3] = t, min(flat[2], amplitude), max(flat[3], amplitude)
            return
        if flat is not None and flat[1] - flat[0] >= self.safety.stuck_after_s:
            self._window_faults[HoldReason.STUCK_SENSOR] = flat[1]  # the flat part is no measurement either
        self._flat = [t, t, amplitude, amplitude]

    def _timed(self, reason: HoldReason, now: float) -> HoldReason:
        self._timed_faults[reason] = now + self.safety.reorder_hold_s
        return reason

    def _append(self, t: float, a: float) -> None:
        if self._start_t is None:
            self._start_t = t
        if self._n == self.capacity:  # keep what the window (and its margin) still needs
            keep = max(int(np.searchsorted(self._t[: self._n], t - 2 * self.span_s - 1.0)) - 1, self._n // 2)
            keep = min(keep, self._n - 2)
            self._t[: self._n - keep] = self._t[keep : self._n]
            self._a[: self._n - keep] = self._a[keep : self._n]
            self._n -= keep
        self._t[self._n], self._a[self._n] = t, a
        self._n += 1

    # -- state -------------------------------------------------------------------------------------------

    @property
    def window_start(self) -> float | None:
        """Source time of the window's oldest sample (the newest + horizon - span), s."""
        return None if self.newest is None else self.newest.t_source + self.horizon_s - self.span_s

    def reasons(self, now: float) -> list[HoldReason]:
        """Input-side reasons to HOLD now (empty: the window is full and clean)."""
        out = []
        for reason, until in list(self._timed_faults.items()):
            if now < until:
                out.append(reason)
            else:
                del self._timed_faults[reason]
        flat = self._flat
        if flat is not None and self.safety.stuck_after_s > 0 and flat[1] - flat[0] >= self.safety.stuck_after_s:
            out.append(HoldReason.STUCK_SENSOR)
        start = self.window_start
        for reason, t in list(self._window_faults.items()):
            if start is None or start <= t:
                out.append(reason)
            else:
                del self._window_faults[reason]
        if start is None or self._start_t is None or start < self._start_t:
            out.append(HoldReason.WINDOW_NOT_FULL)
        return out

    @property
    def full(self) -> bool:
        start = self.window_start
        return start is not None and self._start_t is not None and start >= self._start_t

    def window(self) -> np.ndarray:
        """(W,) float64 amplitude on the model's time base, oldest first, ending at newest + horizon.

        Only meaningful when :attr:`full`; samples before the first are held at its value.
        """
        if self.newest is None:
            raise ValueError("no samples yet")
        t_end = self.newest.t_source + self.horizon_s
        t, a = self._t[: self._n], self._a[: self._n]
        lo = max(int(np.searchsorted(t, t_end - self.span_s)) - 1, 0)
        t, a = t[lo:], a[lo:]
        if self.horizon_s > 0:
            t = np.append(t, t_end)
            a = np.append(a, self.forecaster.predict())
        return np.interp(t_end + self._offsets, t, a)

    def forecast_amplitude(self) -> float:
        """The amplitude the window ends at (the forecast for newest + horizon)."""
        return self.newest.amplitude if self.horizon_s == 0 or self.newest is None else self.forecaster.predict()
