"""Issue 15 on a real daemon over loopback TCP: a seeded fuzzer over every message field and control command, and
each defect the adversarial test found (an absurd timestamp, a request with a non-string key, a glitch sample, a
torn log tail, a stalled field subscriber, a flat-lined sensor, stale frames from rejected samples, SIGTERM with a
thread stuck holding the state lock)."""

from __future__ import annotations

import math
import os
import signal
import stat
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq
from stream_fixtures import (  # noqa: F401  (fixtures)
    ALWAYS_INSIDE,
    breathing,
    daemon,
    healthy,
    io,
    loopback_endpoints,
    make_config,
    running_daemon,
    send_trace,
    tiny_package,
    tiny_plan,
    wait_for,
    wait_gate,
)

from breathcast.errors import PlanRejected
from breathcast.geometry import Grid, Volume
from breathcast.stream.client import ControlClient, SampleSender, Subscriber
from breathcast.stream.config import PlausibilityConfig
from breathcast.stream.faults import Fuzzer, GateWatcher, frame_violations, reply_violations, run_fuzz
from breathcast.stream.recording import MAGIC, read_session_log

RATE_HZ = 50.0


def _gate(rx, reason: str, timeout_s: float = 5.0):
    return wait_gate(rx, reason, timeout_s, first=False)


def _batch(tx, seq: int, ts, amplitudes) -> int:
    tx.send_batch([{"seq": seq + k, "t_source": float(t), "amplitude": float(a)} for k, (t, a) in enumerate(zip(ts, amplitudes))])
    return seq + len(ts)


# -- the fuzzer ----------------------------------------------------------------------------------------------------


def test_fuzzed_input_and_control_keep_every_invariant(daemon):
    """600 seeded hostile input messages and 100 control requests: every request answered, every gate consistent and
    never BEAM_ON on an implausible state, every message counted, all threads alive."""
    ep = daemon.config.endpoints
    with GateWatcher(ep.publish, daemon.config.plausibility) as watcher:
        report = run_fuzz({"input": ep.input, "control": ep.control}, Fuzzer(seed=16, paths=("direct",)), n_input=600,
                          control_every=6, rate_hz=2000.0)  # fmt: skip
        time.sleep(0.3)
    assert report.violations == [] and watcher.violations == []
    assert report.control_replies == report.control_requests == 100 and report.messages_counted == 600
    assert all(t.is_alive() for t in daemon._threads)
    with ControlClient(ep.control) as ctl:
        counters = ctl.status()["counters"]
    # the fuzz reached every door: several malformed codes, rejected reasons and control error codes
    assert {"malformed.bad_type", "malformed.bad_value", "malformed.bad_version", "malformed.not_msgpack"} <= set(counters)
    assert {"rejected.time_jump", "rejected.implausible_sample", "rejected.out_of_order"} <= set(counters)
    assert {"bad_argument", "bad_version", "unknown_command", "unavailable"} <= set(report.error_codes)  # unavailable:
    # coefficients on the direct path
    assert len(watcher.messages) > 20


def test_frame_violations_want_one_payload_of_nbytes_after_coefficients_only():
    ok = {"v": 1, "ok": True, "coefficients": {"nbytes": 4}}
    assert frame_violations(ok, [b"1234"]) == [] and frame_violations({"v": 1, "ok": True}, []) == []
    assert frame_violations(ok, []) and frame_violations(ok, [b"123"]) and frame_violations(ok, [b"1234", b""])
    assert frame_violations({"v": 1, "ok": False, "error": {}}, [b"x"])


