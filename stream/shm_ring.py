"""The same-host field ring: fields in a memory-mapped file, announced by a tiny ``ring`` message (issue 17).

A consumer on the daemon's machine should not pay for copies through the kernel's socket buffers, nor for CURVE
encryption of 11 MB per frame. The daemon writes each field straight into one slot of a ring file (the resize writes
there: no copy at all) and publishes a ``ring`` message on the field socket that says which slot holds which field.
Access is gated by the file's permissions (0600 by default: the daemon's user only; ``field.ring_mode`` 0640 opens it
to the group). docs/protocol.md section 4.6 is the layout; a C reader needs ``open``, ``mmap`` and two 8-byte loads.

Layout (all integers little-endian):

* file header, 4096 bytes: ``magic`` 8 bytes ``BCRING1\\0``; ``layout`` u32 (1); ``slot_count`` u32; ``slot_stride``
  u64 (bytes from one slot to the next, a multiple of 4096); ``capacity`` u64 (largest field a slot holds, bytes);
  ``writer_pid`` u64; zeros.
* slot ``i`` at byte ``4096 + i * slot_stride``: a 64-byte slot header (``seq`` u64, ``frame`` u64, ``nbytes`` u64,
  ``dtype`` 8 bytes ASCII, zero padded, e.g. ``<f2``; zeros), then the field's ``nbytes`` bytes, laid out as the
  ``field`` topic's frame 2.

Seqlock: before writing a slot the daemon stores ``seq = 0``; it writes the data and the other slot keys, then stores
``seq`` = the ``msg_seq`` of the ``ring`` message that announces it, and only then sends that message. A reader checks
``seq`` equals the announced ``msg_seq`` before it reads and again after: if it changed, the slot was reused meanwhile
and what was read is discarded (counted as torn). A slot is reused ``slot_count`` fields later.

Example:
    >>> import tempfile, numpy as np, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.ring")
    >>> ring = RingWriter(path, slots=2, capacity=24)
    >>> slot, view = ring.begin(np.dtype("<f4"), (3, 2))
    >>> view[:] = 1.5
    >>> offset = ring.commit(slot, seq=7, frame=1)
    >>> with RingReader(path) as reader:
    ...     reader.read(slot, 7, np.dtype("<f4"), (3, 2)).sum()
    np.float32(9.0)
    >>> ring.close()
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from pathlib import Path

import numpy as np

from breathcast.errors import BreathcastError

__all__ = ["RingWriter", "RingReader", "TornRead", "MAGIC", "FILE_HEADER_BYTES", "SLOT_HEADER_BYTES"]

MAGIC = b"BCRING1\x00"
LAYOUT = 1
FILE_HEADER_BYTES = 4096
SLOT_HEADER_BYTES = 64
_FILE_HEADER = struct.Struct("<8sIIQQQ")  # magic, layout, slot_count, slot_stride, capacity, writer_pid
_PAGE = 4096


class TornRead(BreathcastError):
    """The slot was reused (or is being written) while it was read: the data are not the announced field."""


def _stride(capacity: int) -> int:
    return -(-(SLOT_HEADER_BYTES + capacity) // _PAGE) * _PAGE


class RingWriter:
    """The daemon's side: create the ring file (exclusively, with its mode whatever the umask), fill slots in turn.

    Args:
        path: the file (e.g. in ``/dev/shm``); an old file of this daemon's user is replaced, a file of another user
            (or a link) is refused.
        slots: number of slots; a reader has ``slots - 1`` field periods to read a field before its slot is reused.
        capacity: bytes of the largest field.
        mode: file mode (0600: this user; 0640: and the group).
    """

    def __init__(self, path: Path | str, slots: int, capacity: int, mode: int = 0o600) -> None:
        if slots < 2 or capacity < 1:
            raise BreathcastError(f"a ring needs at least 2 slots and a capacity, got {slots} slots of {capacity} bytes")
        if mode & 0o007:
            raise BreathcastError(f"ring mode {mode:o} would let every user read the fields; use 0600 or 0640")
        self.path, self.slots, self.capacity = Path(path), int(slots), int(capacity)
        self.stride = _stride(self.capacity)
        size = FILE_HEADER_BYTES + self.slots * self.stride
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise BreathcastError(f"{self.path} exists and is not a plain file of this user; remove it or choose another ring_path")
            os.unlink(self.path)  # a ring left by a daemon that was killed
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._map[: _FILE_HEADER.size] = _FILE_HEADER.pack(MAGIC, LAYOUT, self.slots, self.stride, self.capacity, os.getpid())
        self._words = np.frombuffer(self._map, dtype="<u8")  # 8-byte loads and stores of the slot headers
        self._next = 0
        self.mode = mode

    def slot_offset(self, slot: int) -> int:
        """Byte offset of slot ``slot``'s data in the file."""
        return FILE_HEADER_BYTES + slot * self.stride + SLOT_HEADER_BYTES

    def begin(self, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
        """The next slot, marked as being written (``seq = 0``), and a writable array view of its data."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > self.capacity:
            raise BreathcastError(f"a field of {nbytes} bytes does not fit the ring's {self.capacity}-byte slots")
        slot = self._next
        self._next = (self._next + 1) % self.slots
        self._words[(FILE_HEADER_BYTES + slot * self.stride) // 8] = 0
        offset = self.slot_offset(slot)
        return slot, np.frombuffer(self._map, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)

    def commit(self, slot: int, seq: int, frame: int, dtype: np.dtype | None = None, nbytes: int | None = None) -> int:
        """Write the slot header and then ``seq`` (> 0): the slot now holds the field announced as ``seq``. Returns the
        data offset."""
        if seq <= 0:
            raise BreathcastError("a ring seq is > 0 (0 means: being written)")
        base = FILE_HEADER_BYTES + slot * self.stride
        word = base // 8
        self._words[word + 1] = frame
        if nbytes is not None:
            self._words[word + 2] = nbytes
        if dtype is not None:
            self._map[base + 24 : base + 32] = np.dtype(dtype).str.encode("ascii").ljust(8, b"\x00")
        self._words[word] = seq  # last: on x86 (TSO) stores become visible in program order
        return self.slot_offset(slot)

    def close(self, unlink: bool = True) -> None:
        """Unmap (when no view is left) and remove the file."""
        self._words = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class RingReader:
    """A client's side: map the ring file read-only and read announced slots, checking the seqlock.

    Args:
        path: the ``path`` of a ``ring`` message.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise BreathcastError(f"cannot open ring {self.path}: {exc.strerror} (same host, and the daemon's user or group?)") from None
        try:
            size = os.fstat(fd).st_size
            if size < FILE_HEADER_BYTES:
                raise BreathcastError(f"{self.path} is not a breathcast ring (too short)")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, layout, self.slots, self.stride, self.capacity, self.writer_pid = _FILE_HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or layout != LAYOUT or size < FILE_HEADER_BYTES + self.slots * self.stride:
            self._map.close()
            raise BreathcastError(f"{self.path} is not a breathcast ring of layout {LAYOUT} (magic {magic!r}, layout {layout})")
        self._words = np.frombuffer(self._map, dtype="<u8")
        self.torn = 0

    def seq(self, slot: int) -> int:
        """The slot's current ``seq`` (0: being written)."""
        return int(self._words[(FILE_HEADER_BYTES + slot * self.stride) // 8])

    def view(self, slot: int, seq: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only view of the slot's data, valid while :meth:`seq` of the slot still equals ``seq``; raises
        :class:`TornRead` if the slot does not hold the announced field now."""
        if not 0 <= slot < self.slots:
            raise BreathcastError(f"slot {slot} outside the ring's {self.slots}")
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        if count * dtype.itemsize > self.capacity:
            raise BreathcastError(f"{shape} {dtype.str} does not fit a slot of {self.capacity} bytes")
        if self.seq(slot) != seq:
            self.torn += 1
            raise TornRead(f"slot {slot} no longer holds field {seq} (the reader was more than {self.slots - 1} fields late)")
        offset = FILE_HEADER_BYTES + slot * self.stride + SLOT_HEADER_BYTES
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def read(self, slot: int, seq: int, dtype: np.dtype, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        """A private copy of the announced field (checked before and after the copy); raises :class:`TornRead`."""
        view = self.view(slot, seq, dtype, shape)
        out = np.empty(view.shape, view.dtype) if out is None else out
        np.copyto(out, view)
        if self.seq(slot) != seq:
            self.torn += 1
            raise TornRead(f"slot {slot} was reused while it was read")
        return out

    def close(self) -> None:
        self._words = None
        try:
            self._map.close()
        except BufferError:  # views still alive: the mapping goes with the last one
            pass

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
