"""Latency compensation: the forecast error at 100 / 300 / 500 ms on the real marker recordings (issue 5).

Every recording in ``../shared/data/traces/extmarker`` (optical markers, 10 Hz; see its README) is calibrated with
:func:`breathcast.calibration.surrogate.calibrate_surrogate` (principal axis, inhale-positive, 0 = end-exhale,
1 = end-inhale), then fed sample by sample to the daemon's :class:`~breathcast.stream.forecast.RlsForecaster`. After
a 20 s warm-up, each forecast for t + h is compared with the recording at t + h (linear interpolation; targets inside
dropouts are skipped). The baseline is no prediction (the last sample). Errors are RMS and 95th percentile of the
absolute error, in amplitude units and in mm along the marker's principal axis.

    python benchmarks/bench_forecast.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, update_readme_table, write_results  # noqa: E402

from breathcast.calibration.readers import read_recording  # noqa: E402
from breathcast.calibration.surrogate import calibrate_surrogate  # noqa: E402
from breathcast.stream.config import ForecastConfig  # noqa: E402
from breathcast.stream.forecast import RlsForecaster  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "traces" / "extmarker"
HORIZONS_S = (0.1, 0.3, 0.5)
WARMUP_S = 20.0


def evaluate(time_s: np.ndarray, amplitude: np.ndarray, horizon_s: float, config: ForecastConfig) -> tuple[np.ndarray, np.ndarray]:
    """(forecast errors, no-prediction errors) in amplitude units for every usable sample."""
    forecaster = RlsForecaster(horizon_s, config)
    errors, hold = [], []
    gaps = np.diff(time_s)
    for k in range(time_s.size):
        forecaster.update(time_s[k], amplitude[k])
        t = time_s[k] + horizon_s
        if time_s[k] - time_s[0] < WARMUP_S or t > time_s[-1]:
            continue
        j = int(np.searchsorted(time_s, t))
        if gaps[max(j - 1, 0)] > 0.25:  # the truth would be interpolated over a dropout
            continue
        truth = np.interp(t, time_s, amplitude)
        errors.append(forecaster.predict() - truth)
        hold.append(amplitude[k] - truth)
    return np.asarray(errors), np.asarray(hold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of marker recordings")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    files = sorted(args.data.glob("*.csv"))
    if not files:
        raise SystemExit(f"no recordings in {args.data}")
    config = ForecastConfig()
    per_file, pooled = [], {h: {"rls": [], "hold": [], "rls_mm": [], "hold_mm": []} for h in HORIZONS_S}
    for path in files:
        recording = read_recording(path)
        result = calibrate_surrogate(recording)
        cal = result.calibration
        ok = recording.valid
        t, a = recording.time_s[ok], cal.apply_array(recording.values[ok])
        mm_per_unit = cal.inhale_level - cal.exhale_level
        row = {"file": path.name, "samples": int(t.size), "duration_s": float(t[-1] - t[0]), "mm_per_amplitude": mm_per_unit}
        for h in HORIZONS_S:
            e, b = evaluate(t, a, h, config)
            row[f"rmse_{int(h * 1000)}ms"] = float(np.sqrt(np.mean(e**2)))
            row[f"rmse_hold_{int(h * 1000)}ms"] = float(np.sqrt(np.mean(b**2)))
            pooled[h]["rls"].append(e)
            pooled[h]["hold"].append(b)
            pooled[h]["rls_mm"].append(e * mm_per_unit)
            pooled[h]["hold_mm"].append(b * mm_per_unit)
        per_file.append(row)
        print(f"{path.name}: " + ", ".join(f"{int(h * 1000)} ms RMSE {row[f'rmse_{int(h * 1000)}ms']:.3f} "
                                           f"(hold {row[f'rmse_hold_{int(h * 1000)}ms']:.3f})" for h in HORIZONS_S), flush=True)  # fmt: skip
    summary, rows = {}, []
    for h in HORIZONS_S:
        e, b = np.concatenate(pooled[h]["rls"]), np.concatenate(pooled[h]["hold"])
        emm, bmm = np.concatenate(pooled[h]["rls_mm"]), np.concatenate(pooled[h]["hold_mm"])
        s = {"rmse": float(np.sqrt(np.mean(e**2))), "p95_abs": float(np.percentile(np.abs(e), 95)),
             "rmse_mm": float(np.sqrt(np.mean(emm**2))), "p95_abs_mm": float(np.percentile(np.abs(emm), 95)),
             "hold_rmse": float(np.sqrt(np.mean(b**2))), "hold_p95_abs": float(np.percentile(np.abs(b), 95)),
             "hold_rmse_mm": float(np.sqrt(np.mean(bmm**2))), "samples": int(e.size)}  # fmt: skip
        s["relative_rmse"] = s["rmse"] / s["hold_rmse"]
        summary[f"{int(h * 1000)}ms"] = s
        rows.append({"horizon (ms)": int(h * 1000), "RLS RMSE (amplitude)": f"{s['rmse']:.3f}", "RLS RMSE (mm)": f"{s['rmse_mm']:.2f}",
                     "RLS p95 (mm)": f"{s['p95_abs_mm']:.2f}", "no prediction RMSE (amplitude)": f"{s['hold_rmse']:.3f}",
                     "no prediction RMSE (mm)": f"{s['hold_rmse_mm']:.2f}", "RLS / no prediction": f"{s['relative_rmse']:.2f}",
                     "samples": s["samples"]})  # fmt: skip
    table = markdown_table(rows, list(rows[0]))
    table += f"\n\n{len(files)} real marker recordings (extmarker, 10 Hz), each calibrated on itself; {WARMUP_S:.0f} s warm-up."
    path = write_results("forecast", {"config": vars(config) if hasattr(config, "__dict__") else {}, "horizons_s": HORIZONS_S,
                                      "summary": summary, "files": per_file, "table": table})  # fmt: skip
    print(table)
    print(f"wrote {path}")
    if not args.no_readme:
        try:
            update_readme_table("forecast", table)
        except SystemExit as exc:
            print(f"README not updated: {exc}")


if __name__ == "__main__":
    main()