# -- control: every request answered ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_map", "code"),
    [
        ({"v": 1, "cmd": "set_gating", "zzz": 1, b"yyy": 2}, "malformed"),  # the request that killed REP
        ({"v": 1, "cmd": "load_plan", "plan": {"zzz": 1, b"yyy": 2}}, "bad_argument"),
        ({"v": 1, "cmd": "load_plan", "plan": [1]}, "bad_argument"),
        ({"v": True, "cmd": "status"}, "bad_version"),
        ({"v": 1.0, "cmd": "status"}, "bad_version"),
        ({"cmd": "status"}, "bad_version"),
        ({"v": 1}, "bad_argument"),
        ({"v": 1, "cmd": 7}, "bad_argument"),
        ({"v": 1, "cmd": "set_gating", "kind": "target", "target_index": 1}, "bad_argument"),  # the plan has 1 point
        ({"v": 1, "cmd": "reset", "counters": "yes"}, "bad_argument"),
    ],
)
def test_every_control_request_gets_one_reply(daemon, request_map, code):
    """Requests with non-string keys, a non-integer v, no cmd, or a target_index beyond the plan get an error reply,
    and the control socket keeps serving the next client."""
    with ControlClient(daemon.config.endpoints.control, timeout_s=3.0) as ctl:
        reply = ctl.request_raw(msgpack.packb(request_map, use_bin_type=True))
        assert reply_violations(reply) == [] and reply["ok"] is False and reply["error"]["code"] == code
    with ControlClient(daemon.config.endpoints.control, timeout_s=3.0) as other:
        assert other.status()["state"] == "running"


def test_a_failing_handler_still_replies_internal_error(daemon):
    """A handler that raises something unexpected gives internal_error with the message, not a dead REP socket."""
    original = daemon.status
    daemon.status = lambda: {"not": object()}  # a reply msgpack cannot encode: the last line of defence
    try:
        with ControlClient(daemon.config.endpoints.control, timeout_s=3.0) as ctl:
            reply = ctl.request("status", check=False)
    finally:
        daemon.status = original
    assert reply["ok"] is False and reply["error"]["code"] == "internal_error"
    with ControlClient(daemon.config.endpoints.control, timeout_s=3.0) as ctl:
        assert ctl.status()["counters"]["internal_errors"] >= 1


# -- samples ------------------------------------------------------------------------------------------------------------


def test_absurd_timestamps_are_rejected_and_the_daemon_stays_responsive(io):
    """t = 6e14 s is bad_value; a 1e6 s jump 20 ms later is time_jump (HOLD); control answers at once throughout."""
    tx, rx, ctl = io
    ctl.request("set_forecast", horizon_s=0.2)  # the forecaster's grid loop runs on every sample
    seq, t = healthy(tx, rx)
    before = ctl.status()["counters"]
    tx.send_batch([{"seq": seq, "t_source": 6e14, "amplitude": 0.5}, {"seq": seq + 1, "t_source": 6e14 + 0.02, "amplitude": 0.5}])
    tx.send(seq, t + 1e6, 0.5)
    assert _gate(rx, "time_jump") is not None
    started = time.monotonic()
    after = ctl.status()["counters"]
    assert time.monotonic() - started < 1.0
    assert after["malformed.bad_value"] - before.get("malformed.bad_value", 0) == 1  # the batch, as one message
    assert after["rejected.time_jump"] - before.get("rejected.time_jump", 0) == 1
    time.sleep(0.6)
    send_trace(tx, seq, t + 0.02, 5)
    assert _gate(rx, "ok") is not None


def test_a_glitch_holds_implausible_sample_until_the_window_is_clean(daemon, io):
    """Amplitude 50 in a quiet exhale: HOLD implausible_sample, no BEAM_ON on a frame that still spans it, and never
    a target displacement beyond the limit; BEAM_ON again once the glitch has left the window."""
    tx, rx, ctl = io
    with GateWatcher(daemon.config.endpoints.publish, daemon.config.plausibility) as watcher:
        seq, t = healthy(tx, rx)
        t_glitch = t
        tx.send(seq, t_glitch, 50.0)
        assert _gate(rx, "implausible_sample") is not None
        ts = t_glitch + np.arange(1, 151) / RATE_HZ
        for lo in range(0, 150, 10):  # 3 s more, in 15 batches: many frames, some still spanning the glitch
            seq = _batch(tx, seq + (lo == 0), ts[lo : lo + 10], breathing(ts[lo : lo + 10]))
            time.sleep(0.03)
        assert _gate(rx, "ok") is not None
        time.sleep(0.2)
    span = 2.3
    on = [h for _, h in watcher.messages if h["state"] == "BEAM_ON" and h["t_source"] is not None and h["t_source"] >= t_glitch]
    assert on and min(h["t_source"] for h in on) >= t_glitch + span
    assert watcher.violations == []


