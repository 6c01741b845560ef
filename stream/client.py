"""A small Python client of the daemon: send samples, subscribe to topics, send control commands, make keys.

::

    from breathcast.stream import client
    with client.SampleSender("tcp://127.0.0.1:5560") as tx:
        tx.send(seq=0, t_source=0.0, amplitude=0.4)
    with client.Subscriber("tcp://127.0.0.1:5561", topics=("gate",)) as rx:
        message = rx.recv(timeout_s=1.0)      # Message(topic, header, array) or None
    with client.ControlClient("tcp://127.0.0.1:5563") as ctl:
        ctl.request("status")["status"]["state"]
        model = ctl.field_model()              # the distilled / 5D polynomial, once per plan (docs/protocol.md 4.5)
    with client.Subscriber("tcp://127.0.0.1:5561", topics=("state",)) as rx:
        h = rx.recv().header                  # then per frame only the state: make the field (or a point) here
        u = model.field(h["slice_amplitude"], h["slice_rate"], shape=(56, 64, 64))
    with client.Subscriber("tcp://127.0.0.1:5562", topics=("ring",)) as rx:
        rx.recv().array                       # same host: the field from the daemon's ring file (4.6), no socket copy

CURVE: pass ``curve=CurveKeys(server_public, client_secret)`` (files from ``breathcast keys``) to any of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from breathcast.errors import BreathcastError
from breathcast.stream.config import DEFAULT_ENDPOINTS
from breathcast.stream.field_coefficients import FieldModel
from breathcast.stream.protocol import (
    PROTOCOL_VERSION,
    decode_output,
    encode_batch,
    encode_sample,
    pack,
    unpack,
)

__all__ = ["CurveKeys", "make_keys", "Message", "SampleSender", "Subscriber", "ControlClient", "ControlError", "FieldModel"]


@dataclass(frozen=True)
class CurveKeys:
    """A client's CURVE setup: the server's public key file and this client's secret key file."""

    server_public: Path | str
    client_secret: Path | str

    def apply(self, socket: zmq.Socket) -> None:
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(str(self.server_public))
        public, secret = zmq.auth.load_certificate(str(self.client_secret))
        if secret is None:
            raise BreathcastError(f"{self.client_secret} holds no secret key (use the .key_secret file)")
        socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = server_public, public, secret


def make_keys(folder: Path | str, name: str) -> tuple[Path, Path]:
    """Write a CURVE key pair ``NAME.key`` (public, give it out) and ``NAME.key_secret`` (keep it) into ``folder``.

    ``NAME.key_secret`` holds both keys (ZeroMQ's ZPL certificate: ``public-key`` and ``secret-key``, Z85). Modes are
    set whatever the umask: a folder made here 0700, the secret file 0600, the public one 0644; an existing folder
    that others can write is refused.

    Example:
        >>> import tempfile
        >>> public, secret = make_keys(tempfile.mkdtemp(), "console")
        >>> public.name, secret.name
        ('console.key', 'console.key_secret')
    """
    import tempfile

    import zmq.auth

    folder = Path(folder)
    if not name or "/" in name or name.startswith("."):
        raise BreathcastError(f"key name must be a plain file name, got {name!r}")
    if not folder.exists():
        folder.mkdir(parents=True)
        folder.chmod(0o700)  # whatever the umask
    elif folder.stat().st_mode & 0o022:
        raise BreathcastError(f"{folder} is writable by others, who could replace keys in it; chmod 700 {folder} or choose another")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise BreathcastError(f"{folder / name}.key already exists; choose another name or folder")
    # Made in a private (0700) folder and moved in with their modes set: the secret is never readable by others.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
        made_secret.chmod(0o600)
        made_public.chmod(0o644)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    return public, secret


