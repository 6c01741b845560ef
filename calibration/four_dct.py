"""A patient's own 4DCT: phase volumes -> breathing states, phase-to-phase registration, the 5D model.

The steps (``breathcast ingest-4dct`` and ``breathcast plan-4dct``, docs/four-dct.md):

1. read the phase series (:func:`breathcast.io.four_dct.read_4dct`: one Frame of Reference, one geometry, no
   phase missing), reorient each into the canonical frame, and resample them into the lung-centred model box
   of the end-exhale phase (the box the engine places on that plan, :func:`breathcast.model_box.model_box_volume`);
2. the breathing state of every phase: from the breathing recording made with the 4DCT when there is one
   (:func:`states_from_recording`: the calibrated surrogate averaged over each phase bin, the daemon's amplitude
   scale, rate on the recording's clock), else measured in the images (:func:`phase_states`: the lung volume,
   scaled so that the patient's end-exhale phase is amplitude 0 and end-inhale 1; the branch, inhale where the
   lungs fill towards the next phase, gives the rate its sign). Recorded with its source and the lung volumes;
3. register every phase to the end-exhale reference (:func:`register_phase`, sliding-aware demons): the
   thoracic cavity is registered on its own (the lungs slide along the pleura) and the rest of the body on
   the whole image, blended across the cavity's edge;
4. fit the 5D model (Low et al.; :func:`breathcast.calibration.motion_model.fit_five_d`) to those fields.

Registration was chosen by measurement on simulated 4DCT with known truth (64³ model box, 2 cores): plain
demons 1.13 mm mean lung end-point error at end-inhale in 1-2 s, itk-elastix B-spline (15 and 25 mm control
points) 1.35 and 1.10 mm in 55 and 36 s, the sliding-aware demons here 0.85-0.88 mm in ~2-4 s.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage

import breathcast
from breathcast.calibration.motion_model import FiveDModel, FitSource, RegistrationConfig, fit_five_d, register_pair
from breathcast.calibration.readers import RawRecording
from breathcast.calibration.surrogate import CalibrationSettings, calibrate_surrogate
from breathcast.canonical import resample_onto, to_canonical
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume, hu_to_unit
from breathcast.io.dataset import write_patient
from breathcast.io.four_dct import PhaseSeries, read_4dct
from breathcast.model_box import MODEL_BOX_MM, model_box_volume, resample_to_spacing
from breathcast.segmentation import ThoraxSegmentation, segment_thorax, sliding_weight
from breathcast.sim.anatomy import LUNG_LABELS
from breathcast.warp import jacobian_determinant

__all__ = [
    "DATASET_KIND",
    "SLIDING_REGISTRATION",
    "PhaseStates",
    "lung_volume_ml",
    "phase_states",
    "states_from_recording",
    "register_phase",
    "remove_folds",
    "register_phases",
    "FourDCTInput",
    "read_4dct_into_box",
    "ingest_4dct",
    "fit_4dct_five_d",
]

DATASET_KIND = "4dct"

#: Demons settings of the sliding-aware registration (a smoother field than the free-breathing default: the
#: cavity's images carry little texture near its edge).
SLIDING_REGISTRATION = RegistrationConfig(field_sigma=2.5)
#: Width of the blend between the cavity's and the body's fields across the cavity's edge, mm. A 4 mm step on a
#: 6 mm grid folded up to 254 voxels of a simulated phase; 8 mm folded 12 with the same or lower lung error.
BLEND_WIDTH_MM = 8.0


@dataclass(frozen=True)
class PhaseStates:
    """The breathing state of each phase, measured in its images.

    Args:
        phase_percent: (P,) percent of the cycle from end-inhale, ascending.
        amplitude: (P,) 0 at the patient's end-exhale phase, 1 at end-inhale (by lung volume).
        rate: (P,) 1/s, from the amplitude around the cycle and ``period_s``; > 0 on the inhale branch.
        branch: per phase "inhale", "exhale", "end-inhale" or "end-exhale".
        lung_volume_ml: (P,) what the amplitude was measured from.
        period_s: the breathing period the rate assumes (images) or the recording's median period.
        reference: index of the end-exhale phase (the registration reference).
        amplitude_source: what the amplitude and rate were measured from.
    """

    phase_percent: np.ndarray
    amplitude: np.ndarray
    rate: np.ndarray
    branch: tuple[str, ...]
    lung_volume_ml: np.ndarray
    period_s: float
    reference: int
    amplitude_source: str = "lung volume in the images: end-exhale phase 0, end-inhale phase 1; rate over the assumed period"

    def to_dict(self) -> dict[str, Any]:
        return {
            "amplitude_source": self.amplitude_source,
            "phase_percent": self.phase_percent.tolist(),
            "amplitude": self.amplitude.tolist(),
            "rate_per_s": self.rate.tolist(),
            "branch": list(self.branch),
            "lung_volume_ml": self.lung_volume_ml.tolist(),
            "period_s": self.period_s,
            "reference_phase": int(self.reference),
        }


def lung_volume_ml(labels: np.ndarray, grid: Grid) -> float:
    """Volume of the lung labels, ml."""
    return float(np.isin(labels, LUNG_LABELS).sum() * np.prod(grid.spacing) / 1000.0)


def phase_states(phase_percent: np.ndarray, lung_ml: np.ndarray, period_s: float) -> PhaseStates:
    """Amplitude, rate and branch of each phase from its lung volume.

    Args:
        phase_percent: (P,) ascending phase percents of one cycle.
        lung_ml: (P,) lung volume of each phase, ml.
        period_s: the breathing period, s (the rate's time scale; 4DCT phases carry no clock).

    Example:
        >>> s = phase_states(np.array([0.0, 25.0, 50.0, 75.0]), np.array([3300.0, 3150.0, 3000.0, 3100.0]), 4.0)
        >>> s.amplitude.round(2).tolist(), s.branch, s.reference
        ([1.0, 0.5, 0.0, 0.33], ('end-inhale', 'exhale', 'end-exhale', 'inhale'), 2)
    """
    percent = np.asarray(phase_percent, dtype=np.float64)
    volume = np.asarray(lung_ml, dtype=np.float64)
    if period_s <= 0:
        raise BreathcastError(f"the breathing period must be positive, got {period_s} s")
    span = float(volume.max() - volume.min())
    if span <= 0:
        raise BreathcastError("every phase has the same lung volume: the 4DCT shows no breathing")
    amplitude = (volume - volume.min()) / span
    low, high = int(np.argmin(volume)), int(np.argmax(volume))
    step_s = period_s * np.diff(np.r_[percent, percent[0] + 100.0]) / 100.0  # phase k -> k+1, around the ring
    rate = (np.roll(amplitude, -1) - np.roll(amplitude, 1)) / (step_s + np.roll(step_s, 1))
    branch = _branches(amplitude, rate)
    rate[[low, high]] = 0.0
    return PhaseStates(percent, amplitude, rate, branch, volume, float(period_s), low)


def _branches(amplitude: np.ndarray, rate: np.ndarray) -> tuple[str, ...]:
    low, high = int(np.argmin(amplitude)), int(np.argmax(amplitude))
    return tuple(
        "end-exhale" if k == low else "end-inhale" if k == high else "inhale" if rate[k] > 0 else "exhale"
        for k in range(len(amplitude))
    )


def states_from_recording(
    recording: RawRecording,
    phase_percent: np.ndarray,
    lung_ml: np.ndarray,
    settings: CalibrationSettings = CalibrationSettings(),
) -> PhaseStates:
    """Amplitude and rate of each phase bin from the breathing recording made with the 4DCT (e.g. RPM ``.vxp``).

    The recording is calibrated as the daemon's live trace is (:func:`calibrate_surrogate`: 0 typical end-exhale,
    1 typical end-inhale), so the per-patient models and the live window share one amplitude scale. Each bin
    takes the mean amplitude and rate (1/s, from the recording's clock) of the samples whose phase column
    (radians, 0 = end-inhale, as RPM writes it) lies within half a bin of the bin's phase, restricted to the
    X-ray-on samples when the recording has that column.

    Args:
        recording: with a ``phase`` column (radians).
        phase_percent: (P,) the bins, ascending.
        lung_ml: (P,) the phases' lung volumes (kept in the report beside the recording's amplitude).
        settings: the surrogate calibration's settings.

    Raises:
        BreathcastError: no phase column, or a bin with no samples (naming it).
    """
    where = recording.path or "recording"
    if "phase" not in recording.columns:
        raise BreathcastError(f"{where}: the recording has no phase column; the 4DCT's phase bins cannot be matched to it")
    result = calibrate_surrogate(recording, settings)
    phase = np.unwrap(np.asarray(recording.columns["phase"], dtype=np.float64))
    percent_at = (100.0 * np.interp(result.time_s, recording.time_s, phase) / (2.0 * np.pi)) % 100.0
    rate_at = np.gradient(result.amplitude, result.time_s)
    used = np.ones(result.time_s.shape, dtype=bool)
    xray = recording.columns.get("xray_on")
    if xray is not None and np.any(xray):
        used = np.interp(result.time_s, recording.time_s, np.asarray(xray, dtype=np.float64)) > 0.5
    percent = np.asarray(phase_percent, dtype=np.float64)
    half = 50.0 / len(percent)
    amplitude, rate = np.zeros(len(percent)), np.zeros(len(percent))
    for k, p in enumerate(percent):
        distance = np.abs((percent_at - p + 50.0) % 100.0 - 50.0)
        inside = used & (distance <= half)
        if not inside.any():
            raise BreathcastError(f"{where}: no samples in the {p:g}% phase bin; is it the recording of this 4DCT?")
        amplitude[k], rate[k] = float(result.amplitude[inside].mean()), float(rate_at[inside].mean())
    period = result.summary().get("period_s") or float("nan")
    states = PhaseStates(percent, amplitude, rate, _branches(amplitude, rate), np.asarray(lung_ml, dtype=np.float64),
                         float(period), int(np.argmin(amplitude)),
                         f"breathing recording {where} (calibrated surrogate, mean over each phase bin)")  # fmt: skip
    return states


def _cavity_image(hu: np.ndarray, seg: ThoraxSegmentation) -> np.ndarray:
    """The CT in [0, 1] inside the (one-voxel dilated) thoracic cavity, 0 outside: the lungs' own image."""
    return np.where(ndimage.binary_dilation(seg.cavity, iterations=1), hu_to_unit(hu), 0.0).astype(np.float32)


