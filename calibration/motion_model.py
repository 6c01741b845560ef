"""The per-patient 5D motion model of Low et al. (the paper's baseline), from registrations or ground truth.

Per voxel, u(x; A, Ȧ) = offset(x) + α(x)·A + β(x)·Ȧ, fitted by least squares over a patient's free-breathing
scans with each slice's own amplitude A and rate Ȧ (1/s) — the scans are fast helical, so every slice was
acquired at its own breathing state (:func:`breathcast.state_model.fit_state_model` with
:data:`~breathcast.state_model.LINEAR_5D_TERMS`).

The fields it is fitted to come from one of two sources:

* ``registration``: every scan k is registered to a reference scan R with SimpleITK (multi-resolution
  fast symmetric-forces demons, :func:`register_pair`): ``scan_k(x) ≈ R(x + u_k(x))``. The reference is the
  scan with the lowest mean amplitude (end-exhale is the most reproducible state); its own field is zero.
* ``ground-truth``: the simulator's true fields from the rest anatomy (the model's upper bound).

Either way the model gives fields *from its reference frame* to a breathing state. A prediction from a
moving scan m to a wanted state f composes through the reference, as
:func:`breathcast.sim.simulator.pair_field` does: ``u = compose(invert(u(m's state)), u(f's state))``.

Conventions: fields are (3, Z, Y, X) float32, voxels (dz, dy, dx), pull-back, inside the code. SimpleITK
returns displacements in mm along patient LPS in physical space; :func:`field_from_lps_mm` turns them into
ours. The saved model stores its coefficients in mm along LPS (:func:`field_to_lps_mm` per term), as
everything that leaves the process does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import breathcast
from breathcast.checksums import sha256_file
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, field_from_lps_mm, field_to_lps_mm
from breathcast.state_model import LINEAR_5D_TERMS, StateModel, fit_state_model
from breathcast.warp import compose, invert

if TYPE_CHECKING:  # the evaluation's patient type; calibration does not import training at run time
    from breathcast.training.data import PatientData

__all__ = [
    "FitSource",
    "RegistrationConfig",
    "register_pair",
    "FiveDModel",
    "fit_five_d",
    "fit_five_d_patient",
    "FiveDPredictor",
    "MODEL_KIND",
    "reference_scan_index",
    "dataset_rates",
    "fit_five_d_dataset_patient",
]

log = logging.getLogger(__name__)

MODEL_KIND = "linear5d"
_MANIFEST = "manifest.json"
_COEFFICIENTS = "coefficients.npz"
_FORMAT_VERSION = 1


class FitSource(str, Enum):
    """Where the fields a 5D model is fitted to come from."""

    REGISTRATION = "registration"
    GROUND_TRUTH = "ground-truth"


# --- registration (SimpleITK) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationConfig:
    """Multi-resolution fast symmetric-forces demons (SimpleITK), one level per shrink factor.

    Args:
        shrink_factors: per level, coarse to fine (1 = full resolution).
        smoothing_sigmas: per level, Gaussian smoothing of the images before shrinking, voxels of the full grid.
        iterations: demons iterations per level.
        field_sigma: Gaussian smoothing of the displacement field after every iteration, voxels of the level
            (the demons regulariser).
        update_sigma: Gaussian smoothing of each update, voxels of the level (0 = none).
        max_step_voxels: largest update length per iteration, voxels.
        threads: SimpleITK threads (None: SimpleITK's default, all cores).
    """

    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: tuple[int, ...] = (60, 40, 20)
    field_sigma: float = 1.5
    update_sigma: float = 0.0
    max_step_voxels: float = 1.0
    threads: int | None = None

    def __post_init__(self) -> None:
        n = len(self.shrink_factors)
        if n == 0 or len(self.smoothing_sigmas) != n or len(self.iterations) != n:
            raise BreathcastError(
                f"shrink_factors, smoothing_sigmas and iterations need one value per level, got {self.shrink_factors}, "
                f"{self.smoothing_sigmas}, {self.iterations}"
            )
        if min(self.shrink_factors) < 1 or min(self.iterations) < 1 or self.field_sigma < 0 or self.max_step_voxels <= 0:
            raise BreathcastError("registration settings must be positive (shrink factors, iterations, step) and field_sigma >= 0")


def _to_sitk(array: np.ndarray, grid: Grid):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))  # [z, y, x] -> (x, y, z)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(tuple(grid.direction_matrix.ravel()))  # row-major, columns = index axes, as ITK
    return image


def register_pair(fixed: np.ndarray, moving: np.ndarray, grid: Grid, config: RegistrationConfig = RegistrationConfig()) -> np.ndarray:
    """Deformable registration of ``moving`` to ``fixed`` (SimpleITK demons, multi-resolution).

    Args:
        fixed: (Z, Y, X) image on ``grid`` (e.g. CT scaled to [0, 1]).
        moving: (Z, Y, X) image on the same grid, same intensity scale.
        grid: where both images are.
        config: the demons pyramid.

    Returns:
        (3, Z, Y, X) float32 pull-back displacement, voxels (dz, dy, dx): ``fixed(x) ≈ moving(x + u(x))``.
    """
    import SimpleITK as sitk

    fixed = np.asarray(fixed, dtype=np.float32)
    moving = np.asarray(moving, dtype=np.float32)
    if fixed.shape != grid.shape or moving.shape != grid.shape:
        raise BreathcastError(f"registration images must both be {grid.shape} (the grid), got {fixed.shape} and {moving.shape}")
    if not (np.all(np.isfinite(fixed)) and np.all(np.isfinite(moving))):
        raise BreathcastError("registration images hold NaN or infinite values")
    if config.threads is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(config.threads))
    fixed_image, moving_image = _to_sitk(fixed, grid), _to_sitk(moving, grid)
    displacement = None  # sitkVectorFloat64 image, mm LPS, on the current level's grid
    for shrink, sigma, iterations in zip(config.shrink_factors, config.smoothing_sigmas, config.iterations):
        f_level, m_level = fixed_image, moving_image
        if sigma > 0:
            sigma_mm = [sigma * s for s in grid.spacing]
            f_level = sitk.SmoothingRecursiveGaussian(f_level, sigma_mm)
            m_level = sitk.SmoothingRecursiveGaussian(m_level, sigma_mm)
        if shrink > 1:
            f_level = sitk.Shrink(f_level, [shrink] * 3)
            m_level = sitk.Shrink(m_level, [shrink] * 3)
        if displacement is None:
            initial = sitk.Image(f_level.GetSize(), sitk.sitkVectorFloat64, 3)
            initial.CopyInformation(f_level)
        else:  # the previous level's field, resampled onto this level's grid (mm values need no scaling)
            initial = sitk.Resample(displacement, f_level, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(iterations))
        demons.SetSmoothDisplacementField(config.field_sigma > 0)
        demons.SetStandardDeviations(float(config.field_sigma))
        demons.SetSmoothUpdateField(config.update_sigma > 0)
        if config.update_sigma > 0:
            demons.SetUpdateFieldStandardDeviations(float(config.update_sigma))
        demons.SetMaximumUpdateStepLength(float(config.max_step_voxels))
        demons.SetUseImageSpacing(True)
        displacement = demons.Execute(f_level, m_level, initial)
    if displacement.GetSize() != fixed_image.GetSize():
        displacement = sitk.Resample(displacement, fixed_image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    # SimpleITK: array [z, y, x, c], components (x, y, z) in mm along LPS; the transform maps fixed points
    # into the moving image, which is our pull-back.
    lps_mm = sitk.GetArrayFromImage(displacement).transpose(3, 0, 1, 2)
    return field_from_lps_mm(lps_mm.astype(np.float32), grid)


# --- the model -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FiveDModel:
    """A patient's fitted 5D motion model: u(x) = offset + α·A + β·Ȧ per voxel, from its reference frame.

    Args:
        coefficients: (K, 3, Z, Y, X) float32, voxels (dz, dy, dx) of ``grid`` per unit of each term
            (offset: voxels; α: voxels per unit amplitude; β: voxels per (1/s), i.e. voxel·s).
        terms: K (i, j) exponent pairs, term k = A^i · Ȧ^j (:data:`LINEAR_5D_TERMS`).
        grid: the grid the fields live on.
        patient_id: whose model it is.
        source: what the fields were (:class:`FitSource` value).
        reference_scan: index of the reference scan (registration), or -1 (ground truth: the rest anatomy).
        residual_rms_voxels: RMS fit residual over the fitting fields, voxels.
        fitted_from: what it was fitted from (scan count, amplitude and rate ranges, registration settings, times).
    """

    coefficients: np.ndarray
    terms: tuple[tuple[int, int], ...]
    grid: Grid
    patient_id: str
    source: str
    reference_scan: int = -1
    residual_rms_voxels: float = 0.0
    fitted_from: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        state = StateModel(self.coefficients, self.terms, self.residual_rms_voxels)  # validates shape and terms
        if state.shape != self.grid.shape:
            raise BreathcastError(f"5D model coefficients are on {state.shape}; the grid says {self.grid.shape}")
        object.__setattr__(self, "coefficients", state.coefficients)
        object.__setattr__(self, "terms", state.terms)
        object.__setattr__(self, "source", FitSource(self.source).value)

    @property
    def state_model(self) -> StateModel:
        return StateModel(self.coefficients, self.terms, self.residual_rms_voxels)

    def displacement(self, amplitude: np.ndarray | float, rate: np.ndarray | float) -> np.ndarray:
        """(3, Z, Y, X) float32 voxels from the reference frame to the per-slice state (A (Z,), Ȧ (Z,) 1/s)."""
        return self.state_model.displacement(amplitude, rate)

    def predict_pair(self, moving_state: tuple[np.ndarray, np.ndarray], fixed_state: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """(3, Z, Y, X) float32 voxels from a scan at ``moving_state`` to ``fixed_state`` (each (A, Ȧ), (Z,)).

        Through the reference, as :func:`breathcast.sim.simulator.pair_field`: ``compose(invert(u_m), u_f)``.
        """
        u_m = self.displacement(*moving_state)
        u_f = self.displacement(*fixed_state)
        return compose(invert(u_m), u_f)

    # -- files ---------------------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """What :meth:`save` writes to ``manifest.json`` (without the file hashes)."""
        return {
            "model_kind": MODEL_KIND,
            "format_version": _FORMAT_VERSION,
            "breathcast_version": breathcast.__version__,
            "patient_id": self.patient_id,
            "source": self.source,
            "reference_scan": self.reference_scan,
            "terms": [list(t) for t in self.terms],
            "term_names": [_term_name(t) for t in self.terms],
            "grid": dataclasses.asdict(self.grid),
            "coefficients": {
                "file": _COEFFICIENTS,
                "array": "coefficients_lps_mm",
                "shape": [len(self.terms), 3, *self.grid.shape],
                "dtype": "float32",
                "units": "mm along patient LPS, components (x, y, z), per unit of each term (amplitude "
                "dimensionless, rate 1/s); pull-back from the reference frame: state(x) = reference(x + u(x))",
            },
            "residual_rms_voxels": self.residual_rms_voxels,
            "fitted_from": self.fitted_from,
        }

    def save(self, out_dir: Path) -> Path:
        """Write ``coefficients.npz`` and ``manifest.json`` (with the npz's sha256) into ``out_dir``.

        Each file is written to a temporary name and renamed into place, the manifest last, so a reader never
        sees a manifest without its coefficients. Returns the manifest's path.
        """
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BreathcastError(f"cannot create {out}: {exc.strerror or exc}") from None
        lps = np.stack([field_to_lps_mm(c, self.grid) for c in self.coefficients])
        npz, manifest_path = out / _COEFFICIENTS, out / _MANIFEST
        tmp_npz, tmp_manifest = out / f".{_COEFFICIENTS}.tmp", out / f".{_MANIFEST}.tmp"
        try:
            with open(tmp_npz, "wb") as handle:
                np.savez_compressed(handle, coefficients_lps_mm=lps.astype(np.float32))
            manifest = {**self.manifest(), "files": {_COEFFICIENTS: sha256_file(tmp_npz)}}
            tmp_manifest.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
            os.replace(tmp_npz, npz)
            os.replace(tmp_manifest, manifest_path)
        except OSError as exc:
            for tmp in (tmp_npz, tmp_manifest):
                tmp.unlink(missing_ok=True)
            raise BreathcastError(f"cannot write the 5D model to {out}: {exc.strerror or exc}") from None
        return manifest_path

    @classmethod
    def load(cls, model_dir: Path) -> FiveDModel:
        """Read a model written by :meth:`save`; checks the kind, the version and the coefficients' sha256."""
        folder = Path(model_dir)
        manifest_path = folder / _MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise BreathcastError(f"{manifest_path}: not a readable 5D model manifest ({exc})") from None
        if manifest.get("model_kind") != MODEL_KIND:
            raise BreathcastError(f"{manifest_path}: not a {MODEL_KIND} model (model_kind {manifest.get('model_kind')!r})")
        if int(manifest.get("format_version", -1)) > _FORMAT_VERSION:
            raise BreathcastError(f"{manifest_path}: format version {manifest['format_version']} is newer than this breathcast reads")
        npz = folder / _COEFFICIENTS
        if not npz.is_file():
            raise BreathcastError(f"{npz}: file is missing")
        expected = (manifest.get("files") or {}).get(_COEFFICIENTS)
        if expected != sha256_file(npz):
            raise BreathcastError(f"{npz}: sha256 does not match {manifest_path}; the model is damaged or was half-written")
        try:
            grid_data = manifest["grid"]
            grid = Grid(
                shape=tuple(grid_data["shape"]),
                spacing=tuple(grid_data["spacing"]),
                origin=tuple(grid_data["origin"]),
                direction=tuple(tuple(r) for r in grid_data["direction"]),
                frame_of_reference_uid=grid_data.get("frame_of_reference_uid", ""),
            )
            with np.load(npz) as data:
                lps = np.asarray(data["coefficients_lps_mm"], dtype=np.float32)
            coefficients = np.stack([field_from_lps_mm(c, grid) for c in lps])
            return cls(
                coefficients=coefficients,
                terms=tuple(tuple(t) for t in manifest["terms"]),
                grid=grid,
                patient_id=str(manifest["patient_id"]),
                source=manifest["source"],
                reference_scan=int(manifest.get("reference_scan", -1)),
                residual_rms_voxels=float(manifest.get("residual_rms_voxels", 0.0)),
                fitted_from=dict(manifest.get("fitted_from") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BreathcastError(f"{manifest_path}: malformed 5D model ({type(exc).__name__}: {exc})") from None


def _term_name(term: tuple[int, int]) -> str:
    i, j = term
    parts = [p for p in ("A" if i == 1 else f"A^{i}" if i else "", "dA/dt" if j == 1 else f"(dA/dt)^{j}" if j else "") if p]
    return "*".join(parts) or "offset"


def _range(values: np.ndarray) -> list[float]:
    return [float(np.min(values)), float(np.max(values))]


def fit_five_d(
    fields: np.ndarray,
    amplitude: np.ndarray,
    rate: np.ndarray,
    grid: Grid,
    patient_id: str,
    source: FitSource | str,
    reference_scan: int = -1,
    extra: dict[str, Any] | None = None,
) -> FiveDModel:
    """Fit u = offset + α·A + β·Ȧ per voxel to a patient's fields, each slice with its own state.

    Args:
        fields: (Q, 3, Z, Y, X) voxels, pull-back from the model's reference frame to each scan.
        amplitude: (Q, Z) per-slice amplitude of each scan, dimensionless.
        rate: (Q, Z) per-slice rate, 1/s.
        grid: the fields' grid.
        patient_id, source, reference_scan: recorded in the model.
        extra: more to record under ``fitted_from``.

    Example:
        >>> g = Grid((2, 1, 1), (1.0, 1.0, 1.0))
        >>> a = np.array([[0.0, 0.2], [1.0, 0.8], [0.5, 0.5]]); r = np.array([[0.1, 0.0], [0.0, -0.2], [0.3, 0.3]])
        >>> u = np.zeros((3, 3, 2, 1, 1), np.float32); u[:, 0, :, 0, 0] = 4.0 * a + 1.0 * r  # dz = 4 A + Ȧ
        >>> m = fit_five_d(u, a, r, g, "p", "ground-truth")
        >>> np.round(m.coefficients[:, 0, :, 0, 0], 4).tolist()  # offset, α, β for dz at the two slices
        [[0.0, 0.0], [4.0, 4.0], [1.0, 1.0]]
    """
    start = time.perf_counter()
    state = fit_state_model(fields, amplitude, rate, LINEAR_5D_TERMS)
    fitted_from = {
        "scans": int(np.asarray(fields).shape[0]),
        "amplitude_range": _range(amplitude),
        "rate_range_per_s": _range(rate),
        "fit_seconds": time.perf_counter() - start,
        **(extra or {}),
    }
    return FiveDModel(state.coefficients, state.terms, grid, patient_id, FitSource(source).value, reference_scan,
                      state.residual_rms, fitted_from)  # fmt: skip


def reference_scan_index(amplitude: np.ndarray) -> int:
    """The scan with the lowest mean per-slice amplitude (end-exhale: the most reproducible state).

    Example:
        >>> reference_scan_index(np.array([[0.5, 0.6], [0.1, 0.0], [0.9, 1.0]]))
        1
    """
    return int(np.argmin(np.asarray(amplitude, dtype=np.float64).mean(axis=1)))


def fit_five_d_patient(
    patient_id: str,
    images: np.ndarray | None,
    amplitude: np.ndarray,
    rate: np.ndarray,
    grid: Grid,
    source: FitSource | str,
    true_fields: np.ndarray | None = None,
    registration: RegistrationConfig = RegistrationConfig(),
    reference_scan: int | None = None,
    progress: bool = False,
) -> tuple[FiveDModel, np.ndarray]:
    """Fit a patient's 5D model from registrations of its scans or from the true fields.

    Args:
        patient_id: recorded in the model.
        images: (K, Z, Y, X) scans on ``grid`` (CT in [0, 1]); needed for ``registration``.
        amplitude: (K, Z) per-slice amplitude; rate: (K, Z) per-slice rate, 1/s.
        grid: the scans' grid.
        source: ``registration`` or ``ground-truth``.
        true_fields: (K, 3, Z, Y, X) voxels from the rest anatomy; needed for ``ground-truth``.
        registration: the demons settings.
        reference_scan: the registration reference (default :func:`reference_scan_index`).
        progress: log each registration.

    Returns:
        (the model, the (K, 3, Z, Y, X) fields it was fitted to).
    """
    source = FitSource(source)
    amplitude = np.asarray(amplitude, dtype=np.float64)
    rate = np.asarray(rate, dtype=np.float64)
    k = amplitude.shape[0]
    if k < len(LINEAR_5D_TERMS):
        raise BreathcastError(f"patient {patient_id}: the 5D model needs at least {len(LINEAR_5D_TERMS)} scans, got {k}")
    extra: dict[str, Any] = {}
    if source is FitSource.GROUND_TRUTH:
        if true_fields is None:
            raise BreathcastError(f"patient {patient_id} has no ground-truth fields; fit the 5D model from registration")
        fields = np.asarray(true_fields, dtype=np.float32)
        reference = -1
    else:
        if images is None:
            raise BreathcastError(f"patient {patient_id}: registration needs the scans' images")
        reference = reference_scan_index(amplitude) if reference_scan is None else int(reference_scan)
        if not 0 <= reference < k:
            raise BreathcastError(f"reference scan {reference} does not exist; patient {patient_id} has {k} scans")
        fields = np.zeros((k, 3, *grid.shape), dtype=np.float32)
        seconds = []
        for q in range(k):
            if q == reference:
                continue
            start = time.perf_counter()
            fields[q] = register_pair(images[q], images[reference], grid, registration)
            seconds.append(time.perf_counter() - start)
            if progress:
                log.info("%s: registered scan %d to reference %d in %.1f s", patient_id, q, reference, seconds[-1])
        extra = {
            "registration": {"method": "SimpleITK FastSymmetricForcesDemons, multi-resolution",
                             "config": dataclasses.asdict(registration),
                             "seconds_per_pair_mean": float(np.mean(seconds)) if seconds else 0.0},
        }  # fmt: skip
    if fields.shape != (k, 3, *grid.shape):
        raise BreathcastError(f"patient {patient_id}: fields have shape {fields.shape}; expected {(k, 3, *grid.shape)}")
    model = fit_five_d(fields, amplitude, rate, grid, patient_id, source, reference, extra)
    return model, fields


# --- the evaluation's predictor ---------------------------------------------------------------------------------


def _per_slice_to(values: np.ndarray, n: int) -> np.ndarray:
    """(K, Z) per-slice values resampled to n slices over the same z extent (slice centres), float64."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[-1] == n:
        return values
    source = (np.arange(values.shape[-1]) + 0.5) / values.shape[-1]
    target = (np.arange(n) + 0.5) / n
    return np.stack([np.interp(target, source, v) for v in values])


def dataset_rates(data_dir: Path, patient_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(amplitude (K, Z), rate (K, Z) 1/s) of a patient's scans, from the dataset's sidecars (no images read)."""
    from breathcast.io.dataset import _per_slice, _read_json, open_dataset

    dataset = open_dataset(Path(data_dir))
    if patient_id not in dataset.patients:
        raise BreathcastError(f"patient {patient_id} is not in {dataset.path}")
    folder = dataset.patient_path(patient_id)
    meta = _read_json(folder / "patient.json")
    n = int(meta["grid"]["shape"][0])
    amplitude, rate = [], []
    for entry in meta.get("scans", []):
        sidecar_path = folder / entry["sidecar"]
        sidecar = _read_json(sidecar_path)
        amplitude.append(_per_slice(sidecar, "amplitude", n, sidecar_path))
        rate.append(_per_slice(sidecar, "rate", n, sidecar_path))
    if not amplitude:
        raise BreathcastError(f"{folder / 'patient.json'}: the patient has no scans")
    return np.stack(amplitude), np.stack(rate)


class FiveDPredictor:
    """The 5D model as an evaluation predictor (``training.evaluate``'s Predictor protocol).

    Per patient, the model is fitted once (:meth:`prepare`, or on first use) from registrations or the
    true fields, using each scan's per-slice amplitude and rate. ``predict(patient, m, b_f)`` composes the
    model's field at scan m's state with its field at the wanted state through the reference.

    The protocol hands the wanted state over as a per-slice amplitude only; the 5D model also needs the rate.
    When ``b_f`` is one of the patient's recorded per-slice traces (as in the evaluation), its recorded rate
    is used — the breathing trace, not the fixed image. Otherwise the rate is taken as 0 (logged once).

    With ``hold_out=True`` (default), the model used for a wanted trace that matches scan j is refitted
    without scan j, so the prediction never rests on the fixed scan's own field. (With registration, the
    reference scan's image is still the model's frame; pairs whose fixed scan is the reference are rare.)

    Args:
        source: ``registration`` or ``ground-truth``.
        states: patient id -> (amplitude (K, Z), rate (K, Z) 1/s); or None to read them from ``data_dir``.
        data_dir: the dataset folder the patients came from (for their per-slice rates).
        cache_dir: where fitted models and their fields are kept (``<cache>/<source>/<patient>/``) and
            found again, so registrations run once; None keeps nothing.
        registration: demons settings.
        hold_out: refit without the scan whose trace is asked for.
        name: row name; default "5D model (<source>)".
    """

    def __init__(
        self,
        source: FitSource | str,
        states: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        data_dir: Path | None = None,
        cache_dir: Path | None = None,
        registration: RegistrationConfig = RegistrationConfig(),
        hold_out: bool = True,
        name: str | None = None,
    ) -> None:
        self.source = FitSource(source)
        self.name = name or f"5D model ({self.source.value})"
        self._states = dict(states or {})
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.registration = registration
        self.hold_out = hold_out
        self._fitted: dict[str, tuple[FiveDModel, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._held_out: dict[tuple[str, int], FiveDModel] = {}
        self._warned = False
        self.fit_seconds: dict[str, float] = {}
        self.info: dict[str, Any] = {"kind": MODEL_KIND, "source": self.source.value, "hold_out_fixed_scan": hold_out,
                                     "registration": dataclasses.asdict(registration) if self.source is FitSource.REGISTRATION else None,
                                     "fit_seconds": self.fit_seconds}  # fmt: skip

    def _patient_states(self, patient: PatientData) -> tuple[np.ndarray, np.ndarray]:
        pid = patient.patient_id
        if pid not in self._states:
            if self.data_dir is None:
                raise BreathcastError(f"{self.name}: no per-slice rates for patient {pid}; give states= or data_dir=")
            self._states[pid] = dataset_rates(self.data_dir, pid)
        amplitude, rate = self._states[pid]
        d = patient.images.shape[1]
        amplitude, rate = _per_slice_to(amplitude, d), _per_slice_to(rate, d)
        if amplitude.shape != patient.amplitude.shape:
            raise BreathcastError(f"{self.name}: patient {pid} has {patient.amplitude.shape[0]} scans; its states hold {amplitude.shape[0]}")
        return amplitude, rate

    def prepare(self, patients: list[PatientData]) -> None:
        """Fit (or load from the cache) every patient's model before any timed prediction."""
        for patient in patients:
            self._fit(patient)

    def _fit(self, patient: PatientData) -> tuple[FiveDModel, np.ndarray, np.ndarray, np.ndarray]:
        pid = patient.patient_id
        if pid in self._fitted:
            return self._fitted[pid]
        amplitude, rate = self._patient_states(patient)
        folder = self.cache_dir / self.source.value / pid if self.cache_dir is not None else None
        fields = None
        if folder is not None and (folder / _MANIFEST).is_file() and (folder / "fields.npy").is_file():
            model = FiveDModel.load(folder)
            fields = np.load(folder / "fields.npy")
            if model.grid.shape != patient.grid.shape or fields.shape[0] != patient.n_scans:
                fields = None  # fitted on another grid or scan set: fit again
        if fields is None:
            start = time.perf_counter()
            model, fields = fit_five_d_patient(
                pid, patient.images, amplitude, rate, patient.grid, self.source,
                true_fields=patient.fields, registration=self.registration, progress=True,
            )  # fmt: skip
            self.fit_seconds[pid] = time.perf_counter() - start
            log.info("%s: fitted for %s in %.1f s", self.name, pid, self.fit_seconds[pid])
            if folder is not None:
                model.save(folder)
                tmp = folder / ".fields.npy.tmp"
                with open(tmp, "wb") as handle:
                    np.save(handle, fields)
                os.replace(tmp, folder / "fields.npy")
        self._fitted[pid] = (model, fields, amplitude, rate)
        return self._fitted[pid]

    def predict(self, patient: PatientData, moving: int, fixed_amplitude: np.ndarray) -> np.ndarray:
        """(3, D, D, D) float32 voxels from scan ``moving`` to the state of the per-slice trace ``fixed_amplitude``."""
        model, fields, amplitude, rate = self._fit(patient)
        b_f = np.asarray(fixed_amplitude, dtype=np.float64)
        distances = np.abs(amplitude - b_f[None]).max(axis=1)
        match = int(np.argmin(distances))
        if distances[match] <= 1e-4:
            r_f = rate[match]
            if self.hold_out:
                key = (patient.patient_id, match)
                if key not in self._held_out:
                    self._held_out = {key: self._held_out_model(model, fields, amplitude, rate, match)}  # keep one
                model = self._held_out[key]
        else:
            if not self._warned:
                log.warning("%s: the wanted trace is none of the patient's scans; its rate is taken as 0", self.name)
                self._warned = True
            r_f = np.zeros_like(b_f)
        return model.predict_pair((amplitude[moving], rate[moving]), (b_f, r_f))

    def _held_out_model(self, model: FiveDModel, fields: np.ndarray, amplitude: np.ndarray, rate: np.ndarray, scan: int) -> FiveDModel:
        keep = np.arange(fields.shape[0]) != scan
        return fit_five_d(fields[keep], amplitude[keep], rate[keep], model.grid, model.patient_id, model.source,
                          model.reference_scan, {"held_out_scan": scan})  # fmt: skip


def fit_five_d_dataset_patient(
    data_dir: Path,
    patient_id: str,
    out_dir: Path,
    source: FitSource | str = FitSource.REGISTRATION,
    grid_size: int | None = None,
    registration: RegistrationConfig = RegistrationConfig(),
) -> tuple[FiveDModel, Path]:
    """Fit one patient of a dataset folder and save the model into ``out_dir`` (what ``breathcast calibrate five-d`` runs).

    Args:
        data_dir: dataset folder (docs/data-format.md).
        patient_id: the patient.
        out_dir: where :meth:`FiveDModel.save` writes.
        source: ``registration`` or ``ground-truth``.
        grid_size: fit on a grid_size³ grid over the same field of view (None: the scans' grid).
        registration: the demons settings.

    Returns:
        (the model, the manifest's path).
    """
    from breathcast.io.dataset import open_dataset, read_patient
    from breathcast.geometry import hu_to_unit, resample_field, resample_volume

    source = FitSource(source)
    dataset = open_dataset(Path(data_dir))
    if patient_id not in dataset.patients:
        held = ", ".join(dataset.patients[:8]) + (", ..." if len(dataset.patients) > 8 else "")
        raise BreathcastError(f"patient {patient_id} is not in {dataset.path} (it holds {held or 'no patients'})")
    record = read_patient(dataset, patient_id, with_fields=source is FitSource.GROUND_TRUTH)
    grid = record.scans[0].image.grid
    shape = grid.shape if grid_size is None else (int(grid_size),) * 3
    images = np.stack([hu_to_unit(resample_volume(s.image, shape).array if shape != grid.shape else s.image.array) for s in record.scans])
    fields = None
    if source is FitSource.GROUND_TRUTH:
        if any(s.field is None for s in record.scans):
            raise BreathcastError(f"{record.path}: patient {patient_id} has no ground-truth fields; use --source registration")
        fields = np.stack([s.field if shape == grid.shape else resample_field(s.field, grid, shape)[0] for s in record.scans])
    model_grid = grid if shape == grid.shape else grid.with_shape(shape)
    amplitude = _per_slice_to(np.stack([s.amplitude for s in record.scans]), shape[0])
    rate = _per_slice_to(np.stack([s.rate for s in record.scans]), shape[0])
    model, _ = fit_five_d_patient(patient_id, images, amplitude, rate, model_grid, source, true_fields=fields,
                                  registration=registration, progress=True)  # fmt: skip
    model = dataclasses.replace(model, fitted_from={**model.fitted_from, "dataset": str(dataset.path.resolve())})
    return model, model.save(Path(out_dir))
