"""RT Structure Sets (PS3.3 A.19): named ROIs as closed planar contours in patient mm, to masks and back.

Reading checks that the structure set belongs to the CT it is rasterised on: the Frame of Reference of
its ``ReferencedFrameOfReferenceSequence`` (and of the ROI) must equal the grid's, otherwise the contours
are in another patient coordinate system and the result would be silently wrong. A ROI's CLOSED_PLANAR
contours (LPS mm) are filled per axial slice of the grid with the even-odd rule, so a contour inside
another of the same ROI on the same slice is a hole; a voxel belongs to the ROI when its centre is inside
or on a contour (within 0.001 voxel): the contour is the ROI's outline, so contours drawn through the centres of
a mask's edge voxels (rt-utils, OpenCV) give that mask back, and no edge is dropped on one side only.
Contours must lie on the grid's slices (within 10 % of the slice spacing): structure sets are drawn on
the CT's own slices. POINT and OPEN contours carry no volume and are refused for masks.

Writing makes a structure set from boolean masks on a CT grid: per slice, the 0.5 iso-line of the mask
(``contourpy``, the contouring library under matplotlib) through the voxel-edge midpoints, so filling
those contours gives the mask back (up to voxels that touch only at a corner).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

import contourpy
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import RTStructureSetStorage

from breathcast.io.dicom_io import SeriesIdentity, instance_references, new_dataset, new_uid, read_dicom_file, save_dataset, set_equipment
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume, resample_volume

__all__ = [
    "Roi",
    "StructureSet",
    "read_rtstruct",
    "roi_mask",
    "polygon_cover",
    "resample_mask",
    "mask_to_contours",
    "write_rtstruct",
    "write_rtstruct_contours",
]

log = logging.getLogger(__name__)

_PLANE_TOLERANCE = 0.1  # fraction of a slice: how far a contour may sit off the grid's slice plane
_ON_EDGE = 1e-3  # voxels: a voxel centre this close to a contour lies on it (and belongs to the ROI)
_EDGE_CHUNK = 64  # polygon edges tested at once
_COLOURS = ((255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (0, 200, 200), (200, 0, 200))


@dataclass(frozen=True)
class Roi:
    """One ROI of a structure set.

    Args:
        number: ROI Number (3006,0022).
        name: ROI Name (3006,0026).
        frame_of_reference_uid: the ROI's Referenced Frame of Reference UID.
        contours: each (N, 3) float64, points (x, y, z) in mm patient LPS.
        geometric_types: ContourGeometricType of each contour, e.g. "CLOSED_PLANAR", "POINT".
    """

    number: int
    name: str
    frame_of_reference_uid: str
    contours: tuple[np.ndarray, ...] = field(repr=False)
    geometric_types: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True)
class StructureSet:
    """An RT Structure Set as read.

    Args:
        path: the file it came from (named in every error).
        frame_of_reference_uid: the Frame of Reference its contours are in.
        referenced_series_uids: SeriesInstanceUIDs of the images it was drawn on.
        rois: the ROIs in file order.
    """

    path: Path
    frame_of_reference_uid: str
    referenced_series_uids: tuple[str, ...]
    rois: tuple[Roi, ...]

    @property
    def roi_names(self) -> list[str]:
        """ROI names in file order."""
        return [roi.name for roi in self.rois]

    def roi(self, name: str) -> Roi:
        """The ROI called ``name`` (exact match first, then case-insensitive)."""
        for match in (lambda r: r.name == name, lambda r: r.name.lower() == name.lower()):
            found = [roi for roi in self.rois if match(roi)]
            if found:
                return found[0]
        raise BreathcastError(f"{self.path}: no ROI named {name!r}; it has {self.roi_names}")


def read_rtstruct(path: Path | str) -> StructureSet:
    """Read an RT Structure Set file.

    Raises:
        BreathcastError: naming the file, when it is not DICOM, not an RTSTRUCT, or names no single Frame
            of Reference.
    """
    path = Path(path)
    if not path.is_file():
        raise BreathcastError(f"{path}: no such file")
    ds = read_dicom_file(path)
    if ds is None:
        raise BreathcastError(f"{path}: not a DICOM file")
    if str(ds.get("Modality", "")) != "RTSTRUCT" and str(ds.get("SOPClassUID", "")) != RTStructureSetStorage:
        raise BreathcastError(
            f"{path}: modality is {ds.get('Modality', 'missing')}; expected an RT Structure Set (RTSTRUCT)"
        )
    frames = [str(item.get("FrameOfReferenceUID", "")) for item in ds.get("ReferencedFrameOfReferenceSequence", [])]
    frames = [f for f in frames if f]
    if len(set(frames)) != 1:
        raise BreathcastError(
            f"{path}: ReferencedFrameOfReferenceSequence names {len(set(frames))} Frames of Reference; expected one"
        )
    series = []
    for item in ds.ReferencedFrameOfReferenceSequence:
        for study in item.get("RTReferencedStudySequence", []):
            series += [
                str(s.SeriesInstanceUID)
                for s in study.get("RTReferencedSeriesSequence", [])
                if "SeriesInstanceUID" in s
            ]
    contours_by_number = {}
    for item in ds.get("ROIContourSequence", []):
        contours_by_number[int(item.ReferencedROINumber)] = item.get("ContourSequence", [])
    rois = []
    for item in ds.get("StructureSetROISequence", []):
        number = int(item.ROINumber)
        contours, types = [], []
        for contour in contours_by_number.get(number, []):
            points = np.asarray([float(v) for v in contour.get("ContourData", [])], dtype=np.float64)
            if points.size == 0 or points.size % 3:
                raise BreathcastError(
                    f"{path}: ROI {item.get('ROIName', number)!r} has a contour of {points.size} values, not (x, y, z) triples"
                )
            contours.append(points.reshape(-1, 3))
            types.append(str(contour.get("ContourGeometricType", "")))
        roi_frame = str(item.get("ReferencedFrameOfReferenceUID", "")) or frames[0]
        rois.append(Roi(number, str(item.get("ROIName", "")), roi_frame, tuple(contours), tuple(types)))
    return StructureSet(path, frames[0], tuple(series), tuple(rois))


def _check_frame(structure_set: StructureSet, roi: Roi, grid: Grid) -> None:
    if not grid.frame_of_reference_uid:
        raise BreathcastError(
            f"{structure_set.path}: the target grid has no Frame of Reference UID, so the structure set cannot be "
            "checked against it; use the grid of the CT it was drawn on"
        )
    for what, frame in (
        ("structure set", structure_set.frame_of_reference_uid),
        (f"ROI {roi.name!r}", roi.frame_of_reference_uid),
    ):
        if frame != grid.frame_of_reference_uid:
            raise BreathcastError(
                f"{structure_set.path}: {what} is in Frame of Reference {frame}, the CT in {grid.frame_of_reference_uid}; "
                "it belongs to another scan"
            )


def roi_mask(structure_set: StructureSet, name: str, grid: Grid) -> np.ndarray:
    """Rasterise a ROI's closed planar contours onto the CT grid it was drawn on.

    Args:
        structure_set: from :func:`read_rtstruct`.
        name: ROI name, e.g. "GTV".
        grid: the CT grid; its Frame of Reference UID must be the structure set's, and the contours must lie
            on its slices.

    Returns:
        (Z, Y, X) bool mask: True where the voxel centre is inside the ROI or on one of its contours.
    """
    roi = structure_set.roi(name)
    _check_frame(structure_set, roi, grid)
    closed = [c for c, kind in zip(roi.contours, roi.geometric_types) if kind == "CLOSED_PLANAR"]
    if not closed:
        kinds = sorted(set(roi.geometric_types)) or ["no contours"]
        raise BreathcastError(
            f"{structure_set.path}: ROI {roi.name!r} has no CLOSED_PLANAR contours ({', '.join(kinds)}); it has no volume"
        )
    interior = np.zeros(grid.shape, dtype=bool)
    boundary = np.zeros(grid.shape, dtype=bool)
    ny, nx = grid.shape[1:]
    for points in closed:
        index = grid.lps_to_index(points)  # (N, 3) fractional (z, y, x)
        z = float(np.mean(index[:, 0]))
        k = int(round(z))
        if np.max(np.abs(index[:, 0] - k)) > _PLANE_TOLERANCE:
            raise BreathcastError(
                f"{structure_set.path}: a contour of ROI {roi.name!r} is not on a slice of the CT grid "
                f"(index z {index[:, 0].min():.2f}..{index[:, 0].max():.2f}); rasterise on the grid it was drawn on"
            )
        if not 0 <= k < grid.shape[0]:
            log.debug("%s: contour of %s outside the grid (slice %d), skipped", structure_set.path, roi.name, k)
            continue
        yx = index[:, 1:]
        lo = np.maximum(np.floor(yx.min(axis=0) - _ON_EDGE).astype(int), 0)
        hi = np.minimum(np.ceil(yx.max(axis=0) + _ON_EDGE).astype(int) + 1, (ny, nx))
        if np.any(hi <= lo):
            continue
        jj, ii = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]
        inside, on_edge = polygon_cover(yx, np.column_stack([jj.ravel(), ii.ravel()]).astype(np.float64))
        box = (k, slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        interior[box] ^= inside.reshape(ii.shape)  # even-odd: a contour inside another of the ROI is a hole
        boundary[box] |= on_edge.reshape(ii.shape)
    return interior | boundary


def polygon_cover(polygon: np.ndarray, points: np.ndarray, tolerance: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Which points lie strictly inside a closed polygon (even-odd rule), and which on its edges.

    A point on an edge (within ``tolerance``) is reported on the edge, not inside; :func:`roi_mask` counts it
    in the ROI (the contour is the ROI's outline: voxel centres on it belong to it, for outer contours and
    holes alike), as contours drawn through the centres of a mask's edge voxels expect.

    Args:
        polygon: (N, 2) vertices (first not repeated), any units.
        points: (M, 2) query points in the same units.
        tolerance: distance from an edge still counted on it, same units.

    Returns:
        ((M,) bool strictly inside, (M,) bool on an edge).

    Example:
        >>> square = np.array([[0.0, 0.0], [0.0, 2.0], [2.0, 2.0], [2.0, 0.0]])
        >>> inside, edge = polygon_cover(square, np.array([[1.0, 1.0], [0.0, 1.0], [3.0, 1.0]]))
        >>> inside.tolist(), edge.tolist()
        ([True, False, False], [False, True, False])
    """
    a = np.asarray(polygon, dtype=np.float64)
    b = np.roll(a, -1, axis=0)
    p = np.asarray(points, dtype=np.float64)
    parity = np.zeros(len(p), dtype=bool)
    on_edge = np.zeros(len(p), dtype=bool)
    for start in range(0, len(a), _EDGE_CHUNK):  # (M, chunk) arrays: bounded memory on large contours
        a0, b0 = a[start : start + _EDGE_CHUNK].T[:, None, :], b[start : start + _EDGE_CHUNK].T[:, None, :]
        px, py = p[:, 0:1], p[:, 1:2]
        # Crossing number along +x (PS3.3 C.8.8.6: the contour encloses the ROI on its plane)
        straddles = (a0[1] > py) != (b0[1] > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = a0[0] + (py - a0[1]) * (b0[0] - a0[0]) / (b0[1] - a0[1])
        parity ^= np.logical_xor.reduce(straddles & (px < x_cross), axis=1)
        edge = b0 - a0
        length2 = np.maximum((edge**2).sum(axis=0), 1e-300)
        t = np.clip(((px - a0[0]) * edge[0] + (py - a0[1]) * edge[1]) / length2, 0.0, 1.0)
        distance2 = (px - a0[0] - t * edge[0]) ** 2 + (py - a0[1] - t * edge[1]) ** 2
        on_edge |= (distance2 <= tolerance**2).any(axis=1)
    return parity & ~on_edge, on_edge


def resample_mask(mask: Volume, shape: tuple[int, int, int]) -> Volume:
    """A mask on the grid of ``shape`` (Z, Y, X) over the same field of view (e.g. the model grid).

    The mask is resampled as a volume fraction (trilinear, anti-aliased when shrinking) and thresholded at
    0.5, so a small target keeps about its volume instead of vanishing between nearest-neighbour samples.

    Returns:
        A bool :class:`Volume` on ``mask.grid.with_shape(shape)``.

    Example:
        >>> m = np.zeros((8, 8, 8), bool); m[2:6, 2:6, 2:6] = True
        >>> int(resample_mask(Volume(m, Grid((8, 8, 8), (1.0, 1.0, 1.0))), (4, 4, 4)).array.sum())
        8
    """
    fraction = resample_volume(Volume(mask.array.astype(np.float32), mask.grid), shape)
    return Volume(fraction.array >= 0.5, fraction.grid)


def mask_to_contours(mask: np.ndarray, grid: Grid) -> list[np.ndarray]:
    """Closed planar contours (LPS mm) of a (Z, Y, X) boolean mask, one or more per slice that has voxels.

    Returns:
        A list of (N, 3) float64 arrays of points (x, y, z) in mm, each a closed polygon (first point not
        repeated), on the plane of its slice.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != grid.shape:
        raise BreathcastError(f"mask has shape {mask.shape}; the grid says {grid.shape}")
    out = []
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        padded = np.pad(mask[k].astype(np.float64), 1)  # closes contours at the image border
        generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
        for line in generator.lines(0.5):  # (N, 2) points (x, y) in padded index units
            if np.allclose(line[0], line[-1]):
                line = line[:-1]
            if len(line) < 3:
                continue
            index = np.column_stack([np.full(len(line), float(k)), line[:, 1] - 1.0, line[:, 0] - 1.0])
            out.append(grid.index_to_lps(index))
    return out


def _ds_list(points: np.ndarray) -> list[str]:
    return [f"{v:.4f}" for v in points.ravel()]  # 0.1 micrometre; keeps ContourData short


def write_rtstruct(
    masks: dict[str, np.ndarray], grid: Grid, ct: SeriesIdentity, path: Path | str, label: str = "breathcast"
) -> Path:
    """Write boolean masks on a CT grid as an RT Structure Set referencing that CT series.

    Args:
        masks: ROI name -> (Z, Y, X) bool mask on ``grid``, contoured by :func:`mask_to_contours`.
        grid: the CT grid (``ct``'s slices, in array order).
        ct: identity of the CT series the masks were drawn on (patient, study, Frame of Reference, SOP
            Instance UIDs per slice).
        path: the output file; written atomically.
        label: StructureSetLabel.

    Returns:
        ``path``.
    """
    for name, mask in masks.items():
        if np.shape(mask) != grid.shape:
            raise BreathcastError(f"mask {name!r} has shape {np.shape(mask)}; the grid says {grid.shape}")
    contours = {name: mask_to_contours(mask, grid) for name, mask in masks.items()}
    return write_rtstruct_contours(contours, grid, ct, path, label)


def write_rtstruct_contours(
    contours: dict[str, list[np.ndarray]], grid: Grid, ct: SeriesIdentity, path: Path | str, label: str = "breathcast"
) -> Path:
    """Write closed planar contours as an RT Structure Set referencing the CT series they were drawn on.

    Args:
        contours: ROI name -> polygons, each (N, 3) float points (x, y, z) mm LPS on one slice of ``grid``
            (first point not repeated).
        grid, ct, path, label: as :func:`write_rtstruct`.

    Returns:
        ``path``.
    """
    if len(ct.sop_instance_uids) != grid.shape[0]:
        raise BreathcastError(f"CT series has {len(ct.sop_instance_uids)} slices; the grid has {grid.shape[0]}")
    if grid.frame_of_reference_uid and grid.frame_of_reference_uid != ct.frame_of_reference_uid:
        raise BreathcastError(
            f"grid is in Frame of Reference {grid.frame_of_reference_uid}; the CT in {ct.frame_of_reference_uid}"
        )
    ds = new_dataset(RTStructureSetStorage)
    ct.apply_patient_and_study(ds)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = 902
    ds.SeriesDescription = f"{label} structures"[:64]
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = ct.frame_of_reference_uid
    ds.PositionReferenceIndicator = ct.position_reference_indicator
    set_equipment(ds)
    today = datetime.datetime.now()
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDate = today.strftime("%Y%m%d")
    ds.StructureSetTime = today.strftime("%H%M%S")
    ds.InstanceNumber = 1
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(ct)])
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    for number, (name, polygons) in enumerate(contours.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = ct.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        ds.StructureSetROISequence.append(roi)
        ds.ROIContourSequence.append(_roi_contours(number, name, polygons, grid, ct))
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = ""
        observation.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(observation)
    return save_dataset(ds, path)


def _referenced_frame(ct: SeriesIdentity) -> Dataset:
    images = instance_references(ct)
    series = Dataset()
    series.SeriesInstanceUID = ct.series_instance_uid
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = (
        "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), as PS3.3 C.8.8.5 asks
    )
    study.ReferencedSOPInstanceUID = ct.study_instance_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ct.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _roi_contours(number: int, name: str, polygons: list[np.ndarray], grid: Grid, ct: SeriesIdentity) -> Dataset:
    item = Dataset()
    item.ReferencedROINumber = number
    item.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
    item.ContourSequence = DicomSequence()
    images = ct.instances()
    for points in polygons:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        z = grid.lps_to_index(points)[:, 0]
        k = int(round(float(z[0])))
        if len(points) < 3 or not 0 <= k < grid.shape[0] or np.abs(z - k).max() > _PLANE_TOLERANCE:
            raise BreathcastError(f"ROI {name!r}: a contour of {len(points)} points is not a polygon on a slice of the grid")
        contour = Dataset()
        contour.ContourImageSequence = DicomSequence([images[k].item()])
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = len(points)
        contour.ContourData = _ds_list(points)
        item.ContourSequence.append(contour)
    return item
