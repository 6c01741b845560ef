"""Issue 15 without a daemon: absurd timestamps, physiological limits, a stuck sensor, strict versions, a bounded
forecaster, torn session-log tails and file modes under any umask."""

from __future__ import annotations

import math
import os
import stat
import time

import msgpack
import pytest

from breathcast.engine.package import TraceSpec
from breathcast.errors import BreathcastError
from breathcast.stream.client import make_keys
from breathcast.stream.config import GatingConfig, PlausibilityConfig, SafetyConfig, config_from_dict
from breathcast.stream.forecast import RlsForecaster
from breathcast.stream.protocol import HoldReason, ProtocolError, Sample, parse_input
from breathcast.stream.recording import SessionLog, read_session_log
from breathcast.stream.window import RollingWindow

TRACE = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=16)
RATE_HZ = 50.0


def _breath(t: float) -> float:
    return 0.5 - 0.5 * math.cos(2 * math.pi * t / 4.0)


def _window(seconds: float = 3.0, **safety) -> tuple[RollingWindow, int, float]:
    """A window fed ``seconds`` of clean breathing at 50 Hz (daemon clock 0); returns it, the next seq, the last t."""
    w = RollingWindow(TRACE, SafetyConfig(**safety))
    n = int(seconds * RATE_HZ)
    for k in range(n):
        assert w.add(Sample(k, k / RATE_HZ, _breath(k / RATE_HZ)), _breath(k / RATE_HZ), now=0.0) is None
    return w, n, (n - 1) / RATE_HZ


def _feed(w: RollingWindow, seq: int, t: float, seconds: float, amplitude=_breath) -> tuple[int, float]:
    """``seconds`` more samples at 50 Hz of ``amplitude(t)`` (a function, or a number for a flat line)."""
    for _ in range(round(seconds * RATE_HZ)):
        t += 1 / RATE_HZ
        a = amplitude(t) if callable(amplitude) else amplitude
        w.add(Sample(seq, t, a), a, now=0.0)
        seq += 1
    return seq, t


# -- timestamps ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [6e14, -6e14, 2.0**32 + 1])
def test_a_timestamp_beyond_float_resolution_is_refused_at_the_door(t):
    """|t| > 2**32 s cannot be resampled at a breathing cadence: bad_value, never computed with."""
    with pytest.raises(ProtocolError, match="bad_value"):
        parse_input(msgpack.packb({"v": 1, "type": "sample", "seq": 1, "t": t, "amplitude": 0.5}))


def test_a_time_jump_the_cadence_does_not_explain_is_rejected_and_holds():
    """A sample 1e6 s after the last, 20 ms later and one seq on, is rejected (time_jump) and holds for reorder_hold_s."""
    w, n, t = _window()
    assert w.add(Sample(n, t + 1e6, 0.5), 0.5, now=0.02) is HoldReason.TIME_JUMP
    assert w.reasons(0.1) == [HoldReason.TIME_JUMP] and w.last_t == t
    assert w.add(Sample(n + 1, t + 0.04, _breath(t + 0.04)), _breath(t + 0.04), now=0.04) is None
    assert w.reasons(1.0) == []


def test_a_long_pause_the_daemon_clock_saw_is_a_gap_not_a_jump():
    """A 5 s step after 5 s of daemon time is a pause of the source: accepted, HOLD gap."""
    w, n, t = _window()
    assert w.add(Sample(n, t + 5.0, _breath(t + 5.0)), _breath(t + 5.0), now=5.0) is None
    assert w.reasons(5.0) == [HoldReason.GAP]


def test_a_source_whose_clock_moved_restarts_after_restart_after_samples():
    """restart_after jumped samples in order among themselves are a new clock: the window restarts (source_restart)."""
    w, n, t = _window(restart_after=5)
    reasons = [w.add(Sample(n + k, 1e6 + k / RATE_HZ, 0.5), 0.5, now=0.02 * k) for k in range(5)]
    assert reasons[:4] == [HoldReason.TIME_JUMP] * 4 and reasons[4] is None
    assert w.reasons(0.2)[:1] == [HoldReason.SOURCE_RESTART] and w.last_t == 1e6 + 4 / RATE_HZ


def test_the_forecaster_does_bounded_work_at_any_timestamp():
    """Two samples at t = 6e14 s and a 1e9 s step return at once (the grid loop no longer spins)."""
    f = RlsForecaster(horizon_s=0.2)
    start = time.perf_counter()
    for t in (6e14, 6e14 + 0.02, 6e14 + 1e9, 1e15):
        f.update(t, 0.5)
    assert time.perf_counter() - start < 0.5 and math.isfinite(f.predict())


