"""The stream commands of the ``breathcast`` CLI: serve, replay, listen, control, keys, stream-demo, igtl.

``breathcast/cli.py`` calls :func:`add_stream_commands` on its subparsers; each command imports its library
lazily, so ``breathcast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from breathcast.argtypes import non_negative_float as _non_negative_float
from breathcast.argtypes import positive_float as _positive_float
from breathcast.errors import BreathcastError

__all__ = ["add_stream_commands"]


def _curve(args: argparse.Namespace):
    from breathcast.stream.client import CurveKeys

    if bool(args.server_key) != bool(args.client_key):
        raise BreathcastError("CURVE needs both --server-key (the daemon's .key) and --client-key (your .key_secret)")
    return CurveKeys(args.server_key, args.client_key) if args.server_key else None


def _add_curve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-key", type=Path, default=None, metavar="KEY", help="the daemon's public key file (CURVE)")
    parser.add_argument("--client-key", type=Path, default=None, metavar="KEY_SECRET", help="this client's secret key file (CURVE)")


# -- serve -----------------------------------------------------------------------------------------------------


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan-source", choices=("simulated", "nifti", "dicom"), default=None,
                        help="planning CT: the simulated default patient (default), a NIfTI volume or a DICOM series folder")
    parser.add_argument("--plan-path", type=Path, default=None, metavar="PATH", help="the NIfTI file or DICOM folder")
    parser.add_argument("--plan-amplitude", default=None, metavar="A|FILE",
                        help="the planning CT's per-slice trace: one amplitude for every slice, or a file (.npy, .json, text)")
    parser.add_argument("--target", type=float, nargs=3, action="append", metavar=("X", "Y", "Z"), help="a target point, mm LPS (repeatable)")
    parser.add_argument("--rtstruct", type=Path, default=None, metavar="FILE", help="RTSTRUCT whose --roi centroid is the target")
    parser.add_argument("--roi", default=None, metavar="NAME", help="target ROI name in --rtstruct")
    parser.add_argument("--seed", type=int, default=None, help="simulated patient seed (default 0)")


def _plan_overrides(args: argparse.Namespace) -> dict[str, Any]:
    plan: dict[str, Any] = {}
    if args.plan_source:
        plan["source"] = args.plan_source
    if args.plan_path:
        plan["path"] = str(args.plan_path)
    if args.plan_amplitude is not None:
        try:
            plan["amplitude"] = float(args.plan_amplitude)
        except ValueError:
            plan["amplitude"] = args.plan_amplitude
    if args.target:
        plan["target_lps_mm"] = [list(p) for p in args.target]
    if args.rtstruct:
        plan["rtstruct"], plan["roi"] = str(args.rtstruct), args.roi or ""
    if args.seed is not None:
        plan["seed"] = args.seed
    return plan


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    for name in ("package", "path", "mode", "threads", "calibration", "session_log"):
        value = getattr(args, name)
        if value is not None:
            o[name] = str(value) if isinstance(value, Path) else value
    if args.horizon is not None:
        o["forecast_horizon_s"] = args.horizon
    plan = _plan_overrides(args)
    if plan:
        o["plan"] = plan
    endpoints = {k: getattr(args, f"{k}_endpoint") for k in ("input", "publish", "field", "control") if getattr(args, f"{k}_endpoint")}
    if endpoints:
        o["endpoints"] = endpoints
    field: dict[str, Any] = {}
    if args.no_field:
        field["enabled"] = False
    if args.field_shape:
        field["shape"] = list(args.field_shape)
    if args.field_dtype:
        field["dtype"] = args.field_dtype
    if args.field_ring:
        field["ring"] = True
    if field:
        o["field"] = field
    if args.stale_after is not None:
        o["safety"] = {"stale_after_s": args.stale_after}
    if args.gate_amplitude:
        o["gating"] = {"kind": "amplitude", "amplitude_range": list(args.gate_amplitude)}
    if args.server_secret_key or args.client_keys:
        o["security"] = {"server_secret_key": str(args.server_secret_key or ""), "client_keys_dir": str(args.client_keys or "")}
    return o


def _cmd_serve(args: argparse.Namespace) -> int:
    from breathcast.stream.config import load_config
    from breathcast.stream.daemon import serve

    config = load_config(args.config, _serve_overrides(args))
    print(f"breathcast serve: input {config.endpoints.input}, publish {config.endpoints.publish}, field {config.endpoints.field}, "
          f"control {config.endpoints.control}; path {config.path}, mode {config.mode}; Ctrl-C or the shutdown command ends it",
          file=sys.stderr)  # fmt: skip
    return serve(config)


def _cmd_export_field(args: argparse.Namespace) -> int:
    from breathcast.engine.package import DEFAULT_PACKAGE
    from breathcast.engine.predictor import PredictorConfig, load_predictor
    from breathcast.stream.config import config_from_dict
    from breathcast.stream.export_field import FieldRequest, export_predicted_field, state_window, trace_window
    from breathcast.stream.plans import build_plan
    from breathcast.stream.replay import load_trace

    spec = config_from_dict({"plan": _plan_overrides(args)}).plan
    plan = build_plan(spec)
    series = None
    if spec.source == "dicom":
        from breathcast.io.dicom_io import read_ct_series

        series = read_ct_series(Path(spec.path)).identity
    mode = "snapshot" if args.trace is None else args.mode
    predictor = load_predictor(args.package or DEFAULT_PACKAGE, plan, PredictorConfig(path=args.path, mode=mode))
    if args.trace is None:
        if args.amplitude is None:
            raise BreathcastError("give a breathing state (--amplitude A [--rate R]) or a trace (--trace SOURCE --at T)")
        window = state_window(predictor, args.amplitude, args.rate)
        what = f"amplitude {args.amplitude:g}, rate {args.rate:g}/s"
    else:
        if args.at is None:
            raise BreathcastError("--trace needs --at T: the time (s) the window ends")
        trace = load_trace(args.trace)
        if trace.amplitude is None:
            raise BreathcastError(f"{args.trace}: no normalised amplitude (calibrate the recording first)")
        window = trace_window(predictor, trace.time_s, trace.amplitude, args.at)
        what = f"the window of {args.trace} ending at {args.at:g} s ({mode} mode)"
    request = FieldRequest(args.out, tuple(args.field_shape) if args.field_shape else None, args.warped_ct)
    result = export_predicted_field(predictor, window, request, series)
    print(f"{predictor.model_id} ({args.path}) on {plan.name}, {what}: wrote {', '.join(str(p) for p in result.written)}")
    for line in result.target_lines():
        print(line)
    return 0


# -- replay ----------------------------------------------------------------------------------------------------


def _cmd_replay(args: argparse.Namespace) -> int:
    from breathcast.stream.client import SampleSender
    from breathcast.stream.replay import load_trace, replay

    trace = load_trace(args.source, args.format, str(args.calibration) if args.calibration else None, args.send_raw,
                       args.rate, args.duration)  # fmt: skip
    span = trace.time_s[-1] - trace.time_s[0]
    print(f"replaying {len(trace)} samples ({span:.1f} s) from {trace.name} to {args.input} at "
          f"{'full speed' if args.speed == 0 else f'{args.speed:g}x real time'}")  # fmt: skip
    started = time.perf_counter()
    with SampleSender(args.input, curve=_curve(args)) as tx:
        time.sleep(0.2)  # let the connection come up
        seq = replay(tx, trace, args.speed, args.start_seq, source=args.source_name or Path(trace.name).name)
        time.sleep(0.2)
    print(f"sent {seq - args.start_seq} samples in {time.perf_counter() - started:.1f} s")
    return 0


# -- listen ----------------------------------------------------------------------------------------------------


def _describe(message) -> str:
    h = message.header
    common = f"{message.topic:<6} #{h.get('msg_seq')}"
    if message.topic == "gate":
        return f"{common} {h['state']:<7} {h['reason']:<22} seq {h.get('sample_seq')} amplitude {h.get('amplitude')}"
    if message.topic == "target":
        d = h["target_displacement_mm"][0] if h["target_displacement_mm"] else []
        lat = (time.time() - h["t_sent"]) * 1e3 if h.get("t_sent") else float("nan")
        return (f"{common} frame {h['frame']} seq {h['sample_seq']} amplitude {h['amplitude']:.3f} displacement "
                f"{', '.join(f'{v:+.2f}' for v in d)} mm; sent->received {lat:.1f} ms")  # fmt: skip
    if message.topic == "state":
        slices = h.get("slice_amplitude") or []
        version = (h.get("coefficients") or {}).get("version")
        return (f"{common} frame {h['frame']} seq {h['sample_seq']} amplitude {h['amplitude']:.3f} over {len(slices)} slices; "
                f"coefficients version {version}")  # fmt: skip
    if message.topic == "field":
        a = message.array
        return f"{common} frame {h['frame']} {h['dtype']} {h['shape']} max |u| {float(abs(a).max()):.2f} mm"
    c = h.get("counters", {})
    return (f"{common} {h['state']} model {h['model_id']} plan {h['plan']['hash']} gate {h.get('gate')} "
            f"accepted {c.get('samples_accepted', 0)} frames {c.get('frames_computed', 0)} merged {c.get('frames_merged', 0)}")


def _cmd_listen(args: argparse.Namespace) -> int:
    from breathcast.stream.client import Subscriber

    topics = tuple(args.topics)
    endpoints = []
    if set(topics) - {"field"}:
        endpoints.append(args.publish)
    if "field" in topics:
        endpoints.append(args.field)
    received: list[tuple[float, Any]] = []
    end = time.monotonic() + args.duration if args.duration else None
    with Subscriber(endpoints, topics=topics, curve=_curve(args)) as rx:
        while (args.count is None or len(received) < args.count) and (end is None or time.monotonic() < end):
            message = rx.recv(0.2)
            if message is None:
                continue
            received.append((time.time(), message.header if message.topic != "field" else {**message.header}))
            if args.json:
                print(json.dumps({"topic": message.topic, **message.header}, default=str), flush=True)
            else:
                print(_describe(message), flush=True)
    if args.plot:
        _plot_listen(args.plot, received)
        print(f"wrote {args.plot}")
    return 0


def _plot_listen(path: Path, received) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets = [h for _, h in received if h.get("topic") == "target"]
    gates = [h for _, h in received if h.get("topic") == "gate" and h.get("t_source") is not None]
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True, constrained_layout=True)
    if targets:
        t = np.asarray([h["t_source"] for h in targets])
        axes[0].plot(t, [h["amplitude"] for h in targets], label="amplitude")
        d = np.asarray([h["target_displacement_mm"][0] for h in targets if h["target_displacement_mm"]])
        if len(d) == len(t):
            for i, name in enumerate("xyz"):
                axes[1].plot(t, d[:, i], label=f"target d{name} (mm)")
    if gates:
        axes[0].step([h["t_source"] for h in gates], [h["state"] == "BEAM_ON" for h in gates], where="post", label="BEAM_ON")
    axes[0].legend()
    axes[1].legend()
    axes[1].set_xlabel("source time (s)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- keys, demo ------------------------------------------------------------------------------------------------


def _cmd_keys(args: argparse.Namespace) -> int:
    from breathcast.stream.client import make_keys

    public, secret = make_keys(args.out, args.name)
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret: keep it, mode 600)")
    return 0


def _cmd_control(args: argparse.Namespace) -> int:
    from breathcast.errors import BreathcastError
    from breathcast.stream.client import ControlClient

    try:
        extra = json.loads(args.arguments) if args.arguments else {}
    except ValueError as exc:
        raise BreathcastError(f"arguments must be a JSON object, e.g. '{{\"path\": \"distilled\"}}' ({exc})") from None
    if not isinstance(extra, dict):
        raise BreathcastError("arguments must be a JSON object")
    with ControlClient(args.control, curve=_curve(args), timeout_s=args.timeout) as ctl:
        reply = ctl.request(args.cmd, check=False, **extra)
    print(json.dumps(reply, indent=1, default=str))
    return 0 if reply.get("ok") else 1


def _cmd_stream_demo(args: argparse.Namespace) -> int:
    from breathcast.stream.demo import run_stream_demo

    run_stream_demo(args.out, duration_s=args.duration, path=args.path, rate_hz=args.rate, horizon_s=args.horizon)
    return 0


def _cmd_igtl(args: argparse.Namespace) -> int:
    from breathcast.stream.config import load_config
    from breathcast.stream.igtl import IGTLBridge, IGTLConfig
    from breathcast.stream.plans import build_plan

    plan = _plan_overrides(args)
    serve = load_config(args.config, {"plan": plan} if plan else None)  # the daemon's TOML: its plan and endpoints
    config = IGTLConfig(publish=args.publish or serve.endpoints.publish, field=args.field or serve.endpoints.field,
                        host=args.host, port=args.port, field_rate_hz=args.field_rate,
                        header_version=args.header_version, allow_insecure_remote=args.allow_insecure_remote,
                        curve=_curve(args))  # fmt: skip
    bridge = IGTLBridge(config, None if args.no_ct else build_plan(serve.plan)).start()
    print(f"OpenIGTLink on {config.host}:{bridge.port} (Target, Gate, MotionField, PlanningCT); daemon {config.publish}; Ctrl-C stops")
    return bridge.serve_forever()


def add_stream_commands(subparsers) -> None:
    """Add ``serve``, ``replay``, ``listen``, ``control``, ``keys``, ``stream-demo`` and ``igtl`` to the ``breathcast`` subparsers."""
    from breathcast.stream.config import DEFAULT_ENDPOINTS as E

    serve = subparsers.add_parser(
        "serve", help="the streaming daemon: breathing samples in; fields, target, gate, status out",
        description="Load a model package and a planning CT, bind the sockets of docs/protocol.md and stream predictions "
        "until Ctrl-C, SIGTERM or the shutdown command. Settings come from --config (TOML, see "
        "breathcast.stream.config) and the flags below, which override it.",
    )  # fmt: skip
    serve.add_argument("--config", type=Path, default=None, metavar="TOML", help="configuration file")
    serve.add_argument("--package", type=Path, default=None, metavar="DIR", help="engine package (default: the shipped one)")
    serve.add_argument("--path", choices=("direct", "distilled", "linear5d"), default=None, help="predictor path (default distilled)")
    serve.add_argument("--mode", choices=("snapshot", "window"), default=None, help="window mode (default snapshot: the anatomy now)")
    serve.add_argument("--threads", type=int, default=None, metavar="N", help="model runtime threads (default 2)")
    _add_plan_options(serve)
    serve.add_argument("--horizon", type=_non_negative_float, default=None, metavar="S", help="forecast horizon, s (default 0)")
    serve.add_argument("--calibration", type=Path, default=None, metavar="JSON", help="surrogate calibration file for raw samples")
    serve.add_argument("--session-log", type=Path, default=None, metavar="FILE", help="append-only session log (.bclog)")
    serve.add_argument("--no-field", action="store_true", help="publish target and gate only")
    serve.add_argument("--field-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"), help="field grid (default: model grid)")
    serve.add_argument("--field-dtype", choices=("float32", "float16"), default=None, help="field dtype (default float32)")
    serve.add_argument("--field-ring", action="store_true", help="also write fields into the same-host ring file (docs/protocol.md 4.6)")
    serve.add_argument("--stale-after", type=_positive_float, default=None, metavar="S", help="HOLD after this long without a sample (default 0.25)")
    serve.add_argument("--gate-amplitude", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="amplitude gating window")
    for name, default in (("input", E.input), ("publish", E.publish), ("field", E.field), ("control", E.control)):
        serve.add_argument(f"--{name}-endpoint", default=None, metavar="ENDPOINT", help=f"{name} socket (default {default})")
    serve.add_argument("--server-secret-key", type=Path, default=None, metavar="KEY_SECRET", help="CURVE: the daemon's secret key")
    serve.add_argument("--client-keys", type=Path, default=None, metavar="DIR", help="CURVE: folder of allowed clients' public keys")
    serve.set_defaults(run=_cmd_serve)

    export = subparsers.add_parser(
        "export-field", help="write one predicted field (DICOM REG, NIfTI or MHA) and optionally the warped CT",
        description="Load a package and a planning CT as `serve` does, predict for a breathing state (--amplitude, "
        "--rate: every slice at it) or the window of a trace ending at --at, and write the displacement field in mm "
        "LPS: .dcm (DICOM Deformable Spatial Registration referencing the planning series; needs a DICOM plan), "
        ".nii.gz or .mha. --warped-ct writes the warped planning CT as a new DICOM series.",
    )  # fmt: skip
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="field file: .dcm, .nii.gz or .mha")
    export.add_argument("--package", type=Path, default=None, metavar="DIR", help="engine package (default: the shipped one)")
    export.add_argument("--path", choices=("direct", "distilled", "linear5d"), default="direct", help="predictor path (default direct)")
    _add_plan_options(export)
    export.add_argument("--amplitude", type=float, default=None, metavar="A", help="breathing amplitude (0 end-exhale, 1 end-inhale)")
    export.add_argument("--rate", type=float, default=0.0, metavar="R", help="d amplitude/dt, 1/s (default 0)")
    export.add_argument("--trace", default=None, metavar="SOURCE", help="instead: a trace (simulated[:SEED], .bclog, CSV)")
    export.add_argument("--at", type=float, default=None, metavar="T", help="with --trace: the time the window ends, s")
    export.add_argument("--mode", choices=("window", "snapshot"), default="window", help="with --trace (default window)")
    export.add_argument("--field-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"), help="field grid (default: model grid)")
    export.add_argument("--warped-ct", type=Path, default=None, metavar="DIR", help="also write the warped CT as a DICOM series here")
    export.set_defaults(run=_cmd_export_field)

    replay_cmd = subparsers.add_parser(
        "replay", help="send a recorded or simulated breathing trace to a running daemon",
        description="Send a trace: simulated[:SEED], a session log (.bclog), a real marker recording (calibrated with "
        "--calibration or its own calibration; --send-raw leaves it to the daemon), or a CSV (time, amplitude).",
    )  # fmt: skip
    replay_cmd.add_argument("source", metavar="SOURCE", help="simulated[:SEED], FILE.bclog, a marker file or a CSV")
    replay_cmd.add_argument("--format", choices=("simulated", "log", "marker", "csv"), default=None, help="(default: guessed)")
    replay_cmd.add_argument("--speed", type=_non_negative_float, default=1.0, help="1 = real time, N = N times faster, 0 = flat out")
    replay_cmd.add_argument("--rate", type=_positive_float, default=25.0, metavar="HZ", help="simulated sample rate (default 25)")
    replay_cmd.add_argument("--duration", type=_positive_float, default=None, metavar="S", help="send only the first S seconds")
    replay_cmd.add_argument("--calibration", type=Path, default=None, metavar="JSON", help="surrogate calibration for a marker file")
    replay_cmd.add_argument("--send-raw", action="store_true", help="send raw marker positions (the daemon needs --calibration)")
    replay_cmd.add_argument("--start-seq", type=int, default=0, help="first seq (default 0)")
    replay_cmd.add_argument("--source-name", default=None, metavar="NAME",
                            help="the samples' source name (default: the trace's name; a new name restarts the daemon's window)")
    replay_cmd.add_argument("--input", default=E.input, metavar="ENDPOINT", help=f"daemon input (default {E.input})")
    _add_curve_options(replay_cmd)
    replay_cmd.set_defaults(run=_cmd_replay)

    listen = subparsers.add_parser("listen", help="subscribe to a daemon and print (or plot) what arrives",
                                   description="Print one line per message (or JSON lines); --plot draws amplitude, "
                                   "gate and target displacement at the end.")  # fmt: skip
    listen.add_argument("--topics", nargs="+", choices=("field", "target", "gate", "status", "state"), default=["target", "gate", "status"],
                        help="topics to print (state: the per-slice breathing state a client makes its own field from)")
    listen.add_argument("--publish", default=E.publish, metavar="ENDPOINT", help=f"(default {E.publish})")
    listen.add_argument("--field", default=E.field, metavar="ENDPOINT", help=f"(default {E.field})")
    listen.add_argument("--count", type=int, default=None, metavar="N", help="stop after N messages")
    listen.add_argument("--duration", type=_positive_float, default=None, metavar="S", help="stop after S seconds")
    listen.add_argument("--json", action="store_true", help="one JSON object per line (headers only)")
    listen.add_argument("--plot", type=Path, default=None, metavar="PNG", help="draw what arrived at the end")
    _add_curve_options(listen)
    listen.set_defaults(run=_cmd_listen)

    control = subparsers.add_parser("control", help="send one control command to a running daemon and print the reply",
                                    description="Commands (docs/protocol.md section 5): status, load_plan, set_mode, "
                                    "set_gating, set_forecast, reset, shutdown. Arguments as one JSON object, e.g. "
                                    "breathcast control set_mode '{\"path\": \"direct\"}'.")  # fmt: skip
    control.add_argument("cmd", metavar="CMD", help="the command")
    control.add_argument("arguments", nargs="?", default="", metavar="JSON", help="its arguments as a JSON object")
    control.add_argument("--control", default=E.control, metavar="ENDPOINT", help=f"(default {E.control})")
    control.add_argument("--timeout", type=_positive_float, default=5.0, metavar="S", help="reply timeout (default 5 s)")
    _add_curve_options(control)
    control.set_defaults(run=_cmd_control)

    keys = subparsers.add_parser("keys", help="make a CurveZMQ key pair (NAME.key public, NAME.key_secret secret)")
    keys.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the two files")
    keys.add_argument("--name", required=True, help="e.g. server, console")
    keys.set_defaults(run=_cmd_keys)

    demo = subparsers.add_parser(
        "stream-demo", help="the streaming demo: daemon + replayed trace + listener + report (about a minute)",
        description="Start the daemon on the simulated default patient and the shipped package, replay the patient's "
        "breathing in real time, listen, and write stream_report.png, stream_latency.json and session.bclog.",
    )  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("demo-output"), metavar="DIR", help="output folder (default demo-output)")
    demo.add_argument("--duration", type=_positive_float, default=25.0, metavar="S", help="seconds of breathing to replay (default 25)")
    demo.add_argument("--path", choices=("direct", "distilled"), default="distilled", help="predictor path (default distilled)")
    demo.add_argument("--rate", type=_positive_float, default=25.0, metavar="HZ", help="sample rate (default 25)")
    demo.add_argument("--horizon", type=_non_negative_float, default=0.0, metavar="S", help="forecast horizon, s (default 0)")
    demo.set_defaults(run=_cmd_stream_demo)

    igtl = subparsers.add_parser(
        "igtl", help="OpenIGTLink bridge for 3D Slicer: target, gate, field and planning CT of a running daemon",
        description="Subscribe to a running daemon and serve OpenIGTLink (docs/slicer.md): TRANSFORM Target, Target2, ... "
        "(mm RAS), STRING Gate, IMAGE MotionField (mm RAS, a grid transform 'from parent') and IMAGE PlanningCT (once per "
        "client). --config is the daemon's TOML: the same plan and endpoints.",
    )  # fmt: skip
    igtl.add_argument("--config", type=Path, default=None, metavar="TOML", help="the daemon's configuration file")
    _add_plan_options(igtl)
    igtl.add_argument("--no-ct", action="store_true", help="do not send the planning CT")
    igtl.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    igtl.add_argument("--port", type=int, default=18944, help="TCP port (default 18944)")
    igtl.add_argument("--field-rate", type=_non_negative_float, default=2.0, metavar="HZ", help="MotionField images per second at most (default 2; 0 = none)")
    igtl.add_argument("--header-version", type=int, choices=(1, 2), default=2, help="OpenIGTLink header version (default 2, with metadata; 1 for receivers older than OpenIGTLink 3)")
    igtl.add_argument("--allow-insecure-remote", action="store_true", help="listen on a non-loopback address (OpenIGTLink is unauthenticated)")
    igtl.add_argument("--publish", default=None, metavar="ENDPOINT", help=f"daemon publish endpoint (default: --config's, else {E.publish})")
    igtl.add_argument("--field", default=None, metavar="ENDPOINT", help=f"daemon field endpoint (default: --config's, else {E.field})")
    _add_curve_options(igtl)
    igtl.set_defaults(run=_cmd_igtl)

