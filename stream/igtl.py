"""``breathcast igtl``: an OpenIGTLink bridge, so that 3D Slicer (OpenIGTLinkIF) shows the prediction live.

The bridge is a client of the daemon like any other (:class:`~breathcast.stream.client.Subscriber` on ``publish``
and ``field``, topics ``field`` or ``ring``), so it can never slow the daemon; it serves OpenIGTLink on TCP (default ``127.0.0.1:18944``) to any
number of clients (docs/slicer.md):

=============== =========== ===================================================================================
device          type        content
=============== =========== ===================================================================================
``Target``,     TRANSFORM   per frame: identity rotation, translation = ``target_lps_mm[n]`` in RAS, mm
``Target2``...
``Gate``        STRING      per ``gate`` message: ``"<state> <reason>"``, e.g. ``"HOLD stale_input"``;
                            ``"HOLD daemon_silent"`` when the daemon has said nothing for ``daemon_silence_s``
``MotionField`` IMAGE       at most ``field_rate_hz``: the displacement, 3 float32 components (x, y, z) in mm
                            **RAS**, on the field's grid (IJK-to-RAS matrix), resampling convention ("from
                            parent"): ``warped(p) = planning_ct(p + u(p))``, as a Slicer grid transform applies it
``PlanningCT``  IMAGE       once to every client that connects: the planning CT in HU (int16 when every value is
                            an integer in range, else float32), IJK-to-RAS
=============== =========== ===================================================================================

LPS -> RAS is ``(x, y, z) -> (-x, -y, z)`` for positions, displacement vectors and grid geometry alike
(:func:`lps_to_ras`). Header version 2 messages carry metadata (``frame``, ``sample_seq``, ``t_sent``, ...); use
``header_version = 1`` for receivers older than OpenIGTLink 3.

Messages are encoded with ``pyigtl``'s message classes. Its ``OpenIGTLinkServer`` is not used: it serves one client
at a time from one shared queue of 100 messages that drops silently, notices a departed client only when a send
fails, and takes over SIGINT/SIGTERM. Here every client has its own thread and its own pending set, the newest
message per device (latest wins: a slow client gets the newest target, never a backlog, and cannot delay the
others), and the planning CT goes first.
"""

from __future__ import annotations

import logging
import math
import select
import signal
import socket
import socketserver
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.stream.client import CurveKeys, Subscriber
from breathcast.stream.config import DEFAULT_ENDPOINTS, is_loopback

if TYPE_CHECKING:
    from breathcast.engine.predictor import Plan

__all__ = [
    "DEFAULT_IGTL_PORT",
    "IGTLConfig",
    "IGTLBridge",
    "lps_to_ras",
    "ijk_to_ras",
    "target_messages",
    "gate_message",
    "field_message",
    "planning_ct_message",
]

log = logging.getLogger("breathcast.stream.igtl")

DEFAULT_IGTL_PORT = 18944
"""OpenIGTLink's registered port (IANA), Slicer's default."""

