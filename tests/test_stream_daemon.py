"""The daemon on real loopback sockets: a frame decoded from docs/protocol.md alone, the fail-safe gate, garbage,
control, CURVE, and a SIGKILL-ed session log."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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

from breathcast.errors import BreathcastError
from breathcast.stream.client import ControlClient, ControlError, CurveKeys, SampleSender, Subscriber, make_keys
from breathcast.stream.recording import read_session_log


def test_field_decoded_from_the_protocol_document_alone(daemon, tiny_plan):  # noqa: F811
    """A field frame decoded with raw zmq + msgpack by docs/protocol.md agrees with the target message of its frame."""
    ep = daemon.config.endpoints
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(ep.field)
    sub.connect(ep.publish)
    sub.setsockopt(zmq.SUBSCRIBE, b"field")
    sub.setsockopt(zmq.SUBSCRIBE, b"target")
    try:
        with SampleSender(ep.input) as tx, ControlClient(ep.control) as ctl:
            ctl.request("reset")
            time.sleep(0.2)
            send_trace(tx, 0, 0.0, 150)
            fields, targets = {}, {}
            end = time.monotonic() + 10
            while time.monotonic() < end and not (set(fields) & set(targets)):
                if sub.poll(200):
                    topic, header, *payload = sub.recv_multipart()
                    h = msgpack.unpackb(header)
                    assert h["v"] == 1 and h["topic"] == topic.decode()
                    (fields if topic == b"field" else targets)[h["frame"]] = (h, payload)
        frame = max(set(fields) & set(targets))
        (h, (payload,)), (t, _) = fields[frame], targets[frame]
        # section 2 / 4.3: little-endian dtype, C order, shape [3, Z, Y, X], components x, y, z, planar, mm LPS
        assert h["dtype"] in ("<f4", "<f2") and h["order"] == "C" and h["components"] == ["x", "y", "z"] and h["units"] == "mm"
        nz, ny, nx = h["grid"]["shape"]
        assert h["shape"] == [3, nz, ny, nx] and len(payload) == h["nbytes"] == 3 * nz * ny * nx * int(h["dtype"][2])
        values = np.frombuffer(payload, dtype=np.dtype(h["dtype"]))
        u = lambda c, k, j, i: float(values[((c * nz + k) * ny + j) * nx + i])  # noqa: E731 - the doc's formula
        # voxel [k, j, i] lies at origin + direction . (spacing * (i, j, k)); invert for the target now
        direction = np.asarray(h["grid"]["direction"], float).reshape(3, 3)
        spacing, origin = np.asarray(h["grid"]["spacing_mm"]), np.asarray(h["grid"]["origin_mm"])
        now = np.asarray(t["target_lps_mm"][0])
        i, j, k = np.linalg.solve(direction * spacing[None, :], now - origin)
        i0, j0, k0 = int(np.floor(i)), int(np.floor(j)), int(np.floor(k))
        fi, fj, fk = i - i0, j - j0, k - k0
        sampled = np.zeros(3)
        for dk in (0, 1):
            for dj in (0, 1):
                for di in (0, 1):
                    w = (fk if dk else 1 - fk) * (fj if dj else 1 - fj) * (fi if di else 1 - fi)
                    sampled += w * np.array([u(c, k0 + dk, j0 + dj, i0 + di) for c in range(3)])
        # pull-back: the planning-CT point at p + u(p) is at p now, so u(now) = planned - now = -displacement
        np.testing.assert_allclose(sampled, -np.asarray(t["target_displacement_mm"][0]), atol=0.05)
        assert np.abs(t["target_displacement_mm"][0]).max() > 0.01, "the tiny model should move the target"
        assert h["grid"]["frame_of_reference_uid"] == "1.2.3.4" and t["model_id"] == h["model_id"].strip()
        assert t["sample_seq"] == h["sample_seq"] and t["t_receive"] <= t["t_publish"]
    finally:
        sub.close(0)
        ctx.term()


def test_healthy_input_gives_beam_on_and_status_counts(io):
    """A full clean window inside the gating window gives BEAM_ON; status counts samples and frames."""
    tx, rx, ctl = io
    healthy(tx, rx)
    status = ctl.status()
    assert status["state"] == "running" and status["counters"]["samples_accepted"] >= 150
    assert status["counters"]["frames_computed"] >= 1 and status["latency_ms"]["target_ms"]["n"] >= 1


def test_window_not_full_holds(io):
    """Less than a scan's worth of samples holds with window_not_full."""
    tx, rx, _ = io
    send_trace(tx, 0, 0.0, 40)
    assert wait_gate(rx, "window_not_full") is not None


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"seq": 150, "t_source": 3.0, "amplitude": math.nan}, "non_finite_sample"),
        ({"seq": 150, "t_source": 3.0, "amplitude": math.inf}, "non_finite_sample"),
        ({"seq": 150, "t_source": 3.0, "amplitude": 0.2, "valid": False}, "invalid_sample"),
        ({"seq": 149, "t_source": 3.0, "amplitude": 0.2}, "duplicate"),
        ({"seq": 100, "t_source": 3.0, "amplitude": 0.2}, "out_of_order"),
        ({"seq": 150, "t_source": 3.8, "amplitude": 0.2}, "gap"),
    ],
)
def test_each_fault_holds_with_its_reason_then_recovers(io, bad, reason):
    """A bad sample after a healthy window gives HOLD with its reason, and clean input brings BEAM_ON back."""
    tx, rx, ctl = io
    seq, t = healthy(tx, rx)
    tx.send_batch([bad])
    assert wait_gate(rx, reason) is not None, f"no HOLD {reason}"
    t_next = max(t, bad["t_source"]) + 0.02
    send_trace(tx, 151, t_next, 150)  # 3 s more: the fault leaves the window
    time.sleep(0.6)  # reorder_hold_s
    send_trace(tx, 301, t_next + 3.0, 5)
    assert wait_gate(rx, "ok") is not None, f"did not recover from {reason}"
    assert ctl.status()["counters"][f"hold.{reason}"] >= 1


