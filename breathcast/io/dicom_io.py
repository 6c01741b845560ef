"""DICOM CT series in and out: a planning CT folder -> :class:`~breathcast.geometry.Volume`, and back.

Reading (PS3.3 C.7.6.2 Image Plane module): slices are sorted by their position along the slice normal,
``dot(row x column, ImagePositionPatient)``, never by SliceLocation or InstanceNumber; each slice's
modality LUT (RescaleSlope/RescaleIntercept) is applied on its own; the slice spacing comes from the
positions (not SliceThickness) and must be uniform. Refused, each with a one-line
:class:`~breathcast.errors.BreathcastError` naming the folder or file: no DICOM, several image series
and no ``series_uid`` to choose one, a modality other than CT, gantry tilt (positions not along the
normal), uneven spacing, missing slices, a single slice, slices whose size or orientation differ.

The grid follows ITK: voxel ``[k, j, i]`` sits at ``IPP_0 + i*dx*row + j*dy*column + k*dz*normal``, so
array slice 0 is the lowest position along the normal (for axial head-first scans, the most inferior
slice) and the direction is always right-handed. The series identity (UIDs, patient) travels beside the
volume in :class:`SeriesIdentity`, because anything exported must reference it.

Writing: a Volume in HU becomes a new CT series (new Series and SOP Instance UIDs, ImageType
``DERIVED\\SECONDARY``), in the plan's study and Frame of Reference when derived from one. Pixels are
int16, RescaleSlope 1, RescaleIntercept 0: integer HU in [-32768, 32767] round-trip exactly, other values
are rounded to the nearest HU (at most 0.5 HU) and clipped to that range. Positions and spacings are
decimal strings (DS, 16 characters), so geometry round-trips exactly when its numbers have short decimal
expansions (as scanners write them) and to ~1e-9 mm otherwise. The folder is written whole or not at all.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import breathcast
from breathcast.canonical import position_direction, reorient
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume
from breathcast.io.files import atomic_output_dir, atomic_write

__all__ = [
    "SeriesIdentity",
    "InstanceReference",
    "instance_references",
    "CTSeries",
    "read_dicom_file",
    "read_ct_series",
    "read_ct_study",
    "write_ct_series",
    "atomic_output_dir",
    "save_dataset",
    "new_dataset",
    "set_equipment",
    "new_uid",
    "new_series_identity",
    "ds_value",
]

log = logging.getLogger(__name__)

# pydicom's own root: UIDs made under it are unique (hash/UUID based) without an organisation root.
UID_ROOT = "1.2.826.0.1.3680043.8.498."
IMPLEMENTATION_CLASS_UID = UID_ROOT + "1"
IMPLEMENTATION_VERSION = f"BREATHCAST_{breathcast.__version__}"[:16]
_CT_SOP_CLASSES = {CTImageStorage, "1.2.840.10008.5.1.4.1.1.2.1"}  # CT, Enhanced CT
# Relative tolerances on slice geometry: positions as scanners write them are exact to ~1e-4 mm.
_SPACING_TOLERANCE = 0.01  # fraction of the slice spacing
_PARALLEL_TOLERANCE_MM = 0.01  # in-plane drift of the slice origin per slice (gantry tilt)


def instance_references(identity: SeriesIdentity) -> DicomSequence:
    """Items (ReferencedSOPClassUID, ReferencedSOPInstanceUID) for every image of a series, in slice order."""
    return DicomSequence([ref.item() for ref in identity.instances()])


def new_uid() -> str:
    """A new globally unique DICOM UID (under pydicom's root).

    Example:
        >>> new_uid().startswith("1.2.826.0.1.3680043.8.498.") and len(new_uid()) <= 64
        True
    """
    return generate_uid(prefix=UID_ROOT)


@dataclass(frozen=True)
class SeriesIdentity:
    """Who and what a DICOM series belongs to: what exports must copy or reference.

    Args:
        series_instance_uid: (0020,000E).
        study_instance_uid: (0020,000D).
        frame_of_reference_uid: (0020,0052); the patient coordinate system of the series.
        sop_instance_uids: SOP Instance UIDs in array slice order (element k is slice ``[k]``).
        sop_class_uid: SOP Class UID of the images (CT Image Storage).
        modality: "CT".
        patient_id, patient_name, patient_birth_date, patient_sex: the Patient module, as found.
        study_id, study_date, study_time, accession_number, referring_physician_name, study_description:
            the General Study module, as found.
        series_number: (0020,0011), None when absent.
        series_description: (0008,103E).
        patient_position: (0018,5100), e.g. "HFS".
        position_reference_indicator: (0020,1040).
    """

    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...] = field(repr=False)
    sop_class_uid: str = CTImageStorage
    modality: str = "CT"
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    study_description: str = ""
    series_number: int | None = None
    series_description: str = ""
    patient_position: str = ""
    position_reference_indicator: str = ""

    def instances(self) -> list[InstanceReference]:
        """A reference to each image of the series, in slice order."""
        return [InstanceReference(self.sop_class_uid, uid, self.series_instance_uid) for uid in self.sop_instance_uids]

    def apply_patient_and_study(self, ds: Dataset) -> None:
        """Copy the Patient and General Study modules of this series into ``ds`` (same patient, same study)."""
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = self.patient_birth_date
        ds.PatientSex = self.patient_sex
        ds.StudyInstanceUID = self.study_instance_uid
        ds.StudyID = self.study_id
        ds.StudyDate = self.study_date
        ds.StudyTime = self.study_time
        ds.AccessionNumber = self.accession_number
        ds.ReferringPhysicianName = self.referring_physician_name
        if self.study_description:
            ds.StudyDescription = self.study_description


@dataclass(frozen=True)
class InstanceReference:
    """One DICOM object another one points to (PS3.3 10.8 SOP Instance Reference macro), and its series.

    Args:
        sop_class_uid: (0008,1150) Referenced SOP Class UID.
        sop_instance_uid: (0008,1155) Referenced SOP Instance UID.
        series_instance_uid: the series it belongs to (for the Common Instance Reference module).
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str

    @classmethod
    def of(cls, ds: Dataset) -> InstanceReference:
        """The reference to a dataset (its SOP Class, SOP Instance and Series Instance UIDs)."""
        return cls(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))

    def item(self) -> Dataset:
        """A sequence item with ReferencedSOPClassUID and ReferencedSOPInstanceUID."""
        item = Dataset()
        item.ReferencedSOPClassUID = self.sop_class_uid
        item.ReferencedSOPInstanceUID = self.sop_instance_uid
        return item


