"""Stream building blocks without a daemon: protocol, config, window fail-safe rules, forecast, session log, replay."""

from __future__ import annotations

import math
import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breathcast.engine.package import TraceSpec
from breathcast.errors import BreathcastError
from breathcast.stream.config import ForecastConfig, SafetyConfig, config_from_dict, is_loopback, load_config
from breathcast.stream.forecast import RlsForecaster
from breathcast.stream.protocol import (
    MAX_INPUT_BYTES,
    HoldReason,
    ProtocolError,
    Sample,
    decode_array,
    encode_batch,
    encode_sample,
    parse_input,
)
from breathcast.stream.recording import MAGIC, SessionLog, read_session_log
from breathcast.stream.replay import load_trace, simulated_trace
from breathcast.stream.window import RollingWindow
from stream_fixtures import tiny_package, tiny_plan  # noqa: F401  (fixtures)

TRACE = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=16)


# -- protocol ---------------------------------------------------------------------------------------------------


def test_sample_and_batch_round_trip():
    """A sample and a batch decode to the values sent."""
    (s,) = parse_input(encode_sample(3, 1.5, amplitude=0.25, valid=False, t_sent=9.0, source="belt"))
    assert s == Sample(3, 1.5, 0.25, None, False, 9.0, "belt")
    batch = parse_input(encode_batch([{"seq": k, "t_source": 0.1 * k, "raw": [1.0, 2.0, 3.0]} for k in range(5)]))
    assert [b.seq for b in batch] == list(range(5)) and batch[0].raw == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\xc1", "not_msgpack"),
        (msgpack.packb([1, 2]), "malformed"),
        (msgpack.packb({"v": 2, "type": "sample"}), "bad_version"),
        (msgpack.packb({"v": 1, "type": "nope"}), "unknown_type"),
        (msgpack.packb({"v": 1, "type": "sample", "seq": "1", "t": 0.0, "amplitude": 0.1}), "bad_type"),
        (msgpack.packb({"v": 1, "type": "sample", "seq": 1, "t": 0.0}), "bad_type"),
        (msgpack.packb({"v": 1, "type": "sample", "seq": 1, "t": math.inf, "amplitude": 0.1}), "bad_value"),
        (msgpack.packb({"v": 1, "type": "batch", "samples": []}), "bad_type"),
        (b"\x00" * (MAX_INPUT_BYTES + 1), "too_large"),
    ],
)
def test_malformed_input_is_refused_with_its_code(message, code):
    """Each kind of malformed input gets its documented code."""
    with pytest.raises(ProtocolError, match=code) as info:
        parse_input(message)
    assert info.value.code == code


INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048),
                 st.recursive(st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=20),
                              lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
                              max_leaves=20).map(lambda o: msgpack.packb(o)),
                 st.fixed_dictionaries({"v": st.just(1), "type": st.sampled_from(["sample", "batch"])},
                                       optional={"seq": INTS | st.floats() | st.text(), "t": st.floats() | st.none(),
                                                 "amplitude": st.floats() | st.text(), "raw": st.lists(st.floats(), max_size=4),
                                                 "samples": st.lists(st.dictionaries(st.text(max_size=6), INTS | st.floats(), max_size=4), max_size=3)})
                 .map(lambda o: msgpack.packb(o))))  # fmt: skip
def test_garbage_input_raises_only_protocol_errors(data):
    """Any bytes either parse into samples or raise ProtocolError, nothing else."""
    try:
        samples = parse_input(data)
    except ProtocolError:
        return
    assert all(isinstance(s, Sample) for s in samples)


def test_array_decoding_checks_dtype_and_size():
    """Arrays decode only with an allowed dtype and the exact byte count."""
    a = np.arange(6, dtype="<f2").reshape(2, 3)
    np.testing.assert_array_equal(decode_array({"dtype": "<f2", "shape": [2, 3]}, a.tobytes()), a)
    with pytest.raises(ProtocolError, match="bad_array"):
        decode_array({"dtype": "|O", "shape": [2, 3]}, a.tobytes())
    with pytest.raises(ProtocolError, match="needs 24"):
        decode_array({"dtype": "<f4", "shape": [2, 3]}, a.tobytes())


# -- config -----------------------------------------------------------------------------------------------------


