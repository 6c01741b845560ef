"""Latency compensation: a short-horizon forecast of the breathing amplitude.

The predictor is the adaptive linear one of the respiratory-motion literature (recursive least squares with a
forgetting factor on the recent signal; cf. Sharp et al., Phys. Med. Biol. 49 (2004) 425, and Ernst's
comparisons, Phys. Med. Biol. 58 (2013) 3911). On a uniform time base ``dt`` it regresses the change
``y[k+h] - y[k]`` on ``M`` recent changes ``y[k] - y[k-jL]`` (j = 1..M, lags L spread over ``history_s``), so a
baseline drift does not enter, and starts from ``w = 0``: "no prediction" (the last value) until it has learned
something. Two guards keep it sane on real signals: the trace of the inverse correlation matrix is capped
(anti-windup: forgetting inflates it along directions the signal does not excite, e.g. a sensor interpolated
between slow samples), and a forecast step is clipped to ``max_rate_per_s * horizon``.

Example:
    >>> import numpy as np
    >>> f = RlsForecaster(horizon_s=0.3)
    >>> t = np.arange(0, 60, 0.04); a = 0.5 - 0.5 * np.cos(2 * np.pi * t / 4.0)
    >>> for ti, ai in zip(t, a):
    ...     f.update(ti, ai)
    >>> truth = 0.5 - 0.5 * np.cos(2 * np.pi * (t[-1] + 0.3) / 4.0)
    >>> bool(abs(f.predict() - truth) < 0.01 < abs(a[-1] - truth))
    True
"""

from __future__ import annotations

import math

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.stream.config import ForecastConfig

__all__ = ["RlsForecaster"]

_P0 = 1.0  # initial inverse correlation (per unit amplitude change squared)
_P_MAX = 1e3  # cap on trace(P)


class RlsForecaster:
    """Adaptive linear forecast of the amplitude ``horizon_s`` ahead (see the module docstring).

    Args:
        horizon_s: how far ahead, s (0: :meth:`predict` returns the last value).
        config: time base, history length, forgetting factor.
    """

    def __init__(self, horizon_s: float, config: ForecastConfig = ForecastConfig()) -> None:
        if not (0.0 <= horizon_s <= 5.0):
            raise BreathcastError(f"forecast horizon must be in [0, 5] s, got {horizon_s}")
        self.horizon_s = float(horizon_s)
        self.config = config
        self.dt = config.sample_interval_s
        self.h = int(round(horizon_s / self.dt))
        self.m = config.features
        self.lag = max(1, int(round(config.history_s / config.features / self.dt)))  # grid steps between feature lags
        self.max_delta = config.max_rate_per_s * self.horizon_s
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new source, or after a gap)."""
        self.w = np.zeros(self.m)
        self.P = np.eye(self.m) * _P0
        self._y: list[float] = []  # uniform-grid values, the last m + h + 1 kept
        self._t_grid: float | None = None  # time of the last grid point
        self._t_last: float | None = None
        self._a_last = math.nan
        self.updates = 0

    def _features(self, k: int) -> np.ndarray:
        y = self._y
        return np.array([y[k] - y[k - j * self.lag] for j in range(1, self.m + 1)])

    def _push(self, value: float) -> None:
        self._y.append(value)
        k = len(self._y) - 1
        if self.h > 0 and k - self.h - self.m * self.lag >= 0:  # learn: input at k - h, outcome at k
            x = self._features(k - self.h)
            d = self._y[k] - self._y[k - self.h]
            lam = self.config.forgetting
            px = self.P @ x
            gain = px / (lam + x @ px)
            self.w += gain * (d - self.w @ x)
            self.P = (self.P - np.outer(gain, px)) / lam
            trace = np.trace(self.P)
            if not np.isfinite(trace) or trace > _P_MAX:  # anti-windup: forgetting inflates P in unexcited directions
                self.P *= _P_MAX / trace if np.isfinite(trace) else 0.0
                if not np.isfinite(trace):
                    self.P = np.eye(self.m) * _P0
            self.updates += 1
        keep = self.m * self.lag + self.h + 1
        if len(self._y) > 4 * keep:
            del self._y[: len(self._y) - keep]

    def update(self, t: float, amplitude: float) -> None:
        """One accepted sample (source time s, increasing; finite amplitude); bounded work whatever ``t`` is."""
        if self._t_last is None:
            self._t_grid, self._t_last, self._a_last = t, t, amplitude
            self._push(amplitude)
            return
        if not t > self._t_last:
            return
        t0, a0 = self._t_last, self._a_last
        # Grid points are counted, never stepped by repeated addition (at |t| >= 2**49 s, g + dt == g). A step
        # longer than the history the regression reads has nothing to interpolate across: start afresh there.
        steps = math.floor((t - self._t_grid) / self.dt)
        if steps > self.m * self.lag + self.h + 1:
            self.reset()
            self.update(t, amplitude)
            return
        base = self._t_grid
        for k in range(1, steps + 1):
            g = base + k * self.dt
            self._push(a0 + (amplitude - a0) * (g - t0) / (t - t0))
            self._t_grid = g
        self._t_last, self._a_last = t, amplitude

    def predict(self) -> float:
        """Amplitude at (last sample time + horizon); the last value while untrained or for horizon 0."""
        if self.h == 0 or len(self._y) <= self.m * self.lag:
            return self._a_last
        if not np.all(np.isfinite(self.w)):  # numerically lost: start again rather than forecast garbage
            self.w[:] = 0.0
            self.P = np.eye(self.m) * _P0
        delta = float(self.w @ self._features(len(self._y) - 1))
        # No breath changes faster than max_rate_per_s: a larger forecast step is a fit gone wrong.
        return self._a_last + float(np.clip(delta, -self.max_delta, self.max_delta))