def test_stale_input_holds_without_frames(io):
    """When samples stop, the gate goes HOLD stale_input by itself within the stale time."""
    tx, rx, _ = io
    healthy(tx, rx)
    started = time.monotonic()
    message = wait_gate(rx, "stale_input", 3.0)
    assert message is not None and message.header["frame"] is None
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(("error", "reason"), [("the model produced a non-finite displacement", "non_finite_field"),
                                               ("runtime failed", "model_error")])  # fmt: skip
def test_model_errors_hold_and_the_daemon_keeps_running(daemon, io, error, reason):
    """A failing or non-finite model gives HOLD with its reason; the next good frame recovers."""
    tx, rx, ctl = io
    predictor = daemon._predictor
    original = predictor.predict

    def broken(window):
        raise BreathcastError(error)

    predictor.predict = broken
    try:
        send_trace(tx, 0, 0.0, 150)
        assert wait_gate(rx, reason) is not None
    finally:
        predictor.predict = original
    send_trace(tx, 150, 3.0, 5)
    assert wait_gate(rx, "ok") is not None
    assert ctl.status()["counters"]["model_errors"] >= 1


def test_gating_window_and_forecast_commands(io):
    """set_gating moves the gate to HOLD outside_gating_window; set_forecast changes the horizon in headers."""
    tx, rx, ctl = io
    seq, t = healthy(tx, rx)
    ctl.request("set_gating", kind="amplitude", amplitude_range=[5.0, 6.0])
    send_trace(tx, seq, t, 3)
    assert wait_gate(rx, "outside_gating_window") is not None
    assert ctl.request("set_forecast", horizon_s=0.2)["horizon_s"] == 0.2
    send_trace(tx, seq + 3, t + 0.06, 200)
    target = wait_for(rx, lambda m: m.topic == "target")
    assert target is not None and target.header["horizon_s"] == 0.2
    assert target.header["t_valid"] == pytest.approx(target.header["t_source"] + 0.2)
    ctl.request("set_forecast", horizon_s=0.0)


def test_control_errors_and_mode_switch(io):
    """Unknown and malformed commands get error replies; set_mode changes the mode at once."""
    tx, rx, ctl = io
    with pytest.raises(ControlError, match="unknown_command"):
        ctl.request("fly")
    for raw, code in ((b"\xc1", "not_msgpack"), (msgpack.packb([1]), "malformed"), (msgpack.packb({"cmd": "status"}), "bad_version"),
                      (msgpack.packb({"v": 1, "cmd": "set_mode", "mode": "sideways"}), "bad_argument"),
                      (msgpack.packb({"v": 1, "cmd": "set_gating", "amplitude_range": [1, 0]}), "bad_argument")):  # fmt: skip
        reply = ctl.request_raw(raw)
        assert reply["ok"] is False and reply["error"]["code"] == code
    assert ctl.request("set_mode", mode="window")["loading"] is False
    seq, t = healthy(tx, rx)
    send_trace(tx, seq, t, 3)
    target = wait_for(rx, lambda m: m.topic == "target")
    assert target is not None and target.header["mode"] == "window"
    ctl.request("set_mode", mode="snapshot")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=512),
                          st.dictionaries(st.sampled_from(["v", "type", "seq", "t", "amplitude", "raw", "valid", "samples"]),
                                          st.one_of(st.integers(-2, 3), st.floats(), st.text(max_size=5), st.booleans(),
                                                    st.lists(st.floats(), max_size=3)), max_size=7).map(msgpack.packb)),
                min_size=1, max_size=3))  # fmt: skip