def register_phase(
    fixed_hu: np.ndarray,
    moving_hu: np.ndarray,
    grid: Grid,
    fixed_seg: ThoraxSegmentation | None = None,
    moving_seg: ThoraxSegmentation | None = None,
    config: RegistrationConfig = SLIDING_REGISTRATION,
) -> np.ndarray:
    """Sliding-aware deformable registration: ``fixed(x) ≈ moving(x + u(x))``.

    The cavity (lungs and what moves with the diaphragm) and the whole body are registered separately and
    blended with the fixed image's :func:`~breathcast.segmentation.sliding_weight` (:data:`BLEND_WIDTH_MM`), so
    the chest wall and spine do not drag with the lungs; the few voxels the blend folds are smoothed
    (:func:`remove_folds`).

    Args:
        fixed_hu, moving_hu: (Z, Y, X) HU on ``grid`` (canonical).
        grid: both images' grid.
        fixed_seg, moving_seg: their segmentations (computed when None).
        config: the demons settings of both registrations.

    Returns:
        (3, Z, Y, X) float32 voxels (dz, dy, dx), pull-back.
    """
    fixed_seg = fixed_seg or segment_thorax(Volume(fixed_hu, grid))
    moving_seg = moving_seg or segment_thorax(Volume(moving_hu, grid))
    inside = register_pair(_cavity_image(fixed_hu, fixed_seg), _cavity_image(moving_hu, moving_seg), grid, config)
    body = register_pair(hu_to_unit(fixed_hu), hu_to_unit(moving_hu), grid, config)
    weight = sliding_weight(fixed_seg, BLEND_WIDTH_MM)[None]
    return remove_folds((weight * inside + (1.0 - weight) * body).astype(np.float32))


