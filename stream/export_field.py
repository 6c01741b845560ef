"""``breathcast export-field``: one predicted field (and optionally the warped CT) for a plan, written to files.

The state is either a breathing state (amplitude, rate: every slice at it, the anatomy at that moment) or the
window of a trace (a replay source) ending at a given time (slice z at window sample z, as the paper's b_f).
The field goes out as a DICOM Deformable Spatial Registration (``.dcm``, referencing the planning CT series, so
the plan must be a DICOM series), NIfTI (``.nii.gz``) or MHA (``.mha``), in mm along patient LPS; the warped
planning CT as a new DICOM series (new UIDs, DERIVED) at the CT's own resolution, referencing the plan's
slices and the REG; the predicted target positions (when the plan has targets) as JSON beside the field.

The model sees the plan in the canonical frame (:mod:`breathcast.canonical`); everything written here goes back
to the plan's own layout: the field's grid and the warped CT are stored as the plan is (same orientation and
slice order; a REG's grid then has its third axis +z, see :mod:`breathcast.io.registration_export`), and
``--field-shape`` is (Z, Y, X) in the plan's own array order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

from breathcast.errors import BreathcastError
from breathcast.canonical import field_onto
from breathcast.geometry import Volume
from breathcast.engine.predictor import Prediction, Predictor

if TYPE_CHECKING:
    from breathcast.io.dicom_io import InstanceReference, SeriesIdentity

__all__ = ["FieldRequest", "FieldExport", "state_window", "trace_window", "export_predicted_field", "write_warped_ct"]


@dataclass(frozen=True)
class FieldRequest:
    """What to write.

    Args:
        out: field file (.dcm, .nii.gz, .nii or .mha).
        shape: (Z, Y, X) of the field's grid over the plan's field of view, in the plan's own array order;
            None: the model grid.
        warped_ct: folder for the warped planning CT as a DICOM series; None: not written.
        target_json: where the predicted target positions go; None: beside ``out``
            (``reg.dcm`` -> ``reg.target.json``). Written only when the plan has targets.
    """

    out: Path
    shape: tuple[int, int, int] | None = None
    warped_ct: Path | None = None
    target_json: Path | None = None

    def target_path(self) -> Path:
        """The target JSON file: ``target_json``, or ``out`` with its suffixes replaced by ``.target.json``."""
        if self.target_json is not None:
            return Path(self.target_json)
        name = Path(self.out).name
        stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
        return Path(self.out).with_name(f"{stem}.target.json")


@dataclass(frozen=True)
class FieldExport:
    """What :func:`export_predicted_field` wrote and predicted.

    Args:
        written: the files and folders written (field, warped CT folder, target JSON).
        prediction: the prediction they hold (``target_lps_mm`` (P, 3) mm LPS).
    """

    written: list[Path] = field(default_factory=list)
    prediction: Prediction | None = None

    def target_lines(self) -> list[str]:
        """One line per target point: where it is predicted (mm LPS) and how far it moved from the plan."""
        if self.prediction is None:
            return []
        return [
            f"target {n}: ({', '.join(f'{v:.2f}' for v in now)}) mm LPS, moved ({', '.join(f'{v:+.2f}' for v in moved)}) mm"
            for n, (now, moved) in enumerate(zip(self.prediction.target_lps_mm, self.prediction.target_displacement_mm))
        ]


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


def export_predicted_field(
    predictor: Predictor, window: np.ndarray, request: FieldRequest, plan_series: SeriesIdentity | None = None
) -> FieldExport:
    """Predict on ``window`` and write what ``request`` asks.

    Args:
        predictor: a loaded predictor (its plan in the canonical frame, ``predictor.frame`` the way back).
        window: (W,) amplitude window on the model's time base.
        request: the files to write.
        plan_series: the plan's DICOM :class:`~breathcast.io.dicom_io.SeriesIdentity` (needed for ``.dcm``; the
            warped CT then joins the plan's study and references its slices).

    Returns:
        A :class:`FieldExport`: the paths written (field, warped CT folder, target JSON) and the prediction.
    """
    from breathcast.io.dicom_io import InstanceReference, new_series_identity, read_dicom_file
    from breathcast.io.files import check_output_dir
    from breathcast.io.registration_export import export_field

    if request.warped_ct is not None:
        check_output_dir(request.warped_ct)  # before the REG that would reference it is written
    prediction = predictor.predict(window)
    frame = predictor.frame
    u, grid = prediction.displacement, predictor.grid
    if request.shape is not None:  # a grid over the plan's field of view, sampled from the model grid's field
        stored_order = tuple(int(n) for n in request.shape)
        target = frame.canonical.with_shape(tuple(stored_order[a] for a in frame.axes))
        if target != grid:
            u, grid = field_onto(u, grid, target), target
    u, grid = frame.field_to_stored(u, grid)
    warped = None  # the warped CT's UIDs, allocated first so that the REG and the CT reference each other
    if request.warped_ct is not None and plan_series is not None:
        warped = new_series_identity(plan_series, predictor.plan.volume.shape[0])
    path = export_field(u, grid, request.out, plan=plan_series, registered=warped)
    written = [path]
    registration = None
    if path.name.lower().endswith(".dcm"):
        registration = InstanceReference.of(read_dicom_file(path, stop_before_pixels=True))
    if request.warped_ct is not None:
        written.append(
            write_warped_ct(predictor, prediction.displacement, request.warped_ct, plan_series, registration, warped)
        )
    if len(prediction.target_lps_mm):
        written.append(_write_targets(predictor, prediction, request, plan_series))
    return FieldExport(written, prediction)


def _write_targets(
    predictor: Predictor, prediction: Prediction, request: FieldRequest, plan_series: SeriesIdentity | None
) -> Path:
    """The predicted target positions as JSON (mm, patient LPS), written atomically beside the field."""
    from breathcast.io.files import atomic_write

    data = {
        "units": "mm, patient LPS (x, y, z)",
        "frame_of_reference_uid": predictor.plan.frame_of_reference_uid
        or (plan_series.frame_of_reference_uid if plan_series is not None else ""),
        "model_id": predictor.model_id,
        "plan": predictor.plan.name,
        "field": Path(request.out).name,
        "targets": [
            {"planned_lps_mm": planned.tolist(), "predicted_lps_mm": now.tolist(), "displacement_lps_mm": moved.tolist()}
            for planned, now, moved in zip(
                predictor.plan.target_lps_mm, prediction.target_lps_mm, prediction.target_displacement_mm
            )
        ],
    }
    text = json.dumps(data, indent=1) + "\n"
    return atomic_write(request.target_path(), lambda tmp: tmp.write_text(text))


def write_warped_ct(
    predictor: Predictor,
    u_model: np.ndarray,
    folder: Path,
    plan_series: SeriesIdentity | None = None,
    registration: InstanceReference | None = None,
    identity: SeriesIdentity | None = None,
) -> Path:
    """Warp the planning CT at its own resolution by the model-grid field and write it as a new DICOM series.

    The warp runs in the canonical frame, where the field lives: the model-grid field is sampled at the CT's
    voxel centres (:func:`breathcast.canonical.field_onto`; beyond the model grid, its nearest face's value), and
    sample points outside the CT take the value of the nearest edge voxel (:func:`breathcast.warp.warp_image`).
    The result is stored exactly as the plan is (same grid, orientation and slice order).

    Args:
        predictor: the predictor the field came from.
        u_model: (3, Z, Y, X) float32 model-grid voxels (dz, dy, dx), canonical frame, pull-back.
        folder: the output folder (must not exist).
        plan_series: the plan's :class:`~breathcast.io.dicom_io.SeriesIdentity`: the series joins its study and
            Frame of Reference, and slice k references plan slice k (SourceImageSequence).
        registration: the REG the field was written as (:class:`~breathcast.io.dicom_io.InstanceReference`):
            referenced by every slice (SourceInstanceSequence).
        identity: the series' UIDs when allocated beforehand (the REG lists them); None: new ones.

    Returns:
        ``folder``.
    """
    from breathcast.io.dicom_io import write_ct_series
    from breathcast.warp import warp_image

    frame = predictor.frame
    ct = np.ascontiguousarray(frame.to_canonical_array(predictor.plan.volume.array), dtype=np.float32)
    u_ct = u_model if predictor.grid == frame.canonical else field_onto(u_model, predictor.grid, frame.canonical)
    warped = frame.to_stored(warp_image(ct, u_ct))
    write_ct_series(
        Volume(np.ascontiguousarray(warped), predictor.plan.volume.grid),
        folder,
        reference=plan_series,
        description="breathcast predicted CT",
        source_images=plan_series,
        source_instances=(registration,) if registration is not None else (),
        identity=identity,
    )
    return Path(folder)
