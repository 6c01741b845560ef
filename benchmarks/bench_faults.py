"""The daemon under hostile and faulty input (issue 15): time to HOLD for every reason, time back to BEAM_ON, a
seeded fuzz of >= 10,000 messages, field-subscriber isolation, and the SIGKILL + torn-tail + restart cycle.

* **Time to HOLD** for each hold reason: a live 25 Hz breathing source on loopback gets a healthy window (BEAM_ON),
  then one fault; the time runs from the moment the fault is detectable (the faulty sample or command sent; for
  ``stale_input`` the last sample + ``stale_after_s``; for ``stuck_sensor`` the sample that completes
  ``stuck_after_s`` of a flat line; for ``plan_rejected`` the engine's refusal) to the first ``gate`` HOLD that names
  the reason. Bar: p99 <= 40 ms. **Back to BEAM_ON**: from the last faulty sample (or the fault's end) to the next
  BEAM_ON, next to the recovery the protocol documents (a fault in the window: until it has left the 2.3 s window).
  The daemon runs in its own process (shipped package, distilled path, 64³ float32 field); ``model_error``,
  ``non_finite_field``, ``internal_error`` and ``plan_rejected`` cannot be caused from the wire, so they run against
  a daemon in this process whose engine is made to fail on purpose.
* **Fuzz**: ``--fuzz-messages`` (default 10,000) seeded hostile input messages and one fuzzed control request per 10
  (:mod:`breathcast.stream.faults`), every reply and every ``gate`` checked against the protocol's invariants.
* **Isolation**: ``gate`` latency of a live source with and without 50 field subscribers that never read
  (``RCVHWM`` 1), and the fields a reading subscriber still gets.
* **Torn tail**: ``--cycles`` times: SIGKILL the daemon, cut its session log mid-record (power loss between fsyncs),
  restart it on the same file, send 125 samples; count what reads back. Then SIGTERM: seconds to exit.

    python benchmarks/bench_faults.py                       # full size, about 20 minutes on 2 cores
    python benchmarks/bench_faults.py --trials 5 --fuzz-messages 2000 --cycles 1 --no-readme   # a quick look

Writes ``benchmarks/results/faults.json`` and the README block ``faults``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, update_readme_table, wait_until_running, write_results  # noqa: E402

from breathcast.errors import BreathcastError, PlanRejected  # noqa: E402
from breathcast.stream.client import ControlClient, SampleSender  # noqa: E402
from breathcast.stream.config import PlausibilityConfig, config_from_dict  # noqa: E402
from breathcast.stream.daemon import _percentiles  # noqa: E402
from breathcast.stream.faults import Fuzzer, GateWatcher, run_fuzz  # noqa: E402
from breathcast.stream.recording import read_session_log  # noqa: E402
from breathcast.stream.replay import simulated_trace  # noqa: E402

BAR_MS = 40.0
RATE_HZ = 25.0
SPAN_S = 2.3  # the model's window (one helical scan)
WIDE = {"kind": "amplitude", "amplitude_range": [-10.0, 10.0]}


def _endpoints() -> dict[str, str]:
    import socket

    out = {}
    for name in ("input", "publish", "field", "control"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            out[name] = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    return out


def _config(log: Path, **extra) -> dict:
    return {"path": "distilled", "mode": "snapshot", "threads": 2, "session_log": str(log), "status_interval_s": 0.5,
            "gating": WIDE, "endpoints": _endpoints(), **extra}  # fmt: skip


def _start(config: dict) -> subprocess.Popen:
    """``breathcast serve`` (the library's serve()) on ``config`` in its own process; returns once it runs."""
    code = "import json, sys; from breathcast.stream.config import config_from_dict; from breathcast.stream.daemon import serve; " \
           "sys.exit(serve(config_from_dict(json.loads(sys.argv[1]))))"  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(config)])
    with ControlClient(config["endpoints"]["control"], timeout_s=10.0) as ctl:
        if wait_until_running(ctl, [process], timeout_s=600.0, poll_s=0.3):
            return process
    process.kill()
    raise SystemExit("daemon did not start")


