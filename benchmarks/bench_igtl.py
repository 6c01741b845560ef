"""Latency through the OpenIGTLink bridge (issue 18): breathing sample sent -> ``Target`` TRANSFORM received.

Three processes on loopback, as in use: the daemon (``breathcast.stream.daemon.serve``, the shipped package, the
simulated default patient, distilled path, 64³ float32 field), the bridge (``breathcast igtl --config`` the daemon's
TOML: the same plan, so it sends the PlanningCT), and this one, which sends breathing samples at a fixed rate stamped
with their send time, reads the OpenIGTLink stream with a plain socket (pyigtl's message classes decode it, the time
is taken when a message's last byte is in) and, beside it, subscribes to the daemon's ``target`` topic directly, so
the bridge's own share is the difference.

    python benchmarks/bench_igtl.py                  # 30 s at 25 Hz, about a minute
    python benchmarks/bench_igtl.py --duration-s 120 --rate 25
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SERVE_CODE, markdown_table, update_readme_table, wait_until_running, write_results  # noqa: E402

from breathcast.stream.client import ControlClient, SampleSender, Subscriber  # noqa: E402
from breathcast.stream.replay import simulated_trace  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder: Path, field_rate_hz: float) -> tuple[list[subprocess.Popen], dict[str, str], int]:
    """The daemon and the bridge, each in its own process; returns them, the daemon's endpoints and the IGTL port."""
    endpoints = {k: f"tcp://127.0.0.1:{_port()}" for k in ("input", "publish", "field", "control")}
    toml = folder / "serve.toml"
    toml.write_text('path = "distilled"\nmode = "snapshot"\nthreads = 2\nstatus_interval_s = 0.5\n'
                    '[gating]\namplitude_range = [-0.2, 0.4]\n[field]\ndtype = "float32"\n[endpoints]\n'
                    + "".join(f'{k} = "{v}"\n' for k, v in endpoints.items()))  # fmt: skip
    daemon = subprocess.Popen([sys.executable, "-c", SERVE_CODE, str(toml)])
    port = _port()
    bridge = subprocess.Popen([sys.executable, "-m", "breathcast.cli", "igtl", "--config", str(toml), "--port", str(port),
                               "--field-rate", str(field_rate_hz)], stdout=subprocess.DEVNULL)  # fmt: skip
    processes = [daemon, bridge]
    with ControlClient(endpoints["control"], timeout_s=10.0) as ctl:
        if not wait_until_running(ctl, processes):
            _stop(processes, endpoints)
            raise SystemExit("the daemon or the bridge did not start")
    return processes, endpoints, port


def _stop(processes: list[subprocess.Popen], endpoints: dict[str, str]) -> None:
    daemon, bridge = processes
    bridge.terminate()
    try:
        with ControlClient(endpoints["control"], timeout_s=5.0) as ctl:
            ctl.request("shutdown")
    except Exception:
        pass
    for p in processes:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the bridge closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_igtl(port: int, received: list, stop: threading.Event, connected: threading.Event) -> None:
    """Read OpenIGTLink messages until ``stop``; append (receive time (Unix s), connect time, message) for each."""
    import pyigtl

    end = time.monotonic() + 60
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=1.0)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
    t_connect = time.time()
    connected.set()
    sock.settimeout(None)
    header_size = pyigtl.MessageBase.IGTL_HEADER_SIZE
    with sock:
        try:
            while not stop.is_set():
                fields = pyigtl.MessageBase.parse_header(_recv_exact(sock, header_size))
                body = _recv_exact(sock, fields["body_size"])
                now = time.time()
                message = pyigtl.MessageBase.create_message(fields["message_type"])
                if message is not None:
                    message.unpack(fields, body)
                    received.append((now, t_connect, message))
        except (ConnectionError, OSError):  # the bridge stopped
            return


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "n": 0}
    a = np.asarray(values)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "n": int(a.size)}


