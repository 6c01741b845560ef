"""The streaming demo: the daemon on the default patient and the shipped package, a trace replayed into it, a
listener, and a report.

:func:`run_stream_demo` starts a :class:`~breathcast.stream.daemon.Daemon` (its own threads, loopback ports),
replays the simulated patient's own breathing trace in real time, subscribes to ``target``, ``gate`` and ``field``,
and writes into ``out``:

* ``stream_report.png``: the amplitude sent and the gate; the target's superior-inferior and anterior-posterior
  position, predicted (received) against the simulator's ground truth; the planning CT warped by received fields
  (coronal slices through the tumour) at exhale, mid and inhale;
* ``stream_latency.json``: end-to-end latency (sample sent -> message received) of ``target``, ``gate``, ``field``
  p50/p99/max, the daemon's counters, and the target error against the truth;
* ``session.bclog``: the session log.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from breathcast.errors import BreathcastError

__all__ = ["StreamDemoResult", "run_stream_demo"]


@dataclass(frozen=True)
class StreamDemoResult:
    """What the demo measured (also in ``stream_latency.json``)."""

    latency_ms: dict[str, dict[str, float]]
    target_error_mm: dict[str, float]
    gate_duty_cycle: float
    counters: dict[str, int]
    files: tuple[Path, ...]


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()), "n": int(a.size)}


def _sample(u: np.ndarray, index_zyx: np.ndarray) -> np.ndarray:
    """Trilinear sample of a (3, Z, Y, X) field at one (z, y, x) index position."""
    from scipy.ndimage import map_coordinates

    return np.array([map_coordinates(u[c], index_zyx[:, None], order=1, mode="nearest")[0] for c in range(3)])


def _true_target_lps(patient, motion, plan_scan, plan_point_lps: np.ndarray, amplitude: float, rate: float) -> np.ndarray:
    """Where the anatomical point at ``plan_point_lps`` in the planning CT truly is at (amplitude, rate), mm LPS.

    The simulator's fields pull back from the rest anatomy: the point sits at ``r = p + u_plan(p)`` at rest, and at
    the state s at the x that solves ``x + u_s(x) = r`` (fixed-point iteration).
    """
    grid = patient.grid
    p = grid.lps_to_index(plan_point_lps)
    rest = p + _sample(plan_scan.field, p)
    u = motion.displacement(amplitude, rate)
    x = rest.copy()
    for _ in range(30):
        x = rest - _sample(u, x)
    return grid.index_to_lps(x)


def run_stream_demo(out: Path | str, duration_s: float = 30.0, path: str = "distilled", rate_hz: float = 25.0,
                    horizon_s: float = 0.0, log=print) -> StreamDemoResult:  # fmt: skip
    """Run the demo (about ``duration_s`` + 20 s on 2 cores) and write the report; see the module docstring."""
    from breathcast.io.dataset import prepare_output_dir
    from breathcast.sim.motion import build_motion_field
    from breathcast.stream.client import SampleSender, Subscriber
    from breathcast.stream.config import config_from_dict
    from breathcast.stream.daemon import Daemon
    from breathcast.stream.plans import plan_from_patient, planning_scan_index, simulated_default_patient
    from breathcast.stream.replay import ReplayTrace, replay

    out = prepare_output_dir(Path(out))
    started = time.perf_counter()
    log("simulating the default patient (seed 0, 64³) ...")
    patient = simulated_default_patient()
    plan = plan_from_patient(patient)
    motion = build_motion_field(patient.anatomy, patient.motion, patient.grid)
    plan_scan = patient.scans[planning_scan_index(patient)]
    import socket

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    endpoints = {k: f"tcp://127.0.0.1:{port()}" for k in ("input", "publish", "field", "control")}
    log_path = out / "session.bclog"
    log_path.unlink(missing_ok=True)
    config = config_from_dict({"path": path, "mode": "snapshot", "session_log": str(log_path), "endpoints": endpoints,
                               "forecast_horizon_s": horizon_s, "gating": {"kind": "amplitude", "amplitude_range": [-0.5, 0.3]}})  # fmt: skip
    daemon = Daemon(config, plan=plan).start()
    try:
        from breathcast.stream.client import ControlClient

        log(f"loading the {path} predictor on the planning CT (scan {planning_scan_index(patient)}) ...")
        with ControlClient(endpoints["control"], timeout_s=5.0) as ctl:
            status = ctl.wait_until_running(180.0)
        log(f"daemon running: model {status['model_id']}, plan {status['plan']['hash']}, "
            f"predictor loaded in {status['predictor']['load_s']:.1f} s")  # fmt: skip
        t = patient.trace.time_s[0] + 1.0 + np.arange(int(duration_s * rate_hz)) / rate_hz
        trace = ReplayTrace(t, patient.trace.amplitude_at(t), None, np.ones(t.size, bool), "simulated patient 0")
        received: dict[str, list[tuple[float, dict[str, Any]]]] = {"target": [], "gate": [], "field": []}
        fields: list[tuple[float, np.ndarray]] = []
        stop = threading.Event()

        def listen() -> None:
            with Subscriber([endpoints["publish"], endpoints["field"]], topics=("target", "gate", "field")) as rx:
                while not stop.is_set():
                    message = rx.recv(0.1)
                    if message is None:
                        continue
                    now = time.time()
                    received[message.topic].append((now, message.header))
                    if message.topic == "field" and message.array is not None:
                        fields.append((message.header["amplitude"], np.array(message.array)))
                        if len(fields) > 400:
                            del fields[::2]

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        time.sleep(0.5)
        log(f"replaying {duration_s:.0f} s of the patient's breathing at {rate_hz:.0f} Hz in real time ...")
        with SampleSender(endpoints["input"]) as tx:
            replay(tx, trace, speed=1.0)
        time.sleep(0.5)
        stop.set()
        listener.join(2.0)
        with ControlClient(endpoints["control"]) as ctl:
            status = ctl.status()
    finally:
        daemon.stop()
        daemon.wait(15.0)

    latency = {topic: _stats([(now - h["t_sent"]) * 1e3 for now, h in msgs if h.get("t_sent") is not None])
               for topic, msgs in received.items()}  # fmt: skip
    targets = received["target"]
    if not targets:
        raise BreathcastError("the demo received no target messages; see the daemon's log")
    every = max(1, len(targets) // 300)
    pred, true, times = [], [], []
    for _, h in targets[::every]:
        pred.append(h["target_lps_mm"][0])
        true.append(_true_target_lps(patient, motion, plan_scan, plan.target_lps_mm[0], h["amplitude"], h["rate"]))
        times.append(h["t_source"])
    pred, true, times = np.asarray(pred), np.asarray(true), np.asarray(times)
    err = np.linalg.norm(pred - true, axis=1)
    plan_pos = plan.target_lps_mm[0]
    still = np.linalg.norm(true - plan_pos, axis=1)
    gates = received["gate"]
    on = [h["state"] == "BEAM_ON" for _, h in gates if h.get("frame") is not None]
    duty = float(np.mean(on)) if on else 0.0
    target_error = {"mean": float(err.mean()), "p95": float(np.percentile(err, 95)), "max": float(err.max()),
                    "no_motion_model_mean": float(still.mean())}  # fmt: skip
    png = _plot(out / "stream_report.png", trace, received, times, pred, true, fields, patient, plan)
    summary = {"latency_ms": latency, "target_error_mm": target_error, "gate_duty_cycle": duty,
               "daemon_latency_ms": status["latency_ms"], "counters": status["counters"], "model_id": status["model_id"],
               "plan_hash": status["plan"]["hash"], "path": path, "duration_s": duration_s, "rate_hz": rate_hz,
               "horizon_s": horizon_s, "wall_s": time.perf_counter() - started}  # fmt: skip
    latency_json = out / "stream_latency.json"
    latency_json.write_text(json.dumps(summary, indent=1) + "\n")
    for topic in ("target", "gate", "field"):
        s = latency[topic]
        log(f"{topic:>6}: {s['n']} received; latency sample sent -> received p50 {s['p50']:.1f} ms, "
            f"p99 {s['p99']:.1f} ms, max {s['max']:.1f} ms")  # fmt: skip
    log(f"target error vs the simulator's truth: mean {target_error['mean']:.2f} mm, p95 {target_error['p95']:.2f} mm "
        f"(a static target would be off by {target_error['no_motion_model_mean']:.2f} mm); gate duty cycle {duty:.0%}")
    log(f"wrote {png}, {latency_json}, {log_path}")
    return StreamDemoResult(latency, target_error, duty, status["counters"], (png, latency_json, log_path))


def _plot(path: Path, trace, received, times, pred, true, fields, patient, plan) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from breathcast.geometry import field_from_lps_mm, hu_to_unit
    from breathcast.warp import warp_image

    fig = plt.figure(figsize=(13, 10), constrained_layout=True)
    grid = fig.add_gridspec(3, 3)
    ax = fig.add_subplot(grid[0, :])
    t0 = trace.time_s[0]
    ax.plot(trace.time_s - t0, trace.amplitude, lw=1, color="k", label="amplitude sent")
    gates = [(h["t_source"], h["state"] == "BEAM_ON") for _, h in received["gate"] if h.get("t_source") is not None]
    if gates:
        gt = np.array([g[0] for g in gates]) - t0
        on = np.array([g[1] for g in gates], float)
        ax.fill_between(gt, -0.2, 1.2, where=on > 0, step="post", color="tab:green", alpha=0.2, label="gate BEAM_ON")
    ax.set(xlabel="source time (s)", ylabel="amplitude", title="breathing trace and gate")
    ax.legend(loc="upper right")
    for col, (axis, name) in enumerate(((2, "superior-inferior z"), (1, "anterior-posterior y"))):
        ax = fig.add_subplot(grid[1, col])
        ax.plot(times - t0, true[:, axis], color="k", lw=1.5, label="simulator truth")
        ax.plot(times - t0, pred[:, axis], color="tab:red", lw=1, label="predicted (received)")
        ax.set(xlabel="source time (s)", ylabel="mm LPS", title=f"tumour centroid, {name}")
        ax.legend(loc="upper right", fontsize=8)
    ax = fig.add_subplot(grid[1, 2])
    lat = [(now - h["t_sent"]) * 1e3 for now, h in received["target"] if h.get("t_sent")]
    latf = [(now - h["t_sent"]) * 1e3 for now, h in received["field"] if h.get("t_sent")]
    ax.hist(lat, bins=40, alpha=0.7, label="target")
    if latf:
        ax.hist(latf, bins=40, alpha=0.5, label="field")
    ax.set(xlabel="sample sent -> received (ms)", ylabel="messages", title="end-to-end latency")
    ax.legend()
    if fields:
        amps = np.array([a for a, _ in fields])
        picks = [int(np.argmin(amps)), int(np.argmin(np.abs(amps - np.median(amps)))), int(np.argmax(amps))]
        image = hu_to_unit(plan.volume.array)
        row = int(round(plan.volume.grid.lps_to_index(plan.target_lps_mm[0])[1]))
        for col, k in enumerate(picks):
            amplitude, u_mm = fields[k]
            u = field_from_lps_mm(u_mm.astype(np.float32), plan.volume.grid).astype(np.float32)
            warped = warp_image(image, u)
            ax = fig.add_subplot(grid[2, col])
            ax.imshow(warped[::-1, row, :], cmap="gray", aspect=plan.volume.grid.spacing[2] / plan.volume.grid.spacing[0])
            ax.set(title=f"warped by a received field, A = {amplitude:.2f}", xticks=[], yticks=[])
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