class Source:
    """A live breathing source: one sample per 1/rate s of wall time, source clock = wall clock (+ any gap made)."""

    def __init__(self, tx: SampleSender, seed: int = 5) -> None:
        self.tx = tx
        self.trace = simulated_trace(seed=seed, duration_s=600.0, rate_hz=RATE_HZ)
        self.t0 = time.perf_counter()
        self.offset = 0.0
        self.seq = 0
        self.name = "belt"
        self.last_t = 0.0
        self.last_sent = 0.0
        self.last_amplitude = math.nan
        self.phase = 0.0  # the trace is read at source time - phase (a flat line shifts it: breathing resumes there)
        self.sent_at: dict[int, float] = {}
        self._next = time.perf_counter()

    def amplitude(self, t: float) -> float:
        tt = self.trace.time_s
        return float(np.interp(tt[0] + ((t - self.phase) % (tt[-1] - tt[0])), tt, self.trace.amplitude))

    def clock(self) -> float:
        return time.perf_counter() - self.t0 + self.offset

    def prefill(self, seconds: float = SPAN_S + 0.3) -> None:
        """A window's worth of past samples in one batch, ending now."""
        now = self.clock()
        ts = now - seconds + np.arange(int(seconds * RATE_HZ)) / RATE_HZ
        self.tx.send_batch([{"seq": self.seq + k, "t_source": float(t), "amplitude": self.amplitude(float(t)), "source": self.name}
                            for k, t in enumerate(ts)])  # fmt: skip
        self.seq += len(ts)
        self.last_t = float(ts[-1])
        self._next = time.perf_counter()

    def tick(self, advance: bool = True, **override) -> float:
        """Wait for the next slot and send one sample (fields in ``override`` replace the clean ones); its send time."""
        while (delay := self._next - time.perf_counter()) > 0:
            time.sleep(delay if delay > 0.001 else 0)
        self._next = max(self._next + 1.0 / RATE_HZ, time.perf_counter())
        t = self.clock()
        sample = {"seq": self.seq, "t_source": t, "amplitude": self.amplitude(t), "source": self.name}
        sample.update(override)
        self.last_sent = self.sent_at[sample["seq"]] = time.perf_counter()
        self.last_amplitude = sample["amplitude"]
        self.tx.send(**sample)
        if advance:
            self.seq, self.last_t = self.seq + 1, t
        return self.last_sent