def run(rate_hz: float, duration_s: float, field_rate_hz: float, warmup_s: float = 3.0) -> dict:
    """Start daemon and bridge, stream ``duration_s`` of breathing at ``rate_hz``, measure, stop both."""
    with tempfile.TemporaryDirectory() as tmp:
        processes, endpoints, port = _start(Path(tmp), field_rate_hz)
        try:
            received: list = []
            direct: list = []
            stop, connected = threading.Event(), threading.Event()
            reader = threading.Thread(target=_read_igtl, args=(port, received, stop, connected), daemon=True)
            reader.start()

            def listen() -> None:
                with Subscriber(endpoints["publish"], topics=("target",)) as rx:
                    while not stop.is_set():
                        m = rx.recv(0.1)
                        if m is not None:
                            direct.append((time.time(), m.header))

            listener = threading.Thread(target=listen, daemon=True)
            listener.start()
            connected.wait(60)
            time.sleep(1.0)
            trace = simulated_trace(seed=5, duration_s=warmup_s + duration_s, rate_hz=rate_hz)
            n_warm = int(warmup_s * rate_hz)
            with SampleSender(endpoints["input"]) as tx:
                time.sleep(0.2)
                start = time.perf_counter()
                for k in range(len(trace)):
                    due = start + k / rate_hz
                    while (delay := due - time.perf_counter()) > 0:
                        time.sleep(delay if delay > 0.002 else 0)
                    tx.send(k, float(trace.time_s[k]), float(trace.amplitude[k]))
                time.sleep(1.0)
            stop.set()
            reader.join(3)
            listener.join(3)
        finally:
            _stop(processes, endpoints)

    def measured(metadata) -> bool:
        return metadata.get("t_sent") not in (None, "") and int(metadata.get("sample_seq", -1)) >= n_warm

    transforms = [(now, m) for now, _, m in received if m.device_name == "Target" and measured(m.metadata)]
    fields = [(now, m) for now, _, m in received if m.device_name == "MotionField" and measured(m.metadata)]
    cts = [(now, t_connect, m) for now, t_connect, m in received if m.device_name == "PlanningCT"]
    frames = {h["frame"] for _, h in direct if h.get("sample_seq") is not None and h["sample_seq"] >= n_warm}
    return {
        "rate_hz": rate_hz, "duration_s": duration_s, "field_rate_hz": field_rate_hz, "samples_sent": len(trace),
        "latency": {
            "target_zmq": _stats([(now - h["t_sent"]) * 1e3 for now, h in direct
                                  if h.get("t_sent") is not None and h["sample_seq"] >= n_warm]),
            "target_transform": _stats([(now - float(m.metadata["t_sent"])) * 1e3 for now, m in transforms]),
            "motion_field_image": _stats([(now - float(m.metadata["t_sent"])) * 1e3 for now, m in fields]),
        },
        "daemon_frames": len(frames),
        "transforms_received": len(transforms),
        "transform_frames_missing": len(frames - {int(m.metadata["frame"]) for _, m in transforms}),
        "motion_fields_received": len(fields),
        "planning_ct": {"received": len(cts), "shape": list(cts[0][2].image.shape) if cts else None,
                        "connect_to_received_ms": (cts[0][0] - cts[0][1]) * 1e3 if cts else None},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=30.0, help="seconds measured (default 30)")
    parser.add_argument("--rate", type=float, default=25.0, help="sample rate, Hz (default 25)")
    parser.add_argument("--field-rate", type=float, default=2.0, help="the bridge's MotionField rate, Hz (default 2)")
    parser.add_argument("--no-readme", action="store_true", help="do not update the README table")
    args = parser.parse_args()
    r = run(args.rate, args.duration_s, args.field_rate)
    names = {"target_zmq": "daemon `target` (ZeroMQ, no bridge)", "target_transform": "`Target` TRANSFORM via the bridge",
             "motion_field_image": f"`MotionField` IMAGE via the bridge ({args.field_rate:g} Hz)"}  # fmt: skip
    rows = [{"message": names[k], "sample rate (Hz)": f"{r['rate_hz']:g}", "s": f"{r['duration_s']:g}", "p50 (ms)": f"{v['p50_ms']:.1f}",
             "p99 (ms)": f"{v['p99_ms']:.1f}", "max (ms)": f"{v['max_ms']:.1f}", "n": v["n"]}
            for k, v in r["latency"].items() if v["n"]]  # fmt: skip
    table = markdown_table(rows, list(rows[0])) if rows else ""
    ct = r["planning_ct"]
    table += (f"\n\nTRANSFORMs for {r['transforms_received']} of {r['daemon_frames']} daemon frames "
              f"({r['transform_frames_missing']} frames without one); PlanningCT {ct['shape']} received "
              f"{ct['connect_to_received_ms']:.0f} ms after connecting." if ct["received"] else "\n\nno PlanningCT received")  # fmt: skip
    path = write_results("igtl", {"cases": {"latency_25hz" if r["rate_hz"] == 25 else f"latency_{r['rate_hz']:g}hz": r}, "table": table})
    print(table)
    print(f"wrote {path}")
    if not args.no_readme and rows:
        try:
            update_readme_table("igtl", table)
        except SystemExit as exc:
            print(f"README not updated: {exc}")


if __name__ == "__main__":
    main()
