"""Classical thorax segmentation of a CT (thresholds, connected components, distance transforms).

It behaves the same on the simulator's cartoon and on real CT, needs no downloaded weights, and gives what
breathing motion is built on and what a plan check needs: body, lungs (left and right), airways, bones, the
spine, the organs under the diaphragm, the diaphragm height per (x, y) column, and the cavity that moves
(lungs, mediastinum and upper abdomen inside the rib cage, spine excluded; the chest wall outside it slides).

Every function takes a canonical :class:`~breathcast.geometry.Volume` (identity direction, see
:mod:`breathcast.canonical`) in HU; sizes are in mm so results do not depend on the voxel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.path import Path
from scipy import ndimage
from scipy.spatial import ConvexHull

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume
from breathcast.sim.anatomy import Label

__all__ = ["ThoraxSegmentation", "segment_thorax", "signed_distance_mm", "sliding_weight", "SLIDING_Z_SIGMA_MM", "lung_bounding_box_mm", "extrapolated_dome_mm"]

SLIDING_WIDTH_MM = 4.0
"""Width of the shear layer at the cavity's edge, where motion falls from the lungs' to the chest wall's."""

SLIDING_Z_SIGMA_MM = 5.0
"""The sliding mask a network's displacement is multiplied by is smoothed along z by this (:func:`sliding_weight`):
its fall at a field-of-view cut or at the tilted edge behind the spine folded 12 voxels of 4D-Lung 0001's predicted
motion unsmoothed (``benchmarks/bench_real.py``), none at 5 mm."""

BODY_HU = -500.0
AIR_HU = -400.0
OUTSIDE_AIR_HU = -920.0
"""Air darker than this, connected to the in-plane edge of the field of view, is outside the patient."""
OUTSIDE_REACH_MM = 15.0
"""How far outside air reaches into less dark air (the partial-volume shell at the skin)."""
BONE_HU = 150.0
MIN_LUNG_ML = 150.0
WALL_MM = 12.0
"""Thickness of the abdominal wall below the lungs: the cavity there is the body eroded by it."""
SPINE_MARGIN_MM = 5.0
"""The still zone around the vertebrae that the moving cavity keeps clear of."""
DISC_MM = 8.0
"""Intervertebral discs are darker than bone: the spine is closed along z over this distance."""
MIN_TRACHEA_ML = 2.0
"""Less trachea and main bronchi than this in view cannot tell the CT's superior-inferior direction."""
TRACHEA_MIN_LENGTH_MM = 40.0
"""A narrow midline air tube this long along z is taken as trachea even where it does not join the lungs."""