# -- physiological limits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("amplitude", "why"), [(50.0, "range"), (1e6, "range"), (2.2, "step"), (0.9, "rate")])
def test_an_implausible_sample_is_rejected_and_holds_until_it_has_left_the_window(amplitude, why):
    """A glitch (outside the range, a step or a rate no breath makes) is rejected; HOLD until its time left the window."""
    w, n, t = _window()
    base = _breath(t + 0.02)  # about 0.5: 0.9 is a step of 0.4 in 20 ms (20/s), 2.2 a step of 1.7
    assert w.add(Sample(n, t + 0.02, amplitude), amplitude, now=0.0) is HoldReason.IMPLAUSIBLE_SAMPLE, why
    assert HoldReason.IMPLAUSIBLE_SAMPLE in w.reasons(0.0) and abs(w.newest.amplitude - base) < 0.1
    seq, t2 = _feed(w, n + 1, t + 0.02, 1.0)
    assert HoldReason.IMPLAUSIBLE_SAMPLE in w.reasons(0.0)
    _feed(w, seq, t2, 1.5)
    assert w.reasons(0.0) == []


def test_a_baseline_shift_is_one_rejected_sample_not_a_hold_forever():
    """After a step to a new level the next samples compare with the step, so only the step itself is rejected."""
    w, n, t = _window()
    assert w.add(Sample(n, t + 0.02, 2.5), 2.5, now=0.0) is HoldReason.IMPLAUSIBLE_SAMPLE
    assert w.add(Sample(n + 1, t + 0.04, 2.51), 2.51, now=0.0) is None


def test_the_plausibility_limits_are_configurable():
    """A narrower range in the config rejects what the default accepts."""
    w = RollingWindow(TRACE, plausibility=PlausibilityConfig(amplitude_range=(-0.5, 1.5)))
    assert w.add(Sample(0, 0.0, 1.6), 1.6, now=0.0) is HoldReason.IMPLAUSIBLE_SAMPLE
    assert RollingWindow(TRACE).add(Sample(0, 0.0, 1.6), 1.6, now=0.0) is None
    with pytest.raises(BreathcastError, match="max_rate_per_s must be > 0"):
        config_from_dict({"plausibility": {"max_rate_per_s": 0.0}})


def test_flag_holds_until_the_time_has_left_the_window():
    """A frame flagged (implausible_target) holds until its source time is older than the window."""
    w, n, t = _window()
    w.flag(HoldReason.IMPLAUSIBLE_TARGET, t)
    seq, t2 = _feed(w, n, t, 2.0)
    assert w.reasons(0.0) == [HoldReason.IMPLAUSIBLE_TARGET]
    _feed(w, seq, t2, 0.5)
    assert w.reasons(0.0) == []


# -- stuck sensor, hysteresis config ----------------------------------------------------------------------------------


def test_a_flat_lined_sensor_holds_stuck_sensor_until_the_flat_part_has_left_the_window():
    """stuck_after_s of a constant amplitude holds stuck_sensor; breathing again clears it once the window is clean."""
    w, n, t = _window(stuck_after_s=1.0)
    flat = _breath(t)
    seq, t = _feed(w, n, t, 0.9, amplitude=flat)
    assert HoldReason.STUCK_SENSOR not in w.reasons(0.0)
    seq, t = _feed(w, seq, t, 0.3, amplitude=flat)
    assert w.reasons(0.0) == [HoldReason.STUCK_SENSOR]
    again = lambda s: _breath(s - 1.2)  # noqa: E731 - breathing again where it stopped
    seq, t = _feed(w, seq, t, 2.0, amplitude=again)
    assert w.reasons(0.0) == [HoldReason.STUCK_SENSOR]
    _feed(w, seq, t, 0.5, amplitude=again)
    assert w.reasons(0.0) == []
    w, n, t = _window(stuck_after_s=0.0)  # off
    _feed(w, n, t, 3.0, amplitude=0.3)
    assert w.reasons(0.0) == []


def test_hysteresis_must_fit_in_the_gating_window():
    """A hysteresis of half the range or more, or negative, is refused; the default is off."""
    assert GatingConfig().hysteresis == 0.0 and GatingConfig().hysteresis_mm == 0.0
    with pytest.raises(BreathcastError, match="hysteresis must be"):
        GatingConfig(amplitude_range=(0.0, 0.2), hysteresis=0.1)
    with pytest.raises(BreathcastError, match="hysteresis_mm must be"):
        GatingConfig(hysteresis_mm=-1.0)