def remove_folds(u: np.ndarray, iterations: int = 30) -> np.ndarray:
    """``u`` with its folded voxels (det(I + ∇u) <= 0) smoothed away: where it folds, and 2 voxels around,
    the field is replaced by its Gaussian-smoothed self (σ 1 voxel), until nothing folds (or ``iterations``).

    Args:
        u: (3, Z, Y, X) float32 voxels.

    Returns:
        A new field; ``u`` itself when it does not fold.
    """
    out = u
    for _ in range(iterations):
        folded = jacobian_determinant(out) <= 0
        if not folded.any():
            break
        region = ndimage.binary_dilation(folded, iterations=2)
        smooth = np.stack([ndimage.gaussian_filter(c, 1.0) for c in out])
        out = out.copy() if out is u else out
        out[:, region] = smooth[:, region]
    return out


def register_phases(
    images_hu: np.ndarray,
    grid: Grid,
    reference: int,
    segmentations: list[ThoraxSegmentation] | None = None,
    config: RegistrationConfig = SLIDING_REGISTRATION,
    on_pair: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Register every phase to the reference phase.

    Args:
        images_hu: (P, Z, Y, X) HU on ``grid``.
        reference: the reference phase (its field is zero).
        segmentations: each phase's, when already computed.
        on_pair: called with (phase, seconds) after each registration (a progress bar).

    Returns:
        ((P, 3, Z, Y, X) float32 voxels, pull-back from the reference to each phase; seconds per pair).
    """
    segs = segmentations or [segment_thorax(Volume(image, grid)) for image in images_hu]
    fields = np.zeros((len(images_hu), 3, *grid.shape), dtype=np.float32)
    seconds = []
    for q, image in enumerate(images_hu):
        if q == reference:
            continue
        start = time.perf_counter()
        fields[q] = register_phase(image, images_hu[reference], grid, segs[q], segs[reference], config)
        seconds.append(time.perf_counter() - start)
        if on_pair:
            on_pair(q, seconds[-1])
    return fields, seconds


@dataclass(frozen=True)
class FourDCTInput:
    """A 4DCT in the model box: what ingest stores and what the per-patient models are fitted on.

    Args:
        images_hu: (P, D, D, D) float32 HU, phases in the lung-centred model box of the end-exhale phase.
        grid: the box (canonical, the series' Frame of Reference).
        states: the measured breathing states.
        segmentations: each phase's, on ``grid``.
        phases: the series as read (identity, source geometry).
    """

    images_hu: np.ndarray
    grid: Grid
    states: PhaseStates
    segmentations: list[ThoraxSegmentation]
    phases: list[PhaseSeries] = field(default_factory=list)


def read_4dct_into_box(
    folder: Path | str,
    grid_size: int = 64,
    phases: dict[str, float] | None = None,
    period_s: float = 4.0,
    extent_mm: tuple[float, float, float] = MODEL_BOX_MM,
    recording: RawRecording | None = None,
) -> FourDCTInput:
    """Read a 4DCT folder into the end-exhale phase's model box, with each phase's breathing state.

    Args:
        folder: the phase series (see :func:`breathcast.io.four_dct.read_4dct`).
        grid_size: D of the D³ model box.
        phases: optional series -> percent mapping.
        period_s: breathing period for the rates from the images, s (unused with a recording).
        extent_mm: the box's (x, y, z) size.
        recording: the breathing recording made with the 4DCT (:func:`states_from_recording`); None: the
            states come from the images (:func:`phase_states`).

    Raises:
        BreathcastError: the reader's refusals, a plan check's (no lungs, odd HU, front-back contradiction),
            or a 4DCT without breathing.
    """
    series = read_4dct(folder, phases)
    canonical = [to_canonical(p.series.volume)[0] for p in series]
    # The end-exhale phase is not known before the lungs are measured: measure on a 4 mm canonical copy.
    coarse = [resample_to_spacing(v, 4.0) for v in canonical]
    coarse_ml = np.array([lung_volume_ml(segment_thorax(v).labels, v.grid) for v in coarse])
    percent = np.array([p.percent for p in series])
    states = phase_states(percent, coarse_ml, period_s) if recording is None else states_from_recording(recording, percent, coarse_ml)
    box_ref, _ = model_box_volume(canonical[states.reference], (grid_size,) * 3, extent_mm)
    grid = box_ref.grid
    images = np.stack([resample_onto(v, grid).array for v in canonical]).astype(np.float32)
    segs = [segment_thorax(Volume(image, grid)) for image in images]
    return FourDCTInput(images, grid, states, segs, series)


def ingest_4dct(
    folder: Path | str,
    out: Path | str,
    patient_id: str,
    grid_size: int = 64,
    phases: dict[str, float] | None = None,
    period_s: float = 4.0,
    recording: RawRecording | None = None,
) -> tuple[Path, FourDCTInput]:
    """A 4DCT folder -> one dataset patient of kind ``4dct`` (one scan per phase, in the model box).

    Every slice of a phase gets the phase's amplitude and rate; ``slice_times_s`` is the phase's time in the
    cycle. The phases' labels are their segmentations. Nothing is written when anything is refused.

    Returns:
        (the patient's folder, what was read).
    """
    data = read_4dct_into_box(folder, grid_size, phases, period_s, recording=recording)
    states, nz = data.states, data.grid.shape[0]
    scans = []
    for k, phase in enumerate(data.phases):
        scans.append({
            "image_hu": data.images_hu[k],
            "labels": data.segmentations[k].labels,
            "amplitude": np.full(nz, states.amplitude[k]),
            "rate": np.full(nz, states.rate[k]),
            "slice_times_s": np.full(nz, states.period_s * phase.percent / 100.0),
            "phase_percent": phase.percent,
            "branch": states.branch[k],
            "series_instance_uid": phase.series.identity.series_instance_uid,
            "series_description": phase.series.identity.series_description,
        })  # fmt: skip
    cycle_t = states.period_s * states.phase_percent / 100.0
    first = data.phases[0].series.identity
    metadata = {
        "ingest_4dct": {
            "breathcast_version": breathcast.__version__,
            "source": str(Path(folder).resolve()),
            "frame_of_reference_uid": first.frame_of_reference_uid,
            "study_instance_uid": first.study_instance_uid,
            "source_grid": dataclasses.asdict(data.phases[0].series.volume.grid),
            "model_box": {"anchor": "lungs of the end-exhale phase", "extent_mm": list(MODEL_BOX_MM), "grid": dataclasses.asdict(data.grid)},
            "phase_from": sorted({p.percent_from for p in data.phases}),
            "states": states.to_dict(),
        }
    }
    path = write_patient(out, patient_id, data.grid, scans, cycle_t, states.amplitude, metadata=metadata, kind=DATASET_KIND)
    return path, data


def fit_4dct_five_d(
    data: FourDCTInput,
    patient_id: str,
    fields: np.ndarray,
    seconds_per_pair: list[float],
    exclude: tuple[int, ...] = (),
) -> FiveDModel:
    """The 5D model of a registered 4DCT (each phase one state), leaving out the phases in ``exclude``."""
    keep = [k for k in range(len(data.images_hu)) if k not in exclude]
    nz = data.grid.shape[0]
    amplitude = np.repeat(data.states.amplitude[keep, None], nz, axis=1)
    rate = np.repeat(data.states.rate[keep, None], nz, axis=1)
    extra = {
        "data": "4dct",
        "phases": [float(data.states.phase_percent[k]) for k in keep],
        "states": data.states.to_dict(),
        "registration": {"method": "sliding-aware SimpleITK FastSymmetricForcesDemons (cavity and body, blended)",
                         "config": dataclasses.asdict(SLIDING_REGISTRATION),
                         "seconds_per_pair_mean": float(np.mean(seconds_per_pair)) if seconds_per_pair else 0.0},
    }  # fmt: skip
    return fit_five_d(fields[keep], amplitude, rate, data.grid, patient_id, FitSource.REGISTRATION, data.states.reference, extra)
