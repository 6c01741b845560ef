"""INT8 frame graph: Q/DQ nodes with scales calibrated on representative inputs.

TensorRT 10+ takes reduced precision from the ONNX itself (explicit quantisation), so the INT8 engine is built
from ``frame_int8.onnx``: the frame graph with QuantizeLinear/DequantizeLinear pairs, symmetric int8 weights
(per channel) and activations, as TensorRT requires. The scales come from onnxruntime's static quantisation run
on :mod:`breathcast.calibration.quantization_data` (planning CTs and breathing windows), turned into frame-graph
inputs here. onnxruntime also runs the Q/DQ graph on the CPU, which is how its error is measured without a GPU;
the error against the float graph is written into the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.calibration.quantization_data import QuantizationData
from breathcast.engine.package import ModelPackage, PackageError, write_package
from breathcast.geometry import Grid, Volume, unit_to_hu
from breathcast.model_box import MODEL_BOX_MM
from breathcast.motion_prior import motion_prior
from breathcast.engine.predictor import WindowMode, window_states
from breathcast.engine.runtimes import RuntimeConfig, open_graph

__all__ = ["frame_feeds", "quantize_frame"]


def frame_feeds(package: ModelPackage, data: QuantizationData) -> list[dict[str, np.ndarray]]:
    """Frame-graph inputs for every (plan, window) pair of ``data`` (arrays ``moving`` (P, D, D, D) in [0, 1],
    ``b_m`` (P, D), ``windows`` (S, W) on the model's time base). The plans are taken to fill the model box (as
    :func:`~breathcast.calibration.quantization_data.representative_plans` makes them) where the model needs
    their motion prior."""
    for name in ("moving", "b_m", "windows"):
        if name not in data.arrays:
            raise BreathcastError(f"quantisation data has no {name!r} array (it has {sorted(data.arrays)})")
    manifest = package.manifest
    d = manifest.grid[0]
    plan_session = open_graph(package, "plan", RuntimeConfig())
    plan_names = [spec.name for spec in manifest.graphs["plan"].outputs]
    latent = np.zeros((1, manifest.model["latent_dim"]), np.float32)
    takes_prior = any(spec.name == "prior" for spec in manifest.graphs["plan"].inputs)
    box = Grid((d, d, d), spacing=tuple(e / d for e in manifest.model_box.get("extent_mm", MODEL_BOX_MM)))
    feeds = []
    for moving, b_m in zip(data.arrays["moving"], data.arrays["b_m"]):
        if moving.shape != (d, d, d) or b_m.shape != (d,):
            raise BreathcastError(f"quantisation plans must be ({d}, {d}, {d}) images with ({d},) traces, got {moving.shape} and {b_m.shape}")
        b_m = b_m[None].astype(np.float32)
        feed = {"moving": moving[None, None].astype(np.float32), "b_m": b_m}
        if takes_prior:
            feed["prior"] = motion_prior(Volume(unit_to_hu(moving), box), version=package.prior_version)[None]
        plan = dict(zip(plan_names, plan_session.run(feed)))
        for window in data.arrays["windows"]:
            a, _ = window_states(window, manifest.trace, d, WindowMode.WINDOW)
            feeds.append(plan | {"b_m": b_m, "b_f": a[None].astype(np.float32), "z": latent})
    return feeds


def quantize_frame(package: ModelPackage, data: QuantizationData, out: Path, overwrite: bool = False) -> ModelPackage:
    """A copy of ``package`` with ``frame_int8.onnx`` (graph ``frame_int8``) and its measured error.

    The error is the largest and mean absolute velocity difference (half-grid voxels) between the INT8 and
    float frame graphs under onnxruntime on the calibration inputs themselves.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if package.manifest.kind != "cvae":
        raise PackageError(f"{package.path}: only cvae packages have a frame graph to quantise")
    feeds = frame_feeds(package, data)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    root_log = logging.getLogger()
    level = root_log.level
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "frame_int8.onnx"
        root_log.setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger about pre-processing
        try:
            quantize_static(
                str(package.file("frame.onnx")), str(quantized), Reader(),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},  # TensorRT's int8 is symmetric
            )  # fmt: skip
        finally:
            root_log.setLevel(level)
        float_session = open_graph(package, "frame")
        import onnxruntime as ort

        int8_session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
        differences = [np.abs(int8_session.run(None, f)[0] - float_session.run(f)[0]) for f in feeds]
        error = {
            "max_abs_velocity_difference_voxels": float(max(d.max() for d in differences)),
            "mean_abs_velocity_difference_voxels": float(np.mean([d.mean() for d in differences])),
            "calibration_samples": len(feeds),
            "source": data.source,
        }
        frame = package.manifest.graphs["frame"]
        manifest = dataclasses.replace(
            package.manifest,
            graphs={**package.manifest.graphs, "frame_int8": dataclasses.replace(frame, file="frame_int8.onnx")},
            metrics={**package.manifest.metrics, "int8": error},
            files={},
            model_id="",
        )

        def write_files(folder: Path) -> None:
            for name in package.manifest.files:
                shutil.copy2(package.path / name, folder / name)
            shutil.copy2(quantized, folder / "frame_int8.onnx")

        return write_package(out, manifest, write_files, overwrite=overwrite)