@dataclass(frozen=True, repr=False)
class CTSeries:
    """A CT series as read: the volume (HU, float32, (Z, Y, X)) and its identity.

    ``volume.grid.frame_of_reference_uid`` equals ``identity.frame_of_reference_uid``.
    ``files`` are the source files in slice order (empty for a series made in memory).
    """

    volume: Volume
    identity: SeriesIdentity
    files: tuple[Path, ...] = field(default=())

    def __repr__(self) -> str:
        return f"CTSeries({self.volume!r}; series {self.identity.series_instance_uid})"


def read_dicom_file(path: Path, stop_before_pixels: bool = False) -> Dataset | None:
    """Read one DICOM file, or None when ``path`` is not DICOM.

    Files without the 128-byte preamble (older writers, pydicom's ``rtstruct.dcm``) are read with
    ``force=True`` and kept only when they carry a SOP Class UID.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size="64 KB")
    except InvalidDicomError:
        pass
    except Exception:  # noqa: BLE001 - a truncated or foreign file; treated as not DICOM
        return None
    try:
        with warnings.catch_warnings():  # pydicom warns about the guessed VR encoding of headerless files
            warnings.simplefilter("ignore", UserWarning)
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size="64 KB", force=True)
            return ds if "SOPClassUID" in ds else None
    except Exception:  # noqa: BLE001 - force=True on arbitrary bytes raises anything
        return None


def _scan_folder(folder: Path) -> dict[str, list[tuple[Path, Dataset]]]:
    """Image datasets in ``folder`` (recursively), grouped by SeriesInstanceUID."""
    if not folder.is_dir():
        raise BreathcastError(f"{folder}: not a folder (a CT series is read from the folder of its slices)")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    n_dicom = 0
    for path in files:
        ds = read_dicom_file(path)
        if ds is None:
            continue
        n_dicom += 1
        if "PixelData" not in ds:  # RTSTRUCT, REG, RTPLAN beside the images
            log.debug("%s: not an image (%s), ignored", path, ds.get("Modality", "?"))
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        what = "no DICOM files" if n_dicom == 0 else f"{n_dicom} DICOM files but no images"
        raise BreathcastError(f"{folder}: {what}; expected the slices of one CT series")
    return series


def _choose_series(
    folder: Path, series: dict[str, list[tuple[Path, Dataset]]], series_uid: str | None
) -> list[tuple[Path, Dataset]]:
    if series_uid is not None:
        if series_uid not in series:
            raise BreathcastError(
                f"{folder}: no image series with SeriesInstanceUID {series_uid}; found {_summary(series)}"
            )
        return series[series_uid]
    if len(series) > 1:
        raise BreathcastError(
            f"{folder}: {len(series)} image series are mixed here ({_summary(series)}); "
            "choose one by its SeriesInstanceUID"
        )
    return next(iter(series.values()))


def _summary(series: dict[str, list[tuple[Path, Dataset]]]) -> str:
    return ", ".join(
        f"{uid or '<no UID>'}: {items[0][1].get('Modality', '?')} x{len(items)}" for uid, items in series.items()
    )


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise BreathcastError(f"{path}: {keyword} must hold {n} numbers, got {value!r}")
    return out


def _orientation(ds: Dataset, path: Path) -> np.ndarray:
    """(3, 3) columns: row direction, column direction, slice normal (LPS unit vectors)."""
    iop = _floats(ds, "ImageOrientationPatient", 6, path)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise BreathcastError(f"{path}: ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    return np.stack([row, col, np.cross(row, col)], axis=1)


def _check_ct_slices(items: list[tuple[Path, Dataset]]) -> None:
    first_path, first = items[0]
    for path, ds in items:
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            raise BreathcastError(f"{path}: modality is {modality or 'missing'}; a planning CT series must be CT")
        if str(ds.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.2.1":
            raise BreathcastError(
                f"{path}: Enhanced CT (multi-frame) is not supported; export the series as CT Image Storage"
            )
        for keyword in ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "FrameOfReferenceUID"):
            if keyword not in ds:
                raise BreathcastError(f"{path}: {keyword} is missing")
            if ds.get(keyword) != first.get(keyword) and keyword != "ImageOrientationPatient":
                raise BreathcastError(
                    f"{path}: {keyword} {ds.get(keyword)} differs from {first_path.name} ({first.get(keyword)})"
                )
        if not np.allclose(_orientation(ds, path), _orientation(first, first_path), atol=1e-4):
            raise BreathcastError(f"{path}: ImageOrientationPatient differs from {first_path.name}")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise BreathcastError(f"{path}: SamplesPerPixel {ds.SamplesPerPixel}; CT must be greyscale")


def _slice_spacing(positions: np.ndarray, paths: list[Path], folder: Path) -> float:
    """Uniform spacing (mm) of sorted slice positions along the normal, or a clear refusal."""
    steps = np.diff(positions)
    if np.any(steps < 1e-6):
        k = int(np.argmin(steps))
        raise BreathcastError(
            f"{paths[k + 1]}: same slice position as {paths[k].name} ({positions[k]:.3f} mm); duplicate slices"
        )
    spacing = float(np.median(steps))
    for k, step in enumerate(steps):
        if abs(step - spacing) <= _SPACING_TOLERANCE * spacing:
            continue
        ratio = step / spacing
        if ratio > 1.5 and abs(ratio - round(ratio)) <= _SPACING_TOLERANCE * round(ratio):
            raise BreathcastError(
                f"{folder}: missing slices: a gap of {step:.3f} mm ({round(ratio) - 1} slices of {spacing:.3f} mm) "
                f"between {paths[k].name} and {paths[k + 1].name}"
            )
        raise BreathcastError(
            f"{folder}: uneven slice spacing: {step:.3f} mm between {paths[k].name} and {paths[k + 1].name}, "
            f"{spacing:.3f} mm elsewhere; resample the series to uniform spacing first"
        )
    return spacing


def _identity(ds: Dataset, sop_instance_uids: tuple[str, ...]) -> SeriesIdentity:
    number = ds.get("SeriesNumber")
    return SeriesIdentity(
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        sop_instance_uids=sop_instance_uids,
        sop_class_uid=str(ds.get("SOPClassUID", CTImageStorage)),
        modality=str(ds.get("Modality", "")),
        patient_id=str(ds.get("PatientID", "")),
        patient_name=str(ds.get("PatientName", "")),
        patient_birth_date=str(ds.get("PatientBirthDate", "")),
        patient_sex=str(ds.get("PatientSex", "")),
        study_id=str(ds.get("StudyID", "")),
        study_date=str(ds.get("StudyDate", "")),
        study_time=str(ds.get("StudyTime", "")),
        accession_number=str(ds.get("AccessionNumber", "")),
        referring_physician_name=str(ds.get("ReferringPhysicianName", "")),
        study_description=str(ds.get("StudyDescription", "")),
        series_number=None if number in (None, "") else int(number),
        series_description=str(ds.get("SeriesDescription", "")),
        patient_position=str(ds.get("PatientPosition", "")),
        position_reference_indicator=str(ds.get("PositionReferenceIndicator", "")),
    )


def _hu_slice(ds: Dataset, path: Path) -> np.ndarray:
    """One slice in HU, float32 (Rows, Columns), through its own modality LUT (PS3.3 C.11.1)."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable pixel data
        syntax = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        raise BreathcastError(f"{path}: cannot decode pixel data (transfer syntax {syntax}): {exc}") from None
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def read_ct_series(folder: Path | str, series_uid: str | None = None) -> CTSeries:
    """Read a CT series from a folder of single-frame slices (files in sub-folders included).

    Files that are not DICOM, and DICOM objects without pixels (RTSTRUCT, REG, RTPLAN), are ignored.

    Args:
        folder: the folder of the series.
        series_uid: SeriesInstanceUID to read when the folder holds several image series.

    Returns:
        A :class:`CTSeries`: ``volume.array`` (Z, Y, X) float32 in HU, slices in ascending position along
        the slice normal; ``volume.grid`` with spacing (x, y, z) mm, origin (LPS mm, centre of the first
        voxel), direction (columns: row, column, normal) and the Frame of Reference UID.

    Raises:
        BreathcastError: one line naming the folder or file, for each refusal listed in the module docstring.
    """
    folder = Path(folder)
    return _read_series_items(folder, _choose_series(folder, _scan_folder(folder), series_uid))


