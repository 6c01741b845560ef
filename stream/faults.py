"""Hostile and faulty input for the daemon: a seeded generator over every message field and control command, and
the invariants a daemon keeps whatever it is sent.

``tests/test_stream_faults.py`` runs it against a real daemon at a few hundred messages; ``benchmarks/bench_faults.py``
at 10,000 and more. The invariants (docs/protocol.md):

* every control request gets exactly one reply: a map with ``v`` 1 (an integer) and a boolean ``ok``; an error
  carries one of :data:`~breathcast.stream.protocol.CONTROL_ERROR_CODES` and a message; only an ok ``coefficients``
  reply has a second frame, of its header's ``nbytes``;
* every ``gate`` is consistent: BEAM_ON exactly when no reason holds, ``reason`` the first of ``reasons``, every
  reason documented; a BEAM_ON rests on a frame with a plausible amplitude and target displacement;
* every input message is counted (``messages_received``) and the daemon keeps answering ``status``.

A valid ``load_plan`` and a ``set_mode`` to another path are not generated (they would load a plan or a predictor
instead of testing input handling); ``shutdown`` is not generated either.

Example:
    >>> fuzz = Fuzzer(seed=1)
    >>> messages = [fuzz.input_message() for _ in range(200)]
    >>> all(isinstance(m, list) and all(isinstance(f, bytes) for f in m) for m in messages)
    True
    >>> gate_violations({"state": "BEAM_ON", "reason": "ok", "reasons": [], "frame": 3, "amplitude": 50.0,
    ...                  "target_displacement_mm": [[0.0, 0.0, 1.0]]}, PlausibilityConfig())
    ['BEAM_ON with implausible amplitude 50.0']
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from breathcast.stream.config import PlausibilityConfig
from breathcast.stream.protocol import CONTROL_ERROR_CODES, MAX_BATCH, HoldReason, decode_output, unpack

__all__ = ["HOSTILE_VALUES", "Fuzzer", "gate_violations", "reply_violations", "frame_violations", "GateWatcher", "FuzzReport",
           "run_fuzz"]

_NUMBERS: tuple[Any, ...] = (0, 1, -1, 0.5, -0.5, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 1e300, -1e300,
                             math.nan, math.inf, -math.inf, 6e14, 5e-324, 1.0, 4.9e9)  # fmt: skip
_OTHERS: tuple[Any, ...] = (True, False, None, "", "1", "x" * 300, b"\x00\xff", [], {}, [1.0, 2.0, 3.0], [None], {"a": 1})
HOSTILE_VALUES: tuple[Any, ...] = _NUMBERS + _OTHERS
"""Values every field is tried with: edge numbers (NaN, Inf, 2**64 - 1, 6e14 s, ...) and every other msgpack type."""

_SAMPLE_FIELDS = ("seq", "t", "amplitude", "raw", "valid", "t_sent", "source", "zzz")
_KNOWN_REASONS = frozenset(r.value for r in HoldReason) - {HoldReason.OK.value}


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class Fuzzer:
    """A seeded stream of hostile input messages and control requests, in the context of a plausible breathing source.

    Most input messages continue a clean 50 Hz breathing trace (so faults land in a healthy window); the rest change
    one to three fields of a sample to a hostile value, drop required ones, add unknown or non-string keys, break
    the envelope (``v``, ``type``, batch), or are not msgpack at all.

    Args:
        seed: the random seed (the same seed gives the same messages).
        rate_hz: source rate of the clean trace, Hz.
        paths: predictor paths ``set_mode`` may name without starting a load (the daemon's own).
    """

    def __init__(self, seed: int, rate_hz: float = 50.0, paths: tuple[str, ...] = ("direct",)) -> None:
        self.rng = random.Random(seed)
        self.seq, self.t, self.dt = 0, 0.0, 1.0 / rate_hz
        self.source = "belt"
        self.paths = paths

    # -- input -------------------------------------------------------------------------------------------------

    def clean_sample(self) -> dict[str, Any]:
        """The next sample of the clean trace (a 4 s breath with a little noise)."""
        self.seq += 1
        self.t += self.dt
        a = 0.5 - 0.5 * math.cos(2 * math.pi * self.t / 4.0) + self.rng.gauss(0.0, 0.003)
        return {"seq": self.seq, "t": self.t, "amplitude": a, "t_sent": time.time(), "source": self.source}

    def _field_value(self, name: str) -> Any:
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice(HOSTILE_VALUES)
        if name == "seq":
            return self.seq + rng.choice((-1, 0, -100, 2, 10**6, -(self.seq + 1)))
        if name == "t":
            return self.t + rng.choice((-1.0, 0.0, 1e-9, 0.3, 2.0, 1e6, 6e14, -6e14))
        if name == "amplitude":
            return rng.choice((50.0, -50.0, 1e6, 3.9, -2.9, 0.5 + rng.uniform(-2, 2)))
        if name == "raw":
            return rng.choice(([1.0], [1.0, 2.0], [1.0, 2.0, 3.0, 4.0], ["a", "b", "c"], 0.3))
        if name == "source":
            return rng.choice(("belt", "belt-2", "", "s" * 257))
        if name == "valid":
            return rng.choice((True, False, 1, "yes"))
        return rng.choice(HOSTILE_VALUES)

    def hostile_sample(self) -> dict[Any, Any]:
        """A sample map with one to three fields hostile, dropped or added (sometimes a non-string key)."""
        m: dict[Any, Any] = self.clean_sample()
        for name in self.rng.sample(_SAMPLE_FIELDS, k=self.rng.randint(1, 3)):
            if self.rng.random() < 0.15:
                m.pop(name, None)
            else:
                m[name] = self._field_value(name)
        if self.rng.random() < 0.1:
            m[b"yyy"] = 2
        if self.rng.random() < 0.03:
            self.source = self.rng.choice(("belt", "belt-2"))  # a changed source name
        return m

    def _envelope(self, body: dict[Any, Any], kind: str) -> dict[Any, Any]:
        m: dict[Any, Any] = {"v": 1, "type": kind, **body}
        if self.rng.random() < 0.1:
            m[self.rng.choice(("v", "type"))] = self.rng.choice(HOSTILE_VALUES + ("sample", "batch"))
        if self.rng.random() < 0.05:
            m.pop(self.rng.choice(("v", "type")))
        return m

    def input_message(self) -> list[bytes]:
        """One input message as its ZeroMQ frames (almost always one)."""
        rng = self.rng
        r = rng.random()
        if r < 0.55:
            return [_pack({"v": 1, "type": "sample", **self.clean_sample()})]
        if r < 0.65:
            samples = [self.clean_sample() for _ in range(rng.randint(1, 20))]
            if rng.random() < 0.5:
                samples[rng.randrange(len(samples))] = self.hostile_sample()
            return [_pack(self._envelope({"samples": samples}, "batch"))]
        if r < 0.88:
            return [_pack(self._envelope(self.hostile_sample(), "sample"))]
        if r < 0.93:
            samples = rng.choice(([], [1, 2], "samples", [self.clean_sample()] * (MAX_BATCH + 1), None))
            return [_pack({"v": 1, "type": "batch", "samples": samples})]
        good = _pack({"v": 1, "type": "sample", **self.clean_sample()})
        return rng.choice(([good[: rng.randrange(1, len(good))]], [good, good], [bytes(rng.randrange(256) for _ in range(32))],
                           [_pack([1, 2, 3])], [b""], [b"\xc1"], [_pack(rng.choice(HOSTILE_VALUES))]))  # fmt: skip

    # -- control -----------------------------------------------------------------------------------------------

    def _arguments(self, cmd: str) -> dict[Any, Any]:
        rng, h = self.rng, lambda: rng.choice(HOSTILE_VALUES)
        if cmd == "set_gating":
            choices = {"kind": lambda: rng.choice(("amplitude", "target", "x", h())),
                       "amplitude_range": lambda: rng.choice(([-0.2, 0.3], [1, 0], [0.0, 0.0], [-10.0, 10.0], [0.1], h())),
                       "target_limits_mm": lambda: rng.choice(([[-3, 3]] * 3, [[-3, 3]] * 2, [[3, -3]] * 3, h())),
                       "target_index": lambda: rng.choice((0, 1, 7, -1, 2**64 - 1, h())),
                       "hysteresis": lambda: rng.choice((0.0, 0.05, 0.3, -1.0, h())),
                       "hysteresis_mm": lambda: rng.choice((0.0, 0.5, 5.0, h()))}  # fmt: skip
        elif cmd == "set_forecast":
            choices = {"horizon_s": lambda: rng.choice((0.0, 0.1, 1.0, 1.5, -0.1, h()))}
        elif cmd == "set_mode":
            choices = {"mode": lambda: rng.choice(("window", "snapshot", "sideways", h())),
                       "path": lambda: rng.choice((*self.paths, "teleport", h()))}  # fmt: skip
        elif cmd == "reset":
            # counters: true clears messages_received, which run_fuzz checks
            choices = {"counters": lambda: rng.choice((False, *(v for v in HOSTILE_VALUES if v is not True)))}
        elif cmd == "coefficients":  # takes no arguments: any is an error, the bare command a (multipart) reply
            choices = {"version": h, "zzz": h}
        elif cmd == "load_plan":  # always with a value no plan has: a valid load is not fuzzed
            bad = rng.choice(({"source": rng.choice(("ct", "", 1, None))}, {"grid": rng.choice(("64", -1.5, None, []))},
                              {"zzz": 1}, {b"yyy": 2}, {"target_lps_mm": [[1, 2]]}))  # fmt: skip
            plan = rng.choice((bad, {"seed": h(), **bad}, rng.choice([v for v in HOSTILE_VALUES if not isinstance(v, dict)])))
            return {"plan": plan}
        else:
            choices = {}
        names = rng.sample(sorted(choices), k=rng.randint(0, len(choices))) if choices else []
        return {name: choices[name]() for name in names}

    def control_request(self) -> bytes:
        """One control request (status, coefficients, set_gating, set_forecast, set_mode, reset, load_plan, or not a
        command)."""
        rng = self.rng
        if rng.random() < 0.05:
            return rng.choice((b"\xc1", _pack([1]), b"", _pack(rng.choice(HOSTILE_VALUES))))
        cmd = rng.choice(("status", "coefficients", "set_gating", "set_forecast", "set_mode", "reset", "load_plan", "fly",
                          None, 1, ""))
        m: dict[Any, Any] = {"v": 1, "cmd": cmd, **(self._arguments(cmd) if isinstance(cmd, str) else {})}
        if rng.random() < 0.1:
            m["v"] = rng.choice(HOSTILE_VALUES)
        if rng.random() < 0.05:
            m.pop(rng.choice(("v", "cmd")))
        if rng.random() < 0.1:
            m[rng.choice(("zzz", b"yyy"))] = rng.choice(HOSTILE_VALUES)
        return _pack(m)


# -- invariants ----------------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def gate_violations(header: dict[str, Any], plausibility: PlausibilityConfig) -> list[str]:
    """What is wrong with one ``gate`` message (empty: nothing); see the module docstring."""
    out = []
    state, reason, reasons = header.get("state"), header.get("reason"), header.get("reasons")
    if state not in ("BEAM_ON", "HOLD"):
        return [f"state {state!r}"]
    if not isinstance(reasons, list) or any(r not in _KNOWN_REASONS for r in reasons):
        return [f"undocumented reasons {reasons!r}"]
    if state == "HOLD":
        if not reasons or reason != reasons[0]:
            out.append(f"HOLD with reason {reason!r} and reasons {reasons!r}")
        return out
    if reasons or reason != "ok":
        out.append(f"BEAM_ON with reason {reason!r} and reasons {reasons!r}")
    if header.get("frame") is None:
        out.append("BEAM_ON without a frame")
    amplitude = header.get("amplitude")
    lo, hi = plausibility.amplitude_range
    if not (_finite(amplitude) and lo <= amplitude <= hi):
        out.append(f"BEAM_ON with implausible amplitude {amplitude!r}")
    disp = header.get("target_displacement_mm")
    if disp is not None:
        d = np.asarray(disp, float).reshape(-1, 3)
        if not np.all(np.isfinite(d)) or (d.size and np.linalg.norm(d, axis=1).max() > plausibility.max_target_displacement_mm):
            out.append(f"BEAM_ON with implausible target displacement {disp!r}")
    return out


def reply_violations(reply: Any) -> list[str]:
    """What is wrong with one control reply (empty: nothing)."""
    if not isinstance(reply, dict):
        return [f"reply is a {type(reply).__name__}"]
    if type(reply.get("v")) is not int or reply["v"] != 1 or not isinstance(reply.get("ok"), bool):
        return [f"reply envelope {({k: reply.get(k) for k in ('v', 'ok')})!r}"]
    if reply["ok"]:
        return []
    error = reply.get("error")
    if not isinstance(error, dict) or error.get("code") not in CONTROL_ERROR_CODES or not isinstance(error.get("message"), str):
        return [f"error reply {error!r}"]
    return []


def frame_violations(reply: Any, payload: list[bytes]) -> list[str]:
    """What is wrong with the frames after a reply's first: an ok ``coefficients`` reply has exactly one, of its
    header's ``nbytes``; every other reply has none."""
    header = reply.get("coefficients") if isinstance(reply, dict) and reply.get("ok") is True else None
    if not isinstance(header, dict):
        return [f"{len(payload)} frame(s) after a one-frame reply"] if payload else []
    if len(payload) != 1 or len(payload[0]) != header.get("nbytes"):
        return [f"coefficients reply with {len(payload)} payload frame(s) of {[len(p) for p in payload]} bytes, "
                f"header nbytes {header.get('nbytes')}"]
    return []


class GateWatcher:
    """Receive every ``gate`` message in a thread, stamp it (``time.perf_counter``) and check its invariants.

    Args:
        endpoint: the daemon's publish endpoint.
        plausibility: the daemon's plausibility limits.
        context: a ZeroMQ context to use (default: its own).
    """

    def __init__(self, endpoint: str, plausibility: PlausibilityConfig, context: zmq.Context | None = None) -> None:
        self.endpoint, self.plausibility = endpoint, plausibility
        self.ctx = context or zmq.Context.instance()
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gate-watcher", daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.rcvhwm = 100000
        sub.setsockopt(zmq.SUBSCRIBE, b"gate")
        sub.connect(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sub.poll(50):
                    continue
                frames = sub.recv_multipart()
                now = time.perf_counter()
                _, header, _ = decode_output(frames)
                problems = gate_violations(header, self.plausibility)
                with self._lock:
                    self.messages.append((now, header))
                    self.violations += [f"gate msg_seq {header.get('msg_seq')}: {p}" for p in problems]
        finally:
            sub.close(0)

    def since(self, t: float) -> list[tuple[float, dict[str, Any]]]:
        """The messages received after ``t`` (perf_counter s)."""
        with self._lock:
            return [(ts, h) for ts, h in self.messages if ts > t]

    def __enter__(self) -> GateWatcher:
        self._thread.start()
        self._ready.wait(5.0)
        time.sleep(0.2)  # the subscription reaches the daemon
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2.0)


@dataclass
class FuzzReport:
    """What :func:`run_fuzz` sent and saw."""

    input_messages: int = 0
    control_requests: int = 0
    control_replies: int = 0
    reply_ms: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)
    payload_replies: int = 0
    messages_counted: int = 0

    def summary(self) -> dict[str, Any]:
        a = np.asarray(self.reply_ms) if self.reply_ms else np.zeros(1)
        return {"input_messages": self.input_messages, "control_requests": self.control_requests,
                "control_replies": self.control_replies, "payload_replies": self.payload_replies,
                "messages_counted": self.messages_counted,
                "reply_p50_ms": float(np.percentile(a, 50)), "reply_p99_ms": float(np.percentile(a, 99)),
                "reply_max_ms": float(a.max()), "violations": len(self.violations), "first_violations": self.violations[:10],
                "error_codes": dict(sorted(self.error_codes.items()))}  # fmt: skip


