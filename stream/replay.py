"""Traces to replay into the daemon, and the sender that paces them (real time or N times faster).

Sources: a CSV of amplitudes, a session log (its accepted samples), a simulated breathing trace, or one of the
real optical-marker recordings (``../shared/data/traces/extmarker``) turned into amplitude by the surrogate
calibration (:mod:`breathcast.calibration.surrogate`), or sent raw for the daemon to calibrate.

Source timestamps are the recording's own; ``speed`` only changes how fast they are sent.

Example:
    >>> tr = simulated_trace(seed=0, duration_s=10.0, rate_hz=25.0)
    >>> len(tr), round(float(tr.time_s[1] - tr.time_s[0]), 3)
    (250, 0.04)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breathcast.errors import BreathcastError

__all__ = ["ReplayTrace", "csv_trace", "session_log_trace", "simulated_trace", "marker_trace", "load_trace", "replay"]


@dataclass(frozen=True)
class ReplayTrace:
    """Samples to send.

    Args:
        time_s: (N,) source times, s, increasing.
        amplitude: (N,) normalised amplitude, or None when ``raw`` is sent.
        raw: (N,) or (N, 3) raw surrogate values, or None.
        valid: (N,) bool.
        name: where it came from.
    """

    time_s: np.ndarray
    amplitude: np.ndarray | None
    raw: np.ndarray | None
    valid: np.ndarray
    name: str = ""

    def __len__(self) -> int:
        return int(self.time_s.size)

    def limited(self, duration_s: float | None) -> ReplayTrace:
        """The first ``duration_s`` seconds (all when None)."""
        if duration_s is None:
            return self
        keep = self.time_s - self.time_s[0] <= duration_s
        return ReplayTrace(self.time_s[keep], None if self.amplitude is None else self.amplitude[keep],
                           None if self.raw is None else self.raw[keep], self.valid[keep], self.name)  # fmt: skip


def csv_trace(path: Path | str, time_column: str = "time", amplitude_column: str = "amplitude", separator: str | None = None,
              decimal: str = ".", time_unit: str = "s") -> ReplayTrace:  # fmt: skip
    """A CSV with a time column and a normalised-amplitude column."""
    from breathcast.calibration.readers import CsvLayout, read_csv

    rec = read_csv(Path(path), CsvLayout(time_column=time_column, value_columns=(amplitude_column,), separator=separator,
                                         decimal=decimal, time_unit=time_unit))  # fmt: skip
    return ReplayTrace(rec.time_s, np.asarray(rec.values, float).reshape(-1), None, rec.valid, str(path))


def session_log_trace(path: Path | str) -> ReplayTrace:
    """The accepted samples of a session log (as the daemon calibrated them)."""
    from breathcast.stream.recording import read_session_log

    samples = read_session_log(path).of_type("sample")
    if not samples:
        raise BreathcastError(f"{path}: the session log holds no accepted samples")
    t = np.array([s["t"] for s in samples], float)
    a = np.array([s["amplitude"] for s in samples], float)
    return ReplayTrace(t, a, None, np.ones(t.size, bool), str(path))


def simulated_trace(seed: int = 0, duration_s: float = 60.0, rate_hz: float = 25.0) -> ReplayTrace:
    """A synthetic irregular breathing trace (:func:`breathcast.traces.synthetic_trace`) sampled at ``rate_hz``."""
    from breathcast.traces import TraceConfig, synthetic_trace

    if not (rate_hz > 0 and duration_s > 0):
        raise BreathcastError("simulated trace needs rate_hz > 0 and duration_s > 0")
    trace = synthetic_trace(TraceConfig(duration_s=duration_s + 1.0), seed=seed)
    t = trace.time_s[0] + np.arange(int(duration_s * rate_hz)) / rate_hz
    return ReplayTrace(t, trace.amplitude_at(t), None, np.ones(t.size, bool), f"simulated seed {seed}")


def marker_trace(path: Path | str, calibration: Path | str | None = None, send_raw: bool = False) -> ReplayTrace:
    """A real optical-marker recording: calibrated here (its own calibration, or ``calibration``), or sent raw."""
    from breathcast.calibration.readers import read_recording
    from breathcast.calibration.surrogate import SurrogateCalibration, calibrate_surrogate

    rec = read_recording(Path(path))
    if send_raw:
        return ReplayTrace(rec.time_s, None, rec.values, rec.valid, str(path))
    cal = SurrogateCalibration.load(Path(calibration)) if calibration else calibrate_surrogate(rec).calibration
    amplitude = cal.apply_array(rec.values)
    return ReplayTrace(rec.time_s, amplitude, None, rec.valid, str(path))


def load_trace(source: str, fmt: str | None = None, calibration: str | None = None, send_raw: bool = False,
               rate_hz: float = 25.0, duration_s: float | None = None) -> ReplayTrace:  # fmt: skip
    """A trace from ``source``: ``simulated[:SEED]``, a session log (.bclog), a marker file or a CSV."""
    if fmt is None:
        if source.startswith("simulated"):
            fmt = "simulated"
        elif source.endswith(".bclog"):
            fmt = "log"
        else:
            from breathcast.calibration.readers import guess_format

            fmt = "marker" if guess_format(Path(source)).value == "marker" else "csv"
    if fmt == "simulated":
        seed = int(source.split(":", 1)[1]) if ":" in source else 0
        return simulated_trace(seed, duration_s or 60.0, rate_hz)
    if fmt == "log":
        trace = session_log_trace(source)
    elif fmt == "marker":
        trace = marker_trace(source, calibration, send_raw)
    elif fmt == "csv":
        trace = csv_trace(source)
    else:
        raise BreathcastError(f"unknown trace format {fmt!r}; use simulated, log, marker or csv")
    return trace.limited(duration_s)


def replay(sender, trace: ReplayTrace, speed: float = 1.0, start_seq: int = 0, stop: threading.Event | None = None,
           on_sent=None, source: str | None = None) -> int:  # fmt: skip
    """Send ``trace`` through a :class:`~breathcast.stream.client.SampleSender`, paced by its source times / ``speed``.

    Args:
        speed: 1 = real time, N = N times faster, 0 = as fast as possible.
        on_sent: called as ``on_sent(seq, t_source, t_sent)`` after each sample.
        source: sent as every sample's ``source`` (a new name restarts the daemon's window).

    Returns:
        The next free seq.
    """
    if speed < 0:
        raise BreathcastError(f"speed must be >= 0, got {speed}")
    t0_source, t0 = float(trace.time_s[0]), time.perf_counter()
    seq = start_seq
    for k in range(len(trace)):
        if stop is not None and stop.is_set():
            break
        if speed > 0:
            due = t0 + (trace.time_s[k] - t0_source) / speed
            while (delay := due - time.perf_counter()) > 0:
                time.sleep(min(delay, 0.05) if delay > 0.002 else 0)
        a = None if trace.amplitude is None else float(trace.amplitude[k])
        raw = None if trace.raw is None else trace.raw[k]
        if raw is not None and not np.all(np.isfinite(raw)):
            raw = np.nan_to_num(raw)  # msgpack carries NaN, but the sample is marked invalid anyway
        t_sent = sender.send(seq, float(trace.time_s[k]), a, raw, bool(trace.valid[k]), source=source)
        if on_sent is not None:
            on_sent(seq, float(trace.time_s[k]), t_sent)
        seq += 1
    return seq
