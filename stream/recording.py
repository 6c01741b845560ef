"""The session log: an append-only file of every accepted sample and every gate decision.

Format (docs/protocol.md "Session log"): the 8 magic bytes ``BCLOG1\\n\\0``, then records, each a 4-byte
little-endian unsigned length followed by that many bytes of one msgpack map with a ``type`` key
(``session``, ``sample``, ``rejected``, ``gate``, ``event``). Each record is handed to the kernel with one
``write(2)`` as soon as it is made, so a SIGKILL-ed daemon loses nothing already logged; the file is
``fsync``-ed every ``fsync_interval_s`` against power loss. A reader stops at a torn last record (the only
damage a crash can do) and says how many bytes it skipped. A writer that opens a log with a torn tail (a SIGKILL,
then power loss between fsyncs) moves the torn bytes to ``FILE.torn-<unix ns>`` and truncates the log to its last
whole record before appending, so the new session stays readable (the ``session`` record says
``repaired_tail_bytes``). Logs and torn tails are created mode 0600 whatever the umask.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "s.bclog")
    >>> with SessionLog(path) as log:
    ...     log.write({"type": "sample", "seq": 1, "t": 0.0, "amplitude": 0.5})
    >>> [r["type"] for r in read_session_log(path).records]
    ['session', 'sample']
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from breathcast.errors import BreathcastError
from breathcast.stream.protocol import PROTOCOL_VERSION, pack

__all__ = ["MAGIC", "SessionLog", "SessionLogContents", "read_session_log", "iter_records"]

MAGIC = b"BCLOG1\n\0"
_LENGTH = struct.Struct("<I")
_MAX_RECORD = 16 * 1024 * 1024


class SessionLog:
    """Append records to a session log (thread-safe).

    Args:
        path: the file (created; an existing file is appended to, after checking its magic).
        fsync_interval_s: fsync at most this long after a write, s.
        header: extra keys for the first ``session`` record (config, model id, ...).
    """

    def __init__(self, path: Path | str, fsync_interval_s: float = 0.5, header: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            os.fchmod(self._fd, 0o600)  # patient data: owner only, whatever the umask or an older file's mode
            self.repaired_tail_bytes = self._prepare()
        except OSError as exc:
            raise BreathcastError(f"cannot open session log {self.path}: {exc.strerror}") from None
        except BreathcastError:
            os.close(self._fd)
            raise
        self._lock = threading.Lock()
        self.records = 0
        self.bytes = 0
        self._dirty = False
        self._closed = False
        self._stop = threading.Event()
        self._fsync_interval = fsync_interval_s
        self._syncer = threading.Thread(target=self._sync_loop, name="session-log-fsync", daemon=True)
        self._syncer.start()
        extra = {"repaired_tail_bytes": self.repaired_tail_bytes} if self.repaired_tail_bytes else {}
        self.write({"type": "session", "protocol": PROTOCOL_VERSION, "t_wall": time.time(), **extra, **(header or {})})

    def _prepare(self) -> int:
        """Write the magic into a new file, or check an old one and cut a torn tail off it; bytes cut."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            os.write(self._fd, MAGIC)
            return 0
        data = os.pread(self._fd, size, 0)
        if not data.startswith(MAGIC):
            raise BreathcastError(f"{self.path} exists and is not a breathcast session log; choose another file")
        end = len(MAGIC)
        for end, _ in iter_records(data):
            pass
        if end == size:
            return 0
        torn = self.path.with_name(f"{self.path.name}.torn-{time.time_ns()}")
        fd = os.open(torn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data[end:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        return size - end

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a map with a ``type``); one write(2)."""
        self.write_many([record])

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Append several records with one write(2)."""
        if not records:
            return
        chunks = []
        for r in records:
            body = pack(r)
            chunks += [_LENGTH.pack(len(body)), body]
        data = b"".join(chunks)
        with self._lock:
            if self._closed:
                return
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.records += len(records)
            self.bytes += len(data)
            self._dirty = True

    def sync(self) -> None:
        """fsync now."""
        with self._lock:
            if self._closed or not self._dirty:
                return
            self._dirty = False
            fd = self._fd
        os.fsync(fd)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._fsync_interval):
            try:
                self.sync()
            except OSError:
                pass

    def close(self) -> None:
        """fsync and close (idempotent)."""
        self._stop.set()
        self.sync()
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> SessionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SessionLogContents:
    """What :func:`read_session_log` found.

    Args:
        records: every whole record, in order.
        truncated_bytes: bytes of a torn last record that were skipped (0 for a cleanly closed log).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    truncated_bytes: int = 0

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == kind]


def iter_records(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset after the record, record) for every whole record of a log's bytes (after the magic)."""
    if not data.startswith(MAGIC):
        raise BreathcastError("not a breathcast session log (bad magic)")
    pos = len(MAGIC)
    while pos + _LENGTH.size <= len(data):
        (n,) = _LENGTH.unpack_from(data, pos)
        if n > _MAX_RECORD or pos + _LENGTH.size + n > len(data):
            return
        try:
            record = msgpack.unpackb(data[pos + _LENGTH.size : pos + _LENGTH.size + n], raw=False)
        except Exception:
            return
        pos += _LENGTH.size + n
        yield pos, record


def read_session_log(path: Path | str) -> SessionLogContents:
    """Read a session log, also one whose writer was killed (see the module docstring)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BreathcastError(f"cannot read session log {path}: {exc.strerror}") from None
    try:
        out = SessionLogContents()
        end = len(MAGIC)
        for end, record in iter_records(data):
            out.records.append(record)
    except BreathcastError:
        raise BreathcastError(f"{path}: not a breathcast session log (bad magic)") from None
    out.truncated_bytes = len(data) - end
    return out