# -- strict wire types -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [True, 1.0, "1", None, 2])
def test_only_the_integer_1_is_version_1(version):
    """v = true and v = 1.0 are not the integer 1: bad_version."""
    with pytest.raises(ProtocolError, match="bad_version"):
        parse_input(msgpack.packb({"v": version, "type": "sample", "seq": 1, "t": 0.0, "amplitude": 0.5}))


def test_non_string_keys_are_refused_with_a_code_not_a_crash():
    """A map with a bytes key is malformed on input and a config error in a plan or gating map."""
    with pytest.raises(ProtocolError, match="malformed"):
        parse_input(msgpack.packb({"v": 1, "type": "sample", b"yyy": 2, "zzz": 1}, use_bin_type=True))
    with pytest.raises(BreathcastError, match="keys of plan must be strings"):
        from breathcast.stream.config import PlanSpec, _build

        _build(PlanSpec, {"zzz": 1, b"yyy": 2}, "plan.")


# -- files -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def umask_000():
    """Run with umask 000 (restored after)."""
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_torn_tail_is_cut_off_and_kept_so_the_next_session_is_readable(tmp_path, umask_000):
    """A log torn mid-record (SIGKILL, then power loss) is repaired on reopen: old and new records read back, 0600."""
    path = tmp_path / "s.bclog"
    with SessionLog(path) as log:
        log.write_many([{"type": "sample", "seq": k, "t": k * 0.02, "amplitude": 0.5} for k in range(10)])
    whole = path.stat().st_size
    torn_bytes = b"\x40\x00\x00\x00\x85\xa4type"  # a record header promising 64 bytes, 6 of them written
    with open(path, "ab") as f:
        f.write(torn_bytes)
    assert read_session_log(path).truncated_bytes == len(torn_bytes) == 10
    with SessionLog(path) as log:
        assert log.repaired_tail_bytes == 10
        log.write_many([{"type": "sample", "seq": 100 + k, "t": k * 0.02, "amplitude": 0.5} for k in range(125)])
    contents = read_session_log(path)
    assert contents.truncated_bytes == 0 and len(contents.of_type("sample")) == 135
    assert [r.get("repaired_tail_bytes") for r in contents.of_type("session")] == [None, 10]
    (torn,) = tmp_path.glob("s.bclog.torn-*")
    assert torn.read_bytes() == torn_bytes and path.stat().st_size > whole
    assert _mode(path) == 0o600 and _mode(torn) == 0o600


def test_an_old_world_readable_log_is_made_owner_only(tmp_path):
    """Opening a 0644 log for appending makes it 0600."""
    path = tmp_path / "old.bclog"
    SessionLog(path).close()
    path.chmod(0o644)
    SessionLog(path).close()
    assert _mode(path) == 0o600


def test_keys_are_private_whatever_the_umask(tmp_path, umask_000):
    """Under umask 000, `breathcast keys` makes the folder 0700, the secret 0600, the public key 0644."""
    public, secret = make_keys(tmp_path / "keys", "console")
    assert (_mode(tmp_path / "keys"), _mode(secret), _mode(public)) == (0o700, 0o600, 0o644)
    assert b"secret-key" in secret.read_bytes() and b"secret-key" not in public.read_bytes()
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(BreathcastError, match="writable by others"):
        make_keys(tmp_path / "open", "console")


# -- the contract ------------------------------------------------------------------------------------------------------


def test_the_protocol_document_lists_every_reason_in_priority_order_and_every_error_code():
    """docs/protocol.md's gate table has every hold reason in REASON_PRIORITY order; its error table every code."""
    from pathlib import Path

    from breathcast.stream.daemon import REASON_PRIORITY
    from breathcast.stream.protocol import CONTROL_ERROR_CODES

    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    gate_table = doc[doc.index("| reason | when | recovers |") : doc.index("Gating window (`[gating]`)")]
    listed = [line.split("`")[1] for line in gate_table.splitlines()[2:] if line.startswith("| `")]
    assert listed == [r.value for r in REASON_PRIORITY]
    assert set(listed) == {r.value for r in HoldReason} - {"ok"}
    error_table = doc[doc.index("| code | when |") : doc.index("SIGTERM or SIGINT stop")]
    assert {line.split("`")[1] for line in error_table.splitlines()[2:] if line.startswith("| `")} == CONTROL_ERROR_CODES
