"""The on-disk 5DCT dataset format (docs/data-format.md): NIfTI volumes and fields, JSON sidecars.

One format for simulated and real data. A dataset is a folder with ``dataset.json`` and one folder per
patient; a patient has ``patient.json``, its scans (``scan_XX.nii.gz`` CT in HU) with per-scan sidecars
(``scan_XX.json``: per-slice times, amplitude, rate) and, when known, label maps and ground-truth fields.

NIfTI stores positions in RAS; this module converts to and from our LPS :class:`~breathcast.geometry.Grid`
in one place (:func:`grid_to_nifti_affine`). Fields are stored as ITK writes displacement fields:
shape (X, Y, Z, 1, 3), components (x, y, z) in mm along patient LPS, NIfTI intent "vector" (1007), as ITK writes them.

Writing is all or nothing: a patient is written into a hidden temporary folder and renamed into place
when complete, and ``dataset.json`` is replaced atomically after every patient.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import breathcast
from breathcast.errors import BreathcastError, DatasetError
from breathcast.geometry import Grid, Volume, field_from_lps_mm, field_to_lps_mm
from breathcast.io.files import atomic_write, temporary_sibling

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ScanRecord",
    "PatientRecord",
    "DatasetIndex",
    "grid_to_nifti_affine",
    "grid_from_nifti_affine",
    "write_volume",
    "read_volume",
    "write_field",
    "read_field",
    "write_patient",
    "open_dataset",
    "read_patient",
    "prepare_output_dir",
    "describe_dataset",
]

FORMAT_NAME = "breathcast-5dct"
FORMAT_VERSION = 1
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def grid_to_nifti_affine(grid: Grid) -> np.ndarray:
    """(4, 4) NIfTI affine (index (i, j, k) -> RAS mm) of a grid; array axes are stored as (x, y, z)."""
    return _LPS_TO_RAS @ grid.affine


def grid_from_nifti_affine(affine: np.ndarray, shape_xyz: tuple[int, int, int]) -> Grid:
    """The :class:`Grid` of a NIfTI image of spatial shape (X, Y, Z) and affine (index -> RAS)."""
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return Grid(
        shape=tuple(int(n) for n in shape_xyz[::-1]),
        spacing=tuple(spacing),
        origin=tuple(lps[:3, 3]),
        direction=tuple(map(tuple, np.round(direction, 9))),
    )


def _save(image: nib.Nifti1Image, path: Path) -> None:
    try:
        nib.save(image, str(path))
    except OSError as exc:
        raise BreathcastError(f"cannot write {path}: {exc.strerror or exc}") from None


def _load(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DatasetError(f"{path}: file is missing")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a corrupt file
        raise DatasetError(f"{path}: not a readable NIfTI file ({exc})") from None


def _hu_int16(hu: np.ndarray) -> np.ndarray:
    """CT in HU rounded to the int16 that NIfTI CT is stored as."""
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def write_volume(volume: Volume, path: Path) -> None:
    """Write a (Z, Y, X) volume as NIfTI; its dtype is kept (use int16 HU for CT, uint8 for labels)."""
    image = nib.Nifti1Image(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), grid_to_nifti_affine(volume.grid))
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    _save(image, path)


def read_volume(path: Path, dtype: type | None = None) -> Volume:
    """Read a NIfTI volume back as a (Z, Y, X) :class:`Volume` (raw stored values, optionally cast)."""
    image = _load(Path(path))
    if image.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {image.shape}")
    array = np.asanyarray(image.dataobj)
    if dtype is not None:
        array = array.astype(dtype)
    return Volume(np.ascontiguousarray(array.transpose(2, 1, 0)), grid_from_nifti_affine(image.affine, image.shape))


def write_field(u_voxels: np.ndarray, grid: Grid, path: Path) -> None:
    """Write a (3, Z, Y, X) voxel-unit field as an ITK-style NIfTI displacement field (mm, LPS)."""
    lps = field_to_lps_mm(u_voxels, grid)
    data = np.ascontiguousarray(lps.transpose(3, 2, 1, 0)[:, :, :, None, :])  # (X, Y, Z, 1, 3)
    image = nib.Nifti1Image(data, grid_to_nifti_affine(grid))
    # Intent VECTOR (1007), not DISPVECT (1006): ITK >= 5.4 reads DISPVECT components as RAS and flips x and y,
    # while it reads VECTOR components as they are (LPS), as it writes them itself.
    image.header.set_intent("vector")
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    _save(image, path)


def read_field(path: Path) -> tuple[np.ndarray, Grid]:
    """Read a field written by :func:`write_field`: ((3, Z, Y, X) float32 voxels, its grid)."""
    image = _load(Path(path))
    if image.ndim != 5 or image.shape[3:] != (1, 3):
        raise DatasetError(f"{path}: expected a displacement field of shape (X, Y, Z, 1, 3), got {image.shape}")
    grid = grid_from_nifti_affine(image.affine, image.shape[:3])
    lps = np.asarray(image.dataobj, dtype=np.float32)[:, :, :, 0, :].transpose(3, 2, 1, 0)
    return field_from_lps_mm(lps, grid), grid


def _write_json(data: dict[str, Any], path: Path) -> None:
    """Write JSON atomically (temporary file + rename)."""
    text = json.dumps(data, indent=1, default=_json_default) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "value"):  # enums
        return value.value
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: file is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc})") from None


@dataclass(frozen=True)
class ScanRecord:
    """One free-breathing scan as stored.

    Args:
        image: CT in HU, (Z, Y, X) float32, on ``image.grid``.
        amplitude: (Z,) per-slice breathing amplitude (dimensionless; the paper's trace b).
        rate: (Z,) per-slice d amplitude / dt, 1/s.
        slice_times_s: (Z,) acquisition time of each slice, s, on the session's trace clock.
        labels: (Z, Y, X) uint8 label map, or None when not stored.
        field: (3, Z, Y, X) float32 voxels, ground-truth pull-back from the patient's reference
            (``image(x) = reference(x + field(x))``), or None when unknown (real data).
    """

    name: str
    image: Volume
    amplitude: np.ndarray
    rate: np.ndarray
    slice_times_s: np.ndarray
    labels: np.ndarray | None = None
    field: np.ndarray | None = None


@dataclass(frozen=True)
class PatientRecord:
    """A patient as stored: scans, optional reference (rest anatomy) and the full session trace."""

    patient_id: str
    path: Path
    scans: list[ScanRecord]
    trace_time_s: np.ndarray
    trace_amplitude: np.ndarray
    reference: Volume | None = None
    reference_labels: np.ndarray | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class DatasetIndex:
    """``dataset.json`` of a dataset folder: which patients it holds and how it was made."""

    path: Path
    kind: str
    patients: list[str]
    metadata: dict[str, Any]

    def patient_path(self, patient_id: str) -> Path:
        return self.path / patient_id


def prepare_output_dir(path: Path) -> Path:
    """Create ``path`` if needed and check that it is a writable directory; one-line error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BreathcastError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise BreathcastError(f"output directory {path} is not writable")
    return path


def write_patient(
    dataset_dir: Path,
    patient_id: str,
    grid: Grid,
    scans: list[dict[str, Any]],
    trace_time_s: np.ndarray,
    trace_amplitude: np.ndarray,
    reference_hu: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    metadata: dict[str, Any] | None = None,
    kind: str = "simulated",
) -> Path:
    """Write one patient into ``dataset_dir`` and register it in ``dataset.json``.

    Args:
        dataset_dir: the dataset folder (created if needed).
        patient_id: folder name of the patient; an existing patient of that id is replaced.
        grid: the grid of every scan.
        scans: per scan a dict with ``image_hu`` (Z, Y, X), ``amplitude``, ``rate``, ``slice_times_s`` (Z,),
            optional ``labels`` (Z, Y, X), ``field`` (3, Z, Y, X) voxels, and any extra sidecar entries.
        trace_time_s, trace_amplitude: (N,) the whole session's breathing trace.
        reference_hu, reference_labels: the rest anatomy, when known (simulated data).
        metadata: stored in ``patient.json`` under "metadata" (e.g. how the simulator made the patient).
        kind: "simulated" or "real"; all patients of a dataset share it.

    Returns:
        The patient's folder.
    """
    dataset_dir = prepare_output_dir(dataset_dir)
    staging = temporary_sibling(dataset_dir / patient_id, directory=True)  # mode from the umask
    try:
        scan_entries = []
        for k, scan in enumerate(scans):
            name = f"scan_{k:02d}"
            n_slices = grid.shape[0]
            per_slice = {key: np.asarray(scan[key], dtype=np.float64) for key in ("amplitude", "rate", "slice_times_s")}
            for key, values in per_slice.items():
                if values.shape != (n_slices,):
                    raise BreathcastError(f"scan {k}: {key} has shape {values.shape}; the grid has {n_slices} slices")
            write_volume(Volume(_hu_int16(scan["image_hu"]), grid), staging / f"{name}.nii.gz")
            entry = {"name": name, "image": f"{name}.nii.gz", "sidecar": f"{name}.json"}
            if scan.get("labels") is not None:
                write_volume(Volume(np.asarray(scan["labels"], dtype=np.uint8), grid), staging / f"{name}_labels.nii.gz")
                entry["labels"] = f"{name}_labels.nii.gz"
            if scan.get("field") is not None:
                write_field(scan["field"], grid, staging / f"{name}_field.nii.gz")
                entry["field"] = f"{name}_field.nii.gz"
            extra = {k2: v for k2, v in scan.items() if k2 not in ("image_hu", "labels", "field", *per_slice)}
            sidecar = {
                **per_slice,
                **extra,
                "units": {"amplitude": "dimensionless (0 end-exhale, 1 end-inhale)", "rate": "1/s", "slice_times_s": "s"},
            }
            _write_json(sidecar, staging / f"{name}.json")
            scan_entries.append(entry)
        patient: dict[str, Any] = {
            "patient_id": patient_id,
            "grid": dataclasses.asdict(grid),
            "scans": scan_entries,
            "trace": "trace.json",
            "metadata": metadata or {},
        }
        if reference_hu is not None:
            write_volume(Volume(_hu_int16(reference_hu), grid), staging / "reference.nii.gz")
            patient["reference"] = "reference.nii.gz"
        if reference_labels is not None:
            write_volume(Volume(np.asarray(reference_labels, dtype=np.uint8), grid), staging / "reference_labels.nii.gz")
            patient["reference_labels"] = "reference_labels.nii.gz"
        trace = {"time_s": np.asarray(trace_time_s), "amplitude": np.asarray(trace_amplitude), "units": {"time_s": "s", "amplitude": "dimensionless"}}
        _write_json(trace, staging / "trace.json")
        _write_json(patient, staging / "patient.json")
        final = dataset_dir / patient_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _register_patient(dataset_dir, patient_id, kind)
    return final


def _register_patient(dataset_dir: Path, patient_id: str, kind: str) -> None:
    index_path = dataset_dir / "dataset.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created_by": f"breathcast {breathcast.__version__}",
        "patients": [],
    }
    if index.get("kind") != kind:
        raise BreathcastError(f"{index_path}: dataset holds {index.get('kind')} data; cannot add a {kind} patient")
    if patient_id not in index["patients"]:
        index["patients"].append(patient_id)
    _write_json(index, index_path)