class Bench:
    """Trials against one daemon: its source, gate watcher and control client."""

    def __init__(self, endpoints: dict[str, str], plausibility: PlausibilityConfig) -> None:
        self.ep = endpoints
        self.ctx = zmq.Context()
        self.tx = SampleSender(endpoints["input"], context=self.ctx)
        self.ctl = ControlClient(endpoints["control"], context=self.ctx, timeout_s=30.0)
        self.watcher = GateWatcher(endpoints["publish"], plausibility, self.ctx).__enter__()
        self.source = Source(self.tx)
        self.results: dict[str, dict] = {}

    def close(self) -> None:
        self.watcher.__exit__()
        self.tx.close()
        self.ctl.close()
        self.ctx.term()

    def _first(self, after: float, pred: Callable[[dict], bool]) -> float | None:
        for ts, h in self.watcher.since(after):
            if pred(h):
                return ts
        return None

    def healthy(self, timeout_s: float = 6.0) -> None:
        """Make sure the gate is BEAM_ON (reset, a window of past samples, live samples until BEAM_ON)."""
        last = self.watcher.messages[-1][1] if self.watcher.messages else None
        if last is not None and last["state"] == "BEAM_ON":
            return
        self.ctl.request("reset")
        self.source.prefill()
        start = time.perf_counter()
        while self._first(start, lambda h: h["state"] == "BEAM_ON") is None:
            if time.perf_counter() - start > timeout_s:
                raise SystemExit(f"no BEAM_ON after a healthy window: {self.watcher.messages[-1][1]}")
            self.source.tick()

    def wait(self, after: float, pred: Callable[[dict], bool], timeout_s: float, tick: bool = True) -> float | None:
        """Receipt time of the first gate after ``after`` for which ``pred`` holds (ticking clean samples meanwhile)."""
        end = time.perf_counter() + timeout_s
        while (found := self._first(after - 1e-4, pred)) is None and time.perf_counter() < end:
            if tick:
                self.source.tick()
            else:
                time.sleep(0.002)
        return found

    def store(self, reason: str, where: str, expected_s: float, detect: float, hold: float | None, fault_end: float = 0.0,
              on: float | None = None) -> None:  # fmt: skip
        """Keep one trial: HOLD ``hold - detect`` (None: missed), back to BEAM_ON ``on - fault_end``."""
        r = self.results.setdefault(reason, {"hold_ms": [], "recovery_s": [], "missed_hold": 0, "no_recovery": 0,
                                             "expected_recovery_s": expected_s, "where": where})  # fmt: skip
        if hold is None:
            r["missed_hold"] += 1
        else:
            r["hold_ms"].append((hold - detect) * 1e3)
        if on is None:
            r["no_recovery"] += 1
        else:
            r["recovery_s"].append(on - fault_end)

    def record(self, reason: str, detect: float, fault_end: float, expected_s: float, where: str, timeout_s: float = 8.0,
               keep_ticking: bool = True) -> None:  # fmt: skip
        """Wait for HOLD ``reason`` after ``detect``, then for BEAM_ON (ticking clean samples); store the trial."""
        hold = self.wait(detect, lambda h: h["state"] == "HOLD" and reason in h["reasons"], min(timeout_s, 2.0), keep_ticking)
        on = None if hold is None else self.wait(hold, lambda h: h["state"] == "BEAM_ON", timeout_s, keep_ticking)
        self.store(reason, where, expected_s, detect, hold, fault_end, on)

    # -- wire faults ---------------------------------------------------------------------------------------------

    def sample_fault(self, reason: str, **override) -> None:
        self.healthy()
        for _ in range(3):
            self.source.tick()
        advance = reason not in ("duplicate", "out_of_order")
        if reason == "duplicate":
            override = {"seq": self.source.seq - 1, "t_source": self.source.last_t}
        elif reason == "out_of_order":
            override = {"seq": self.source.seq - 5, "t_source": self.source.last_t}
        elif reason == "time_jump":
            override = {"t_source": self.source.clock() + 1e6}
        elif reason == "source_restart":
            self.source.name = "belt-2" if self.source.name == "belt" else "belt"
        elif reason == "gap":
            self.source.offset += 0.6
        sent = self.source.tick(advance=advance, **override)
        timed = reason in ("duplicate", "out_of_order", "time_jump")
        self.record(reason, sent, sent, 0.5 if timed else SPAN_S, "wire")

    def stale(self) -> None:
        self.healthy()
        for _ in range(3):
            self.source.tick()
        last = self.source.last_sent
        time.sleep(0.5)
        resume = self.source.tick()
        self.record("stale_input", last + 0.25, resume, SPAN_S, "wire")  # the resumed sample is a gap: 2.3 s

    def stuck(self, after_s: float = 2.0) -> None:
        self.healthy()
        t_start = self.source.clock()
        flat, detect = self.source.amplitude(t_start), None
        while detect is None:
            t = self.source.clock()
            sent = self.source.tick(amplitude=flat, t_source=t)
            if t - t_start >= after_s:
                detect = sent
        self.source.phase += self.source.clock() - t_start  # breathing resumes from the flat value, without a step
        self.record("stuck_sensor", detect, detect, SPAN_S, "wire")

    def outside(self) -> None:
        """The amplitude leaves a gating window just above it; BEAM_ON again from when the window is widened."""
        self.healthy()
        self.source.tick()
        a = self.source.last_amplitude
        self.ctl.request("set_gating", kind="amplitude", amplitude_range=[-10.0, a + 0.15])
        self.source._next = max(self.source._next, self.source.last_sent + 1.0 / RATE_HZ)  # a full 40 ms after it
        sent = self.source.tick(amplitude=a + 0.3)  # a plausible step (under 0.45 in 40 ms) out of the window
        hold = self.wait(sent, lambda h: h["state"] == "HOLD" and "outside_gating_window" in h["reasons"], 2.0, tick=False)
        widened = time.perf_counter()
        self.ctl.request("set_gating", **WIDE)
        on = self.wait(widened, lambda h: h["state"] == "BEAM_ON", 3.0)
        self.store("outside_gating_window", "wire", 0.0, sent, hold, widened, on)

    def restore(self) -> None:
        """The benchmark's gating, forecast and mode (a fuzz may have changed them)."""
        self.ctl.request("set_gating", **WIDE, hysteresis=0.0, hysteresis_mm=0.0)
        self.ctl.request("set_forecast", horizon_s=0.0)
        self.ctl.request("set_mode", mode="snapshot")
        self.ctl.wait_until_running(600.0)

    def no_input_and_window(self) -> None:
        self.healthy()
        sent = time.perf_counter()
        self.ctl.request("reset")
        self.record("no_input", sent, sent, math.nan, "wire", timeout_s=0.3, keep_ticking=False)
        first = self.source.tick()
        self.record("window_not_full", first, first, SPAN_S, "wire")

    def plan_loads(self) -> None:
        """A load that fails (no_plan), then a good one (loading); BEAM_ON once loaded and the window is full."""
        self.healthy()
        sent = time.perf_counter()
        self.ctl.request("load_plan", plan={"source": "nifti", "path": "/nonexistent/ct.nii.gz"})
        self.record("no_plan", sent, sent, math.nan, "wire", timeout_s=1.0)
        sent = time.perf_counter()
        self.ctl.request("load_plan", plan={})
        self.record("loading", sent, sent, math.nan, "wire", timeout_s=120.0)

    def shutdown(self) -> None:
        sent = time.perf_counter()
        self.ctl.request("shutdown")
        self.record("shutdown", sent, sent, math.nan, "wire", timeout_s=1.0, keep_ticking=False)


