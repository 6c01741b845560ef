"""The streaming daemon: breathing samples in, displacement fields, target positions and a fail-safe gate out.

Threads (docs/protocol.md has the wire side):

* **intake** owns the input PULL socket and the control REP socket. It drains every input message as it
  arrives, judges each sample (:class:`~breathcast.stream.window.RollingWindow`), logs it, and bumps the
  window version; it never waits for the model or a subscriber. It also publishes the heartbeat (``status``)
  and a HOLD ``gate`` the moment input goes stale.
* **frame** waits for a new window version and computes the newest one only (latest-window-wins: versions that
  arrived meanwhile are counted as ``frames_merged``), then publishes ``target`` and ``gate``. With a polynomial
  (distilled / linear5d) predictor the target comes from :mod:`~breathcast.stream.targets` without the whole field.
* **field** makes the whole field of the newest frame, resizes it to the output grid (mm LPS) and sends it; frames
  whose field it had no time for are counted as ``fields_merged``. So a slow field never delays ``gate``.
* **loader** (on demand) loads a plan or a predictor path off the frame thread; meanwhile the old predictor
  keeps serving a path change, and a new plan holds the gate with reason ``loading``.

The PUB socket is shared by intake, frame and field (a model error found while making a field holds the gate) under
a lock; the field socket belongs to the field thread and to its own ZeroMQ context (its own I/O thread), so that
sending large fields to many subscribers never queues ``gate`` and ``target`` behind them. Field arrays go out
zero-copy from a ring of ``field.sndhwm + 3`` preallocated buffers; a buffer is reused only once ZeroMQ has
released it (its ``MessageTracker`` is done). A field subscriber that does not read holds at most ``sndhwm`` + 1 of
them (a full subscriber queue drops new fields for that subscriber only); when stalled subscribers hold them all, a
field goes out in a buffer of its own (``fields_unpooled``) rather than not at all.

Nothing a peer sends can stop the daemon or leave it silent: every loop is bounded, every control request gets a
reply (``internal_error`` with the message if a handler fails), and :meth:`Daemon.wait` gives up on a thread after
a bounded time so that ``shutdown`` and SIGTERM end the process within 2 s whatever a thread is doing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from breathcast.errors import BreathcastError, PlanRejected
from breathcast.stream.config import GatingConfig, ServeConfig, _build
from breathcast.stream.protocol import (
    MAX_CONTROL_BYTES,
    MAX_INPUT_BYTES,
    PROTOCOL_VERSION,
    GateState,
    HoldReason,
    ProtocolError,
    Topic,
    check_version,
    grid_header,
    pack,
    parse_input,
    unpack,
)
from breathcast.stream.field_coefficients import FieldModel, field_model_from_predictor
from breathcast.stream.recording import SessionLog
from breathcast.stream.shm_ring import RingWriter
from breathcast.stream.window import RollingWindow

__all__ = ["Daemon", "serve", "REASON_PRIORITY", "default_ring_path"]

log = logging.getLogger("breathcast.stream")

REASON_PRIORITY: tuple[HoldReason, ...] = (
    HoldReason.SHUTDOWN,
    HoldReason.PLAN_REJECTED,
    HoldReason.NO_PLAN,
    HoldReason.LOADING,
    HoldReason.NO_INPUT,
    HoldReason.STALE_INPUT,
    HoldReason.STUCK_SENSOR,
    HoldReason.NON_FINITE_SAMPLE,
    HoldReason.INVALID_SAMPLE,
    HoldReason.IMPLAUSIBLE_SAMPLE,
    HoldReason.TIME_JUMP,
    HoldReason.GAP,
    HoldReason.SOURCE_RESTART,
    HoldReason.OUT_OF_ORDER,
    HoldReason.DUPLICATE,
    HoldReason.WINDOW_NOT_FULL,
    HoldReason.MODEL_ERROR,
    HoldReason.NON_FINITE_FIELD,
    HoldReason.IMPLAUSIBLE_TARGET,
    HoldReason.INTERNAL_ERROR,
    HoldReason.OUTSIDE_WINDOW,
)
"""When several reasons hold, the gate's ``reason`` is the first of these; ``reasons`` lists them all."""

_LATENCY_KEEP = 2000
_LINGER_MS = 300
_JOIN_S = 0.5  # wait() joins the threads this long in all, then gives up on them (they are daemon threads)
_TRACKER_WAIT_S = 0.2  # then this long for zero-copy fields in flight: ends within 2 s of stop() in all
_INTERNAL_ERROR_REPLY = pack({"v": PROTOCOL_VERSION, "ok": False,
                              "error": {"code": "internal_error", "message": "the reply could not be encoded"}})