def describe_dataset(dataset_dir: Path, generator: dict[str, Any], key: str = "generator") -> None:
    """Record how the dataset was made under ``key`` in ``dataset.json`` (e.g. the simulator's seed); a
    dataset made by two generators (cartoon and real-anatomy patients) records each under its own key."""
    index_path = Path(dataset_dir) / "dataset.json"
    index = _read_json(index_path)
    index[key] = generator
    _write_json(index, index_path)


def open_dataset(path: Path) -> DatasetIndex:
    """Read ``dataset.json`` of a dataset folder and check that every listed patient folder exists."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset folder does not exist")
    index = _read_json(path / "dataset.json")
    if index.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path / 'dataset.json'}: not a {FORMAT_NAME} dataset (format {index.get('format')!r})")
    if int(index.get("format_version", -1)) > FORMAT_VERSION:
        raise DatasetError(
            f"{path / 'dataset.json'}: format version {index['format_version']} is newer than this breathcast "
            f"reads ({FORMAT_VERSION}); upgrade breathcast"
        )
    for patient_id in index.get("patients", []):
        if not (path / patient_id / "patient.json").is_file():
            raise DatasetError(f"{path / patient_id / 'patient.json'}: listed in dataset.json but missing")
    return DatasetIndex(path=path, kind=index.get("kind", "real"), patients=list(index.get("patients", [])), metadata=index)


def _per_slice(sidecar: dict[str, Any], key: str, n_slices: int, path: Path) -> np.ndarray:
    if key not in sidecar:
        raise DatasetError(f"{path}: no '{key}' entry (one value per axial slice is needed)")
    values = np.asarray(sidecar[key], dtype=np.float64)
    if values.shape != (n_slices,):
        raise DatasetError(f"{path}: '{key}' has {values.size} values; the scan has {n_slices} slices")
    if not np.all(np.isfinite(values)):
        raise DatasetError(f"{path}: '{key}' holds NaN or infinite values")
    return values


def read_patient(dataset: DatasetIndex, patient_id: str, with_fields: bool = True) -> PatientRecord:
    """Read one patient: scans (HU as float32), per-slice traces, labels and fields when stored."""
    folder = dataset.patient_path(patient_id)
    meta = _read_json(folder / "patient.json")
    scans = []
    for entry in meta.get("scans", []):
        image = read_volume(folder / entry["image"], dtype=np.float32)
        sidecar_path = folder / entry["sidecar"]
        sidecar = _read_json(sidecar_path)
        n = image.shape[0]
        labels = read_volume(folder / entry["labels"]).array if "labels" in entry else None
        field = None
        if with_fields and "field" in entry:
            field, field_grid = read_field(folder / entry["field"])
            if field_grid.shape != image.grid.shape:
                raise DatasetError(f"{folder / entry['field']}: field grid {field_grid.shape} != scan grid {image.grid.shape}")
        scans.append(
            ScanRecord(
                name=entry["name"],
                image=image,
                amplitude=_per_slice(sidecar, "amplitude", n, sidecar_path),
                rate=_per_slice(sidecar, "rate", n, sidecar_path),
                slice_times_s=_per_slice(sidecar, "slice_times_s", n, sidecar_path),
                labels=labels,
                field=field,
            )
        )
    if not scans:
        raise DatasetError(f"{folder / 'patient.json'}: the patient has no scans")
    trace = _read_json(folder / meta.get("trace", "trace.json"))
    reference = read_volume(folder / meta["reference"], dtype=np.float32) if "reference" in meta else None
    reference_labels = read_volume(folder / meta["reference_labels"]).array if "reference_labels" in meta else None
    return PatientRecord(
        patient_id=patient_id,
        path=folder,
        scans=scans,
        trace_time_s=np.asarray(trace["time_s"], dtype=np.float64),
        trace_amplitude=np.asarray(trace["amplitude"], dtype=np.float64),
        reference=reference,
        reference_labels=reference_labels,
        metadata=meta.get("metadata", {}),
    )
