"""Geometry that travels with arrays: :class:`Grid`, :class:`Volume`, resampling, and field units.

Conventions (DESIGN.md), written once here:

* Arrays are indexed ``[z, y, x]`` (slice, row, column).
* A :class:`Grid` follows ITK/SimpleITK: ``spacing`` is (x, y, z) in mm, i.e. along the index axes
  (i = column, j = row, k = slice); ``origin`` is the patient LPS position (mm) of the centre of voxel
  ``[0, 0, 0]``; ``direction`` is a 3x3 matrix whose columns are the LPS unit vectors of the i, j, k axes.
  So the voxel ``[k, j, i]`` sits at ``origin + direction @ (spacing * (i, j, k))``.
* Displacement and velocity fields inside the code have shape ``(3, Z, Y, X)``, components in array-axis
  order (dz, dy, dx), in voxels, pull-back: ``warped(x) = moving(x + u(x))``. Anything that leaves the
  process converts them with :func:`field_to_lps_mm` (components (x, y, z) in mm, patient LPS).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from breathcast.errors import BreathcastError

__all__ = [
    "Triplet",
    "Grid",
    "Volume",
    "HU_MIN",
    "HU_MAX",
    "hu_to_unit",
    "unit_to_hu",
    "field_to_lps_mm",
    "field_from_lps_mm",
    "resample_volume",
    "resample_field",
    "grid_difference",
]

Triplet = tuple[float, float, float]
"""Three floats; the docstring of each use says the order, (x, y, z) or (z, y, x)."""

HU_MIN = -1000.0
HU_MAX = 400.0

_ORIGIN_TOLERANCE_MM = 1e-3
_SPACING_TOLERANCE_MM = 1e-4
_DIRECTION_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Grid:
    """A voxel grid in patient space.

    Args:
        shape: (Z, Y, X) voxels, array-axis order.
        spacing: (x, y, z) voxel size in mm, along the index axes i, j, k.
        origin: (x, y, z) patient LPS position of the centre of voxel [0, 0, 0], mm.
        direction: 3x3, columns are the LPS unit vectors of the i, j, k axes (row-major nested tuples).
        frame_of_reference_uid: DICOM Frame of Reference UID, "" when unknown.

    Example:
        >>> Grid.centered((64, 64, 64), extent_mm=(384.0, 384.0, 320.0)).spacing
        (6.0, 6.0, 5.0)
    """

    shape: tuple[int, int, int]
    spacing: Triplet
    origin: Triplet = (0.0, 0.0, 0.0)
    direction: tuple[Triplet, Triplet, Triplet] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    frame_of_reference_uid: str = ""

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise BreathcastError(f"grid shape must be three positive sizes (Z, Y, X), got {self.shape}")
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise BreathcastError(f"grid spacing must be three positive mm values (x, y, z), got {self.spacing}")
        direction = np.asarray(self.direction, dtype=float)
        if direction.shape != (3, 3) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise BreathcastError(f"grid direction must be an orthonormal 3x3 matrix, got {self.direction}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(tuple(float(v) for v in row) for row in direction))

    @classmethod
    def centered(cls, shape: tuple[int, int, int], extent_mm: Triplet) -> Grid:
        """An axial grid of ``shape`` (Z, Y, X) covering ``extent_mm`` (x, y, z), centred on LPS (0, 0, 0)."""
        nz, ny, nx = shape
        spacing = (extent_mm[0] / nx, extent_mm[1] / ny, extent_mm[2] / nz)
        origin = tuple(-0.5 * e + 0.5 * s for e, s in zip(extent_mm, spacing))
        return cls(shape=shape, spacing=spacing, origin=origin)

    @property
    def spacing_zyx(self) -> Triplet:
        """Voxel size in mm in array-axis order (z, y, x)."""
        return self.spacing[::-1]

    @property
    def extent_mm(self) -> Triplet:
        """Field of view (x, y, z) in mm, voxel edge to voxel edge."""
        return tuple(s * n for s, n in zip(self.spacing, self.shape[::-1]))

    @property
    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64; columns are the LPS directions of the i, j, k index axes."""
        return np.asarray(self.direction, dtype=np.float64)

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) float64 mapping homogeneous index (i, j, k, 1) to LPS (x, y, z, 1) in mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    def index_to_lps(self, index_zyx: np.ndarray) -> np.ndarray:
        """Voxel indices ``(..., 3)`` in (z, y, x) order to LPS positions ``(..., 3)`` (x, y, z) in mm."""
        ijk = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS positions ``(..., 3)`` (x, y, z) in mm to fractional voxel indices ``(..., 3)`` (z, y, x)."""
        inverse = np.linalg.inv(self.affine)
        ijk = np.asarray(lps, dtype=np.float64) @ inverse[:3, :3].T + inverse[:3, 3]
        return ijk[..., ::-1]

    def with_shape(self, shape: tuple[int, int, int]) -> Grid:
        """The grid of ``shape`` (Z, Y, X) covering the same field of view (voxel edges aligned)."""
        scale = np.asarray(self.shape[::-1], dtype=float) / np.asarray(shape[::-1], dtype=float)
        spacing = np.asarray(self.spacing) * scale
        # The first voxel centre moves by half the change of voxel size, along each index axis.
        origin = np.asarray(self.origin) + self.direction_matrix @ (0.5 * (spacing - np.asarray(self.spacing)))
        return replace(self, shape=tuple(shape), spacing=tuple(spacing), origin=tuple(origin))

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.2f}" for s in self.spacing)
        org = ", ".join(f"{o:.1f}" for o in self.origin)
        return f"Grid(shape (Z, Y, X): {self.shape}; spacing (x, y, z): ({sp}) mm; origin LPS: ({org}) mm)"


@dataclass(frozen=True, repr=False)
class Volume:
    """An image (or label map) with the grid that places it in the patient.

    Args:
        array: (Z, Y, X) voxel values; CT in HU, or in [0, 1] after :func:`hu_to_unit`, or integer labels.
        grid: where the voxels are; ``grid.shape`` must equal ``array.shape``.
    """

    array: np.ndarray
    grid: Grid = field()

    def __post_init__(self) -> None:
        if self.array.ndim != 3 or tuple(self.array.shape) != self.grid.shape:
            raise BreathcastError(f"volume array has shape {self.array.shape}; its grid says {self.grid.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume on the same grid holding ``array`` (Z, Y, X)."""
        return Volume(array, self.grid)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.2f}" for s in self.grid.spacing)
        mib = self.array.nbytes / 2**20
        return (
            f"Volume(shape (Z, Y, X): {self.shape}; spacing (x, y, z): ({sp}) mm; "
            f"dtype: {self.array.dtype}; memory: {mib:.1f} MiB)"
        )