def run_fuzz(endpoints: dict[str, str], fuzzer: Fuzzer, n_input: int, control_every: int = 10, rate_hz: float = 1000.0,
             reply_timeout_s: float = 2.0) -> FuzzReport:  # fmt: skip
    """Send ``n_input`` fuzzed input messages at ``rate_hz`` and a fuzzed control request after every
    ``control_every``-th, checking every reply; then check that the daemon counted every input message.

    Args:
        endpoints: the daemon's ``input`` and ``control`` endpoints (a dict as in the config's ``[endpoints]``).
        fuzzer: the message source.
        n_input: input messages to send.
        control_every: one control request per this many input messages.
        rate_hz: input messages per second.
        reply_timeout_s: a request without a reply within this is a violation (and the REQ socket is renewed).

    Returns:
        The :class:`FuzzReport`; ``violations`` empty when every invariant held.
    """
    ctx = zmq.Context.instance()
    report = FuzzReport()
    push = ctx.socket(zmq.PUSH)
    push.sndhwm, push.linger, push.sndtimeo = 100000, 1000, 2000
    push.connect(endpoints["input"])
    req = None

    def request(data: bytes) -> Any:
        nonlocal req
        if req is None:
            req = ctx.socket(zmq.REQ)
            req.linger = 0
            req.connect(endpoints["control"])
        start = time.perf_counter()
        req.send(data)
        if not req.poll(int(reply_timeout_s * 1000)):
            req.close(0)
            req = None
            return None
        frames = req.recv_multipart()
        report.reply_ms.append((time.perf_counter() - start) * 1e3)
        reply = unpack(frames[0], 1 << 24)
        report.violations += frame_violations(reply, frames[1:])
        report.payload_replies += len(frames) > 1
        return reply

    try:
        before = request(_pack({"v": 1, "cmd": "status"}))["status"]["counters"].get("messages_received", 0)
        start = time.perf_counter()
        for k in range(n_input):
            while time.perf_counter() < start + k / rate_hz:
                time.sleep(0.0002)
            push.send_multipart(fuzzer.input_message())
            report.input_messages += 1
            if (k + 1) % control_every == 0:
                report.control_requests += 1
                reply = request(fuzzer.control_request())
                if reply is None:
                    report.violations.append(f"control request {report.control_requests}: no reply within {reply_timeout_s} s")
                    continue
                report.control_replies += 1
                report.violations += [f"control request {report.control_requests}: {p}" for p in reply_violations(reply)]
                if isinstance(reply, dict) and not reply.get("ok") and isinstance(reply.get("error"), dict):
                    code = str(reply["error"].get("code"))
                    report.error_codes[code] = report.error_codes.get(code, 0) + 1
        end = time.monotonic() + 10.0
        while True:  # every input message counted, and status still answers
            status = request(_pack({"v": 1, "cmd": "status"}))
            if status is None:
                report.violations.append("status: no reply after the fuzz")
                break
            report.messages_counted = status["status"]["counters"].get("messages_received", 0) - before
            if report.messages_counted >= report.input_messages or time.monotonic() > end:
                break
            time.sleep(0.05)
        if report.messages_counted != report.input_messages:
            report.violations.append(f"{report.input_messages} input messages sent, {report.messages_counted} counted")
    finally:
        push.close()
        if req is not None:
            req.close(0)
    return report
