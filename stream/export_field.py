"""``breathcast export-field``: one predicted field (and optionally the warped CT) for a plan, written to files.

The state is either a breathing state (amplitude, rate: every slice at it, the anatomy at that moment) or the
window of a trace (a replay source) ending at a given time (slice z at window sample z, as the paper's b_f).
The field goes out as a DICOM Deformable Spatial Registration (``.dcm``, referencing the planning CT series, so
the plan must be a DICOM series), NIfTI (``.nii.gz``) or MHA (``.mha``), in mm along patient LPS; the warped
planning CT as a new DICOM series (new UIDs, DERIVED) at the CT's own resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume
from breathcast.resize import FieldResizer
from breathcast.engine.predictor import Plan, Predictor

__all__ = ["FieldRequest", "state_window", "trace_window", "export_predicted_field"]


@dataclass(frozen=True)
class FieldRequest:
    """What to write.

    Args:
        out: field file (.dcm, .nii.gz, .nii or .mha).
        shape: (Z, Y, X) of the field's grid over the plan's field of view; None: the model grid.
        warped_ct: folder for the warped planning CT as a DICOM series; None: not written.
    """

    out: Path
    shape: tuple[int, int, int] | None = None
    warped_ct: Path | None = None


def state_window(predictor: Predictor, amplitude: float, rate: float = 0.0) -> np.ndarray:
    """(W,) window that ends at ``amplitude`` with slope ``rate`` (1/s): in snapshot mode, exactly that state."""
    spec = predictor.trace
    t = (np.arange(spec.window_samples) - (spec.window_samples - 1)) * spec.sample_interval_s
    return amplitude + rate * t


def trace_window(predictor: Predictor, time_s: np.ndarray, amplitude: np.ndarray, end_s: float) -> np.ndarray:
    """(W,) window of a trace ending at ``end_s``, resampled (linearly) onto the model's time base."""
    spec = predictor.trace
    times = end_s + (np.arange(spec.window_samples) - (spec.window_samples - 1)) * spec.sample_interval_s
    if times[0] < time_s[0] or end_s > time_s[-1]:
        raise BreathcastError(f"the trace covers {time_s[0]:.2f}-{time_s[-1]:.2f} s; a window ending at {end_s:.2f} s needs "
                              f"{spec.window_duration_s:.2f} s before it")  # fmt: skip
    return np.interp(times, time_s, amplitude)


def export_predicted_field(predictor: Predictor, window: np.ndarray, request: FieldRequest, plan_series=None) -> list[Path]:
    """Predict on ``window`` and write what ``request`` asks; ``plan_series`` is the plan's DICOM
    :class:`~breathcast.io.dicom_io.SeriesIdentity` (needed for ``.dcm`` and referenced by the warped CT)."""
    from breathcast.io.registration_export import export_field

    prediction = predictor.predict(window)
    model_grid: Grid = predictor.grid
    u, grid = prediction.displacement, model_grid
    if request.shape is not None and tuple(request.shape) != model_grid.shape:
        u = FieldResizer(model_grid.shape, request.shape)(u)
        grid = model_grid.with_shape(tuple(request.shape))
    written = [export_field(u, grid, request.out, plan=plan_series)]
    if request.warped_ct is not None:
        written.append(write_warped_ct(predictor.plan, prediction.displacement, model_grid, request.warped_ct, plan_series))
    return written


def write_warped_ct(plan: Plan, u_model: np.ndarray, model_grid: Grid, folder: Path, plan_series=None) -> Path:
    """Warp the planning CT at its own resolution by the model-grid field and write it as a new DICOM series."""
    from breathcast.io.dicom_io import write_ct_series
    from breathcast.warp import warp_image

    ct = plan.volume
    u_ct = u_model if ct.shape == model_grid.shape else FieldResizer(model_grid.shape, ct.shape)(u_model)
    warped = warp_image(np.ascontiguousarray(ct.array, dtype=np.float32), u_ct)
    write_ct_series(Volume(warped, ct.grid), folder, reference=plan_series, description="breathcast predicted CT")
    return Path(folder)
