"""Fields without bytes and the same-host ring (issue 17): a client makes the published field from the coefficients
and the per-frame state; ring fields read from the file by docs/protocol.md alone equal the TCP fields."""

from __future__ import annotations

import mmap
import os
import stat
import struct
import time

import msgpack
import numpy as np
import pytest
import zmq
from stream_fixtures import (  # noqa: F401  (fixtures)
    ALWAYS_INSIDE,
    make_config,
    running_daemon,
    send_trace,
    tiny_package,
    tiny_plan,
)

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.stream.client import ControlClient, ControlError, SampleSender, Subscriber
from breathcast.stream.faults import Fuzzer, run_fuzz
from breathcast.stream.field_coefficients import FieldModel, reference_field
from breathcast.stream.shm_ring import RingReader, RingWriter, TornRead

FIELD_SHAPE = (20, 24, 28)  # the model grid is 16³: the resize runs along every axis


def _breathe(tx, start_seq: int = 0, t0: float = 0.0) -> None:
    """A full window at once, then 0.6 s paced at 50 Hz: one frame per paced sample."""
    seq = send_trace(tx, start_seq, t0, 150)
    send_trace(tx, seq, t0 + 3.0, 30, pace=True)


def _collect(subscriber, topics: set[str], frames_wanted: int, timeout_s: float = 20.0) -> dict[str, dict[int, object]]:
    """Messages per topic and frame until ``frames_wanted`` frames have every topic."""
    got: dict[str, dict[int, object]] = {t: {} for t in topics}
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        m = subscriber.recv(0.2)
        if m is not None and m.topic in got:
            got[m.topic][m.header["frame"]] = m
        if len(set.intersection(*(set(v) for v in got.values()))) >= frames_wanted:
            break
    return got


@pytest.fixture(scope="module", params=["float32", "float16"])
def distilled_daemon(request, tiny_package, tiny_plan, tmp_path_factory):  # noqa: F811
    """A distilled daemon publishing a float32 field on FIELD_SHAPE, by TCP and the ring, coefficients in the param's dtype."""
    folder = tmp_path_factory.mktemp("fields")
    config = make_config(folder, path="distilled", gating=ALWAYS_INSIDE,
                         field={"shape": list(FIELD_SHAPE), "ring": True, "ring_path": str(folder / "fields.ring"),
                                "coefficients_dtype": request.param})  # fmt: skip
    with running_daemon(config, tiny_plan, tiny_package, timeout_s=180.0) as d:
        yield d


def test_state_only_client_makes_the_published_field(distilled_daemon):
    """The field made by the client from the ``coefficients`` reply and a ``state`` message equals the published field of
    that frame within 1e-3 mm (and the doc's plain-numpy evaluation within 1e-3 mm too)."""
    ep = distilled_daemon.config.endpoints
    with ControlClient(ep.control) as ctl, Subscriber([ep.publish, ep.field], topics=("state", "field"), rcvhwm=1000) as rx, \
            SampleSender(ep.input) as tx:  # fmt: skip
        model = ctl.field_model()
        status = ctl.status()
        assert status["field"]["coefficients"]["hash"] == model.hash and model.dtype == distilled_daemon.config.field.coefficients_dtype
        assert model.coefficients.shape == (8, 3, 16, 16, 16) and model.grid.frame_of_reference_uid == "1.2.3.4"
        quantization = status["field"]["coefficients"]["quantization_error_mm"]
        assert (quantization > 0) == (model.dtype == "float16") and quantization < 0.05
        time.sleep(0.3)
        _breathe(tx)
        got = _collect(rx, {"state", "field"}, 3)
    frames = sorted(set(got["state"]) & set(got["field"]))
    assert len(frames) >= 3, f"state and field of the same frame: {len(frames)}"
    moved = 0.0
    for frame in frames:
        state, field = got["state"][frame].header, got["field"][frame]
        assert state["coefficients"] == {"version": model.version, "hash": model.hash}
        assert len(state["slice_amplitude"]) == len(state["slice_rate"]) == 16
        mine = model.field(state["slice_amplitude"], state["slice_rate"], shape=FIELD_SHAPE)
        np.testing.assert_allclose(mine, field.array, atol=1e-3, rtol=0)
        reference = reference_field(model.coefficients, model.terms, state["slice_amplitude"], state["slice_rate"], FIELD_SHAPE)
        np.testing.assert_allclose(reference, field.array, atol=1e-3, rtol=0)
        moved = max(moved, float(np.abs(field.array).max()))
    assert moved > 0.01, "the tiny model should move something"