def read_ct_study(folder: Path | str) -> list[CTSeries]:
    """Every CT image series in a folder (files in sub-folders included), each read as :func:`read_ct_series`
    reads one, in SeriesInstanceUID order; the folder is scanned once (a 4DCT holds one series per phase)."""
    folder = Path(folder)
    return [_read_series_items(folder, items) for _, items in sorted(_scan_folder(folder).items())]


def _read_series_items(folder: Path, items: list[tuple[Path, Dataset]]) -> CTSeries:
    _check_ct_slices(items)
    if len(items) < 2:
        raise BreathcastError(
            f"{items[0][0]}: a single slice; a CT volume needs at least 2 slices to know its slice spacing"
        )
    first_path, first = items[0]
    direction = _orientation(first, first_path)
    normal = direction[:, 2]
    ipp = np.stack([_floats(ds, "ImagePositionPatient", 3, path) for path, ds in items])
    order = np.argsort(ipp @ normal, kind="stable")
    items = [items[k] for k in order]
    ipp = ipp[order]
    paths = [path for path, _ in items]
    positions = ipp @ normal
    # Gantry tilt: each slice origin moves off the normal through the first one.
    offsets = ipp - ipp[0]
    drift = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1) / np.maximum(np.arange(len(ipp)), 1)
    if np.max(drift) > _PARALLEL_TOLERANCE_MM:
        k = int(np.argmax(drift))
        tilt = first.get("GantryDetectorTilt", "?")
        raise BreathcastError(
            f"{paths[k]}: slice positions are not along the slice normal (gantry tilt {tilt} deg?, "
            f"{drift[k]:.3f} mm off per slice); resample the series to an orthogonal grid first"
        )
    dz = _slice_spacing(positions, paths, folder)
    row_spacing, column_spacing = _floats(first, "PixelSpacing", 2, first_path)
    frame = str(first.FrameOfReferenceUID)
    grid = Grid(
        shape=(len(items), int(first.Rows), int(first.Columns)),
        spacing=(float(column_spacing), float(row_spacing), dz),
        origin=tuple(ipp[0]),
        direction=tuple(map(tuple, direction)),
        frame_of_reference_uid=frame,
    )
    array = np.stack([_hu_slice(ds, path) for path, ds in items])
    identity = _identity(first, tuple(str(ds.SOPInstanceUID) for _, ds in items))
    log.debug("read %s: %s", folder, grid)
    return CTSeries(Volume(array, grid), identity, tuple(paths))


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def new_dataset(sop_class_uid: str, uid: str | None = None) -> Dataset:
    """An empty dataset with file meta, SOP Common and creation date/time filled in (Explicit VR LE).

    ``uid``: its SOP Instance UID (allocated beforehand); None: a new one.
    """
    uid = uid or new_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, uid)
    ds.SpecificCharacterSet = "ISO_IR 192"
    now = datetime.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = uid
    return ds