def test_toml_and_overrides(tmp_path):
    """A TOML file is read, flags override it, and bad values are refused with the key named."""
    path = tmp_path / "serve.toml"
    path.write_text('path = "direct"\nforecast_horizon_s = 0.2\n[field]\ndtype = "float16"\nshape = [8, 8, 8]\n')
    cfg = load_config(path, {"field": {"dtype": "float32"}})
    assert (cfg.path, cfg.forecast_horizon_s, cfg.field.dtype, cfg.field.shape) == ("direct", 0.2, "float32", (8, 8, 8))
    with pytest.raises(BreathcastError, match="config: unknown key nope"):
        config_from_dict({"nope": 1})
    with pytest.raises(BreathcastError, match="config: threads must be an integer"):
        config_from_dict({"threads": "2"})
    with pytest.raises(BreathcastError, match="not loopback"):
        config_from_dict({"endpoints": {"input": "tcp://0.0.0.0:5560"}})


@pytest.mark.parametrize(("endpoint", "loopback"), [("tcp://127.0.0.1:1", True), ("tcp://localhost:1", True),
                                                    ("ipc:///tmp/x", True), ("tcp://10.0.0.2:1", False), ("tcp://*:1", False)])  # fmt: skip
def test_loopback_detection(endpoint, loopback):
    """Only loopback endpoints count as loopback."""
    assert is_loopback(endpoint) is loopback


# -- window fail-safe rules ----------------------------------------------------------------------------------------


def _full_window(rate_hz: float = 50.0, seconds: float = 3.0) -> tuple[RollingWindow, int, float]:
    w = RollingWindow(TRACE, SafetyConfig(max_gap_s=0.25, reorder_hold_s=0.5, restart_after=5, stuck_after_s=0.0))
    n = int(seconds * rate_hz)
    for k in range(n):
        assert w.add(Sample(k, k / rate_hz, 0.3), 0.3, now=0.0) is None
    return w, n, (n - 1) / rate_hz


def test_window_resamples_onto_the_model_time_base():
    """A linear ramp sent at 25 Hz comes out as the same ramp on the 5.1 ms time base."""
    w = RollingWindow(TRACE)
    for k in range(80):
        w.add(Sample(k, k * 0.04, 0.0), 0.1 * k * 0.04, now=0.0)
    assert w.full and w.reasons(0.0) == []
    t = 79 * 0.04 - TRACE.window_duration_s + np.arange(448) * TRACE.sample_interval_s
    np.testing.assert_allclose(w.window(), 0.1 * t, atol=1e-12)


def test_window_not_full_until_it_spans_the_scan():
    """Fewer than 2.3 s of samples hold with window_not_full."""
    w = RollingWindow(TRACE)
    for k in range(50):  # 1 s at 50 Hz
        w.add(Sample(k, k / 50, 0.3), 0.3, now=0.0)
    assert w.reasons(0.0) == [HoldReason.WINDOW_NOT_FULL]


@pytest.mark.parametrize(
    ("sample", "amplitude", "reason"),
    [
        (lambda n, t: Sample(n, t + 0.02, valid=False, amplitude=0.3), 0.3, HoldReason.INVALID_SAMPLE),
        (lambda n, t: Sample(n, t + 0.02, amplitude=math.nan), math.nan, HoldReason.NON_FINITE_SAMPLE),
        (lambda n, t: Sample(n, t + 0.02, amplitude=math.inf), math.inf, HoldReason.NON_FINITE_SAMPLE),
        (lambda n, t: Sample(n - 1, t, amplitude=0.3), 0.3, HoldReason.DUPLICATE),
        (lambda n, t: Sample(n - 5, t + 0.02, amplitude=0.3), 0.3, HoldReason.OUT_OF_ORDER),
        (lambda n, t: Sample(n, t - 0.5, amplitude=0.3), 0.3, HoldReason.OUT_OF_ORDER),
    ],
)
def test_bad_samples_are_refused_with_their_reason(sample, amplitude, reason):
    """Invalid, NaN/Inf, duplicate and out-of-order samples are refused and hold the gate."""
    w, n, t = _full_window()
    assert w.add(sample(n, t), amplitude, now=1.0) is reason
    assert reason in w.reasons(1.0)


def test_a_gap_holds_until_it_has_left_the_window():
    """A source-time jump over max_gap_s is accepted but holds until the window no longer spans it."""
    w, n, t = _full_window()
    assert w.add(Sample(n, t + 1.0, 0.3), 0.3, now=0.0) is None
    assert w.reasons(0.0) == [HoldReason.GAP]
    for k in range(1, 130):  # 2.6 s more at 50 Hz
        w.add(Sample(n + k, t + 1.0 + k / 50, 0.3), 0.3, now=0.0)
    assert w.reasons(0.0) == []