def test_field_at_a_point_agrees_with_the_target(distilled_daemon):
    """``FieldModel.at_lps`` at the target's position now gives minus its displacement (pull-back), as the daemon solved it."""
    ep = distilled_daemon.config.endpoints
    with ControlClient(ep.control) as ctl, Subscriber(ep.publish, topics=("state", "target")) as rx, SampleSender(ep.input) as tx:
        model = ctl.field_model()
        ctl.request("reset")
        time.sleep(0.3)
        _breathe(tx)
        got = _collect(rx, {"state", "target"}, 1)
    frame = max(set(got["state"]) & set(got["target"]))
    state, target = got["state"][frame].header, got["target"][frame].header
    # docs/protocol.md section 10, raw zmq + msgpack: the coefficients reply and the state give the model-grid field
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.connect(ep.control)
    try:
        req.send(msgpack.packb({"v": 1, "cmd": "coefficients"}))
        assert req.poll(10_000)
        reply, raw = req.recv_multipart()
    finally:
        req.close(0)
        ctx.term()
    c = msgpack.unpackb(reply)["coefficients"]
    assert c["hash"] == state["coefficients"]["hash"] and c["nbytes"] == len(raw)
    C = np.frombuffer(raw, dtype=c["dtype"]).reshape(c["shape"]).astype(np.float32)
    a_, r_ = np.array(state["slice_amplitude"]), np.array(state["slice_rate"])
    basis = np.stack([a_**i * r_**j for i, j in c["terms"]], axis=-1).astype(np.float32)
    np.testing.assert_allclose(np.einsum("zk,kczyx->czyx", basis, C), model.field(a_, r_), atol=1e-4)
    u = model.at_lps(state["slice_amplitude"], state["slice_rate"], np.asarray(target["target_lps_mm"]))
    np.testing.assert_allclose(u[0], -np.asarray(target["target_displacement_mm"][0]), atol=0.02)