class _Client:
    def __init__(self, kind: int, endpoint: str, curve: CurveKeys | None, context: zmq.Context | None) -> None:
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.socket = self.ctx.socket(kind)
        self.socket.linger = 200
        self.endpoint, self.curve = endpoint, curve
        if curve is not None:
            curve.apply(self.socket)

    def close(self) -> None:
        self.socket.close()
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SampleSender(_Client):
    """PUSH breathing samples to the daemon's input socket (never blocks: a full queue raises)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINTS.input, curve: CurveKeys | None = None,
                 context: zmq.Context | None = None) -> None:  # fmt: skip
        super().__init__(zmq.PUSH, endpoint, curve, context)
        self.socket.sndhwm = 10000
        self.socket.connect(endpoint)

    def send_bytes(self, data: bytes) -> None:
        """Send one raw message (tests use it for garbage)."""
        self.socket.send(data, zmq.NOBLOCK)

    def send(self, seq: int, t_source: float, amplitude: float | None = None, raw: Any = None, valid: bool = True,
             t_sent: float | None = None, source: str | None = None) -> float:  # fmt: skip
        """One sample; ``t_sent`` defaults to now (unix s). Returns the ``t_sent`` used."""
        t_sent = time.time() if t_sent is None else t_sent
        self.socket.send(encode_sample(seq, t_source, amplitude, raw, valid, t_sent, source), zmq.NOBLOCK)
        return t_sent

    def send_batch(self, samples: list[dict[str, Any]]) -> None:
        """Several samples in one message (maps with ``seq``, ``t_source``, ``amplitude`` or ``raw``, ...)."""
        self.socket.send(encode_batch(samples), zmq.NOBLOCK)


@dataclass(frozen=True)
class Message:
    """One published message: topic, header map, and the array (fields) or None."""

    topic: str
    header: dict[str, Any]
    array: np.ndarray | None = None


class Subscriber(_Client):
    """SUB to one or more of the daemon's publishing endpoints (``publish`` and/or ``field``).

    A ``ring`` message (same host, docs/protocol.md 4.6) arrives with the field read from the daemon's ring file as
    its ``array`` (a private copy, checked against the slot's seq before and after; ``ring_copy=False``: a read-only
    view into the ring, valid until the slot is reused ``field.ring_slots - 1`` fields later). A field whose slot was
    reused before it could be read arrives with ``array`` None and is counted in ``ring_torn``.

    Args:
        endpoints: one endpoint or several.
        topics: topic names to receive (default: all).
        rcvhwm: messages queued before new ones are dropped; default 2 when ``topics`` names ``field`` or ``ring``
            (a viewer wants the newest field, not a backlog: docs/protocol.md section 1), else 1000.
        ring_copy: copy ring fields out of the ring (default) or hand out views.
    """

    def __init__(self, endpoints: str | list[str] = DEFAULT_ENDPOINTS.publish, topics: tuple[str, ...] = (),
                 curve: CurveKeys | None = None, context: zmq.Context | None = None, rcvhwm: int | None = None,
                 ring_copy: bool = True) -> None:  # fmt: skip
        super().__init__(zmq.SUB, endpoints if isinstance(endpoints, str) else endpoints[0], curve, context)
        self.socket.rcvhwm = rcvhwm if rcvhwm is not None else (2 if {"field", "ring"} & set(topics) else 1000)
        self.ring_copy, self.ring_torn = ring_copy, 0
        self._ring = None
        for topic in topics or ("",):
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        for endpoint in [endpoints] if isinstance(endpoints, str) else endpoints:
            self.socket.connect(endpoint)

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next message, or None after ``timeout_s`` (None: wait forever)."""
        if timeout_s is not None and not self.socket.poll(int(timeout_s * 1000)):
            return None
        frames = self.socket.recv_multipart(copy=False)
        topic, header, array = decode_output([f.buffer for f in frames])
        if topic == "ring" and array is None:
            array = self._read_ring(header)
        return Message(topic, header, array)

    def _read_ring(self, header: dict[str, Any]) -> np.ndarray | None:
        from breathcast.stream.protocol import DTYPES
        from breathcast.stream.shm_ring import RingReader, TornRead

        ring = header.get("ring") or {}
        dtype, shape = DTYPES.get(header.get("dtype")), header.get("shape")
        if not isinstance(ring.get("path"), str) or dtype is None or not isinstance(shape, list):
            raise BreathcastError(f"a ring message needs ring.path, dtype and shape, got {sorted(header)}")
        if self._ring is None or self._ring.path != ring["path"]:
            if self._ring is not None:
                self._ring.close()
            self._ring = RingReader(ring["path"])
        try:
            if self.ring_copy:
                return self._ring.read(int(ring["slot"]), int(ring["seq"]), dtype, tuple(shape))
            return self._ring.view(int(ring["slot"]), int(ring["seq"]), dtype, tuple(shape))
        except TornRead:
            self.ring_torn += 1
            return None

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        super().close()

    def latest(self, timeout_s: float = 0.0) -> dict[str, Message]:
        """Drain what is queued (waiting up to ``timeout_s`` for the first) and keep the newest per topic."""
        out: dict[str, Message] = {}
        message = self.recv(timeout_s)
        while message is not None:
            out[message.topic] = message
            message = self.recv(0.0)
        return out


