"""Export trained models to packages: the cVAE as split ONNX graphs, a 5D model as coefficient arrays.

``breathcast export`` calls :func:`export_cvae`. The export checks itself: onnxruntime runs both graphs on a
realistic input and the velocity must match the torch model's ``decode_velocity`` to ``PARITY_TOLERANCE``; the
measured difference is written into the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.simulator import SimulationConfig
from breathcast.traces import HelicalScan, axial_slice_positions_mm
from breathcast.engine.package import GraphSpec, Manifest, ModelPackage, TensorSpec, TraceSpec, write_package

__all__ = ["PARITY_TOLERANCE", "OPSET", "WINDOW_SAMPLES", "scan_trace_spec", "export_cvae", "export_linear5d"]

PARITY_TOLERANCE = 1e-4  # max abs velocity difference, half-grid voxels
OPSET = 18  # the lowest opset torch 2.13's exporter writes
WINDOW_SAMPLES = 448


def scan_trace_spec(grid: int, config: SimulationConfig = SimulationConfig(), window_samples: int = WINDOW_SAMPLES) -> TraceSpec:
    """The time base of a model trained on ``config``'s helical scans: the window spans one scan.

    Example:
        >>> spec = scan_trace_spec(64)
        >>> round(spec.window_duration_s, 3), spec.slices
        (2.297, 64)
    """
    scan = HelicalScan(rotation_time_s=config.rotation_time_s, pitch=config.pitch, collimation_mm=config.collimation_mm)
    duration = scan.duration_s(axial_slice_positions_mm(Grid.centered((grid, grid, grid), config.field_of_view_mm)))
    return TraceSpec(window_samples=window_samples, sample_interval_s=duration / (window_samples - 1), slices=grid)


def _export_graph(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str], dynamic_shapes: Any) -> None:
    quiet = io.StringIO()
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registration_log.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        registration_log.setLevel(logging.ERROR)
        try:
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=output_names,
                dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes, external_data=False,
            )  # fmt: skip
        except Exception as exc:  # the exporter raises many types
            raise BreathcastError(f"ONNX export of {path.name} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        finally:
            registration_log.setLevel(level)


def _spec(name: str, t: torch.Tensor, units: str, batch: bool = False) -> TensorSpec:
    shape = tuple(t.shape)
    return TensorSpec(name, ("n", *shape[1:]) if batch else shape, "float32", units)


def export_cvae(
    model: "torch.nn.Module",
    out: Path,
    trace: TraceSpec | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Write a cVAE as a package with ``plan.onnx``, ``frame.onnx`` and ``model.pt``, checked against torch.

    Args:
        model: a :class:`breathcast.training.cvae.CVAE` (evaluation mode is set here).
        out: package folder to create.
        trace: the model's time base; default :func:`scan_trace_spec` of the simulator's scans.
        training, metrics: copied into the manifest (the model's own manifest says what it was trained on).
        overwrite: replace an existing package.
    """
    import onnxruntime as ort
    from torch.export import Dim

    from breathcast.training.cvae import CVAE, save_cvae
    from breathcast.engine.graphs import FRAME_INPUTS, PLAN_OUTPUTS, FrameGraph, PlanGraph

    if not isinstance(model, CVAE):
        raise BreathcastError(f"export_cvae needs a CVAE, got {type(model).__name__}")
    model = model.eval()
    d, latent = model.config.grid, model.config.latent_dim
    trace = trace or scan_trace_spec(d)
    if trace.slices != d:
        raise BreathcastError(f"trace spec has {trace.slices} slices, the model grid {d}")
    plan_graph, frame_graph = PlanGraph(model).eval(), FrameGraph(model).eval()

    generator = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 1, d, d, d, generator=generator)
    slices = torch.linspace(0.0, 1.0, d)
    b_m = (0.3 + 0.4 * slices)[None]
    b_f = torch.stack([0.8 - 0.6 * slices, 0.2 + 0.3 * slices])
    z = torch.zeros(2, latent)
    with torch.no_grad():
        plan_tensors = plan_graph(moving, b_m)
        velocity = frame_graph(*plan_tensors, b_m, b_f, z)
        reference = model.decode_velocity(moving.expand(2, -1, -1, -1, -1), b_m.expand(2, -1), b_f, z)

    plan_specs = GraphSpec(
        file="plan.onnx",
        inputs=(_spec("moving", moving, "CT scaled to [0, 1]"), _spec("b_m", b_m, "amplitude per slice")),
        outputs=tuple(_spec(n, t, "features") for n, t in zip(PLAN_OUTPUTS, plan_tensors)),
        opset=OPSET,
    )
    frame_specs = GraphSpec(
        file="frame.onnx",
        inputs=(
            *(_spec(n, t, "features") for n, t in zip(PLAN_OUTPUTS, plan_tensors)),
            _spec("b_m", b_m, "amplitude per slice"),
            _spec("b_f", b_f, "amplitude per slice", batch=True),
            _spec("z", z, "latent sample (0: the mean)", batch=True),
        ),
        outputs=(_spec("velocity", velocity, "half-grid voxels (dz, dy, dx)", batch=True),),
        opset=OPSET,
    )

    def write_files(folder: Path) -> None:
        batch = Dim("n", min=1, max=1024)
        _export_graph(plan_graph, (moving, b_m), folder / "plan.onnx", ["moving", "b_m"], list(PLAN_OUTPUTS), None)
        frame_dynamic = {name: None for name in PLAN_OUTPUTS} | {"b_m": None, "b_f": {0: batch}, "z": {0: batch}}
        _export_graph(frame_graph, (*plan_tensors, b_m, b_f, z), folder / "frame.onnx", list(FRAME_INPUTS), ["velocity"], frame_dynamic)
        save_cvae(model, folder / "model.pt")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        plan_session = ort.InferenceSession(str(folder / "plan.onnx"), options, providers=["CPUExecutionProvider"])
        frame_session = ort.InferenceSession(str(folder / "frame.onnx"), options, providers=["CPUExecutionProvider"])
        plan_out = plan_session.run(None, {"moving": moving.numpy(), "b_m": b_m.numpy()})
        feed = dict(zip(PLAN_OUTPUTS, plan_out)) | {"b_m": b_m.numpy(), "b_f": b_f.numpy(), "z": z.numpy()}
        (onnx_velocity,) = frame_session.run(None, feed)
        difference = float(np.abs(onnx_velocity - reference.numpy()).max())
        if not difference <= PARITY_TOLERANCE:
            raise BreathcastError(f"exported graphs differ from the torch model by {difference:.2e} voxels (tolerance {PARITY_TOLERANCE:.0e})")
        parity["max_abs_velocity_difference_voxels"] = difference

    parity: dict[str, float] = {}
    manifest = Manifest(
        kind="cvae",
        grid=(d, d, d),
        trace=trace,
        graphs={"plan": plan_specs, "frame": frame_specs},
        model={**model.config.to_dict(), "velocity_grid": "half resolution: velocity voxels are 2 model-grid voxels"},
        units={"velocity": "voxels of the half-resolution grid, (dz, dy, dx)", "displacement": "model-grid voxels (dz, dy, dx), pull-back"},
        training=training or {},
        metrics={**(metrics or {}), "export_parity": parity},  # filled by write_files before the manifest is written
    )
    return write_package(out, manifest, write_files, overwrite=overwrite)


