"""Helical slice-time alignment: known synthetic scans to 1 ms, TTL edges, and scan parameters that cannot be right."""

from __future__ import annotations

import numpy as np
import pytest

from breathcast.calibration.alignment import ScanParameters, align_scan, xray_on_edges
from breathcast.errors import BreathcastError
from breathcast.traces import BreathingTrace

V = 1.0 * 38.4 / 0.28  # table speed of the simulator's protocol, mm/s (137.142857...)


def trace(duration_s: float = 60.0, rate_hz: float = 25.0) -> BreathingTrace:
    t = np.arange(0.0, duration_s, 1.0 / rate_hz)
    return BreathingTrace(t, np.sin(np.pi * t / 4.0) ** 2)


@pytest.mark.parametrize("direction", ["cranio-caudal", "caudo-cranial"])
def test_known_helical_scan_slice_times_to_1ms(direction):
    """64 slices 5 mm apart at 137.14 mm/s, X-ray on at 12.36 s, first slice 0.25 s later: times to 1 ms."""
    tr = trace()
    xray = (tr.time_s >= 12.36 - 1e-9) & (tr.time_s < 20.0)
    scan = ScanParameters(rotation_time_s=0.28, pitch=1.0, collimation_mm=38.4, slice_spacing_mm=5.0, n_slices=64,
                          first_slice_mm=-157.5, scan_start_s=0.25, direction=direction)  # fmt: skip
    aligned = align_scan(tr, scan, xray_on=xray)
    z = -157.5 + 5.0 * np.arange(64)
    # By hand: the first slice in scan order is the most superior (cranio-caudal) or the most inferior one.
    distance = (z.max() - z) if direction == "cranio-caudal" else (z - z.min())
    expected = 12.36 + 0.25 + distance / V
    np.testing.assert_allclose(aligned.slice_times_s, expected, rtol=0, atol=1e-3)
    assert aligned.xray_on_s == pytest.approx(12.36)
    assert aligned.slice_times_s.max() - aligned.slice_times_s.min() == pytest.approx(315.0 / V, abs=1e-3)  # 2.297 s
    np.testing.assert_allclose(aligned.amplitude, np.sin(np.pi * expected / 4.0) ** 2, atol=2e-3)
    np.testing.assert_allclose(aligned.rate, np.pi / 4.0 * np.sin(np.pi * expected / 2.0), atol=0.02)


def test_table_speed_and_explicit_positions_and_offset():
    """Table speed given directly, positions listed in any order, no TTL: the offset places the scan."""
    scan = ScanParameters(table_speed_mm_s=100.0, slice_positions_mm=(20.0, 0.0, 10.0), direction="caudo-cranial")
    aligned = align_scan(trace(), scan, offset_s=3.0)
    np.testing.assert_allclose(aligned.slice_times_s, [3.2, 3.0, 3.1], atol=1e-9)
    assert aligned.xray_on_s is None


def test_second_scan_uses_second_xray_edge():
    """Scan k of a session is placed at the k-th X-ray-on edge."""
    tr = trace()
    on = ((tr.time_s >= 5.0) & (tr.time_s < 8.0)) | ((tr.time_s >= 30.0) & (tr.time_s < 33.0))
    assert xray_on_edges(tr.time_s, on).tolist() == [5.0, 30.0]
    aligned = align_scan(tr, ScanParameters(table_speed_mm_s=100.0, slice_spacing_mm=10.0, n_slices=2), xray_on=on, scan_index=1)
    np.testing.assert_allclose(sorted(aligned.slice_times_s), [30.0, 30.1], atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pitch=-1.0), "pitch must be a positive number"),
        (dict(rotation_time_s=0.0), "rotation_time_s must be a positive number"),
        (dict(collimation_mm=float("nan")), "collimation_mm must be a positive number"),
        (dict(table_speed_mm_s=-5.0), "table_speed_mm_s must be a positive number"),
        (dict(slice_spacing_mm=0.0), "slice_spacing_mm must be a positive number"),
        (dict(n_slices=0), "n_slices must be a positive integer"),
        (dict(direction="sideways"), "scan direction must be one of"),
        (dict(pitch=50.0), "not a real scanner's"),
        (dict(slice_positions_mm=(1.0, 1.0)), "same position twice"),
    ],
)
def test_impossible_scan_parameters(kwargs, match):
    """Scan parameters that cannot be right: a one-line error naming the parameter."""
    with pytest.raises(BreathcastError, match=match) as info:
        ScanParameters(**kwargs)
    assert "\n" not in str(info.value)


def test_scan_outside_the_trace_and_ttl_without_edge():
    """A scan longer than the trace, a scan placed after it, a TTL column that never switches on: clear errors."""
    tr = trace(duration_s=10.0)
    slow = ScanParameters(table_speed_mm_s=10.0, slice_spacing_mm=5.0, n_slices=64)  # 31.5 s long
    with pytest.raises(BreathcastError, match="outside the trace's 0.000 to 9.960 s"):
        align_scan(tr, slow, offset_s=0.0, where="belt.csv")
    with pytest.raises(BreathcastError, match="belt.csv: the scan runs from 12.000"):
        align_scan(tr, ScanParameters(n_slices=4), offset_s=12.0, where="belt.csv")
    with pytest.raises(BreathcastError, match="X-ray-on \\(TTL\\) column never switches on"):
        align_scan(tr, ScanParameters(n_slices=4), xray_on=np.zeros(tr.time_s.size, bool))
    with pytest.raises(BreathcastError, match="scan 3 asked for"):
        align_scan(tr, ScanParameters(n_slices=4), xray_on=tr.time_s > 2.0, scan_index=3)
