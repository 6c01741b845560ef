"""The calibration report of one recording (printed and as a PNG), and writing calibration + report together.

:func:`write_calibration` renders everything first and renames into place last, so a failure leaves no
half-written calibration file or figure behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from breathcast.calibration.surrogate import CalibrationResult
from breathcast.errors import BreathcastError

__all__ = ["format_summary", "plot_calibration", "write_calibration"]


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{format(value, spec)}{unit}"


def format_summary(summary: dict[str, Any]) -> str:
    """The report's numbers as a few lines of text (what ``breathcast calibrate surrogate`` prints).

    Example:
        >>> print(format_summary({"file": "a.csv", "format": "marker", "duration_s": 60.0, "cycles": 12, "period_s": 5.0,
        ...     "period_cv": 0.1, "amplitude_raw": 10.0, "amplitude_cv": 0.2, "irregularity": 0.22, "raw_units": "mm",
        ...     "drift_raw_per_min": 0.5, "drift_amplitude_per_min": 0.05, "spikes": 1, "dropouts": 0,
        ...     "dropout_total_s": 0.0, "invalid_samples": 0, "timestamps_repaired": 0}).splitlines()[1])
          cycles 12, period 5.00 s (cv 0.10), amplitude 10.00 mm (cv 0.20), irregularity 0.22
    """
    units = summary.get("raw_units", "")
    return "\n".join([
        f"{summary.get('file') or 'recording'} ({summary.get('format')}, {summary.get('duration_s', 0):.1f} s):",
        f"  cycles {summary.get('cycles')}, period {_fmt(summary.get('period_s'), '.2f', ' s')} (cv {_fmt(summary.get('period_cv'), '.2f')}), "
        f"amplitude {_fmt(summary.get('amplitude_raw'), '.2f', ' ' + units)} (cv {_fmt(summary.get('amplitude_cv'), '.2f')}), "
        f"irregularity {_fmt(summary.get('irregularity'), '.2f')}",
        f"  drift {_fmt(summary.get('drift_raw_per_min'), '+.2f', f' {units}/min')} "
        f"({_fmt(summary.get('drift_amplitude_per_min'), '+.3f')} amplitude/min)",
        f"  spikes removed {summary.get('spikes', 0)}, dropouts {summary.get('dropouts', 0)} "
        f"({_fmt(summary.get('dropout_total_s'), '.1f', ' s')} in all), invalid samples {summary.get('invalid_samples', 0)}, "
        f"timestamps repaired {summary.get('timestamps_repaired', 0)}",
    ])  # fmt: skip


def plot_calibration(result: CalibrationResult, path: Path) -> Path:
    """Draw the report: the projected raw signal with cycles, spikes and dropouts; the normalised amplitude."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    cal, c, rec = result.calibration, result.cycles, result.recording
    fig, axes = plt.subplots(2, 1, figsize=(14, 7), sharex=True, layout="constrained")
    ax = axes[0]
    ax.plot(result.time_s, result.projected, lw=0.8, color="C0", label="projected signal (inhale up)")
    if np.any(result.drift):
        ax.plot(result.time_s, result.drift + cal.exhale_level, lw=1.0, color="C2", label="end-exhale baseline (drift)")
    ax.plot(c.peak_times_s, c.peak_values, "v", color="C3", ms=5, label=f"end-inhale ({c.count} breaths)")
    ax.plot(c.trough_times_s, c.trough_values, "^", color="C1", ms=5, label="end-exhale")
    raw = rec.values.reshape(len(rec), -1)
    if result.spike_times_s.size:
        idx = np.searchsorted(rec.time_s, result.spike_times_s)
        projected = (raw[idx] - np.asarray(cal.centre)) @ np.asarray(cal.axis)
        ax.plot(result.spike_times_s, projected, "x", color="k", ms=7, label=f"spikes removed ({result.spike_times_s.size})")
    for i, (start, end) in enumerate(result.dropouts):
        for a in axes:
            a.axvspan(start, end, color="0.8", label="dropout" if (i == 0 and a is ax) else None)
    ax.axhline(cal.exhale_level, color="C1", ls=":", lw=0.8)
    ax.axhline(cal.inhale_level, color="C3", ls=":", lw=0.8)
    ax.set_ylabel(f"raw along the principal axis ({rec.units})")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    s = cal.summary
    ax.set_title(
        f"{s.get('file') or 'recording'}: {c.count} breaths, period {_fmt(s.get('period_s'), '.2f', ' s')}, "
        f"amplitude {_fmt(s.get('amplitude_raw'), '.2f', ' ' + rec.units)}, irregularity {_fmt(s.get('irregularity'), '.2f')}, "
        f"drift {_fmt(s.get('drift_raw_per_min'), '+.2f', ' ' + rec.units + '/min')}"
    )
    ax = axes[1]
    ax.plot(result.time_s, result.amplitude, lw=0.8, color="C0")
    ax.axhline(0.0, color="C1", ls="--", lw=0.8, label="0: typical end-exhale")
    ax.axhline(1.0, color="C3", ls="--", lw=0.8, label="1: typical end-inhale")
    ax.set_ylabel("amplitude (dimensionless)")
    ax.set_xlabel("time (s)")
    ax.legend(loc="upper right", fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


def write_calibration(result: CalibrationResult, out: Path, report_png: Path | None = None) -> list[Path]:
    """Write the calibration JSON (and the report PNG): both rendered to temporary files, renamed last.

    Returns:
        The paths written.
    """
    out = Path(out)
    targets = [out] + ([Path(report_png)] if report_png is not None else [])
    for target in targets:
        if not target.parent.is_dir():
            raise BreathcastError(f"cannot write {target}: folder {target.parent} does not exist")
    tmp_png = None
    try:
        if report_png is not None:
            tmp_png = Path(report_png).with_name(f".{Path(report_png).name}.tmp")
            plot_calibration(result, tmp_png)
        result.calibration.save(out)  # atomic on its own
        if tmp_png is not None:
            os.replace(tmp_png, report_png)
    except OSError as exc:
        raise BreathcastError(f"cannot write the calibration report: {exc.strerror or exc}") from None
    finally:
        if tmp_png is not None and tmp_png.exists():
            tmp_png.unlink()
    return targets
