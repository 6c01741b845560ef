"""The engine's commands: ``breathcast export`` and ``breathcast quantize`` (wired by :mod:`breathcast.cli`).

Library imports happen inside the command functions, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from breathcast.argtypes import int_at_least, phase_item, positive_float

__all__ = ["add_engine_commands"]


def _model_trace_and_sidecar(args: argparse.Namespace, model_file: Path, grid: int):
    """The time base of a model on ``grid`` and what its training run's manifest.json says (if beside it)."""
    from breathcast.engine.export import scan_trace_spec
    from breathcast.engine.package import TraceSpec

    trace = scan_trace_spec(grid, window_samples=args.window_samples)
    if args.scan_duration is not None:
        trace = TraceSpec(args.window_samples, args.scan_duration / (args.window_samples - 1), grid)
    training, metrics = {}, {}
    sidecar = model_file.with_name("manifest.json")
    if sidecar.is_file():  # what the model was trained on travels with it
        made = json.loads(sidecar.read_text())
        training = {**made.get("training", {}), "data": made.get("data", {}), "model_box": made.get("model_box", {}),
                    "model_file_manifest": str(sidecar)}
        metrics = made.get("metrics", {})
    return trace, training, metrics


def _cmd_export(args: argparse.Namespace) -> int:
    if args.five_d is not None:
        return _export_five_d(args)
    if args.ldm is not None:
        return _export_ldm(args)
    from breathcast.training.cvae import load_cvae
    from breathcast.engine.export import export_cvae

    model = load_cvae(args.model)
    trace, training, metrics = _model_trace_and_sidecar(args, args.model, model.config.grid)
    package = export_cvae(model, args.out, trace, training, metrics, overwrite=args.overwrite)
    parity = package.manifest.metrics["export_parity"]["max_abs_velocity_difference_voxels"]
    print(f"{package.model_id}: plan and frame graphs in {package.path} (onnxruntime vs torch: {parity:.1e} voxels; "
          f"window {trace.window_samples} samples x {trace.sample_interval_s * 1e3:.2f} ms)")  # fmt: skip
    return 0


def _export_ldm(args: argparse.Namespace) -> int:
    from breathcast.training.ldm import load_ldm
    from breathcast.engine.export import LDM_SAMPLING_STEPS, export_ldm

    model = load_ldm(args.ldm)
    trace, training, metrics = _model_trace_and_sidecar(args, args.ldm, model.grid)
    steps = args.sampling_steps if args.sampling_steps is not None else LDM_SAMPLING_STEPS
    package = export_ldm(model, args.out, trace, training, metrics, overwrite=args.overwrite, sampling_steps=steps, seed=args.seed)
    parity = package.manifest.metrics["export_parity"]
    print(f"{package.model_id}: encode, denoise and decode graphs in {package.path} (onnxruntime + numpy DDIM vs torch, "
          f"{steps} steps: {parity['max_abs_velocity_difference_voxels']:.1e} voxels; window {trace.window_samples} samples "
          f"x {trace.sample_interval_s * 1e3:.2f} ms)")  # fmt: skip
    return 0