@dataclass(frozen=True)
class ThoraxSegmentation:
    """A CT's segmentation on the CT's own (canonical) grid.

    Args:
        labels: (Z, Y, X) uint8 :class:`~breathcast.sim.anatomy.Label` ids: BODY, BONE, LUNG_LEFT,
            LUNG_RIGHT, TRACHEA_BRONCHI, LIVER (everything under the diaphragm inside the cavity).
        cavity: (Z, Y, X) bool, the region that moves with the lungs and the diaphragm.
        spine: (Z, Y, X) bool, the vertebrae.
        dome_z_mm: (Y, X) LPS z of the lung base (the diaphragm) per column, extrapolated where no lung is.
        apex_z_mm: LPS z of the lung apex (the highest lung voxel).
        grid: the grid all arrays live on.
        spine_offset_mm: mean y (LPS, + posterior) of the midline bone minus the lungs' mean y: positive
            when the spine lies behind the lungs, as it must in a correctly oriented CT (NaN without bone).
        heart_offset_mm: mean y of the soft tissue between the lungs (mid-lung slices) minus the lungs' mean y:
            negative when the heart lies in front, as it must.
        spine_ml: volume of the vertebral column found (the largest midline bone, in front or behind), ml.
        heart_lr_offset_mm: x of the soft tissue between the lungs minus the body's midline: positive when
            the heart lies to the patient's left, as it does but in rare dextrocardia.
        trachea_ml: volume of the trachea and main bronchi found (the airways, and a narrow midline air tube at
            least :data:`TRACHEA_MIN_LENGTH_MM` long that does not join the lungs), ml.
        trachea_above_fraction: the share of that volume above the lungs' mid-height: most of it, as it must in a
            correctly oriented CT (NaN without any).
    """

    labels: np.ndarray
    cavity: np.ndarray
    spine: np.ndarray
    dome_z_mm: np.ndarray
    apex_z_mm: float
    grid: Grid
    spine_offset_mm: float = float("nan")
    heart_offset_mm: float = float("nan")
    spine_ml: float = 0.0
    heart_lr_offset_mm: float = float("nan")
    trachea_ml: float = 0.0
    trachea_above_fraction: float = float("nan")

    @property
    def superior_inferior_ok(self) -> bool | None:
        """Whether the anatomy agrees with the grid's superior-inferior direction: the trachea and the main bronchi
        lie in the upper half of the lungs' height. None when less than :data:`MIN_TRACHEA_ML` of them is in view."""
        if self.trachea_ml < MIN_TRACHEA_ML:
            return None
        return self.trachea_above_fraction > 0.5

    @property
    def anterior_posterior_ok(self) -> bool:
        """Whether the anatomy agrees with the grid's anterior-posterior direction.

        The spine must lie behind the lungs when any of it is found (>= 0.5 ml);
        otherwise the mediastinum (the heart) must lie in front of the lungs' centre.
        """
        if self.spine_ml >= 0.5:
            return self.spine_offset_mm > 10.0
        return self.heart_offset_mm < -5.0

    @property
    def lungs(self) -> np.ndarray:
        """(Z, Y, X) bool, both lungs."""
        return (self.labels == Label.LUNG_LEFT) | (self.labels == Label.LUNG_RIGHT)

    @property
    def body(self) -> np.ndarray:
        """(Z, Y, X) bool, everything inside the skin."""
        return self.labels != Label.BACKGROUND

    def lung_volume_ml(self) -> float:
        return float(self.lungs.sum() * np.prod(self.grid.spacing) / 1000.0)


def _check_canonical(volume: Volume) -> None:
    if not np.allclose(volume.grid.direction_matrix, np.eye(3)):
        raise BreathcastError("segmentation needs a canonical volume: reorient it with breathcast.canonical.to_canonical")