def test_a_flat_lined_sensor_holds_stuck_sensor(io):
    """2.5 s of one constant amplitude holds stuck_sensor (the default stuck_after_s is 2 s)."""
    tx, rx, _ = io
    seq, t = healthy(tx, rx)
    ts = t + np.arange(125) / RATE_HZ
    _batch(tx, seq, ts, np.full(125, float(breathing(t))))
    assert _gate(rx, "stuck_sensor") is not None


def test_a_new_source_name_holds_source_restart(io):
    """A sample from another source name restarts the window with reason source_restart (not window_not_full)."""
    tx, rx, _ = io
    seq, t = healthy(tx, rx)
    tx.send(0, 0.0, 0.3, source="belt-2")
    message = _gate(rx, "source_restart")
    assert message is not None and message.header["reason"] == "source_restart"


def test_rejected_samples_are_not_fresh_input(io):
    """A restarted source below restart_after (seq back at 0) gets HOLD and then stale_input; no target frame of the
    old window is published meanwhile."""
    tx, rx, _ = io
    seq, t = healthy(tx, rx)
    time.sleep(0.1)
    rx.latest()
    for k in range(5):  # out of order: rejected, the window is not fresh
        tx.send(k, 0.02 * k, 0.3)
        time.sleep(0.1)
    messages = []
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        m = rx.recv(0.05)
        if m is not None:
            messages.append(m)
    assert [m for m in messages if m.topic == "target"] == []
    reasons = {r for m in messages if m.topic == "gate" for r in m.header["reasons"]}
    assert {"out_of_order", "stale_input"} <= reasons
    assert all(m.header["state"] == "HOLD" for m in messages if m.topic == "gate")


def test_hysteresis_starts_inside_the_margin_and_stops_at_the_edge(io):
    """With amplitude_range [0, 0.5] and hysteresis 0.1, BEAM_ON starts at >= 0.1 and ends only above 0.5."""
    tx, rx, ctl = io
    ctl.request("set_gating", kind="amplitude", amplitude_range=[0.0, 0.5], hysteresis=0.1)
    ts = np.arange(130) / RATE_HZ
    seq = _batch(tx, 0, ts, -0.2 + 0.1 * np.sin(ts))  # a full window below the range
    t = float(ts[-1])
    ramp = [-0.05, 0.02, 0.06, 0.12, 0.2, 0.3, 0.4, 0.48, 0.53, 0.45, 0.38, 0.3]
    states = []
    for a in ramp:
        t += 1 / RATE_HZ
        tx.send(seq, t, a)
        m = wait_for(rx, lambda m, s=seq: m.topic == "gate" and m.header["sample_seq"] == s and m.header["frame"] is not None)
        assert m is not None
        states.append(m.header["state"] == "BEAM_ON")
        seq += 1
    # -0.05 0.02 0.06: off (not yet 0.1 inside); 0.12 .. 0.48: on; 0.53: off; 0.45: off (not 0.1 inside); 0.38 0.3: on
    assert states == [False, False, False, True, True, True, True, True, False, False, True, True]


# -- field isolation ------------------------------------------------------------------------------------------------------


