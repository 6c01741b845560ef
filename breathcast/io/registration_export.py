"""Displacement fields out of the process: DICOM Deformable Spatial Registration, NIfTI and MHA, and back.

DICOM (PS3.3 A.39.2, Deformable Spatial Registration IOD; C.20.3 module): the field is stored as the
standard defines its grid, a *pull* field like ours. For every point x of the registered grid (the
breathing state the field predicts, in the planning CT's Frame of Reference), ``x + v(x)`` is the point
of the source (the planning CT) to sample; v in mm along patient LPS, VectorGridData float32 (VR OF)
interleaved x, y, z with x fastest, i.e. a C-order ``(nz, ny, nx, 3)`` array. The object joins the planning
CT's patient and study, its Frame of Reference is the plan's (in 4DCT every phase shares it), its
Deformable Registration Sequence item references the plan's images (ReferencedImageSequence: the source), the
top-level ReferencedImageSequence the registered images when there are some (the warped CT written with it), and
the Common Instance Reference module every series referenced. Pre- and post-deformation matrices are
identity. Objects are built, then validated (:func:`validate_deformable_registration`), then written
atomically; ``dciodvfy`` (Debian ``dicom3tools``) passes them without errors (tested when installed).

The DICOM grid has no direction of its own for the slice axis (it is row x column), so a field on a
left-handed grid is written with its slices reversed, and an axial grid whose row x column points inferior
(a feet-first plan) with its columns and slices reversed, so the third axis is +z as SlicerRT's reader
assumes: the same field in patient space. Positions and orientations are DS strings of at most 16 characters
(PS3.5 6.2), so strict readers accept any grid.

NIfTI (``.nii``, ``.nii.gz``) and MetaImage (``.mha``) hold the same mm LPS components as ITK and
SimpleITK write displacement fields (``sitk.ReadImage`` gives a field ``sitk.DisplacementFieldTransform``
accepts); NIfTI is written by :func:`breathcast.io.dataset.write_field`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import DeformableSpatialRegistrationStorage

from breathcast.io import dataset
from breathcast.canonical import flip_grid
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, field_from_lps_mm, field_to_lps_mm
from breathcast.io.dicom_io import (
    SeriesIdentity,
    ds_value,
    instance_references,
    new_dataset,
    new_uid,
    read_dicom_file,
    save_dataset,
    set_equipment,
)
from breathcast.io.files import atomic_write

__all__ = [
    "RegistrationField",
    "build_deformable_registration",
    "validate_deformable_registration",
    "write_deformable_registration",
    "read_deformable_registration",
    "write_field_mha",
    "read_field_mha",
    "export_field",
    "read_exported_field",
]

_IDENTITY_16 = [float(v) for v in np.eye(4).ravel()]


@dataclass(frozen=True, repr=False)
class RegistrationField:
    """A displacement field read from a DICOM Deformable Spatial Registration object.

    Args:
        field_lps_mm: (3, Z, Y, X) float32, components (x, y, z) in mm along patient LPS; pull-back: the
            registered point x samples the source at x + field(x).
        grid: the registered grid; ``grid.frame_of_reference_uid`` is the object's (registered) Frame of
            Reference.
        source_frame_of_reference_uid: the Frame of Reference of the source images.
        referenced_sop_instance_uids: the source images the field belongs to.
        path: the file read.
    """

    field_lps_mm: np.ndarray
    grid: Grid
    source_frame_of_reference_uid: str
    referenced_sop_instance_uids: tuple[str, ...] = field(default=())
    path: Path | None = None

    def field_voxels(self) -> np.ndarray:
        """The field in breathcast's internal units: (3, Z, Y, X) float32 voxels, (dz, dy, dx)."""
        return field_from_lps_mm(self.field_lps_mm, self.grid)

    def __repr__(self) -> str:
        return f"RegistrationField({self.grid!r}; from {self.path})"