def _deep_breath(bench: Bench, peak: float) -> None:
    """A plausible deep breath to ``peak`` (7.5/s up and down, under every sample limit): implausible_target."""
    bench.healthy()
    src = bench.source
    start = time.perf_counter()
    a0 = src.amplitude(src.clock())
    for a in [*np.arange(a0, peak, 0.3), *[peak] * 5, *np.arange(peak, a0, -0.3)]:
        src.tick(amplitude=float(a))
    ramp_end = src.last_sent
    src.phase += ramp_end - start  # the trace resumes where it was
    found = [(ts, h) for ts, h in bench.watcher.since(start) if "implausible_target" in h["reasons"]]
    if not found:
        bench.store("implausible_target", "wire", SPAN_S, 0.0, None)
        return
    ts, header = found[0]
    on = bench.wait(ts, lambda h: h["state"] == "BEAM_ON", 8.0)
    bench.store("implausible_target", "wire", SPAN_S, src.sent_at[header["sample_seq"]], ts, ramp_end, on)


def wire_phase(args, folder: Path) -> tuple[dict, dict, float]:
    config = _config(folder / "wire.bclog", field={"dtype": "float32"})
    plaus = PlausibilityConfig()
    process = _start(config)
    bench = Bench(config["endpoints"], plaus)
    displacement = []
    try:
        print("wire faults ...", flush=True)
        for trial in range(args.trials):
            for reason in ("non_finite_sample", "invalid_sample", "implausible_sample", "time_jump", "gap", "out_of_order",
                           "duplicate", "source_restart"):  # fmt: skip
                override = {"non_finite_sample": {"amplitude": math.nan}, "invalid_sample": {"valid": False},
                            "implausible_sample": {"amplitude": 50.0}}.get(reason, {})  # fmt: skip
                bench.sample_fault(reason, **override)
            bench.stale()
            bench.stuck()
            bench.outside()
            bench.no_input_and_window()
            print(f"  trial {trial + 1}/{args.trials}", flush=True)
        displacement = [np.linalg.norm(np.asarray(h["target_displacement_mm"], float).reshape(-1, 3), axis=1).max()
                        for _, h in bench.watcher.messages if h["state"] == "BEAM_ON" and h.get("target_displacement_mm")]  # fmt: skip
        for _ in range(args.load_trials):
            bench.plan_loads()
        print("fuzz ...", flush=True)
        bench.healthy()
        report = run_fuzz(config["endpoints"], Fuzzer(seed=15, paths=("distilled",)), n_input=args.fuzz_messages, control_every=10)
        fuzz = report.summary()
        fuzz["gate_messages_checked"] = len(bench.watcher.messages)
        fuzz["gate_violations"] = len(bench.watcher.violations)
        fuzz["first_gate_violations"] = bench.watcher.violations[:10]
        fuzz["daemon_alive"] = process.poll() is None
        bench.restore()
        print("isolation ...", flush=True)
        isolation = isolation_phase(bench, config["endpoints"])
        bench.shutdown()
        process.wait(10)
        fuzz["exit_code_after_shutdown"] = process.returncode
    finally:
        bench.close()
        if process.poll() is None:
            process.kill()
    typical = float(np.percentile(displacement, 99)) if displacement else 10.0
    return bench.results | {}, {"fuzz": fuzz, "isolation": isolation}, typical


