"""The one canonical frame the models see, and the way back to the patient's own storage order.

Every planning CT is reoriented before anything model-side sees it: its array axes are permuted and
flipped so that the index axes i, j, k run along +x, +y, +z of patient LPS (left, posterior, superior;
direction = identity, "head up"). The voxels are not interpolated, so nothing is lost and the mapping is
exact both ways. Storage order then never reaches a model: a CT stored head-first supine, feet-first or
prone gives the same canonical array for the same anatomy.

Oblique geometry (a direction matrix whose columns are not each along one LPS axis) is refused.

Physical quantities (positions and displacements in mm LPS) are the same in both frames; only arrays and
their grids change, through :func:`to_canonical` and :meth:`CanonicalFrame.to_stored`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scipy import ndimage

from breathcast.errors import BreathcastError
from breathcast.geometry import HU_MIN, Grid, Triplet, Volume, field_from_lps_mm, field_to_lps_mm

__all__ = [
    "AXIS_TOLERANCE",
    "PATIENT_POSITIONS",
    "CanonicalFrame",
    "canonical_frame",
    "to_canonical",
    "position_direction",
    "reorient",
    "flip_grid",
    "field_onto",
    "resample_onto",
]

AXIS_TOLERANCE = 1e-3
"""Largest off-axis component (of a unit direction vector) still taken as axis-aligned."""

PATIENT_POSITIONS: dict[str, tuple[Triplet, Triplet]] = {
    "HFS": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "HFP": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "FFS": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "FFP": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "HFDL": ((0.0, -1.0, 0.0), (1.0, 0.0, 0.0)),
    "HFDR": ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)),
    "FFDL": ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),
    "FFDR": ((0.0, -1.0, 0.0), (-1.0, 0.0, 0.0)),
}
"""PatientPosition (0018,5100) -> the (row, column) ImageOrientationPatient an axial scan of it is stored with.