def set_equipment(ds: Dataset) -> None:
    """General and Enhanced General Equipment modules (PS3.3 C.7.5.1, C.7.5.2): breathcast made this."""
    ds.Manufacturer = "breathcast"
    ds.ManufacturerModelName = "breathcast"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = f"breathcast {breathcast.__version__}"


def new_series_identity(reference: SeriesIdentity | None, slices: int, frame: str = "") -> SeriesIdentity:
    """UIDs for a series not yet written (series, and one SOP Instance per slice), in ``reference``'s study.

    Lets another object (a REG) reference the images before :func:`write_ct_series` writes them with it.

    Args:
        reference: the series the new one derives from (its patient, study and Frame of Reference), or None.
        slices: the number of slices.
        frame: the Frame of Reference when there is no reference ("" : a new one).
    """
    identity = _new_identity(reference, frame)
    return replace(identity, sop_instance_uids=tuple(new_uid() for _ in range(int(slices))))


def _new_identity(reference: SeriesIdentity | None, frame: str) -> SeriesIdentity:
    """The identity of a new series: the reference's patient, study and Frame of Reference, or new ones."""
    if reference is not None:
        return SeriesIdentity(
            series_instance_uid=new_uid(),
            study_instance_uid=reference.study_instance_uid or new_uid(),
            frame_of_reference_uid=reference.frame_of_reference_uid or frame or new_uid(),
            sop_instance_uids=(),
            patient_id=reference.patient_id,
            patient_name=reference.patient_name,
            patient_birth_date=reference.patient_birth_date,
            patient_sex=reference.patient_sex,
            study_id=reference.study_id,
            study_date=reference.study_date,
            study_time=reference.study_time,
            accession_number=reference.accession_number,
            referring_physician_name=reference.referring_physician_name,
            study_description=reference.study_description,
            patient_position=reference.patient_position,
            position_reference_indicator=reference.position_reference_indicator,
        )
    today = datetime.date.today().strftime("%Y%m%d")
    return SeriesIdentity(
        series_instance_uid=new_uid(),
        study_instance_uid=new_uid(),
        frame_of_reference_uid=frame or new_uid(),
        sop_instance_uids=(),
        patient_id="breathcast",
        patient_name="breathcast^synthetic",
        study_id="1",
        study_date=today,
        study_time="000000",
        patient_position="HFS",
    )