_STALLED = """
import sys, time, zmq
ctx = zmq.Context()
subs = []
for _ in range(int(sys.argv[2])):
    s = ctx.socket(zmq.SUB)
    s.rcvhwm, s.rcvbuf, s.linger = 1, 1024, 0
    s.setsockopt(zmq.SUBSCRIBE, b"field")
    s.connect(sys.argv[1])
    subs.append(s)
print("connected", flush=True)
time.sleep(600)
"""


def isolation_phase(bench: Bench, endpoints: dict[str, str], seconds: float = 10.0) -> dict:
    """gate latency (sample sent -> gate received) with and without 50 field subscribers that never read (another
    process, as anyone on the machine could run); the fields a reading subscriber still gets."""
    out = {}
    for label, stalled_n in (("alone", 0), ("50_stalled_field_subscribers", 50)):
        bench.healthy()
        stalled = None
        if stalled_n:
            stalled = subprocess.Popen([sys.executable, "-c", _STALLED, endpoints["field"], str(stalled_n)], stdout=subprocess.PIPE, text=True)
            stalled.stdout.readline()
        viewer = bench.ctx.socket(zmq.SUB)
        viewer.rcvhwm, viewer.linger = 2, 0
        viewer.setsockopt(zmq.SUBSCRIBE, b"field")
        viewer.connect(endpoints["field"])
        time.sleep(0.5)
        sends, fields = {}, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            seq = bench.source.seq
            sends[seq] = bench.source.tick()
            while viewer.poll(0):
                viewer.recv_multipart()
                fields += 1
        time.sleep(0.2)
        lat = [(ts - sends[h["sample_seq"]]) * 1e3 for ts, h in bench.watcher.since(start)
               if h.get("frame") is not None and h.get("sample_seq") in sends]  # fmt: skip
        viewer.close(0)
        if stalled is not None:
            stalled.kill()
            stalled.wait()
        out[label] = {"gate_ms": _percentiles(lat), "samples": len(sends), "fields_received_by_reader": fields}
    return out


def target_phase(args, folder: Path, typical_mm: float) -> dict:
    """A daemon whose target limit sits above normal breathing: a plausible deep breath holds implausible_target."""
    limit = max(1.0, 1.3 * typical_mm)
    config = _config(folder / "target.bclog", plausibility={"max_target_displacement_mm": limit}, field={"enabled": False})
    process = _start(config)
    bench = Bench(config["endpoints"], PlausibilityConfig(max_target_displacement_mm=limit))
    try:
        print(f"implausible_target (limit {limit:.1f} mm) ...", flush=True)
        for _ in range(args.trials):
            _deep_breath(bench, 3.5)
        bench.shutdown()
        process.wait(10)
    finally:
        bench.close()
        if process.poll() is None:
            process.kill()
    return bench.results | {"_limit_mm": limit}


def in_process_phase(args, folder: Path) -> dict:
    """model_error, non_finite_field, internal_error and plan_rejected: an engine made to fail, the daemon here."""
    from breathcast.engine import predictor as engine
    from breathcast.stream.daemon import Daemon

    config = config_from_dict(_config(folder / "inproc.bclog", field={"enabled": False}))
    daemon = Daemon(config).start()
    ep = {k: getattr(config.endpoints, k) for k in ("input", "publish", "field", "control")}
    bench = Bench(ep, config.plausibility)
    try:
        bench.ctl.wait_until_running(600.0)
        print("in-process faults ...", flush=True)
        for _ in range(args.trials):
            for reason, error in (("model_error", BreathcastError("runtime failed")),
                                  ("non_finite_field", BreathcastError("the model produced a non-finite displacement")),
                                  ("internal_error", RuntimeError("a bug"))):  # fmt: skip
                bench.healthy()
                bench.source.tick()
                target, name = (daemon, "_frame_header") if reason == "internal_error" else (daemon._targets, "evaluate")
                original = getattr(target, name)

                def broken(*a, _error=error, **k):
                    raise _error

                setattr(target, name, broken)
                sent = bench.source.tick()
                hold = bench.wait(sent, lambda h, rr=reason: h["state"] == "HOLD" and rr in h["reasons"], 1.0, tick=False)
                setattr(target, name, original)
                fixed = bench.source.tick()
                on = bench.wait(fixed, lambda h: h["state"] == "BEAM_ON", 3.0)
                bench.store(reason, "in-process", 0.0, sent, hold, fixed, on)
        for _ in range(args.load_trials):
            bench.healthy()
            original = engine.load_predictor
            refused: list[float] = []

            def refuse(*a, _refused=refused, **k):
                _refused.append(time.perf_counter())
                raise PlanRejected("the lungs are cut at the top of the CT")

            engine.load_predictor = refuse
            try:
                bench.ctl.request("load_plan", plan={})
                end = time.monotonic() + 60
                while not refused and time.monotonic() < end:
                    bench.source.tick()
                bench.record("plan_rejected", refused[0], refused[0], math.nan, "in-process", timeout_s=1.0)
            finally:
                engine.load_predictor = original
            bench.ctl.request("load_plan", plan={})
            bench.ctl.wait_until_running(600.0)
    finally:
        bench.close()
        daemon.stop()
        daemon.wait(10.0)
    return bench.results


