"""End-to-end latency of the streaming daemon against the physical floor (issues 5 and 17).

The daemon runs in its own process (``breathcast.stream.daemon.serve``) on the simulated default patient and the
shipped engine package; this process sends breathing samples over loopback at a fixed rate, stamped with their send
time, and one subscriber thread per kind of consumer measures sample sent -> available to the consumer:

* ``target`` / ``gate``: the messages received;
* ``field``: the field's bytes received over TCP (11 MB for 128x128x112 float16);
* ``ring``: the same-host ring (docs/protocol.md 4.6), zero-copy: the announcement received and a view of the field
  in the ring file, its slot's seq checked; ``ring_copied``: the field then copied out and the seq checked again;
* ``state_field``: fields without bytes (4.5): the ``state`` message received and the 128x128x112 float16 field made
  from it in the client with the coefficients fetched once;

each beside the physical floor measured in the same run just before the case: a memcpy of the same bytes.

Cases (targets of issue 17):
* ``direct``: the network every frame, 64³ float32 field over TCP (field p99 <= 60 ms);
* ``distilled``: 128x128x112 float16 field over TCP (field p99 <= 10 ms);
* ``distilled_ipc``: the same field over ``ipc://`` (a Unix socket; reported);
* ``distilled_ring``: the same field by the ring alone, ``tcp = false`` (ring p99 <= 5 ms);
* ``distilled_rt``, ``distilled_ring_rt``: the same two with the daemon and the consumer SCHED_RR
  (``realtime_priority = 10``), the deployment for a host shared with other work;
* ``distilled_state``: the same field made client-side from ``state`` (no target; reported);
* ``distilled_target_only``: no field, ``target`` / ``gate`` alone (target p99 <= 5 ms);
* ``curve``: CurveZMQ on every socket, the field by TCP and by the ring (target p99 <= 10 ms, field p99 <= 40 ms or
  the ring's, 0 fields lost by a subscriber that keeps up);
* ``competing``: the distilled TCP + ring case with one CPU-bound process (``while True: pass``) on the machine
  (target p99 <= 10 ms); ``competing_nice``: the same with the daemon and this process (the consumer) at nice -5
  (needs CAP_SYS_NICE; the JSON's ``scheduling`` says whether it was granted); ``competing_rt``: both SCHED_RR
  (``realtime_priority = 10``);
* ``sustained_25hz`` and ``sustained_100hz``: distilled with the float16 field; zero lost samples in the session log,
  RSS growth, every dropped or merged frame counted (``--sustained-25hz-s 600 --sustained-100hz-s 60`` for the long run).

The JSON records ``os.getloadavg()`` at the start and end of every case: on 2 shared cores another job's load makes
every number here pessimistic.

    python benchmarks/bench_stream.py                   # the issue-17 cases, about 10 minutes on 2 cores
    python benchmarks/bench_stream.py --cases sustained_25hz sustained_100hz --sustained-25hz-s 600 --keep-other-cases
    python benchmarks/bench_stream.py --package PKG      # another package (e.g. an ldm): results/stream_<kind>.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the daemon does (stream/daemon.py): this process's clients too

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SERVE_CODE, markdown_table, update_readme_table, wait_until_running, write_results  # noqa: E402

from breathcast.stream.client import ControlClient, CurveKeys, SampleSender, Subscriber, make_keys  # noqa: E402
from breathcast.stream.recording import read_session_log  # noqa: E402
from breathcast.stream.replay import simulated_trace  # noqa: E402

BIG = (112, 128, 128)


@dataclass(frozen=True)
class Case:
    """One daemon configuration and what listens to it."""

    path: str
    field: str  # none | model32 | big16
    listeners: tuple[str, ...]  # of: field, ring, state
    tcp: bool = True
    ring: bool = False
    curve: bool = False
    competitor: bool = False
    threads: int = 2
    field_threads: int = 0
    nice: int = 0
    realtime_priority: int = 0
    field_ipc: bool = False  # the field socket on ipc:// (a Unix socket) instead of TCP loopback
    rate_hz: float | None = None  # None: --rate
    duration: str = "latency"  # which duration flag
    targets: dict = field(default_factory=dict)  # message -> p99 target, ms


CASES: dict[str, Case] = {
    "direct": Case("direct", "model32", ("field",), targets={"field": 60.0}),
    "distilled": Case("distilled", "big16", ("field",), targets={"field": 10.0}),
    "distilled_ipc": Case("distilled", "big16", ("field",), field_ipc=True),
    "distilled_ring": Case("distilled", "big16", ("ring",), tcp=False, ring=True, targets={"ring": 5.0}),
    "distilled_ring_rt": Case("distilled", "big16", ("ring",), tcp=False, ring=True, realtime_priority=10, targets={"ring": 5.0}),
    "distilled_rt": Case("distilled", "big16", ("field",), realtime_priority=10, targets={"field": 10.0}),
    "distilled_state": Case("distilled", "big16", ("state",), tcp=False, ring=True),
    "distilled_target_only": Case("distilled", "none", (), targets={"target": 5.0}),
    "curve": Case("distilled", "big16", ("field", "ring"), ring=True, curve=True, targets={"target": 10.0, "field": 40.0, "ring": 40.0}),
    "competing": Case("distilled", "big16", ("field", "ring"), ring=True, competitor=True, targets={"target": 10.0}),
    "competing_rt": Case("distilled", "big16", ("field", "ring"), ring=True, competitor=True, realtime_priority=10,
                         targets={"target": 10.0}),
    "competing_nice": Case("distilled", "big16", ("field", "ring"), ring=True, competitor=True, nice=-5, targets={"target": 10.0}),
    "sustained_25hz": Case("distilled", "big16", ("field",), rate_hz=25.0, duration="sustained_25hz"),
    "sustained_100hz": Case("distilled", "big16", ("field",), rate_hz=100.0, duration="sustained_100hz"),
}
DEFAULT_CASES = ["direct", "distilled", "distilled_rt", "distilled_ipc", "distilled_ring", "distilled_ring_rt", "distilled_state", "distilled_target_only", "curve", "competing",
                 "competing_nice", "competing_rt", "sustained_100hz"]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memcpy_floor(nbytes: int, repeats: int = 200) -> dict[str, float]:
    """p50 / p99 of copying ``nbytes`` between two kept buffers (the least any delivery of them can cost), ms."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append((time.perf_counter() - start) * 1e3)
    return {"nbytes": nbytes, "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def _start_daemon(folder: Path, case: Case, package: str, curve: dict | None) -> tuple[subprocess.Popen, dict[str, str], Path]:
    endpoints = {k: f"tcp://127.0.0.1:{_port()}" for k in ("input", "publish", "field", "control")}
    if case.field_ipc:
        endpoints["field"] = f"ipc://{folder}/field-{time.monotonic_ns()}.ipc"
    log = folder / f"{case.path}-{time.monotonic_ns()}.bclog"
    toml = folder / "serve.toml"
    field_table = {"none": "enabled = false",
                   "model32": 'dtype = "float32"',
                   "big16": 'dtype = "float16"\nshape = [112, 128, 128]'}[case.field]  # fmt: skip
    if case.field != "none":
        field_table += f"\ntcp = {str(case.tcp).lower()}\nring = {str(case.ring).lower()}\nthreads = {case.field_threads}"
    security = ""
    if curve:
        security = f'[security]\nserver_secret_key = "{curve["server_secret"]}"\nclient_keys_dir = "{curve["clients"]}"\n'
    toml.write_text(f'package = {json.dumps(package)}\npath = "{case.path}"\nmode = "snapshot"\nthreads = {case.threads}\nnice = {case.nice}\nrealtime_priority = {case.realtime_priority}\n'
                    f'session_log = "{log}"\nstatus_interval_s = 0.5\n'
                    f"[gating]\namplitude_range = [-0.2, 0.4]\n[field]\n{field_table}\n{security}[endpoints]\n"
                    + "".join(f'{k} = "{v}"\n' for k, v in endpoints.items()))  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", SERVE_CODE, str(toml)])
    keys = curve["keys"] if curve else None
    with ControlClient(endpoints["control"], timeout_s=10.0, curve=keys) as ctl:
        if not wait_until_running(ctl, [process]):
            process.kill()
            raise SystemExit(f"daemon ({case.path}) did not start")
    return process, endpoints, log


def _stop_daemon(process: subprocess.Popen, endpoints: dict[str, str], keys) -> None:
    try:
        with ControlClient(endpoints["control"], timeout_s=5.0, curve=keys) as ctl:
            ctl.request("shutdown")
        process.wait(20)
    except Exception:
        process.kill()
        process.wait(5)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "n": 0}
    a = np.asarray(values)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "n": int(a.size)}