def ds_value(value: float) -> str:
    """A decimal string (VR DS, PS3.5 6.2: 16 characters at most) that keeps as many digits as fit.

    Example:
        >>> ds_value(-164.24107142857142), ds_value(2.0), ds_value(1e-20)
        ('-164.24107142857', '2.0', '1e-20')
    """
    return pydicom.valuerep.format_number_as_ds(float(value))


def _hu_to_int16(hu: np.ndarray) -> np.ndarray:
    hu = np.asarray(hu, dtype=np.float64)
    if not np.all(np.isfinite(hu)):
        raise BreathcastError("CT volume holds NaN or infinite values; cannot write it as DICOM")
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def write_ct_series(
    volume: Volume,
    folder: Path | str,
    reference: SeriesIdentity | None = None,
    description: str = "breathcast derived CT",
    series_number: int = 901,
    derivation: str = "breathcast: CT warped by a predicted displacement field",
    orientation: str | None = None,
    source_images: SeriesIdentity | None = None,
    source_instances: Sequence[InstanceReference] = (),
    identity: SeriesIdentity | None = None,
) -> SeriesIdentity:
    """Write a CT volume in HU as a new DICOM series (one CT Image Storage file per slice).

    Args:
        volume: (Z, Y, X) HU; stored as int16 (slope 1, intercept 0), rounded to whole HU.
        folder: the output folder; must not exist (or be empty). Written whole or not at all.
        reference: the planning CT this volume derives from: the new series joins its patient, study and
            Frame of Reference. None: a new study and (unless ``volume.grid`` has one) Frame of Reference.
        description: SeriesDescription.
        series_number: SeriesNumber.
        derivation: DerivationDescription (why the images differ from the acquired ones).
        orientation: a PatientPosition of :data:`breathcast.canonical.PATIENT_POSITIONS` ("HFS", "FFS",
            "HFP", "FFP", "HFDL", ...): the voxels are laid out as an axial scan of a patient in that position
            is stored (its ImageOrientationPatient; no interpolation, the same anatomy at the same LPS places)
            and PatientPosition says it. None: stored as ``volume.grid`` is.
        source_images: the series slice ``k`` of this volume was made from, slice for slice (same grid):
            each slice lists its source in SourceImageSequence (PS3.3 C.12.4, purpose DCM 121322).
        source_instances: other objects the images were made from (the REG that warped them): listed in
            every slice's SourceInstanceSequence. Both are listed, by series, in ReferencedSeriesSequence
            (Common Instance Reference, PS3.3 C.12.2).
        identity: UIDs allocated beforehand with :func:`new_series_identity` (one per slice); None: new ones.

    Returns:
        The :class:`SeriesIdentity` of the written series (SOP Instance UIDs in slice order).
    """
    if orientation is not None:
        volume = reorient(volume, position_direction(orientation))
    if source_images is not None and len(source_images.sop_instance_uids) != volume.shape[0]:
        raise BreathcastError(
            f"source series has {len(source_images.sop_instance_uids)} slices; the volume {volume.shape[0]}"
        )
    grid = volume.grid
    direction = grid.direction_matrix
    frame = grid.frame_of_reference_uid
    if (
        reference is not None
        and frame
        and reference.frame_of_reference_uid
        and frame != reference.frame_of_reference_uid
    ):
        raise BreathcastError(
            f"volume's Frame of Reference {frame} is not the reference series' {reference.frame_of_reference_uid}"
        )
    pixels = _hu_to_int16(volume.array)
    if identity is None:
        identity = new_series_identity(reference, grid.shape[0], frame)
    elif len(identity.sop_instance_uids) != grid.shape[0]:
        raise BreathcastError(f"series identity has {len(identity.sop_instance_uids)} SOP Instance UIDs; the volume {grid.shape[0]} slices")
    if orientation is not None:
        identity = replace(identity, patient_position=orientation)
    referenced_series = _referenced_series(source_images, source_instances)
    folder = Path(folder)
    with atomic_output_dir(folder) as tmp:
        for k in range(grid.shape[0]):
            ds = new_dataset(CTImageStorage, identity.sop_instance_uids[k])
            identity.apply_patient_and_study(ds)
            _set_ct_series(ds, identity, description, series_number)
            set_equipment(ds)
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.DerivationDescription = derivation[:1024]
            ds.InstanceNumber = k + 1
            ds.PatientOrientation = ""
            ds.ContentDate = ds.InstanceCreationDate
            ds.ContentTime = ds.InstanceCreationTime
            position = np.asarray(grid.origin) + direction[:, 2] * grid.spacing[2] * k
            ds.ImagePositionPatient = [ds_value(v) for v in position]
            ds.ImageOrientationPatient = [ds_value(v) for v in direction[:, :2].T.ravel()]
            ds.PixelSpacing = [
                ds_value(grid.spacing[1]),
                ds_value(grid.spacing[0]),
            ]  # row spacing (y), column spacing (x)
            ds.SliceThickness = ds_value(grid.spacing[2])
            ds.SliceLocation = ds_value(position @ direction[:, 2])
            ds.KVP = ""
            ds.AcquisitionNumber = ""
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
            ds.PixelData = np.ascontiguousarray(pixels[k]).astype("<i2").tobytes()
            if source_images is not None:
                ds.SourceImageSequence = _source_image(source_images, k)
            if source_instances:
                ds.SourceInstanceSequence = DicomSequence([r.item() for r in source_instances])
            if referenced_series:
                ds.ReferencedSeriesSequence = referenced_series
            _save(ds, tmp / f"CT{k + 1:05d}.dcm", folder)
    return replace(identity, series_number=series_number, series_description=description[:64])