def torn_tail_phase(args, folder: Path) -> dict:
    """SIGKILL, a torn tail (the file cut mid-record), restart on the same file, 125 samples: what reads back."""
    log = folder / "torn.bclog"
    config = _config(log, path="direct", field={"enabled": False})
    cycles, rng = [], np.random.default_rng(15)
    print("torn tail cycles ...", flush=True)
    process = _start(config)
    sent_before = 0
    for cycle in range(args.cycles + 1):
        with SampleSender(config["endpoints"]["input"]) as tx, ControlClient(config["endpoints"]["control"]) as ctl:
            source = Source(tx)
            source.seq = 10_000 * cycle
            for _ in range(125):
                source.tick()
            end = time.monotonic() + 10
            while ctl.status()["counters"].get("samples_accepted", 0) < 125 and time.monotonic() < end:
                time.sleep(0.05)
        contents = read_session_log(log)
        sessions = [i for i, r in enumerate(contents.records) if r["type"] == "session"]
        last = contents.records[sessions[-1]:]
        readable = sum(1 for r in last if r["type"] == "sample" and r["seq"] >= 10_000 * cycle)
        if cycle:
            cycles[-1].update({"new_samples_sent": 125, "new_samples_readable": readable, "sessions_readable": len(sessions),
                               "repaired_tail_bytes": last[0].get("repaired_tail_bytes", 0),
                               "samples_readable_in_all": len(contents.of_type("sample")), "samples_sent_in_all": sent_before + 125})  # fmt: skip
        sent_before += 125
        if cycle == args.cycles:
            break
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        size = log.stat().st_size
        cut = int(rng.integers(1, 40))  # power loss: the last, unsynced bytes never reached the disk
        with open(log, "r+b") as f:
            f.truncate(size - cut)
        cycles.append({"cycle": cycle + 1, "cut_bytes": cut})
        started = time.monotonic()
        process = _start(config)
        cycles[-1]["restart_s"] = time.monotonic() - started
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    sigterm_s = time.monotonic() - started
    return {"cycles": cycles, "sigterm_exit_s": sigterm_s, "sigterm_exit_code": process.returncode,
            "torn_files": len(list(folder.glob("torn.bclog.torn-*")))}  # fmt: skip


ORDER = ("shutdown", "plan_rejected", "no_plan", "loading", "no_input", "stale_input", "stuck_sensor", "non_finite_sample",
         "invalid_sample", "implausible_sample", "time_jump", "gap", "source_restart", "out_of_order", "duplicate",
         "window_not_full", "model_error", "non_finite_field", "implausible_target", "internal_error", "outside_gating_window")
"""The table's order: the daemon's REASON_PRIORITY."""


def _row(reason: str, r: dict) -> dict:
    hold, rec, expected = r["hold_ms"], r["recovery_s"], r["expected_recovery_s"]
    met = hold["n"] and hold["p99"] <= BAR_MS and not r["missed_hold"]
    return {"reason": f"`{reason}`", "injected": r["where"], "trials": hold["n"] + r["missed_hold"],
            "HOLD p50 (ms)": f"{hold['p50']:.1f}" if hold["n"] else "", "HOLD p99 (ms)": f"{hold['p99']:.1f}" if hold["n"] else "",
            "HOLD max (ms)": f"{hold['max']:.1f}" if hold["n"] else "", "bar p99 (ms)": f"<= {BAR_MS:.0f}",
            "": "met" if met else "**missed**",
            "BEAM_ON again p50 / max (s)": f"{rec['p50']:.3f} / {rec['max']:.3f}" if rec["n"] else "",
            "documented recovery (s)": "" if expected is None or math.isnan(expected) else f"{expected:.1f}"}  # fmt: skip