_RAS_FROM_LPS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class IGTLConfig:
    """What the bridge connects to and serves.

    Args:
        publish: the daemon's ``publish`` endpoint (``target``, ``gate``, ``status``).
        field: the daemon's ``field`` endpoint.
        host: address the OpenIGTLink server listens on; loopback unless ``allow_insecure_remote``.
        port: its TCP port (0: any free port, see :attr:`IGTLBridge.port`).
        field_rate_hz: most ``MotionField`` images per second (0: none), 1/s.
        daemon_silence_s: after this long without any message from the daemon, ``Gate`` says
            ``HOLD daemon_silent``, s.
        send_timeout_s: a client that accepts no bytes for this long is dropped, s.
        header_version: OpenIGTLink header version, 2 (metadata) or 1.
        allow_insecure_remote: listen on a non-loopback address. OpenIGTLink has neither authentication nor
            encryption, so anyone who reaches the port sees the patient's CT and motion.
        curve: CURVE keys for a daemon that requires them.
    """

    publish: str = DEFAULT_ENDPOINTS.publish
    field: str = DEFAULT_ENDPOINTS.field
    host: str = "127.0.0.1"
    port: int = DEFAULT_IGTL_PORT
    field_rate_hz: float = 2.0
    daemon_silence_s: float = 2.0
    send_timeout_s: float = 10.0
    header_version: int = 2
    allow_insecure_remote: bool = False
    curve: CurveKeys | None = None

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise BreathcastError(f"igtl port must be an integer in 0-65535, got {self.port!r}")
        if not (math.isfinite(self.field_rate_hz) and 0.0 <= self.field_rate_hz <= 100.0):
            raise BreathcastError(f"igtl field_rate_hz must be in [0, 100] (0 = no MotionField), got {self.field_rate_hz}")
        for name in ("daemon_silence_s", "send_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise BreathcastError(f"igtl {name} must be a positive number of seconds, got {value}")
        if self.header_version not in (1, 2):
            raise BreathcastError(f"igtl header_version must be 1 or 2, got {self.header_version!r}")
        if not self.host:
            raise BreathcastError("igtl host is empty; give an address such as 127.0.0.1")
        if not self.allow_insecure_remote and not is_loopback(f"tcp://{self.host}:{self.port}"):
            raise BreathcastError(f"igtl host {self.host} is not loopback: OpenIGTLink has no authentication or encryption; "
                                  "set allow_insecure_remote (--allow-insecure-remote) to serve other machines")  # fmt: skip


# -- conversions (pure functions: the tests hold them to the daemon's numbers) ---------------------------------


def lps_to_ras(xyz: Any) -> np.ndarray:
    """Positions or vectors ``(..., 3)`` in patient LPS to RAS (float64): x and y change sign.

    Example:
        >>> lps_to_ras([10.0, -20.0, 30.0]).tolist()
        [-10.0, 20.0, 30.0]
    """
    return np.asarray(xyz, dtype=np.float64) * _RAS_FROM_LPS


def ijk_to_ras(grid: Grid) -> np.ndarray:
    """(4, 4) float64 mapping voxel index (i, j, k, 1) (column, row, slice) to RAS mm: the IMAGE matrix.

    Example:
        >>> ijk_to_ras(Grid((2, 2, 2), (1.0, 2.0, 3.0), origin=(5.0, 6.0, 7.0)))[:3].tolist()
        [[-1.0, 0.0, 0.0, -5.0], [0.0, -2.0, 0.0, -6.0], [0.0, 0.0, 3.0, 7.0]]
    """
    return grid.affine * np.append(_RAS_FROM_LPS, 1.0)[:, None] + 0.0  # + 0.0: no -0.0


def _grid(header: dict[str, Any]) -> Grid:
    """A wire ``grid`` map (docs/protocol.md section 2) as a :class:`~breathcast.geometry.Grid`."""
    direction = np.asarray(header["direction"], dtype=np.float64).reshape(3, 3)
    return Grid(tuple(header["shape"]), tuple(header["spacing_mm"]), tuple(header["origin_mm"]), tuple(map(tuple, direction)))


def _metadata(message, version: int, **values: Any):
    message.header_version = version
    if version > 1:
        message.metadata = {k: str(v) for k, v in values.items() if v is not None}
    return message


def _timestamp(header: dict[str, Any]) -> float:
    """A message's OpenIGTLink timestamp: when the daemon received the frame's sample (Unix s), else its publish time."""
    return float(header.get("t_receive") or header.get("t_publish") or time.time())


def target_messages(header: dict[str, Any], version: int = 2) -> list:
    """``Target``, ``Target2``, ... TRANSFORM messages of a ``target`` header: translation = ``target_lps_mm`` in RAS.

    Args:
        header: the daemon's ``target`` header (``target_lps_mm``: P points [x, y, z], mm LPS).
        version: OpenIGTLink header version.

    Returns:
        P ``pyigtl.TransformMessage``, identity rotation, translation (mm, RAS) in column 3.
    """
    import pyigtl

    out = []
    for n, point in enumerate(header.get("target_lps_mm") or []):
        matrix = np.eye(4)
        matrix[:3, 3] = lps_to_ras(point)
        message = pyigtl.TransformMessage(matrix, timestamp=_timestamp(header), device_name="Target" if n == 0 else f"Target{n + 1}")
        out.append(_metadata(message, version, frame=header.get("frame"), sample_seq=header.get("sample_seq"),
                             t_sent=header.get("t_sent"), units="mm RAS"))  # fmt: skip
    return out


def gate_message(header: dict[str, Any], version: int = 2):
    """The ``Gate`` STRING of a ``gate`` header: ``"<state> <reason>"``, every reason in the metadata."""
    import pyigtl

    message = pyigtl.StringMessage(f"{header['state']} {header['reason']}", timestamp=_timestamp(header), device_name="Gate")
    return _metadata(message, version, frame=header.get("frame"), sample_seq=header.get("sample_seq"),
                     reasons=",".join(header.get("reasons") or []))  # fmt: skip


def field_message(header: dict[str, Any], u_lps_mm: np.ndarray, version: int = 2):
    """The ``MotionField`` IMAGE of a ``field`` message, in the convention of a Slicer grid transform.

    A Slicer grid transform set as the CT's "from parent" transform (resampling) shows the CT at ``p`` the value of
    the CT at ``p + u(p)`` (RAS): exactly the daemon's pull-back ``warped(p) = planning_ct(p + u(p))`` (LPS). So the
    field goes as it is, converted to RAS: the vectors' x and y change sign, the grid goes into the IJK-to-RAS matrix.

    Args:
        header: the ``field`` header (its ``grid``: shape [Z, Y, X], LPS geometry).
        u_lps_mm: (3, Z, Y, X) components (x, y, z), mm LPS, pull-back (float32 or float16).
        version: OpenIGTLink header version.

    Returns:
        A ``pyigtl.ImageMessage``: image (Z, Y, X, 3) float32 (k, j, i, component), components (x, y, z) mm RAS.
    """
    import pyigtl

    grid = _grid(header["grid"])
    if u_lps_mm.shape != (3, *grid.shape):
        raise BreathcastError(f"field array has shape {u_lps_mm.shape}; its grid says (3, {', '.join(map(str, grid.shape))})")
    u = np.asarray(u_lps_mm, dtype=np.float32)
    image = np.stack([-u[0], -u[1], u[2]], axis=-1)  # interleaved, RAS
    message = pyigtl.ImageMessage(image, ijk_to_world_matrix=ijk_to_ras(grid), world_coordinate_system="ras",
                                  timestamp=_timestamp(header), device_name="MotionField")  # fmt: skip
    return _metadata(message, version, frame=header.get("frame"), sample_seq=header.get("sample_seq"), t_sent=header.get("t_sent"),
                     units="mm RAS", convention="resampling (from parent): warped(p) = ct(p + u(p))")  # fmt: skip


def planning_ct_message(plan: Plan, version: int = 2):
    """The ``PlanningCT`` IMAGE: the plan's CT (Z, Y, X) in HU on its own grid, IJK-to-RAS.

    int16 when every voxel is an integer HU in range (a DICOM CT), else float32: both exact.
    """
    import pyigtl

    from breathcast.stream.plans import plan_hash

    hu = np.asarray(plan.volume.array)
    as_int = hu.astype(np.int16)
    image = as_int if np.array_equal(as_int, hu) else hu.astype(np.float32)
    message = pyigtl.ImageMessage(np.ascontiguousarray(image), ijk_to_world_matrix=ijk_to_ras(plan.volume.grid),
                                  world_coordinate_system="ras", device_name="PlanningCT")  # fmt: skip
    return _metadata(message, version, plan=plan.name.encode("ascii", "replace").decode(), plan_hash=plan_hash(plan),
                     frame_of_reference_uid=plan.frame_of_reference_uid, units="HU")  # fmt: skip


# -- the server --------------------------------------------------------------------------------------------------


class _Client:
    """One connected OpenIGTLink client: the newest unsent message per device, oldest device first."""

    def __init__(self, address: tuple) -> None:
        self.address = address
        self.pending: OrderedDict[str, bytes] = OrderedDict()
        self.ready = threading.Condition()
        self.replaced = 0

    def put(self, device: str, data: bytes) -> None:
        with self.ready:
            if self.pending.pop(device, None) is not None:
                self.replaced += 1  # the client had not taken the previous one yet: latest wins
            self.pending[device] = data
            self.ready.notify()

    def take(self, timeout_s: float) -> bytes | None:
        with self.ready:
            if not self.pending:
                self.ready.wait(timeout_s)
            return self.pending.popitem(last=False)[1] if self.pending else None


def _peer_closed(sock: socket.socket) -> bool:
    """True when the client has closed (or reset) the connection; bytes it sent (queries) are read and ignored."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(65536) == b""
    except OSError:
        return True


_CHUNK = 1 << 20  # the send timeout applies per MiB: a large CT over a slow link is not a stalled client
_CHECK_PEER_S = 0.5


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        bridge: IGTLBridge = self.server.bridge  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(bridge.config.send_timeout_s)
        client = bridge._register(self.client_address)
        checked = time.monotonic()
        try:
            while not bridge._stop.is_set():
                data = client.take(0.1)
                if data is not None:
                    view = memoryview(data)
                    for start in range(0, len(view), _CHUNK):
                        sock.sendall(view[start : start + _CHUNK])
                if data is None or time.monotonic() - checked > _CHECK_PEER_S:
                    checked = time.monotonic()
                    if _peer_closed(sock):
                        break
        except OSError as exc:  # reset, broken pipe, a client that took nothing for send_timeout_s
            log.info("OpenIGTLink client %s dropped: %s", self.client_address, exc)
            bridge._count("clients_dropped")
        finally:
            bridge._unregister(client)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class _Server6(_Server):
    address_family = socket.AF_INET6


# -- the bridge ----------------------------------------------------------------------------------------------------


class IGTLBridge:
    """Subscribe to the daemon and serve what it publishes as OpenIGTLink (see the module docstring).

    Args:
        config: endpoints, port, rates.
        plan: the plan the daemon serves (its CT becomes ``PlanningCT``); None: no CT is sent. A daemon whose
            ``status`` names another plan hash is logged (and counted as ``plan_mismatch``) once per hash.

    Example::

        bridge = IGTLBridge(IGTLConfig(port=0), plan).start()
        ...                                  # pyigtl.OpenIGTLinkClient(port=bridge.port)
        bridge.stop(); bridge.wait()
    """

    def __init__(self, config: IGTLConfig, plan: Plan | None = None) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()  # clients, latest, counters
        self._clients: set[_Client] = set()
        self._latest: OrderedDict[str, bytes] = OrderedDict()  # newest message per device, for new clients
        self._ct: bytes | None = None
        self._plan_hash = ""
        self._mismatch_seen: set[str] = set()
        if plan is not None:
            from breathcast.stream.plans import plan_hash

            self._ct = planning_ct_message(plan, config.header_version).pack()
            self._plan_hash = plan_hash(plan)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: _Server | None = None

    @property
    def port(self) -> int:
        """The TCP port the server listens on (the one chosen when ``config.port`` is 0)."""
        if self._server is None:
            raise BreathcastError("the bridge is not started")
        return int(self._server.server_address[1])

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> IGTLBridge:
        """Listen, subscribe and start the threads; returns at once."""
        cfg = self.config
        try:
            server = (_Server6 if ":" in cfg.host else _Server)((cfg.host, cfg.port), _Handler)
        except OSError as exc:
            raise BreathcastError(f"cannot listen on {cfg.host}:{cfg.port} for OpenIGTLink: {exc.strerror or exc}") from None
        server.bridge = self  # type: ignore[attr-defined]
        self._server = server
        subscribers = []
        try:  # here, not in the threads: a bad endpoint or key file is a one-line error, not a silent thread
            subscribers.append(Subscriber(cfg.publish, topics=("target", "gate", "status"), curve=cfg.curve))
            if cfg.field_rate_hz > 0:
                # ``ring`` (docs/protocol.md 4.6): the field read from the daemon's same-host ring file, when it has one
                subscribers.append(Subscriber(cfg.field, topics=("field", "ring"), curve=cfg.curve, rcvhwm=2))
        except (zmq.ZMQError, OSError, ValueError) as exc:
            for rx in subscribers:
                rx.close()
            server.server_close()
            raise BreathcastError(f"cannot subscribe to the daemon at {cfg.publish} / {cfg.field}: {exc}") from None
        loops = [("server", server.serve_forever, ()), ("frames", self._frames_loop, (subscribers[0],))]
        if cfg.field_rate_hz > 0:
            loops.append(("field", self._field_loop, (subscribers[1],)))
        for name, loop, loop_args in loops:  # each subscriber moves to its thread, which alone uses and closes it
            thread = threading.Thread(target=loop, args=loop_args, name=f"breathcast-igtl-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("OpenIGTLink on %s:%d; daemon %s, %s", cfg.host, self.port, cfg.publish, cfg.field)
        return self

    def stop(self) -> None:
        """Ask every thread to end (:meth:`wait` joins them)."""
        self._stop.set()

    def wait(self, timeout_s: float = 5.0) -> bool:
        """Stop serving and join the threads; True when they all ended within ``timeout_s``."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        end = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def serve_forever(self) -> int:
        """Run until SIGINT/SIGTERM (main thread); returns 0."""

        def on_signal(signum, frame) -> None:  # noqa: ARG001
            self.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stop.wait(0.2):
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.wait()
        return 0

    def __enter__(self) -> IGTLBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.wait()

    # -- clients -----------------------------------------------------------------------------------------------

    def _register(self, address: tuple) -> _Client:
        client = _Client(address)
        with self._lock:  # under the lock: nothing is broadcast between the CT and the newest of each device
            if self._ct is not None:
                client.put("PlanningCT", self._ct)
            for device, data in self._latest.items():
                client.put(device, data)
            self._clients.add(client)
            self.counters["clients_connected"] += 1
        log.info("OpenIGTLink client %s connected", address)
        return client

    def _unregister(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)
            self.counters["messages_replaced"] += client.replaced
        log.info("OpenIGTLink client %s left", client.address)

    @property
    def clients(self) -> int:
        """How many OpenIGTLink clients are connected now."""
        with self._lock:
            return len(self._clients)

    def _broadcast(self, messages: list) -> None:
        packed = [(m.device_name, m.pack()) for m in messages]
        with self._lock:
            for device, data in packed:
                self._latest[device] = data
                for client in self._clients:
                    client.put(device, data)

    # -- the daemon's side -------------------------------------------------------------------------------------

    def _frames_loop(self, rx: Subscriber) -> None:
        cfg = self.config
        last_heard = time.monotonic()
        silent = False
        with rx:
            while not self._stop.is_set():
                message = rx.recv(0.1)
                now = time.monotonic()
                if message is None:
                    if not silent and now - last_heard > cfg.daemon_silence_s:
                        silent = True
                        self._count("daemon_silent")
                        log.warning("no message from the daemon at %s for %.1f s: Gate HOLD daemon_silent", cfg.publish, cfg.daemon_silence_s)
                        self._broadcast([gate_message({"state": "HOLD", "reason": "daemon_silent", "reasons": ["daemon_silent"],
                                                       "t_publish": time.time()}, cfg.header_version)])  # fmt: skip
                    continue
                last_heard, silent = now, False
                try:
                    self._on_message(message.topic, message.header)
                except Exception:  # a header this bridge cannot convert: log it, serve on
                    log.exception("cannot convert a %s message", message.topic)
                    self._count("conversion_errors")

    def _on_message(self, topic: str, header: dict[str, Any]) -> None:
        version = self.config.header_version
        if topic == "target":
            messages = target_messages(header, version)
            with self._lock:  # a new plan with fewer points: new clients must not get the old plan's last TargetN
                for device in [d for d in self._latest if d.startswith("Target")][len(messages):]:
                    del self._latest[device]
            self._broadcast(messages)
            self._count("targets")
        elif topic == "gate":
            self._broadcast([gate_message(header, version)])
            self._count("gates")
        elif topic == "status":
            self._count("statuses")
            daemon_hash = (header.get("plan") or {}).get("hash") or ""
            if self._plan_hash and daemon_hash and daemon_hash != self._plan_hash and daemon_hash not in self._mismatch_seen:
                self._mismatch_seen.add(daemon_hash)
                self._count("plan_mismatch")
                log.warning("the daemon serves plan %s but PlanningCT is plan %s: start `breathcast igtl` with the "
                            "daemon's plan (--config)", daemon_hash, self._plan_hash)  # fmt: skip

    def _field_loop(self, rx: Subscriber) -> None:
        cfg = self.config
        interval = 1.0 / cfg.field_rate_hz
        last_sent = -math.inf
        with rx:
            while not self._stop.is_set():
                arrived = [m for m in rx.latest(0.1).values() if m.array is not None]
                if not arrived:
                    continue
                newest = max(arrived, key=lambda m: m.header.get("frame") or 0)
                if time.monotonic() - last_sent < interval:
                    self._count("fields_skipped_rate")
                    continue
                try:
                    self._broadcast([field_message(newest.header, newest.array, cfg.header_version)])
                except Exception:
                    log.exception("cannot convert a field message")
                    self._count("conversion_errors")
                    continue
                last_sent = time.monotonic()
                self._count("fields")