def _ball(radius_mm: float, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    r = [max(1, int(round(radius_mm / s))) for s in spacing_zyx]
    zz, yy, xx = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    return (zz * spacing_zyx[0]) ** 2 + (yy * spacing_zyx[1]) ** 2 + (xx * spacing_zyx[2]) ** 2 <= radius_mm**2


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (all of them on a tie); ``mask`` itself when empty."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return np.isin(lab, np.flatnonzero(sizes >= sizes.max()) + 1)


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


def signed_distance_mm(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """(Z, Y, X) float32 mm: positive inside ``mask``, negative outside, ~0 on its boundary."""
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)
    return (inside - outside).astype(np.float32)


def sliding_weight(seg: ThoraxSegmentation, width_mm: float = SLIDING_WIDTH_MM, z_sigma_mm: float = 0.0) -> np.ndarray:
    """(Z, Y, X) float32 in [0, 1] on ``seg.grid``: 1 inside the moving cavity, 0 outside, a tanh step of
    ``width_mm`` across its edge (the lungs slide along the pleura; chest wall, ribs and spine stay).

    ``z_sigma_mm`` > 0 smooths it along z only (a Gaussian of that sigma): a weight that falls along z multiplies a
    superior-inferior motion into a compression, which folds where the fall per voxel times the motion in voxels
    exceeds 1; the shear across the pleura, a change along x and y, stays as sharp."""
    distance = signed_distance_mm(seg.cavity, seg.grid.spacing_zyx)
    weight = (0.5 * (1.0 + np.tanh(distance / width_mm))).astype(np.float32)
    if z_sigma_mm > 0:
        weight = ndimage.gaussian_filter1d(weight, z_sigma_mm / seg.grid.spacing[2], axis=0, mode="nearest")
    return weight


def _slice_hulls(mask: np.ndarray) -> np.ndarray:
    """The 2D convex hull of ``mask`` in every axial slice: the lungs' hull is the inside of the rib cage."""
    out = np.zeros_like(mask)
    ny, nx = mask.shape[1:]
    pixels = np.stack(np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij"), axis=-1).reshape(-1, 2)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        points = np.argwhere(mask[k])
        if len(points) < 4 or np.linalg.matrix_rank(points - points.mean(axis=0)) < 2:
            out[k] = mask[k]
            continue
        hull = ConvexHull(points)
        inside = Path(points[hull.vertices]).contains_points(pixels, radius=0.5)
        out[k] = inside.reshape(ny, nx) | mask[k]
    return out


def _behind_spine(spine: np.ndarray, margin_voxels: tuple[int, int]) -> np.ndarray:
    """Per slice, the spine's columns (x range + margin) from its front edge (- margin) to the back."""
    out = np.zeros_like(spine)
    my, mx = margin_voxels
    for k in np.flatnonzero(spine.any(axis=(1, 2))):
        ys, xs = np.nonzero(spine[k])
        out[k, max(0, ys.min() - my) :, max(0, xs.min() - mx) : xs.max() + mx + 1] = True
    return out


def _dome_height(lungs: np.ndarray, grid: Grid) -> np.ndarray:
    """(Y, X) LPS z of the lowest lung voxel per column, smoothed, extrapolated to columns without lung."""
    has = lungs.any(axis=0)
    return extrapolated_dome_mm(np.where(has, np.argmax(lungs, axis=0), 0).astype(np.float64), has, grid)


def extrapolated_dome_mm(lowest_index: np.ndarray, known: np.ndarray, grid: Grid) -> np.ndarray:
    """(Y, X) LPS z of the lung base: ``lowest_index`` (Y, X) fractional slice index where ``known`` (Y, X
    bool), taken from the nearest known column elsewhere, smoothed over 10 mm and kept on the grid's slices."""
    nearest = ndimage.distance_transform_edt(~known, return_distances=False, return_indices=True)
    filled = lowest_index[nearest[0], nearest[1]]
    sy, sx = grid.spacing[1], grid.spacing[0]
    smooth = ndimage.gaussian_filter(filled, sigma=(10.0 / sy, 10.0 / sx), mode="nearest")
    return grid.origin[2] + grid.spacing[2] * np.clip(smooth, 0, grid.shape[0] - 1)


def _outside_air(hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """(Z, Y, X) bool: the air around the patient.

    The dark regions (lung parenchyma is denser than air) that reach the in-plane edge; not every air region at
    the edge, because a field of view that cuts through the body leaves the lungs touching it. It then takes the
    air next to it (the blurred skin, up to OUTSIDE_REACH_MM) and no further, so lungs the field of view cuts lose
    only that much.
    """
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), sigma=[2.0 / v for v in spacing_zyx], mode="nearest")
    dark, n_dark = ndimage.label(smooth < OUTSIDE_AIR_HU)
    edge = np.zeros(n_dark + 1, dtype=bool)
    for face in (dark[:, 0, :], dark[:, -1, :], dark[:, :, 0], dark[:, :, -1]):
        edge[np.unique(face)] = True
    edge[0] = False
    seed = edge[dark]
    reach = max(1, int(np.ceil(OUTSIDE_REACH_MM / max(spacing_zyx))))
    step = _ball(max(spacing_zyx), spacing_zyx)
    return ndimage.binary_dilation(seed, structure=step, iterations=reach, mask=(hu < AIR_HU) | seed)


def _air_organs(hu: np.ndarray, outside: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """(Z, Y, X) bool: lungs and airways, the big air regions inside (bowel gas is far smaller than a lung)."""
    air = ndimage.binary_opening((hu < AIR_HU) & ~outside, structure=_ball(2.0, spacing_zyx))
    lab, n = ndimage.label(air)
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=index) * float(np.prod(spacing_zyx)) / 1000.0 if n else np.zeros(1)
    if sizes.max() < MIN_LUNG_ML:
        raise BreathcastError(f"no lungs found: no air region of at least {MIN_LUNG_ML:.0f} ml inside the body (largest {sizes.max():.0f} ml)")
    return np.isin(lab, index[sizes >= max(MIN_LUNG_ML, 0.2 * sizes.max())])


def _airways(air_organs: np.ndarray, x_mm: np.ndarray, mid_x: float, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """(Z, Y, X) bool: the narrow midline parts of the air organs, slice by slice (trachea and main bronchi)."""
    airways = np.zeros_like(air_organs)
    pixel_mm2 = spacing_zyx[1] * spacing_zyx[2]
    for k in np.flatnonzero(air_organs.any(axis=(1, 2))):
        lab, m = ndimage.label(air_organs[k])
        index = np.arange(1, m + 1)
        area = ndimage.sum_labels(np.ones_like(lab), lab, index) * pixel_mm2
        centre_x = ndimage.mean(np.broadcast_to(x_mm, lab.shape), lab, index)
        narrow = index[(area < 600.0) & (np.abs(centre_x - mid_x) < 25.0)]
        airways[k] = np.isin(lab, narrow)
    return airways


def _trachea(inner_air: np.ndarray, airways: np.ndarray, x_mm: np.ndarray, mid_x: float, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """(Z, Y, X) bool: the airways and every narrow midline air tube at least :data:`TRACHEA_MIN_LENGTH_MM` long
    along z, joined to the lungs or not (coarse voxels part a simulated trachea from them)."""
    tubes, _ = ndimage.label(_airways(inner_air, x_mm, mid_x, spacing_zyx))
    long = [i + 1 for i, box in enumerate(ndimage.find_objects(tubes)) if (box[0].stop - box[0].start) * spacing_zyx[0] >= TRACHEA_MIN_LENGTH_MM]
    return airways | np.isin(tubes, long)


def segment_thorax(volume: Volume) -> ThoraxSegmentation:
    """Segment a canonical thorax CT (HU); see the module docstring for what comes out.

    Raises:
        BreathcastError: when no lungs are found (no air region of at least 150 ml inside the body).
    """
    _check_canonical(volume)
    grid = volume.grid
    hu = volume.array
    sp = grid.spacing_zyx
    x_mm = grid.origin[0] + grid.spacing[0] * np.arange(hu.shape[2])
    y_mm = grid.origin[1] + grid.spacing[1] * np.arange(hu.shape[1])
    z_mm = (grid.origin[2] + grid.spacing[2] * np.arange(hu.shape[0]))[:, None, None]

    outside = _outside_air(hu, sp)
    air_organs = _air_organs(hu, outside, sp)
    # Body: tissue and the air organs, opened to drop the couch and cables, the largest component, filled.
    body = _largest_component(ndimage.binary_opening((hu > BODY_HU) | air_organs, structure=_ball(3.0, sp)))
    body = _fill_slices(body) | air_organs
    body_cols = np.flatnonzero(body.any(axis=(0, 1)))
    mid_x = float(0.5 * (x_mm[body_cols[0]] + x_mm[body_cols[-1]]))

    airways = _airways(air_organs, x_mm, mid_x, sp)
    lungs = ndimage.binary_closing(air_organs & ~airways, structure=_ball(4.0, sp)) & body & ~airways  # vessels in
    if not lungs.any():
        raise BreathcastError("no lungs found: the air regions inside the body are airways or too thin to be lungs")
    left = lungs & (x_mm[None, None, :] >= mid_x)  # LPS: +x is the patient's left

    # Bones. The vertebral column is the biggest midline bone, in front of the lungs or behind them: where it
    # lies tells the CT's orientation. Only one behind them is the spine, closed along z across the discs.
    bone = ndimage.binary_opening((hu > BONE_HU) & body & ~lungs, structure=_ball(1.5, sp))
    lung_y = float(y_mm[np.flatnonzero(lungs.any(axis=(0, 2)))].mean())
    # The vertebrae join across the discs only through their arches: where a CT cuts the arches off, the column is
    # the largest set of midline bones that bridging the discs along z connects, not one vertebra.
    disc = np.ones((2 * max(1, int(round(DISC_MM / sp[0]))) + 1, 1, 1), dtype=bool)
    midline = bone & (np.abs(x_mm - mid_x)[None, None, :] < 35.0)
    column = _largest_component(ndimage.binary_dilation(midline, structure=disc)) & midline
    spine_offset = float(y_mm[np.argwhere(column)[:, 1]].mean() - lung_y) if column.any() else float("nan")
    spine = ndimage.binary_dilation(column, structure=disc) & body & ~lungs if spine_offset > 0 else np.zeros_like(column)

    # The cavity: the lungs' per-slice hull in the lungs' slices; below them the body inside its wall.
    hull = _slice_hulls(lungs)
    dome = _dome_height(lungs, grid)
    below = z_mm < dome[None]
    lung_slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    middle = slice(lung_slices[0] + len(lung_slices) // 4, lung_slices[-1] + 1 - len(lung_slices) // 4)
    mediastinum = np.argwhere((hu[middle] > -200.0) & (hu[middle] < BONE_HU) & hull[middle] & ~lungs[middle])
    heart_offset = float(y_mm[mediastinum[:, 1]].mean() - lung_y) if len(mediastinum) else float("nan")
    heart_lr = float(x_mm[mediastinum[:, 2]].mean() - mid_x) if len(mediastinum) else float("nan")
    trachea = _trachea((hu < AIR_HU) & body & ~outside, airways, x_mm, mid_x, sp)
    trachea_slices = np.argwhere(trachea)[:, 0]
    above = float((trachea_slices > 0.5 * (lung_slices[0] + lung_slices[-1])).mean()) if len(trachea_slices) else float("nan")
    footprint = hull.any(axis=0)  # the rib cage seen from above
    inner_body = signed_distance_mm(body, sp) > WALL_MM
    abdomen = below & inner_body & (footprint[None] | (z_mm < z_mm[lung_slices[0], 0, 0]))
    margin = (int(round(SPINE_MARGIN_MM / sp[1])), int(round(SPINE_MARGIN_MM / sp[2])))
    cavity = (hull | lungs | abdomen) & body & ~_behind_spine(spine, margin) & ~(bone & ~hull)

    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[body] = Label.BODY
    labels[cavity & below & ~lungs] = Label.LIVER
    labels[bone] = Label.BONE
    labels[lungs & ~left] = Label.LUNG_RIGHT
    labels[left] = Label.LUNG_LEFT
    labels[airways] = Label.TRACHEA_BRONCHI
    return ThoraxSegmentation(
        labels, cavity, spine, dome.astype(np.float32), float(z_mm[lung_slices[-1], 0, 0]), grid,
        spine_offset_mm=spine_offset, heart_offset_mm=heart_offset,
        spine_ml=float(column.sum() * np.prod(sp) / 1000.0), heart_lr_offset_mm=heart_lr,
        trachea_ml=float(trachea.sum() * np.prod(sp) / 1000.0), trachea_above_fraction=above,
    )


def lung_bounding_box_mm(segmentation: ThoraxSegmentation) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) LPS corners (x, y, z) in mm of the lungs' bounding box (voxel centres)."""
    index = np.argwhere(segmentation.lungs)
    grid = segmentation.grid
    return grid.index_to_lps(index.min(axis=0)), grid.index_to_lps(index.max(axis=0))