def _percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """``p50``, ``p99``, ``max`` and ``n`` of some latencies (None when there are none)."""
    values = list(values)
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    a = np.fromiter(values, float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()), "n": int(a.size)}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Daemon:
    """The daemon; :meth:`start` binds and runs it in background threads, :meth:`stop` ends it.

    Args:
        config: everything (see :class:`~breathcast.stream.config.ServeConfig`).
        plan: an already built :class:`~breathcast.engine.predictor.Plan` to serve instead of ``config.plan``.
        package: an already read :class:`~breathcast.engine.package.ModelPackage` instead of ``config.package``.
    """

    def __init__(self, config: ServeConfig, plan=None, package=None) -> None:
        self.config = config
        self._initial_plan = plan
        self._package = package
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._state_lock = threading.Lock()  # window, predictor, gating, versions
        self._pub_lock = threading.Lock()
        self._new_window = threading.Condition(self._state_lock)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._started_wall = time.time()
        self._started_mono = time.monotonic()
        self._predictor = None
        self._targets = None
        self._field_ready = threading.Condition()
        self._field_job: tuple | None = None
        self._plan = None
        self._plan_hash = ""
        self._plan_spec = config.plan
        self._path, self._mode = config.path, config.mode
        self._gating: GatingConfig = config.gating
        self._loading: str | None = None
        self._serving_during_load = False
        self._last_error = ""
        self._plan_rejected: str | None = None
        self._window: RollingWindow | None = None
        self._version = 0
        self._done_version = 0
        self._frame = 0
        self._last_receive_mono: float | None = None
        self._gate_last: tuple[str, str] | None = None
        self._gate_last_mono = 0.0
        self._msg_seq: Counter[str] = Counter()
        self._lat: dict[str, deque] = {k: deque(maxlen=_LATENCY_KEEP) for k in ("compute_ms", "target_ms", "field_ms")}
        self._rss_start: int | None = None
        self._calibrator = None
        self._resizer = None
        self._field_grid = None
        self._buffers: list[np.ndarray] = []
        self._trackers: list[zmq.MessageTracker | None] = []
        self._field_model: FieldModel | None = None  # the polynomial in mm LPS that makes the fields (polynomial paths)
        self._field_pair: tuple = (None, None)  # (predictor, its field model)
        self._coefficients_version = 0
        self._ring: RingWriter | None = None
        self._ring_tags: dict[int, tuple | None] = {}  # slot -> what last wrote it (see _make_field)
        self._buffer_tags: list[tuple | None] = []
        self._threads: list[threading.Thread] = []
        self._log: SessionLog | None = None
        self.ctx: zmq.Context | None = None
        self.field_ctx: zmq.Context | None = None
        self._auths: list = []
        self._framed: tuple | None = None  # (predictor, newest sample) of the last frame computed
        self.threads_not_stopped: list[str] = []  # set by wait(): threads that did not end in time (a bug)

    # -- counters ----------------------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Daemon:
        """Bind the sockets, open the session log, start the threads and the first plan load; returns at once."""
        cfg = self.config
        # numba's OpenMP threads spin-wait for each other by default: with a neighbour process on one of 2 cores, a
        # 128x128x112 field took 16 ms instead of 4-6 (issue 17, measured). Passive waiting takes effect when the
        # OpenMP layer loads (the first parallel kernel of the process); a value set by the user wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self._apply_scheduling(cfg.nice, cfg.realtime_priority)
        if cfg.calibration:
            from breathcast.calibration.surrogate import LiveCalibrator, SurrogateCalibration

            self._calibrator = LiveCalibrator(SurrogateCalibration.load(Path(cfg.calibration)))
        if self._package is None:
            from breathcast.engine.package import DEFAULT_PACKAGE, read_package

            self._package = read_package(Path(cfg.package) if cfg.package else DEFAULT_PACKAGE)
        if cfg.session_log:
            self._log = SessionLog(cfg.session_log, cfg.fsync_interval_s,
                                   {"config": _jsonable(dataclasses.asdict(cfg)), "model_id": self._package.model_id})  # fmt: skip
        self.ctx, self.field_ctx = zmq.Context(), zmq.Context()
        self.sockets: list[zmq.Socket] = []
        try:
            self._bind()
        except Exception:
            self._close_sockets()
            if self._log:
                self._log.close()
            raise
        self._rss_start = _rss_bytes()
        for name, target in (("intake", self._intake_loop), ("frame", self._frame_loop), ("field", self._field_loop)):
            thread = threading.Thread(target=self._guard(target), name=f"breathcast-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._start_load(self._plan_spec, self._path, self._mode, new_plan=True, plan=self._initial_plan)
        log.info("serving on %s (input), %s (publish), %s (field), %s (control); model %s",
                 cfg.endpoints.input, cfg.endpoints.publish, cfg.endpoints.field, cfg.endpoints.control, self._package.model_id)  # fmt: skip
        return self

    def _apply_scheduling(self, nice: int, realtime_priority: int) -> None:
        """Set this thread's niceness (and real-time policy) before any other thread exists (Linux: threads inherit
        both; ZeroMQ's I/O threads, numba's and onnxruntime's pools are made later). Below 0, or real time, needs
        CAP_SYS_NICE: refused, it is logged and status says so."""
        self._nice_error = ""
        errors = []
        if nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except OSError as exc:
                errors.append(f"nice {nice} refused: {exc.strerror}")
        if realtime_priority:
            try:
                os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(realtime_priority))
            except OSError as exc:
                errors.append(f"SCHED_RR {realtime_priority} refused: {exc.strerror}")
        if errors:
            self._nice_error = "; ".join(errors)
            log.warning("%s; serving at nice %d", self._nice_error, os.getpriority(os.PRIO_PROCESS, 0))

    def _guard(self, loop):
        def run() -> None:
            try:
                loop()
            except Exception:  # pragma: no cover - a bug; stop rather than serve a frozen gate
                log.exception("%s thread failed; stopping", threading.current_thread().name)
                self._stop.set()

        return run

    def _socket(self, kind: int, endpoint: str, options: dict[int, int] | None = None, ctx: zmq.Context | None = None) -> zmq.Socket:
        """A socket of ``ctx`` (default: the main context) with linger, its options and (when configured) the CURVE
        server key, bound to ``endpoint``."""
        s = (ctx or self.ctx).socket(kind)
        self.sockets.append(s)
        s.linger = _LINGER_MS
        for option, value in (options or {}).items():
            s.setsockopt(option, value)
        sec = self.config.security
        if sec.curve:
            import zmq.auth

            public, secret = zmq.auth.load_certificate(sec.server_secret_key)
            if secret is None:
                raise BreathcastError(f"{sec.server_secret_key} holds no secret key (use the .key_secret file)")
            s.curve_secretkey, s.curve_publickey, s.curve_server = secret, public, True
        try:
            s.bind(endpoint)
        except zmq.ZMQError as exc:
            raise BreathcastError(f"cannot bind {endpoint}: {exc}") from None
        return s

    def _bind(self) -> None:
        cfg = self.config
        if cfg.security.curve:
            from zmq.auth.thread import ThreadAuthenticator

            keys = Path(cfg.security.client_keys_dir)
            if not keys.is_dir():
                raise BreathcastError(f"client_keys_dir {keys} is not a folder of client public keys")
            if not Path(cfg.security.server_secret_key).is_file():
                raise BreathcastError(f"server_secret_key {cfg.security.server_secret_key} is not a file")
            for ctx in (self.ctx, self.field_ctx):  # one ZAP handler per context
                auth = ThreadAuthenticator(ctx)
                auth.start()  # before any bind: the ZAP handler must exist when the first client connects
                auth.configure_curve(domain="*", location=str(keys))
                self._auths.append(auth)
        self.input = self._socket(zmq.PULL, cfg.endpoints.input, {zmq.MAXMSGSIZE: 4 * MAX_INPUT_BYTES})
        self.pub = self._socket(zmq.PUB, cfg.endpoints.publish, {zmq.SNDHWM: 1000})
        # Plain PUB semantics on its own context: a subscriber whose queue (sndhwm fields) is full loses new fields,
        # the others do not (XPUB_NODROP would make one stalled reader stop fields for everyone).
        self.field_pub = self._socket(zmq.PUB, cfg.endpoints.field, {zmq.SNDHWM: cfg.field.sndhwm}, self.field_ctx)
        self.control = self._socket(zmq.REP, cfg.endpoints.control, {zmq.MAXMSGSIZE: 4 * MAX_CONTROL_BYTES})

    def stop(self) -> None:
        """Ask the threads to end (returns within 0.2 s whatever they hold; :meth:`wait` joins)."""
        self._stop.set()
        for condition in (self._new_window, self._field_ready):  # they wake every 0.1 s anyway: never wait on a stuck lock
            if condition.acquire(timeout=0.1):
                try:
                    condition.notify_all()
                finally:
                    condition.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped, then clean up within 2 s whatever a thread is doing; True when it has.

        Args:
            timeout: give up waiting for the stop after this long, s (None: wait for it).
        """
        end = None if timeout is None else time.monotonic() + timeout
        while not self._stop.wait(0.1):
            if end is not None and time.monotonic() > end:
                return False
        join_end = time.monotonic() + _JOIN_S
        for thread in self._threads:
            thread.join(max(0.0, join_end - time.monotonic()))
        self._shutdown()
        return True

    def serve_forever(self) -> int:
        """Wait (in the main thread) until SIGINT, SIGTERM or a ``shutdown`` command, then clean up; returns 0."""
        import signal

        def on_signal(signum, frame) -> None:  # noqa: ARG001
            self.stop()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        return 0

    def _shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        stuck = self.threads_not_stopped = [t.name for t in self._threads if t.is_alive()]
        if stuck:  # a thread that did not end owns its sockets: leave them and the contexts to process exit
            log.error("threads %s did not stop within %.1f s; exiting without them", stuck, _JOIN_S)
        elif self._pub_lock.acquire(timeout=0.2):
            self._pub_lock.release()
            try:
                self._publish_gate(None, [HoldReason.SHUTDOWN], extra={})
            except Exception:
                log.exception("last gate not published")
            deadline = time.monotonic() + _TRACKER_WAIT_S  # let zero-copy fields in flight leave before the context goes
            for tracker in self._trackers:
                while tracker is not None and not tracker.done and time.monotonic() < deadline:
                    time.sleep(0.005)
            self._close_sockets()
            if self._ring is not None:
                self._ring.close()
        if self._log:
            self._log.write({"type": "event", "event": "shutdown", "t_wall": time.time(), "counters": dict(self.counters),
                             "threads_not_stopped": stuck})  # fmt: skip
            self._log.close()

    def _close_sockets(self) -> None:
        for s in getattr(self, "sockets", []):
            try:
                s.close(linger=_LINGER_MS)
            except Exception:
                pass
        for auth in self._auths:
            auth.stop()
        for name in ("ctx", "field_ctx"):
            ctx = getattr(self, name)
            if ctx is not None:
                ctx.term()
                setattr(self, name, None)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.wait(10.0)

    # -- plan and predictor loading ------------------------------------------------------------------------

    def _start_load(self, spec, path: str, mode: str, new_plan: bool, plan=None) -> None:
        with self._state_lock:
            if self._loading is not None:
                raise ProtocolError("busy", f"already loading ({self._loading}); try again when status.state is running")
            self._loading = "plan" if new_plan else f"predictor path {path}"
            self._serving_during_load = not new_plan and self._predictor is not None
            if new_plan:
                self._predictor = None
            self._new_window.notify_all()
        if new_plan:  # HOLD loading now, before the loader thread competes for the interpreter
            self._publish_gate(None, [], extra={})
        thread = threading.Thread(target=self._load, args=(spec, path, mode, new_plan, plan), name="breathcast-loader", daemon=True)
        thread.start()

    def _load(self, spec, path: str, mode: str, new_plan: bool, plan) -> None:
        from breathcast.engine.predictor import PredictorConfig, load_predictor
        from breathcast.engine.runtimes import RuntimeConfig
        from breathcast.stream.plans import build_plan, plan_hash

        started = time.perf_counter()
        try:
            if new_plan:
                plan = plan if plan is not None else build_plan(spec)
            else:
                plan = self._plan
            runtime = RuntimeConfig(kind="onnxruntime", intra_op_threads=self.config.threads)
            predictor = load_predictor(self._package, plan, PredictorConfig(path=path, mode=mode, runtime=runtime))
            fcfg = self.config.field
            resizer, grid = predictor.field_resizer(fcfg.shape or None, np.float16 if fcfg.dtype == "float16" else np.float32)
            # a stalled subscriber holds sndhwm + 1 buffers at most; the others cycle through the rest
            buffers = [np.empty((3, *grid.shape), resizer.dtype) for _ in range(fcfg.sndhwm + 3)] if fcfg.enabled and fcfg.tcp else []
            phash = plan_hash(plan) if new_plan else self._plan_hash
            from breathcast.stream.targets import target_evaluator

            targets = target_evaluator(predictor)
            field_model = field_model_from_predictor(predictor, fcfg.coefficients_dtype, self._coefficients_version + 1, phash)
            if fcfg.enabled and fcfg.ring:
                self._ensure_ring(3 * int(np.prod(grid.shape)) * resizer.dtype.itemsize)
            # Warm up (JIT compilation, runtime allocations) here, not on the first live frame.
            warm = predictor.predict(np.full(predictor.trace.window_samples, float(np.mean(plan.amplitude))))
            scratch = buffers[0] if buffers else np.empty((3, *grid.shape), resizer.dtype)
            if fcfg.enabled:
                resizer(warm.displacement, out=scratch)
            if targets is not None:
                _, _, a, r, _ = targets.evaluate(np.full(predictor.trace.window_samples, float(np.mean(plan.amplitude))))
                if fcfg.enabled and field_model is not None:
                    field_model.field(a, r, grid.shape, resizer.dtype, out=scratch)
        except Exception as exc:
            message = str(exc) if isinstance(exc, BreathcastError) else f"{type(exc).__name__}: {exc}"
            rejected = isinstance(exc, PlanRejected) and new_plan
            log.error("plan rejected: %s" if rejected else "loading failed: %s", message)
            with self._state_lock:
                self._last_error = f"plan rejected: {message}" if rejected else f"load failed: {message}"
                if new_plan:  # a new plan failed: nothing serves; say why (never a silent guess)
                    self._plan_rejected = message if rejected else None
                self._loading = None
                self._version += 1
                self._new_window.notify_all()
            self.count("plans_rejected" if rejected else "load_failures")
            self._event({"event": "plan_rejected" if rejected else "load_failed", "error": message})
            return
        with self._state_lock:
            # Zero-copy fields of the old predictor may still be in flight: the old buffers are dropped, not reused.
            self._predictor, self._plan, self._plan_hash = predictor, plan, phash
            self._targets = targets
            self._path, self._mode = path, mode
            self._resizer, self._field_grid = resizer, grid
            self._buffers, self._trackers = buffers, [None] * len(buffers)
            self._buffer_tags = [None] * len(buffers)
            self._field_model = field_model
            self._field_pair = (predictor, field_model)  # read at once by the frame thread: never a model of another predictor
            if field_model is not None:
                self._coefficients_version = field_model.version
            if self._window is None or new_plan or self._window.trace != predictor.trace:
                self._window = RollingWindow(predictor.trace, self.config.safety, self.config.forecast_horizon_s, self.config.forecast,
                                             plausibility=self.config.plausibility)  # fmt: skip
            self._loading = None
            self._plan_rejected = None
            points = len(plan.target_lps_mm)
            self._last_error = "" if self._gating.kind != "target" or self._gating.target_index < points else (
                f"gating target_index {self._gating.target_index}: the plan has {points} target point(s); the gate holds "
                "outside_gating_window until set_gating names one")  # fmt: skip
            for latencies in self._lat.values():  # status reports the predictor that now serves, not earlier ones
                latencies.clear()
            self._version += 1
            self._new_window.notify_all()
        info = {"event": "loaded", "plan": plan.name, "plan_hash": phash, "path": path, "mode": mode,
                "model_id": predictor.model_id, "load_s": time.perf_counter() - started,
                "distillation_error_mm": predictor.distillation_error_mm, "plan_warnings": list(predictor.plan_warnings)}  # fmt: skip
        log.info("loaded %s", info)
        for warning in predictor.plan_warnings:
            log.warning("plan %s: %s", plan.name, warning)
        self._event(info)

    def _ensure_ring(self, capacity: int) -> None:
        """Create the ring file at the first load (again only if a field no longer fits its slots)."""
        if self._ring is not None and self._ring.capacity >= capacity:
            return
        fcfg = self.config.field
        path = fcfg.ring_path or str(default_ring_path(self.config.endpoints.field))
        old = self._ring
        with self._state_lock:
            self._ring = None
        if old is not None:
            old.close()
        ring = RingWriter(path, fcfg.ring_slots, capacity, fcfg.ring_mode)
        with self._state_lock:
            self._ring, self._ring_tags = ring, {}
        log.info("field ring %s: %d slots of %d bytes, mode %o", path, ring.slots, capacity, ring.mode)

    def _event(self, record: dict[str, Any]) -> None:
        if self._log:
            self._log.write({"type": "event", "t_wall": time.time(), **_jsonable(record)})

    # -- intake ------------------------------------------------------------------------------------------

    def _intake_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.input, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        next_status = time.monotonic()
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(10))
            except zmq.ZMQError:
                break
            try:
                if self.input in events:
                    self._drain_input()
                if self.control in events:
                    self._handle_control()
                now = time.monotonic()
                self._check_stale(now)
                if now >= next_status:
                    next_status = now + self.config.status_interval_s
                    self._publish(Topic.STATUS, self.status())
            except Exception:
                log.exception("intake error")
                self.count("internal_errors")

    def _drain_input(self) -> None:
        records: list[dict[str, Any]] = []
        for _ in range(1000):  # then let control and the heartbeat run
            try:
                frames = self.input.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            t_receive, now = time.time(), time.monotonic()
            self.count("messages_received")
            if len(frames) != 1:
                self.count("malformed_messages")
                self.count("malformed.multipart")
                continue
            try:
                samples = parse_input(frames[0])
            except ProtocolError as exc:
                self.count("malformed_messages")
                self.count(f"malformed.{exc.code}")
                continue
            with self._state_lock:
                window = self._window
                if window is None:
                    self.count("samples_received", len(samples))
                    self.count("samples_dropped_no_plan", len(samples))
                    continue
                for sample in samples:
                    self.count("samples_received")
                    amplitude = self._amplitude(sample)
                    reason = window.add(sample, amplitude, now, t_receive)
                    rec = {"type": "sample", "seq": sample.seq, "t": sample.t_source, "t_receive": t_receive,
                           "amplitude": amplitude, "valid": sample.valid}  # fmt: skip
                    if sample.raw is not None:
                        rec["raw"] = list(sample.raw)
                    if sample.t_sent is not None:
                        rec["t_sent"] = sample.t_sent
                    if reason is None:
                        self.count("samples_accepted")
                        self._last_receive_mono = now  # only an accepted sample is fresh input
                    else:
                        rec["type"], rec["reason"] = "rejected", reason.value
                        self.count("samples_rejected")
                        self.count(f"rejected.{reason.value}")
                    records.append(rec)
                # A new window, or a refused sample: either way the gate is decided again now.
                self._version += 1
                self._new_window.notify()
        if self._log and records:
            self._log.write_many(records)

    def _amplitude(self, sample) -> float:
        if sample.amplitude is not None:
            return sample.amplitude
        if self._calibrator is None:
            self.count("raw_without_calibration")
            return math.nan
        try:
            return self._calibrator.update(sample.t_source, np.asarray(sample.raw), sample.valid)
        except BreathcastError:
            return math.nan

    def _check_stale(self, now: float) -> None:
        """Publish a HOLD without a frame when nothing serves or input stopped (at once, then every status interval)."""
        reasons = self._plan_reasons() + self._input_time_reasons(now)
        if not reasons:
            return
        reasons.sort(key=REASON_PRIORITY.index)
        with self._pub_lock:
            last = self._gate_last
        due = now - self._gate_last_mono >= self.config.status_interval_s
        if last is None or last[0] != GateState.HOLD.value or last[1] != reasons[0].value or due:
            self._publish_gate(None, reasons, extra={})

    def _plan_reasons(self) -> list[HoldReason]:
        """Why nothing serves: the plan was rejected, it is loading, or there is none."""
        if self._predictor is not None:
            return []
        if self._loading is not None:
            return [HoldReason.LOADING]
        return [HoldReason.PLAN_REJECTED if self._plan_rejected else HoldReason.NO_PLAN]

    def _input_time_reasons(self, now: float) -> list[HoldReason]:
        if self._last_receive_mono is None:
            return [HoldReason.NO_INPUT]
        if now - self._last_receive_mono > self.config.safety.stale_after_s:
            return [HoldReason.STALE_INPUT]
        return []

    # -- frames ------------------------------------------------------------------------------------------

    def _frame_loop(self) -> None:
        while not self._stop.is_set():
            with self._new_window:
                while self._version == self._done_version and not self._stop.is_set():
                    self._new_window.wait(0.1)
                if self._stop.is_set():
                    return
                merged = self._version - self._done_version - 1
                self._done_version = self._version
                predictor, window = self._predictor, self._window
                newest = window.newest if window is not None else None
                now = time.monotonic()
                reasons = window.reasons(now) if window is not None else []
                fresh = self._framed is None or predictor is not self._framed[0] or newest is not self._framed[1]
                values = window.window() if (fresh and window is not None and window.full) else None
                forecast = window.forecast_amplitude() if newest is not None else None
                gating = self._gating
                loading = self._loading
            if merged > 0:
                self.count("frames_merged", merged)
            try:
                if not fresh:  # a refused sample: the gate is decided again, but no frame repeats the old window
                    if reasons:
                        self._publish_gate(newest, reasons, extra={})
                    continue
                self._compute_frame(predictor, newest, reasons, values, forecast, gating, loading)
            except Exception as exc:
                log.exception("frame error")
                self.count("internal_errors")
                self._last_error = f"frame: {type(exc).__name__}: {exc}"
                self._publish_gate(newest, [HoldReason.INTERNAL_ERROR], extra={})

    def _compute_frame(self, predictor, newest, reasons, values, forecast, gating, loading) -> None:
        if predictor is not None and loading:
            self.count("frames_during_load")
        if newest is None or values is None or predictor is None:
            self._publish_gate(newest, reasons or ([HoldReason.WINDOW_NOT_FULL] if predictor is not None else []), extra={})
            return
        self._framed = (predictor, newest)
        self._frame += 1
        frame = self._frame
        fast = self._targets if self._targets is not None and self._targets.predictor is predictor else None
        prediction = None
        try:
            if fast is not None:  # target and gate first, from the polynomial at the target only
                now_lps, target_disp, a, r, compute_s = fast.evaluate(values)
            else:
                prediction = predictor.predict(values)
                now_lps, target_disp = prediction.target_lps_mm, prediction.target_displacement_mm
                a, r, compute_s = prediction.amplitude, prediction.rate, prediction.compute_s
        except Exception as exc:
            self._model_failed(newest, reasons, frame, exc)
            return
        self.count("frames_computed")
        self._lat["compute_ms"].append(compute_s * 1e3)
        if not (np.all(np.isfinite(now_lps)) and np.all(np.isfinite(target_disp))):
            self.count("non_finite_fields")
            self._publish_gate(newest, [*reasons, HoldReason.NON_FINITE_FIELD], extra={"frame": frame})
            return
        amplitude_now = float(values[-1])
        limit = self.config.plausibility.max_target_displacement_mm
        if len(target_disp) and float(np.max(np.linalg.norm(np.asarray(target_disp, float), axis=1))) > limit:
            self.count("implausible_targets")  # a model answer no anatomy gives: HOLD until the window is clean
            with self._state_lock:
                if self._window is not None:
                    self._window.flag(HoldReason.IMPLAUSIBLE_TARGET, newest.t_source)
            reasons = [*reasons, HoldReason.IMPLAUSIBLE_TARGET]
        with self._pub_lock:
            was_on = self._gate_last is not None and self._gate_last[0] == GateState.BEAM_ON.value
        inside = self._inside(gating, amplitude_now, target_disp, was_on)
        base = self._frame_header(predictor, newest, frame, float(r[-1]), compute_s, amplitude_now)
        target = {**base, "target_lps_mm": np.asarray(now_lps).tolist(),
                  "target_planned_lps_mm": predictor.plan.target_lps_mm.tolist(),
                  "target_displacement_mm": np.asarray(target_disp).tolist(),
                  "units": {"target_lps_mm": "mm, patient LPS (x, y, z)", "target_displacement_mm": "mm, patient LPS",
                            "amplitude": "dimensionless", "rate": "1/s", "times": "s"}}  # fmt: skip
        self._publish(Topic.TARGET, target)
        self._lat["target_ms"].append((time.time() - newest.t_receive) * 1e3)
        owner, model = self._field_pair
        if fast is not None and model is not None and owner is predictor:  # the state a client needs to make this frame's field
            self._publish(Topic.STATE, {**base, "slice_amplitude": np.asarray(a, float).tolist(), "slice_rate": np.asarray(r, float).tolist(),
                                        "coefficients": {"version": model.version, "hash": model.hash}})  # fmt: skip
        gate_reasons = list(reasons) + ([] if inside else [HoldReason.OUTSIDE_WINDOW])
        self._publish_gate(newest, gate_reasons, extra={"frame": frame, "amplitude": amplitude_now,
                                                        "target_displacement_mm": np.asarray(target_disp).tolist()})  # fmt: skip
        # The field after target and gate: started before them it doubled the target's p50 on 2 cores (measured)
        if not (self.config.field.enabled and self._resizer is not None):
            return
        if frame % self.config.field.every:
            self.count("fields_skipped_every")
            return
        self._submit_field((predictor, fast, prediction, a, r, base, newest, reasons, frame))

    # -- fields (their own thread: a slow field never delays target and gate) -----------------------------------

    def _submit_field(self, job: tuple) -> None:
        with self._field_ready:
            if self._field_job is not None:
                self.count("fields_merged")  # the field thread was busy: only the newest frame's field is made
            self._field_job = job
            self._field_ready.notify()

    def _field_loop(self) -> None:
        if self.config.field.threads:
            import numba

            numba.set_num_threads(min(self.config.field.threads, numba.config.NUMBA_NUM_THREADS))  # this thread's kernels only
        while not self._stop.is_set():
            with self._field_ready:
                while self._field_job is None and not self._stop.is_set():
                    self._field_ready.wait(0.1)
                job, self._field_job = self._field_job, None
            if job is None:
                continue
            try:
                self._make_field(*job)
            except Exception:
                log.exception("field error")
                self.count("internal_errors")

    def _make_field(self, predictor, fast, prediction, a, r, base, newest, reasons, frame: int) -> None:
        with self._state_lock:
            if predictor is not self._predictor:  # a new predictor came in meanwhile: its buffers, its grid
                return
            resizer, buffers, trackers, grid = self._resizer, self._buffers, self._trackers, self._field_grid
            model, ring, ring_tags, buffer_tags = self._field_model, self._ring, self._ring_tags, self._buffer_tags
        if prediction is None and model is None:  # a polynomial path without a field model: never expected
            raise BreathcastError("no field model for a polynomial predictor")
        key = None if prediction is not None else (model.hash, tuple(grid.shape))

        def make(out: np.ndarray, tag: tuple | None) -> tuple | None:
            """The field into ``out`` (mm LPS on the field grid): the polynomial and the resize in one kernel on the
            polynomial paths (from the very coefficients the ``coefficients`` command ships), else the resize. ``tag``
            says what last wrote ``out``: when it was this model, the rows that are zero for every state are not
            written again. Returns the tag ``out`` has now."""
            if prediction is not None:
                resizer(prediction.displacement, out=out)
            else:
                model.field(a, r, grid.shape, resizer.dtype, out=out, zeros_kept=tag == key)
            return key

        self._publish_field(base, make, newest, reasons, frame, resizer, buffers, trackers, buffer_tags, grid, ring, ring_tags)

    def _model_failed(self, newest, reasons, frame: int, exc: Exception) -> None:
        """A model error or a non-finite field: HOLD with its reason; the next good frame recovers."""
        self.count("model_errors")
        reason = HoldReason.MODEL_ERROR
        if isinstance(exc, BreathcastError) and "non-finite" in str(exc):
            reason = HoldReason.NON_FINITE_FIELD
            self.count("non_finite_fields")
        self._last_error = f"frame {frame}: {exc if isinstance(exc, BreathcastError) else f'{type(exc).__name__}: {exc}'}"
        self._publish_gate(newest, [*reasons, reason], extra={"frame": frame})

    def _inside(self, gating: GatingConfig, amplitude: float, target_disp: np.ndarray, was_on: bool = False) -> bool:
        """Inside the gating window; with hysteresis, BEAM_ON starts only that far inside and stops at the edge."""
        if gating.kind == "amplitude":
            lo, hi = gating.amplitude_range
            margin = 0.0 if was_on else gating.hysteresis
            return lo + margin <= amplitude <= hi - margin
        if gating.target_index >= len(target_disp):
            return False
        margin = 0.0 if was_on else gating.hysteresis_mm
        d = target_disp[gating.target_index]
        return all(lo + margin <= v <= hi - margin for v, (lo, hi) in zip(d, gating.target_limits_mm))

    def _frame_header(self, predictor, newest, frame: int, rate: float, compute_s: float, amplitude: float) -> dict[str, Any]:
        plan = predictor.plan
        return {
            "frame": frame,
            "sample_seq": newest.seq,
            "t_source": newest.t_source,
            "t_receive": newest.t_receive,
            "t_sent": newest.t_sent,
            "horizon_s": self._window.horizon_s if self._window else 0.0,
            "t_valid": newest.t_source + (self._window.horizon_s if self._window else 0.0),
            "amplitude": amplitude,
            "rate": rate,
            "amplitude_measured": newest.amplitude,
            "model_id": predictor.model_id,
            "path": self._path,
            "mode": self._mode,
            "plan": {"name": plan.name, "hash": self._plan_hash},
            "grid": grid_header(predictor.grid, plan.frame_of_reference_uid),
            "compute_ms": compute_s * 1e3,
        }

    def _publish_field(self, base: dict[str, Any], make, newest, reasons, frame: int, resizer, buffers, trackers, buffer_tags,
                       grid, ring: RingWriter | None, ring_tags: dict) -> None:  # fmt: skip
        """Make the field (``make(out)``) where it goes, and send it: into the next ring slot and a ``ring``
        announcement first (same host: nothing else to copy), then, with ``field.tcp``, into a free send buffer sent
        zero-copy (a copy of the ring slot when there is one).

        When subscribers that do not read hold every buffer of the pool, the TCP field goes out in a buffer of its own
        that ZeroMQ frees once every queue has let go of it (``fields_unpooled``): a stalled subscriber costs memory
        (at most ``field.sndhwm`` + 1 fields each), never the fields of the others.
        """
        shape, dtype = (3, *grid.shape), resizer.dtype
        field_keys = {**base, "v": PROTOCOL_VERSION, "grid": grid_header(grid, base["grid"]["frame_of_reference_uid"]),
                      "dtype": np.dtype(dtype).newbyteorder("<").str, "shape": list(shape), "order": "C",
                      "nbytes": int(np.prod(shape)) * dtype.itemsize, "components": ["x", "y", "z"], "units": "mm",
                      "convention": "pull-back displacement in patient LPS: the planning-CT point at p + u(p) is at p now"}  # fmt: skip
        made = None
        try:
            if ring is not None:
                slot, made = ring.begin(dtype, shape)
                tag = ring_tags.pop(slot, None)  # absent while it is written (and after a failure)
                ring_tags[slot] = make(made, tag)
                seq = self._next_seq(Topic.RING)
                offset = ring.commit(slot, seq, frame, dtype, field_keys["nbytes"])
                header = {**field_keys, "topic": Topic.RING.value, "msg_seq": seq,
                          "ring": {"path": str(ring.path), "slot": slot, "offset": offset, "seq": seq}, "t_publish": time.time()}  # fmt: skip
                try:
                    self.field_pub.send_multipart([Topic.RING.value.encode(), pack(_jsonable(header))], flags=zmq.NOBLOCK)
                    self.count("fields_ring")
                    self._lat["field_ms"].append((time.time() - newest.t_receive) * 1e3)
                except zmq.Again:
                    self.count("fields_dropped_slow_subscriber")
            if not buffers:
                return
            index = next((i for i, t in enumerate(trackers) if t is None or t.done), None)
            if index is None:
                self.count("fields_unpooled")
                out = np.empty_like(buffers[0])
            else:
                out = buffers[index]
            tag = buffer_tags[index] if index is not None else None
            if index is not None:
                buffer_tags[index] = None  # while it is written (and after a failure)
            if made is not None:
                np.copyto(out, made)
                tag = None
            else:
                tag = make(out, tag)
            if index is not None:
                buffer_tags[index] = tag
        except Exception as exc:
            self._model_failed(newest, reasons, frame, exc)
            return
        header = {**field_keys, "topic": Topic.FIELD.value, "msg_seq": self._next_seq(Topic.FIELD), "t_publish": time.time()}
        try:
            tracker = self.field_pub.send_multipart([Topic.FIELD.value.encode(), pack(_jsonable(header)), out],
                                                    flags=zmq.NOBLOCK, copy=False, track=index is not None)  # fmt: skip
        except zmq.Again:  # PUB drops for a full subscriber queue instead; only a socket that cannot send at all
            self.count("fields_dropped_slow_subscriber")
            return
        if index is not None:
            trackers[index] = tracker
        self.count("fields_published")
        if made is None:
            self._lat["field_ms"].append((time.time() - newest.t_receive) * 1e3)

    # -- publishing --------------------------------------------------------------------------------------

    def _next_seq(self, topic: Topic) -> int:
        self._msg_seq[topic.value] += 1
        return self._msg_seq[topic.value]

    def _publish(self, topic: Topic, body: dict[str, Any]) -> None:
        with self._pub_lock:
            header = {"v": PROTOCOL_VERSION, "topic": topic.value, "msg_seq": self._next_seq(topic), **body, "t_publish": time.time()}
            try:
                self.pub.send_multipart([topic.value.encode(), pack(_jsonable(header))], flags=zmq.NOBLOCK)
            except zmq.Again:
                self.count(f"publish_dropped.{topic.value}")
            except zmq.ZMQError:
                pass

    def _publish_gate(self, newest, reasons: list[HoldReason], extra: dict[str, Any]) -> None:
        """Publish (and log) one gate decision; a stale input, checked here last, always wins."""
        reasons = list(dict.fromkeys(self._plan_reasons() + reasons + self._input_time_reasons(time.monotonic())))
        if self._stop.is_set() and HoldReason.SHUTDOWN not in reasons:
            reasons.insert(0, HoldReason.SHUTDOWN)
        reasons.sort(key=REASON_PRIORITY.index)
        state = GateState.HOLD if reasons else GateState.BEAM_ON
        reason = reasons[0].value if reasons else HoldReason.OK.value
        predictor = self._predictor
        body: dict[str, Any] = {
            "state": state.value,
            "reason": reason,
            "reasons": [r.value for r in reasons],
            "frame": extra.get("frame"),
            "sample_seq": newest.seq if newest else None,
            "t_source": newest.t_source if newest else None,
            "t_receive": newest.t_receive if newest else None,
            "t_sent": newest.t_sent if newest else None,
            "horizon_s": self._window.horizon_s if self._window else 0.0,
            "amplitude": extra.get("amplitude"),
            "target_displacement_mm": extra.get("target_displacement_mm"),
            "gating": _jsonable(dataclasses.asdict(self._gating)),
            "model_id": predictor.model_id if predictor else self._package.model_id,
            "plan": {"name": self._plan.name if self._plan else "", "hash": self._plan_hash},
            "grid": grid_header(predictor.grid, predictor.plan.frame_of_reference_uid) if predictor else None,
        }
        with self._pub_lock:
            self._gate_last = (state.value, reason)
            self._gate_last_mono = time.monotonic()
            self.count(f"gate.{state.value}")
            if state is GateState.HOLD:
                self.count(f"hold.{reason}")
        self._publish(Topic.GATE, body)
        if self._log:
            self._log.write({"type": "gate", "t_wall": time.time(), **{k: body[k] for k in
                             ("state", "reason", "reasons", "frame", "sample_seq", "t_source", "amplitude", "target_displacement_mm")}})  # fmt: skip

    # -- status and control ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The heartbeat body (also the ``status`` command's reply)."""
        predictor, field_model, ring = self._predictor, self._field_model, self._ring
        rss = _rss_bytes()
        with self._counter_lock:
            counters = dict(self.counters)
        window = self._window
        state = "loading" if self._loading else ("running" if predictor is not None else
                                                  "plan_rejected" if self._plan_rejected else "no_plan")
        return {
            "state": state,
            "loading": self._loading,
            "serving_during_load": bool(self._loading and self._serving_during_load),
            "last_error": self._last_error,
            "plan_rejected": self._plan_rejected,
            "status_interval_s": self.config.status_interval_s,
            "stale_after_s": self.config.safety.stale_after_s,
            "uptime_s": time.monotonic() - self._started_mono,
            "model_id": predictor.model_id if predictor else self._package.model_id,
            "plan": {"name": self._plan.name if self._plan else "", "hash": self._plan_hash,
                     "frame_of_reference_uid": self._plan.frame_of_reference_uid if self._plan else "",
                     "warnings": list(predictor.plan_warnings) if predictor else []},  # fmt: skip
            "path": self._path,
            "mode": self._mode,
            "predictor": None if predictor is None else {
                "load_s": predictor.load_s, "distillation_error_mm": predictor.distillation_error_mm,
                "model_grid": list(predictor.grid.shape), "window_samples": predictor.trace.window_samples,
                "sample_interval_s": predictor.trace.sample_interval_s},  # fmt: skip
            "field": {"enabled": self.config.field.enabled, "dtype": self.config.field.dtype,
                      "shape": list(self._field_grid.shape) if self._field_grid else None, "tcp": self.config.field.tcp,
                      "ring": None if ring is None else {"path": str(ring.path), "slots": ring.slots, "mode": f"{ring.mode:o}"},
                      "coefficients": None if field_model is None else {
                          "version": field_model.version, "hash": field_model.hash, "dtype": field_model.dtype,
                          "nbytes": int(field_model.coefficients.nbytes), "quantization_error_mm": field_model.quantization_error_mm}},  # fmt: skip
            "gate": {"state": self._gate_last[0], "reason": self._gate_last[1]} if self._gate_last else None,
            "gating": _jsonable(dataclasses.asdict(self._gating)),
            "horizon_s": window.horizon_s if window else self.config.forecast_horizon_s,
            "last_sample_seq": window.newest.seq if window and window.newest else None,
            "counters": counters,
            "latency_ms": {k: _percentiles(v) for k, v in self._lat.items()},
            "rss_bytes": rss,
            "rss_start_bytes": self._rss_start,
            "session_log": {"path": str(self._log.path), "records": self._log.records} if self._log else None,
            "curve": self.config.security.curve,
            "scheduling": {"nice_requested": self.config.nice, "nice": os.getpriority(os.PRIO_PROCESS, 0),
                           "realtime_priority_requested": self.config.realtime_priority,
                           "policy": {os.SCHED_RR: "SCHED_RR", os.SCHED_FIFO: "SCHED_FIFO"}.get(os.sched_getscheduler(0), "SCHED_OTHER"),
                           "error": getattr(self, "_nice_error", "")},  # fmt: skip
        }

    def _handle_control(self) -> None:
        try:
            frames = self.control.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self.count("control_requests")
        stop_after = False
        payload = None
        try:
            if len(frames) != 1:
                raise ProtocolError("malformed", f"a request is one frame, got {len(frames)}")
            request = unpack(frames[0], MAX_CONTROL_BYTES)
            if not isinstance(request, dict):
                raise ProtocolError("malformed", "a request must be a msgpack map")
            check_version(request)
            if not isinstance(request.get("cmd"), str):
                raise ProtocolError("bad_argument", f"cmd must be a string, got {type(request.get('cmd')).__name__}")
            reply = self._command(request)
            stop_after = request.get("cmd") == "shutdown"
            reply = {"v": PROTOCOL_VERSION, "ok": True, **reply}
            payload = reply.pop("_payload", None)
        except ProtocolError as exc:
            self.count("control_errors")
            reply = _error_reply(exc.code, str(exc).split(": ", 1)[-1])
        except BreathcastError as exc:
            self.count("control_errors")
            reply = _error_reply("bad_argument", str(exc))
        except Exception as exc:  # a bug: still one reply, REQ/REP must never lock up for every client
            log.exception("control request failed")
            self.count("control_errors")
            self.count("internal_errors")
            reply = _error_reply("internal_error", f"{type(exc).__name__}: {exc}")
        try:
            data = pack(_jsonable(reply))
        except Exception:
            log.exception("control reply not encodable")
            self.count("internal_errors")
            data = _INTERNAL_ERROR_REPLY
            payload = None
        if payload is not None:  # the coefficients: a second frame, raw, zero-copy
            self.control.send_multipart([data, payload], copy=False)
        else:
            self.control.send(data)
        if stop_after:
            self._event({"event": "shutdown_requested"})
            self.stop()

    def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        args = {k: v for k, v in request.items() if k not in ("v", "cmd")}
        if cmd == "status":
            return {"status": self.status()}
        if cmd == "coefficients":
            if args:
                raise ProtocolError("bad_argument", f"coefficients takes no arguments, got {sorted(args)}")
            predictor, model = self._field_pair  # one read: never the polynomial of another plan's predictor
            if model is None or predictor is None:
                raise ProtocolError("unavailable", f"the {self._path} path has no polynomial to ship" if predictor is not None
                                    else "no predictor loaded yet (status.state is not running)")  # fmt: skip
            header = model.header()
            header["grid"] = grid_header(model.grid, predictor.plan.frame_of_reference_uid)
            return {"coefficients": header, "_payload": model.coefficients}
        if cmd == "shutdown":
            return {}
        if cmd == "reset":
            if not isinstance(args.get("counters", False), bool):
                raise ProtocolError("bad_argument", "reset takes counters: true or false")
            with self._state_lock:
                if self._window is not None:
                    self._window.reset()
                self._last_receive_mono = None
            if args.get("counters"):
                with self._counter_lock:
                    self.counters.clear()
                for v in self._lat.values():
                    v.clear()
            self._event({"event": "reset"})
            return {}
        if cmd == "set_gating":
            merged = {**_jsonable(dataclasses.asdict(self._gating)), **args}
            gating = _build(GatingConfig, merged, "gating.")
            predictor = self._predictor
            points = len(predictor.plan.target_lps_mm) if predictor is not None else None
            if gating.kind == "target" and points is not None and gating.target_index >= points:
                raise ProtocolError("bad_argument", f"target_index {gating.target_index}: the plan has {points} target point(s)")
            with self._state_lock:
                self._gating = gating
            self._event({"event": "set_gating", "gating": dataclasses.asdict(gating)})
            return {"gating": _jsonable(dataclasses.asdict(gating))}
        if cmd == "set_forecast":
            horizon = args.get("horizon_s")
            if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or not 0 <= horizon <= 1:
                raise ProtocolError("bad_argument", "horizon_s must be a number in [0, 1] s")
            with self._state_lock:
                if self._window is not None:
                    self._window.set_horizon(float(horizon), self.config.forecast)
                    self._window.reset()
            self._event({"event": "set_forecast", "horizon_s": horizon})
            return {"horizon_s": float(horizon)}
        if cmd == "set_mode":
            unknown = set(args) - {"mode", "path"}
            if unknown or not args:
                raise ProtocolError("bad_argument", "set_mode takes mode (window|snapshot) and/or path (direct|distilled|linear5d)")
            mode, path = args.get("mode", self._mode), args.get("path", self._path)
            if mode not in ("window", "snapshot") or path not in ("direct", "distilled", "linear5d"):
                raise ProtocolError("bad_argument", f"mode must be window|snapshot and path direct|distilled|linear5d, got {mode!r}, {path!r}")
            if path == self._path:
                from breathcast.engine.predictor import WindowMode

                with self._state_lock:
                    self._mode = mode
                    if self._predictor is not None:
                        self._predictor.mode = WindowMode(mode)
                self._event({"event": "set_mode", "mode": mode})
                return {"mode": mode, "path": path, "loading": False}
            if self._plan is None:
                raise ProtocolError("busy", "no plan loaded yet")
            self._start_load(self._plan_spec, path, mode, new_plan=False)
            return {"mode": mode, "path": path, "loading": True}
        if cmd == "load_plan":
            from breathcast.stream.config import PlanSpec

            plan_map = args.get("plan", {})
            if not isinstance(plan_map, dict):
                raise ProtocolError("bad_argument", f"plan must be a map of [plan] keys, got {type(plan_map).__name__}")
            spec = _build(PlanSpec, plan_map, "plan.")
            self._plan_spec = spec
            self._start_load(spec, self._path, self._mode, new_plan=True)
            return {"loading": True}
        raise ProtocolError("unknown_command", f"unknown cmd {cmd!r}; known: status, coefficients, load_plan, set_mode, set_gating, "
                            "set_forecast, reset, shutdown")  # fmt: skip


def default_ring_path(field_endpoint: str) -> Path:
    """``/dev/shm/breathcast-<uid>-<field port>.ring`` (the temp folder without /dev/shm; an ipc:// endpoint's name
    hashed instead of the port)."""
    import hashlib
    import tempfile

    tail = field_endpoint.rsplit(":", 1)[-1]
    tag = tail if tail.isdigit() else hashlib.sha256(field_endpoint.encode()).hexdigest()[:12]
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return folder / f"breathcast-{os.getuid()}-{tag}.ring"


def _error_reply(code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message}}


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python, Paths -> str (msgpack and JSON safe)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return obj
    return obj


def serve(config: ServeConfig) -> int:
    """Run the daemon in the foreground until SIGINT / SIGTERM or a ``shutdown`` command; returns 0.

    If a thread did not end in time (a bug: it is logged, and the session log is closed), the process ends at once
    with exit code 3 rather than wait at interpreter exit for sockets that thread still owns.
    """
    daemon = Daemon(config).start()
    code = daemon.serve_forever()
    if daemon.threads_not_stopped:
        logging.shutdown()
        os._exit(3)
    return code