def test_ring_fields_read_by_the_document_equal_the_tcp_fields(distilled_daemon):
    """A ``ring`` message's slot, read with mmap + struct as docs/protocol.md 4.6 says, holds the bytes of the ``field``
    message of the same frame; the file is 0600; the Python client reads the same."""
    ep, path = distilled_daemon.config.endpoints, distilled_daemon.config.field.ring_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = 1000
    sub.connect(ep.field)
    for topic in (b"field", b"ring"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    fd = os.open(path, os.O_RDONLY)
    ring = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    os.close(fd)
    try:
        magic, layout, slots, stride, capacity, _pid = struct.unpack_from("<8sIIQQQ", ring, 0)
        assert (magic, layout, slots) == (b"BCRING1\x00", 1, 4) and stride % 4096 == 0 and capacity >= 3 * np.prod(FIELD_SHAPE) * 4
        with SampleSender(ep.input) as tx, ControlClient(ep.control) as ctl:
            ctl.request("reset")
            time.sleep(0.3)
            _breathe(tx)
            fields, rings = {}, {}
            end = time.monotonic() + 20
            while time.monotonic() < end and len(set(fields) & set(rings)) < 2:
                if not sub.poll(200):
                    continue
                topic, header, *payload = sub.recv_multipart()
                h = msgpack.unpackb(header)
                if topic == b"field":
                    fields[h["frame"]] = payload[0]
                    continue
                assert payload == [] and h["topic"] == "ring" and h["ring"]["seq"] == h["msg_seq"]
                slot, offset = h["ring"]["slot"], h["ring"]["offset"]
                base = 4096 + slot * stride
                seq_before, frame, nbytes = struct.unpack_from("<QQQ", ring, base)
                data = bytes(ring[offset : offset + h["nbytes"]])
                (seq_after,) = struct.unpack_from("<Q", ring, base)
                assert offset == base + 64 and nbytes == h["nbytes"] and ring[base + 24 : base + 27] == h["dtype"].encode()
                if seq_before == seq_after == h["ring"]["seq"]:
                    assert frame == h["frame"]
                    rings[h["frame"]] = data
        common = set(fields) & set(rings)
        assert len(common) >= 2
        for frame in common:
            assert rings[frame] == fields[frame]
    finally:
        sub.close(0)
        ctx.term()
        ring.close()
    with Subscriber(ep.field, topics=("ring",)) as rx, SampleSender(ep.input) as tx:
        time.sleep(0.3)
        _breathe(tx, 10_000, 100.0)
        m = None
        end = time.monotonic() + 10
        while (m is None or m.array is None) and time.monotonic() < end:
            m = rx.recv(0.5)
        assert m is not None and m.array.shape == (3, *FIELD_SHAPE) and m.array.dtype == np.float32


def test_fuzzed_control_with_coefficients_replies_keeps_every_invariant(distilled_daemon):
    """On the distilled path the fuzzer's bare ``coefficients`` requests get their two-frame reply, and the REQ socket
    and every other invariant hold around them."""
    ep = distilled_daemon.config.endpoints
    report = run_fuzz({"input": ep.input, "control": ep.control}, Fuzzer(seed=4, paths=("distilled",)), n_input=300,
                      control_every=2, rate_hz=2000.0)  # fmt: skip
    assert report.violations == [] and report.control_replies == report.control_requests == 150
    assert report.payload_replies > 0


def test_a_new_predictor_starts_its_own_latencies(distilled_daemon):
    """status.latency_ms counts the frames of the predictor that serves now: a load clears what earlier ones left
    (the new predictor makes at most one frame of the window it finds)."""
    ep = distilled_daemon.config.endpoints
    with SampleSender(ep.input) as tx, ControlClient(ep.control) as ctl:
        send_trace(tx, 0, 0.0, 150)
        send_trace(tx, 150, 3.0, 50, pace=True)  # one frame per sample or so
        time.sleep(0.3)
        assert ctl.status()["latency_ms"]["compute_ms"]["n"] >= 5
        for path in ("direct", "distilled"):  # back to the module's path for the tests after this one
            assert ctl.request("set_mode", path=path)["loading"] is True
            status = ctl.wait_until_running(120.0)
            time.sleep(0.3)
            latency = ctl.status()["latency_ms"]
            assert status["path"] == path and all(latency[k]["n"] <= 1 for k in ("compute_ms", "target_ms", "field_ms")), latency


def test_coefficients_on_the_direct_path_are_unavailable(tiny_package, tiny_plan, tmp_path):  # noqa: F811
    """The direct path has no polynomial: ``coefficients`` answers ``unavailable`` (and the daemon serves on), and no
    ``state`` is published; ``ring`` with ``tcp = false`` sends no field bytes, only ring messages."""
    config = make_config(tmp_path, gating=ALWAYS_INSIDE, field={"ring": True, "tcp": False, "ring_path": str(tmp_path / "d.ring")})
    with running_daemon(config, tiny_plan, tiny_package) as daemon:
        ep = daemon.config.endpoints
        with ControlClient(ep.control) as ctl, SampleSender(ep.input) as tx, \
                Subscriber([ep.publish, ep.field], topics=("state", "field", "ring", "target"), rcvhwm=1000) as rx:  # fmt: skip
            with pytest.raises(ControlError, match="unavailable: the direct path has no polynomial"):
                ctl.field_model()
            with pytest.raises(ControlError, match="bad_argument: coefficients takes no arguments"):
                ctl.request("coefficients", grid=2)
            assert ctl.status()["state"] == "running"
            time.sleep(0.3)
            _breathe(tx)
            time.sleep(0.5)
            seen: dict[str, list] = {}
            while (m := rx.recv(0.5)) is not None:
                seen.setdefault(m.topic, []).append(m)
        # read after the fact: the last ring_slots fields are still in their slots, older slots were reused (torn)
        rings = seen.get("ring", [])
        assert len(rings) >= 5 and len(seen.get("target", [])) >= 5
        assert all(m.array is not None and np.all(np.isfinite(m.array)) for m in rings[-3:])
        assert rx.ring_torn == sum(m.array is None for m in rings)
        assert "field" not in seen and "state" not in seen
    assert not (tmp_path / "d.ring").exists(), "the ring file is removed at shutdown"


# -- units -----------------------------------------------------------------------------------------------------


def test_ring_reader_detects_a_reused_slot(tmp_path):
    """A slot reused after its announcement (or while being written) is refused, not read as the announced field."""
    writer = RingWriter(tmp_path / "r.ring", slots=2, capacity=64)
    with RingReader(tmp_path / "r.ring") as reader:
        slot, view = writer.begin(np.dtype("<f4"), (4,))
        view[:] = [1, 2, 3, 4]
        with pytest.raises(TornRead):  # being written: seq 0
            reader.read(slot, 1, np.dtype("<f4"), (4,))
        writer.commit(slot, seq=1, frame=1)
        np.testing.assert_array_equal(reader.read(slot, 1, np.dtype("<f4"), (4,)), [1, 2, 3, 4])
        for seq in (2, 3):  # two more fields: slot 0 is reused
            s, v = writer.begin(np.dtype("<f4"), (4,))
            v[:] = seq
            writer.commit(s, seq=seq, frame=seq)
        with pytest.raises(TornRead, match="no longer holds field 1"):
            reader.read(slot, 1, np.dtype("<f4"), (4,))
        assert reader.torn == 2
    writer.close()
    assert not (tmp_path / "r.ring").exists()


def test_ring_writer_refuses_links_and_open_modes(tmp_path):
    """The ring is never created through a link nor readable by every user."""
    (tmp_path / "target").write_bytes(b"")
    os.symlink(tmp_path / "target", tmp_path / "link.ring")
    with pytest.raises(BreathcastError, match="not a plain file"):
        RingWriter(tmp_path / "link.ring", slots=2, capacity=8)
    with pytest.raises(BreathcastError, match="every user"):
        RingWriter(tmp_path / "x.ring", slots=2, capacity=8, mode=0o644)
    old = os.umask(0o000)
    try:
        w = RingWriter(tmp_path / "ok.ring", slots=2, capacity=8, mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ok.ring").st_mode) == 0o640
    w.close()


def test_field_model_wire_round_trip_and_hash():
    """A model survives header + raw bytes; a flipped byte is refused by its hash; a huge state is a non-finite field."""
    grid = Grid.centered((4, 5, 6), (40.0, 50.0, 60.0))
    rng = np.random.default_rng(1)
    model = FieldModel(rng.normal(size=(3, 3, 4, 5, 6)).astype(np.float16), ((0, 0), (1, 0), (0, 1)), grid, version=2)
    header = {**model.header()}
    payload = bytearray(model.coefficients.tobytes())
    again = FieldModel.from_wire(msgpack.unpackb(msgpack.packb(header)), bytes(payload))
    a, r = np.linspace(0, 1, 4), np.full(4, 0.3)
    np.testing.assert_array_equal(again.field(a, r, (7, 3, 9)), model.field(a, r, (7, 3, 9)))
    np.testing.assert_allclose(model.field(a, r, (7, 3, 9)), reference_field(model.coefficients, model.terms, a, r, (7, 3, 9)), atol=1e-5)
    payload[5] ^= 1
    with pytest.raises(BreathcastError, match="hash"):
        FieldModel.from_wire(header, bytes(payload))
    with pytest.raises(BreathcastError, match="non-finite"):
        model.field(np.full(4, 1e5), r, dtype=np.float16)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"field": {"tcp": False}}, "needs tcp or ring"),
        ({"field": {"ring": True, "ring_mode": 0o644}}, "ring_mode"),
        ({"field": {"ring_slots": 1}}, "ring_slots"),
        ({"field": {"coefficients_dtype": "int8"}}, "coefficients_dtype"),
        ({"nice": -21}, "nice must be"),
        ({"realtime_priority": 100}, "realtime_priority must be"),
    ],
)
def test_field_and_scheduling_settings_are_validated(data, match):
    """Settings that cannot work are refused at load, naming the key."""
    from breathcast.stream.config import config_from_dict

    with pytest.raises(BreathcastError, match=match):
        config_from_dict(data)


