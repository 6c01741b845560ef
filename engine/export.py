"""Export trained models to packages: the cVAE and the LDM as split ONNX graphs, a 5D model as coefficient arrays.

``breathcast export`` calls :func:`export_cvae` or :func:`export_ldm`. The export checks itself: onnxruntime
runs the graphs on a realistic input and the velocity must match the torch model to ``PARITY_TOLERANCE`` (cVAE:
``decode_velocity``; LDM: a whole DDIM sampling, the numpy loop of :mod:`breathcast.engine.ddim` around the
``denoise`` graph against :meth:`~breathcast.training.ldm.LDM.sample_latent`, to ``LDM_PARITY_TOLERANCE``); the
measured differences are written into the manifest.
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
from breathcast.sim.simulator import SimulationConfig
from breathcast.traces import HelicalScan, axial_slice_positions_mm
from breathcast.engine.package import GraphSpec, Manifest, ModelPackage, TensorSpec, TraceSpec, write_package

__all__ = [
    "PARITY_TOLERANCE",
    "LDM_PARITY_TOLERANCE",
    "LDM_SAMPLING_STEPS",
    "OPSET",
    "WINDOW_SAMPLES",
    "scan_trace_spec",
    "export_cvae",
    "export_ldm",
    "export_linear5d",
]

PARITY_TOLERANCE = 1e-4  # max abs velocity difference, half-grid voxels
LDM_PARITY_TOLERANCE = 1e-3  # LDM: max abs difference of x0 (unit-variance latent) and velocity (half-grid voxels)
LDM_SAMPLING_STEPS = 10  # the engine's default DDIM steps (the model's own default is 50; see export_ldm)
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
    plan_inputs = {"moving": moving, "b_m": b_m}
    if model.config.prior_channels:
        plan_inputs["prior"] = torch.randn(1, model.config.prior_channels, d // 2, d // 2, d // 2, generator=generator)
    prior = plan_inputs.get("prior")
    with torch.no_grad():
        plan_tensors = plan_graph(*plan_inputs.values())
        velocity = frame_graph(*plan_tensors, b_m, b_f, z)
        reference = model.decode_velocity(moving.expand(2, -1, -1, -1, -1), b_m.expand(2, -1), b_f, z,
                                          None if prior is None else prior.expand(2, -1, -1, -1, -1))

    plan_specs = GraphSpec(
        file="plan.onnx",
        inputs=(_spec("moving", moving, "CT scaled to [0, 1]"), _spec("b_m", b_m, "amplitude per slice"),
                *([_spec("prior", prior, "motion prior, model-grid voxels (dz, dy, dx)")] if prior is not None else [])),
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
        _export_graph(plan_graph, tuple(plan_inputs.values()), folder / "plan.onnx", list(plan_inputs), list(PLAN_OUTPUTS), None)
        frame_dynamic = {name: None for name in PLAN_OUTPUTS} | {"b_m": None, "b_f": {0: batch}, "z": {0: batch}}
        _export_graph(frame_graph, (*plan_tensors, b_m, b_f, z), folder / "frame.onnx", list(FRAME_INPUTS), ["velocity"], frame_dynamic)
        save_cvae(model, folder / "model.pt")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        plan_session = ort.InferenceSession(str(folder / "plan.onnx"), options, providers=["CPUExecutionProvider"])
        frame_session = ort.InferenceSession(str(folder / "frame.onnx"), options, providers=["CPUExecutionProvider"])
        plan_out = plan_session.run(None, {name: t.numpy() for name, t in plan_inputs.items()})
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
        model_box=dict((training or {}).get("model_box", {})),  # where the model grid lies in a plan
        metrics={**(metrics or {}), "export_parity": parity},  # filled by write_files before the manifest is written
    )
    return write_package(out, manifest, write_files, overwrite=overwrite)


def export_ldm(
    model: "torch.nn.Module",
    out: Path,
    trace: TraceSpec | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    sampling_steps: int = LDM_SAMPLING_STEPS,
    seed: int = 0,
) -> ModelPackage:
    """Write an LDM as a package with ``encode.onnx``, ``denoise.onnx``, ``decode.onnx``, ``noise.npy`` and
    ``model.pt``, checked against torch (:mod:`breathcast.engine.ldm_graphs` says what each graph does).

    The DDIM loop stays outside the graphs (the step count is the predictor's setting); the manifest's ``model``
    holds what it needs: the schedule's ``alphas_cumprod``, the latent shape, the default ``sampling_steps``,
    the ``seed`` and the initial noise ``noise.npy`` drawn from it exactly as :meth:`LDM.predict` draws it
    (``torch.randn`` with a generator seeded ``seed``), so that the engine, which has no torch, starts from the
    same noise: deterministic, and the same field as the torch model.

    Args:
        model: a :class:`breathcast.training.ldm.LDM` (evaluation mode is set here).
        out: package folder to create.
        trace: the model's time base; default :func:`scan_trace_spec` of the simulator's scans.
        training, metrics: copied into the manifest.
        overwrite: replace an existing package.
        sampling_steps: the engine's default DDIM steps (selectable per predictor).
        seed: seed of the initial noise.
    """
    import onnxruntime as ort
    from torch.export import Dim

    from breathcast.engine.ddim import ddim_sample
    from breathcast.engine.ldm_graphs import DENOISE_INPUTS, ENCODE_INPUTS, DecodeGraph, DenoiseGraph, EncodeGraph, decode_inputs
    from breathcast.training.ldm import LDM, save_ldm

    if not isinstance(model, LDM):
        raise BreathcastError(f"export_ldm needs an LDM, got {type(model).__name__}")
    model = model.eval()
    d, c, l = model.grid, model.latent_channels, model.latent_grid
    config = model.config
    if not 1 <= sampling_steps <= config.train_timesteps:
        raise BreathcastError(f"sampling steps must be 1..{config.train_timesteps}, got {sampling_steps}")
    trace = trace or scan_trace_spec(d)
    if trace.slices != d:
        raise BreathcastError(f"trace spec has {trace.slices} slices, the model grid {d}")
    encode_graph, denoise_graph, decode_graph = EncodeGraph(model).eval(), DenoiseGraph(model).eval(), DecodeGraph(model).eval()

    generator = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 1, d, d, d, generator=generator)
    slices = torch.linspace(0.0, 1.0, d)
    b_m = (0.3 + 0.4 * slices)[None]
    b_f = torch.stack([0.8 - 0.6 * slices, 0.2 + 0.3 * slices])
    noise = torch.randn((1, c, l, l, l), generator=torch.Generator().manual_seed(seed))  # as LDM.sample_latent draws it
    x_t = torch.cat([noise, torch.randn((1, c, l, l, l), generator=generator)])
    t = torch.tensor([config.train_timesteps - 1, config.train_timesteps // 3], dtype=torch.int64)
    prior = torch.randn(1, config.prior_channels, d // 2, d // 2, d // 2, generator=generator) if config.prior_channels else None
    with torch.no_grad():
        condition = encode_graph(moving, b_m)
        x0 = denoise_graph(x_t, condition, t, b_f)

        def decode_args(latents: torch.Tensor) -> tuple[torch.Tensor, ...]:
            values = {"x0": latents, "condition": condition, "moving": moving, "prior": prior, "b_m": b_m, "b_f": b_f}
            return tuple(values[n] for n in decode_inputs(model))

        velocity = decode_graph(*decode_args(x0))
        sampled = model.sample_latent(condition.expand(2, -1, -1, -1, -1), b_f, sampling_steps, noise=noise.expand(2, -1, -1, -1, -1))
        reference_velocity = model.decode_velocity(sampled, condition.expand(2, -1, -1, -1, -1), moving.expand(2, -1, -1, -1, -1),
                                                   None if prior is None else prior.expand(2, -1, -1, -1, -1), b_m.expand(2, -1), b_f)

    latent_units = "latent (scaled to unit variance)"
    specs = {
        "encode": GraphSpec(
            file="encode.onnx",
            inputs=(_spec("moving", moving, "CT scaled to [0, 1]"), _spec("b_m", b_m, "amplitude per slice")),
            outputs=(_spec("condition", condition, latent_units),),
            opset=OPSET,
        ),
        "denoise": GraphSpec(
            file="denoise.onnx",
            inputs=(
                _spec("x_t", x_t, latent_units, batch=True),
                _spec("condition", condition, latent_units),
                TensorSpec("t", ("n",), "int64", "diffusion timestep"),
                _spec("b_f", b_f, "amplitude per slice", batch=True),
            ),
            outputs=(_spec("x0", x0, latent_units, batch=True),),
            opset=OPSET,
        ),
        "decode": GraphSpec(
            file="decode.onnx",
            inputs=(_spec("x0", x0, latent_units, batch=True), _spec("condition", condition, latent_units),
                    _spec("moving", moving, "CT scaled to [0, 1]"),
                    *([_spec("prior", prior, "motion prior, model-grid voxels (dz, dy, dx)"), _spec("b_m", b_m, "amplitude per slice"),
                       _spec("b_f", b_f, "amplitude per slice", batch=True)] if prior is not None else [])),
            outputs=(_spec("velocity", velocity, "half-grid voxels (dz, dy, dx)", batch=True),),
            opset=OPSET,
        ),
    }
    alphas_cumprod = model.scheduler.alphas_cumprod.to(torch.float32).numpy()

    def write_files(folder: Path) -> None:
        batch = Dim("n", min=1, max=1024)
        _export_graph(encode_graph, (moving, b_m), folder / "encode.onnx", list(ENCODE_INPUTS), ["condition"], None)
        _export_graph(denoise_graph, (x_t, condition, t, b_f), folder / "denoise.onnx", list(DENOISE_INPUTS), ["x0"],
                      {"x_t": {0: batch}, "condition": None, "t": {0: batch}, "b_f": {0: batch}})  # fmt: skip
        decode_dynamic = {"x0": {0: batch}, "condition": None, "moving": None, "prior": None, "b_m": None, "b_f": {0: batch}}
        _export_graph(decode_graph, decode_args(x0), folder / "decode.onnx", list(decode_inputs(model)), ["velocity"],
                      {n: decode_dynamic[n] for n in decode_inputs(model)})  # fmt: skip
        np.save(folder / "noise.npy", noise.numpy())
        save_ldm(model, folder / "model.pt")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions = {name: ort.InferenceSession(str(folder / spec.file), options, providers=["CPUExecutionProvider"]) for name, spec in specs.items()}
        (onnx_condition,) = sessions["encode"].run(None, {"moving": moving.numpy(), "b_m": b_m.numpy()})
        (onnx_x0,) = sessions["denoise"].run(None, {"x_t": x_t.numpy(), "condition": condition.numpy(), "t": t.numpy(), "b_f": b_f.numpy()})

        def denoise(x: np.ndarray, steps_t: np.ndarray) -> np.ndarray:
            return sessions["denoise"].run(None, {"x_t": x, "condition": onnx_condition, "t": steps_t, "b_f": b_f.numpy()})[0]

        onnx_sampled = ddim_sample(denoise, np.repeat(noise.numpy(), 2, axis=0), alphas_cumprod, sampling_steps)
        decode_feed = {n: v.numpy() for n, v in zip(decode_inputs(model), decode_args(x0))}
        (onnx_velocity,) = sessions["decode"].run(None, decode_feed | {"x0": onnx_sampled, "condition": onnx_condition})
        differences = {
            "max_abs_condition_difference": float(np.abs(onnx_condition - condition.numpy()).max()),
            "max_abs_x0_difference": float(np.abs(onnx_x0 - x0.numpy()).max()),
            "max_abs_sampled_latent_difference": float(np.abs(onnx_sampled - sampled.numpy()).max()),
            "max_abs_velocity_difference_voxels": float(np.abs(onnx_velocity - reference_velocity.numpy()).max()),
        }
        worst = max(differences.values())
        if not worst <= LDM_PARITY_TOLERANCE:
            raise BreathcastError(f"exported graphs with the numpy DDIM loop differ from the torch model by {worst:.2e} "
                                  f"(tolerance {LDM_PARITY_TOLERANCE:.0e}): {differences}")  # fmt: skip
        parity.update(differences, sampling_steps=sampling_steps)

    parity: dict[str, float] = {}
    manifest = Manifest(
        kind="ldm",
        grid=(d, d, d),
        trace=trace,
        graphs=specs,
        arrays={"noise.npy": TensorSpec("noise", (1, c, l, l, l), "float32", "standard normal: the DDIM start, broadcast over a batch")},
        model={
            "latent_shape": [c, l, l, l],
            "latent_scale": model.latent_scale,
            "integration_steps": config.integration_steps,
            "sampling_steps": int(sampling_steps),
            "seed": int(seed),
            "ddim": {
                "train_timesteps": config.train_timesteps, "schedule": "scaled_linear_beta", "beta_start": config.beta_start,
                "beta_end": config.beta_end, "prediction_type": "sample", "eta": 0.0, "clip_sample": False,
                "final_alpha_cumprod": 1.0, "timesteps": "round(linspace(T - 1, 0, steps)); previous timestep t - T // steps",
                "alphas_cumprod": [float(a) for a in alphas_cumprod],
            },  # fmt: skip
            "ldm": config.to_dict(),
            "autoencoder": model.autoencoder.config.to_dict(),
            "velocity_grid": "half resolution: velocity voxels are 2 model-grid voxels",
        },
        units={"velocity": "voxels of the half-resolution grid, (dz, dy, dx)", "displacement": "model-grid voxels (dz, dy, dx), pull-back",
               "latent": latent_units},  # fmt: skip
        training=training or {},
        model_box=dict((training or {}).get("model_box", {})),  # where the model grid lies in a plan
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
    model_box: dict[str, Any] | None = None,
) -> ModelPackage:
    """Write a per-patient 5D model (Low et al.) as a ``linear5d`` package.

    Args:
        coefficients: (K, 3, Z, Y, X) float32 per-voxel coefficients, voxels of ``grid`` (dz, dy, dx).
        terms: K (amplitude exponent, rate exponent) pairs (:mod:`breathcast.state_model`).
        grid: the reference scan's grid; a plan must be on this grid to use the package.
        out: package folder to create.
        trace: the time base of the windows the package will be driven with.
        fitted_from: what the fit used (patient, scans, registration method or ground truth).
        model_box: ``{"anchor": "lungs", "extent_mm": [x, y, z]}`` when ``grid`` is the lung-centred model box
            of the patient's planning CT (a 4DCT's end-exhale phase): the engine then places the box on the plan
            as for a network and refuses a plan whose box is elsewhere; None: the plan must be on ``grid``.
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
        model_box=dict(model_box or {}),
        metrics=metrics or {},
    )
    return write_package(out, manifest, lambda folder: np.save(folder / "coefficients.npy", coefficients), overwrite=overwrite)