def test_reorder_hold_ends_by_itself():
    """out_of_order holds for reorder_hold_s of daemon time, then clears."""
    w, n, t = _full_window()
    w.add(Sample(n - 3, t, 0.3), 0.3, now=10.0)
    assert w.reasons(10.2) == [HoldReason.OUT_OF_ORDER]
    assert w.reasons(10.6) == []


def test_a_restarted_source_restarts_the_window():
    """restart_after in-order samples with a lower seq restart the window instead of holding forever."""
    w, n, t = _full_window()
    for k in range(5):
        w.add(Sample(k, t + 0.02 * (k + 1), 0.3), 0.3, now=0.0)
    assert w.last_seq == 4 and HoldReason.WINDOW_NOT_FULL in w.reasons(0.0)


def test_a_new_time_base_or_source_name_restarts_the_window():
    """In-order samples whose source time restarts, or a new source name, restart the window."""
    w, n, t = _full_window()
    for k in range(5):
        w.add(Sample(n + k, 0.02 * k, 0.3), 0.3, now=0.0)
    assert w.last_t == 0.02 * 4 and HoldReason.WINDOW_NOT_FULL in w.reasons(0.0)
    w, n, t = _full_window()
    assert w.add(Sample(0, 0.0, 0.3, source="belt-2"), 0.3, now=0.0) is None
    assert w.reasons(0.0) == [HoldReason.SOURCE_RESTART, HoldReason.WINDOW_NOT_FULL]


def test_forecast_horizon_extends_the_window():
    """With a horizon the window ends at newest + h and its last value is the forecast."""
    w = RollingWindow(TRACE, horizon_s=0.3, forecast=ForecastConfig())
    for k in range(400):
        t = k * 0.04
        w.add(Sample(k, t, 0.0), 0.5 - 0.5 * math.cos(2 * math.pi * t / 4), now=0.0)
    truth = 0.5 - 0.5 * math.cos(2 * math.pi * (399 * 0.04 + 0.3) / 4)
    assert w.window()[-1] == pytest.approx(truth, abs=0.02)


# -- forecast ---------------------------------------------------------------------------------------------------


def test_forecast_is_the_last_value_until_trained_and_for_horizon_zero():
    """No prediction before enough samples, and none at horizon 0."""
    f0, f = RlsForecaster(0.0), RlsForecaster(0.5)
    for k in range(5):
        f0.update(k * 0.04, 0.1 * k)
        f.update(k * 0.04, 0.1 * k)
    assert f0.predict() == pytest.approx(0.4) and f.predict() == pytest.approx(0.4)


def test_forecast_beats_no_prediction_on_irregular_breathing():
    """On a synthetic irregular trace the RLS forecast at 300 ms has a lower RMS error than holding the last value."""
    tr = simulated_trace(seed=3, duration_s=120.0, rate_hz=25.0)
    f = RlsForecaster(0.3)
    errors, hold = [], []
    for k, (t, a) in enumerate(zip(tr.time_s, tr.amplitude)):
        f.update(t, a)
        if k > 750 and k + 8 < len(tr):  # after 30 s; 0.3 s = 7.5 samples
            truth = np.interp(t + 0.3, tr.time_s, tr.amplitude)
            errors.append(f.predict() - truth)
            hold.append(a - truth)
    assert np.sqrt(np.mean(np.square(errors))) < 0.6 * np.sqrt(np.mean(np.square(hold)))


# -- session log ------------------------------------------------------------------------------------------------


def test_session_log_round_trip_and_torn_tail(tmp_path):
    """Records read back in order; a torn last record is skipped and reported."""
    path = tmp_path / "s.bclog"
    with SessionLog(path, header={"model_id": "m"}) as log:
        log.write_many([{"type": "sample", "seq": k, "t": 0.04 * k} for k in range(100)])
    contents = read_session_log(path)
    assert contents.records[0]["model_id"] == "m" and [r["seq"] for r in contents.of_type("sample")] == list(range(100))
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00\x00partial")
    torn = read_session_log(path)
    assert len(torn.records) == 101 and torn.truncated_bytes == 11


def test_session_log_refuses_a_foreign_file(tmp_path):
    """An existing file that is not a session log is never appended to."""
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(BreathcastError, match="not a breathcast session log"):
        SessionLog(path)
    assert path.read_text() == "hello" and MAGIC not in path.read_bytes()


# -- replay sources ---------------------------------------------------------------------------------------------