def test_garbage_never_kills_the_daemon(daemon, data):
    """Random bytes and half-right maps on the input and control sockets are refused and counted; the daemon answers."""
    ep = daemon.config.endpoints
    with SampleSender(ep.input) as tx, ControlClient(ep.control, timeout_s=5.0) as ctl:
        for message in data:
            tx.send_bytes(message)
            tx.socket.send_multipart([message, message], zmq.NOBLOCK)
            reply = ctl.request_raw(message)
            assert reply["v"] == 1 and (reply["ok"] or reply["error"]["code"])
        assert ctl.status()["state"] == "running"
    assert all(t.is_alive() for t in daemon._threads)


def test_huge_input_is_rejected_and_counted(daemon):
    """A message over the 256 KiB limit is counted as too_large, and the daemon serves on."""
    ep = daemon.config.endpoints
    with SampleSender(ep.input) as tx, ControlClient(ep.control) as ctl:
        before = ctl.status()["counters"].get("malformed.too_large", 0)
        tx.send_bytes(b"\x00" * 300_000)
        end = time.monotonic() + 5
        while ctl.status()["counters"].get("malformed.too_large", 0) == before and time.monotonic() < end:
            time.sleep(0.05)
        assert ctl.status()["counters"].get("malformed.too_large", 0) == before + 1


def test_curve_allows_listed_clients_only(tiny_package, tiny_plan, tmp_path):  # noqa: F811
    """With CURVE, a listed client gets status messages; an unlisted CURVE client and a plain client get nothing."""
    keys, allowed = tmp_path / "server", tmp_path / "allowed"
    server_public, server_secret = make_keys(keys, "server")
    _, console_secret = make_keys(allowed, "console")
    _, intruder_secret = make_keys(tmp_path / "intruder", "intruder")
    config = make_config(tmp_path, security={"server_secret_key": str(server_secret), "client_keys_dir": str(allowed)})
    from breathcast.stream.daemon import Daemon

    daemon = Daemon(config, plan=tiny_plan, package=tiny_package).start()
    try:
        ep = config.endpoints
        good, bad = CurveKeys(server_public, console_secret), CurveKeys(server_public, intruder_secret)
        with Subscriber(ep.publish, curve=good) as ok, Subscriber(ep.publish, curve=bad) as intruder, Subscriber(ep.publish) as plain:
            assert ok.recv(5.0) is not None
            assert intruder.recv(1.0) is None and plain.recv(0.1) is None
        with ControlClient(ep.control, curve=bad, timeout_s=1.0) as ctl, pytest.raises(BreathcastError, match="no reply"):
            ctl.request("status")
        with SampleSender(ep.input, curve=bad) as tx, ControlClient(ep.control, curve=good) as ctl:
            send_trace(tx, 0, 0.0, 20)
            time.sleep(0.5)
            assert ctl.status()["counters"].get("samples_received", 0) == 0
    finally:
        daemon.stop()
        daemon.wait(15.0)


_KILL_SCRIPT = """
import sys, time, numpy as np
from breathcast.engine.package import read_package
from breathcast.engine.predictor import Plan
from breathcast.geometry import Grid, Volume
from breathcast.stream.config import config_from_dict
from breathcast.stream.daemon import Daemon
grid = Grid.centered((16, 16, 16), (200.0, 200.0, 160.0))
hu = np.random.default_rng(0).uniform(-1000, 400, size=grid.shape).astype(np.float32)
plan = Plan(Volume(hu, grid), np.linspace(0.1, 0.4, 16), target_lps_mm=np.zeros((1, 3)))
config = config_from_dict({"path": "direct", "threads": 1, "session_log": sys.argv[2], "fsync_interval_s": 5.0,
                           "endpoints": {"input": sys.argv[3], "publish": sys.argv[4], "field": sys.argv[5], "control": sys.argv[6]}})
Daemon(config, plan=plan, package=read_package(sys.argv[1])).start()
print("started", flush=True)
time.sleep(600)
"""


def test_sigkilled_session_log_is_complete(tiny_package, tmp_path):  # noqa: F811
    """Every sample the daemon accepted before a SIGKILL is in its session log, in order, and the log reads back."""
    ep = loopback_endpoints()
    log = tmp_path / "killed.bclog"
    process = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tiny_package.path), str(log), ep["input"], ep["publish"],
                                ep["field"], ep["control"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        with ControlClient(ep["control"], timeout_s=60.0) as ctl, SampleSender(ep["input"]) as tx:
            ctl.wait_until_running(120.0)
            for k in range(300):  # one by one, as a live source
                tx.send(k, k * 0.02, float(breathing(k * 0.02)))
                if k % 50 == 0:
                    time.sleep(0.01)
            end = time.monotonic() + 10
            while ctl.status()["counters"].get("samples_accepted", 0) < 300 and time.monotonic() < end:
                time.sleep(0.02)
            time.sleep(0.1)  # the contract: at most the last 100 ms may be lost
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    contents = read_session_log(log)
    seqs = [r["seq"] for r in contents.of_type("sample")]
    assert seqs == list(range(300))
    assert contents.records[0]["type"] == "session" and len(contents.of_type("gate")) >= 1
    assert os.path.getsize(log) - contents.truncated_bytes > 300 * 20