def test_a_stalled_field_subscriber_starves_no_one_and_delays_no_gate(daemon, io):
    """One field subscriber that never reads (RCVHWM 1) and 30 more connecting: a reading subscriber still gets fields,
    and every sample's gate still comes within 100 ms."""
    tx, rx, _ = io
    ep = daemon.config.endpoints
    ctx = zmq.Context()
    stalled = []
    try:
        for _ in range(31):
            s = ctx.socket(zmq.SUB)
            s.rcvhwm, s.rcvbuf = 1, 1024  # never reads: its queue fills after a few fields
            s.setsockopt(zmq.SUBSCRIBE, b"field")
            s.connect(ep.field)
            stalled.append(s)
        with Subscriber(ep.field, topics=("field",), rcvhwm=2) as viewer:
            time.sleep(0.3)
            seq, t = healthy(tx, rx)
            fields, gate_ms = 0, []  # fields: received in the second second, when the stalled queues are full
            for k in range(100):  # 2 s live at 50 Hz
                t += 1 / RATE_HZ
                sent = tx.send(seq, t, float(breathing(t)))
                m = wait_for(rx, lambda m, s=seq: m.topic == "gate" and m.header["sample_seq"] == s, 1.0)
                assert m is not None, f"no gate for sample {seq}"
                gate_ms.append((time.time() - sent) * 1e3)
                seq += 1
                while viewer.recv(0.0) is not None:
                    fields += k >= 50
                time.sleep(max(0.0, 1 / RATE_HZ - gate_ms[-1] / 1e3))
    finally:
        for s in stalled:
            s.close(0)
        ctx.term()
    assert fields >= 30, f"the reading field subscriber got {fields} fields of the last 50 frames"
    assert float(np.percentile(gate_ms, 99)) < 100.0


# -- plan load: loading, plan_rejected, implausible_target --------------------------------------------------------------


def test_loading_and_a_rejected_plan_hold_with_their_reason(tiny_package, tiny_plan, tmp_path, monkeypatch):  # noqa: F811
    """Without input, a plan load holds `loading`; a plan the engine rejects holds `plan_rejected` with its message in
    status (the engine's refusal is raised at load_predictor, as the engine does for a plan it does not know)."""
    config = make_config(tmp_path)
    with running_daemon(config, tiny_plan, tiny_package), ControlClient(config.endpoints.control) as ctl, \
            Subscriber(config.endpoints.publish, topics=("gate",)) as rx:  # fmt: skip
        time.sleep(0.2)
        assert ctl.request("load_plan", plan={"source": "simulated", "grid": 16})["loading"] is True
        assert _gate(rx, "loading") is not None
        ctl.wait_until_running(60.0)
        assert _gate(rx, "no_input") is not None

        from breathcast.engine import predictor

        def refuse(*args, **kwargs):
            raise PlanRejected("the lungs are cut at the top of the CT; use a scan that covers the apex")

        monkeypatch.setattr(predictor, "load_predictor", refuse)
        ctl.request("load_plan", plan={"source": "simulated", "grid": 16})
        message = _gate(rx, "plan_rejected", 30.0)
        assert message is not None and message.header["reason"] == "plan_rejected"
        status = ctl.status()
        assert status["state"] == "plan_rejected" and "lungs are cut" in status["plan_rejected"]
        assert "lungs are cut" in status["last_error"]


def test_an_implausible_target_holds(tiny_package, tiny_plan, tmp_path):  # noqa: F811
    """A model answer beyond max_target_displacement_mm holds implausible_target and is never BEAM_ON."""
    config = make_config(tmp_path, gating=ALWAYS_INSIDE, plausibility={"max_target_displacement_mm": 1e-6})
    with running_daemon(config, tiny_plan, tiny_package), SampleSender(config.endpoints.input) as tx, \
            Subscriber(config.endpoints.publish, topics=("gate",)) as rx:  # fmt: skip
        time.sleep(0.2)
        send_trace(tx, 0, 0.0, 150)
        message = _gate(rx, "implausible_target")
        assert message is not None and message.header["state"] == "HOLD"
        later = [wait_for(rx, lambda m: m.topic == "gate", 1.0) for _ in range(3)]
        assert all(m is None or m.header["state"] == "HOLD" for m in later)


# -- SIGTERM with a stuck thread, torn tail, modes ----------------------------------------------------------------------

_STUCK_SCRIPT = """
import os, sys
os.umask(0)
from breathcast.stream.config import config_from_dict
from breathcast.stream.daemon import serve
from breathcast.stream.window import RollingWindow
def stuck(self):  # the frame thread stops here for good, holding the state lock (as the t = 6e14 s grid loop did)
    print("stuck", flush=True)
    while True:
        pass
RollingWindow.window = stuck
sys.exit(serve(config_from_dict({"package": sys.argv[1], "plan": {"source": "simulated", "grid": 16}, "path": "direct",
                                 "threads": 1, "session_log": sys.argv[2], "endpoints": dict(zip(("input", "publish", "field",
                                 "control"), sys.argv[3:7]))})))
"""


