"""End-to-end latency and sustained-rate behaviour of the streaming daemon (issue 5).

The daemon runs in its own process (``breathcast.stream.daemon.serve``) on the simulated default patient and the
shipped engine package; this process sends breathing samples over loopback at a fixed rate, stamped with their
send time, and a subscriber thread measures sample sent -> message received for ``target``, ``gate`` and ``field``.

Cases:
* ``direct``: the network every frame, 64³ float32 field (target: p99 <= 60 ms);
* ``distilled``: 128x128x112 float16 field (target: p99 <= 15 ms);
* ``distilled_target_only``: no field, ``target``/``gate`` alone (target: p99 <= 5 ms);
* ``sustained_25hz`` and ``sustained_100hz``: distilled with the float16 field; zero lost samples in the session log,
  RSS growth, every dropped or merged frame counted. The issue asks 10 minutes at 25 Hz and 1 minute at 100 Hz:
  ``--sustained-25hz-s 600 --sustained-100hz-s 60`` (the defaults are short).

    python benchmarks/bench_stream.py                   # short run, a few minutes on 2 cores
    python benchmarks/bench_stream.py --latency-s 60 --sustained-25hz-s 600 --sustained-100hz-s 60
    python benchmarks/bench_stream.py --package PKG      # another package (e.g. an ldm): results/stream_<kind>.json

With ``--package`` other than the shipped one the results go to ``stream_<kind>.json`` (``--name``) and the README
block ``stream-<kind>``; the shipped package's table is left alone.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, update_readme_table, write_results  # noqa: E402

from breathcast.stream.client import ControlClient, SampleSender, Subscriber  # noqa: E402
from breathcast.stream.recording import read_session_log  # noqa: E402
from breathcast.stream.replay import simulated_trace  # noqa: E402

TARGETS_MS = {"direct": ("field", 60.0), "distilled": ("field", 15.0), "distilled_target_only": ("target", 5.0)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_daemon(folder: Path, path: str, field: str, package: str = "") -> tuple[subprocess.Popen, dict[str, str], Path]:
    endpoints = {k: f"tcp://127.0.0.1:{_port()}" for k in ("input", "publish", "field", "control")}
    log = folder / f"{path}-{time.monotonic_ns()}.bclog"
    toml = folder / "serve.toml"
    field_table = {"none": "enabled = false",
                   "model32": 'dtype = "float32"',
                   "128f16": 'dtype = "float16"\nshape = [112, 128, 128]'}[field]  # fmt: skip
    toml.write_text(f'package = {json.dumps(package)}\npath = "{path}"\nmode = "snapshot"\nthreads = 2\nsession_log = "{log}"\nstatus_interval_s = 0.5\n'
                    f"[gating]\namplitude_range = [-0.2, 0.4]\n[field]\n{field_table}\n[endpoints]\n"
                    + "".join(f'{k} = "{v}"\n' for k, v in endpoints.items()))  # fmt: skip
    code = "import sys; from breathcast.stream.config import load_config; from breathcast.stream.daemon import serve; serve(load_config(sys.argv[1]))"
    process = subprocess.Popen([sys.executable, "-c", code, str(toml)])
    with ControlClient(endpoints["control"], timeout_s=10.0) as ctl:
        end = time.monotonic() + 300
        while True:
            try:
                status = ctl.status()
                if status["state"] == "running":
                    break
            except Exception:
                pass
            if time.monotonic() > end or process.poll() is not None:
                process.kill()
                raise SystemExit(f"daemon ({path}) did not start")
            time.sleep(0.5)
    return process, endpoints, log


def _stop_daemon(process: subprocess.Popen, endpoints: dict[str, str]) -> None:
    try:
        with ControlClient(endpoints["control"], timeout_s=5.0) as ctl:
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


def run_case(folder: Path, path: str, field: str, rate_hz: float, duration_s: float, warmup_s: float = 3.0, package: str = "") -> dict:
    """Start a daemon, stream ``duration_s`` of breathing at ``rate_hz``, measure, stop it, check its session log."""
    process, endpoints, log = _start_daemon(folder, path, field, package)
    received: dict[str, list[tuple[float, dict]]] = {"target": [], "gate": [], "field": []}
    stop = threading.Event()

    def listen() -> None:
        topics = ("target", "gate", "field") if field != "none" else ("target", "gate")
        with Subscriber([endpoints["publish"], endpoints["field"]], topics=topics, rcvhwm=100000) as rx:
            while not stop.is_set():
                m = rx.recv(0.1)
                if m is not None:
                    received[m.topic].append((time.time(), m.header))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.5)
    trace = simulated_trace(seed=5, duration_s=warmup_s + duration_s, rate_hz=rate_hz)
    n_warm = int(warmup_s * rate_hz)
    with SampleSender(endpoints["input"]) as tx, ControlClient(endpoints["control"]) as ctl:
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
    listener.join(2)
    _stop_daemon(process, endpoints)
    first_measured = n_warm
    latency = {topic: _stats([(now - h["t_sent"]) * 1e3 for now, h in msgs
                              if h.get("t_sent") is not None and h.get("sample_seq") is not None and h["sample_seq"] >= first_measured])
               for topic, msgs in received.items()}  # fmt: skip
    contents = read_session_log(log)
    logged = [r["seq"] for r in contents.of_type("sample")]
    missing = sorted(set(range(len(trace))) - set(logged))
    missed_at_subscriber = {topic: int(max((h["msg_seq"] for _, h in msgs), default=0) - min((h["msg_seq"] for _, h in msgs), default=1) + 1 - len(msgs))
                            for topic, msgs in received.items() if msgs}  # fmt: skip
    c = status_end["counters"]
    rss0, rss1 = status_start["rss_bytes"], status_end["rss_bytes"]
    return {
        "path": path, "field": field, "rate_hz": rate_hz, "duration_s": duration_s, "samples_sent": len(trace),
        "latency": latency,
        "daemon_latency_ms": status_end["latency_ms"],
        "samples_logged": len(logged), "samples_missing_from_log": len(missing),
        "log_truncated_bytes": contents.truncated_bytes,
        "rss_start_mb": rss0 / 2**20, "rss_end_mb": rss1 / 2**20, "rss_growth_percent": 100.0 * (rss1 - rss0) / rss0,
        "counters": {k: c.get(k, 0) for k in ("samples_accepted", "samples_rejected", "malformed_messages", "frames_computed",
                                              "frames_merged", "fields_published", "fields_merged", "fields_dropped_slow_subscriber",
                                              "fields_dropped_buffers_busy", "model_errors", "internal_errors",
                                              "gate.BEAM_ON", "gate.HOLD", "publish_dropped.target", "publish_dropped.gate")},
        "missed_at_subscriber": missed_at_subscriber,
        "distillation_error_mm": status_end["predictor"]["distillation_error_mm"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-s", type=float, default=20.0, help="seconds measured per latency case (default 20)")
    parser.add_argument("--rate", type=float, default=25.0, help="sample rate of the latency cases, Hz (default 25)")
    parser.add_argument("--sustained-25hz-s", type=float, default=30.0, help="sustained 25 Hz run, s (issue: 600)")
    parser.add_argument("--sustained-100hz-s", type=float, default=15.0, help="sustained 100 Hz run, s (issue: 60)")
    parser.add_argument("--cases", nargs="+", default=["direct", "distilled", "distilled_target_only", "sustained_25hz", "sustained_100hz"])
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
    specs = {
        "direct": ("direct", "model32", args.rate, args.latency_s),
        "distilled": ("distilled", "128f16", args.rate, args.latency_s),
        "distilled_target_only": ("distilled", "none", args.rate, args.latency_s),
        "sustained_25hz": ("distilled", "128f16", 25.0, args.sustained_25hz_s),
        "sustained_100hz": ("distilled", "128f16", 100.0, args.sustained_100hz_s),
    }
    results = {}
    previous = results_file.is_file() and json.loads(results_file.read_text()).get("cases", {})
    if args.keep_other_cases and previous:
        results = {case: r for case, r in previous.items() if case not in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            print(f"{case} ...", flush=True)
            results[case] = run_case(Path(tmp), *specs[case], package=package_setting)
            r = results[case]
            lat = ", ".join(f"{t} p50 {v['p50_ms']:.1f} / p99 {v['p99_ms']:.1f} / max {v['max_ms']:.1f} ms"
                            for t, v in r["latency"].items() if v["n"])  # fmt: skip
            print(f"  {lat}; log missing {r['samples_missing_from_log']}; RSS {r['rss_growth_percent']:+.1f}%; "
                  f"merged {r['counters']['frames_merged']}, fields dropped {r['counters']['fields_dropped_slow_subscriber']}"
                  f" + {r['counters']['fields_dropped_buffers_busy']}", flush=True)  # fmt: skip
    results = {case: results[case] for case in specs if case in results}  # table in the usual order
    rows = []
    for case, r in results.items():
        topic, target = TARGETS_MS.get(case, ("target", None))
        for t in ("target", "field"):
            v = r["latency"].get(t, {})
            if not v.get("n"):
                continue
            met = "" if target is None or t != topic else ("met" if v["p99_ms"] <= target else "**missed**")
            rows.append({"case": case, "message": t, "rate (Hz)": f"{r['rate_hz']:.0f}", "s": f"{r['duration_s']:.0f}",
                         "p50 (ms)": f"{v['p50_ms']:.1f}", "p99 (ms)": f"{v['p99_ms']:.1f}", "max (ms)": f"{v['max_ms']:.1f}",
                         "target p99 (ms)": "" if target is None or t != topic else f"<= {target:.0f}", "": met,
                         "samples lost in log": r["samples_missing_from_log"], "RSS growth": f"{r['rss_growth_percent']:+.1f}%",
                         "frames merged": r["counters"]["frames_merged"],
                         "fields dropped": r["counters"]["fields_dropped_slow_subscriber"] + r["counters"]["fields_dropped_buffers_busy"]})  # fmt: skip
    table = markdown_table(rows, list(rows[0])) if rows else ""
    path = write_results(name, {"package": str(package.path), "kind": package.manifest.kind, "model_id": package.model_id,
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
