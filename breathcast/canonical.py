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

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume

__all__ = ["AXIS_TOLERANCE", "CanonicalFrame", "canonical_frame", "to_canonical"]

AXIS_TOLERANCE = 1e-3
"""Largest off-axis component (of a unit direction vector) still taken as axis-aligned."""


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
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

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


def canonical_frame(grid: Grid) -> CanonicalFrame:
    """The canonical frame of ``grid``; raises :class:`BreathcastError` for oblique geometry.

    Example:
        >>> ffs = Grid((4, 5, 6), (1.0, 1.0, 2.0), origin=(10.0, 0.0, 0.0),
        ...            direction=((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)))
        >>> frame = canonical_frame(ffs)
        >>> frame.flips, frame.canonical.origin
        ((True, False, True), (5.0, 0.0, -6.0))
    """
    d = grid.direction_matrix
    lps_axis = np.argmax(np.abs(d), axis=0)  # for index axis c (i, j, k), the LPS axis it runs along
    off_axis = np.abs(d) * (1 - np.eye(3)[lps_axis].T)
    if off_axis.max() > AXIS_TOLERANCE or len(set(lps_axis.tolist())) != 3:
        rows = "\\".join(f"{v:g}" for v in d.T[:2].ravel())
        raise BreathcastError(
            f"oblique geometry (ImageOrientationPatient {rows}) is not supported: "
            "resample the CT onto an axis-aligned grid first"
        )
    axes, flips, spacing = [], [], []
    for canonical_axis in range(3):  # array axis z, y, x <-> LPS axis 2, 1, 0
        c = int(np.flatnonzero(lps_axis == 2 - canonical_axis)[0])
        axes.append(2 - c)
        flips.append(bool(d[2 - canonical_axis, c] < 0))
        spacing.append(grid.spacing[c])
    corner = np.array([grid.shape[a] - 1 if f else 0 for a, f in zip(axes, flips)], dtype=float)
    stored_index = np.zeros(3)
    stored_index[axes] = corner
    canonical = Grid(
        shape=tuple(grid.shape[a] for a in axes),
        spacing=tuple(spacing[::-1]),
        origin=tuple(grid.index_to_lps(stored_index)),
        frame_of_reference_uid=grid.frame_of_reference_uid,
    )
    return CanonicalFrame(stored=grid, canonical=canonical, axes=tuple(axes), flips=tuple(flips))


def to_canonical(volume: Volume) -> tuple[Volume, CanonicalFrame]:
    """``volume`` reoriented to the canonical frame (no interpolation), and the frame to go back."""
    frame = canonical_frame(volume.grid)
    if frame.is_identity:
        return volume, frame
    return Volume(np.ascontiguousarray(frame.to_canonical_array(volume.array)), frame.canonical), frame
