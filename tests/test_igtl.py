"""``breathcast igtl``: the OpenIGTLink bridge against a real daemon on loopback, with pyigtl as the client.

What Slicer does with the messages is done here with SimpleITK the way Slicer hands volumes and grid transforms
to ITK (RAS -> LPS: x and y change sign in geometry and vectors; a grid transform "from parent" is ITK's
resampling transform), so the field test holds the convention, not only the bytes.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from stream_fixtures import (  # noqa: F401  (fixtures)
    ALWAYS_INSIDE,
    D,
    breathing,
    make_config,
    running_daemon,
    tiny_package,
)

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume, field_from_lps_mm
from breathcast.stream.client import SampleSender, Subscriber
from breathcast.stream.igtl import IGTLBridge, IGTLConfig
from breathcast.warp import warp_image

pyigtl = pytest.importorskip("pyigtl")
sitk = pytest.importorskip("SimpleITK")

TARGETS_LPS_MM = [[30.0, -20.0, 10.0], [-40.0, 25.0, -15.0]]


@pytest.fixture(scope="module")
def plan():
    """A 16³ random CT (HU) with two target points off the centre, so that every LPS -> RAS sign shows."""
    from breathcast.engine.predictor import Plan

    grid = Grid.centered((D, D, D), (200.0, 200.0, 160.0))
    hu = np.random.default_rng(18).uniform(-1000, 400, size=grid.shape).astype(np.float32)
    return Plan(Volume(hu, grid), np.linspace(0.1, 0.4, D), target_lps_mm=np.array(TARGETS_LPS_MM),
                frame_of_reference_uid="1.2.3.18", name="igtl")  # fmt: skip


@pytest.fixture(scope="module")
def daemon(tiny_package, plan, tmp_path_factory):  # noqa: F811
    """A daemon serving :func:`plan` (direct path, float32 field on the model grid, gating always inside)."""
    config = make_config(tmp_path_factory.mktemp("igtl-daemon"), gating=ALWAYS_INSIDE)
    with running_daemon(config, plan, tiny_package) as d:
        yield d


@contextmanager
def bridge_for(daemon_config, plan=None, **options):
    """A started bridge on a free loopback port for the daemon of ``daemon_config``."""
    ep = daemon_config.endpoints
    config = IGTLConfig(publish=ep.publish, field=ep.field, port=0, **{"field_rate_hz": 20.0, **options})
    bridge = IGTLBridge(config, plan).start()
    try:
        yield bridge
    finally:
        assert bridge.wait(5.0), "bridge threads did not stop"


@contextmanager
def igtl_client(port: int):
    client = pyigtl.OpenIGTLinkClient(host="127.0.0.1", port=port)
    try:
        yield client
    finally:
        client.stop()


@contextmanager
def breathing_source(daemon_config, rate_hz: float = 50.0):
    """Send a 4 s cosine breath at ``rate_hz`` in real time (a thread) until the block ends."""
    stop = threading.Event()

    def run() -> None:
        with SampleSender(daemon_config.endpoints.input) as tx:
            start, k = time.monotonic(), 0
            while not stop.is_set():
                t = k / rate_hz
                tx.send(k, t, float(breathing(t)))
                k += 1
                time.sleep(max(0.0, start + k / rate_hz - time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)


def collect(client, seconds: float, until=None) -> list:
    """Every message the pyigtl client holds, polled every 2 ms for ``seconds`` (or until ``until(messages)``)."""
    out: list = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until and until(out)):
        out.extend(client.get_latest_messages())
        time.sleep(0.002)
    return out


def wait_device(client, device: str, timeout_s: float = 10.0, predicate=lambda m: True):
    """The first message of ``device`` for which ``predicate`` holds, or None."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        message = client.wait_for_message(device, timeout=0.05)
        if message is not None and predicate(message):
            return message
    return None


def itk_image(message, vector: bool = False):
    """An IGTL IMAGE as Slicer hands it to ITK: IJK-to-RAS becomes LPS geometry; vector x and y change sign."""
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    matrix = np.asarray(message.ijk_to_world_matrix, dtype=np.float64)
    columns = ras_to_lps @ matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    data = np.asarray(message.image, dtype=np.float64)
    if vector:
        data = data * np.array([-1.0, -1.0, 1.0])
    image = sitk.GetImageFromArray(data, isVector=vector)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((ras_to_lps @ matrix[:3, 3]).tolist())
    image.SetDirection((columns / spacing).ravel().tolist())
    return image


