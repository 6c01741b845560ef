"""Quantisation data: representative model inputs for reduced-precision (INT8) engines.

TensorRT 10+ builds strongly typed networks, so INT8 comes from Q/DQ nodes in the ONNX, and their scales come
from running the network on inputs like those it will see (DESIGN.md). This module says what "like those" is
for breathcast: planning CTs from the simulator (with the per-slice trace of the scan) and breathing windows
from synthetic traces with the simulator's patient-to-patient variability. The engine turns them into graph
inputs (``breathcast.engine.quantize``); the file format is an ``.npz`` of named arrays with one row per sample
plus a JSON description of where they came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.geometry import hu_to_unit
from breathcast.sim.simulator import SimulationConfig, simulate_patient
from breathcast.traces import TraceConfig, sample_trace_config, synthetic_trace

__all__ = ["QuantizationData", "representative_windows", "representative_plans", "save_quantization_data", "load_quantization_data"]


@dataclass(frozen=True)
class QuantizationData:
    """Named arrays with one row per sample (e.g. ``moving`` (P, D, D, D) and ``b_m`` (P, D) for P plans,
    ``windows`` (S, W) for S breathing windows), and what they were made from."""

    arrays: dict[str, np.ndarray]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.arrays or any(np.ndim(a) < 1 or len(a) == 0 for a in self.arrays.values()):
            raise BreathcastError("quantisation data needs at least one non-empty array")


def representative_windows(count: int, window_samples: int, sample_interval_s: float, seed: int = 0) -> np.ndarray:
    """(count, window_samples) amplitude windows from synthetic traces of varied simulated patients."""
    rng = np.random.default_rng(seed)
    span = (window_samples - 1) * sample_interval_s
    windows = []
    while len(windows) < count:
        trace = synthetic_trace(sample_trace_config(rng, TraceConfig(duration_s=60.0)), seed=int(rng.integers(2**31)))
        for end in rng.uniform(span + 1.0, trace.duration_s, size=min(8, count - len(windows))):
            windows.append(trace.amplitude_at(end - span + np.arange(window_samples) * sample_interval_s))
    return np.asarray(windows, dtype=np.float32)


def representative_plans(count: int, grid: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Planning CTs in [0, 1] (count, D, D, D) and their per-slice traces (count, D): each patient's most exhaled
    of 3 simulated scans, as a plan would be chosen."""
    images, traces = [], []
    config = SimulationConfig(grid_size=grid, n_scans=3)
    for i in range(count):
        patient = simulate_patient(seed * 1000 + i, config)
        scan = min(patient.scans, key=lambda s: float(s.amplitude.mean()))
        images.append(hu_to_unit(scan.image_hu))
        traces.append(scan.amplitude)
    return np.asarray(images, dtype=np.float32), np.asarray(traces, dtype=np.float32)


def save_quantization_data(data: QuantizationData, path: Path) -> Path:
    """Write ``path`` (.npz) and ``path`` with ``.json`` (the source), atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise BreathcastError(f"{path}: quantisation data is written as .npz")
    tmp = path.with_name(f".{path.name}.tmp.npz")
    try:
        np.savez(tmp, **data.arrays)
        json_tmp = path.with_name(f".{path.stem}.json.tmp")
        json_tmp.write_text(json.dumps({"arrays": {k: list(v.shape) for k, v in data.arrays.items()}, "source": data.source}, indent=1))
        os.replace(tmp, path)
        os.replace(json_tmp, path.with_suffix(".json"))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BreathcastError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def load_quantization_data(path: Path) -> QuantizationData:
    """Read what :func:`save_quantization_data` wrote; a clear error for a missing or foreign file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        source = json.loads(path.with_suffix(".json").read_text()).get("source", {}) if path.with_suffix(".json").is_file() else {}
    except (OSError, ValueError) as exc:
        raise BreathcastError(f"{path}: not readable quantisation data ({exc})") from None
    return QuantizationData(arrays, source)