def run_case(folder: Path, name: str, case: Case, rate_hz: float, duration_s: float, warmup_s: float = 3.0, package: str = "") -> dict:
    """Start a daemon, stream ``duration_s`` of breathing at ``rate_hz``, measure every listener, stop it, check its log."""
    nbytes = {"none": 0, "model32": 3 * 64**3 * 4, "big16": 3 * int(np.prod(BIG)) * 2}[case.field]
    floor = _memcpy_floor(nbytes) if nbytes else None
    load_start = os.getloadavg()
    curve = None
    if case.curve:
        server_public, server_secret = make_keys(folder / f"server-{name}", "server")
        _, client_secret = make_keys(folder / f"clients-{name}", "bench")
        curve = {"server_secret": server_secret, "clients": folder / f"clients-{name}", "keys": CurveKeys(server_public, client_secret)}
    keys = curve["keys"] if curve else None
    process, endpoints, log = _start_daemon(folder, case, package, curve)
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if case.competitor else None
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    if case.nice:  # the consumer too (this thread; the listener threads made below inherit it)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, case.nice)
        except OSError as exc:
            print(f"  consumer nice {case.nice} refused: {exc.strerror}", flush=True)
    if case.realtime_priority:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(case.realtime_priority))
        except OSError as exc:
            print(f"  consumer SCHED_RR refused: {exc.strerror}", flush=True)
    received: dict[str, list[tuple[float, dict]]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def record(topic: str, now: float, header: dict) -> None:
        with lock:
            received.setdefault(topic, []).append((now, header))

    def listen(endpoint: str, topics: tuple[str, ...], kind: str) -> None:
        try:
            model = None
            out = np.empty((3, *BIG), np.float16)
            if kind == "state":
                import numba

                numba.set_num_threads(1)  # this thread's kernels: the daemon keeps the other core
                with ControlClient(endpoints["control"], curve=keys, timeout_s=20.0) as ctl:
                    model = ctl.field_model()
                model.field(np.zeros(model.grid.shape[0]), np.zeros(model.grid.shape[0]), BIG, np.float16, out=out)  # compile
            with Subscriber(endpoint, topics=topics, rcvhwm=100000 if kind == "publish" else 2, curve=keys,
                            ring_copy=False) as rx:  # fmt: skip
                while not stop.is_set():
                    m = rx.recv(0.1)
                    if m is None:
                        continue
                    if m.topic == "state":  # the newest state only: a client that makes fields drains first
                        newer = rx.recv(0.0)
                        while newer is not None:
                            record("state_skipped", time.time(), m.header)
                            m, newer = newer, rx.recv(0.0)
                        record("state", time.time(), m.header)
                        model.field(m.header["slice_amplitude"], m.header["slice_rate"], BIG, np.float16, out=out)
                        record("state_field", time.time(), m.header)
                    elif m.topic == "ring":
                        if m.array is None:
                            record("ring_torn", time.time(), m.header)
                            continue
                        record("ring", time.time(), m.header)  # a view, its seq checked: zero-copy
                        np.copyto(out, m.array)
                        if rx._ring.seq(m.header["ring"]["slot"]) == m.header["ring"]["seq"]:
                            record("ring_copied", time.time(), m.header)
                        else:
                            record("ring_torn", time.time(), m.header)
                    else:
                        record(m.topic, time.time(), m.header)
        except Exception as exc:  # reported, never hidden
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    listeners = [threading.Thread(target=listen, args=(endpoints["publish"], ("target", "gate"), "publish"), daemon=True)]
    for kind in case.listeners:
        endpoint, topics = {"field": (endpoints["field"], ("field",)), "ring": (endpoints["field"], ("ring",)),
                            "state": (endpoints["publish"], ("state",))}[kind]  # fmt: skip
        listeners.append(threading.Thread(target=listen, args=(endpoint, topics, kind), daemon=True))
    for t in listeners:
        t.start()
    time.sleep(1.0)
    trace = simulated_trace(seed=5, duration_s=warmup_s + duration_s, rate_hz=rate_hz)
    n_warm = int(warmup_s * rate_hz)
    with SampleSender(endpoints["input"], curve=keys) as tx, ControlClient(endpoints["control"], curve=keys) as ctl:
        time.sleep(0.2)
        start = time.perf_counter()
        status_start = None
        for k in range(len(trace)):
            due = start + k / rate_hz
            while (delay := due - time.perf_counter()) > 0:
                time.sleep(delay if delay > 0.002 else 0)
            tx.send(k, float(trace.time_s[k]), float(trace.amplitude[k]))
            if k == n_warm:
                status_start = ctl.status()
        time.sleep(1.0)
        status_end = ctl.status()
    stop.set()
    for t in listeners:
        t.join(2)
    consumer_nice = os.getpriority(os.PRIO_PROCESS, 0)
    if case.realtime_priority:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    if case.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, own_nice)
        except OSError:
            pass
    if competitor is not None:
        competitor.kill()
        competitor.wait(5)
    _stop_daemon(process, endpoints, keys)
    load_end = os.getloadavg()
    measured = {topic: [(now, h) for now, h in msgs if h.get("t_sent") is not None and (h.get("sample_seq") or -1) >= n_warm]
                for topic, msgs in received.items()}  # fmt: skip
    latency = {topic: _stats([(now - h["t_sent"]) * 1e3 for now, h in msgs]) for topic, msgs in measured.items()
               if topic not in ("ring_torn", "state_skipped")}  # fmt: skip
    missed_at_subscriber = {}
    for topic, msgs in measured.items():
        seqs = [h["msg_seq"] for _, h in msgs]
        if seqs and topic in ("target", "gate", "field", "ring"):
            missed_at_subscriber[topic] = int(max(seqs) - min(seqs) + 1 - len(set(seqs)))
    contents = read_session_log(log)
    logged = [r["seq"] for r in contents.of_type("sample")]
    missing = sorted(set(range(len(trace))) - set(logged))
    c = status_end["counters"]
    rss0, rss1 = status_start["rss_bytes"], status_end["rss_bytes"]
    return {
        "case": name, "path": case.path, "field": case.field, "listeners": list(case.listeners), "tcp": case.tcp, "ring": case.ring,
        "curve": case.curve, "competitor": case.competitor, "threads": case.threads, "field_threads": case.field_threads, "nice": case.nice,
        "rate_hz": rate_hz, "duration_s": duration_s, "samples_sent": len(trace),
        "latency": latency, "targets_p99_ms": case.targets,
        "floor_memcpy": floor, "loadavg_start": list(load_start), "loadavg_end": list(load_end),
        "daemon_latency_ms": status_end["latency_ms"],
        "samples_logged": len(logged), "samples_missing_from_log": len(missing), "log_truncated_bytes": contents.truncated_bytes,
        "rss_start_mb": rss0 / 2**20, "rss_end_mb": rss1 / 2**20, "rss_growth_percent": 100.0 * (rss1 - rss0) / rss0,
        "counters": {k: c.get(k, 0) for k in ("samples_accepted", "samples_rejected", "malformed_messages", "frames_computed",
                                              "frames_merged", "fields_published", "fields_ring", "fields_merged", "fields_unpooled",
                                              "fields_dropped_slow_subscriber", "model_errors", "internal_errors",
                                              "gate.BEAM_ON", "gate.HOLD", "publish_dropped.target", "publish_dropped.gate")},
        "missed_at_subscriber": missed_at_subscriber,
        "ring_torn_at_subscriber": len(measured.get("ring_torn", [])),
        "states_skipped_at_subscriber": len(measured.get("state_skipped", [])),
        "listener_errors": errors,
        "distillation_error_mm": status_end["predictor"]["distillation_error_mm"],
        "coefficients": status_end["field"].get("coefficients"),
        "scheduling": status_end.get("scheduling"), "consumer_nice": consumer_nice,
    }  # fmt: skip