def slicer_warp(ct_message, field_message, vector_sign=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The CT under the field as a Slicer grid transform "from parent" shows it, computed with SimpleITK:
    ITK's DisplacementFieldTransform is the resampling transform, ``Resample`` samples the CT at ``T(p)``."""
    field = itk_image(field_message, vector=True)
    if vector_sign != (1.0, 1.0, 1.0):  # the wrong conventions the test must tell apart
        array = sitk.GetArrayFromImage(field) * np.asarray(vector_sign)
        changed = sitk.GetImageFromArray(array, isVector=True)
        changed.CopyInformation(field)
        field = changed
    geometry = (field.GetSize(), field.GetOrigin(), field.GetSpacing(), field.GetDirection())
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    size, origin, spacing, direction = geometry
    warped = sitk.Resample(itk_image(ct_message), size, transform, sitk.sitkLinear, origin, spacing, direction, -5000.0, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(warped)


def test_devices_and_target_translation_is_the_daemons_target_in_ras(daemon, plan):
    """Target, Target2, Gate, MotionField and PlanningCT arrive; each TRANSFORM's translation is the daemon's
    ``target_lps_mm`` of the same frame as RAS (-x, -y, z), and Gate is that frame's state and reason."""
    with bridge_for(daemon.config, plan) as bridge, igtl_client(bridge.port) as client, \
            Subscriber(daemon.config.endpoints.publish, topics=("target", "gate")) as rx:  # fmt: skip
        time.sleep(0.3)
        with breathing_source(daemon.config):
            messages = collect(client, 12.0, until=lambda ms: sum(m.device_name == "Target2" for m in ms) >= 20)
        daemon_targets, daemon_gates = {}, {}
        while (m := rx.recv(0.2)) is not None:
            (daemon_targets if m.topic == "target" else daemon_gates)[m.header["frame"]] = m.header
    devices = {m.device_name for m in messages}
    assert {"PlanningCT", "Target", "Target2", "Gate", "MotionField"} <= devices, devices
    assert {m.message_type for m in messages if m.device_name.startswith("Target")} == {"TRANSFORM"}
    matched = 0
    for m in messages:
        if m.device_name in ("Target", "Target2") and int(m.metadata["frame"]) in daemon_targets:
            lps = daemon_targets[int(m.metadata["frame"])]["target_lps_mm"][0 if m.device_name == "Target" else 1]
            np.testing.assert_allclose(m.matrix[:3, 3], [-lps[0], -lps[1], lps[2]], atol=1e-3)
            np.testing.assert_allclose(m.matrix[:3, :3], np.eye(3), atol=0)
            matched += 1
    assert matched >= 20, f"only {matched} TRANSFORMs matched a daemon frame"
    moved = [daemon_targets[f]["target_displacement_mm"][1] for f in daemon_targets]
    assert np.abs(moved).max() > 1e-3, "the tiny model should move the targets"
    gates = [m for m in messages if m.device_name == "Gate" and m.metadata.get("frame", "") != ""]
    assert gates and all(m.message_type == "STRING" for m in gates)
    for m in gates:
        h = daemon_gates.get(int(m.metadata["frame"]))
        if h is not None:
            assert m.string == f"{h['state']} {h['reason']}"
    assert any(m.string == "BEAM_ON ok" for m in gates)


def test_motion_field_applied_as_slicer_would_gives_the_daemons_warped_ct(daemon, plan):
    """PlanningCT and MotionField through SimpleITK as Slicer applies a grid transform (from parent) reproduce the
    daemon's warped CT, ``planning_ct(p + u(p))`` by breathcast's own warp, within 1 HU; the modelling direction
    (-u) or LPS vectors taken for RAS miss by far."""
    ep = daemon.config.endpoints
    with bridge_for(daemon.config, plan) as bridge, igtl_client(bridge.port) as client, \
            Subscriber(ep.field, topics=("field",), rcvhwm=1000) as rx:  # fmt: skip
        ct = wait_device(client, "PlanningCT")
        assert ct is not None, "no PlanningCT"
        time.sleep(0.3)
        with breathing_source(daemon.config):
            images = collect(client, 10.0, until=lambda ms: sum(m.device_name == "MotionField" for m in ms) >= 3)
        fields = {}
        while (m := rx.recv(0.2)) is not None:
            fields[m.header["frame"]] = m
    # the CT arrives exactly, on its own grid in RAS
    np.testing.assert_array_equal(np.asarray(ct.image, np.float32), plan.volume.array)
    np.testing.assert_allclose(ct.ijk_to_world_matrix[:3, 3], [-g if a < 2 else g for a, g in enumerate(plan.volume.grid.origin)], atol=1e-3)
    checked = 0
    for image in (m for m in images if m.device_name == "MotionField"):
        daemon_field = fields.get(int(image.metadata["frame"]))
        if daemon_field is None:
            continue
        h = daemon_field.header
        grid = Grid(tuple(h["grid"]["shape"]), tuple(h["grid"]["spacing_mm"]), tuple(h["grid"]["origin_mm"]),
                    tuple(map(tuple, np.reshape(h["grid"]["direction"], (3, 3)))))  # fmt: skip
        assert grid.shape == plan.volume.grid.shape and np.allclose(grid.affine, plan.volume.grid.affine)
        u = field_from_lps_mm(np.asarray(daemon_field.array, np.float32), grid)  # (dz, dy, dx) voxels
        reference = warp_image(plan.volume.array, u)
        # compare where p + u(p) lies inside the CT: outside, ITK returns the default value and breathcast the border
        index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")) + u
        inside = np.all((index >= 0) & (index <= np.asarray(grid.shape)[:, None, None, None] - 1), axis=0)
        assert inside.mean() > 0.5
        slicer = slicer_warp(ct, image)
        np.testing.assert_allclose(slicer[inside], reference[inside], atol=1.0)
        for wrong in ((-1.0, -1.0, -1.0), (-1.0, -1.0, 1.0)):  # modelling direction; RAS vectors read as LPS
            assert np.abs(slicer_warp(ct, image, wrong)[inside] - reference[inside]).max() > 20.0, wrong
        checked += 1
    assert checked >= 1, "no MotionField matched a daemon field"


def test_a_client_that_reconnects_mid_stream_gets_the_planning_ct_again(daemon, plan):
    """A client that leaves mid-stream and comes back gets PlanningCT again and the stream goes on; a client
    connected throughout is not disturbed."""
    with bridge_for(daemon.config, plan) as bridge, breathing_source(daemon.config), igtl_client(bridge.port) as steady:
        with igtl_client(bridge.port) as first:
            assert wait_device(first, "PlanningCT") is not None
            assert wait_device(first, "Target", 8.0) is not None
        time.sleep(0.5)  # gone mid-stream: the bridge notices and serves on
        with igtl_client(bridge.port) as again:
            ct = wait_device(again, "PlanningCT")
            assert ct is not None, "no PlanningCT after reconnecting"
            np.testing.assert_array_equal(np.asarray(ct.image, np.float32), plan.volume.array)
            assert wait_device(again, "Target", 5.0) is not None
        steady.get_latest_messages()
        assert wait_device(steady, "Target", 5.0) is not None
    assert bridge.counters["clients_connected"] == 3


def test_the_bridge_survives_the_daemon_going_away_and_coming_back(tiny_package, plan, tmp_path):  # noqa: F811
    """When the daemon stops, Gate says HOLD daemon_silent; a daemon started again on the same endpoints is
    picked up without restarting the bridge."""
    config = make_config(tmp_path, gating=ALWAYS_INSIDE)
    with bridge_for(config, plan, daemon_silence_s=0.6) as bridge, igtl_client(bridge.port) as client:
        for round_ in range(2):
            with running_daemon(config, plan, tiny_package), breathing_source(config):
                assert wait_device(client, "Target", 10.0) is not None, f"no Target from daemon {round_ + 1}"
            silent = wait_device(client, "Gate", 5.0, lambda m: m.string == "HOLD daemon_silent")
            assert silent is not None, "no HOLD daemon_silent after the daemon stopped"
        assert bridge.counters["daemon_silent"] >= 2  # (one more if the first daemon was slow to start)


def test_motion_field_from_a_daemon_that_sends_fields_by_its_ring_only(tiny_package, plan, tmp_path):  # noqa: F811
    """With ``[field] tcp = false, ring = true`` (docs/protocol.md 4.6) the bridge reads the field from the ring:
    MotionField holds the daemon's field of that frame, in RAS."""
    config = make_config(tmp_path, gating=ALWAYS_INSIDE, field={"tcp": False, "ring": True, "ring_path": str(tmp_path / "f.ring")})
    with running_daemon(config, plan, tiny_package), bridge_for(config, plan) as bridge, igtl_client(bridge.port) as client, \
            Subscriber(config.endpoints.field, topics=("ring",), rcvhwm=1000) as rx:  # fmt: skip
        fields, images = {}, []  # the test reads the ring as it goes: a slot is reused 4 fields later
        with breathing_source(config):
            end = time.monotonic() + 10.0
            while time.monotonic() < end and not any(int(m.metadata["frame"]) in fields for m in images):
                while (m := rx.recv(0.005)) is not None:
                    if m.array is not None:
                        fields[m.header["frame"]] = m.array
                images += [m for m in client.get_latest_messages() if m.device_name == "MotionField"]
    matched = [m for m in images if int(m.metadata["frame"]) in fields]
    assert matched, f"no MotionField from a ring-only daemon matched its ring ({len(images)} images, {len(fields)} fields)"
    image = matched[0]
    u = fields[int(image.metadata["frame"])]
    np.testing.assert_allclose(np.moveaxis(np.asarray(image.image), -1, 0), u * np.array([-1.0, -1.0, 1.0])[:, None, None, None], atol=1e-6)


def test_a_bridge_with_another_plan_than_the_daemons_says_so(daemon, plan):
    """A bridge whose PlanningCT is not the daemon's plan (another hash in ``status``) logs and counts it once."""
    from breathcast.engine.predictor import Plan

    other = Plan(plan.volume.with_array(plan.volume.array + 1.0), plan.amplitude, plan.target_lps_mm, plan.frame_of_reference_uid, "other")
    with bridge_for(daemon.config, other) as bridge:
        end = time.monotonic() + 5.0
        while time.monotonic() < end and not bridge.counters["plan_mismatch"]:
            time.sleep(0.05)
        time.sleep(0.6)  # more status messages: still counted once
    assert bridge.counters["plan_mismatch"] == 1
    with bridge_for(daemon.config, plan) as bridge:
        time.sleep(0.8)
    assert bridge.counters["statuses"] >= 1 and bridge.counters["plan_mismatch"] == 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"host": "0.0.0.0"}, "not loopback"),
        ({"host": "192.168.1.20"}, "not loopback"),
        ({"port": 70000}, "port must be"),
        ({"port": -1}, "port must be"),
        ({"field_rate_hz": -1.0}, "field_rate_hz"),
        ({"field_rate_hz": float("nan")}, "field_rate_hz"),
        ({"daemon_silence_s": 0.0}, "daemon_silence_s"),
        ({"header_version": 3}, "header_version"),
    ],
)
def test_bad_config_is_refused_with_the_reason(options, match):
    """Every bad setting is refused by name; a non-loopback host needs allow_insecure_remote."""
    with pytest.raises(BreathcastError, match=match):
        IGTLConfig(**options)


def test_non_loopback_is_allowed_only_when_asked():
    """allow_insecure_remote lifts the loopback rule (OpenIGTLink has no authentication to offer instead)."""
    assert IGTLConfig(host="0.0.0.0", allow_insecure_remote=True).host == "0.0.0.0"


def test_cli_bad_input_is_one_line(capsys):
    """`breathcast igtl` with a non-loopback host, or a port already taken, ends with one line and code 2."""
    import socket

    from breathcast.cli import main

    assert main(["igtl", "--no-ct", "--host", "10.0.0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("breathcast: error: igtl host 10.0.0.1 is not loopback") and "\n" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["igtl", "--no-ct", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("breathcast: error: cannot listen on 127.0.0.1:") and "\n" not in err
    assert main(["igtl", "--no-ct", "--port", "0", "--publish", "tcp://127.0.0.1"]) == 2  # no port
    err = capsys.readouterr().err.strip()
    assert err.startswith("breathcast: error: cannot subscribe to the daemon at tcp://127.0.0.1") and "\n" not in err