def _dicom_layout(lps: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """The same field on the grid a DICOM REG can hold, third axis +z when the grid is axial.

    DICOM has no direction for the grid's slice axis: it is row x column (PS3.3 C.20.3.1.1), so a left-handed
    grid has its slices reversed. And SlicerRT's REG reader assumes the third axis is +z (superior): an axial
    grid whose row x column points inferior (a feet-first plan) has its columns and slices reversed.
    Reversals only; every point keeps its displacement (mm LPS).
    """
    d = grid.direction_matrix
    normal = np.cross(d[:, 0], d[:, 1])
    flip_columns = bool(abs(normal[2]) >= np.abs(normal[:2]).max() and normal[2] < 0)
    if flip_columns:
        normal = -normal
    flips = (bool(normal @ d[:, 2] < 0), flip_columns, False)
    if not any(flips):
        return lps, grid
    axes = tuple(1 + a for a, f in enumerate(flips) if f)
    return np.ascontiguousarray(np.flip(lps, axes)), flip_grid(grid, flips)


def _code_sequence(value: str, scheme: str, meaning: str) -> DicomSequence:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return DicomSequence([item])


def _matrix_item() -> DicomSequence:
    item = Dataset()
    item.FrameOfReferenceTransformationMatrixType = "RIGID"
    item.FrameOfReferenceTransformationMatrix = _IDENTITY_16
    return DicomSequence([item])


def build_deformable_registration(
    u_voxels: np.ndarray,
    grid: Grid,
    plan: SeriesIdentity,
    description: str = "breathcast predicted displacement field",
    content_label: str = "BREATHCAST",
    series_number: int = 903,
    registered: SeriesIdentity | None = None,
) -> Dataset:
    """Build (and validate) a DICOM Deformable Spatial Registration object for a predicted field.

    Args:
        u_voxels: (3, Z, Y, X) internal field on ``grid``: (dz, dy, dx) voxels, pull-back
            (``state(x) = plan(x + u(x))``); converted with :func:`~breathcast.geometry.field_to_lps_mm`.
        grid: the field's grid (the CT grid or the model grid), in the plan's Frame of Reference.
        plan: the planning CT series the field samples from (patient, study, Frame of Reference, images).
        description: ContentDescription and SeriesDescription.
        content_label: ContentLabel (CS: upper case, digits, space, underscore; 16 characters).
        series_number: SeriesNumber.
        registered: the images of the registered grid's state, when there are some (the warped planning CT,
            :func:`~breathcast.io.dicom_io.new_series_identity` before it is written): listed in the
            top-level ReferencedImageSequence (the images in this object's Frame of Reference it registers).

    Returns:
        The dataset, with file meta (Explicit VR Little Endian); write it with
        :func:`write_deformable_registration` or ``breathcast.io.dicom_io.save_dataset``.

    Raises:
        BreathcastError: another Frame of Reference than the plan's, a plan without images or UIDs, or a
            dataset that fails :func:`validate_deformable_registration`.
    """
    if not plan.frame_of_reference_uid or not plan.sop_instance_uids or not plan.study_instance_uid:
        raise BreathcastError(
            "the plan's identity lacks a Frame of Reference, a study or its images; read it with read_ct_series"
        )
    if grid.frame_of_reference_uid and grid.frame_of_reference_uid != plan.frame_of_reference_uid:
        raise BreathcastError(
            f"field grid is in Frame of Reference {grid.frame_of_reference_uid}, the plan in {plan.frame_of_reference_uid}"
        )
    lps, grid = _dicom_layout(field_to_lps_mm(u_voxels, grid), grid)
    if not np.all(np.isfinite(lps)):
        raise BreathcastError("displacement field holds NaN or infinite values; not exported")
    ds = new_dataset(DeformableSpatialRegistrationStorage)
    plan.apply_patient_and_study(ds)
    # Spatial Registration Series, Frame of Reference, equipment (General + Enhanced General)
    ds.Modality = "REG"
    ds.Laterality = ""  # Type 2C of General Series, which dciodvfy asks for; a thorax has none
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description[:64]
    ds.FrameOfReferenceUID = plan.frame_of_reference_uid
    ds.PositionReferenceIndicator = plan.position_reference_indicator
    set_equipment(ds)
    # Deformable Spatial Registration module, Content Identification macro (PS3.3 C.20.3, 10.9)
    ds.InstanceNumber = 1
    ds.ContentLabel = content_label[:16]
    ds.ContentDescription = description[:64]
    ds.ContentCreatorName = ""
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    item = Dataset()
    item.SourceFrameOfReferenceUID = plan.frame_of_reference_uid
    item.ReferencedImageSequence = instance_references(plan)
    item.RegistrationTypeCodeSequence = DicomSequence()  # Type 2: a model prediction, not a registration type
    item.PreDeformationMatrixRegistrationSequence = _matrix_item()
    item.PostDeformationMatrixRegistrationSequence = _matrix_item()
    item.DeformableRegistrationGridSequence = DicomSequence([_grid_item(lps, grid)])
    ds.DeformableRegistrationSequence = DicomSequence([item])
    if registered is not None:
        ds.ReferencedImageSequence = instance_references(registered)
    # Common Instance Reference module (PS3.3 C.12.2): every series referenced above, all in this same study.
    ds.ReferencedSeriesSequence = DicomSequence()
    for identity in (plan, registered) if registered is not None else (plan,):
        series = Dataset()
        series.SeriesInstanceUID = identity.series_instance_uid
        series.ReferencedInstanceSequence = instance_references(identity)
        ds.ReferencedSeriesSequence.append(series)
    problems = validate_deformable_registration(ds)
    if problems:
        raise BreathcastError(f"built Deformable Spatial Registration is invalid: {'; '.join(problems)}")
    return ds


def _grid_item(lps: np.ndarray, grid: Grid) -> Dataset:
    direction = grid.direction_matrix
    item = Dataset()
    item.ImagePositionPatient = [ds_value(v) for v in grid.origin]
    item.ImageOrientationPatient = [ds_value(v) for v in direction[:, :2].T.ravel()]
    item.GridDimensions = [int(n) for n in grid.shape[::-1]]  # (columns, rows, slices)
    item.GridResolution = [float(s) for s in grid.spacing]
    item.VectorGridData = np.ascontiguousarray(lps.transpose(1, 2, 3, 0), dtype="<f4").tobytes()
    return item


_TOP_LEVEL = {  # keyword -> DICOM type (1: present and non-empty, 2: present)
    "SOPClassUID": 1,
    "SOPInstanceUID": 1,
    "Modality": 1,
    "StudyInstanceUID": 1,
    "SeriesInstanceUID": 1,
    "FrameOfReferenceUID": 1,
    "PositionReferenceIndicator": 2,
    "PatientName": 2,
    "PatientID": 2,
    "PatientBirthDate": 2,
    "PatientSex": 2,
    "StudyDate": 2,
    "StudyTime": 2,
    "ReferringPhysicianName": 2,
    "StudyID": 2,
    "AccessionNumber": 2,
    "SeriesNumber": 2,
    "Manufacturer": 1,
    "ManufacturerModelName": 1,
    "DeviceSerialNumber": 1,
    "SoftwareVersions": 1,
    "InstanceNumber": 1,
    "ContentLabel": 1,
    "ContentDescription": 2,
    "ContentCreatorName": 2,
    "ContentDate": 1,
    "ContentTime": 1,
    "DeformableRegistrationSequence": 1,
}
_GRID = ("ImagePositionPatient", "ImageOrientationPatient", "GridDimensions", "GridResolution", "VectorGridData")


def validate_deformable_registration(ds: Dataset) -> list[str]:
    """Structural check of a Deformable Spatial Registration object against PS3.3 A.39.2 / C.20.3.

    Checks required attributes (Type 1 non-empty, Type 2 present), SOP Class and modality, every grid's
    dimensions, resolution, orientation and the VectorGridData length (3 * nx * ny * nz * 4 bytes), and the
    pre/post matrices. It does not replace ``dciodvfy``, which knows every module of the IOD.

    Returns:
        The problems found, one short sentence each; empty when the object is sound.
    """
    problems = []
    for keyword, kind in _TOP_LEVEL.items():
        if keyword not in ds:
            problems.append(f"{keyword} is missing")
        elif kind == 1 and ds.get(keyword) in (None, "", []):
            problems.append(f"{keyword} is empty")
    if str(ds.get("SOPClassUID", "")) != DeformableSpatialRegistrationStorage:
        problems.append(f"SOPClassUID is {ds.get('SOPClassUID')}, not Deformable Spatial Registration")
    if ds.get("Modality") != "REG":
        problems.append(f"Modality is {ds.get('Modality')!r}, not 'REG'")
    for n, item in enumerate(ds.get("DeformableRegistrationSequence", [])):
        where = f"DeformableRegistrationSequence[{n}]"
        if not item.get("SourceFrameOfReferenceUID"):
            problems.append(f"{where}: SourceFrameOfReferenceUID is missing")
        if "RegistrationTypeCodeSequence" not in item:
            problems.append(f"{where}: RegistrationTypeCodeSequence is missing")
        for key in ("PreDeformationMatrixRegistrationSequence", "PostDeformationMatrixRegistrationSequence"):
            for matrix in item.get(key, []):
                values = matrix.get("FrameOfReferenceTransformationMatrix") or []
                if len(values) != 16 or not matrix.get("FrameOfReferenceTransformationMatrixType"):
                    problems.append(f"{where}: {key} needs a 16-value matrix and its type")
        for grid in item.get("DeformableRegistrationGridSequence", []):
            problems += [f"{where}: grid {p}" for p in _grid_problems(grid)]
    return problems


def _grid_problems(grid: Dataset) -> list[str]:
    missing = [k for k in _GRID if grid.get(k) in (None, "", [], b"")]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    dims = [int(v) for v in grid.GridDimensions]
    problems = []
    if len(dims) != 3 or min(dims) < 1:
        problems.append(f"GridDimensions {dims} is not three positive sizes")
    if len(grid.GridResolution) != 3 or min(float(v) for v in grid.GridResolution) <= 0:
        problems.append(f"GridResolution {list(grid.GridResolution)} is not three positive mm")
    iop = np.asarray([float(v) for v in grid.ImageOrientationPatient])
    if iop.shape != (6,) or not np.allclose(iop.reshape(2, 3) @ iop.reshape(2, 3).T, np.eye(2), atol=1e-4):
        problems.append("ImageOrientationPatient is not two orthonormal directions")
    if len(grid.ImagePositionPatient) != 3:
        problems.append("ImagePositionPatient is not three mm")
    expected = 3 * int(np.prod(dims)) * 4
    if len(grid.VectorGridData) != expected:
        problems.append(f"VectorGridData has {len(grid.VectorGridData)} bytes, GridDimensions say {expected}")
    return problems


def write_deformable_registration(
    u_voxels: np.ndarray, grid: Grid, plan: SeriesIdentity, path: Path | str, **options: str | int | SeriesIdentity
) -> Path:
    """Build, validate and atomically write a Deformable Spatial Registration file; returns ``path``.

    Args:
        u_voxels, grid, plan, options: as :func:`build_deformable_registration`.
        path: the output ``.dcm`` file.
    """
    return save_dataset(build_deformable_registration(u_voxels, grid, plan, **options), path)


def read_deformable_registration(path: Path | str, item: int = 0) -> RegistrationField:
    """Read the field of a Deformable Spatial Registration file (the ``item``-th grid it holds).

    Raises:
        BreathcastError: naming the file, when it is not such an object, its grid is malformed, or its pre/post
            matrices are not identity (composing them is not supported).
    """
    path = Path(path)
    ds = read_dicom_file(path) if path.is_file() else None
    if ds is None:
        raise BreathcastError(f"{path}: not a DICOM file")
    if str(ds.get("SOPClassUID", "")) != DeformableSpatialRegistrationStorage:
        raise BreathcastError(f"{path}: SOP Class {ds.get('SOPClassUID')} is not Deformable Spatial Registration")
    items = [i for i in ds.get("DeformableRegistrationSequence", []) if i.get("DeformableRegistrationGridSequence")]
    if not 0 <= item < len(items):
        raise BreathcastError(f"{path}: holds {len(items)} deformation grids; item {item} asked for")
    registration = items[item]
    for key in ("PreDeformationMatrixRegistrationSequence", "PostDeformationMatrixRegistrationSequence"):
        for matrix in registration.get(key, []):
            values = [float(v) for v in matrix.get("FrameOfReferenceTransformationMatrix", [])]
            if len(values) != 16 or not np.allclose(values, _IDENTITY_16, atol=1e-6):
                raise BreathcastError(
                    f"{path}: {key} is not identity; composing matrices with the grid is not supported"
                )
    grid_item = registration.DeformableRegistrationGridSequence[0]
    problems = _grid_problems(grid_item)
    if problems:
        raise BreathcastError(f"{path}: deformation grid {'; '.join(problems)}")
    nx, ny, nz = (int(v) for v in grid_item.GridDimensions)
    iop = np.asarray([float(v) for v in grid_item.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    grid = Grid(
        shape=(nz, ny, nx),
        spacing=tuple(float(v) for v in grid_item.GridResolution),
        origin=tuple(float(v) for v in grid_item.ImagePositionPatient),
        direction=tuple(map(tuple, np.stack([row, col, np.cross(row, col)], axis=1))),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
    )
    data = np.frombuffer(grid_item.VectorGridData, dtype="<f4").reshape(nz, ny, nx, 3)
    lps = np.ascontiguousarray(data.transpose(3, 0, 1, 2), dtype=np.float32)
    referenced = tuple(str(r.ReferencedSOPInstanceUID) for r in registration.get("ReferencedImageSequence", []))
    return RegistrationField(lps, grid, str(registration.get("SourceFrameOfReferenceUID", "")), referenced, path)


def write_field_mha(u_voxels: np.ndarray, grid: Grid, path: Path | str) -> Path:
    """Write a (3, Z, Y, X) voxel field as a MetaImage (.mha) displacement field: float32, mm LPS, as ITK does.

    Example:
        >>> import tempfile, pathlib
        >>> g = Grid((2, 3, 4), spacing=(1.0, 2.0, 3.0)); u = np.ones((3, 2, 3, 4), np.float32)
        >>> p = write_field_mha(u, g, pathlib.Path(tempfile.mkdtemp()) / "u.mha")
        >>> back, g2 = read_field_mha(p)
        >>> bool(np.allclose(back, u)), g2 == g
        (True, True)
    """
    lps = field_to_lps_mm(u_voxels, grid)
    direction = grid.direction_matrix
    header = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False",
        # MetaIO lists the direction of each index axis in turn (the columns of ITK's direction matrix).
        "TransformMatrix": " ".join(repr(float(v)) for v in direction.T.ravel()),
        "Offset": " ".join(repr(float(v)) for v in grid.origin),
        "CenterOfRotation": "0 0 0",
        "ElementSpacing": " ".join(repr(float(v)) for v in grid.spacing),
        "DimSize": " ".join(str(n) for n in grid.shape[::-1]),
        "ElementNumberOfChannels": "3",
        "ElementType": "MET_FLOAT",
        "ElementDataFile": "LOCAL",
    }
    text = "".join(f"{key} = {value}\n" for key, value in header.items()).encode("ascii")
    data = np.ascontiguousarray(lps.transpose(1, 2, 3, 0), dtype="<f4").tobytes()

    def write(tmp: Path) -> None:
        tmp.write_bytes(text + data)

    return atomic_write(path, write)


def read_field_mha(path: Path | str) -> tuple[np.ndarray, Grid]:
    """Read an uncompressed MetaImage displacement field (3 float32 channels, mm LPS): ((3, Z, Y, X) voxels, grid)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BreathcastError(f"{path}: cannot read ({exc.strerror or exc})") from None
    header: dict[str, str] = {}
    offset = 0
    while offset < len(raw):
        end = raw.find(b"\n", offset)
        line = raw[offset : end if end >= 0 else len(raw)].decode("ascii", "replace").strip()
        offset = (end if end >= 0 else len(raw)) + 1
        key, _, value = line.partition("=")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    expected = {"NDims": "3", "ElementNumberOfChannels": "3", "ElementType": "MET_FLOAT", "ElementDataFile": "LOCAL"}
    for key, value in expected.items():
        if header.get(key) != value:
            raise BreathcastError(f"{path}: {key} is {header.get(key)!r}; a displacement field needs {value!r}")
    if header.get("CompressedData", "False") != "False" or header.get("BinaryDataByteOrderMSB", "False") != "False":
        raise BreathcastError(f"{path}: compressed or big-endian MetaImage data is not supported")
    nx, ny, nz = (int(v) for v in header["DimSize"].split())
    axes = np.asarray([float(v) for v in header.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]).reshape(3, 3)
    grid = Grid(
        shape=(nz, ny, nx),
        spacing=tuple(float(v) for v in header["ElementSpacing"].split()),
        origin=tuple(float(v) for v in header.get("Offset", "0 0 0").split()),
        direction=tuple(map(tuple, axes.T)),
    )
    n = 3 * nx * ny * nz
    if len(raw) - offset != 4 * n:
        raise BreathcastError(f"{path}: holds {len(raw) - offset} data bytes; DimSize says {4 * n}")
    lps = np.frombuffer(raw, dtype="<f4", count=n, offset=offset).reshape(nz, ny, nx, 3).transpose(3, 0, 1, 2)
    return field_from_lps_mm(np.ascontiguousarray(lps, dtype=np.float32), grid), grid


def export_field(
    u_voxels: np.ndarray,
    grid: Grid,
    path: Path | str,
    plan: SeriesIdentity | None = None,
    registered: SeriesIdentity | None = None,
) -> Path:
    """Export a (3, Z, Y, X) voxel field by file suffix: ``.dcm`` DICOM REG (needs ``plan``), ``.nii``/``.nii.gz``, ``.mha``.

    Every format stores mm along patient LPS, pull-back. Written atomically; returns ``path``. ``registered``:
    the REG's registered images (see :func:`build_deformable_registration`); ignored by the other formats.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".dcm"):
        if plan is None:
            raise BreathcastError(f"{path}: a DICOM registration must reference the planning CT; give its series")
        return write_deformable_registration(u_voxels, grid, plan, path, registered=registered)
    if name.endswith(".mha"):
        return write_field_mha(u_voxels, grid, path)
    if name.endswith((".nii", ".nii.gz")):
        return atomic_write(path, lambda tmp: dataset.write_field(u_voxels, grid, tmp))
    raise BreathcastError(f"{path}: unknown field format; use .dcm (DICOM REG), .nii.gz or .mha")


def read_exported_field(path: Path | str) -> tuple[np.ndarray, Grid]:
    """Read any file :func:`export_field` writes: ((3, Z, Y, X) float32 voxels (dz, dy, dx), its grid)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".mha"):
        return read_field_mha(path)
    if name.endswith((".nii", ".nii.gz")):
        return dataset.read_field(path)
    registration = read_deformable_registration(path)
    return registration.field_voxels(), registration.grid