def test_sigterm_ends_the_daemon_in_2_s_with_a_thread_stuck_and_the_torn_log_repaired(tiny_package, tmp_path):  # noqa: F811
    """A daemon restarted on a log with a torn tail repairs it; with its frame thread stuck holding the state lock
    (control dead), SIGTERM still ends the process within 2 s; every session reads back; the log is 0600."""
    log = tmp_path / "session.bclog"
    old = MAGIC + b"\x30\x00\x00\x00\x81\xa4type"  # a torn first record, as SIGKILL + power loss leave
    log.write_bytes(old)
    ep = loopback_endpoints()
    process = subprocess.Popen([sys.executable, "-c", _STUCK_SCRIPT, str(tiny_package.path), str(log), ep["input"], ep["publish"],
                                ep["field"], ep["control"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        with ControlClient(ep["control"], timeout_s=60.0) as ctl, SampleSender(ep["input"]) as tx:
            ctl.wait_until_running(120.0)
            send_trace(tx, 0, 0.0, 150)
            assert process.stdout.readline().strip() == "stuck"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    assert elapsed < 2.0, f"SIGTERM took {elapsed:.2f} s"
    assert process.returncode == 3  # threads abandoned: the documented exit code
    contents = read_session_log(log)
    assert contents.truncated_bytes == 0 and contents.records[0]["repaired_tail_bytes"] == len(old) - len(MAGIC)
    assert len(contents.of_type("sample")) == 150
    assert contents.records[-1]["event"] == "shutdown" and contents.records[-1]["threads_not_stopped"]
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    assert math.isfinite(contents.records[0]["t_wall"])


def _water(_thorax) -> Volume:
    grid = Grid((24, 32, 32), (10.0, 10.0, 10.0), origin=(-155.0, -155.0, -115.0))
    return Volume(np.full(grid.shape, 30.0, np.float32), grid)


def _upside_down(thorax) -> Volume:
    """``thorax`` (64³: its trachea visible) with its slices in reverse order."""
    return Volume(np.ascontiguousarray(thorax.reference_hu[::-1]), thorax.grid)


@pytest.mark.parametrize("volume, reason", [
    (_water, "no lungs found"),
    (_upside_down, "superior-inferior direction contradicts its anatomy"),
])
def test_a_lung_centred_package_rejects_a_plan_it_does_not_know(tmp_path, thorax64, volume, reason):
    """No patching: a lung-centred package (as the shipped one) refuses, at load, a CT with no lungs and a thorax
    whose slices run feet to head under a head-first header; the gate holds `plan_rejected` and status says why."""
    import torch

    from breathcast.engine.export import export_cvae
    from breathcast.engine.package import TraceSpec
    from breathcast.engine.predictor import Plan
    from breathcast.stream.daemon import Daemon
    from breathcast.training.cvae import CVAE, CVAEConfig

    torch.manual_seed(0)
    model = CVAE(CVAEConfig(grid=16, latent_dim=4, trace_embedding_dim=4, channels=(4, 4, 4, 4))).eval()
    trace = TraceSpec(window_samples=448, sample_interval_s=2.3 / 447, slices=16)
    package = export_cvae(model, tmp_path / "boxed", trace=trace,
                          training={"model_box": {"anchor": "lungs", "extent_mm": [400.0, 400.0, 320.0]}})
    ct = volume(thorax64)
    plan = Plan(ct, np.zeros(ct.shape[0]), name="unknown")
    config = make_config(tmp_path)
    daemon = Daemon(config, plan=plan, package=package).start()
    try:
        with ControlClient(config.endpoints.control) as ctl, Subscriber(config.endpoints.publish, topics=("gate",)) as rx:
            message = _gate(rx, "plan_rejected", 30.0)
            assert message is not None and message.header["state"] == "HOLD"
            status = ctl.status()
            assert status["state"] == "plan_rejected" and reason in status["plan_rejected"]
    finally:
        daemon.stop()
        assert daemon.wait(15.0), "daemon did not stop"