def _export_five_d(args: argparse.Namespace) -> int:
    from breathcast.calibration.motion_model import FiveDModel
    from breathcast.engine.export import export_linear5d, scan_trace_spec
    from breathcast.engine.package import TraceSpec

    model = FiveDModel.load(args.five_d)
    slices = model.grid.shape[0]
    duration = args.scan_duration if args.scan_duration is not None else scan_trace_spec(slices).window_duration_s
    trace = TraceSpec(args.window_samples, duration / (args.window_samples - 1), slices)
    fitted_from = {"patient": model.patient_id, "source": model.source, "reference_scan": model.reference_scan,
                   "model_dir": str(args.five_d), **model.fitted_from}  # fmt: skip
    package = export_linear5d(model.coefficients, model.terms, model.grid, args.out, trace, fitted_from,
                              {"residual_rms_voxels": model.residual_rms_voxels}, overwrite=args.overwrite)  # fmt: skip
    print(f"{package.model_id}: 5D model of {model.patient_id} ({model.source}) in {package.path}; its plan is the "
          f"reference scan on {model.grid.shape}")  # fmt: skip
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from breathcast.calibration.quantization_data import (
        QuantizationData,
        load_quantization_data,
        representative_plans,
        representative_windows,
        save_quantization_data,
    )
    from breathcast.engine.package import read_package
    from breathcast.engine.quantize import quantize_frame

    package = read_package(args.package, kind="cvae")
    if args.data is not None and args.data.is_file():
        data = load_quantization_data(args.data)
    else:
        spec = package.manifest.trace
        moving, b_m = representative_plans(args.plans, package.manifest.grid[0], seed=args.seed)
        windows = representative_windows(args.windows, spec.window_samples, spec.sample_interval_s, seed=args.seed)
        data = QuantizationData({"moving": moving, "b_m": b_m, "windows": windows},
                                {"plans": args.plans, "windows": args.windows, "seed": args.seed, "made_by": "breathcast quantize"})  # fmt: skip
        if args.data is not None:
            save_quantization_data(data, args.data)
    out = quantize_frame(package, data, args.out, overwrite=args.overwrite)
    error = out.manifest.metrics["int8"]
    print(f"{out.model_id}: INT8 frame graph in {out.path}; against float on {error['calibration_samples']} calibration "
          f"inputs: max {error['max_abs_velocity_difference_voxels']:.3f}, mean {error['mean_abs_velocity_difference_voxels']:.4f} "
          f"half-grid voxels")  # fmt: skip
    return 0


def add_4dct_arguments(parser: argparse.ArgumentParser) -> None:
    """The 4DCT folder and how to read it (``ingest-4dct`` and ``plan-4dct``)."""
    parser.add_argument("input", type=Path, metavar="FOLDER", help="the 4DCT: one CT series per phase")
    parser.add_argument("--patient-id", default="patient", metavar="ID", help="patient id (default 'patient')")
    parser.add_argument("--grid", type=int_at_least(16), default=64, metavar="N", help="model box grid N³ (default 64)")
    parser.add_argument("--phase", action="append", type=phase_item, metavar="SERIES=PERCENT",
                        help="the phase of a series by SeriesDescription, SeriesInstanceUID or folder name (repeat; "
                        "series not named are ignored)")
    parser.add_argument("--period", type=positive_float, default=4.0, metavar="S",
                        help="breathing period for the rates from the images, s (default 4)")
    parser.add_argument("--recording", type=Path, default=None, metavar="FILE",
                        help="the breathing recording made with the 4DCT, with a phase column (RPM .vxp): the phases' "
                        "amplitude and rate come from it instead of the images")


def _cmd_plan_4dct(args: argparse.Namespace) -> int:
    from breathcast.engine.plan_4dct import Plan4DCTConfig, plan_4dct
    from breathcast.training.adapt import AdaptConfig

    adaptation = AdaptConfig(steps=args.adapt_steps, time_limit_s=args.adapt_seconds)
    config = Plan4DCTConfig(grid_size=args.grid, period_s=args.period, phases=dict(args.phase) if args.phase else None, adapt=not args.no_adapt,
                            population=args.population, adaptation=adaptation, recording=args.recording)  # fmt: skip
    report = plan_4dct(args.input, args.out, args.patient_id, config)
    worst = max(r["five_d_vs_registered_mm"] for r in report["phases"])
    made = "linear5d/" + (" and adapted/" if not args.no_adapt else "")
    print(f"{args.out}: {made} packages, report.png, report.json in {report['seconds']['total']:.0f} s "
          f"({len(report['phases'])} phases; 5D vs registered motion <= {worst:.2f} mm)")
    return 0