class ControlError(BreathcastError):
    """The daemon answered a control request with an error (``code`` as in docs/protocol.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ControlClient(_Client):
    """REQ to the control socket; a request that gets no reply in ``timeout_s`` raises (and the socket is renewed)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINTS.control, curve: CurveKeys | None = None,
                 context: zmq.Context | None = None, timeout_s: float = 5.0) -> None:  # fmt: skip
        super().__init__(zmq.REQ, endpoint, curve, context)
        self.timeout_s = timeout_s
        self.socket.connect(endpoint)

    def _renew(self) -> None:
        self.socket.close(0)
        self.socket = self.ctx.socket(zmq.REQ)
        self.socket.linger = 200
        if self.curve is not None:
            self.curve.apply(self.socket)
        self.socket.connect(self.endpoint)

    def request_raw(self, data: bytes) -> dict[str, Any]:
        """Send raw bytes, return the decoded reply map (tests use it for malformed requests)."""
        return unpack(self._exchange(data)[0], 1 << 24)

    def _exchange(self, data: bytes) -> list[bytes]:
        """Send one request, return every frame of its reply (the ``coefficients`` reply has two)."""
        self.socket.send(data)
        if not self.socket.poll(int(self.timeout_s * 1000)):
            self._renew()
            raise BreathcastError(f"no reply from {self.endpoint} within {self.timeout_s} s; is `breathcast serve` running?")
        return self.socket.recv_multipart()

    def field_model(self) -> FieldModel:
        """The ``coefficients`` command: the plan's polynomial (mm LPS, checked against its hash) as a
        :class:`~breathcast.stream.field_coefficients.FieldModel`. Fetch it again when a ``state`` message names
        another ``coefficients.hash``."""
        frames = self._exchange(pack({"v": PROTOCOL_VERSION, "cmd": "coefficients"}))
        reply = unpack(frames[0], 1 << 24)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise ControlError(error.get("code", "unknown"), error.get("message", ""))
        if len(frames) != 2:
            raise BreathcastError(f"a coefficients reply has 2 frames, got {len(frames)}")
        return FieldModel.from_wire(reply["coefficients"], frames[1])

    def request(self, cmd: str, check: bool = True, **args: Any) -> dict[str, Any]:
        """Send ``{"v": 1, "cmd": cmd, **args}``; returns the reply, raising :class:`ControlError` if ``check`` and not ok."""
        reply = self.request_raw(pack({"v": PROTOCOL_VERSION, "cmd": cmd, **args}))
        if check and not reply.get("ok"):
            error = reply.get("error") or {}
            raise ControlError(error.get("code", "unknown"), error.get("message", ""))
        return reply

    def status(self) -> dict[str, Any]:
        return self.request("status")["status"]

    def wait_until_running(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Poll ``status`` until the daemon has a predictor loaded; returns the status."""
        end = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status["state"] == "running":
                return status
            if time.monotonic() > end:
                raise BreathcastError(f"daemon not running after {timeout_s} s: state {status['state']}, {status['last_error']}")
            time.sleep(0.1)
