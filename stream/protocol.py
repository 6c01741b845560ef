"""The wire protocol (docs/protocol.md is the contract; this module is its one implementation).

Everything that crosses a socket is built or parsed here:

* input samples: one msgpack map per ZeroMQ message, ``type`` ``sample`` or ``batch``;
* output: ZeroMQ multipart ``[topic, msgpack header, (raw array)]``; arrays travel as a raw little-endian
  C-order frame described by the header (``dtype`` from :data:`DTYPES`, ``shape``), never pickled;
* control: one msgpack map request, one msgpack map reply.

Decoding never trusts the peer: sizes are checked before unpacking, msgpack limits are set, and every
failure is a :class:`ProtocolError` with a short machine-readable ``code``.

Example:
    >>> msg = encode_sample(seq=7, t_source=1.25, amplitude=0.4)
    >>> [s.seq for s in parse_input(msg)]
    [7]
    >>> try:
    ...     parse_input(bytes([0x93, 1, 2, 3]))  # a msgpack list, not a map
    ... except ProtocolError as exc:
    ...     print(exc.code)
    malformed
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import numpy as np

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid

__all__ = [
    "PROTOCOL_VERSION",
    "Topic",
    "GateState",
    "HoldReason",
    "DTYPES",
    "MAX_INPUT_BYTES",
    "MAX_BATCH",
    "MAX_CONTROL_BYTES",
    "MAX_ABS_T_S",
    "CONTROL_ERROR_CODES",
    "INPUT_ERROR_CODES",
    "ProtocolError",
    "check_version",
    "Sample",
    "encode_sample",
    "encode_batch",
    "parse_input",
    "pack",
    "unpack",
    "grid_header",
    "array_header",
    "decode_array",
    "decode_output",
]

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; every message carries it as ``v``."""

MAX_INPUT_BYTES = 256 * 1024
"""Largest input message accepted, bytes (a batch of ~1000 samples fits); larger ones are rejected and counted."""

MAX_BATCH = 2000
"""Most samples in one batch message."""

MAX_CONTROL_BYTES = 64 * 1024
"""Largest control request, bytes."""

MAX_ABS_T_S = float(2**32)
"""Largest source timestamp magnitude accepted, s (136 years; float64 still resolves 1 us there). A larger ``t``
cannot be resampled at a breathing source's cadence and is rejected as ``bad_value``."""


CONTROL_ERROR_CODES = frozenset({"not_msgpack", "too_large", "malformed", "bad_version", "unknown_command", "bad_argument",
                                 "busy", "unavailable", "internal_error"})  # fmt: skip
"""Every ``error.code`` a control reply can carry (docs/protocol.md section 5)."""

INPUT_ERROR_CODES = frozenset({"not_msgpack", "malformed", "bad_type", "bad_value", "bad_version", "unknown_type",
                               "too_large", "multipart"})  # fmt: skip
"""Every ``malformed.<code>`` counter an input message can bump (docs/protocol.md section 3)."""


class Topic(str, Enum):
    """The first frame of every published message (ASCII bytes on the wire)."""

    FIELD = "field"
    TARGET = "target"
    GATE = "gate"
    STATUS = "status"
    STATE = "state"  # the per-slice breathing state of a frame (polynomial paths: a client makes the field itself)
    RING = "ring"  # field socket: which slot of the same-host ring file holds a field (no array frame)


class GateState(str, Enum):
    BEAM_ON = "BEAM_ON"
    HOLD = "HOLD"


class HoldReason(str, Enum):
    """Why the gate is on HOLD (the ``reason`` of a ``gate`` message); ``ok`` goes with BEAM_ON."""

    OK = "ok"
    NO_PLAN = "no_plan"
    PLAN_REJECTED = "plan_rejected"
    LOADING = "loading"
    NO_INPUT = "no_input"
    WINDOW_NOT_FULL = "window_not_full"
    STALE_INPUT = "stale_input"
    STUCK_SENSOR = "stuck_sensor"
    GAP = "gap"
    TIME_JUMP = "time_jump"
    INVALID_SAMPLE = "invalid_sample"
    NON_FINITE_SAMPLE = "non_finite_sample"
    IMPLAUSIBLE_SAMPLE = "implausible_sample"
    OUT_OF_ORDER = "out_of_order"
    DUPLICATE = "duplicate"
    SOURCE_RESTART = "source_restart"
    MODEL_ERROR = "model_error"
    NON_FINITE_FIELD = "non_finite_field"
    IMPLAUSIBLE_TARGET = "implausible_target"
    OUTSIDE_WINDOW = "outside_gating_window"
    INTERNAL_ERROR = "internal_error"
    SHUTDOWN = "shutdown"