def add_engine_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``export``, ``quantize`` and ``plan-4dct`` on the top-level subparsers."""
    from breathcast.training.inference import DEFAULT_MODEL

    positive_int = int_at_least(1)
    export = sub.add_parser(
        "export",
        help="export a trained cVAE (split plan/frame ONNX graphs), LDM (encode/denoise/decode graphs) or a 5D model as an engine package",
        description="Write a model package: for a cVAE plan.onnx (run once per planning CT) and frame.onnx (run per "
        "frame); for an LDM encode.onnx (once per planning CT), denoise.onnx (one U-Net pass, run per DDIM step by the "
        "engine's numpy sampler) and decode.onnx, with the DDIM schedule and the seeded initial noise; the torch "
        "weights for the reference runtime, and manifest.json with the model's time base, training data, metrics and "
        "the sha256 of every file. The export checks onnxruntime against torch (cVAE <= 1e-4 voxels, LDM <= 1e-3).",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, metavar="PATH", help="a model.pt from `breathcast train cvae`")
    source.add_argument("--ldm", type=Path, metavar="PATH", help="a model.pt from `breathcast train ldm`")
    source.add_argument("--five-d", type=Path, metavar="DIR", help="a 5D model from `breathcast calibrate five-d` (a linear5d package)")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="package folder to create")
    export.add_argument("--window-samples", type=positive_int, default=448, help="rolling window length (default 448)")
    export.add_argument("--scan-duration", type=float, default=None, metavar="S",
                        help="seconds one training scan took (the window's span; default: the simulator's protocol)")
    export.add_argument("--sampling-steps", type=positive_int, default=None, metavar="N",
                        help="--ldm: the package's default DDIM steps (default 10; a predictor may choose others)")
    export.add_argument("--seed", type=int, default=0, help="--ldm: seed of the initial noise (default 0)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing package")
    export.set_defaults(run=_cmd_export)

    quantize = sub.add_parser(
        "quantize",
        help="add an INT8 (Q/DQ) frame graph to a package, calibrated on representative inputs",
        description="Calibrate symmetric INT8 scales for the frame graph with onnxruntime's static quantisation on "
        "simulated planning CTs and synthetic breathing windows (or a saved --data file), and write a new package "
        "with frame_int8.onnx and its measured error. TensorRT builds its INT8 engine from it.",
    )
    quantize.add_argument("--package", type=Path, required=True, metavar="DIR", help="a cvae engine package")
    quantize.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new package folder")
    quantize.add_argument("--data", type=Path, default=None, metavar="NPZ",
                          help="quantisation data to read, or to write when it does not exist yet")
    quantize.add_argument("--plans", type=positive_int, default=4, help="simulated planning CTs (default 4)")
    quantize.add_argument("--windows", type=positive_int, default=16, help="breathing windows per plan (default 16)")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the simulated plans and windows")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing package")
    quantize.set_defaults(run=_cmd_quantize)

    plan = sub.add_parser(
        "plan-4dct",
        help="a patient's 4DCT folder -> servable per-patient packages (5D model, adapted network) and a report",
        description="Read and check the 4DCT (as ingest-4dct), register every phase to end-exhale (sliding-aware "
        "demons), fit the patient's 5D model (OUT/linear5d, a linear5d package), adapt the population cVAE to the "
        "patient's phases (OUT/adapted, a cvae package), and write OUT/report.png and OUT/report.json. Serve either "
        "with the end-exhale phase as the plan; see docs/four-dct.md.",
    )
    add_4dct_arguments(plan)
    plan.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    plan.add_argument("--no-adapt", action="store_true", help="only the 5D model")
    plan.add_argument("--population", type=Path, default=DEFAULT_MODEL, metavar="PATH",
                      help="the population cVAE to adapt (default: the shipped model)")
    plan.add_argument("--adapt-steps", type=positive_int, default=150, metavar="N", help="adaptation steps (default 150)")
    plan.add_argument("--adapt-seconds", type=float, default=150.0, metavar="S", help="stop adapting after S seconds (default 150)")
    plan.set_defaults(run=_cmd_plan_4dct)