_MESSAGES = ("target", "field", "ring", "ring_copied", "state", "state_field")


def _rows(results: dict) -> list[dict]:
    rows = []
    for name, r in results.items():
        floor = r.get("floor_memcpy")
        for t in _MESSAGES:
            v = r["latency"].get(t, {})
            if not v.get("n"):
                continue
            target = r.get("targets_p99_ms", {}).get(t)
            met = "" if target is None else ("met" if v["p99_ms"] <= target else "**missed**")
            carries_field = t in ("field", "ring", "ring_copied", "state_field")
            # the daemon's own sample receipt -> publish (status.latency_ms); its field_ms is the ring's when the ring is on
            daemon = r["daemon_latency_ms"].get("target_ms" if t == "target" else "field_ms", {}) \
                if t == "target" or (t == "ring") or (t == "field" and not r.get("ring")) else {}  # fmt: skip
            rows.append({"case": name, "message": t, "rate (Hz)": f"{r['rate_hz']:.0f}", "s": f"{r['duration_s']:.0f}",
                         "p50 (ms)": f"{v['p50_ms']:.1f}", "p99 (ms)": f"{v['p99_ms']:.1f}", "max (ms)": f"{v['max_ms']:.1f}",
                         "daemon p99 (ms)": f"{daemon['p99']:.1f}" if daemon.get("p99") is not None else "",
                         "target p99 (ms)": "" if target is None else f"<= {target:.0f}", "": met,
                         "memcpy floor p50 / p99 (ms)": f"{floor['p50_ms']:.2f} / {floor['p99_ms']:.2f}" if floor and carries_field else "",
                         "lost at subscriber": r["missed_at_subscriber"].get(t, ""),
                         "frames merged": r["counters"]["frames_merged"],
                         "samples lost in log": r["samples_missing_from_log"],
                         "load avg (1 min)": f"{r['loadavg_start'][0]:.1f}-{r['loadavg_end'][0]:.1f}"})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-s", type=float, default=20.0, help="seconds measured per latency case (default 20)")
    parser.add_argument("--rate", type=float, default=25.0, help="sample rate of the latency cases, Hz (default 25)")
    parser.add_argument("--sustained-25hz-s", type=float, default=30.0, help="sustained 25 Hz run, s (issue 5: 600)")
    parser.add_argument("--sustained-100hz-s", type=float, default=15.0, help="sustained 100 Hz run, s (issue 5: 60)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=sorted(CASES))
    parser.add_argument("--package", type=Path, default=None, help="engine package the daemon serves (default: the shipped one)")
    parser.add_argument("--name", default=None,
                        help="results name: results/<name>.json and README block <name> with _ as - (default: stream for the "
                        "shipped package, stream_<kind> for another)")  # fmt: skip
    parser.add_argument("--no-readme", action="store_true", help="do not update the README table")
    parser.add_argument("--keep-other-cases", action="store_true",
                        help="keep the cases not run now from the previous results/<name>.json (e.g. the 10-minute run)")
    args = parser.parse_args()
    from breathcast.engine.package import DEFAULT_PACKAGE, read_package

    package = read_package(args.package or DEFAULT_PACKAGE)  # refuse a bad package before starting daemons
    default_package = package.path.resolve() == DEFAULT_PACKAGE.resolve()
    name = args.name or ("stream" if default_package else f"stream_{package.manifest.kind}")
    results_file = RESULTS / f"{name}.json"
    package_setting = "" if default_package else str(package.path.resolve())
    durations = {"latency": args.latency_s, "sustained_25hz": args.sustained_25hz_s, "sustained_100hz": args.sustained_100hz_s}
    results = {}
    previous = results_file.is_file() and json.loads(results_file.read_text()).get("cases", {})
    if args.keep_other_cases and previous:
        results = {case: r for case, r in previous.items() if case not in args.cases and case in CASES}
    run_load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for case_name in args.cases:
            case = CASES[case_name]
            print(f"{case_name} ...", flush=True)
            r = results[case_name] = run_case(Path(tmp), case_name, case, case.rate_hz or args.rate, durations[case.duration],
                                              package=package_setting)  # fmt: skip
            lat = ", ".join(f"{t} p50 {v['p50_ms']:.1f} / p99 {v['p99_ms']:.1f} / max {v['max_ms']:.1f} ms"
                            for t, v in r["latency"].items() if v["n"])  # fmt: skip
            print(f"  {lat}; floor {r['floor_memcpy']}; lost {r['missed_at_subscriber']}; torn {r['ring_torn_at_subscriber']}; "
                  f"log missing {r['samples_missing_from_log']}; load {r['loadavg_start'][0]:.2f}-{r['loadavg_end'][0]:.2f}; "
                  f"errors {r['listener_errors']}", flush=True)  # fmt: skip
    results = {case: results[case] for case in CASES if case in results}  # table in the usual order
    rows = _rows(results)
    table = markdown_table(rows, list(rows[0])) if rows else ""
    path = write_results(name, {"package": str(package.path), "kind": package.manifest.kind, "model_id": package.model_id,
                                "loadavg_start": list(run_load_start), "loadavg_end": list(os.getloadavg()),
                                "cases": results, "table": table})  # fmt: skip
    print(table)
    print(f"wrote {path}")
    if not args.no_readme and table:
        try:
            update_readme_table(name.replace("_", "-"), table)
        except SystemExit as exc:
            print(f"README not updated: {exc}")


if __name__ == "__main__":
    main()