DTYPES: dict[str, np.dtype] = {"<f4": np.dtype("<f4"), "<f2": np.dtype("<f2"), "<f8": np.dtype("<f8")}
"""The array dtypes the protocol knows (numpy ``dtype.str``; ``<`` = little-endian): float32, float16, float64."""


class ProtocolError(BreathcastError):
    """A message that does not follow docs/protocol.md; ``code`` is the short name counted and replied."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def pack(obj: dict[str, Any]) -> bytes:
    """A msgpack map (str keys, bin type for bytes, float64 for floats)."""
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False)


def unpack(data: bytes | memoryview, max_bytes: int) -> Any:
    """Unpack one msgpack object, refusing anything larger than ``max_bytes`` or with ext types."""
    n = len(data)
    if n > max_bytes:
        raise ProtocolError("too_large", f"message of {n} bytes; the limit is {max_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=max_bytes, max_bin_len=max_bytes,
            max_array_len=MAX_BATCH * 2, max_map_len=MAX_BATCH, max_ext_len=0,
        )  # fmt: skip
    except Exception as exc:  # msgpack raises several unrelated types (ExtraData, ValueError, ...)
        raise ProtocolError("not_msgpack", f"not one msgpack object ({type(exc).__name__})") from None


@dataclass(frozen=True)
class Sample:
    """One breathing sample as received.

    Args:
        seq: the source's sequence number (int, increasing by 1 per sample).
        t_source: source timestamp, s (any epoch, increasing).
        amplitude: normalised amplitude (dimensionless), or None when ``raw`` is given.
        raw: raw surrogate value (1 or 3 numbers, the calibration's units), or None.
        valid: the source's own validity flag.
        t_sent: optional sender wall-clock time (unix s), echoed in output headers for latency.
        source: optional source name; a change resets the window.
    """

    seq: int
    t_source: float
    amplitude: float | None = None
    raw: tuple[float, ...] | None = None
    valid: bool = True
    t_sent: float | None = None
    source: str | None = None


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("bad_type", f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _sample(item: Any) -> Sample:
    if not isinstance(item, dict):
        raise ProtocolError("bad_type", f"a sample must be a map, got {type(item).__name__}")
    seq = item.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not (0 <= seq < 2**63):
        raise ProtocolError("bad_type", "seq must be a non-negative integer")
    t = _number(item.get("t"), "t")
    if not (math.isfinite(t) and abs(t) <= MAX_ABS_T_S):
        raise ProtocolError("bad_value", f"t must be finite and within +-{MAX_ABS_T_S:.0f} s, got {t!r}")
    amplitude, raw = item.get("amplitude"), item.get("raw")
    if (amplitude is None) == (raw is None):
        raise ProtocolError("bad_type", "a sample needs exactly one of amplitude or raw")
    if amplitude is not None:
        amplitude = _number(amplitude, "amplitude")  # NaN / Inf are legal here: they are a fail-safe case
    if raw is not None:
        values = raw if isinstance(raw, list) else [raw]
        if len(values) not in (1, 3):
            raise ProtocolError("bad_type", "raw must be a number or a list of 3 numbers")
        raw = tuple(_number(v, "raw") for v in values)
    valid = item.get("valid", True)
    if not isinstance(valid, bool):
        raise ProtocolError("bad_type", "valid must be a boolean")
    t_sent = item.get("t_sent")
    t_sent = None if t_sent is None else _number(t_sent, "t_sent")
    if t_sent is not None and not math.isfinite(t_sent):
        raise ProtocolError("bad_value", "t_sent must be finite")
    source = item.get("source")
    if source is not None and (not isinstance(source, str) or len(source) > 256):
        raise ProtocolError("bad_type", "source must be a string of at most 256 characters")
    return Sample(seq, t, amplitude, raw, valid, t_sent, source)


def check_version(msg: dict[Any, Any]) -> None:
    """Refuse a map whose keys are not all strings (``malformed``) or whose ``v`` is not the integer 1 (``bad_version``).

    ``True`` and ``1.0`` compare equal to 1 in Python; on the wire they are other types, so they are refused.

    Example:
        >>> check_version({"v": 1})
        >>> try:
        ...     check_version({"v": True})
        ... except ProtocolError as exc:
        ...     print(exc.code)
        bad_version
    """
    if not all(isinstance(k, str) for k in msg):
        raise ProtocolError("malformed", "map keys must be strings")
    version = msg.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {version!r} ({type(version).__name__}); this daemon speaks "
                            f"{PROTOCOL_VERSION} (an integer)")  # fmt: skip


def parse_input(data: bytes | memoryview) -> list[Sample]:
    """One input message -> its samples (oldest first). Raises :class:`ProtocolError`."""
    msg = unpack(data, MAX_INPUT_BYTES)
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", f"input must be a msgpack map, got {type(msg).__name__}")
    check_version(msg)
    kind = msg.get("type")
    if kind == "sample":
        return [_sample(msg)]
    if kind == "batch":
        samples = msg.get("samples")
        if not isinstance(samples, list) or not samples or len(samples) > MAX_BATCH:
            raise ProtocolError("bad_type", f"samples must be a list of 1 to {MAX_BATCH} maps")
        return [_sample(s) for s in samples]
    raise ProtocolError("unknown_type", f"input type must be 'sample' or 'batch', got {kind!r}")


def _sample_map(seq: int, t_source: float, amplitude: float | None = None, raw: Any = None, valid: bool = True,
                t_sent: float | None = None, source: str | None = None) -> dict[str, Any]:  # fmt: skip
    m: dict[str, Any] = {"seq": int(seq), "t": float(t_source), "valid": bool(valid)}
    if amplitude is not None:
        m["amplitude"] = float(amplitude)
    if raw is not None:
        m["raw"] = [float(v) for v in np.atleast_1d(raw)]
    if t_sent is not None:
        m["t_sent"] = float(t_sent)
    if source is not None:
        m["source"] = source
    return m


def encode_sample(seq: int, t_source: float, amplitude: float | None = None, raw: Any = None, valid: bool = True,
                  t_sent: float | None = None, source: str | None = None) -> bytes:  # fmt: skip
    """One sample message (see :class:`Sample` for the fields)."""
    return pack({"v": PROTOCOL_VERSION, "type": "sample", **_sample_map(seq, t_source, amplitude, raw, valid, t_sent, source)})


def encode_batch(samples: list[dict[str, Any]]) -> bytes:
    """A batch message from sample keyword maps (``seq``, ``t_source``, ``amplitude`` or ``raw``, ...)."""
    return pack({"v": PROTOCOL_VERSION, "type": "batch", "samples": [_sample_map(**s) for s in samples]})


def grid_header(grid: Grid, frame_of_reference_uid: str = "") -> dict[str, Any]:
    """The ``grid`` map of a header: shape (Z, Y, X), spacing_mm (x, y, z), origin_mm, direction (9, row-major)."""
    return {
        "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing),
        "origin_mm": list(grid.origin),
        "direction": [v for row in grid.direction for v in row],
        "frame_of_reference_uid": frame_of_reference_uid or grid.frame_of_reference_uid,
    }


def array_header(array: np.ndarray) -> dict[str, Any]:
    """``dtype`` / ``shape`` / ``order`` / ``nbytes`` of a raw array frame (little-endian, C order)."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype.str not in DTYPES:
        raise ProtocolError("bad_dtype", f"dtype {array.dtype} is not one of {sorted(DTYPES)}")
    return {"dtype": dtype.str, "shape": list(array.shape), "order": "C", "nbytes": int(array.nbytes)}


def decode_array(header: dict[str, Any], payload: bytes | memoryview) -> np.ndarray:
    """A read-only array from a header with ``dtype``/``shape`` and its raw frame (no copy)."""
    dtype = DTYPES.get(header.get("dtype"))
    shape = header.get("shape")
    if dtype is None or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ProtocolError("bad_array", f"array header needs a dtype in {sorted(DTYPES)} and a shape, got {header.get('dtype')!r}, {shape!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(payload) != expected:
        raise ProtocolError("bad_array", f"array frame holds {len(payload)} bytes; {shape} {dtype.str} needs {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def decode_output(frames: list[bytes | memoryview]) -> tuple[str, dict[str, Any], np.ndarray | None]:
    """A published multipart message -> (topic, header, array or None)."""
    if len(frames) not in (2, 3):
        raise ProtocolError("malformed", f"an output message has 2 or 3 frames, got {len(frames)}")
    topic = bytes(frames[0]).decode("ascii", "replace")
    header = unpack(frames[1], 1 << 20)
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header must be a msgpack map")
    array = decode_array(header, frames[2]) if len(frames) == 3 else None
    return topic, header, array