Head-first positions give the slice normal (row x column) +z (superior), feet-first -z.
"""

Axes = tuple[int, int, int]
Flips = tuple[bool, bool, bool]


def _layout(direction: np.ndarray) -> tuple[Axes, Flips]:
    """For canonical array axis (z, y, x) = 0, 1, 2: the stored array axis it comes from, and whether it is reversed.

    Raises:
        BreathcastError: for a direction whose index axes do not each run along one LPS axis (oblique).
    """
    d = np.asarray(direction, dtype=np.float64)
    lps_axis = np.argmax(np.abs(d), axis=0)  # for index axis c (i, j, k), the LPS axis it runs along
    off_axis = np.abs(d) * (1 - np.eye(3)[lps_axis].T)
    if off_axis.max() > AXIS_TOLERANCE or len(set(lps_axis.tolist())) != 3:
        rows = "\\".join(f"{v:g}" for v in d.T[:2].ravel())
        raise BreathcastError(
            f"oblique geometry (ImageOrientationPatient {rows}) is not supported: "
            "resample the CT onto an axis-aligned grid first"
        )
    axes, flips = [], []
    for canonical_axis in range(3):  # array axis z, y, x <-> LPS axis 2, 1, 0
        c = int(np.flatnonzero(lps_axis == 2 - canonical_axis)[0])
        axes.append(2 - c)
        flips.append(bool(d[2 - canonical_axis, c] < 0))
    return tuple(axes), tuple(flips)


def _inverse(axes: Axes, flips: Flips) -> tuple[Axes, Flips]:
    """The layout that undoes (``axes``, ``flips``): stored array axis a is canonical axis ``inverse[a]``."""
    inverse = tuple(int(a) for a in np.argsort(axes))
    return inverse, tuple(flips[a] for a in inverse)


def _reorder(grid: Grid, axes: Axes, flips: Flips) -> Grid:
    """The grid of the same voxels with array axis c = ``grid``'s array axis ``axes[c]``, reversed when ``flips[c]``.

    Directions are snapped to the LPS axis they run along (within :data:`AXIS_TOLERANCE`).
    """
    d = grid.direction_matrix
    snapped = np.where(np.abs(d) == np.abs(d).max(axis=0, keepdims=True), np.sign(d), 0.0)
    direction = np.zeros((3, 3))
    spacing = [0.0, 0.0, 0.0]
    for c, (a, flip) in enumerate(zip(axes, flips)):  # new array axis c is index axis 2 - c
        direction[:, 2 - c] = snapped[:, 2 - a] * (-1.0 if flip else 1.0)
        spacing[2 - c] = grid.spacing[2 - a]
    first = np.zeros(3)  # the old (z, y, x) index of the new voxel [0, 0, 0]
    for a, flip in zip(axes, flips):
        first[a] = grid.shape[a] - 1 if flip else 0
    return Grid(
        shape=tuple(grid.shape[a] for a in axes),
        spacing=tuple(spacing),
        origin=tuple(grid.index_to_lps(first)),
        direction=tuple(map(tuple, direction)),
        frame_of_reference_uid=grid.frame_of_reference_uid,
    )


def flip_grid(grid: Grid, flips: Flips) -> Grid:
    """The grid of the same voxels with array axis (z, y, x) reversed where ``flips`` says (arrays: ``np.flip``).

    Example:
        >>> flip_grid(Grid((2, 1, 1), (1.0, 1.0, 3.0)), (True, False, False)).origin
        (0.0, 0.0, 3.0)
    """
    return _reorder(grid, (0, 1, 2), tuple(bool(f) for f in flips))


@dataclass(frozen=True)
class CanonicalFrame:
    """How a stored grid maps onto its canonical grid.

    Args:
        stored: the grid as the data was stored (any axis-aligned direction).
        canonical: the same voxels with identity direction.
        axes: (3,) for canonical array axis (z, y, x) = 0, 1, 2, the stored array axis it comes from.
        flips: (3,) for each canonical array axis, whether the stored axis runs the other way.
    """

    stored: Grid
    canonical: Grid
    axes: Axes
    flips: Flips

    @property
    def is_identity(self) -> bool:
        """True when the stored grid already is canonical."""
        return self.axes == (0, 1, 2) and not any(self.flips)

    def to_canonical_array(self, array: np.ndarray) -> np.ndarray:
        """A stored-order array (..., Z, Y, X) as canonical order (a view when possible)."""
        lead = array.ndim - 3
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.axes))
        flip = tuple(lead + a for a, f in enumerate(self.flips) if f)
        return np.flip(out, flip) if flip else out

    def to_stored(self, array: np.ndarray) -> np.ndarray:
        """A canonical-order array (..., Z, Y, X) back in the stored order (a view when possible)."""
        lead = array.ndim - 3
        flip = tuple(lead + a for a, f in enumerate(self.flips) if f)
        out = np.flip(array, flip) if flip else array
        inverse = np.argsort(self.axes)
        return np.transpose(out, tuple(range(lead)) + tuple(lead + int(a) for a in inverse))

    def stored_grid(self, canonical: Grid) -> Grid:
        """A canonical grid of any shape and box (e.g. the model grid) laid out as the stored data is.

        Args:
            canonical: a grid with identity direction, shape (Z, Y, X) in canonical order.

        Returns:
            The grid of the same points whose array axes run as the stored grid's do (its shape is
            ``canonical.shape`` permuted into stored order).
        """
        if self.is_identity:
            return canonical
        return _reorder(canonical, *_inverse(self.axes, self.flips))

    def volume_to_stored(self, volume: Volume) -> Volume:
        """A volume on a canonical grid (e.g. the warped plan) in the stored layout; values unchanged."""
        if self.is_identity:
            return volume
        return Volume(np.ascontiguousarray(self.to_stored(volume.array)), self.stored_grid(volume.grid))

    def field_to_stored(self, u_voxels: np.ndarray, canonical: Grid) -> tuple[np.ndarray, Grid]:
        """A field on a canonical grid as the same physical field in the stored layout.

        Args:
            u_voxels: (3, Z, Y, X) float32 on ``canonical``, components (dz, dy, dx) in voxels, pull-back.
            canonical: its grid (identity direction).

        Returns:
            ((3, Z', Y', X') float32 voxels (dz, dy, dx) of the stored layout, that grid): at every point
            the same displacement in mm LPS.
        """
        if self.is_identity:
            return u_voxels, canonical
        lps = self.to_stored(field_to_lps_mm(u_voxels, canonical))
        grid = self.stored_grid(canonical)
        return field_from_lps_mm(np.ascontiguousarray(lps), grid), grid


def canonical_frame(grid: Grid) -> CanonicalFrame:
    """The canonical frame of ``grid``; raises :class:`BreathcastError` for oblique geometry.

    Example:
        >>> ffs = Grid((4, 5, 6), (1.0, 1.0, 2.0), origin=(10.0, 0.0, 0.0),
        ...            direction=((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)))
        >>> frame = canonical_frame(ffs)
        >>> frame.flips, frame.canonical.origin
        ((True, False, True), (5.0, 0.0, -6.0))
    """
    axes, flips = _layout(grid.direction_matrix)
    return CanonicalFrame(stored=grid, canonical=_reorder(grid, axes, flips), axes=axes, flips=flips)


def to_canonical(volume: Volume) -> tuple[Volume, CanonicalFrame]:
    """``volume`` reoriented to the canonical frame (no interpolation), and the frame to go back."""
    frame = canonical_frame(volume.grid)
    if frame.is_identity:
        return volume, frame
    return Volume(np.ascontiguousarray(frame.to_canonical_array(volume.array)), frame.canonical), frame


def position_direction(position: str) -> np.ndarray:
    """(3, 3) direction (columns: row, column, slice normal) of an axial scan stored for ``position``.

    Example:
        >>> position_direction("FFS")[:, 2].tolist()
        [0.0, 0.0, -1.0]
    """
    if position not in PATIENT_POSITIONS:
        raise BreathcastError(f"unknown patient position {position!r}; one of {', '.join(PATIENT_POSITIONS)}")
    row, column = (np.asarray(v) for v in PATIENT_POSITIONS[position])
    return np.stack([row, column, np.cross(row, column)], axis=1)


def reorient(volume: Volume, direction: np.ndarray) -> Volume:
    """The same voxels laid out so the grid has ``direction`` (axis-aligned; no interpolation).

    Args:
        volume: any axis-aligned volume (Z, Y, X).
        direction: (3, 3) columns = LPS directions of the index axes i, j, k wanted, each along one LPS axis,
            e.g. :func:`position_direction` ("FFS").

    Returns:
        A volume whose grid has ``direction``, covering the same voxels with the same values.
    """
    canonical, _ = to_canonical(volume)
    axes, flips = _layout(direction)
    inverse, inverse_flips = _inverse(axes, flips)
    grid = _reorder(canonical.grid, inverse, inverse_flips)
    frame = CanonicalFrame(stored=grid, canonical=canonical.grid, axes=axes, flips=flips)
    return Volume(np.ascontiguousarray(frame.to_stored(canonical.array)), grid)


def field_onto(u_voxels: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    """A field sampled at the voxel centres of another canonical grid (e.g. the model box onto the whole CT).

    Trilinear in each mm LPS component; a point outside ``grid`` takes the value at its nearest face (the
    field is continued, as the warp continues the image). Both grids must be canonical (identity direction).

    Args:
        u_voxels: (3, Z, Y, X) float32 on ``grid``, (dz, dy, dx) voxels, pull-back.
        grid: its grid.
        target: the grid to sample on, shape (Z', Y', X').

    Returns:
        (3, Z', Y', X') float32, (dz, dy, dx) voxels of ``target``.

    Example:
        >>> g = Grid((2, 2, 2), (1.0, 1.0, 1.0)); u = np.zeros((3, 2, 2, 2), np.float32); u[2, :, :, 1] = 1.0
        >>> fine = Grid((1, 1, 4), (0.5, 1.0, 1.0), origin=(-0.25, 0.0, 0.0))  # x = -0.25 .. 1.25 mm
        >>> (field_onto(u, g, fine)[2, 0, 0] * 0.5).tolist()  # mm: edge value held outside [0, 1]
        [0.0, 0.25, 0.75, 1.0]
    """
    lps = field_to_lps_mm(u_voxels, grid)
    sampled = np.stack([resample_onto(Volume(c, grid), target, fill=None, antialias=False).array for c in lps])
    return field_from_lps_mm(sampled, target)


def resample_onto(volume: Volume, grid: Grid, fill: float | None = HU_MIN, order: int = 1, antialias: bool = True) -> Volume:
    """Sample a canonical ``volume`` at the voxel centres of the canonical ``grid``, by position.

    Args:
        volume: the source, identity direction.
        grid: where to sample, identity direction.
        fill: the value outside ``volume`` (default air, -1000 HU); None: the value at its nearest face.
        order: 1 linear, 0 nearest (label maps).
        antialias: when ``grid`` is coarser, a Gaussian filter first (sigma = (ratio - 1) / 2 source voxels, the
            skimage convention); linear only.
    """
    for g, name in ((volume.grid, "volume"), (grid, "target grid")):
        if not np.allclose(g.direction_matrix, np.eye(3)):
            raise BreathcastError(f"resample_onto needs canonical grids; the {name} is not (see breathcast.canonical)")
    src = volume.array
    ratio = np.asarray(grid.spacing_zyx) / np.asarray(volume.grid.spacing_zyx)
    if order > 0:
        src = src.astype(np.float32)
        if antialias and np.any(ratio > 1):
            src = ndimage.gaussian_filter(src, sigma=np.maximum(0.0, (ratio - 1.0) / 2.0), mode="nearest")
    # Axis-aligned grids: source index = offset + ratio * target index, along each array axis (z, y, x).
    offset = (np.asarray(grid.origin) - np.asarray(volume.grid.origin))[::-1] / np.asarray(volume.grid.spacing_zyx)
    out = ndimage.affine_transform(src, ratio, offset=offset, output_shape=grid.shape, order=order,
                                   mode="nearest" if fill is None else "constant", cval=0.0 if fill is None else fill)
    return Volume(out.astype(volume.array.dtype if order == 0 else np.float32), grid)