def render(payload: dict) -> str:
    """The README block from a results payload (``results/faults.json``)."""
    reasons, fuzz, iso, torn = payload["reasons"], payload["fuzz"], payload["isolation"], payload["torn_tail"]
    rows = [_row(r, reasons[r]) for r in ORDER if r in reasons]
    met = sum(1 for row in rows if row[""] == "met")
    cyc, stalled = torn["cycles"], iso["50_stalled_field_subscribers"]
    sessions = all(c["sessions_readable"] == c["cycle"] + 1 for c in cyc)
    lines = [
        f"- Time to HOLD: {met} of {len(rows)} reasons met the bar (p99 <= {BAR_MS:.0f} ms; {payload['trials']} trials, "
        f"{payload['rate_hz']:.0f} Hz live source).",
        f"- Fuzz: {fuzz['input_messages']} hostile input messages and {fuzz['control_requests']} control requests (seed 15): "
        f"{fuzz['control_replies']} replies, {fuzz['messages_counted']} messages counted,",
        f"  {fuzz['violations'] + fuzz['gate_violations']} invariant violations over {fuzz['gate_messages_checked']} gate "
        f"messages; control reply p99 {fuzz['reply_p99_ms']:.1f} ms; the daemon ran on: {fuzz['daemon_alive']}.",
        f"- Isolation: gate p99 {iso['alone']['gate_ms']['p99']:.1f} ms alone, {stalled['gate_ms']['p99']:.1f} ms with 50 "
        f"field subscribers that never read; a reading one got {stalled['fields_received_by_reader']} fields",
        f"  of {stalled['samples']} frames (alone: {iso['alone']['fields_received_by_reader']} of {iso['alone']['samples']}).",
        f"- Torn tail: {len(cyc)} cycles of SIGKILL, {min(c['cut_bytes'] for c in cyc)}-{max(c['cut_bytes'] for c in cyc)} "
        f"bytes cut off the log, restart: {sum(c['new_samples_readable'] for c in cyc)} of "
        f"{sum(c['new_samples_sent'] for c in cyc)} new samples readable,",
        f"  every session readable: {sessions}; restart {max(c['restart_s'] for c in cyc):.1f} s at most; SIGTERM exit "
        f"{torn['sigterm_exit_s']:.2f} s (bar 2 s), exit code {torn['sigterm_exit_code']}.",
        f"- `implausible_target`: limit {payload['implausible_target_limit_mm']:.1f} mm (1.3 x the p99 target displacement "
        "of normal breathing),",
        "  crossed by a deep breath to amplitude 3.5 that no sample limit refuses.",
    ]
    return markdown_table(rows, list(rows[0])) + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials per hold reason (default 20)")
    parser.add_argument("--load-trials", type=int, default=3, help="trials of the plan-load reasons (default 3)")
    parser.add_argument("--fuzz-messages", type=int, default=10_000, help="fuzzed input messages (default 10,000)")
    parser.add_argument("--cycles", type=int, default=3, help="SIGKILL + torn tail + restart cycles (default 3)")
    parser.add_argument("--no-readme", action="store_true", help="do not update the README table")
    parser.add_argument("--render", action="store_true", help="only rebuild the README block from results/faults.json")
    args = parser.parse_args()
    if args.render:
        table = render(json.loads((RESULTS / "faults.json").read_text()))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            reasons, extra, typical = wire_phase(args, folder)
            target = target_phase(args, folder, typical)
            limit = target.pop("_limit_mm")
            reasons |= target
            reasons |= in_process_phase(args, folder)
            torn = torn_tail_phase(args, folder)
        summary = {r: {"hold_ms": _percentiles(v["hold_ms"]), "recovery_s": _percentiles(v["recovery_s"]),
                       "missed_hold": v["missed_hold"], "no_recovery": v["no_recovery"],
                       "expected_recovery_s": v["expected_recovery_s"], "where": v["where"]} for r, v in reasons.items()}  # fmt: skip
        payload = {"bar_ms": BAR_MS, "rate_hz": RATE_HZ, "trials": args.trials, "reasons": summary, **extra,
                   "torn_tail": torn, "implausible_target_limit_mm": limit}  # fmt: skip
        table = render(payload)
        path = write_results("faults", {**payload, "table": table})
        print(f"wrote {path}")
    print(table)
    if not args.no_readme:
        try:
            update_readme_table("faults", table)
        except SystemExit as exc:
            print(f"README not updated: {exc}")


if __name__ == "__main__":
    main()