def test_rows_that_never_move_are_written_once():
    """With ``zeros_kept`` a buffer last written by the same model gets the same field as a fresh one; a model whose
    coefficients are zero in some rows leaves those rows alone then (and writes them when not told)."""
    grid = Grid.centered((6, 7, 8), (60.0, 70.0, 80.0))
    rng = np.random.default_rng(3)
    c = rng.normal(size=(3, 3, 6, 7, 8)).astype(np.float32)
    c[:, :, :, :3] = 0.0  # rows y < 3 never move
    model = FieldModel(c, ((0, 0), (1, 0), (0, 1)), grid)
    a, r = np.full(6, 0.4), np.full(6, -0.2)
    fresh = model.field(a, r, (9, 10, 11))
    out = np.full((3, 9, 10, 11), 7.0, np.float32)  # garbage: must be overwritten when not told
    np.testing.assert_array_equal(model.field(a + 0.3, r, (9, 10, 11), out=out), model.field(a + 0.3, r, (9, 10, 11)))
    np.testing.assert_array_equal(model.field(a, r, (9, 10, 11), out=out, zeros_kept=True), fresh)
    out[:, :, 0] = 7.0  # a row that never moves: zeros_kept trusts it
    assert np.all(model.field(a, r, (9, 10, 11), out=out, zeros_kept=True)[:, :, 0] == 7.0)
    assert np.all(fresh[:, :, 0] == 0.0)


def test_ring_path_and_a_stale_ring_of_a_killed_daemon(tmp_path):
    """The default ring path names the user and the field port; a stale ring of this user is replaced, not reused."""
    from breathcast.stream.daemon import default_ring_path

    path = default_ring_path("tcp://127.0.0.1:5562")
    assert path.name == f"breathcast-{os.getuid()}-5562.ring"
    assert default_ring_path("ipc:///tmp/a.ipc") != default_ring_path("ipc:///tmp/b.ipc")
    stale = tmp_path / "stale.ring"
    stale.write_bytes(b"x" * 10)
    ring = RingWriter(stale, slots=2, capacity=16)
    with RingReader(stale) as reader:
        assert (reader.slots, reader.capacity, reader.writer_pid) == (2, 16, os.getpid())
        assert reader.seq(0) == reader.seq(1) == 0
    ring.close()