def export_linear5d(
    coefficients: np.ndarray,
    terms: tuple[tuple[int, int], ...],
    grid: Grid,
    out: Path,
    trace: TraceSpec,
    fitted_from: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Write a per-patient 5D model (Low et al.) as a ``linear5d`` package.

    Args:
        coefficients: (K, 3, Z, Y, X) float32 per-voxel coefficients, voxels of ``grid`` (dz, dy, dx).
        terms: K (amplitude exponent, rate exponent) pairs (:mod:`breathcast.state_model`).
        grid: the reference scan's grid; a plan must be on this grid to use the package.
        out: package folder to create.
        trace: the time base of the windows the package will be driven with.
        fitted_from: what the fit used (patient, scans, registration method or ground truth).
    """
    coefficients = np.ascontiguousarray(coefficients, dtype=np.float32)
    if coefficients.ndim != 5 or coefficients.shape[1] != 3 or coefficients.shape[0] != len(terms):
        raise BreathcastError(f"coefficients must have shape ({len(terms)}, 3, Z, Y, X), got {coefficients.shape}")
    if tuple(coefficients.shape[2:]) != grid.shape:
        raise BreathcastError(f"coefficients on {coefficients.shape[2:]}, grid {grid.shape}")
    manifest = Manifest(
        kind="linear5d",
        grid=grid.shape,
        trace=dataclasses.replace(trace, slices=grid.shape[0]),
        arrays={"coefficients.npy": TensorSpec("coefficients", coefficients.shape, "float32", "model-grid voxels per term")},
        model={"terms": [list(t) for t in terms], "grid": dataclasses.asdict(grid)},
        units={"displacement": "model-grid voxels (dz, dy, dx), pull-back", "rate": "1/s"},
        training={"fitted_from": fitted_from},
        metrics=metrics or {},
    )
    return write_package(out, manifest, lambda folder: np.save(folder / "coefficients.npy", coefficients), overwrite=overwrite)
