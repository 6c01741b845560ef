"""Tests for breathcast.traces: synthetic traces, normalisation, rate and helical slice timing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from numpy.testing import assert_allclose

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.traces import (
    BreathingTrace,
    HelicalScan,
    ScanDirection,
    TraceConfig,
    axial_slice_positions_mm,
    build_trace,
    normalise_amplitude,
    per_slice_amplitude,
    per_slice_rate,
    rate,
    sample_trace_config,
    sample_trace_draws,
    synthetic_trace,
)


def upward_crossings(trace: BreathingTrace, level: float = 0.5, rearm: float = 0.3) -> np.ndarray:
    """Times the amplitude rises through ``level``, re-armed only after it falls below ``rearm`` (s)."""
    a, t = trace.amplitude, trace.time_s
    times, armed = [], False
    for i in range(1, a.size):
        armed = armed or a[i] < rearm
        if armed and a[i - 1] < level <= a[i]:
            times.append(t[i])
            armed = False
    return np.asarray(times)


def test_synthetic_trace_is_deterministic_from_seed():
    """The same seed gives the same trace; another seed a different one."""
    config = TraceConfig(duration_s=30.0)
    a, b, c = (synthetic_trace(config, seed) for seed in (7, 7, 8))
    assert np.array_equal(a.time_s, b.time_s) and np.array_equal(a.amplitude, b.amplitude)
    assert not np.allclose(a.amplitude, c.amplitude)
    assert len(a) == 750
    assert_allclose(np.diff(a.time_s), 1 / 25.0, rtol=0, atol=1e-12)


def test_build_is_sampling_free():
    """Building twice from the same draws gives the same curve (all randomness is in the draws)."""
    config = TraceConfig(duration_s=20.0)
    draws = sample_trace_draws(config, np.random.default_rng(0))
    assert np.array_equal(build_trace(config, draws).amplitude, build_trace(config, draws).amplitude)


def test_build_by_hand_matches_lujan_shape():
    """One hand-made cycle with no drift or noise follows b * cos^{2n}(pi (u' - 1/2)), then the pause."""
    config = TraceConfig(
        duration_s=6.0, sample_rate_hz=10.0, shape_n=1, inhale_fraction=0.25, drift_amplitude=0.0, noise_std=0.0
    )
    draws = replace(
        sample_trace_draws(config, np.random.default_rng(0)),
        start_offset_s=0.0,
        periods_s=np.array([4.0, 4.0]),
        peaks=np.array([2.0, 1.0]),
        pauses_s=np.array([1.0, 0.0]),
    )
    trace = build_trace(config, draws)
    # t = 0: end-exhale; t = 1 s (u = f = 0.25): peak; t = 0.5 s: u' = 1/4 -> 2 cos^2(pi/4) = 1;
    # t = 2 s: u' = 1/2 + 0.25 / 1.5 = 2/3 -> 2 cos^2(pi/6) = 1.5; t = 2.5 s: u' = 3/4 -> 2 cos^2(pi/4) = 1;
    # t = 4.5 s: pause at 0; t = 5.5 s: second cycle, u' = 1/4 -> 1 * cos^2(pi/4) = 0.5.
    expected = {0.0: 0.0, 0.5: 1.0, 1.0: 2.0, 2.0: 1.5, 2.5: 1.0, 4.5: 0.0, 5.5: 0.5}
    got = trace.amplitude_at(np.array(list(expected)))
    assert_allclose(got, list(expected.values()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape_n", [2, 3])
def test_shape_dwells_at_end_exhale(shape_n):
    """More samples sit near 0 (end-exhale) than near 1 (end-inhale); n = 1 (cos^2) is symmetric."""
    trace = synthetic_trace(TraceConfig(duration_s=120.0, shape_n=shape_n), seed=1)
    near_exhale = np.mean(trace.amplitude < 0.2)
    near_inhale = np.mean(trace.amplitude > 0.8)
    assert near_exhale > 1.5 * near_inhale


@pytest.mark.parametrize(
    ("mean_period_s", "pause_probability", "expected_period_s"),
    [
        (4.0, 0.0, 4.0),
        (3.0, 0.0, 3.0),
        (5.0, 0.0, 5.0),
        (4.0, 0.1, 4.0 + 0.1 * 2.0),  # pauses add p * mean pause (2 s) to the cycle-to-cycle interval
    ],
)
def test_mean_period_matches_config(mean_period_s, pause_probability, expected_period_s):
    """Counting upward crossings of 0.5 over 600 s recovers the configured period within 5 %."""
    config = TraceConfig(duration_s=600.0, mean_period_s=mean_period_s, pause_probability=pause_probability)
    crossings = upward_crossings(synthetic_trace(config, seed=2))
    measured = (crossings[-1] - crossings[0]) / (crossings.size - 1)
    assert_allclose(measured, expected_period_s, rtol=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("probability", "exceeds"), [(1.0, True), (0.0, False)])
def test_deep_breaths(seed, probability, exceeds):
    """Deep breaths (x1.4-1.8) exceed 1.3 when certain; without them no sample does."""
    config = TraceConfig(duration_s=120.0, deep_breath_probability=probability, drift_amplitude=0.02, noise_std=0.005)
    peak = synthetic_trace(config, seed).amplitude.max()
    assert (peak > 1.3) == exceeds


def test_normalise_amplitude_maps_percentiles():
    """The 5th and 95th percentiles of the output are exactly 0 and 1; levels are in raw units."""
    raw = 12.0 + 3.0 * synthetic_trace(TraceConfig(duration_s=60.0), seed=4).amplitude
    amplitude, exhale, inhale = normalise_amplitude(raw)
    assert_allclose(np.percentile(amplitude, [5, 95]), [0.0, 1.0], rtol=0, atol=1e-12)
    assert_allclose([exhale, inhale], np.percentile(raw, [5, 95]), rtol=0, atol=1e-12)
    assert_allclose(amplitude * (inhale - exhale) + exhale, raw, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("raw", "percentiles", "match"),
    [
        (np.ones(50), (5.0, 95.0), "flat between"),
        (np.array([0.0, np.nan, 1.0]), (5.0, 95.0), "finite"),
        (np.arange(10.0), (95.0, 5.0), "0 <= low < high <= 100"),
    ],
)
def test_normalise_amplitude_rejects(raw, percentiles, match):
    """Flat, non-finite or inverted-percentile input is refused with a reason."""
    with pytest.raises(BreathcastError, match=match):
        normalise_amplitude(raw, *percentiles)


@pytest.mark.parametrize(
    ("sample_rate_hz", "smoothing_window_s", "atol_inside", "atol_ends"),
    [
        (25.0, 0.2, 0.005, 0.01),  # Savitzky-Golay over 5 samples
        (25.0, 0.0, 0.005, 0.02),  # central differences (first order at the two ends)
        (10.0, 0.2, 0.02, 0.03),  # 3 samples (= central differences inside)
        (25.0, 0.6, 0.02, 0.06),  # 15 samples smooth a 4 s sine by ~2 %; the fit at the ends is biased more
    ],
)
def test_rate_of_sine_matches_derivative(sample_rate_hz, smoothing_window_s, atol_inside, atol_ends):
    """Rate of 0.5 + 0.5 sin(2 pi t / 4) is pi/4 cos(2 pi t / 4) within tolerance (1/s)."""
    t = np.arange(0.0, 20.0, 1.0 / sample_rate_hz)
    trace = BreathingTrace(t, 0.5 + 0.5 * np.sin(2 * np.pi * t / 4.0))
    expected = 0.5 * 2 * np.pi / 4.0 * np.cos(2 * np.pi * t / 4.0)
    got = rate(trace, smoothing_window_s)
    inside = slice(8, -8)  # beyond half of the widest window
    assert_allclose(got[inside], expected[inside], rtol=0, atol=atol_inside)
    assert_allclose(got, expected, rtol=0, atol=atol_ends)


def test_rate_of_non_uniform_trace():
    """Jittered sampling still gives the derivative (resampled to uniform for the filter)."""
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.03, 0.05, size=500))
    trace = BreathingTrace(t, np.sin(2 * np.pi * t / 4.0))
    expected = 2 * np.pi / 4.0 * np.cos(2 * np.pi * t / 4.0)
    assert_allclose(rate(trace), expected, rtol=0, atol=0.03)
    assert_allclose(rate(trace, 0.0), expected, rtol=0, atol=0.03)


def test_amplitude_and_rate_at():
    """Linear interpolation of amplitude; rate of a line is its slope everywhere."""
    t = np.linspace(0.0, 10.0, 101)
    trace = BreathingTrace(t, 0.3 * t - 1.0)
    times = np.array([0.0, 0.05, 3.33, 10.0])
    assert_allclose(trace.amplitude_at(times), 0.3 * times - 1.0, rtol=0, atol=1e-12)
    assert_allclose(trace.rate_at(times), 0.3, rtol=0, atol=1e-9)


@pytest.mark.parametrize("times", [np.array([-0.1]), np.array([5.0, 10.5]), np.array([np.nan])])
def test_amplitude_at_outside_trace_raises(times):
    """Asking outside the recorded time span is an error, not a silent clamp."""
    trace = BreathingTrace(np.linspace(0.0, 10.0, 11), np.zeros(11))
    with pytest.raises(BreathcastError, match="within the trace"):
        trace.amplitude_at(times)


@pytest.mark.parametrize(
    ("time_s", "amplitude", "match"),
    [
        (np.array([0.0, 1.0, 1.0]), np.zeros(3), "strictly increasing"),
        (np.array([0.0, 1.0]), np.zeros(3), r"both be \(N,\)"),
        (np.array([0.0]), np.zeros(1), "at least 2 samples"),
        (np.array([0.0, 1.0]), np.array([0.0, np.inf]), "finite"),
    ],
)
def test_breathing_trace_rejects(time_s, amplitude, match):
    """Malformed traces are refused with a reason."""
    with pytest.raises(BreathcastError, match=match):
        BreathingTrace(time_s, amplitude)


@pytest.mark.parametrize(
    ("scan", "positions_mm", "expected_s"),
    [
        # 1.0 * 40 mm / 0.5 s = 80 mm/s; superior-most (100 mm) first.
        (
            HelicalScan(rotation_time_s=0.5, pitch=1.0, collimation_mm=40.0, start_time_s=1.0),
            [100.0, 50.0, 0.0],
            [1.0, 1.625, 2.25],
        ),
        # Same scan feet first: 0 mm first.
        (
            HelicalScan(
                rotation_time_s=0.5, pitch=1.0, collimation_mm=40.0, start_time_s=1.0, direction="caudo-cranial"
            ),
            [100.0, 50.0, 0.0],
            [2.25, 1.625, 1.0],
        ),
        # Table speed given directly; positions unsorted.
        (HelicalScan.with_table_speed(100.0, start_time_s=2.0), [10.0, 30.0, -20.0], [2.2, 2.0, 2.5]),
        (HelicalScan.with_table_speed(100.0, 2.0, ScanDirection.CAUDO_CRANIAL), [10.0, 30.0, -20.0], [2.3, 2.5, 2.0]),
        # Defaults: 1.2 * 38.4 / 0.28 = 164.571428... mm/s; 82.2857 mm takes 0.5 s.
        (HelicalScan(), [0.0, -82.28571428571429, -164.57142857142858], [0.0, 0.5, 1.0]),
    ],
)
def test_helical_slice_times(scan, positions_mm, expected_s):
    """Slice acquisition times match hand-computed values to 1 ms in both directions."""
    assert_allclose(scan.slice_times(np.array(positions_mm)), expected_s, rtol=0, atol=1e-3)


def test_helical_defaults_table_speed():
    """Default table speed is pitch x collimation / rotation time."""
    assert_allclose(HelicalScan().table_speed_mm_s, 1.2 * 38.4 / 0.28, rtol=1e-12)
    assert_allclose(HelicalScan.with_table_speed(55.0).table_speed_mm_s, 55.0, rtol=1e-12)


def test_per_slice_trace_of_a_grid():
    """Per-slice amplitude and rate are the trace at each slice's time (one value per axial slice)."""
    grid = Grid((5, 4, 4), spacing=(1.0, 1.0, 10.0), origin=(0.0, 0.0, -20.0))
    positions = axial_slice_positions_mm(grid)
    assert_allclose(positions, [-20.0, -10.0, 0.0, 10.0, 20.0], rtol=0, atol=1e-12)
    scan = HelicalScan.with_table_speed(20.0, start_time_s=1.0)  # 0.5 s per slice, top slice first
    times = scan.slice_times(positions)
    assert_allclose(times, [3.0, 2.5, 2.0, 1.5, 1.0], rtol=0, atol=1e-12)
    t = np.linspace(0.0, 5.0, 126)
    trace = BreathingTrace(t, 0.2 * t)
    assert_allclose(per_slice_amplitude(trace, times), 0.2 * times, rtol=0, atol=1e-12)
    assert_allclose(per_slice_rate(trace, times), 0.2, rtol=0, atol=1e-9)
    assert per_slice_amplitude(trace, times).shape == (grid.shape[0],)


def test_sample_trace_config_is_deterministic_and_valid():
    """Per-patient configs come from the generator alone and keep duration and rate."""
    base = TraceConfig(duration_s=42.0, sample_rate_hz=10.0)
    a = sample_trace_config(np.random.default_rng(5), base)
    b = sample_trace_config(np.random.default_rng(5), base)
    assert a == b
    assert (a.duration_s, a.sample_rate_hz) == (42.0, 10.0)
    assert 3.0 <= a.mean_period_s <= 5.5 and a.shape_n in (1, 2, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"duration_s": 0.0}, "duration_s must be positive, got 0.0"),
        ({"duration_s": -5.0}, "duration_s must be positive, got -5.0"),
        ({"mean_period_s": 0.0}, "mean_period_s must be positive, got 0.0"),
        ({"sample_rate_hz": -1.0}, "sample_rate_hz must be positive, got -1.0"),
        ({"duration_s": float("nan")}, "duration_s must be a finite number"),
        ({"shape_n": 4}, r"shape_n must be an integer in 1\.\.3, got 4"),
        ({"inhale_fraction": 1.0}, r"inhale_fraction must be in \(0.0, 1.0\), got 1.0"),
        ({"period_cv": 0.5}, r"period_cv must be in \[0.0, 0.35\], got 0.5"),
        ({"pause_probability": 1.5}, r"pause_probability must be in \[0.0, 1.0\], got 1.5"),
        ({"deep_breath_scale": (0.5, 1.5)}, "deep_breath_scale must satisfy 1.0 <= low <= high"),
        ({"noise_std": -0.1}, "noise_std must be >= 0, got -0.1"),
        ({"duration_s": 0.01}, "at least 2 samples"),
    ],
)
def test_trace_config_rejects(kwargs, match):
    """Bad configuration is refused, naming the field, the expectation and the value."""
    with pytest.raises(BreathcastError, match=match):
        TraceConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rotation_time_s": 0.0}, "rotation_time_s must be positive, got 0.0"),
        ({"pitch": -1.0}, "pitch must be positive, got -1.0"),
        ({"table_speed_override_mm_s": 0.0}, "table_speed_override_mm_s must be positive, got 0.0"),
        ({"direction": "sideways"}, "scan direction must be one of 'cranio-caudal', 'caudo-cranial', got 'sideways'"),
    ],
)
def test_helical_scan_rejects(kwargs, match):
    """Bad scan settings are refused with a reason."""
    with pytest.raises(BreathcastError, match=match):
        HelicalScan(**kwargs)