def hu_to_unit(hu: np.ndarray) -> np.ndarray:
    """CT intensities: clip to [-1000, 400] HU and scale to [0, 1] (float32), as in the paper (§4).

    Example:
        >>> hu_to_unit(np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])).tolist()
        [0.0, 0.0, 0.5, 1.0, 1.0]
    """
    hu = np.asarray(hu, dtype=np.float32)
    return ((np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)).astype(np.float32)


def unit_to_hu(unit: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hu_to_unit` on [0, 1] (float32 HU)."""
    return (np.asarray(unit, dtype=np.float32) * (HU_MAX - HU_MIN) + HU_MIN).astype(np.float32)


def _check_field(u: np.ndarray, grid: Grid) -> None:
    if u.ndim != 4 or u.shape[0] != 3 or tuple(u.shape[1:]) != grid.shape:
        raise BreathcastError(f"field must have shape (3, {', '.join(map(str, grid.shape))}), got {u.shape}")


def field_to_lps_mm(u_voxels: np.ndarray, grid: Grid) -> np.ndarray:
    """Internal field to patient space: the one function that leaves the process's units.

    Args:
        u_voxels: (3, Z, Y, X), components (dz, dy, dx) in voxels along the array axes.
        grid: the grid the field lives on.

    Returns:
        (3, Z, Y, X) float32, components (x, y, z) in mm along patient LPS.

    Example:
        >>> g = Grid((2, 2, 2), spacing=(2.0, 3.0, 4.0))
        >>> u = np.zeros((3, 2, 2, 2)); u[0] = 1.0  # one slice up
        >>> field_to_lps_mm(u, g)[:, 0, 0, 0].tolist()
        [0.0, 0.0, 4.0]
    """
    _check_field(u_voxels, grid)
    ijk_mm = u_voxels[::-1].astype(np.float64) * np.asarray(grid.spacing)[:, None, None, None]
    lps = np.einsum("ab,b...->a...", grid.direction_matrix, ijk_mm)
    return lps.astype(np.float32)


def field_from_lps_mm(u_lps_mm: np.ndarray, grid: Grid) -> np.ndarray:
    """Inverse of :func:`field_to_lps_mm`: (3, Z, Y, X) (x, y, z) mm LPS -> (dz, dy, dx) voxels, float32."""
    _check_field(u_lps_mm, grid)
    ijk_mm = np.einsum("ba,b...->a...", grid.direction_matrix, u_lps_mm.astype(np.float64))
    voxels = ijk_mm / np.asarray(grid.spacing)[:, None, None, None]
    return voxels[::-1].astype(np.float32)


def _zoom(array: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    factors = np.asarray(shape, dtype=float) / np.asarray(array.shape, dtype=float)
    source = array
    if order > 0 and np.any(factors < 1):
        # Anti-alias before shrinking (the skimage convention, sigma = (downscale - 1) / 2).
        sigma = np.maximum(0.0, (1.0 / factors - 1.0) / 2.0)
        source = ndimage.gaussian_filter(array.astype(np.float32), sigma=sigma, mode="nearest")
    out = ndimage.zoom(source, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # zoom rounds sizes; pad/crop the odd voxel
        out = out[tuple(slice(0, n) for n in shape)]
        out = np.pad(out, [(0, n - m) for n, m in zip(shape, out.shape)], mode="edge")
    return out


def resample_volume(volume: Volume, shape: tuple[int, int, int], labels: bool = False) -> Volume:
    """Resample to ``shape`` (Z, Y, X) over the same field of view (e.g. a planning CT to the model grid).

    Args:
        volume: the source volume.
        shape: target (Z, Y, X).
        labels: nearest-neighbour for label maps; otherwise trilinear with anti-aliasing when shrinking.

    Returns:
        A new :class:`Volume` on ``volume.grid.with_shape(shape)``; float32 unless ``labels``.
    """
    if min(shape) < 1:
        raise BreathcastError(f"resample target shape must be positive, got {shape}")
    array = volume.array if labels else volume.array.astype(np.float32)
    out = _zoom(array, tuple(shape), order=0 if labels else 1)
    return Volume(out.astype(volume.array.dtype if labels else np.float32), volume.grid.with_shape(tuple(shape)))


def resample_field(u_voxels: np.ndarray, grid: Grid, shape: tuple[int, int, int]) -> tuple[np.ndarray, Grid]:
    """Resample a (3, Z, Y, X) voxel-unit field to ``shape``, rescaling its components to the new voxels.

    Returns:
        (field (3, *shape) float32 in the new grid's voxels, the new grid).
    """
    _check_field(u_voxels, grid)
    target = grid.with_shape(tuple(shape))
    scale = np.asarray(shape, dtype=float) / np.asarray(grid.shape, dtype=float)  # new voxels per old voxel
    out = np.stack([_zoom(u_voxels[c].astype(np.float32), tuple(shape), order=1) * scale[c] for c in range(3)])
    return out.astype(np.float32), target


def grid_difference(a: Grid, b: Grid) -> str | None:
    """Why grid ``b`` is not grid ``a`` (shape, spacing, origin, orientation), or None when they are the same
    within 1e-4 mm spacing, 1e-3 mm origin and 1e-5 direction cosine (series of one acquisition, as stored)."""
    if tuple(a.shape) != tuple(b.shape):
        return f"shape {tuple(b.shape)} != {tuple(a.shape)}"
    if not np.allclose(a.spacing, b.spacing, rtol=0, atol=_SPACING_TOLERANCE_MM):
        return f"spacing {tuple(b.spacing)} != {tuple(a.spacing)} mm"
    if not np.allclose(a.origin, b.origin, rtol=0, atol=_ORIGIN_TOLERANCE_MM):
        return f"origin {tuple(np.round(b.origin, 3))} != {tuple(np.round(a.origin, 3))} mm"
    if not np.allclose(np.asarray(a.direction), np.asarray(b.direction), rtol=0, atol=_DIRECTION_TOLERANCE):
        return "orientation (ImageOrientationPatient) differs"
    return None