def _source_image(source: SeriesIdentity, k: int) -> DicomSequence:
    item = source.instances()[k].item()
    purpose = Dataset()  # CID 7202 Source Image Purposes of Reference
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return DicomSequence([item])


def _referenced_series(images: SeriesIdentity | None, instances: Sequence[InstanceReference]) -> DicomSequence:
    """Common Instance Reference (PS3.3 C.12.2): every referenced instance, grouped by its series."""
    by_series: dict[str, list[InstanceReference]] = {}
    if images is not None:
        by_series[images.series_instance_uid] = images.instances()
    for ref in instances:
        by_series.setdefault(ref.series_instance_uid, []).append(ref)
    out = DicomSequence()
    for uid, refs in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = uid
        series.ReferencedInstanceSequence = DicomSequence([r.item() for r in refs])
        out.append(series)
    return out


def _set_ct_series(ds: Dataset, identity: SeriesIdentity, description: str, series_number: int) -> None:
    """General Series + Frame of Reference modules of a written CT slice."""
    ds.Modality = "CT"
    ds.Laterality = ""  # Type 2C (General Series); a thorax series has no laterality
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description[:64]
    ds.PatientPosition = identity.patient_position or "HFS"
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = identity.position_reference_indicator


def _save(ds: Dataset, path: Path, shown: Path) -> None:
    try:
        ds.save_as(path, enforce_file_format=True)
    except OSError as exc:
        raise BreathcastError(f"cannot write {shown}: {exc.strerror or exc}") from None


def save_dataset(ds: Dataset, path: Path | str) -> Path:
    """Write one DICOM object atomically (temporary sibling file, then rename; mode from the umask); returns ``path``."""
    return atomic_write(path, lambda tmp: _save(ds, tmp, Path(path)))