def test_replay_sources(tmp_path):
    """Simulated, CSV and session-log traces load with their times and amplitudes."""
    sim = load_trace("simulated:2", rate_hz=50.0, duration_s=4.0)
    assert len(sim) == 200 and np.all(np.diff(sim.time_s) > 0)
    csv = tmp_path / "trace.csv"
    csv.write_text("time,amplitude\n" + "".join(f"{0.1 * k},{0.01 * k}\n" for k in range(30)))
    tr = load_trace(str(csv))
    np.testing.assert_allclose(tr.amplitude, 0.01 * np.arange(30))
    log = tmp_path / "s.bclog"
    with SessionLog(log) as sl:
        sl.write_many([{"type": "sample", "seq": k, "t": 0.04 * k, "amplitude": 0.5} for k in range(10)])
    assert len(load_trace(str(log))) == 10


def test_real_marker_recording_is_calibrated_for_replay():
    """A real optical-marker file becomes an amplitude trace with end-exhale near 0 and end-inhale near 1."""
    from conftest import shared_data_file

    path = shared_data_file("traces/extmarker/201205111055-LAR-1-N-117-6.csv")
    tr = load_trace(str(path))
    a = tr.amplitude[tr.valid]
    assert len(tr) > 500 and -0.3 < np.percentile(a, 5) < 0.3 and 0.7 < np.percentile(a, 95) < 1.4
    assert os.path.basename(tr.name) == path.name


# -- the fast target path ---------------------------------------------------------------------------------------


def test_fast_targets_equal_the_predictor(tiny_package, tiny_plan):  # noqa: F811
    """The target-only evaluation of a distilled predictor gives the predictor's own targets and field."""
    from stream_fixtures import breathing

    from breathcast.engine.predictor import DistillationConfig, PredictorConfig, load_predictor
    from breathcast.stream.targets import target_evaluator

    small = DistillationConfig(amplitudes=6, rates=5, validation_windows=0)
    for mode in ("snapshot", "window"):
        predictor = load_predictor(tiny_package, tiny_plan, PredictorConfig(path="distilled", mode=mode, distillation=small))
        fast = target_evaluator(predictor)
        window = breathing(np.arange(448) * TRACE.sample_interval_s + 1.3)
        now, moved, a, r, _ = fast.evaluate(window)
        expected = predictor.predict(window)
        np.testing.assert_allclose(now, expected.target_lps_mm, atol=1e-3)
        np.testing.assert_allclose(moved, expected.target_displacement_mm, atol=1e-3)
        np.testing.assert_allclose(fast.displacement(a, r), expected.displacement, atol=1e-5)
        assert np.abs(moved).max() > 0.01


# -- doctests and the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["protocol", "config", "window", "forecast", "recording", "replay", "client"])
def test_stream_doctests(module):
    """The examples in the stream modules' docstrings run (stream/ is outside pytest's doctest paths)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"breathcast.stream.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def _parser():
    import argparse

    from breathcast.stream.cli import add_stream_commands

    parser = argparse.ArgumentParser(prog="breathcast")
    add_stream_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_keys_and_serve_flags(tmp_path, capsys):
    """`keys` writes a key pair; `serve` flags become the nested config they name."""
    from breathcast.stream.cli import _serve_overrides
    from breathcast.stream.config import load_config

    args = _parser().parse_args(["keys", "--out", str(tmp_path), "--name", "console"])
    assert args.run(args) == 0 and (tmp_path / "console.key").exists() and (tmp_path / "console.key_secret").exists()
    assert "console.key_secret" in capsys.readouterr().out
    args = _parser().parse_args(["serve", "--path", "direct", "--no-field", "--horizon", "0.1", "--gate-amplitude", "0", "0.5",
                                 "--plan-source", "nifti", "--plan-path", "ct.nii.gz", "--plan-amplitude", "0",
                                 "--target", "1", "2", "3", "--control-endpoint", "tcp://127.0.0.1:6000"])  # fmt: skip
    cfg = load_config(None, _serve_overrides(args))
    assert (cfg.path, cfg.field.enabled, cfg.forecast_horizon_s, cfg.gating.amplitude_range) == ("direct", False, 0.1, (0.0, 0.5))
    assert (cfg.plan.source, cfg.plan.amplitude, cfg.plan.target_lps_mm, cfg.endpoints.control) == (
        "nifti", 0.0, ((1.0, 2.0, 3.0),), "tcp://127.0.0.1:6000")
    with pytest.raises(SystemExit):
        _parser().parse_args(["replay", "simulated", "--speed", "-1"])
